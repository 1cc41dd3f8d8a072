// Command dimsum runs a dimsum node or one of its tools.
//
//	dimsum [all] [flags]   a node with every role: aggregator, combiner and query
//	dimsum aggregator|combiner|query [flags]  a cluster node with one role
//	dimsum load [flags]    push a synthetic workload to a node
//	dimsum slice <family> [flags]  ask a node for a cube slice
//	dimsum version         print the version
//
// 'dimsum -h' lists the commands, 'dimsum <command> -h' a command's flags.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

// command is one of dimsum's commands, as 'dimsum -h' lists it.
type command struct {
	name    string
	args    string // what follows the name on its usage line
	summary string
}

// commands are listed in this order by 'dimsum -h'.
var commands = []command{
	{"all", "[flags]", "run a node with every role (the default): aggregator, combiner and query, alone or in a cluster with -join"},
	{"aggregator", "[flags]", "run a cluster node that takes pushes and rolls them up into the cube"},
	{"combiner", "[flags]", "run a cluster node that stores shards of the global cube"},
	{"query", "[flags]", "run a cluster node that answers PromQL and cube slices"},
	{"load", "[flags]", "push a synthetic log-derived workload to a node, and verify what it reads back"},
	{"slice", "<family> [flags]", "ask a node for a cube slice: exact sums by group, as a table, CSV or JSON"},
	{"version", "", "print the version"},
}

func main() {
	if err := run(os.Args[1:]); err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "dimsum:", err)
		os.Exit(1)
	}
}

// run dispatches to the command args name; a first argument that is a flag
// goes to 'all', except the help and version flags.
func run(args []string) error {
	name := "all"
	if len(args) > 0 {
		switch args[0] {
		case "-h", "-help", "--help", "help":
			if len(args) > 1 && args[0] == "help" {
				// 'dimsum help load' is 'dimsum load -h'.
				return run([]string{args[1], "-h"})
			}
			usage(os.Stdout)
			return nil
		case "-version", "--version":
			return runVersion(nil)
		}
		if !strings.HasPrefix(args[0], "-") {
			name, args = args[0], args[1:]
		}
	}
	switch name {
	case "all", "aggregator", "combiner", "query":
		return runNode(name, args)
	case "load":
		return runLoad(args)
	case "slice":
		return runSlice(args)
	case "version":
		return runVersion(args)
	}
	usage(os.Stderr)
	return fmt.Errorf("unknown command %q", name)
}

// usage lists the commands, one line each.
func usage(w io.Writer) {
	fmt.Fprint(w, "usage: dimsum <command> [flags]\n\ncommands:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-11s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, "\nWithout a command, dimsum runs 'all'. Run 'dimsum <command> -h' for a command's flags,\n'dimsum --version' for the version.\n")
}

func runVersion(args []string) error {
	fs := newFlags("version")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	fmt.Printf("dimsum %s (%s)\n", buildVersion(), runtime.Version())
	return nil
}

// newFlags returns the flag set of the command name. The flag package
// prints nothing itself: parse says what went wrong, or prints the usage
// when asked.
func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

// parse reads args into fs, flags and other arguments in any order, and
// returns the other arguments: exactly positional of them. After "--"
// every argument is positional. -h prints the command's usage on stdout
// and returns flag.ErrHelp.
func parse(fs *flag.FlagSet, args []string, positional int) ([]string, error) {
	var rest []string
	for {
		err := fs.Parse(args)
		if errors.Is(err, flag.ErrHelp) {
			commandUsage(os.Stdout, fs)
			return nil, err
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w (run 'dimsum %s -h' for its flags)", fs.Name(), err, fs.Name())
		}
		left := fs.Args()
		if n := len(args) - len(left); n > 0 && args[n-1] == "--" {
			rest = append(rest, left...)
			break
		}
		if len(left) == 0 {
			break
		}
		rest, args = append(rest, left[0]), left[1:]
	}
	if len(rest) != positional {
		c := lookup(fs.Name())
		if len(rest) > positional {
			return nil, fmt.Errorf("%s: unexpected argument %q (usage: %s)", fs.Name(), rest[positional], c.usage())
		}
		return nil, fmt.Errorf("%s: missing argument (usage: %s)", fs.Name(), c.usage())
	}
	return rest, nil
}

// commandUsage writes a command's usage line, its summary and its flags.
func commandUsage(w io.Writer, fs *flag.FlagSet) {
	c := lookup(fs.Name())
	fmt.Fprintf(w, "usage: %s\n\n%s.\n", c.usage(), strings.ToUpper(c.summary[:1])+c.summary[1:])
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	if n > 0 {
		fmt.Fprint(w, "\nflags (in any order, before or after the other arguments):\n")
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
}

func (c command) usage() string { return strings.TrimSpace("dimsum " + c.name + " " + c.args) }

func lookup(name string) command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	panic("dimsum: no command " + name)
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
