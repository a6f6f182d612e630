package bpf

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/internal/cgroups"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// TestMain doubles as a tiny TCP client when run under another name (the
// health-check test execs this binary as "consul"), and as a listener that
// another cgroup owns (the listen-owner test).
func TestMain(m *testing.M) {
	if addr := os.Getenv("ZS_TEST_LISTEN"); addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("listening")
		// Listen until the test closes our stdin.
		_, _ = io.Copy(io.Discard, os.Stdin)
		_ = ln.Close()
		os.Exit(0)
	}
	if addr := os.Getenv("ZS_TEST_DIAL"); addr != "" {
		c, err := net.DialTimeout("tcp", addr, 3*time.Second)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		_, _ = c.Write([]byte("check"))
		_ = c.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// echoServer accepts on addr and echoes until the test ends.
func echoServer(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	return serveEcho(t, ln)
}

// serveEcho echoes on every connection ln accepts until the test ends.
func serveEcho(t *testing.T, ln net.Listener) net.Listener {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln
}

func freePort(t *testing.T, addr netip.Addr) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// attachMode is the mode attach asks for; tests of both modes switch it.
var attachMode = ModeAuto

func attach(t *testing.T, g *Gate, ifname string) {
	t.Helper()
	mode, err := g.Attach(ifname, attachMode)
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	want := attachMode
	if want == ModeAuto {
		want = ModeTC // a veth is virtual; this kernel has tcx
	}
	if mode != want {
		t.Fatalf("veth attached in %s mode, want %s", mode, want)
	}
}

// bothModes runs fn with the gate on tc ingress and on generic XDP.
func bothModes(t *testing.T, fn func(t *testing.T)) {
	for _, mode := range []AttachMode{ModeTC, ModeGeneric} {
		t.Run(string(mode), func(t *testing.T) {
			attachMode = mode
			defer func() { attachMode = ModeAuto }()
			fn(t)
		})
	}
}

func waitActivity(t *testing.T, g *Gate, k Key, what string, ok func(Activity) bool) Activity {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		a, err := g.Activity(k)
		if err != nil {
			t.Fatal(err)
		}
		if ok(a) {
			return a
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: activity %+v", what, a)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestParkedDropsABurstWithOneReport(t *testing.T) {
	bothModes(t, testParkedDropsABurstWithOneReport)
}

func testParkedDropsABurstWithOneReport(t *testing.T) {
	n := testnet.New(t)
	g := loadGate(t, Options{ReportInterval: 10 * time.Second})
	attach(t, g, n.HostIf)
	port := freePort(t, n.HostAddr)
	echoServer(t, netip.AddrPortFrom(n.HostAddr, port).String())
	k := Key{Addr: n.HostAddr, Port: port}
	if err := g.Park(k); err != nil {
		t.Fatal(err)
	}

	const clients = 50
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			c, err := n.Dial(ctx, "tcp", netip.AddrPortFrom(n.HostAddr, port).String())
			if err == nil {
				c.Close()
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err == nil {
			t.Fatal("a connection to a parked address was accepted")
		}
	}
	a := waitActivity(t, g, k, "burst", func(a Activity) bool { return a.SYNsDropped >= clients })
	if a.Reports != 1 || a.Opened != 0 {
		t.Fatalf("activity %+v, want exactly 1 report and no connection", a)
	}
	evs := drainEvents(g, 300*time.Millisecond)
	wakes := 0
	for _, e := range evs {
		if e.Is(EventWake) {
			wakes++
			if e.Key != k || e.Source.Addr() != n.PeerAddr || e.Ifindex != n.HostIfindex(t) {
				t.Fatalf("wake event %+v", e)
			}
		}
	}
	if wakes != 1 {
		t.Fatalf("%d wake events for a burst of %d SYNs, want 1", wakes, clients)
	}
}

func TestOpenPassesAndCountsConnections(t *testing.T) {
	bothModes(t, testOpenPassesAndCountsConnections)
}

func testOpenPassesAndCountsConnections(t *testing.T) {
	n := testnet.New(t)
	g := loadGate(t, Options{})
	attach(t, g, n.HostIf)
	port := freePort(t, n.HostAddr)
	echoServer(t, netip.AddrPortFrom(n.HostAddr, port).String())
	k := Key{Addr: n.HostAddr, Port: port}
	if err := g.Open(k); err != nil {
		t.Fatal(err)
	}
	before := time.Now()

	c, err := n.Dial(context.Background(), "tcp", netip.AddrPortFrom(n.HostAddr, port).String())
	if err != nil {
		t.Fatalf("dial open address: %v", err)
	}
	payload := strings.Repeat("z", 1000)
	if _, err := c.Write([]byte(payload)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(payload))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	a := waitActivity(t, g, k, "while connected", func(a Activity) bool { return a.Established == 1 })
	if a.Opened != 1 || a.Packets == 0 || a.PacketBytes < 1000 || a.LastActive.Before(before.Add(-time.Second)) {
		t.Fatalf("while connected: %+v", a)
	}
	c.Close()
	a = waitActivity(t, g, k, "after close", func(a Activity) bool { return a.Established == 0 && a.Closed == 1 })
	if a.Bytes < 2000 || a.Checks != 0 {
		t.Fatalf("after close: %+v, want ≥2000 bytes and no checks", a)
	}
}

func TestListenEvent(t *testing.T) {
	g := loadGate(t, Options{})
	specific := freePort(t, netip.MustParseAddr("127.0.0.1"))
	wildcard := freePort(t, netip.MustParseAddr("127.0.0.1"))
	_ = g.Park(Key{Addr: netip.MustParseAddr("127.0.0.1"), Port: specific})
	_ = g.Park(Key{Addr: netip.MustParseAddr("10.9.9.9"), Port: wildcard})
	drainEvents(g, 20*time.Millisecond)

	unwatched := freePort(t, netip.MustParseAddr("127.0.0.1"))
	for _, addr := range []string{
		fmt.Sprintf("127.0.0.1:%d", unwatched),
		fmt.Sprintf("127.0.0.1:%d", specific),
		fmt.Sprintf(":%d", wildcard),
	} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
	}
	got := map[uint16]Key{}
	for _, e := range drainEvents(g, 500*time.Millisecond) {
		t.Logf("event %+v", e)
		if e.Is(EventListen) {
			got[e.Key.Port] = e.Key
		}
	}
	if _, ok := got[unwatched]; ok {
		t.Fatal("listen event for a port nobody watches")
	}
	if k := got[specific]; k.Addr != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("listen event for %d: %v", specific, k)
	}
	if k, ok := got[wildcard]; !ok || !k.Addr.IsUnspecified() {
		t.Fatalf("listen event for wildcard %d: %v (ok=%v)", wildcard, k, ok)
	}
}

