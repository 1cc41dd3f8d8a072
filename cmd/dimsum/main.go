// Command dimsum runs a dimsum node or one of its tools.
//
//	dimsum [all] [flags]   a node with every role: aggregator, combiner and query
//	dimsum aggregator|combiner|query [flags]  a cluster node with one role
//	dimsum load [flags]    push a synthetic workload to a node
//	dimsum slice <family> [flags]  ask a node for a cube slice
//	dimsum version         print the version
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func main() {
	args := os.Args[1:]
	cmd := "all"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "all", "aggregator", "combiner", "query":
		err = runNode(cmd, args)
	case "load":
		err = runLoad(args)
	case "slice":
		err = runSlice(args)
	case "version":
		fmt.Printf("dimsum %s (%s)\n", buildVersion(), runtime.Version())
	case "help":
		usage()
	default:
		usage()
		err = fmt.Errorf("unknown command %q", cmd)
	}
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dimsum:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `usage: dimsum <command> [flags]

commands:
  all         run a node with every role (the default): aggregator, combiner and query;
              alone, or in a cluster with -join
  aggregator  run a cluster node that takes pushes and rolls them up (-join)
  combiner    run a cluster node that stores shards of the global cube (-join)
  query       run a cluster node that answers PromQL and cube slices (-join)
  load        push a synthetic log-derived workload to a node over gRPC
  slice       ask a node for a cube slice: exact sums by group, as a table
  version     print the version

Run 'dimsum <command> -h' for a command's flags.
`)
}

func buildVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}
