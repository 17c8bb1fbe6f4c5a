// Package peer is the authenticated control channel between the mtcpd
// daemons of a pool: the requests of the migration transaction (Prepare,
// Transfer, Commit, Abort), remote steering (Steer) and heartbeats
// (Status), over mutual TLS 1.3.
//
// # Trust model
//
// A state blob installs a live TCP connection on the server that
// receives it, so an unauthenticated sender would be a connection
// hijacking tool. Every pool has its own certificate authority, the pool
// CA, and membership of the pool is exactly this: holding a private key
// whose certificate the pool CA issued, for the member's name, that has
// not expired.
//
//   - Every daemon trusts the pool CA and nothing else ([Config].Roots);
//     the system's CAs play no part.
//   - Both sides present a certificate (mutual TLS, version 1.3 only).
//     The accepting side requires and verifies the client's certificate
//     during the handshake: a peer without one, with one from another
//     CA or an expired one is refused before a byte it sends is read,
//     and no [Handler] method runs.
//   - The dialling side checks that the server's certificate names the
//     peer it meant to reach (the DNS name, or IP address, given to
//     [Dial]) and, dialled by name, that the member the certificate names
//     for sure (see below) is that one, not another whose certificate
//     also lists the name: an address taken over by another member, or
//     misconfigured, is refused.
//   - Handlers learn who is calling (the certificate's common name, or
//     its first DNS name). Every member may send every request: there
//     are no roles within a pool.
//   - The TLS application protocol (ALPN) is "mtcp-peer", so another TLS
//     service that happens to trust the same CA cannot be confused with a
//     peer, in either direction.
//
// The CA's key signs new members and nothing else: keep ca-key.pem
// offline, and give each server only ca.pem, its own certificate and its
// own key (mode 0600; [TLSFiles.Config] refuses a key readable by group
// or others). There is no revocation list: to remove a member for good,
// make a new pool CA and issue new certificates to the others, or issue
// short-lived certificates and stop renewing the member's. A [Config]
// with [Credentials] takes new certificates and a new pool CA without a
// restart (mtcpd reloads its TLS files on SIGHUP and when they change).
//
// # Making certificates
//
// `mtcpctl certs init` and `mtcpctl certs issue` (or [NewCA] and
// [CA.Issue]) do this. The equivalent with openssl, for a pool named
// "pool" and a member s1 reachable at 10.77.3.11:
//
//	# The pool CA (once; keep ca-key.pem offline).
//	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca-key.pem
//	openssl req -x509 -new -key ca-key.pem -sha256 -days 3650 -subj /CN=pool \
//	    -addext basicConstraints=critical,CA:TRUE,pathlen:0 \
//	    -addext keyUsage=critical,keyCertSign,cRLSign -out ca.pem
//
//	# A member: its key never leaves it, the CA signs its request.
//	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out s1-key.pem
//	chmod 600 s1-key.pem
//	openssl req -new -key s1-key.pem -subj /CN=s1 -out s1.csr
//	printf '%s\n' basicConstraints=critical,CA:FALSE \
//	    keyUsage=critical,digitalSignature extendedKeyUsage=serverAuth,clientAuth \
//	    subjectAltName=DNS:s1,IP:10.77.3.11 > s1.ext
//	openssl x509 -req -in s1.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
//	    -days 365 -sha256 -extfile s1.ext -out s1.pem
//
// The subject alternative name must contain the member's name as a DNS
// name: TLS clients check names there, not in the common name. The common
// name, if any, must be one of those DNS names: it is the name the member
// acts under towards its peers, and a certificate whose common name is
// not among them is refused (signing a request, check that the -subj of
// its CN matches the subjectAltName you give it). Both
// extended key usages are needed, as each member is a server and a
// client. mtcpd loads these files with [TLSFiles.Config].
//
// # Protocol
//
// A [Client] keeps one TLS connection to a peer and runs any number of
// requests on it at once. A frame is a 4-byte big-endian payload length,
// a 1-byte message type, an 8-byte request id, and the payload. The
// receiver checks the length against its [Config].MaxFrame before
// allocating anything, and allocates as the payload arrives rather than
// for the length alone; the payload is binary (fixed-size big-endian
// integers, length-prefixed strings and byte strings), so state blobs
// travel as raw bytes, are written from the caller's memory and are
// handed to the handler as slices of the received frame, without copies.
// After the handshake the two sides exchange a hello: the protocol
// version they will speak (this package speaks version 1) and the
// largest frame each accepts.
//
// Each request carries the time left before its caller's deadline; the
// handler's context expires at the same moment, counted from the
// request's arrival, so the two hosts' clocks need not agree. A server
// bounds every request by its [Config].MaxRequestTime as well, also one
// whose caller set no deadline.
//
// # Limits on a member
//
// Members are trusted to install connections, but a member that is
// compromised, or broken, must not be able to take the memory of the
// others. A server runs at most 256 requests at once per connection and
// accepts at most 64 connections at once from one member. Frames over
// 64 KiB are charged, from the arrival of their length until their
// handler returns, to the server's [Config].FrameMemory, shared by all
// its connections: a frame that would go over it waits to be read (and
// the requests behind it on its connection wait with it). A connection
// whose large frame stops arriving for 30 seconds is closed. A caller
// that stops waiting (deadline or cancellation) gets an error wrapping
// its context's error, and the peer cancels the handler's context. A
// frame that breaks the protocol (unknown type, garbled payload, length
// over the limit, truncated) closes that connection only, after an error
// frame saying why; a panic in a handler is returned as an error.
//
// # Privileges and tests
//
// The package needs no privileges. Its tests run servers and clients on
// loopback with certificates made on the fly: every request type, 100
// concurrent requests on one connection, a 40 MiB Transfer compared byte
// for byte, refusals (no certificate, another CA on either side, wrong
// server name, expired certificates, TLS 1.2, another application
// protocol), garbled frames from an authenticated peer, deadlines and
// cancellation reaching the handler. FuzzDecodeFrame fuzzes the frame
// reader and every payload decoder; the openssl steps above are checked
// when openssl is installed.
package peer
