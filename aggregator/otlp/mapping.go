package otlp

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/otlptranslator"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	metricspb "go.opentelemetry.io/proto/otlp/metrics/v1"

	"github.com/dimsum/dimsum/aggregator"
	"github.com/dimsum/dimsum/schema"
	"github.com/dimsum/dimsum/wire"
)

// Reasons a data point is refused before the Push path sees it, as the
// partial success message and dimsum_otlp_data_points_refused_total name
// them. The Push path's own reasons (unknown_family, missing_dimension,
// not_finite, ...) are wire.ReasonName's.
const (
	reasonHistogram    = "histogram"
	reasonGauge        = "gauge"
	reasonSummary      = "summary"
	reasonCumulative   = "cumulative"
	reasonNonMonotonic = "non_monotonic"
	reasonNoValue      = "no_value"
	reasonBadAttribute = "bad_attribute"
)

// refusedReasons lists them, for dimsum_otlp_data_points_refused_total.
var refusedReasons = []string{reasonHistogram, reasonGauge, reasonSummary, reasonCumulative, reasonNonMonotonic, reasonNoValue, reasonBadAttribute}

// names translates OTLP names as Prometheus' OTLP translator does by
// default (UnderscoreEscapingWithSuffixes), caching what it translated.
// Producers use a few names over and over, so the caches stay small;
// past maxCached entries a name is translated every time rather than
// letting a producer of random names grow them.
type names struct {
	mu struct {
		sync.RWMutex
		metrics map[metricKey]string
		labels  map[string]string
	}
}

type metricKey struct{ name, unit string }

const maxCached = 1 << 14

func newNames() *names {
	n := &names{}
	n.mu.metrics = map[metricKey]string{}
	n.mu.labels = map[string]string{}
	return n
}

// family is the family name an OTLP monotonic sum feeds by default: its
// name as Prometheus would write it for the counter (dots to underscores,
// the unit's suffix, then _total), less the _total that the family's
// counter view adds back. So requests_total in dimsum is the name
// Prometheus' OTLP receiver would give the same metric. A name that does
// not translate is returned as it is, for the Push path to refuse.
func (n *names) family(name, unit string) string {
	k := metricKey{name, unit}
	n.mu.RLock()
	f, ok := n.mu.metrics[k]
	n.mu.RUnlock()
	if ok {
		return f
	}
	namer := otlptranslator.MetricNamer{WithMetricSuffixes: true}
	f, err := namer.Build(otlptranslator.Metric{Name: name, Unit: unit, Type: otlptranslator.MetricTypeMonotonicCounter})
	if err != nil {
		f = name
	} else {
		f = strings.TrimSuffix(f, "_total")
	}
	n.mu.Lock()
	if len(n.mu.metrics) < maxCached {
		n.mu.metrics[k] = f
	}
	n.mu.Unlock()
	return f
}

// label is the label an attribute of that name feeds when no rename names
// it: dots and other characters a label name cannot hold become
// underscores. A name that does not translate is returned as it is: no
// family has such a label.
func (n *names) label(attr string) string {
	n.mu.RLock()
	l, ok := n.mu.labels[attr]
	n.mu.RUnlock()
	if ok {
		return l
	}
	namer := otlptranslator.LabelNamer{}
	l, err := namer.Build(attr)
	if err != nil {
		l = attr
	}
	n.mu.Lock()
	if len(n.mu.labels) < maxCached {
		n.mu.labels[attr] = l
	}
	n.mu.Unlock()
	return l
}

// labelOf is the label attribute attr feeds in family f.
func (n *names) labelOf(f *schema.Family, attr string) string {
	if l, ok := f.OTLP.Attributes[attr]; ok {
		return l
	}
	return n.label(attr)
}

// refusal is what was refused of one metric before the Push path: points
// data points, for reason.
type refusal struct {
	metric, reason, detail string
	points                 int
}

// batch is one export request mapped onto the Push path: the batch to
// push, the OTLP metric each of its events came from, and what was
// refused on the way. Batches are pooled; reset empties one.
type batch struct {
	b       wire.Batch
	metrics []string // per event of b: its metric's name
	refused []refusal
	points  int // data points seen, accepted or not

	// Scratch, reused across data points and requests.
	labels []string
	ints   map[int64]string // integer attribute values already written out
	// ctx holds, per family, the labels of the current resource and
	// scope, for the family's data points to start from.
	ctx map[*schema.Family][]ctxLabel
}

// ctxLabel is a label set by a resource or scope attribute; bad says why
// its value cannot be a label value.
type ctxLabel struct {
	slot        int
	label, val  string
	scope       bool // set by the scope, over the resource
	bad, detail string
}

