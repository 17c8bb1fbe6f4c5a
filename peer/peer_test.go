package peer

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"sync"
	"testing"
	"time"
)

var testFlow = FlowID{
	Client:  netip.MustParseAddrPort("10.77.1.2:40000"),
	Service: netip.MustParseAddrPort("[fd77:2::11]:7000"),
}

func TestAllCalls(t *testing.T) {
	var gotDeadline time.Time
	h := &testHandler{}
	h.prepare = func(ctx context.Context, from string, r *PrepareRequest) (*PrepareReply, error) {
		gotDeadline, _ = ctx.Deadline()
		if !reflect.DeepEqual(r, &PrepareRequest{TxID: 7, Service: ":7000", Count: 10000, Bytes: 1 << 40}) {
			return nil, fmt.Errorf("got %+v", r)
		}
		return &PrepareReply{OK: false, Reason: "full, from " + from}, nil
	}
	h.transfer = func(ctx context.Context, from string, r *TransferRequest) (*TransferReply, error) {
		want := &TransferRequest{TxID: 7, Items: []Item{
			{Flow: testFlow, Service: ":7000", State: []byte("state"), App: []byte("app")},
			{Flow: FlowID{}, Service: "", State: nil, App: nil},
		}}
		if !reflect.DeepEqual(r, want) {
			return nil, fmt.Errorf("got %+v", r)
		}
		return &TransferReply{Results: []ItemResult{{OK: true}, {Error: "no room"}}}, nil
	}
	h.commit = func(ctx context.Context, from string, r *CommitRequest) (*CommitReply, error) {
		if r.TxID != 7 {
			return nil, fmt.Errorf("got %+v", r)
		}
		return nil, nil // a nil reply is a zero reply
	}
	h.abort = func(ctx context.Context, from string, r *AbortRequest) error {
		return fmt.Errorf("no transaction %d (%s)", r.TxID, r.Reason)
	}
	now := time.Now()
	h.status = func(ctx context.Context, from string) (*StatusReply, error) {
		return &StatusReply{Name: "s1", Load: 0.25, Conns: 12, Services: []string{":7000", ":7001"}, Time: now}, nil
	}
	steer := steeringHandler{h, make(chan *SteerRequest, 2)}
	p := newPool(t, steer)
	c := p.dial(t)
	if c.Peer() != "s1" {
		t.Errorf("Peer() = %q", c.Peer())
	}
	if c.MaxFrame() != defaultMaxFrame {
		t.Errorf("MaxFrame() = %d, want %d", c.MaxFrame(), defaultMaxFrame)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	clientDeadline, _ := ctx.Deadline()

	pr, err := c.Prepare(ctx, &PrepareRequest{TxID: 7, Service: ":7000", Count: 10000, Bytes: 1 << 40})
	if err != nil {
		t.Fatal(err)
	}
	if *pr != (PrepareReply{OK: false, Reason: "full, from c1"}) {
		t.Errorf("Prepare = %+v", pr)
	}
	if d := gotDeadline.Sub(clientDeadline); d < -100*time.Millisecond || d > 100*time.Millisecond {
		t.Errorf("handler deadline %v off the client's by %v", gotDeadline, d)
	}

	tr, err := c.Transfer(ctx, &TransferRequest{TxID: 7, Items: []Item{
		{Flow: testFlow, Service: ":7000", State: []byte("state"), App: []byte("app")},
		{},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if want := []ItemResult{{OK: true}, {Error: "no room"}}; !reflect.DeepEqual(tr.Results, want) {
		t.Errorf("Transfer results = %+v, want %+v", tr.Results, want)
	}

	cr, err := c.Commit(ctx, &CommitRequest{TxID: 7})
	if err != nil || cr == nil || len(cr.Results) != 0 {
		t.Errorf("Commit = %+v, %v", cr, err)
	}

	err = c.Abort(ctx, &AbortRequest{TxID: 7, Reason: "test"})
	var re *RemoteError
	if !errors.As(err, &re) || *re != (RemoteError{Peer: "s1", Op: "Abort", Msg: "no transaction 7 (test)"}) {
		t.Errorf("Abort error = %#v", err)
	}
	mustContain(t, "Abort error", fmt.Sprint(err), "peer s1: Abort", "no transaction 7")

	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Time.Equal(now) || st.Name != "s1" || st.Load != 0.25 || st.Conns != 12 || !reflect.DeepEqual(st.Services, []string{":7000", ":7001"}) {
		t.Errorf("Status = %+v", st)
	}

	sr := &SteerRequest{Op: SteerSwitch, Flows: []FlowID{testFlow, testFlow}, To: netip.MustParseAddr("10.77.2.12")}
	if err := c.Steer(ctx, sr); err != nil {
		t.Fatal(err)
	}
	if got := <-steer.got; !reflect.DeepEqual(got, sr) {
		t.Errorf("Steer got %+v, want %+v", got, sr)
	}
	if err := c.Steer(ctx, &SteerRequest{Op: "bad"}); !errors.As(err, &re) {
		t.Errorf("Steer bad op: %v", err)
	}
	if n := h.calls.Load(); n != 7 {
		t.Errorf("handler called %d times, want 7", n)
	}
}

func TestSteerUnsupported(t *testing.T) {
	p := newPool(t, &testHandler{})
	err := p.dial(t).Steer(context.Background(), &SteerRequest{Op: SteerHold})
	var re *RemoteError
	if !errors.As(err, &re) {
		t.Fatalf("Steer on a non-steering handler: %v", err)
	}
	mustContain(t, "error", err.Error(), "does not steer")
}

func TestConcurrentTransfers(t *testing.T) {
	h := &testHandler{}
	h.transfer = func(ctx context.Context, from string, r *TransferRequest) (*TransferReply, error) {
		// Reply out of order: later requests overtake earlier ones.
		time.Sleep(time.Duration(r.TxID%7) * time.Millisecond)
		rep := &TransferReply{}
		for _, it := range r.Items {
			rep.Results = append(rep.Results, ItemResult{Error: fmt.Sprintf("%d:%s:%d", r.TxID, it.State, len(it.App))})
		}
		return rep, nil
	}
	p := newPool(t, h)
	c := p.dial(t)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := range 100 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			state := fmt.Sprintf("state-%d", i)
			req := &TransferRequest{TxID: uint64(i), Items: []Item{
				{Flow: testFlow, State: []byte(state), App: make([]byte, i*1000)},
				{Flow: testFlow, State: []byte(state + "b"), App: make([]byte, 64<<10)},
			}}
			rep, err := c.Transfer(ctx, req)
			if err != nil {
				errs <- err
				return
			}
			want := []ItemResult{{Error: fmt.Sprintf("%d:%s:%d", i, state, i*1000)}, {Error: fmt.Sprintf("%d:%sb:%d", i, state, 64<<10)}}
			if !reflect.DeepEqual(rep.Results, want) {
				errs <- fmt.Errorf("request %d got %+v, want %+v", i, rep.Results, want)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := h.calls.Load(); n != 100 {
		t.Errorf("handler called %d times", n)
	}
}

func TestLargeTransferByteExact(t *testing.T) {
	var got *TransferRequest
	h := &testHandler{}
	h.transfer = func(ctx context.Context, from string, r *TransferRequest) (*TransferReply, error) {
		got = r
		return &TransferReply{Results: make([]ItemResult, len(r.Items))}, nil
	}
	p := newPool(t, h)
	c := p.dial(t)
	items := make([]Item, 2)
	for i := range items {
		items[i] = Item{Flow: testFlow, Service: ":7000", State: make([]byte, 20<<20), App: make([]byte, 1<<20+i)}
		rand.Read(items[i].State)
		rand.Read(items[i].App)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Transfer(ctx, &TransferRequest{TxID: 1, Items: items}); err != nil {
		t.Fatal(err)
	}
	if len(got.Items) != 2 {
		t.Fatalf("got %d items", len(got.Items))
	}
	for i := range items {
		if !bytes.Equal(got.Items[i].State, items[i].State) {
			t.Errorf("item %d: state differs", i)
		}
		if !bytes.Equal(got.Items[i].App, items[i].App) {
			t.Errorf("item %d: app snapshot differs", i)
		}
	}
}

func TestFrameTooLarge(t *testing.T) {
	ca := testCA(t, "test-pool")
	h := &testHandler{}
	scfg := memberConfig(t, ca, "s1")
	scfg.MaxFrame = 1 << 20
	s := startServer(t, scfg, h)
	c, err := Dial(context.Background(), s.addr, "s1", memberConfig(t, ca, "c1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.MaxFrame() != 1<<20 {
		t.Errorf("MaxFrame() = %d", c.MaxFrame())
	}
	req := &TransferRequest{Items: []Item{{State: make([]byte, 1<<20)}}}
	_, err = c.Transfer(context.Background(), req)
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("Transfer of %d bytes to a 1 MiB peer: %v", req.WireSize(), err)
	}
	mustContain(t, "error", err.Error(), "peer s1: Transfer", "exceeds", "1048576")
	// Just below the limit passes; the connection was not disturbed.
	req.Items[0].State = req.Items[0].State[:len(req.Items[0].State)-(req.WireSize()-(1<<20))]
	if req.WireSize() != 1<<20 {
		t.Fatalf("WireSize = %d", req.WireSize())
	}
	if _, err := c.Transfer(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if h.calls.Load() != 1 {
		t.Errorf("handler called %d times, want 1", h.calls.Load())
	}
}

func TestDeadline(t *testing.T) {
	handlerErr := make(chan error, 1)
	h := &testHandler{}
	h.commit = func(ctx context.Context, from string, r *CommitRequest) (*CommitReply, error) {
		select {
		case <-ctx.Done():
			handlerErr <- ctx.Err()
		case <-time.After(10 * time.Second):
			handlerErr <- errors.New("handler context not cancelled 10s after the client's deadline")
		}
		return &CommitReply{}, nil
	}
	p := newPool(t, h)
	c := p.dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Commit(ctx, &CommitRequest{TxID: 1})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Commit past its deadline: %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Commit returned %v after a 200ms deadline", d)
	}
	var oe *OpError
	if !errors.As(err, &oe) || oe.Op != "Commit" {
		t.Errorf("error %#v is not an OpError of Commit", err)
	}
	mustContain(t, "error", err.Error(), "peer s1: Commit", "deadline")
	if herr := <-handlerErr; !errors.Is(herr, context.DeadlineExceeded) {
		t.Errorf("handler's context ended with %v", herr)
	}
	// The request was abandoned, not the connection.
	if _, err := c.Status(context.Background()); err != nil {
		t.Errorf("Status after an abandoned request: %v", err)
	}
}

func TestCancelReachesHandler(t *testing.T) {
	started := make(chan struct{})
	handlerErr := make(chan error, 1)
	h := &testHandler{}
	h.prepare = func(ctx context.Context, from string, r *PrepareRequest) (*PrepareReply, error) {
		if dl, ok := ctx.Deadline(); !ok || time.Until(dl) < defaultMaxRequestTime-time.Minute {
			t.Errorf("handler's deadline %v away (%v: none); the caller set none, so it should be the server's bound, %v", time.Until(dl), !ok, defaultMaxRequestTime)
		}
		close(started)
		select {
		case <-ctx.Done():
			handlerErr <- ctx.Err()
		case <-time.After(10 * time.Second):
			handlerErr <- errors.New("not cancelled")
		}
		return nil, nil
	}
	p := newPool(t, h)
	c := p.dial(t)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-started; cancel() }()
	_, err := c.Prepare(ctx, &PrepareRequest{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Prepare: %v, want Canceled", err)
	}
	if herr := <-handlerErr; !errors.Is(herr, context.Canceled) {
		t.Errorf("handler's context ended with %v", herr)
	}
}

func TestHandlerPanicIsContained(t *testing.T) {
	h := &testHandler{}
	h.prepare = func(ctx context.Context, from string, r *PrepareRequest) (*PrepareReply, error) {
		var m map[string]int
		m["boom"]++
		return nil, nil
	}
	p := newPool(t, h)
	c := p.dial(t)
	_, err := c.Prepare(context.Background(), &PrepareRequest{})
	var re *RemoteError
	if !errors.As(err, &re) {
		t.Fatalf("Prepare with a panicking handler: %v", err)
	}
	mustContain(t, "error", err.Error(), "internal error")
	if _, err := c.Status(context.Background()); err != nil {
		t.Errorf("Status after a panic: %v", err)
	}
	mustContain(t, "server log", p.server.log.String(), "handler panicked", "assignment to entry in nil map")
}

func TestServeStopClosesConnections(t *testing.T) {
	blocked := make(chan struct{})
	h := &testHandler{}
	h.commit = func(ctx context.Context, from string, r *CommitRequest) (*CommitReply, error) {
		close(blocked)
		<-ctx.Done()
		return nil, ctx.Err()
	}
	p := newPool(t, h)
	c := p.dial(t)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Commit(context.Background(), &CommitRequest{})
		errc <- err
	}()
	<-blocked
	if err := p.server.stop(); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Errorf("Commit in flight when the server stopped: %v, want ErrClosed", err)
	}
	if _, err := c.Status(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("Status after the server stopped: %v", err)
	}
	if _, err := Dial(context.Background(), p.server.addr, "s1", p.client); err == nil {
		t.Error("Dial succeeded after the server stopped")
	}
}

func TestClientClose(t *testing.T) {
	p := newPool(t, &testHandler{})
	c := p.dial(t)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if _, err := c.Status(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("Status on a closed client: %v", err)
	}
}
