package schema

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/prometheus/common/model"
	"go.yaml.in/yaml/v3"
)

// ErrInvalid marks every error that Parse and Build return.
var ErrInvalid = errors.New("schema: invalid")

// MaxLevels bounds the number of labels (hierarchy levels plus flat
// dimensions) of one family. The aggregator keys its cells with a fixed-size
// array of this many interned values, which keeps the hot path free of
// allocations; eight levels cover datacenter/cluster/host plus five flat
// dimensions.
const MaxLevels = 8

// StepsPerRow is the number of steps one stored row holds at every
// resolution, so a row spans StepsPerRow*step (1h at 10s, 6h at 1m, 15d at
// 1h). It is part of the on-disk format (docs/format/tsdb.md).
const StepsPerRow = 360

// maxStep keeps a row's span (StepsPerRow steps) within a time.Duration.
const maxStep = 24 * time.Hour * 200

// Kind is the kind of a metric family. ONLY APPEND: the numeric values are
// written to disk and to the wire.
type Kind uint8

const (
	// KindCounter families carry non-negative deltas; a cell-step holds the
	// sum of the deltas and the number of events.
	KindCounter Kind = 1
)

func (k Kind) String() string {
	switch k {
	case KindCounter:
		return "counter"
	default:
		return fmt.Sprintf("kind(%d)", uint8(k))
	}
}

// Dimension is a hierarchy (datacenter/cluster/host) or a flat dimension
// (transaction), which is a hierarchy of one level.
type Dimension struct {
	// Name is the dimension as written in the schema: the levels joined by
	// "/".
	Name string
	// Levels are the label names of the hierarchy, coarsest first.
	Levels []string
}

// CuboidID identifies a cuboid within its family: the mixed-radix number of
// its per-dimension depths, first dimension most significant. The apex is 0
// and the finest cuboid is the largest ID.
type CuboidID uint16

// Cuboid is one node of a family's lattice: a depth per dimension.
type Cuboid struct {
	ID CuboidID
	// Depths holds, per dimension, how many of its levels the cuboid keeps.
	Depths []int
	// Labels are the label names the cuboid keeps, in family label order.
	Labels []string
	// Slots are the indexes of Labels in Family.Labels.
	Slots []int
}

// Family is a metric family: a name, a kind and its dimensions.
type Family struct {
	Name       string
	Kind       Kind
	Help       string
	Dimensions []Dimension
	// Labels are the label names of every level of every dimension, in
	// schema order. An event of the family carries exactly these labels.
	Labels []string
	// OTLP says which OTLP metrics and attributes feed the family.
	OTLP OTLP

	labelIndex map[string]int
	cuboids    []Cuboid // every cuboid of the lattice, indexed by ID
}

// LabelIndex returns the position of a label in Labels.
func (f *Family) LabelIndex(name string) (int, bool) {
	i, ok := f.labelIndex[name]
	return i, ok
}

// Cuboids returns every materialized cuboid, finest first.
func (f *Family) Cuboids() []Cuboid {
	out := make([]Cuboid, len(f.cuboids))
	for i := range f.cuboids {
		out[i] = f.cuboids[len(f.cuboids)-1-i]
	}
	return out
}

// Cuboid returns the cuboid with the given ID.
func (f *Family) Cuboid(id CuboidID) (Cuboid, bool) {
	if int(id) >= len(f.cuboids) {
		return Cuboid{}, false
	}
	return f.cuboids[id], true
}

// Finest returns the cuboid that keeps every label.
func (f *Family) Finest() Cuboid { return f.cuboids[len(f.cuboids)-1] }

// Resolution is one resolution the cube is kept at.
type Resolution struct {
	Step      time.Duration
	Retention time.Duration
}

// RowSpan is the time one stored row covers at this resolution.
func (r Resolution) RowSpan() time.Duration { return StepsPerRow * r.Step }

// StepStart returns the start of the step holding t, both in unix
// milliseconds. Steps are aligned to the unix epoch.
func (r Resolution) StepStart(t int64) int64 {
	step := r.Step.Milliseconds()
	return floorDiv(t, step) * step
}

// Row returns the number of the stored row holding t (unix milliseconds):
// rows of RowSpan are aligned to the unix epoch, so row n starts at
// n*RowSpan.
func (r Resolution) Row(t int64) int64 { return floorDiv(t, r.RowSpan().Milliseconds()) }

// floorDiv divides rounding towards negative infinity, so that instants
// before 1970 fall in the step and row that hold them.
func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b < 0 {
		q--
	}
	return q
}

