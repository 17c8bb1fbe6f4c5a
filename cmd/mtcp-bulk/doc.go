// Command mtcp-bulk is a migratory bulk streaming server, an example
// application of package app and a test application of mtcp's end-to-end
// tests.
//
// A client sends a 16-byte request: a seed and a length N, 8 bytes each,
// big-endian. The server answers with N bytes (endlessly if N is 0) of
// the deterministic pattern of package internal/stream for that seed, in
// which every byte depends on its offset, and consumes and counts
// whatever else the client sends. With the top bit of the length set
// (N is then the other 63 bits), what the client sends must be the
// pattern for the seed XOR 0xfeed, from its first byte on: the server
// checks it, and at the first wrong byte (lost, duplicated or reordered
// data) ends the session at once. The session ends when the client
// closes the connection; a client that only shuts down its sending side
// still receives the N bytes it asked for.
//
// It also speaks enough HTTP/1.1 for curl or a browser: GET /SEED/LENGTH
// (decimal; LENGTH 0 is endless) is answered with a 200 response whose
// body is that stream, with Content-Length and Connection: close, and
// the server closes once the body is sent; any other request gets a 400.
// A binary request whose seed begins with the bytes "GET " is taken for
// HTTP.
//
// When mtcpd migrates a session, the seed, the offset reached and the
// byte count move with it and the new server continues at the exact
// offset: a client verifying the pattern sees every byte exactly once, in
// order.
//
// Exit status: 0 after SIGINT or SIGTERM, 1 if serving fails, 2 for bad
// usage.
package main
