package schema

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// OTLPFile is the schema-wide part of how OpenTelemetry (OTLP) metrics map
// onto families; see docs/otlp.md.
type OTLPFile struct {
	// Attributes renames OTLP attributes (of a resource, a scope or a data
	// point) to labels, for every family: {host.name: host}. An attribute
	// it does not name becomes the label Prometheus' OTLP translator would
	// make of it (dots and other characters a label name cannot hold
	// become underscores). The default is none.
	Attributes map[string]string `yaml:"attributes"`
}

// FamilyOTLPFile is how OTLP metrics feed one family.
type FamilyOTLPFile struct {
	// Metrics are OTLP metric names, as the producer writes them, that
	// feed this family besides the one whose translated name is the
	// family's (see docs/otlp.md). No two families may list the same name.
	// The default is none.
	Metrics []string `yaml:"metrics"`
	// Attributes renames OTLP attributes to this family's labels, over the
	// schema-wide renames. Each must name one of the family's labels. The
	// default is none.
	Attributes map[string]string `yaml:"attributes"`
}

// OTLP is a family's built OTLP mapping.
type OTLP struct {
	// Metrics are the OTLP metric names listed for the family.
	Metrics []string
	// Attributes maps an attribute name to the label it feeds: the
	// schema-wide renames, then the family's own over them. It is never
	// nil and must not be changed.
	Attributes map[string]string
}

// OTLPFamily returns the family that lists metric, an OTLP metric name as
// its producer wrote it, in its otlp.metrics, or nil.
func (s *Schema) OTLPFamily(metric string) *Family { return s.otlpMetrics[metric] }

// checkRenames refuses an attribute rename to what cannot be a label.
func checkRenames(where string, renames map[string]string) error {
	for _, attr := range slices.Sorted(maps.Keys(renames)) {
		l := renames[attr]
		if attr == "" {
			return fmt.Errorf("%w: %s: an otlp attribute rename has an empty attribute name", ErrInvalid, where)
		}
		if !labelNameRE.MatchString(l) || strings.HasPrefix(l, "__") {
			return fmt.Errorf("%w: %s: otlp attribute %q is renamed to %q, which is not a valid label name", ErrInvalid, where, attr, l)
		}
	}
	return nil
}

// buildOTLP builds fam's mapping over the schema-wide renames, which
// checkRenames has checked.
func (ff FamilyFile) buildOTLP(fam *Family, schemaWide map[string]string) error {
	where := fmt.Sprintf("family %q", fam.Name)
	if err := checkRenames(where, ff.OTLP.Attributes); err != nil {
		return err
	}
	attrs := maps.Clone(schemaWide)
	if attrs == nil {
		attrs = map[string]string{}
	}
	for _, attr := range slices.Sorted(maps.Keys(ff.OTLP.Attributes)) {
		l := ff.OTLP.Attributes[attr]
		if _, ok := fam.LabelIndex(l); !ok {
			return fmt.Errorf("%w: %s: otlp attribute %q is renamed to %q, which is not one of its labels %v", ErrInvalid, where, attr, l, fam.Labels)
		}
		attrs[attr] = l
	}
	for _, m := range ff.OTLP.Metrics {
		if m == "" {
			return fmt.Errorf("%w: %s: an empty otlp metric name", ErrInvalid, where)
		}
	}
	fam.OTLP = OTLP{Metrics: slices.Clone(ff.OTLP.Metrics), Attributes: attrs}
	return nil
}