var batchPool = sync.Pool{New: func() any {
	return &batch{ints: map[int64]string{}, ctx: map[*schema.Family][]ctxLabel{}}
}}

// reset empties b for the next request, keeping none of this one's
// strings.
func (b *batch) reset() {
	b.b.Reset()
	clear(b.metrics)
	b.metrics = b.metrics[:0]
	clear(b.refused)
	b.refused = b.refused[:0]
	clear(b.labels)
	b.labels = b.labels[:0]
	b.points = 0
	if len(b.ints) > 1024 {
		clear(b.ints)
	}
	clear(b.ctx)
}

// refuse records that points data points of m were refused for reason.
func (b *batch) refuse(m *metricspb.Metric, reason, detail string, points int) {
	b.refused = append(b.refused, refusal{metric: m.GetName(), reason: reason, detail: detail, points: points})
}

// fill maps every data point of rms into b: a delta monotonic sum's
// points become events of the family the metric feeds; every other point
// is refused, with its reason.
func (n *names) fill(s *schema.Schema, b *batch, rms []*metricspb.ResourceMetrics) {
	for _, rm := range rms {
		res := rm.GetResource().GetAttributes()
		for _, sm := range rm.GetScopeMetrics() {
			clear(b.ctx)
			scope := sm.GetScope().GetAttributes()
			for _, m := range sm.GetMetrics() {
				n.fillMetric(s, b, m, res, scope)
			}
		}
	}
}

func (n *names) fillMetric(s *schema.Schema, b *batch, m *metricspb.Metric, res, scope []*commonpb.KeyValue) {
	var sum *metricspb.Sum
	switch d := m.GetData().(type) {
	case *metricspb.Metric_Sum:
		sum = d.Sum
	case *metricspb.Metric_Histogram:
		b.refuseAll(m, reasonHistogram, "histograms need a distribution family, not yet supported", len(d.Histogram.GetDataPoints()))
		return
	case *metricspb.Metric_ExponentialHistogram:
		b.refuseAll(m, reasonHistogram, "exponential histograms need a distribution family, not yet supported", len(d.ExponentialHistogram.GetDataPoints()))
		return
	case *metricspb.Metric_Gauge:
		b.refuseAll(m, reasonGauge, "gauges are not counted: a family counts the deltas of a monotonic sum", len(d.Gauge.GetDataPoints()))
		return
	case *metricspb.Metric_Summary:
		b.refuseAll(m, reasonSummary, "summaries are not counted: their quantiles do not add up; send a histogram once distribution families exist", len(d.Summary.GetDataPoints()))
		return
	default:
		return // no data: no points
	}
	points := sum.GetDataPoints()
	switch {
	case !sum.GetIsMonotonic():
		b.refuseAll(m, reasonNonMonotonic, "a non-monotonic sum (an UpDownCounter) is not a counter; a family counts the deltas of a monotonic sum", len(points))
		return
	case sum.GetAggregationTemporality() != metricspb.AggregationTemporality_AGGREGATION_TEMPORALITY_DELTA:
		b.refuseAll(m, reasonCumulative, fmt.Sprintf("temporality %s is not taken, only delta: set the exporter's temporality preference to delta, or convert with the Collector's cumulativetodelta processor",
			strings.TrimPrefix(sum.GetAggregationTemporality().String(), "AGGREGATION_TEMPORALITY_")), len(points))
		return
	}
	f := s.OTLPFamily(m.GetName())
	name := ""
	if f != nil {
		name = f.Name
	} else {
		name = n.family(m.GetName(), m.GetUnit())
		f = s.Family(name)
	}
	b.points += len(points)
	var ctx []ctxLabel
	if f != nil {
		ctx = b.context(n, f, res, scope)
	}
	for _, p := range points {
		if p.GetFlags()&uint32(metricspb.DataPointFlags_DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK) != 0 {
			// A marker that the stream has no value: nothing to count,
			// nothing refused.
			b.points--
			continue
		}
		var v float64
		switch val := p.GetValue().(type) {
		case *metricspb.NumberDataPoint_AsInt:
			v = float64(val.AsInt)
			if math.Abs(v) == aggregator.MaxValue && val.AsInt != aggregator.MaxValue && val.AsInt != -aggregator.MaxValue {
				// 2^53±1 round to ±2^53, which the Push path takes; they
				// lie beyond it, and must be refused as it refuses them.
				v = math.Nextafter(v, math.Copysign(math.Inf(1), v))
			}
		case *metricspb.NumberDataPoint_AsDouble:
			v = val.AsDouble
		default:
			b.refuse(m, reasonNoValue, "a data point has neither as_int nor as_double", 1)
			continue
		}
		b.labels = b.labels[:0]
		if f != nil {
			if bad, detail := b.pointLabels(n, f, ctx, p.GetAttributes()); bad != "" {
				b.refuse(m, bad, detail, 1)
				continue
			}
		}
		// The Push path checks the rest: the family, every dimension
		// present once and no other, the value, the time.
		b.b.Add(name, int64(p.GetTimeUnixNano()/1e6), v, b.labels...)
		b.metrics = append(b.metrics, m.GetName())
	}
}

