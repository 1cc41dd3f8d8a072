package loadtest

import (
	"testing"
	"time"

	"github.com/dimsum/dimsum/wire"
)

// TestWorkloadIsSeeded checks that a batch depends only on the seed and its
// number, and that the fleet has the configured shape.
func TestWorkloadIsSeeded(t *testing.T) {
	opts := Options{Seed: 5}
	opts.ensureDefaults()
	w := newWorkload(opts)
	if len(w.hosts) != 300 || len(w.dcs) != 3 || len(w.txns) != 50 {
		t.Fatalf("fleet of %d hosts in %d datacenters, %d transactions", len(w.hosts), len(w.dcs), len(w.txns))
	}
	now := time.Unix(1_800_000_000, 0)
	gen := func(i uint64) ([]string, []float64, []string) {
		var b wire.Batch
		dcs, vals := w.batch(&b, i, 1000, now, nil, nil)
		return dcs, vals, b.Request().Dict
	}
	d1, v1, dict1 := gen(3)
	d2, v2, dict2 := gen(3)
	_, v3, _ := gen(4)
	for i := range v1 {
		if d1[i] != d2[i] || v1[i] != v2[i] {
			t.Fatalf("event %d differs between two generations of batch 3", i)
		}
	}
	if len(dict1) != len(dict2) {
		t.Fatalf("dictionaries differ: %d and %d strings", len(dict1), len(dict2))
	}
	same := true
	for i := range v1 {
		same = same && v1[i] == v3[i]
	}
	if same {
		t.Error("batches 3 and 4 are identical")
	}
	sum := 0.0
	for _, v := range v1 {
		if v < 1 || v > 3 {
			t.Fatalf("value %v outside 1..3", v)
		}
		sum += v
	}
	if sum < 1500 || sum > 2500 {
		t.Errorf("mean value %v, want about 2", sum/1000)
	}
}
