package publisher_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"github.com/dimsum/dimsum/internal/node"
	"github.com/dimsum/dimsum/publisher"
)

// accessLine reads one line of an access log in the common log format,
//
//	10.1.2.3 - - [23/Nov/2026:06:40:01 +0000] "GET /checkout/cart?id=7 HTTP/1.1" 200 512
//
// into its time, transaction (the method and the first path segment) and
// status.
func accessLine(line string) (ts time.Time, txn, status string, err error) {
	_, rest, ok := strings.Cut(line, "[")
	stamp, rest, ok2 := strings.Cut(rest, "] \"")
	request, rest, ok3 := strings.Cut(rest, "\" ")
	fields := strings.Fields(rest)
	parts := strings.Fields(request)
	if !ok || !ok2 || !ok3 || len(fields) != 2 || len(parts) != 3 {
		return ts, "", "", fmt.Errorf("not an access log line: %q", line)
	}
	if ts, err = time.Parse("02/Jan/2006:15:04:05 -0700", stamp); err != nil {
		return ts, "", "", err
	}
	path, _, _ := strings.Cut(strings.TrimPrefix(parts[1], "/"), "/")
	path, _, _ = strings.Cut(path, "?")
	return ts, strings.ToLower(parts[0]) + "_" + path, fields[0], nil
}

// Example tails a few access-log lines of one host and pushes one counter
// event per request, labelled with where the log comes from (datacenter,
// cluster, host) and what it says (transaction, status).
func Example() {
	// A node to push to; in production, the addresses of the destination.
	dir, err := os.MkdirTemp("", "logtail")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	n, err := node.Start(node.Config{DataDir: dir, GRPCListen: "127.0.0.1:0", HTTPListen: "127.0.0.1:0"}, "example", nil)
	if err != nil {
		log.Fatal(err)
	}
	defer n.Close()

	p, err := publisher.New(publisher.Options{Addrs: []string{n.GRPCAddr()}, Policy: publisher.DropHead})
	if err != nil {
		log.Fatal(err)
	}
	now := time.Now().UTC().Format("02/Jan/2006:15:04:05 -0700")
	lines := []string{
		`10.1.2.3 - - [` + now + `] "GET /checkout/cart?id=7 HTTP/1.1" 200 512`,
		`10.1.2.4 - - [` + now + `] "GET /checkout HTTP/1.1" 500 80`,
		`10.1.2.3 - - [` + now + `] "POST /login HTTP/1.1" 200 64`,
		`garbage`,
		`10.1.2.5 - - [` + now + `] "GET /search?q=shoes HTTP/1.1" 404 12`,
	}
	// Where this log comes from; a tailer knows it from its host.
	origin := []string{"datacenter", "dc1", "cluster", "dc1-c2", "host", "dc1-c2-h007"}
	ctx := context.Background()
	for _, line := range lines {
		ts, txn, status, err := accessLine(line)
		if err != nil {
			fmt.Println("skipped:", err)
			continue
		}
		labels := append(origin[:len(origin):len(origin)], "transaction", txn, "status", status)
		if err := p.Add(ctx, publisher.Event{Family: "requests", TimestampMS: ts.UnixMilli(), Value: 1, Labels: labels}); err != nil {
			log.Fatal(err)
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := p.Close(cctx); err != nil {
		log.Fatal(err)
	}
	s := p.Stats()
	fmt.Printf("sent %d, rejected %d, dropped %d\n", s.Sent, len(s.Rejected), len(s.Dropped))
	// Output:
	// skipped: not an access log line: "garbage"
	// sent 4, rejected 0, dropped 0
}
