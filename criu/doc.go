// Package criu checkpoints and restores whole processes with CRIU, for
// mtcp's process mode: a stock server (redis-server, say) moves from one
// server of the pool to another with its memory, threads, files and
// established TCP connections.
//
// It speaks CRIU's RPC protocol to a `criu swrk` child, with the message
// types of github.com/checkpoint-restore/go-criu/v7/rpc; the `criu`
// command line is never parsed. It runs swrk itself, the way runc does,
// rather than through go-criu's Criu type, because a dump that streams its
// memory must hand swrk one more descriptor (the page-server socket) and
// go-criu's Criu cannot pass extra descriptors.
//
// # What moves how
//
// [Dump] checkpoints a process tree, in one of two ways.
//
// Lazy (post-copy, DumpOptions.Lazy): CRIU writes every image but the
// process's anonymous memory to DumpOptions.Dir (a tmpfs: registers,
// file table, sockets and their queues, the memory map: about a megabyte
// for a redis-server holding 50 MB) and Dump returns, the tree stopped.
// The target can restore from those at once: [StartLazyPages] starts
// mtcp's own lazy-pages daemon on the target's copy of the images, and
// [Restore] with RestoreOptions.Lazy restores the tree with its memory
// registered with userfaultfd. CRIU's restore hands the daemon each
// process's userfaultfd, as it would hand them to `criu lazy-pages`. The
// restored process runs; each page it touches is fetched on demand, and
// the daemon fetches all the others in the background, in CRIU's
// page-server protocol (with one extension: fault requests are marked
// urgent and overtake the background at the source) through
// LazyOptions.Conn (in mtcp one end of a mutual-TLS connection). The
// daemon follows the process's memory map changes (mremap, munmap,
// madvise) and fills in the memory of children it forks too. At the other
// end [ServeLazyPages] answers from the stopped tree's memory
// (/proc/PID/mem) until the daemon has every page. CRIU's own lazy page
// server, which would serve from pipes filled during the dump, is told to
// close at once; CRIU's RPC cannot hand a lazy dump a page-server socket,
// so Dump gives it one through a CRIU configuration file (ps-socket).
// Doing the lazy-pages work inside mtcpd rather than through
// `criu lazy-pages` takes a process and a relay off the path of every
// page fault, and lets the background transfer run without pausing for
// each fault: the pages phase of a 50 MB redis-server went from 1.6 s to
// about 0.7 s.
//
// Eager: the memory pages go through DumpOptions.Pages to a
// [ServePages] at the other end while CRIU is still dumping, or, without
// Pages, into Dir with the other images, which are sent after the dump.
// The target restores once it has everything.
//
// DumpOptions.LeaveStopped keeps the dumped tree alive but stopped, with
// its TCP sockets in repair mode (CRIU leaves them so): the source can be
// thrown away once the target runs (SIGKILL: a socket closed in repair
// mode sends nothing), or resumed if the restore fails (take the sockets
// out of repair mode, then SIGCONT). CRIU's own network lock is not used
// (network lock "skip"): mtcp holds the flows with its nftables rules, so
// nothing of CRIU's is left in any namespace.
//
// # Addresses
//
// CRIU restores a socket with its original local address, and the kernel
// refuses to connect a socket from an address that is not local. [Rewrite]
// edits the checkpoint's socket entries (files.img) before the restore so
// that sockets bound to the source's service address are restored on the
// target's own; nftables then gives the client the address it dialled, as
// in connection mode.
//
// # Requirements
//
// CRIU 4.2 or newer ([MinVersion]; [Check] says what to do when it is
// missing or older: criu 3.17 cannot run on Linux 6.13 or later, and 4.1.x
// cannot dump TCP sockets on 6.16 or later), root, and a kernel with
// checkpoint/restore support. Lazy migrations also need userfaultfd with
// non-cooperative events on the target ([CheckLazyRestore]). Every CRIU
// run probes the kernel (tens of milliseconds) unless it finds its cache
// (criu.kdat) in its run directory on a tmpfs; tests/setup-criu.sh builds
// CRIU with /run/criu as that directory and makes sure it is a tmpfs.
//
// The dump and the restore run in the calling
// process's network namespace: call them from inside the server's
// namespace (the daemon's), so that CRIU treats it as the host's. A
// process in the same PID namespace as CRIU is restored with its own PID,
// which must be free on the target: on hosts that share a PID namespace
// (the testbed), run the server in a PID namespace of its own
// (`unshare --pid --fork setsid redis-server ...`).
//
// # Tests
//
// Pure tests cover the image rewriting (on images built in the test) and
// version parsing. The others need root and a CRIU ≥ 4.2 and skip with the
// reason otherwise: they dump a real redis-server in a network namespace,
// stream its pages through a loopback TCP connection (eagerly, and
// lazily while the restored server answers) and restore it in another
// namespace. The end-to-end tests of process mode (redis-server
// moved between testbed servers under load) are in tests/.
package criu
