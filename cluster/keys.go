package cluster

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"slices"
	"strings"

	"github.com/hashicorp/memberlist"
)

// ParseKeys reads a gossip key file: one key a line, in standard base64, of
// 16, 24 or 32 bytes (AES-128, -192 or -256). The first key encrypts what
// this node sends; every key listed decrypts what it receives, so a key is
// rotated by listing the new one second on every node, then first, then
// dropping the old one. Blank lines and lines starting with # are skipped.
func ParseKeys(data []byte) ([][]byte, error) {
	var keys [][]byte
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			return nil, fmt.Errorf("%w: gossip key on line %d is not base64: %v", ErrConfig, i+1, err)
		}
		if err := checkKey(key); err != nil {
			return nil, fmt.Errorf("%w: gossip key on line %d: %v", ErrConfig, i+1, err)
		}
		if slices.ContainsFunc(keys, func(k []byte) bool { return bytes.Equal(k, key) }) {
			return nil, fmt.Errorf("%w: gossip key on line %d is listed twice", ErrConfig, i+1)
		}
		keys = append(keys, key)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%w: the gossip key file holds no key", ErrConfig)
	}
	return keys, nil
}

func checkKey(key []byte) error {
	switch len(key) {
	case 16, 24, 32:
		return nil
	}
	return fmt.Errorf("%d bytes, want 16, 24 or 32", len(key))
}

// keyring builds memberlist's keyring of keys, the first one primary; nil
// without keys.
func keyring(keys [][]byte) (*memberlist.Keyring, error) {
	if len(keys) == 0 {
		return nil, nil
	}
	for _, k := range keys {
		if err := checkKey(k); err != nil {
			return nil, fmt.Errorf("%w: SecretKeys: %v", ErrConfig, err)
		}
	}
	kr, err := memberlist.NewKeyring(keys, keys[0])
	if err != nil {
		return nil, fmt.Errorf("%w: SecretKeys: %v", ErrConfig, err)
	}
	return kr, nil
}

// SetKeys replaces the gossip keys of a cluster started with SecretKeys,
// the first one primary, without a restart: new keys are added, the first
// becomes the one that encrypts, and keys no longer listed are dropped.
func (c *Cluster) SetKeys(keys [][]byte) error {
	if c.keyring == nil {
		return fmt.Errorf("%w: gossip is not encrypted; keys take effect only at start", ErrConfig)
	}
	if len(keys) == 0 {
		return fmt.Errorf("%w: no gossip key", ErrConfig)
	}
	for _, k := range keys {
		if err := checkKey(k); err != nil {
			return fmt.Errorf("%w: gossip key: %v", ErrConfig, err)
		}
		if err := c.keyring.AddKey(k); err != nil {
			return fmt.Errorf("cluster: cannot add a gossip key: %w", err)
		}
	}
	if err := c.keyring.UseKey(keys[0]); err != nil {
		return fmt.Errorf("cluster: cannot make a gossip key primary: %w", err)
	}
	for _, k := range c.keyring.GetKeys() {
		if !slices.ContainsFunc(keys, func(n []byte) bool { return bytes.Equal(n, k) }) {
			if err := c.keyring.RemoveKey(k); err != nil {
				return fmt.Errorf("cluster: cannot drop a gossip key: %w", err)
			}
		}
	}
	return nil
}