func TestListenEventNamesTheListenersCgroupAndProcess(t *testing.T) {
	g := loadGate(t, Options{})
	addr := netip.MustParseAddr("127.0.0.1")
	port := freePort(t, addr)
	_ = g.Park(Key{Addr: addr, Port: port}) // watches the port
	drainEvents(g, 20*time.Millisecond)

	// A Nomad-shaped task cgroup; the helper is cloned straight into it,
	// so its listen() can only be charged to that cgroup.
	const alloc = "5f0c2b9e-7d41-4a8e-b3c6-0e9d8f7a6b5c"
	dir := testCgroup(t, alloc+".web.scope")
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open cgroup: %v", err)
	}
	defer syscall.Close(fd)

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), "ZS_TEST_LISTEN="+netip.AddrPortFrom(addr, port).String())
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the listener in its cgroup: %v", err)
	}
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Wait()
	})
	line := make([]byte, len("listening\n"))
	if _, err := io.ReadFull(stdout, line); err != nil {
		t.Fatalf("the listener did not start: %v", err)
	}

	var ev *Event
	for _, e := range drainEvents(g, 500*time.Millisecond) {
		if e.Is(EventListen) && e.Key.Port == port {
			ev = &e
		}
	}
	if ev == nil {
		t.Fatalf("no listen event for port %d", port)
	}
	if ev.CgroupID != st.Ino || ev.PID != cmd.Process.Pid {
		t.Fatalf("listen event names cgroup %d pid %d, want cgroup %d (%s) pid %d",
			ev.CgroupID, ev.PID, st.Ino, dir, cmd.Process.Pid)
	}
	got, ok, err := cgroups.AllocOf(ev.CgroupID)
	if err != nil || !ok || got != alloc {
		t.Fatalf("allocation of the listener's cgroup: %q %v %v, want %s", got, ok, err, alloc)
	}
}

