package wire

import (
	"slices"
	"strconv"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/dimsum/dimsum/wire/wirepb"
)

func TestBatch(t *testing.T) {
	var b Batch
	for range 300 { // more than one block of events
		b.Add("requests", 1000, 2, "host", "h1", "status", "200")
	}
	b.Add("requests", 2000, 1, "host", "h2", "status", "200")
	req := b.Request()
	if b.Len() != 301 || len(req.Dict) != 6 {
		t.Fatalf("%d events, dictionary %v", b.Len(), req.Dict)
	}
	last := req.Events[300]
	got := []string{req.Dict[last.Family]}
	for _, l := range last.Labels {
		got = append(got, req.Dict[l])
	}
	if want := []string{"requests", "host", "h2", "status", "200"}; !slices.Equal(got, want) {
		t.Errorf("last event decodes to %v, want %v", got, want)
	}
	// The request survives the wire.
	data, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	var back wirepb.PushRequest
	if err := proto.Unmarshal(data, &back); err != nil || !proto.Equal(&back, req) {
		t.Fatalf("round trip: %v", err)
	}
	b.Identify("pub-1", 7)
	if r := b.Request(); r.Source != "pub-1" || r.BatchSeq != 7 {
		t.Errorf("identity %q %d", r.Source, r.BatchSeq)
	}
	b.Reset()
	if r := b.Request(); b.Len() != 0 || len(r.Dict) != 0 || r.Source != "" || r.BatchSeq != 0 {
		t.Errorf("Reset left %d events, %d strings, identity %q %d", b.Len(), len(r.Dict), r.Source, r.BatchSeq)
	}
	b.Add("requests", 1, 1, "host", "h3")
	if d := b.Request().Dict; len(d) != 3 || d[0] != "requests" {
		t.Errorf("dictionary after Reset: %v", d)
	}
}

// TestBatchReusedLabels: a caller may fill one slice of labels anew for
// every event; each event keeps the values it was added with.
func TestBatchReusedLabels(t *testing.T) {
	var b Batch
	labels := []string{"host", "h1", "status", "200"}
	b.Add("requests", 1, 1, labels...)
	labels[1], labels[3] = "h2", "500"
	b.Add("requests", 2, 1, labels...)
	labels[1] = "h1"
	b.Add("requests", 3, 1, labels...)
	req := b.Request()
	for i, want := range [][]string{{"host", "h1", "status", "200"}, {"host", "h2", "status", "500"}, {"host", "h1", "status", "500"}} {
		var got []string
		for _, l := range req.Events[i].Labels {
			got = append(got, req.Dict[l])
		}
		if !slices.Equal(got, want) {
			t.Errorf("event %d decodes to %v, want %v", i, got, want)
		}
	}
}

// BenchmarkBatchAdd builds batches of 5,000 events of the default schema's
// shape, as a publisher does for every Push.
func BenchmarkBatchAdd(b *testing.B) {
	labels := make([][]string, 300)
	for i := range labels {
		labels[i] = []string{"datacenter", "dc" + strconv.Itoa(i%3), "cluster", "c" + strconv.Itoa(i%12), "host", "h" + strconv.Itoa(i),
			"transaction", "t" + strconv.Itoa(i%50), "status", "200"}
	}
	var batch Batch
	b.ReportAllocs()
	for i := range b.N {
		if i%5000 == 0 {
			batch.Reset()
		}
		batch.Add("requests", 1, 1, labels[i%len(labels)]...)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
}