// String is the resolution as the schema writes it, "step:retention".
func (r Resolution) String() string {
	return FormatDuration(r.Step) + ":" + FormatDuration(r.Retention)
}

// FormatDuration writes d as a Prometheus duration in days and smaller
// units, as retentions are configured ("35d"), where Prometheus' own
// formatting says "5w" of any whole number of weeks.
func FormatDuration(d time.Duration) string {
	const day = 24 * time.Hour
	days, rest := d/day, d%day
	switch {
	case days == 0:
		return model.Duration(d).String()
	case rest == 0:
		return fmt.Sprintf("%dd", days)
	}
	return fmt.Sprintf("%dd%s", days, model.Duration(rest))
}

// Schema is a validated, immutable schema.
type Schema struct {
	Families []*Family
	// Resolutions are ordered finest first. The finest step is the
	// aggregator's window.
	Resolutions []Resolution

	byName      map[string]*Family
	otlpMetrics map[string]*Family // OTLP metric name -> the family listing it
}

// Family returns the family with the given name, or nil.
func (s *Schema) Family(name string) *Family { return s.byName[name] }

// Window is the aggregator's window: the finest resolution's step.
func (s *Schema) Window() time.Duration { return s.Resolutions[0].Step }

// File is the YAML form of a schema.
type File struct {
	// Resolutions as "step:retention", finest first; each step a multiple of
	// the previous one. The default is 10s:8d, 1m:35d, 1h:400d.
	Resolutions []string     `yaml:"resolutions"`
	Families    []FamilyFile `yaml:"families"`
	// OTLP holds the schema-wide attribute renames of OTLP ingest.
	OTLP OTLPFile `yaml:"otlp"`
}

// FamilyFile is the YAML form of a family.
type FamilyFile struct {
	Name string `yaml:"name"`
	// Kind is "counter" (the default).
	Kind string `yaml:"kind"`
	Help string `yaml:"help"`
	// Dimensions, each a hierarchy "a/b/c" (coarsest first) or a flat name.
	Dimensions []string `yaml:"dimensions"`
	// OTLP says which OTLP metrics and attributes feed the family.
	OTLP FamilyOTLPFile `yaml:"otlp"`
}

// DefaultResolutions are used when a schema names none.
var DefaultResolutions = []string{"10s:8d", "1m:35d", "1h:400d"}

//go:embed default.yaml
var defaultYAML []byte

// DefaultFile returns the embedded default schema, a requests counter over
// datacenter/cluster/host, transaction and status.
func DefaultFile() File {
	f, err := decode(defaultYAML)
	if err != nil {
		panic(fmt.Sprintf("schema: embedded default is invalid: %v", err))
	}
	return f
}

// Default returns the embedded default schema, built.
func Default() *Schema {
	s, err := DefaultFile().Build()
	if err != nil {
		panic(fmt.Sprintf("schema: embedded default is invalid: %v", err))
	}
	return s
}

// Parse decodes and validates a YAML schema.
func Parse(data []byte) (*Schema, error) {
	f, err := decode(data)
	if err != nil {
		return nil, err
	}
	return f.Build()
}

func decode(data []byte) (File, error) {
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		return File{}, fmt.Errorf("%w: cannot decode YAML: %v", ErrInvalid, err)
	}
	return f, nil
}

