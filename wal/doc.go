// Package wal is an append-only log of typed records in numbered segment
// files, used by the aggregator to acknowledge a batch only once it is on
// disk. The byte layout is in docs/format/wal.md.
//
// A record is appended to memory under the log's lock and written and
// fsynced by Sync, which many goroutines may call at once: the first writes
// and fsyncs everything appended so far, and the others wait for it (group
// commit), so concurrent appenders share one fsync.
//
//	l, err := wal.Open(wal.Options{Dir: dir}, func(pos wal.Pos, typ wal.Type, payload []byte) error {
//		... // every record of earlier runs, in order
//		return nil
//	})
//	pos, err := l.Append(typBatch, payload)
//	err = l.Sync(pos) // pos is on disk once Sync returns nil
//	err = l.DeleteBefore(pos.Segment) // drops whole segments below pos
//
// Open truncates a torn tail (a short or corrupt last record of the last
// segment, what a crash in the middle of a write leaves) and reports any other
// bad record as corruption, naming the file and offset. Each Open starts a new
// segment, so segments written by an earlier run are never appended to.
package wal
