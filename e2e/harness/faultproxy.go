package harness

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// FaultProxy stands between the plugin and an agent's HTTP API so a test
// can take the agent away: Cut resets every open connection (blocking
// queries included) and answers new ones as the chosen fault does, as an
// agent that stopped or a partition would; Restore lets traffic through
// again.
type FaultProxy struct {
	Addr string
	ln   net.Listener

	mu     sync.Mutex
	target string
	fault  Fault
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

// Fault is how a cut proxy treats new connections.
type Fault int

const (
	// Up forwards.
	Up Fault = iota
	// Refused closes new connections at once (a stopped agent).
	Refused
	// Held accepts and never answers (a partition, a hung agent).
	Held
	// AnswersLost forwards requests, so they take effect, but closes the
	// connection when the answer starts: the caller sees an error for a
	// call that was applied.
	AnswersLost
)

// StartFaultProxy listens on a free loopback port. Until SetTarget, new
// connections are refused.
func StartFaultProxy(t testing.TB) *FaultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &FaultProxy{Addr: ln.Addr().String(), ln: ln, conns: make(map[net.Conn]struct{}), fault: Refused}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.close)
	return p
}

// SetTarget starts forwarding to addr (host:port).
func (p *FaultProxy) SetTarget(addr string) {
	p.mu.Lock()
	p.target, p.fault = addr, Up
	p.mu.Unlock()
}

// Cut breaks every open connection and treats new ones with fault.
func (p *FaultProxy) Cut(fault Fault) {
	p.mu.Lock()
	p.fault = fault
	for c := range p.conns {
		c.Close()
		delete(p.conns, c)
	}
	p.mu.Unlock()
}

// Restore forwards again.
func (p *FaultProxy) Restore() {
	p.mu.Lock()
	p.fault = Up
	p.mu.Unlock()
}

func (p *FaultProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		fault, target := p.fault, p.target
		p.mu.Unlock()
		switch fault {
		case Refused:
			c.Close()
		case Held:
			p.track(c)
		case AnswersLost:
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				p.forwardLosingAnswers(c, target)
			}()
		default:
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				p.forward(c, target)
			}()
		}
	}
}

func (p *FaultProxy) track(c net.Conn) {
	p.mu.Lock()
	p.conns[c] = struct{}{}
	p.mu.Unlock()
}

// dial connects to target for client c, tracking both so Cut ends them.
func (p *FaultProxy) dial(c net.Conn, target string) (net.Conn, bool) {
	up, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		c.Close()
		return nil, false
	}
	p.track(c)
	p.track(up)
	return up, true
}

func (p *FaultProxy) untrack(conns ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range conns {
		delete(p.conns, c)
	}
}

func (p *FaultProxy) forward(c net.Conn, target string) {
	up, ok := p.dial(c, target)
	if !ok {
		return
	}
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		dst.Close()
		src.Close()
		done <- struct{}{}
	}
	go pipe(up, c)
	go pipe(c, up)
	<-done
	<-done
	p.untrack(c, up)
}

func (p *FaultProxy) forwardLosingAnswers(c net.Conn, target string) {
	up, ok := p.dial(c, target)
	if !ok {
		return
	}
	go func() { _, _ = io.Copy(up, c) }()
	// Wait for the first byte of the answer, then drop the connection.
	_, _ = up.Read(make([]byte, 1))
	c.Close()
	up.Close()
	p.untrack(c, up)
}

func (p *FaultProxy) close() {
	p.ln.Close()
	p.Cut(Refused)
	p.wg.Wait()
}
