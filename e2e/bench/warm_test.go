package bench

import (
	"bufio"
	"context"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// The warm path's measurement. Two client namespaces on two identical veth
// pairs: in each round the gate is attached to one of them (they swap every
// round), so the gated and the ungated direct routes exist side by side and
// no attach or detach (tens of ms each) falls between their samples. Every
// route is measured in many short slices and single requests, in a fresh
// random order in every cycle (the two direct routes in adjacent pairs), so
// that a change in machine load hits every route alike.

// warmRoute is one way a client reaches the warm service.
type warmRoute struct {
	name string
	// direct: straight to the service (gated or not), the pair whose ratio
	// needs the finest resolution; it gets warmDirectShare times the
	// slices and requests of a proxied route.
	direct bool
	// gatedSide: the client is in the namespace whose veth has the gate
	// this round; otherwise in the other one.
	gatedSide bool
	// bulkPort and httpPort are dialled at the host end of the client's
	// veth.
	bulkPort, httpPort int
	// uploadHeader precedes the bulk stream on a route that speaks HTTP:
	// the stream is then the body of one long upload.
	uploadHeader string
	// received counts the bytes the route's own sink has read.
	received *atomic.Int64
}

// warmRound is every route's figures in one round.
type warmRound struct {
	gbps      []float64
	latencies [][]time.Duration
	// sliceGbps is every slice's rate, by route.
	sliceGbps [][]float64
}

// measureWarmRound runs the bulk slices, then the requests, of every route.
func measureWarmRound(b *testing.B, routes []warmRoute, gated, plain *testnet.Net) warmRound {
	netOf := func(r warmRoute) *testnet.Net {
		if r.gatedSide {
			return gated
		}
		return plain
	}
	out := warmRound{gbps: make([]float64, len(routes)), latencies: make([][]time.Duration, len(routes)),
		sliceGbps: make([][]float64, len(routes))}
	bulk := make([]net.Conn, len(routes))
	for i, r := range routes {
		bulk[i] = dialFrom(b, netOf(r), r.bulkPort)
		defer bulk[i].Close()
		if _, err := io.WriteString(bulk[i], r.uploadHeader); err != nil {
			b.Fatal(err)
		}
	}
	// Exactly one route is in flight at a time: a slice ends by waiting
	// until its sink has read every byte written.
	bytes, seconds := make([]float64, len(routes)), make([]float64, len(routes))
	streams := make([]*bulkStream, len(routes))
	for i, r := range routes {
		streams[i] = &bulkStream{conn: bulk[i], received: r.received, receivedBefore: r.received.Load()}
	}
	buf := make([]byte, 256<<10)
	for range warmCycles {
		for _, i := range cycleOrder(routes) {
			n, d := streams[i].slice(b, buf)
			bytes[i] += float64(n)
			seconds[i] += d.Seconds()
			out.sliceGbps[i] = append(out.sliceGbps[i], float64(n)*8/d.Seconds()/1e9)
		}
	}
	for i := range routes {
		out.gbps[i] = bytes[i] * 8 / seconds[i] / 1e9
	}

	clients := make([]*keepAliveClient, len(routes))
	for i, r := range routes {
		clients[i] = newKeepAliveClient(b, dialFrom(b, netOf(r), r.httpPort))
		defer clients[i].conn.Close()
		for range 20 { // the connection's and the proxy's first requests
			clients[i].get(b)
		}
	}
	for range warmRequests {
		for _, i := range cycleOrder(routes) {
			out.latencies[i] = append(out.latencies[i], clients[i].get(b))
		}
	}
	return out
}

// cycleOrder is one cycle's order of route indexes: warmDirectShare pairs
// of the direct routes, each pair in random order, and one of each proxied
// route, all placed at random. A pair's two samples are adjacent in time.
func cycleOrder(routes []warmRoute) []int {
	var pair []int
	var units [][]int
	for i, r := range routes {
		if r.direct {
			pair = append(pair, i)
		} else {
			units = append(units, []int{i})
		}
	}
	for range warmDirectShare {
		p := slices.Clone(pair)
		rand.Shuffle(len(p), func(a, b int) { p[a], p[b] = p[b], p[a] })
		units = append(units, p)
	}
	rand.Shuffle(len(units), func(a, b int) { units[a], units[b] = units[b], units[a] })
	return slices.Concat(units...)
}

// bulkStream is one route's bulk connection in a round.
type bulkStream struct {
	conn net.Conn
	// received counts what the route's sink reads (of an upload, the
	// body); receivedBefore is its value before this connection.
	received       *atomic.Int64
	receivedBefore int64
	written        int64
}

// slice streams for warmRamp (the pipeline fills), then for warmSlice, and
// returns what the sink read in that second part and how long it took. It
// returns once the sink has read everything written.
func (s *bulkStream) slice(b *testing.B, buf []byte) (int64, time.Duration) {
	write := func() {
		n, err := s.conn.Write(buf)
		s.written += int64(n)
		if err != nil {
			b.Fatal(err)
		}
	}
	began := time.Now()
	for time.Since(began) < warmRamp {
		write()
	}
	from, fromAt := s.received.Load(), time.Now()
	for time.Since(fromAt) < warmSlice {
		write()
	}
	n, took := s.received.Load()-from, time.Since(fromAt)
	deadline := time.Now().Add(warmDrainTimeout)
	for s.received.Load()-s.receivedBefore < s.written {
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d bytes written reached the sink within %v", s.received.Load()-s.receivedBefore, s.written, warmDrainTimeout)
		}
		time.Sleep(100 * time.Microsecond)
	}
	return n, took
}

