package tsdb

import (
	"math/rand/v2"

	"github.com/dimsum/dimsum/internal/mix"
)

// Numbered cells: an aggregator numbers the cells it flushes, and a number
// names the same cell in every flush of one source and numbering
// (BatchID.Numbering, DictDelta.Number). ApplyDict remembers, per source,
// the cell each number named, and finds a numbered cell by its number
// rather than in its cuboid's cell index: on the sparse backfill of
// docs/benchmarks.md that lookup, a cache miss a cell, took a tenth of the
// node's CPU. A remembered cell is taken only if the hash of the values the
// delta names is the one remembered with it, so a sender that numbers its
// cells wrongly costs lookups, not wrong cells.

// numberedSlots bounds the slots of every source's numbers together, 16
// bytes each: 32 MiB. A number that would take them past it is not
// remembered.
const numberedSlots = 1 << 21

// numberedSources bounds the sources remembered: aggregator incarnations,
// of which a cluster has a few live ones. A new one past it makes the store
// forget every other.
const numberedSources = 64

// numbering is what the store remembers of one source's numbers.
type numbering struct {
	id    uint64 // BatchID.Numbering
	slots []numberedSlot
}

// numberedSlot is a number's cell: its ID plus one (0: none) and the hash
// of its family, cuboid and value numbers.
type numberedSlot struct {
	check uint64
	id    uint32
}

// numberedCells is ApplyDict's memory of numbered cells; apply-owned.
type numberedCells struct {
	seed    uint64 // random, drawn when the memory is first made
	sources map[string]*numbering
	slots   int // the slots of every source
}

// of returns the numbering of the batch id, nil for a batch without one.
func (n *numberedCells) of(id BatchID) *numbering {
	if id.Numbering == 0 || id.Source == "" {
		return nil
	}
	s := n.sources[id.Source]
	if s != nil && s.id == id.Numbering {
		return s
	}
	if s != nil {
		n.slots -= len(s.slots)
	} else if n.sources == nil || len(n.sources) >= numberedSources {
		n.forget()
	}
	s = &numbering{id: id.Numbering}
	n.sources[id.Source] = s
	return s
}

// forget forgets every source's numbers: cells were removed, whose IDs may
// name other cells later, or the slots are over their bound.
func (n *numberedCells) forget() {
	if n.sources == nil {
		n.seed = rand.Uint64()
	}
	n.sources = map[string]*numbering{}
	n.slots = 0
}

// check hashes a cell's family, cuboid and value numbers with the seed.
func (n *numberedCells) check(cd *cellDict, key *cellKey) uint64 {
	return mix.Words(n.seed^uint64(cd.fam)^uint64(cd.cuboid)<<16, key[:])
}

// get returns the cell number names in s, if s remembers it with check.
func (s *numbering) get(number uint32, check uint64) (uint32, bool) {
	if int(number) < len(s.slots) {
		if sl := s.slots[number]; sl.id != 0 && sl.check == check {
			return sl.id - 1, true
		}
	}
	return 0, false
}

// put remembers that number names cell id in s, within the bound.
func (n *numberedCells) put(s *numbering, number uint32, check uint64, id uint32) {
	if int(number) >= len(s.slots) {
		grown := max(2*len(s.slots), int(number)+1, 1024)
		if number >= numberedSlots || n.slots+grown-len(s.slots) > numberedSlots {
			return
		}
		n.slots += grown - len(s.slots)
		s.slots = append(s.slots, make([]numberedSlot, grown-len(s.slots))...)
	}
	s.slots[number] = numberedSlot{check: check, id: id + 1}
}
