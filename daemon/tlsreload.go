package daemon

import (
	"log/slog"
	"os"
	"time"

	"github.com/mtcp-dev/mtcp/peer"
)

// tlsReload keeps the daemon's peer credentials in step with its TLS
// files: on SIGHUP, and whenever one of the files changes (a renewed
// certificate, a new pool CA put in place), it loads and checks them
// again (peer.TLSFiles.Config) and has the connections made from then on
// use them; those already open keep theirs. Files that do not load (half
// written, a key of another certificate, a certificate of another CA)
// leave the running credentials in place, with an error in the log.
type tlsReload struct {
	files peer.TLSFiles
	name  string
	creds *peer.Credentials
	log   *slog.Logger
	seen  [3]fileStamp // of the files as last loaded, or tried
}

// fileStamp is what tells that a file changed.
type fileStamp struct {
	mod  time.Time
	size int64
	err  bool
}

func newTLSReload(files peer.TLSFiles, name string, cfg *peer.Config, log *slog.Logger) *tlsReload {
	r := &tlsReload{files: files, name: name, creds: peer.NewCredentials(cfg.Certificate, cfg.Roots), log: log}
	cfg.Credentials = r.creds
	r.seen = r.stamps()
	return r
}

func (r *tlsReload) stamps() [3]fileStamp {
	var st [3]fileStamp
	for i, p := range []string{r.files.CA, r.files.Cert, r.files.Key} {
		fi, err := os.Stat(p)
		if err != nil {
			st[i].err = true
			continue
		}
		st[i] = fileStamp{mod: fi.ModTime(), size: fi.Size()}
	}
	return st
}

// reload loads the files again if force is set or they changed since
// they were last loaded (or tried), and reports whether new credentials
// are in use.
func (r *tlsReload) reload(why string, force bool) bool {
	st := r.stamps()
	if !force && st == r.seen {
		return false
	}
	r.seen = st
	cfg, err := r.files.Config(r.name)
	if err != nil {
		r.log.Error("TLS files not reloaded: the running certificate and pool CA stay in use", "why", why, "err", err)
		return false
	}
	r.creds.Set(cfg.Certificate, cfg.Roots)
	attrs := []any{"why", why, "cert", r.files.Cert}
	if leaf := cfg.Certificate.Leaf; leaf != nil {
		attrs = append(attrs, "not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	r.log.Info("TLS files reloaded: new peer connections use them", attrs...)
	return true
}
