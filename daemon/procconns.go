package daemon

import (
	"context"
	"net/netip"
	"os"
	"slices"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/repair"
)

// procConn is a connection of a process that serves it without mtcp's
// app library: process mode moves it with its process.
type procConn struct {
	conn  repair.Conn
	local netip.AddrPort
	flow  migrate.Flow // Service is the address its client dialled
	owner repair.Owner // the process holding it (the eldest, if several)
}

// processConns lists the connections on this host's own addresses held by
// processes other than mtcpd and the registered applications: those of
// servers process mode can move (and, until they register again after a
// restart of mtcpd, those of applications). list is a socket listing
// without owners; served are the local tuples the applications report,
// left out. The owners are looked up only when list has such
// connections, since that scans every process's descriptors.
func (d *Daemon) processConns(ctx context.Context, list []repair.Conn, served map[app.Tuple]bool) []procConn {
	candidate := func(c repair.Conn) bool {
		tu := unmapTuple(app.Tuple{Local: c.Local, Remote: c.Remote})
		return c.Inode != 0 && !served[tu] && d.isOwnAddr(tu.Local.Addr()) &&
			!tu.Remote.Addr().IsLoopback() && !d.isOwnAddr(tu.Remote.Addr())
	}
	if !slices.ContainsFunc(list, candidate) {
		return nil
	}
	owned, err := repair.List(ctx, repair.ListOptions{Owners: true})
	if err != nil {
		d.log.Warn("listing the processes' connections", "err", err)
		return nil
	}
	var apps map[int]bool
	if d.apps != nil {
		apps = d.apps.PIDs()
	}
	self := os.Getpid()
	var out []procConn
	for _, c := range owned {
		if !candidate(c) {
			continue
		}
		if slices.ContainsFunc(c.Owners, func(o repair.Owner) bool { return o.PID == self || apps[o.PID] }) {
			continue
		}
		owner, ok := eldestOwner(c.Owners)
		if !ok {
			continue
		}
		tu := unmapTuple(app.Tuple{Local: c.Local, Remote: c.Remote})
		out = append(out, procConn{conn: c, local: tu.Local, flow: d.dialled(tu), owner: owner})
	}
	return out
}

// processConnOf finds the connection of a process (see processConns)
// whose client is client.
func (d *Daemon) processConnOf(ctx context.Context, client netip.AddrPort) (procConn, bool) {
	list, err := repair.List(ctx, repair.ListOptions{})
	if err != nil {
		return procConn{}, false
	}
	var mine []repair.Conn
	for _, c := range list {
		if unmapAP(c.Remote) == client {
			mine = append(mine, c)
		}
	}
	for _, pc := range d.processConns(ctx, mine, nil) {
		if pc.flow.Client == client {
			return pc, true
		}
	}
	return procConn{}, false
}

// dialled is the flow of the local socket tu: its client and the address
// the client dialled, which differs from tu.Local for a connection that
// migrated here.
func (d *Daemon) dialled(tu app.Tuple) migrate.Flow {
	d.proc.mu.Lock()
	f, ok := d.proc.flows[tu]
	d.proc.mu.Unlock()
	if ok {
		return f
	}
	d.mu.Lock()
	f, ok = d.moved[tu]
	d.mu.Unlock()
	if ok {
		return f
	}
	return migrate.Flow{Client: tu.Remote, Service: tu.Local}
}

// eldestOwner picks, of the processes holding a socket (owners, sorted by
// PID, as repair.List gives them), the one whose parent does not hold it
// too (the master of workers that share it), the lowest PID of those. It
// reports false when nobody holds it.
func eldestOwner(owners []repair.Owner) (repair.Owner, bool) {
	holds := map[int]bool{}
	for _, o := range owners {
		holds[o.PID] = true
	}
	for _, o := range owners {
		if !holds[ppidOf(o.PID)] {
			return o, true
		}
	}
	if len(owners) > 0 {
		return owners[0], true
	}
	return repair.Owner{}, false
}
