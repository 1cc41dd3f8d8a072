package explorer

import (
	"embed"
	"net/http"
)

//go:embed assets
var assets embed.FS

// asset is one embedded file with the type it is served as.
type asset struct {
	file        string
	contentType string
}

// files maps the paths under /explorer/ to their assets. The types are set
// here rather than guessed from the extension, which depends on the host's
// MIME tables.
var files = map[string]asset{
	"explorer.js":  {"assets/explorer.js", "text/javascript; charset=utf-8"},
	"explorer.css": {"assets/explorer.css", "text/css; charset=utf-8"},
}

var page = asset{"assets/index.html", "text/html; charset=utf-8"}

// contentSecurityPolicy lets the page load only its own assets and talk
// only to the node that served it.
const contentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// Register serves the page at exactly "/" and its assets under
// "/explorer/". Every other path is left to the mux, which answers 404 for
// the ones nothing else serves.
func Register(mux *http.ServeMux) {
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) { serve(w, page) })
	mux.HandleFunc("GET /explorer/{file}", func(w http.ResponseWriter, r *http.Request) {
		a, ok := files[r.PathValue("file")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		serve(w, a)
	})
}

func serve(w http.ResponseWriter, a asset) {
	b, err := assets.ReadFile(a.file)
	if err != nil {
		// The files are embedded at build time; a missing one is a bug in
		// the table above, which the package's test catches.
		http.Error(w, "explorer: missing asset "+a.file, http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", a.contentType)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Security-Policy", contentSecurityPolicy)
	// The assets change only with the binary; revalidating each load keeps
	// a page from running an older script against a newer API.
	h.Set("Cache-Control", "no-cache")
	w.Write(b)
}
