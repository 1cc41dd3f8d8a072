package aggregator_test

import (
	"errors"
	"fmt"
	"math"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire"
	"github.com/dimsum/dimsum/wire/wirepb"
)

// fuzzSchemaYAML adds a flat family to the default one, so that batches mix
// families with different labels.
const fuzzSchemaYAML = `
families:
  - name: requests
    dimensions: [datacenter/cluster/host, transaction, status]
  - name: errors
    dimensions: [status, code]
`

// FuzzPush pushes arbitrary encoded batches into a fresh aggregator each:
// Push must never panic, and must account for every event once, either as
// accepted or as one reject, in index order. Close must then flush the cube
// into the real combiner, and the store must count exactly the accepted
// events. The clock stands still, so no window closes before Close.
func FuzzPush(f *testing.F) {
	s, err := schema.Parse([]byte(fuzzSchemaYAML))
	if err != nil {
		f.Fatal(err)
	}
	// h holds the store and the clock; each input gets its own aggregator,
	// so that what one input leaves in the cube cannot change the next.
	h := start(f, aggregator.Options{Schema: s})
	ts := h.ms(0)
	var runs int

	seed := func(build func(b *wire.Batch), edit func(req *wirepb.PushRequest)) {
		var b wire.Batch
		build(&b)
		req := b.Request()
		if edit != nil {
			edit(req)
		}
		data, err := proto.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	good := func(b *wire.Batch) {
		for i := range 20 {
			addGood(b, ts-int64(i)*1000, float64(i), i%7, i%3, i%2)
		}
		b.Add("errors", ts, 1, "status", "500", "code", "E42")
	}
	seed(good, nil)
	seed(func(b *wire.Batch) {
		good(b)
		addGood(b, ts, math.NaN(), 0, 0, 0)
		addGood(b, ts, -1, 0, 0, 0)
		addGood(b, ts+time.Hour.Milliseconds(), 1, 0, 0, 0)
		addGood(b, ts-time.Hour.Milliseconds(), 1, 0, 0, 0)
		b.Add("nosuch", ts, 1)
		b.Add("errors", ts, 1, "status", "500", "status", "501")
		b.Add("errors", ts, 1, "status", "", "code", "E1")
		b.Add("errors", ts, 1, "code", "E1", "region", "eu")
	}, func(req *wirepb.PushRequest) {
		req.Events[0].Family = 1 << 20
		req.Events[1].Labels[3] = 1 << 20
		req.Events[2].Labels = req.Events[2].Labels[:3]
	})
	seed(func(b *wire.Batch) {}, nil)
	f.Add([]byte{0x12, 0x00})                         // one empty event
	f.Add([]byte{0x0a, 0x00, 0x12, 0x02, 0x18, 0x00}) // an empty string and an event with an empty label list

	f.Fuzz(func(t *testing.T, data []byte) {
		var req wirepb.PushRequest
		if err := proto.Unmarshal(data, &req); err != nil {
			t.Skip()
		}
		runs++
		sink := &combinerSink{c: h.sink.c}
		a, err := aggregator.New(aggregator.Options{
			Schema:            s,
			Sink:              sink,
			Name:              fmt.Sprintf("fuzz-%d", runs), // the stopped clock makes every incarnation alike
			Now:               h.clock.Now,
			MaxLateness:       20 * time.Second,
			MaxFutureSkew:     10 * time.Second,
			MaxCellsPerWindow: 4,
			MaxBatchEvents:    1000,
		})
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		before := h.everything(t)

		resp, err := a.Push(&req)
		if errors.Is(err, aggregator.ErrBatchTooLarge) && len(req.Events) > 1000 {
			return
		}
		if err != nil {
			t.Fatalf("Push: %v", err)
		}
		if got := resp.Accepted + uint64(len(resp.Rejects)); got != uint64(len(req.Events)) {
			t.Fatalf("accepted %d + %d rejects != %d events", resp.Accepted, len(resp.Rejects), len(req.Events))
		}
		for i, r := range resp.Rejects {
			if int(r.Index) >= len(req.Events) || (i > 0 && r.Index <= resp.Rejects[i-1].Index) {
				t.Fatalf("reject %d has index %d: out of range or order", i, r.Index)
			}
			if r.Reason == wirepb.RejectReason_REJECT_REASON_UNSPECIFIED || r.Detail == "" {
				t.Fatalf("reject %d: reason %v, detail %q", i, r.Reason, r.Detail)
			}
		}

		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		if errs := sink.errors(); len(errs) > 0 {
			t.Fatalf("the combiner refused %d flushes: %v", len(errs), errs[0])
		}
		if got := h.everything(t).Count - before.Count; got != resp.Accepted {
			t.Fatalf("the store counts %d more events, want the %d accepted", got, resp.Accepted)
		}
	})
}