// refuseAll refuses the points data points of metric m.
func (b *batch) refuseAll(m *metricspb.Metric, reason, detail string, points int) {
	if points == 0 {
		return
	}
	b.points += points
	b.refuse(m, reason, detail, points)
}

// context returns the labels of f that the current resource and scope
// set: a scope attribute over a resource attribute of the same label.
// Attributes that feed no label of f are left out: a resource describes
// its producer at length (service.name, telemetry.sdk.*, process.*),
// and only what the schema names is a dimension.
func (b *batch) context(n *names, f *schema.Family, res, scope []*commonpb.KeyValue) []ctxLabel {
	if c, ok := b.ctx[f]; ok {
		return c
	}
	var c []ctxLabel
	add := func(attrs []*commonpb.KeyValue, isScope bool) {
		for _, kv := range attrs {
			l := n.labelOf(f, kv.GetKey())
			slot, ok := f.LabelIndex(l)
			if !ok {
				continue
			}
			if isScope {
				// The scope's value replaces the resource's.
				kept := c[:0]
				for _, e := range c {
					if e.slot != slot || e.scope {
						kept = append(kept, e)
					}
				}
				c = kept
			}
			val, bad := b.value(kv.GetValue())
			cl := ctxLabel{slot: slot, label: l, val: val, scope: isScope}
			if bad != "" {
				cl.bad, cl.detail = reasonBadAttribute, badAttribute(kv.GetKey(), bad)
			}
			c = append(c, cl)
		}
	}
	add(res, false)
	add(scope, true)
	b.ctx[f] = c
	return c
}

// pointLabels fills b.labels for one data point of f: the data point's
// attributes over the resource's and the scope's. A data point attribute
// that feeds no label of f stays, for the Push path to refuse as an
// unknown dimension, as it refuses a label of a pushed event that is not
// a dimension; so do two attributes of one level feeding one label.
func (b *batch) pointLabels(n *names, f *schema.Family, ctx []ctxLabel, attrs []*commonpb.KeyValue) (string, string) {
	var set uint16 // slots the data point sets
	for _, kv := range attrs {
		l := n.labelOf(f, kv.GetKey())
		if slot, ok := f.LabelIndex(l); ok {
			set |= 1 << slot
		}
		val, bad := b.value(kv.GetValue())
		if bad != "" {
			return reasonBadAttribute, badAttribute(kv.GetKey(), bad)
		}
		b.labels = append(b.labels, l, val)
	}
	for _, c := range ctx {
		if set&(1<<c.slot) != 0 {
			continue
		}
		if c.bad != "" {
			return c.bad, c.detail
		}
		b.labels = append(b.labels, c.label, c.val)
	}
	return "", ""
}

// badAttribute says why attribute key, whose value is bad, feeds no label.
func badAttribute(key, bad string) string {
	return fmt.Sprintf("attribute %s has %s; a dimension takes a string, integer, boolean or double", aggregator.Quote(key), bad)
}

// value writes an attribute value as a label value, or says why it
// cannot be one. Integers (an HTTP status code) are written in decimal,
// booleans as true and false, doubles in the shortest form that reads
// back the same.
func (b *batch) value(v *commonpb.AnyValue) (string, string) {
	switch x := v.GetValue().(type) {
	case *commonpb.AnyValue_StringValue:
		return x.StringValue, ""
	case *commonpb.AnyValue_IntValue:
		s, ok := b.ints[x.IntValue]
		if !ok {
			s = strconv.FormatInt(x.IntValue, 10)
			b.ints[x.IntValue] = s
		}
		return s, ""
	case *commonpb.AnyValue_BoolValue:
		return strconv.FormatBool(x.BoolValue), ""
	case *commonpb.AnyValue_DoubleValue:
		return strconv.FormatFloat(x.DoubleValue, 'g', -1, 64), ""
	case *commonpb.AnyValue_BytesValue:
		return "", "a bytes value"
	case *commonpb.AnyValue_ArrayValue:
		return "", "an array value"
	case *commonpb.AnyValue_KvlistValue:
		return "", "a key-value list value"
	}
	return "", "no value"
}
