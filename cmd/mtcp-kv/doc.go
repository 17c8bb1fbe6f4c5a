// Command mtcp-kv is a migratory key/value session server, an example
// application of package app and the test application of mtcp's
// end-to-end tests.
//
// Each connection is a session with its own key/value map. Commands, one
// per line, each answered with one line:
//
//	SET key value   store value (the rest of the line) under key → OK
//	GET key         the value, or NIL
//	COUNT           how many commands this session has run, this one included
//	HOST            the --name of the server the session lives on now
//	QUIT            → BYE, and the server closes the connection
//
// When mtcpd migrates a session to another server, the map, the counter
// and any unprocessed input move with it; the client sees nothing but
// HOST's answer change.
//
// Exit status: 0 after SIGINT or SIGTERM, 1 if serving fails, 2 for bad
// usage.
package main
