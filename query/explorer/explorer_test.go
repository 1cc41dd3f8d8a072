package explorer

import (
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
)

func TestServe(t *testing.T) {
	mux := http.NewServeMux()
	Register(mux)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	for _, tc := range []struct {
		path, contentType, contains string
	}{
		{"/", "text/html; charset=utf-8", `<table id="table"`},
		{"/explorer/explorer.js", "text/javascript; charset=utf-8", "api/v1/cube/"},
		{"/explorer/explorer.css", "text/css; charset=utf-8", "tabular-nums"},
	} {
		t.Run(tc.path, func(t *testing.T) {
			resp, err := http.Get(srv.URL + tc.path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("HTTP %d", resp.StatusCode)
			}
			if got := resp.Header.Get("Content-Type"); got != tc.contentType {
				t.Errorf("Content-Type %q, want %q", got, tc.contentType)
			}
			if got := resp.Header.Get("X-Content-Type-Options"); got != "nosniff" {
				t.Errorf("X-Content-Type-Options %q, want nosniff", got)
			}
			if !strings.Contains(string(body), tc.contains) {
				t.Errorf("body lacks %q", tc.contains)
			}
		})
	}

	for _, path := range []string{"/nope", "/index.html", "/explorer/", "/explorer/nope.js", "/explorer/index.html", "/explorer/../assets/index.html"} {
		t.Run("404 "+path, func(t *testing.T) {
			resp, err := http.Get(srv.URL + path)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusNotFound {
				t.Errorf("HTTP %d, want 404", resp.StatusCode)
			}
		})
	}

	req, err := http.NewRequest(http.MethodPost, srv.URL+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /: HTTP %d, want 405", resp.StatusCode)
	}
}

// TestNoExternalURL keeps the page self-contained: no asset may name
// another origin (the Content-Security-Policy would block it anyway).
func TestNoExternalURL(t *testing.T) {
	url := regexp.MustCompile(`(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}`)
	all := []asset{page}
	for _, a := range files {
		all = append(all, a)
	}
	for _, a := range all {
		b, err := assets.ReadFile(a.file)
		if err != nil {
			t.Fatal(err)
		}
		for _, u := range url.FindAllString(string(b), -1) {
			// The SVG namespace is a name, not a place the page loads from.
			if u != "http://www.w3.org" {
				t.Errorf("%s names another origin: %s", a.file, u)
			}
		}
	}
}
