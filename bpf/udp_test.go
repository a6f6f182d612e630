package bpf

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// ownCgroupID is the cgroup v2 id of this test process: the inode of its
// cgroup's directory.
func ownCgroupID(t *testing.T) uint64 {
	t.Helper()
	raw, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			var st syscall.Stat_t
			if err := syscall.Stat("/sys/fs/cgroup"+rest, &st); err != nil {
				t.Fatal(err)
			}
			return st.Ino
		}
	}
	t.Fatalf("no cgroup v2 line in %q", raw)
	return 0
}

// udpServer binds a UDP socket at addr that answers each datagram with
// "re:" and its payload, and sends what it read on the channel.
func udpServer(t *testing.T, addr string) <-chan string {
	t.Helper()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	got := make(chan string, 16)
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			select {
			case got <- string(buf[:n]):
			default:
			}
			_, _ = pc.WriteTo(append([]byte("re:"), buf[:n]...), from)
		}
	}()
	return got
}

// parkUDP loads a gate on n's host end and parks UDP at addr on a free port.
func parkUDP(t *testing.T, n *testnet.Net, addr netip.Addr, opts Options) (*Gate, Key) {
	t.Helper()
	g := loadGate(t, opts)
	attach(t, g, n.HostIf)
	k := Key{Addr: addr, Port: freePort(t, addr), Proto: UDP}
	if err := g.Park(k); err != nil {
		t.Fatal(err)
	}
	return g, k
}

