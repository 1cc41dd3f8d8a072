package schema

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestDefault(t *testing.T) {
	s := Default()
	f := s.Family("requests")
	if f == nil {
		t.Fatal("no requests family")
	}
	if got := fmt.Sprint(f.Labels); got != "[datacenter cluster host transaction status]" {
		t.Errorf("labels %s", got)
	}
	cs := f.Cuboids()
	if len(cs) != 16 {
		t.Fatalf("%d cuboids, want 4 x 2 x 2 = 16", len(cs))
	}
	if fmt.Sprint(cs[0].Labels) != fmt.Sprint(f.Labels) || cs[0].ID != f.Finest().ID {
		t.Errorf("first cuboid %v is not the finest", cs[0])
	}
	apex, _ := f.Cuboid(0)
	if len(apex.Labels) != 0 {
		t.Errorf("cuboid 0 keeps %v, want nothing", apex.Labels)
	}
	// Every prefix of the hierarchy appears with every flat combination,
	// and each cuboid's ID decodes back to its depths.
	seen := map[string]bool{}
	for _, c := range cs {
		seen[strings.Join(c.Labels, ",")] = true
		id := 0
		for i, d := range f.Dimensions {
			id = id*(len(d.Levels)+1) + c.Depths[i]
		}
		if CuboidID(id) != c.ID {
			t.Errorf("cuboid %v: depths give ID %d", c, id)
		}
	}
	for _, want := range []string{"", "datacenter", "datacenter,cluster,status", "transaction", "datacenter,cluster,host,transaction"} {
		if !seen[want] {
			t.Errorf("no cuboid keeps exactly [%s]", want)
		}
	}
	if s.Window() != 10*time.Second || len(s.Resolutions) != 3 || s.Resolutions[2].Retention != 400*24*time.Hour {
		t.Errorf("resolutions %v", s.Resolutions)
	}
}

func TestStepStartAndRow(t *testing.T) {
	r := Resolution{Step: 10 * time.Second} // rows of 3,600,000 ms
	for _, tc := range [][3]int64{
		{0, 0, 0}, {9_999, 0, 0}, {10_000, 10_000, 0}, {3_599_999, 3_590_000, 0}, {3_600_000, 3_600_000, 1},
		{-1, -10_000, -1}, {-10_000, -10_000, -1}, {-10_001, -20_000, -1}, {-3_600_000, -3_600_000, -1}, {-3_600_001, -3_610_000, -2},
	} {
		if got := r.StepStart(tc[0]); got != tc[1] {
			t.Errorf("StepStart(%d) = %d, want %d", tc[0], got, tc[1])
		}
		if got := r.Row(tc[0]); got != tc[2] {
			t.Errorf("Row(%d) = %d, want %d", tc[0], got, tc[2])
		}
	}
}

// TestResolutionString checks that a resolution reads as it is configured,
// retentions in days rather than weeks.
func TestResolutionString(t *testing.T) {
	s, err := Parse([]byte("resolutions: [10s:8d, 1m:35d, 1h:400d, 1d:10000d]\nfamilies: [{name: r, dimensions: [a]}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range s.Resolutions {
		got = append(got, r.String())
	}
	if want := "[10s:8d 1m:35d 1h:400d 1d:10000d]"; fmt.Sprint(got) != want {
		t.Errorf("resolutions %v, want %s", got, want)
	}
	for d, want := range map[time.Duration]string{90 * time.Second: "1m30s", 36 * time.Hour: "1d12h", 7*24*time.Hour + time.Minute: "7d1m", 0: "0s"} {
		if got := FormatDuration(d); got != want {
			t.Errorf("FormatDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestParseErrors(t *testing.T) {
	fam := "families: [{name: r, dimensions: [a/b, c]}]\n"
	for _, tc := range []struct{ name, yaml, want string }{
		{"no families", "resolutions: [10s:1d]", "no families"},
		{"unknown field", fam + "foo: 1", "cannot decode"},
		{"bad resolution", fam + "resolutions: [10s]", "want step:retention"},
		{"bad step", fam + "resolutions: [xs:1d]", "step"},
		{"step beyond a row's span", fam + "resolutions: [10s:8d, 300d:1y]", "at most"},
		{"sub-second step", fam + "resolutions: [500ms:1d]", "whole number of seconds"},
		{"short retention", fam + "resolutions: [10s:1m]", "at least one row"},
		{"not a multiple", fam + "resolutions: [10s:8d, 15s:8d]", "multiple"},
		{"same step", fam + "resolutions: [10s:8d, 10s:9d]", "must grow"},
		{"bad family name", "families: [{name: 1r, dimensions: [a]}]", "not a valid metric name"},
		{"bad kind", "families: [{name: r, kind: gauge, dimensions: [a]}]", "unknown kind"},
		{"no dimensions", "families: [{name: r}]", "no dimensions"},
		{"bad label", "families: [{name: r, dimensions: [a/b-c]}]", "not a valid label name"},
		{"reserved label", "families: [{name: r, dimensions: [__a]}]", "not a valid label name"},
		{"empty level", "families: [{name: r, dimensions: [a//b]}]", "not a valid label name"},
		{"duplicate label", "families: [{name: r, dimensions: [a/b, b]}]", "appears twice"},
		{"duplicate family", "families: [{name: r, dimensions: [a]}, {name: r, dimensions: [b]}]", "declared twice"},
		{"too many labels", "families: [{name: r, dimensions: [a/b/c/d/e, f, g, h, i]}]", "at most 8"},
		{"otlp rename to a bad label", fam + "otlp: {attributes: {host.name: host.x}}", `renamed to "host.x", which is not a valid label name`},
		{"otlp rename of nothing", fam + "otlp: {attributes: {'': a}}", "empty attribute name"},
		{"otlp rename to another family's label", "families: [{name: r, dimensions: [a], otlp: {attributes: {x.y: b}}}]", `renamed to "b", which is not one of its labels [a]`},
		{"otlp metric twice", "families: [{name: r, dimensions: [a], otlp: {metrics: [m]}}, {name: s, dimensions: [a], otlp: {metrics: [m]}}]", `OTLP metric "m" feeds both family "r" and family "s"`},
		{"otlp empty metric", "families: [{name: r, dimensions: [a], otlp: {metrics: ['']}}]", "empty otlp metric name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("families: [{name: r, dimensions: [a/b, c]}]"))
	f.Add([]byte("resolutions: [10s:8d, 1m:35d]\nfamilies: [{name: r, kind: counter, dimensions: [a]}]"))
	f.Add([]byte("families: [{name: r, dimensions: [a/b/c/d/e/f/g/h]}]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Parse(data)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v is not marked ErrInvalid", err)
			}
			return
		}
		for _, fam := range s.Families {
			if len(fam.Cuboids()) == 0 || len(fam.Finest().Labels) != len(fam.Labels) {
				t.Fatalf("family %s has a broken lattice", fam.Name)
			}
		}
	})
}
