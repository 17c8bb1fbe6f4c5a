package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"
)

// ProcessRequest asks to move a whole process (CRIU) to a peer. Exactly
// one of PID and Port selects it.
type ProcessRequest struct {
	// PID is the process to move, with its threads and children.
	PID int `json:"pid,omitempty"`
	// Port selects the process that owns the TCP listener on this port.
	Port uint16 `json:"port,omitempty"`
	// To is the peer's name.
	To string `json:"to"`
}

// The phases of a process migration, in order, as ProcessReport.Phases
// and the progress lines name them.
const (
	PhaseHold     = "hold"     // the connections' packets are queued at their steering points
	PhaseFreeze   = "freeze"   // CRIU freezes the process (part of the dump call)
	PhaseDump     = "dump"     // CRIU dumps it, streaming its memory to the target
	PhaseTransfer = "transfer" // the other images go to the target, which writes the last pages
	PhaseRestore  = "restore"  // CRIU restores it on the target
	PhaseSwitch   = "switch"   // the connections' packets go to the target
	PhaseCommit   = "commit"   // the source process is discarded
	// PhasePages, in a lazy (post-copy) migration, runs from the switch
	// until the last memory page reached the target; the process runs
	// there meanwhile, and the source keeps its frozen copy (the
	// commit follows it). A lazy dump has no separate freeze phase: its
	// dump phase includes the freezing.
	PhasePages = "pages"
	// PhaseRetry ends an attempt that was undone because the process
	// accepted a connection after its sockets were listed, before its
	// dump (nothing would have held or switched that connection): the
	// process went on at the source, with every connection, and the
	// migration starts again. Took is how long the attempt took. The
	// last attempt goes through whatever the process accepted (see
	// ProcessReport.Unmoved), so that a server that takes new
	// connections all the time can still move.
	PhaseRetry = "retry"
)

// ProcessPhase is one finished phase.
type ProcessPhase struct {
	Name string        `json:"name"`
	Took time.Duration `json:"took_ns"`
}

// ProcessReport says what a process migration did.
type ProcessReport struct {
	To string `json:"to"`
	// PID is the process on this server; NewPID the restored one on the
	// target (0 if it was not restored).
	PID    int `json:"pid"`
	NewPID int `json:"new_pid,omitempty"`
	// Command is the process's name.
	Command string `json:"command"`
	// Conns is how many TCP connections moved with it.
	Conns int `json:"conns"`
	// Unmoved counts the connections the process accepted during the
	// last attempt's dump, after every attempt had found such
	// connections (see PhaseRetry): they did not move, and their clients
	// are reset when the source's copy goes.
	Unmoved int `json:"unmoved,omitempty"`
	// Lazy is set for a post-copy migration: the process was restored
	// before its memory moved (see PhasePages).
	Lazy bool `json:"lazy,omitempty"`
	// Pages is how many memory pages (4 KiB) CRIU dumped eagerly;
	// ImageBytes the size of the images sent before the restore.
	Pages      uint64 `json:"pages"`
	ImageBytes int64  `json:"image_bytes"`
	// Phases are the phases' times in order (see the Phase constants).
	Phases []ProcessPhase `json:"phases"`
	// Pause is the time the connections were held: from the hold to the
	// end of the switch, what a client can notice at most.
	Pause time.Duration `json:"pause_ns"`
	// Aborted is set when the process stayed here (Error says why).
	Aborted bool `json:"aborted"`
	// Error says why the process stayed here or, not aborted, that the
	// target did not answer the commit: the source then asks again in
	// the background, its copy stopped, until the target answers (the
	// process runs there) or has dropped its own copy (it resumes here).
	Error string `json:"error,omitempty"`
}

// Phase returns the time of the named phase (0 if it did not run).
func (r *ProcessReport) Phase(name string) time.Duration {
	for _, p := range r.Phases {
		if p.Name == name {
			return p.Took
		}
	}
	return 0
}

// ProcessProgress is one line of a process migration's progress stream:
// a finished phase, then a last line with the report.
type ProcessProgress struct {
	Phase  *ProcessPhase  `json:"phase,omitempty"`
	Final  bool           `json:"final,omitempty"`
	Report *ProcessReport `json:"report,omitempty"`
}

// MigrateProcess moves a process to a peer, calling progress (if not nil)
// as each phase finishes, and returns the report. A migration that was
// aborted returns its report and an error saying why.
func (c *Client) MigrateProcess(ctx context.Context, r *ProcessRequest, progress func(ProcessPhase)) (*ProcessReport, error) {
	resp, err := c.send(ctx, http.MethodPost, "/v1/process", r)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var p ProcessProgress
		if err := json.Unmarshal(sc.Bytes(), &p); err != nil {
			return nil, fmt.Errorf("admin: bad progress line: %w", err)
		}
		if p.Phase != nil && progress != nil {
			progress(*p.Phase)
		}
		if p.Final {
			if p.Report == nil {
				return nil, errors.New("admin: final progress line without a report")
			}
			if p.Report.Error != "" {
				return p.Report, errors.New(p.Report.Error)
			}
			return p.Report, nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return nil, errors.New("admin: the daemon ended the progress stream without a report")
}
