package fanout_test

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	"github.com/dimsum/dimsum/query"
	"github.com/dimsum/dimsum/query/fanout"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/tsdb"
)

// BenchmarkPromQLFanOut runs the coarse query of query's BenchmarkPromQL,
// sum by (datacenter) (rate(requests_total[5m])) over 24 hours at 1m,
// through the HTTP API over one local store and over three combiners on
// loopback holding 8 shards twice. The planner sends the query to the
// datacenter cuboid, so that is what both hold: the sums of 10,000 finest
// series (2,500 a datacenter, each counting 0 to 3 a minute) for every
// minute of the day. Both answers are checked to be the same before timing.
func BenchmarkPromQLFanOut(b *testing.B) {
	s, err := schema.Parse([]byte(`
resolutions: ["1m:35d", "1h:400d"]
families:
  - name: requests
    dimensions: [datacenter/cluster/host, transaction, status]
`))
	if err != nil {
		b.Fatal(err)
	}
	fam := s.Family("requests")
	var dc schema.Cuboid
	for _, c := range fam.Cuboids() {
		if fmt.Sprint(c.Labels) == "[datacenter]" {
			dc = c
		}
	}
	now := time.Now().Truncate(time.Hour)
	rng := rand.New(rand.NewPCG(1, 1))
	var deltas []tsdb.Delta
	for t := now.Add(-24 * time.Hour); t.Before(now); t = t.Add(time.Minute) {
		for d := range 4 {
			sum := 0
			for range 2500 {
				sum += rng.IntN(4)
			}
			deltas = append(deltas, tsdb.Delta{Family: fam.Name, Cuboid: dc.ID, Values: []string{fmt.Sprintf("dc%d", d)}, Time: t.UnixMilli(), Sum: float64(sum), Count: uint64(sum)})
		}
	}
	root := b.TempDir()
	c := &cluster{t: b, schema: s, dirs: map[string]string{}, nodes: map[string]*node{}}
	local := openDB(b, s, filepath.Join(root, "local"))
	defer local.Close()
	if _, err := local.Apply(tsdb.BatchID{}, deltas); err != nil {
		b.Fatal(err)
	}
	for i := range combiners {
		name := combinerName(i)
		c.dirs[name] = filepath.Join(root, name)
		db := openDB(b, s, c.dirs[name])
		var mine []tsdb.Delta
		for _, d := range deltas {
			for _, r := range replicasOf(int(schema.Shard(d.Family, d.Cuboid, d.Values, testShards))) {
				if r == name {
					mine = append(mine, d)
				}
			}
		}
		if _, err := db.Apply(tsdb.BatchID{}, mine); err != nil {
			b.Fatal(err)
		}
		if err := db.Close(); err != nil {
			b.Fatal(err)
		}
		c.start(name)
		defer c.stop(name)
	}
	fo, err := fanout.New(fanout.Options{Schema: s, Topology: c})
	if err != nil {
		b.Fatal(err)
	}
	clock := func() time.Time { return now }
	api := func(o query.Options) http.Handler {
		o.Schema, o.Now = s, clock
		a, err := query.NewAPI(o)
		if err != nil {
			b.Fatal(err)
		}
		m := http.NewServeMux()
		a.Register(m)
		return m
	}
	handlers := []struct {
		name string
		h    http.Handler
	}{
		{"local", api(query.Options{Reader: local})},
		{"fanout", api(query.Options{Source: fo})},
	}
	p := url.Values{
		"query": {`sum by (datacenter) (rate(requests_total[5m]))`},
		"start": {fmt.Sprint(now.Add(-24*time.Hour + 5*time.Minute).Unix())},
		"end":   {fmt.Sprint(now.Unix())},
		"step":  {"60"},
	}
	var want string
	for _, h := range handlers {
		code, body, _ := get(h.h, "/api/v1/query_range", p)
		if code != http.StatusOK || len(body) < 1000 {
			b.Fatalf("%s: HTTP %d: %.200s", h.name, code, body)
		}
		if want == "" {
			want = string(body)
		} else if string(body) != want {
			b.Fatalf("%s answers differently", h.name)
		}
	}
	for _, h := range handlers {
		b.Run("coarse-24h-1m/"+h.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if code, _, _ := get(h.h, "/api/v1/query_range", p); code != http.StatusOK {
					b.Fatalf("HTTP %d", code)
				}
			}
		})
	}
}
