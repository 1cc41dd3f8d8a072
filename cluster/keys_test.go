package cluster

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
	"time"
)

func newKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

// TestEncryptedGossip starts members whose gossip is encrypted: one with
// the cluster's key joins, one with another key and one with none do not,
// and the keys rotate at run time so that a member holding only the new key
// joins in the end.
func TestEncryptedGossip(t *testing.T) {
	log := newTestLogger(t)
	k1, k2 := newKey(t), newKey(t)
	start := func(name string, keys [][]byte, join ...string) *Cluster {
		return startConfig(t, log, Config{Name: name, BindAddr: "127.0.0.1:0", Join: join, Timing: FastTiming(), SecretKeys: keys})
	}
	a := start("a", [][]byte{k1})
	b := start("b", [][]byte{k1}, a.Local().Addr)
	waitFor(t, "b to see a", func() bool { return alive(b) == 2 }, a, b)

	for _, keys := range [][][]byte{{k2}, nil} {
		_, err := Start(Config{Name: "intruder", BindAddr: "127.0.0.1:0", Join: []string{a.Local().Addr}, Timing: FastTiming(),
			JoinTimeout: time.Second, SecretKeys: keys, Logger: log})
		if !errors.Is(err, ErrJoin) {
			t.Errorf("a member with keys %d joined an encrypted cluster: %v", len(keys), err)
		}
	}
	if n := len(a.Members()); n != 2 {
		t.Errorf("a sees %d members after the intruders, want 2: %s", n, describe(a.Members()))
	}

	// Rotation: the new key is added everywhere, then made primary, then
	// the old one is dropped.
	for _, keys := range [][][]byte{{k1, k2}, {k2, k1}, {k2}} {
		for _, c := range []*Cluster{a, b} {
			if err := c.SetKeys(keys); err != nil {
				t.Fatal(err)
			}
		}
	}
	c := start("c", [][]byte{k2}, b.Local().Addr)
	waitFor(t, "all three to see each other", func() bool {
		return alive(a) == 3 && alive(c) == 3
	}, a, b, c)

	if err := startConfigErr(Config{Name: "clear", BindAddr: "127.0.0.1:0", SecretKeys: [][]byte{[]byte("short")}}); !errors.Is(err, ErrConfig) {
		t.Errorf("a 5-byte key: %v, want ErrConfig", err)
	}
	clear := start("clear", nil)
	if err := clear.SetKeys([][]byte{k1}); !errors.Is(err, ErrConfig) {
		t.Errorf("SetKeys on a cluster in clear: %v, want ErrConfig", err)
	}
}

// alive counts the members c sees alive, itself included.
func alive(c *Cluster) int {
	n := 0
	for _, m := range c.Members() {
		if m.State == StateAlive {
			n++
		}
	}
	return n
}

func startConfigErr(cfg Config) error {
	c, err := Start(cfg)
	if err == nil {
		c.Shutdown()
	}
	return err
}

func TestParseKeys(t *testing.T) {
	k16, k32 := bytes.Repeat([]byte{1}, 16), bytes.Repeat([]byte{2}, 32)
	enc := base64.StdEncoding.EncodeToString
	f := func(in string, want [][]byte, msg string) {
		t.Helper()
		got, err := ParseKeys([]byte(in))
		if msg != "" {
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), msg) {
				t.Errorf("ParseKeys(%q): %v, want an error naming %q", in, err, msg)
			}
			return
		}
		if err != nil || len(got) != len(want) {
			t.Fatalf("ParseKeys(%q) = %d keys, %v; want %d", in, len(got), err, len(want))
		}
		for i := range got {
			if !bytes.Equal(got[i], want[i]) {
				t.Errorf("ParseKeys(%q): key %d differs", in, i)
			}
		}
	}
	f(enc(k16)+"\n", [][]byte{k16}, "")
	f("# primary first\n\n  "+enc(k32)+"  \n"+enc(k16), [][]byte{k32, k16}, "")
	f("", nil, "holds no key")
	f("# nothing\n", nil, "holds no key")
	f("not base64!\n", nil, "line 1 is not base64")
	f(enc(k16)+"\n"+enc([]byte("short")), nil, "line 2: 5 bytes, want 16, 24 or 32")
	f(enc(k16)+"\n"+enc(k16), nil, "line 2 is listed twice")
}

// FuzzParseKeys checks that no file panics the parser and that every key it
// returns has a length AES takes.
func FuzzParseKeys(f *testing.F) {
	f.Add([]byte("AQEBAQEBAQEBAQEBAQEBAQ==\n"))
	f.Add([]byte("# c\n\nAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\r\nAQEBAQEBAQEBAQEBAQEBAQ==\n"))
	f.Add([]byte("====\n\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		keys, err := ParseKeys(data)
		if err == nil && len(keys) == 0 {
			t.Fatal("no error and no key")
		}
		for _, k := range keys {
			if checkKey(k) != nil {
				t.Fatalf("a key of %d bytes", len(k))
			}
		}
	})
}
