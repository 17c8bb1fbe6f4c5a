package daemon

import (
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/mtcp-dev/mtcp/admin"
)

// serveProcess runs a process migration for the admin API, streaming a
// progress line per finished phase and the report last.
func (d *Daemon) serveProcess(w http.ResponseWriter, r *http.Request) {
	var req admin.ProcessRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		admin.WriteError(w, http.StatusBadRequest, fmt.Errorf("bad request: %w", err))
		return
	}
	if (req.PID > 0) == (req.Port > 0) {
		admin.WriteError(w, http.StatusBadRequest, fmt.Errorf("give exactly one of pid and port"))
		return
	}
	if req.To == "" {
		admin.WriteError(w, http.StatusBadRequest, fmt.Errorf("no target peer given"))
		return
	}
	send := streamLines(w)
	rep := d.MigrateProcess(r.Context(), &req, func(p admin.ProcessPhase) {
		send(admin.ProcessProgress{Phase: &p})
	})
	send(admin.ProcessProgress{Final: true, Report: rep})
}
