package node

import (
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/dimsum/dimsum/internal/disk"
)

// health says whether the node can take work: its store may have failed
// for good (Pebble met an error it cannot go on from), so may the
// aggregator's write-ahead log, and its data directory may be nearly full.
type health struct {
	// store is the error the store failed with; nil while it works.
	store atomic.Pointer[error]
	// log is the aggregator's LogErr; nil without the role.
	log func() error
	// floor refuses flushes while the store's filesystem is nearly full;
	// nil without the combiner role.
	floor *disk.Floor
}

// storeFailed records that the store cannot go on. From then on the node
// refuses pushes and flushes and reports itself unhealthy, saying why,
// until it is restarted.
func (h *health) storeFailed(err error) { h.store.CompareAndSwap(nil, &err) }

// failed is the error the store failed with, nil while it works.
func (h *health) failed() error {
	if err := h.store.Load(); err != nil {
		return fmt.Errorf("node: the store cannot go on and needs a restart: %w", *err)
	}
	return nil
}

// ready is the aggregator's Ready: batches are refused once the store has
// failed.
func (h *health) ready() error { return h.failed() }

// storeReady is the combiner's Ready: flushes are refused once the store
// has failed, and while its filesystem is below the free-space floor.
func (h *health) storeReady() error {
	if err := h.failed(); err != nil {
		return err
	}
	return h.floor.Check()
}

// serveHealth answers 200 while the node can take work, and 503 with the
// reason once its store or its write-ahead log has failed.
func (n *Node) serveHealth(w http.ResponseWriter, _ *http.Request) {
	err := n.health.failed()
	if err == nil && n.health.log != nil {
		err = n.health.log()
	}
	if err != nil {
		http.Error(w, "dimsum is unhealthy: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "dimsum is healthy.")
}

// Reload reads again the credentials file, the certificates and the gossip
// keys. What fails to load keeps what was in force, and the error says
// why.
func (n *Node) Reload() error { return n.trust.reload(true) }

// serveReload is POST /-/reload: Reload, answered 200 or 500 with the
// error.
func (n *Node) serveReload(w http.ResponseWriter, _ *http.Request) {
	if err := n.Reload(); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	fmt.Fprintln(w, "reloaded.")
}

// reloadLoop reads again, every interval, the files that changed.
func (n *Node) reloadLoop(interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-tick.C:
			n.trust.reload(false)
		}
	}
}
