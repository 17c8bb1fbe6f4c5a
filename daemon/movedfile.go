package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/migrate"
)

// With gateway steering the target of a migration keeps no reply
// rewrite (the gateway rewrites its replies), so nothing in its nftables
// table says which of its connections migrated in, and with which address
// the client dialled. The daemon writes that down in a file beside its
// admin socket (under /run: a reboot forgets it with the connections),
// and a restarted daemon reads it back for the connections still there.

// movedFileSuffix ends the file's name, which is the admin socket's with
// it, in the same directory (daemons sharing a directory keep theirs
// apart).
const movedFileSuffix = ".moved-in.json"

// movedEntry is one connection of the file.
type movedEntry struct {
	Tuple app.Tuple    `json:"tuple"`
	Flow  migrate.Flow `json:"flow"`
}

// movedSaveEvery bounds how often the file is written: a drain changes
// the map thousands of times.
const movedSaveEvery = 100 * time.Millisecond

// movedChanged notes that d.moved changed; the file follows shortly.
func (d *Daemon) movedChanged() {
	if d.movedFile == "" {
		return
	}
	select {
	case d.movedDirty <- struct{}{}:
	default:
	}
}

// saveMoved writes the file whenever d.moved changed, until ctx is done,
// and once more then.
func (d *Daemon) saveMoved(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			select {
			case <-d.movedDirty:
				d.writeMoved()
			default:
			}
			return
		case <-d.movedDirty:
		}
		d.writeMoved()
		select {
		case <-ctx.Done():
		case <-time.After(movedSaveEvery):
		}
	}
}

func (d *Daemon) writeMoved() {
	d.mu.Lock()
	out := make([]movedEntry, 0, len(d.moved))
	for t, f := range d.moved {
		out = append(out, movedEntry{Tuple: t, Flow: f})
	}
	d.mu.Unlock()
	b, err := json.Marshal(out)
	if err == nil {
		tmp := d.movedFile + ".tmp"
		if err = os.WriteFile(tmp, b, 0o600); err == nil {
			err = os.Rename(tmp, d.movedFile)
		}
	}
	if err != nil {
		d.log.Warn("cannot write down the connections that migrated in; a restart would forget them", "file", d.movedFile, "err", err)
	}
}

// loadMoved reads the file back, keeping the connections live holds.
func (d *Daemon) loadMoved(live map[app.Tuple]bool) (int, error) {
	b, err := os.ReadFile(d.movedFile)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	var in []movedEntry
	if err := json.Unmarshal(b, &in); err != nil {
		return 0, err
	}
	n := 0
	d.mu.Lock()
	for _, e := range in {
		if live[e.Tuple] {
			d.moved[e.Tuple] = e.Flow // adopted once reported (reap)
			n++
		}
	}
	d.mu.Unlock()
	if n < len(in) {
		d.movedChanged() // write the dead ones out
	}
	return n, nil
}

// movedPath is where a daemon with cfg keeps the file, or "" when it
// needs none (forward steering keeps reply rewrites; a gateway serves no
// connections).
func movedPath(cfg *Config) string {
	if cfg.Steering != "gateway" || cfg.Role != "server" {
		return ""
	}
	return cfg.AdminSocket + movedFileSuffix
}
