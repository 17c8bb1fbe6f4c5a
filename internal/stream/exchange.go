package stream

import (
	"errors"
	"fmt"
	"io"
	"net"
)

// Half is what one end of a test connection has sent so far and what it
// has verified of the other end's stream.
type Half struct {
	Pattern Pattern // what this end sends
	Sent    int64   // bytes of Pattern already sent
	FIN     bool    // this end already shut down its write side
}

// Finish completes a test connection after a migration and verifies every
// byte: each end that has not sent its FIN yet sends post more bytes of its
// pattern and shuts down its write side; each end reads the other's stream
// to EOF. serverV holds what the server end already verified of the
// client's stream. It returns an error naming the first byte lost,
// duplicated or reordered, a short stream, or a connection error (a RST
// shows as one).
func Finish(client, server *net.TCPConn, up, down Half, post int64, serverV *Verifier) error {
	errc := make(chan error, 3)
	send := func(c *net.TCPConn, h Half, who string) {
		if h.FIN {
			errc <- nil
			return
		}
		_, err := io.Copy(c, h.Pattern.Reader(h.Sent, post))
		if err == nil {
			err = c.CloseWrite()
		}
		if err != nil {
			err = fmt.Errorf("%s send: %w", who, err)
		}
		errc <- err
	}
	go send(client, up, "client")
	go send(server, down, "server")
	go func() {
		_, err := io.Copy(serverV, server)
		if err != nil {
			err = fmt.Errorf("server read: %w", err)
		}
		errc <- err
	}()
	clientV := &Verifier{Pattern: down.Pattern}
	_, cerr := io.Copy(clientV, client)
	if cerr != nil {
		cerr = fmt.Errorf("client read: %w", cerr)
	}
	errs := []error{cerr}
	for range 3 {
		errs = append(errs, <-errc)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	want := func(h Half) int64 {
		if h.FIN {
			return h.Sent
		}
		return h.Sent + post
	}
	if serverV.N != want(up) || clientV.N != want(down) {
		return fmt.Errorf("server got %d of %d bytes, client got %d of %d", serverV.N, want(up), clientV.N, want(down))
	}
	return nil
}