// dialFrom connects from inside the namespace to port at its veth's host end.
func dialFrom(b *testing.B, n *testnet.Net, port int) net.Conn {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := n.Dial(ctx, "tcp", netip.AddrPortFrom(n.HostAddr, uint16(port)).String())
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// keepAliveClient sends GETs one at a time on one connection and reads each
// response in the same goroutine: no transport goroutines between the clock
// and the socket.
type keepAliveClient struct {
	conn net.Conn
	in   *bufio.Reader
}

func newKeepAliveClient(b *testing.B, conn net.Conn) *keepAliveClient {
	return &keepAliveClient{conn: conn, in: bufio.NewReader(conn)}
}

var getRequest = []byte("GET / HTTP/1.1\r\nHost: bench\r\n\r\n")

// get times one request: from writing it to the end of the response body.
func (c *keepAliveClient) get(b *testing.B) time.Duration {
	began := time.Now()
	if _, err := c.conn.Write(getRequest); err != nil {
		b.Fatal(err)
	}
	resp, err := http.ReadResponse(c.in, nil)
	if err != nil {
		b.Fatal(err)
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	took := time.Since(began)
	if err != nil || resp.StatusCode != http.StatusOK {
		b.Fatalf("GET: status %d, %v", resp.StatusCode, err)
	}
	return took
}

// portOnAll returns a port free on every one of addrs and not yet taken,
// and takes it.
func portOnAll(b *testing.B, addrs []netip.Addr, taken map[int]bool) int {
	for range 20 {
		port := harness.FreePort(b, addrs[0])
		free := !taken[port]
		for _, a := range addrs[1:] {
			ln, err := net.Listen("tcp", netip.AddrPortFrom(a, uint16(port)).String())
			if err != nil {
				free = false
				break
			}
			ln.Close()
		}
		if free {
			taken[port] = true
			return port
		}
	}
	b.Fatalf("no port free on all of %v in 20 tries", addrs)
	return 0
}

// listenOnAll listens on port at every one of addrs until the bench ends.
func listenOnAll(b *testing.B, addrs []netip.Addr, port int) []net.Listener {
	var out []net.Listener
	for _, a := range addrs {
		ln, err := net.Listen("tcp", netip.AddrPortFrom(a, uint16(port)).String())
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { ln.Close() })
		out = append(out, ln)
	}
	return out
}

// startCountingSink reads and discards every connection to port on addrs,
// and counts the bytes; with upload, each connection is an HTTP request and
// only its body counts.
func startCountingSink(b *testing.B, addrs []netip.Addr, port int, upload bool) *atomic.Int64 {
	received := new(atomic.Int64)
	for _, ln := range listenOnAll(b, addrs, port) {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					var body io.Reader = c
					if upload {
						req, err := http.ReadRequest(bufio.NewReader(c))
						if err != nil {
							return
						}
						body = req.Body
					}
					buf := make([]byte, 256<<10)
					for {
						n, err := body.Read(buf)
						received.Add(int64(n))
						if err != nil {
							return
						}
					}
				}()
			}
		}()
	}
	return received
}

// startHTTPBackend serves a two-byte page on port at every one of addrs
// until the bench ends.
func startHTTPBackend(b *testing.B, addrs []netip.Addr, port int) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok")
	})}
	for _, ln := range listenOnAll(b, addrs, port) {
		go func() { _ = srv.Serve(ln) }()
	}
	b.Cleanup(func() { srv.Close() })
}

// hostPort is addr:port.
func hostPort(addr netip.Addr, port int) string {
	return netip.AddrPortFrom(addr, uint16(port)).String()
}
