// Package explorer is the cube explorer: a web page for analysts over the
// cube slice API (/api/v1/cube/schema, slice, drilldown, rollup; see
// docs/slices.md). It picks a family, filters, group-by labels, a time
// range, a step and measures, shows the answer as a sortable table and a
// chart of the series per group, drills down by clicking a row and rolls
// up through a breadcrumb. The page's URL holds its whole state, so a view
// can be reloaded, shared, and walked with back and forward.
//
// The page is one HTML, one JavaScript and one CSS file, embedded in the
// binary: no framework, no build step, nothing fetched from elsewhere.
//
//	mux := http.NewServeMux()
//	explorer.Register(mux) // serves / and /explorer/...
package explorer