var (
	metricNameRE = regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`)
	labelNameRE  = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)
)

// Build validates the file and builds the schema.
func (f File) Build() (*Schema, error) {
	s := &Schema{byName: map[string]*Family{}, otlpMetrics: map[string]*Family{}}
	res := f.Resolutions
	if len(res) == 0 {
		res = DefaultResolutions
	}
	for i, r := range res {
		step, ret, ok := strings.Cut(r, ":")
		if !ok {
			return nil, fmt.Errorf("%w: resolution %q: want step:retention", ErrInvalid, r)
		}
		st, err := model.ParseDuration(step)
		if err != nil {
			return nil, fmt.Errorf("%w: resolution %q: step: %v", ErrInvalid, r, err)
		}
		rt, err := model.ParseDuration(ret)
		if err != nil {
			return nil, fmt.Errorf("%w: resolution %q: retention: %v", ErrInvalid, r, err)
		}
		cur := Resolution{Step: time.Duration(st), Retention: time.Duration(rt)}
		switch {
		case cur.Step < time.Second || cur.Step%time.Second != 0:
			return nil, fmt.Errorf("%w: resolution %q: step must be a whole number of seconds", ErrInvalid, r)
		case cur.Step > maxStep:
			return nil, fmt.Errorf("%w: resolution %q: step must be at most %s", ErrInvalid, r, model.Duration(maxStep))
		case cur.Retention < cur.RowSpan():
			return nil, fmt.Errorf("%w: resolution %q: retention must cover at least one row (%d steps)", ErrInvalid, r, StepsPerRow)
		case i > 0 && cur.Step%s.Resolutions[i-1].Step != 0:
			return nil, fmt.Errorf("%w: resolution %q: step must be a multiple of the previous step", ErrInvalid, r)
		case i > 0 && cur.Step == s.Resolutions[i-1].Step:
			return nil, fmt.Errorf("%w: resolution %q: steps must grow", ErrInvalid, r)
		}
		s.Resolutions = append(s.Resolutions, cur)
	}
	if len(f.Families) == 0 {
		return nil, fmt.Errorf("%w: no families", ErrInvalid)
	}
	if err := checkRenames("otlp", f.OTLP.Attributes); err != nil {
		return nil, err
	}
	for _, ff := range f.Families {
		fam, err := ff.build()
		if err != nil {
			return nil, err
		}
		if s.byName[fam.Name] != nil {
			return nil, fmt.Errorf("%w: family %q declared twice", ErrInvalid, fam.Name)
		}
		if err := ff.buildOTLP(fam, f.OTLP.Attributes); err != nil {
			return nil, err
		}
		for _, m := range fam.OTLP.Metrics {
			if other := s.otlpMetrics[m]; other != nil {
				return nil, fmt.Errorf("%w: OTLP metric %q feeds both family %q and family %q", ErrInvalid, m, other.Name, fam.Name)
			}
			s.otlpMetrics[m] = fam
		}
		s.byName[fam.Name] = fam
		s.Families = append(s.Families, fam)
	}
	return s, nil
}

func (ff FamilyFile) build() (*Family, error) {
	if !metricNameRE.MatchString(ff.Name) {
		return nil, fmt.Errorf("%w: family name %q is not a valid metric name", ErrInvalid, ff.Name)
	}
	fam := &Family{Name: ff.Name, Help: ff.Help, labelIndex: map[string]int{}}
	switch ff.Kind {
	case "", "counter":
		fam.Kind = KindCounter
	default:
		return nil, fmt.Errorf("%w: family %q: unknown kind %q (want counter)", ErrInvalid, ff.Name, ff.Kind)
	}
	if len(ff.Dimensions) == 0 {
		return nil, fmt.Errorf("%w: family %q: no dimensions", ErrInvalid, ff.Name)
	}
	for _, d := range ff.Dimensions {
		dim := Dimension{Name: d, Levels: strings.Split(d, "/")}
		for _, l := range dim.Levels {
			if !labelNameRE.MatchString(l) || strings.HasPrefix(l, "__") {
				return nil, fmt.Errorf("%w: family %q: %q is not a valid label name", ErrInvalid, ff.Name, l)
			}
			if _, dup := fam.labelIndex[l]; dup {
				return nil, fmt.Errorf("%w: family %q: label %q appears twice", ErrInvalid, ff.Name, l)
			}
			fam.labelIndex[l] = len(fam.Labels)
			fam.Labels = append(fam.Labels, l)
		}
		fam.Dimensions = append(fam.Dimensions, dim)
	}
	if len(fam.Labels) > MaxLevels {
		return nil, fmt.Errorf("%w: family %q: %d labels, at most %d", ErrInvalid, ff.Name, len(fam.Labels), MaxLevels)
	}
	fam.buildLattice()
	return fam, nil
}

// buildLattice enumerates every cuboid in ID order.
func (f *Family) buildLattice() {
	n := 1
	for _, d := range f.Dimensions {
		n *= len(d.Levels) + 1
	}
	f.cuboids = make([]Cuboid, n)
	for id := range n {
		c := Cuboid{ID: CuboidID(id), Depths: make([]int, len(f.Dimensions))}
		rem := id
		for i := len(f.Dimensions) - 1; i >= 0; i-- {
			radix := len(f.Dimensions[i].Levels) + 1
			c.Depths[i] = rem % radix
			rem /= radix
		}
		slot := 0
		for i, d := range f.Dimensions {
			for l := range d.Levels {
				if l < c.Depths[i] {
					c.Labels = append(c.Labels, d.Levels[l])
					c.Slots = append(c.Slots, slot)
				}
				slot++
			}
		}
		f.cuboids[id] = c
	}
}
