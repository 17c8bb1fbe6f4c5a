// Package migrate runs the migration transaction of connection mode: it
// moves a batch of TCP connections from a source server to a target server
// while the flows' steering point keeps the client's view unchanged.
//
// Three parties take part, each behind a small interface so that the
// coordinator can be tested against in-process fakes without root:
//
//   - the [Source] holds the live sockets and their applications;
//   - the [Target] rebuilds the sockets and hands them to its application;
//   - the [Steering] point decides where the flows' packets go: the host
//     that owns the service address (forward steering) or a gateway in
//     front of the pool (gateway steering). It may be the source itself.
//
// The phases, each with its own deadline ([Deadlines]):
//
//	prepare   target: can you take n connections? (it makes blank sockets)
//	quiesce   source: applications stop serving the flows and give their
//	          snapshots; the sockets stay live
//	hold      steering: queue the flows' client packets (once the
//	          applications have stopped: acknowledgements held while an
//	          application still writes only grow what capture carries)
//	capture   source: sockets are frozen (TCP_REPAIR) and captured
//	transfer  target: restore the sockets in repair mode (a socket in
//	          repair mode sends nothing of its own but acknowledges what
//	          reaches it, which the switch may deliver at once: the target
//	          drops that until the commit, which waits for the
//	          reply-source rewrite; it may go in after the answer)
//	switch    steering: send the flows to the target, re-deliver what was
//	          queued
//	commit    target: leave repair mode, hand over to the application;
//	          source: discard the frozen sockets (after the switch)
//
// Where the target rewrites its own replies (forward steering), the
// commit goes out at the same time as the switch rather than after it:
// the client hears from the target one round trip sooner, and what it
// sends meanwhile waits in the hold until the switch re-delivers it to the
// target. Where the steering point rewrites the target's replies (gateway
// steering), the target must not send before the switch, and the commit
// waits for it. So it does when a client was sending data as its socket
// froze ([Item].Receiving): its segments still in the hold's queue when
// the hold is lifted can be overtaken by its next ones, and a target
// already live would have the client resend them, to its harm (see the
// comment on receiving in migrate.go). Before its commit the target takes
// them in silently and then acknowledges them in order.
//
// Any failure before the switch aborts: the target throws away what it
// restored, the source thaws its sockets and gives them back to their
// applications, and the steering point lets the queued packets through to
// the source again. The connections carry on at the source. Flows the
// target fails to restore are aborted one by one while the others move on.
// After the switch, or once the commit is on its way, the target owns the
// flows: a failure to switch or to commit then is reported (a failed
// switch is tried once more), not rolled back. With forward steering that
// holds even when the commit waits for the switch (a sending client): a
// switch that failed may still have sent some flows on (another steering
// point, an answer lost), which lifting the holds would not take back.
// Only gateway steering rolls back a failed switch, as before it.
//
// The package does no I/O of its own and needs no privileges.
package migrate