// testCgroup creates <cgroup2 root>/zeroscale-test-<pid>.slice/<name> and
// removes both when the test ends, once the processes in it have exited.
func testCgroup(t *testing.T, name string) string {
	t.Helper()
	root, err := cgroups.Root()
	if err != nil {
		t.Fatal(err)
	}
	slice := filepath.Join(root, fmt.Sprintf("zeroscale-test-%d.slice", os.Getpid()))
	dir := filepath.Join(slice, name)
	_ = syscall.Rmdir(dir) // leftovers of a crashed run
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("create test cgroup: %v", err)
	}
	t.Cleanup(func() {
		// A cgroup is busy until its last process is reaped.
		deadline := time.Now().Add(5 * time.Second)
		for _, d := range []string{dir, slice} {
			for {
				err := syscall.Rmdir(d)
				if err == nil || errors.Is(err, syscall.ENOENT) {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("remove test cgroup %s: %v", d, err)
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
	})
	return dir
}

func TestHealthChecksAreNotActivity(t *testing.T) {
	t.Run("IPv4", func(t *testing.T) { testHealthChecksAreNotActivity(t, false) })
	t.Run("IPv6", func(t *testing.T) { testHealthChecksAreNotActivity(t, true) })
}

func testHealthChecksAreNotActivity(t *testing.T, ipv6 bool) {
	n := testnet.New(t)
	g := loadGate(t, Options{})
	attach(t, g, n.HostIf)
	host, peer := n.HostAddr, n.PeerAddr
	if ipv6 {
		host, peer = n.HostAddr6, n.PeerAddr6
	}
	port := freePort(t, host)
	target := netip.AddrPortFrom(host, port).String()
	echoServer(t, target)
	k := Key{Addr: host, Port: port}
	_ = g.Open(k)
	if err := g.SetCheckerComms([]string{"consul", "nomad"}); err != nil {
		t.Fatal(err)
	}

	// A process named like the Consul agent connects: a health check.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, name := range []string{"consul", "webclient"} {
		if err := os.Symlink(self, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	runAs := func(name string) {
		cmd := exec.Command(filepath.Join(dir, name))
		cmd.Env = append(os.Environ(), "ZS_TEST_DIAL="+target)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s client: %v: %s", name, err, out)
		}
	}
	runAs("consul")
	a := waitActivity(t, g, k, "consul check", func(a Activity) bool { return a.Checks == 1 })
	if a.Opened != 0 || !a.LastActive.IsZero() {
		t.Fatalf("a check by the consul process counted as activity: %+v", a)
	}

	// The same client under another name is real traffic.
	runAs("webclient")
	a = waitActivity(t, g, k, "webclient", func(a Activity) bool { return a.Opened == 1 })
	if a.Checks != 1 {
		t.Fatalf("after a real client: %+v", a)
	}

	// A peer in ignore_sources is a check too.
	if err := g.SetIgnoreSources([]netip.Prefix{netip.PrefixFrom(peer, peer.BitLen())}); err != nil {
		t.Fatal(err)
	}
	c, err := n.Dial(context.Background(), "tcp", target)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	a = waitActivity(t, g, k, "ignored source", func(a Activity) bool { return a.Checks == 2 })
	if a.Opened != 1 {
		t.Fatalf("an ignored source counted as activity: %+v", a)
	}
	if err := g.SetIgnoreSources(nil); err != nil {
		t.Fatal(err)
	}
	c, err = n.Dial(context.Background(), "tcp", target)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitActivity(t, g, k, "source no longer ignored", func(a Activity) bool { return a.Opened == 2 && a.Checks == 2 })
}

func TestMovedAddressRefusesAtOnce(t *testing.T) { bothModes(t, testMovedAddressRefusesAtOnce) }

func testMovedAddressRefusesAtOnce(t *testing.T) {
	n := testnet.New(t)
	g := loadGate(t, Options{})
	attach(t, g, n.HostIf)
	for _, addr := range []netip.Addr{n.HostAddr, n.HostAddr6} {
		port := freePort(t, addr)
		k := Key{Addr: addr, Port: port}
		if err := g.Move(k); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		began := time.Now()
		_, err := n.Dial(ctx, "tcp", netip.AddrPortFrom(addr, port).String())
		cancel()
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial moved %v: %v, want connection refused", k, err)
		}
		if took := time.Since(began); took > 900*time.Millisecond {
			t.Fatalf("refused after %v: the client waited for a retransmit", took)
		}
		if a, _ := g.Activity(k); a.RSTs != 1 {
			t.Fatalf("RST counter %d, want 1", a.RSTs)
		}
	}
}

func TestRestartKeepsGatingAndState(t *testing.T) {
	n := testnet.New(t)
	pin := testPinPath(t)
	g, err := Load(Options{PinPath: pin, ReportInterval: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Uninstall(pin) })
	attach(t, g, n.HostIf)
	port := freePort(t, n.HostAddr)
	target := netip.AddrPortFrom(n.HostAddr, port).String()
	echoServer(t, target)
	parked := Key{Addr: n.HostAddr, Port: port}
	_ = g.Park(parked)
	_ = g.SetWakeFrom([]netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")})

	if err := dialOnce(n, target, 300*time.Millisecond); err == nil {
		t.Fatal("parked address accepted a connection")
	}
	drainEvents(g, 100*time.Millisecond)

	// The plugin goes away without uninstalling: gating must go on.
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if err := dialOnce(n, target, 300*time.Millisecond); err == nil {
		t.Fatal("parked address accepted a connection while the plugin was down")
	}

	g2, err := Load(Options{PinPath: pin, ReportInterval: time.Millisecond})
	if err != nil {
		t.Fatalf("load again: %v", err)
	}
	defer g2.Close()
	if state, ok, _ := g2.State(parked); !ok || state != StateParked {
		t.Fatalf("state after restart: %v %v", state, ok)
	}
	a, err := g2.Activity(parked)
	if err != nil || a.SYNsDropped < 2 {
		t.Fatalf("counters after restart: %+v %v", a, err)
	}
	// The SYN that arrived while no process was reading is delivered now.
	evs := drainEvents(g2, 300*time.Millisecond)
	if len(evs) == 0 || !evs[0].Is(EventWake) || evs[0].Key != parked {
		t.Fatalf("events after restart: %+v, want the wake from the downtime", evs)
	}
	// The allow-list survived: a source outside it is still refused silently.
	if err := g2.SetWakeFrom([]netip.Prefix{netip.MustParsePrefix("192.168.0.0/16")}); err != nil {
		t.Fatal(err)
	}
	if err := dialOnce(n, target, 300*time.Millisecond); err == nil {
		t.Fatal("parked")
	}
	if a, _ := g2.Activity(parked); a.Denied == 0 {
		t.Fatal("allow-list not applied after restart")
	}
	if _, err := g2.Attach(n.HostIf, ModeAuto); err != nil {
		t.Fatalf("re-attach takes over the pinned link: %v", err)
	}

	// Uninstall removes the gate: the server is reachable again.
	g2.Close()
	if err := Uninstall(pin); err != nil {
		t.Fatal(err)
	}
	if err := dialOnce(n, target, 2*time.Second); err != nil {
		t.Fatalf("after uninstall the address is still gated: %v", err)
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Fatalf("pin directory left behind: %v", err)
	}
}

func TestHealthCheckSYNsDoNotWake(t *testing.T) {
	n := testnet.New(t)
	g := loadGate(t, Options{ReportInterval: time.Millisecond})
	attach(t, g, n.HostIf)
	if _, err := g.Attach("lo", ModeAuto); err != nil {
		t.Fatal(err)
	}
	port := freePort(t, n.HostAddr)
	target := netip.AddrPortFrom(n.HostAddr, port).String()
	k := Key{Addr: n.HostAddr, Port: port}
	_ = g.Park(k)
	if err := g.SetCheckerComms([]string{"consul"}); err != nil {
		t.Fatal(err)
	}
	self, _ := os.Executable()
	dir := t.TempDir()
	for _, name := range []string{"consul", "curl"} {
		if err := os.Symlink(self, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	dialAs := func(name string) {
		cmd := exec.Command(filepath.Join(dir, name))
		cmd.Env = append(os.Environ(), "ZS_TEST_DIAL="+target)
		_ = cmd.Start()
		time.Sleep(300 * time.Millisecond) // one SYN, no retransmit yet
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	drainEvents(g, 20*time.Millisecond)

	// The local Consul agent checking a parked service: let through (to be
	// refused by the stack, nothing listens), no wake.
	dialAs("consul")
	if evs := drainEvents(g, 300*time.Millisecond); len(evs) != 0 {
		t.Fatalf("a health check SYN woke the service: %+v", evs)
	}
	if a, _ := g.Activity(k); a.CheckSYNs != 1 || a.Reports != 0 {
		t.Fatalf("after a check: %+v", a)
	}
	// A local client from the same source address: a wake.
	dialAs("curl")
	evs := drainEvents(g, 300*time.Millisecond)
	if len(evs) != 1 || !evs[0].Is(EventWake) {
		t.Fatalf("a local client's SYN: %+v, want one wake", evs)
	}
	// A remote checker in ignore_sources: no wake either.
	_ = g.SetIgnoreSources([]netip.Prefix{netip.PrefixFrom(n.PeerAddr, 32)})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, _ = n.Dial(ctx, "tcp", target)
	cancel()
	if evs := drainEvents(g, 300*time.Millisecond); len(evs) != 0 {
		t.Fatalf("an ignored source woke the service: %+v", evs)
	}
	if a, _ := g.Activity(k); a.CheckSYNs != 2 {
		t.Fatalf("check SYNs %d, want 2", a.CheckSYNs)
	}
}

func TestAConnectionFromBeforeForgetDoesNotCountBelowZero(t *testing.T) {
	n := testnet.New(t)
	g := loadGate(t, Options{})
	attach(t, g, n.HostIf)
	port := freePort(t, n.HostAddr)
	target := netip.AddrPortFrom(n.HostAddr, port).String()
	ln, err := net.Listen("tcp", target)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The server side leaves ESTABLISHED when the client's FIN arrives,
	// before its read returns EOF: ended means the kernel has seen the close.
	ended := make(chan struct{})
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(io.Discard, c)
		close(ended)
	}()
	k := Key{Addr: n.HostAddr, Port: port}
	if err := g.Open(k); err != nil {
		t.Fatal(err)
	}
	c, err := n.Dial(context.Background(), "tcp", target)
	if err != nil {
		t.Fatal(err)
	}
	waitActivity(t, g, k, "connected", func(a Activity) bool { return a.Established == 1 })

	// The policy goes away and comes back while the connection lives.
	if err := g.Forget(k); err != nil {
		t.Fatal(err)
	}
	if err := g.Open(k); err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the server never saw the close")
	}
	var act zeroscaleSockActivity
	bk := k.bpf()
	if err := g.objs.Activity.Lookup(&bk, &act); err != nil {
		t.Fatal(err)
	}
	if act.Established != 0 || act.Closed != 0 {
		t.Fatalf("in the kernel after close: established %d closed %d, want 0 and 0: "+
			"a socket counted before Forget was uncounted from the new entry", act.Established, act.Closed)
	}
	if a, err := g.Activity(k); err != nil || a.Established != 0 {
		t.Fatalf("activity after close: %+v %v, want 0 established", a, err)
	}
	if c := counter(t, g, "established_clamped"); c != 0 {
		t.Fatalf("the count went negative and was clamped %d times", c)
	}
}

func TestActivityNeverReportsANegativeEstablishedCount(t *testing.T) {
	g := loadGate(t, Options{})
	k := Key{Addr: server4, Port: 8080}
	if err := g.Open(k); err != nil {
		t.Fatal(err)
	}
	bk := k.bpf()
	if err := g.objs.Activity.Put(&bk, &zeroscaleSockActivity{Established: -1}); err != nil {
		t.Fatal(err)
	}
	a, err := g.Activity(k)
	if err != nil {
		t.Fatal(err)
	}
	if a.Established != 0 {
		t.Fatalf("established %d, want 0", a.Established)
	}
	if c := counter(t, g, "established_clamped"); c != 1 {
		t.Fatalf("clamp counter %d, want 1", c)
	}
}

// dialOnce connects from the namespace to target and closes the connection.
func dialOnce(n *testnet.Net, target string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := n.Dial(ctx, "tcp", target)
	if err == nil {
		c.Close()
	}
	return err
}
