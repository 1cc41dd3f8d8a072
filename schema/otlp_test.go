package schema

import "testing"

// TestOTLPMapping checks that a family's renames go over the schema-wide
// ones, and that a listed metric finds its family.
func TestOTLPMapping(t *testing.T) {
	s, err := Parse([]byte(`
otlp: {attributes: {host.name: host, deployment.environment: env}}
families:
  - {name: requests, dimensions: [host, route], otlp: {metrics: [http.server.requests], attributes: {http.route: route, host.id: host}}}
  - {name: jobs, dimensions: [host, env]}
`))
	if err != nil {
		t.Fatal(err)
	}
	req, jobs := s.Family("requests"), s.Family("jobs")
	for _, tc := range []struct {
		f          *Family
		attr, want string
	}{
		{req, "host.name", "host"}, {req, "host.id", "host"}, {req, "http.route", "route"}, {req, "deployment.environment", "env"},
		{jobs, "host.name", "host"}, {jobs, "http.route", ""},
	} {
		if got := tc.f.OTLP.Attributes[tc.attr]; got != tc.want {
			t.Errorf("family %s: attribute %s feeds %q, want %q", tc.f.Name, tc.attr, got, tc.want)
		}
	}
	if s.OTLPFamily("http.server.requests") != req || s.OTLPFamily("requests") != nil {
		t.Errorf("OTLPFamily: %v, %v", s.OTLPFamily("http.server.requests"), s.OTLPFamily("requests"))
	}
	if d := Default().Family("requests").OTLP.Attributes; d["host.name"] != "host" || d["http.route"] != "transaction" || d["http.response.status_code"] != "status" {
		t.Errorf("the default family's renames: %v", d)
	}
}
