package app

import "errors"

// Sentinel errors. The package's errors wrap the one that applies with
// %w, for errors.Is.
var (
	// ErrMigrating is what Read and Write on a served connection report
	// (wrapped in a *net.OpError) once the connection is being exported:
	// the handler must stop and return its snapshot.
	ErrMigrating = errors.New("connection is being migrated")

	// ErrNoService means no application is registered for the service.
	ErrNoService = errors.New("no application registered for the service")

	// ErrNoConn means the application serving the service has no
	// connection with the requested tuple (it closed, moved away, or never
	// existed).
	ErrNoConn = errors.New("no such connection")

	// ErrServiceTaken means another application already registered the
	// service: one service has exactly one application per daemon.
	ErrServiceTaken = errors.New("service already registered by another application")

	// ErrPeerRefused means the peer on the application socket is not
	// allowed to use it (wrong uid).
	ErrPeerRefused = errors.New("peer not allowed on the mtcp application socket")

	// ErrAppGone means the application's connection to the daemon closed
	// (the application exited or broke the protocol).
	ErrAppGone = errors.New("application disconnected from the daemon")

	// ErrProtocol means a malformed or unexpected message on the
	// application socket.
	ErrProtocol = errors.New("mtcp application protocol violation")
)