// dialUDP opens a UDP socket in n's namespace connected to target, closed
// with the test.
func dialUDP(t *testing.T, n *testnet.Net, target string) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := n.Dial(ctx, "udp", target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestUDPParkedDatagramsAreHeldWholeAndReplayedIntoTheStack(t *testing.T) {
	bothModes(t, func(t *testing.T) {
		for _, tc := range []struct {
			name string
			addr func(*testnet.Net) netip.Addr
		}{
			{"ipv4", func(n *testnet.Net) netip.Addr { return n.HostAddr }},
			{"ipv6", func(n *testnet.Net) netip.Addr { return n.HostAddr6 }},
		} {
			t.Run(tc.name, func(t *testing.T) { testUDPHeldAndReplayed(t, tc.addr) })
		}
	})
}

func testUDPHeldAndReplayed(t *testing.T, addr func(*testnet.Net) netip.Addr) {
	n := testnet.New(t)
	g, k := parkUDP(t, n, addr(n), Options{ReportInterval: 10 * time.Second, CaptureSYNs: true})
	host, port := k.Addr, k.Port
	// A TCP entry for the same address and port stays apart.
	if s, ok, err := g.State(Key{Addr: host, Port: port}); err != nil || ok {
		t.Fatalf("TCP state %v %v %v after parking UDP, want none", s, ok, err)
	}
	target := k.AddrPort().String()
	c := dialUDP(t, n, target)
	// The second datagram is long: its bytes past the event's first 128
	// must be held too.
	long := "long:" + strings.Repeat("x", 1300)
	for _, msg := range []string{"first", long} {
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
	}

	var held []Event
	deadline := time.After(5 * time.Second)
	for len(held) < 2 {
		select {
		case ev := <-g.Events():
			if ev.Key == k && ev.Is(EventCapture) {
				held = append(held, ev)
			}
		case <-deadline:
			t.Fatalf("held %d datagrams, want 2", len(held))
		}
	}
	if !held[0].Is(EventWake) {
		t.Fatalf("the first datagram did not report a wake: %+v", held[0])
	}
	for _, ev := range held {
		if len(ev.Frame) != ev.FrameLen {
			t.Fatalf("held %d of the frame's %d bytes, want all", len(ev.Frame), ev.FrameLen)
		}
	}
	if a, err := g.Activity(k); err != nil || a.SYNsDropped != 2 || a.Reports != 1 || a.Captured != 2 {
		t.Fatalf("activity %+v %v, want 2 dropped, 1 report, 2 held", a, err)
	}

	// Nothing bound yet: the probe says so and a replay waits.
	if b, err := g.Bound(k, nil); err != nil || b.Found {
		t.Fatalf("bound before the server %+v %v", b, err)
	}
	if res, err := g.Replay(held[0].Frame, held[0].Ifindex, nil); err != nil || res != ReplayNoListener {
		t.Fatalf("replay before the server: %v %v", res, err)
	}

	got := udpServer(t, target)
	b, err := g.Bound(k, nil)
	if err != nil || !b.Found {
		t.Fatalf("bound after the server %+v %v", b, err)
	}
	if want := ownCgroupID(t); b.CgroupID != want {
		t.Fatalf("bound socket's cgroup %d, want this process's %d", b.CgroupID, want)
	}
	if tb, err := g.Bound(Key{Addr: host, Port: port}, nil); err != nil || tb.Found {
		t.Fatalf("a TCP listener found where only UDP is bound: %+v %v", tb, err)
	}
	if err := g.Open(k); err != nil {
		t.Fatal(err)
	}
	for _, ev := range held {
		if res, err := g.Replay(ev.Frame, ev.Ifindex, nil); err != nil || res != ReplayPassed {
			t.Fatalf("replay: %v %v", res, err)
		}
	}
	for _, want := range []string{"first", long} {
		select {
		case m := <-got:
			if m != want {
				t.Fatalf("server read %.20q, want %.20q", m, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("the server never read the replayed %.20q", want)
		}
	}
	// The client's own first datagram was answered: it sent no other.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2048)
	nr, err := c.Read(buf)
	if err != nil || string(buf[:nr]) != "re:first" {
		t.Fatalf("client read %q %v, want the answer to its first datagram", buf[:nr], err)
	}
}

func TestUDPHoldsAFewDatagramsPerFlow(t *testing.T) {
	n := testnet.New(t)
	g, k := parkUDP(t, n, n.HostAddr, Options{ReportInterval: 10 * time.Second, CaptureSYNs: true})
	before, err := g.Counters()
	if err != nil {
		t.Fatal(err)
	}
	c := dialUDP(t, n, k.AddrPort().String())
	const sent = 7
	for i := 0; i < sent; i++ {
		if _, err := fmt.Fprintf(c, "retry %d", i); err != nil {
			t.Fatal(err)
		}
	}
	a := waitActivity(t, g, k, "datagrams", func(a Activity) bool { return a.SYNsDropped >= sent })
	if a.Captured != 4 {
		t.Fatalf("held %d datagrams of one flow, want 4", a.Captured)
	}
	after, err := g.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if d := after["datagram_hold_limit"] - before["datagram_hold_limit"]; d != sent-4 {
		t.Fatalf("hold limit counted %d, want %d", d, sent-4)
	}
	var frames [][]byte
	for _, ev := range drainEvents(g, 300*time.Millisecond) {
		if ev.Is(EventCapture) {
			frames = append(frames, ev.Frame)
		}
	}
	if len(frames) != 4 || !bytes.HasSuffix(frames[3], []byte("retry 3")) {
		t.Fatalf("%d held frames, want the flow's first 4 in order", len(frames))
	}
}

func TestUDPDatagramsToAnOpenAddressAreActivityButNotFromIgnoredSources(t *testing.T) {
	bothModes(t, func(t *testing.T) {
		n := testnet.New(t)
		g := loadGate(t, Options{})
		attach(t, g, n.HostIf)
		port := freePort(t, n.HostAddr)
		target := netip.AddrPortFrom(n.HostAddr, port).String()
		udpServer(t, target)
		k := Key{Addr: n.HostAddr, Port: port, Proto: UDP}
		if err := g.Open(k); err != nil {
			t.Fatal(err)
		}
		send := func() {
			t.Helper()
			c := dialUDP(t, n, target)
			if _, err := c.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 64)
			if _, err := c.Read(buf); err != nil {
				t.Fatalf("no answer through the open gate: %v", err)
			}
		}

		// From an ignored source: served, not activity.
		if err := g.SetIgnoreSources([]netip.Prefix{netip.PrefixFrom(n.PeerAddr, 32)}); err != nil {
			t.Fatal(err)
		}
		send()
		if a, err := g.Activity(k); err != nil || !a.LastActive.IsZero() || a.Packets == 0 {
			t.Fatalf("activity %+v %v after an ignored source's datagram, want packets but no activity", a, err)
		}
		if err := g.SetIgnoreSources(nil); err != nil {
			t.Fatal(err)
		}
		began := time.Now()
		send()
		a := waitActivity(t, g, k, "datagram", func(a Activity) bool { return !a.LastActive.IsZero() })
		if a.LastActive.Before(began.Add(-time.Second)) || a.Bytes != 4 || a.Established != 0 {
			t.Fatalf("activity %+v, want the datagram's 4 bytes now and no connection", a)
		}
	})
}

func TestProbeFindsTCPListenersOnly(t *testing.T) {
	g := loadGate(t, Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	k := KeyFrom(netip.MustParseAddrPort(ln.Addr().String()))
	b, err := g.Bound(k, nil)
	if err != nil || !b.Found || b.CgroupID != ownCgroupID(t) {
		t.Fatalf("TCP listener: %+v %v", b, err)
	}
	if b, err := g.Bound(k.WithProto(UDP), nil); err != nil || b.Found {
		t.Fatalf("UDP at a TCP-only port: %+v %v", b, err)
	}
	if want := socketInode(t, ln.(*net.TCPListener)); b.Inode != want {
		t.Fatalf("TCP listener's inode %d, want %d", b.Inode, want)
	}
	ln.Close()
	if b, err := g.Bound(k, nil); err != nil || b.Found {
		t.Fatalf("after close: %+v %v", b, err)
	}

	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	uk := KeyFrom(netip.MustParseAddrPort(pc.LocalAddr().String())).WithProto(UDP)
	b, err = g.Bound(uk, nil)
	if err != nil || !b.Found || b.CgroupID != ownCgroupID(t) || b.Inode != socketInode(t, pc.(*net.UDPConn)) {
		t.Fatalf("UDP socket: %+v %v", b, err)
	}
}

// socketInode is the inode number /proc/<pid>/fd names a socket by.
func socketInode(t *testing.T, c syscall.Conn) uint64 {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	var statErr error
	if err := raw.Control(func(fd uintptr) { statErr = syscall.Fstat(int(fd), &st) }); err != nil || statErr != nil {
		t.Fatal(err, statErr)
	}
	return st.Ino
}

func TestUDPWakeFromAppliesToDatagrams(t *testing.T) {
	n := testnet.New(t)
	g, k := parkUDP(t, n, n.HostAddr, Options{ReportInterval: 10 * time.Second, CaptureSYNs: true})
	if err := g.SetWakeFrom([]netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}); err != nil {
		t.Fatal(err)
	}
	c := dialUDP(t, n, k.AddrPort().String())
	if _, err := c.Write([]byte("not from here")); err != nil {
		t.Fatal(err)
	}
	a := waitActivity(t, g, k, "denied datagram", func(a Activity) bool { return a.Denied >= 1 })
	if a.Reports != 0 || a.Captured != 0 {
		t.Fatalf("activity %+v: a datagram from outside wake_from reported or was held", a)
	}
	for _, ev := range drainEvents(g, 300*time.Millisecond) {
		if ev.Key == k {
			t.Fatalf("event %+v for a datagram from outside wake_from", ev)
		}
	}
}

// A kernel that refuses the UDP-only programs still gets the gate: parked
// TCP addresses hold SYNs, and socket lookups say why they cannot run.
func TestTheGateLoadsWithoutTheUDPPrograms(t *testing.T) {
	n := testnet.New(t)
	g := loadGate(t, Options{ReportInterval: 10 * time.Second, withoutUDP: true})
	attach(t, g, n.HostIf)
	if !errors.Is(g.UDPSupport(), ErrUDPUnsupported) {
		t.Fatalf("UDP support %v, want ErrUDPUnsupported", g.UDPSupport())
	}
	k := Key{Addr: n.HostAddr, Port: freePort(t, n.HostAddr)}
	if _, err := g.Bound(k, nil); !errors.Is(err, ErrUDPUnsupported) {
		t.Fatalf("Bound: %v, want ErrUDPUnsupported", err)
	}
	if err := g.Park(k); err != nil {
		t.Fatal(err)
	}
	if err := dialOnce(n, k.String(), 300*time.Millisecond); err == nil {
		t.Fatal("a connection to a parked address was accepted")
	}
	waitActivity(t, g, k, "parked SYN", func(a Activity) bool { return a.SYNsDropped >= 1 && a.Reports == 1 })
	if _, err := os.Stat(g.linkPath(udpRecvLinkID)); !os.IsNotExist(err) {
		t.Fatalf("the stub of zs_udp_recv was attached (%v)", err)
	}
	if _, err := os.Stat(g.linkPath(sockStateLinkID)); err != nil {
		t.Fatalf("the socket program is not attached: %v", err)
	}
}
