package nat

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// These tests change the nftables ruleset of the test's own network
// namespace, each in a table of its own that matches only its test subnet.

const testTimeout = 5 * time.Second

var tableCount atomic.Int32

// openTestTable opens a table whose name no other test or test binary uses,
// and deletes it when the test ends.
func openTestTable(t *testing.T) (*Table, string) {
	t.Helper()
	return openTestTableWith(t, func(open func() error) error { return open() })
}

// openTestTableIn opens the test's table inside n's namespace, where its
// sockets stay whichever thread uses them later.
func openTestTableIn(t *testing.T, n *testnet.Net) *Table {
	t.Helper()
	table, _ := openTestTableWith(t, n.Do)
	return table
}

func openTestTableWith(t *testing.T, do func(func() error) error) (*Table, string) {
	t.Helper()
	name := fmt.Sprintf("zs-test-%d-%d", os.Getpid(), tableCount.Add(1))
	var table *Table
	if err := do(func() error {
		var err error
		table, err = Open(name)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := table.Delete(); err != nil {
			t.Error(err)
		}
		_ = table.Close()
	})
	return table, name
}

// serveEcho answers each connection on ln with the client address it sees,
// then echoes lines, until the test ends.
func serveEcho(t *testing.T, ln net.Listener) netip.AddrPort {
	t.Helper()
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(2 * testTimeout))
				fmt.Fprintf(c, "%s\n", c.RemoteAddr())
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func listen(t *testing.T, addr netip.Addr) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// unusedPort is a port nothing listens on at addr, so a connection to it
// is refused unless a forward takes it.
func unusedPort(t *testing.T, addr netip.Addr) netip.AddrPort {
	t.Helper()
	ln := listen(t, addr)
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

func dialHere(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

// echoClient is a connection to serveEcho.
type echoClient struct {
	conn   net.Conn
	lines  *bufio.Reader
	seenAs netip.AddrPort // the client's address as the server saw it
}

func dialEcho(t *testing.T, dial dialFunc, addr netip.AddrPort) *echoClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	conn, err := dial(ctx, "tcp", addr.String())
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	c := &echoClient{conn: conn, lines: bufio.NewReader(conn)}
	greeting, err := c.lines.ReadString('\n')
	if err != nil {
		t.Fatalf("read the greeting through %s: %v", addr, err)
	}
	if c.seenAs, err = netip.ParseAddrPort(strings.TrimSpace(greeting)); err != nil {
		t.Fatalf("greeting %q: %v", greeting, err)
	}
	c.echo(t)
	return c
}

func (c *echoClient) echo(t *testing.T) {
	t.Helper()
	_ = c.conn.SetDeadline(time.Now().Add(testTimeout))
	if _, err := fmt.Fprintf(c.conn, "ping\n"); err != nil {
		t.Fatalf("send through the forward: %v", err)
	}
	line, err := c.lines.ReadString('\n')
	if err != nil || line != "ping\n" {
		t.Fatalf("echo through the forward: %q, %v", line, err)
	}
}

func mustForwards(t *testing.T, table *Table) map[netip.AddrPort]Forward {
	t.Helper()
	forwards, err := table.Forwards()
	if err != nil {
		t.Fatal(err)
	}
	return forwards
}

func TestForwardToAnotherPortOfTheSameHost(t *testing.T) {
	n := testnet.NewIPv4(t)
	table, _ := openTestTable(t)
	target := serveEcho(t, listen(t, n.HostAddr))
	from := unusedPort(t, n.HostAddr)

	if err := table.Forward(from, target); err != nil {
		t.Fatal(err)
	}

	remote := dialEcho(t, n.Dial, from)
	if remote.seenAs.Addr() != n.PeerAddr {
		t.Errorf("server saw the remote client as %s, want %s (no masquerade for a local target)", remote.seenAs, n.PeerAddr)
	}
	got := mustForwards(t, table)[from]
	if got.To != target || got.Connections < 1 {
		t.Fatalf("Forwards()[%s] = %+v after a forwarded connection, want To %s and Connections >= 1", from, got, target)
	}

	// A client on the host itself goes through the output chain.
	local := dialEcho(t, dialHere, from)
	if local.seenAs.Addr() != n.HostAddr {
		t.Errorf("server saw the local client as %s, want %s (no masquerade through lo)", local.seenAs, n.HostAddr)
	}
	after := mustForwards(t, table)[from]
	if after.Connections <= got.Connections {
		t.Errorf("Connections went from %d to %d after a local connection; the output rule did not count it", got.Connections, after.Connections)
	}

	// Forwarding again to the same target leaves the rules, and so their
	// counters, alone.
	if err := table.Forward(from, target); err != nil {
		t.Fatal(err)
	}
	if again := mustForwards(t, table)[from]; again != after {
		t.Errorf("Forwards()[%s] = %+v after the same Forward again, want %+v", from, again, after)
	}
}

func TestForwardIPv6ToAnotherPortOfTheSameHost(t *testing.T) {
	n := testnet.New(t)
	table, _ := openTestTable(t)
	target := serveEcho(t, listen(t, n.HostAddr6))
	from := unusedPort(t, n.HostAddr6)

	if err := table.Forward(from, target); err != nil {
		t.Fatal(err)
	}

	remote := dialEcho(t, n.Dial, from)
	if remote.seenAs.Addr() != n.PeerAddr6 {
		t.Errorf("server saw the remote client as %s, want %s", remote.seenAs, n.PeerAddr6)
	}
	local := dialEcho(t, dialHere, from)
	if local.seenAs.Addr() != n.HostAddr6 {
		t.Errorf("server saw the local client as %s, want %s", local.seenAs, n.HostAddr6)
	}
	if got := mustForwards(t, table)[from]; got.To != target || got.Connections < 2 {
		t.Fatalf("Forwards()[%s] = %+v after two connections, want To %s and Connections >= 2", from, got, target)
	}
}

// forwardingLAN sets up the cross-host case: the test's namespace (the
// bridge) forwards its own address to a server in member 1, and member 0 is
// the client.
func forwardingLAN(t *testing.T) (lan *testnet.LAN, from, target netip.AddrPort) {
	t.Helper()
	lan = testnet.NewLAN(t, 2)
	changed, err := EnableForwarding(true)
	if err != nil {
		t.Fatal(err)
	}
	if changed {
		t.Cleanup(func() { _ = os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("0\n"), 0o644) })
	}
	server := lan.Members[1]
	var ln net.Listener
	if err := server.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(server.PeerAddr, 0).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return lan, unusedPort(t, lan.Addr), serveEcho(t, ln)
}

func TestForwardToAnotherHostMasqueradesTheClient(t *testing.T) {
	lan, from, target := forwardingLAN(t)
	table, _ := openTestTable(t)

	if err := table.Forward(from, target); err != nil {
		t.Fatal(err)
	}

	c := dialEcho(t, lan.Members[0].Dial, from)
	if c.seenAs.Addr() != lan.Addr {
		t.Errorf("server saw the client as %s, want the forwarding host %s", c.seenAs, lan.Addr)
	}
	if got := mustForwards(t, table)[from]; got.To != target || got.Connections < 1 {
		t.Fatalf("Forwards()[%s] = %+v, want To %s and Connections >= 1", from, got, target)
	}
}

// Here the namespace is the forwarding host, with IPv6 forwarding enabled in
// it alone, and the test's namespace is both client and server: the
// forwarded connection leaves by the link it came in on, so the server's
// replies come back through the forwarder only if it masqueraded.
func TestForwardIPv6ToAnotherHostMasqueradesTheClient(t *testing.T) {
	n := testnet.New(t)
	target := serveEcho(t, listen(t, n.HostAddr6))
	table := openTestTableIn(t, n)
	var from netip.AddrPort
	if err := n.Do(func() error {
		if _, err := EnableForwarding(false); err != nil {
			return err
		}
		ln, err := net.Listen("tcp", netip.AddrPortFrom(n.PeerAddr6, 0).String())
		if err != nil {
			return err
		}
		defer ln.Close()
		from = ln.Addr().(*net.TCPAddr).AddrPort() // nothing listens there afterwards
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	if err := table.Forward(from, target); err != nil {
		t.Fatal(err)
	}

	c := dialEcho(t, dialHere, from)
	if c.seenAs.Addr() != n.PeerAddr6 {
		t.Errorf("server saw the client as %s, want the forwarding host %s", c.seenAs, n.PeerAddr6)
	}
	if got := mustForwards(t, table)[from]; got.To != target || got.Connections < 1 {
		t.Fatalf("Forwards()[%s] = %+v, want To %s and Connections >= 1", from, got, target)
	}
}

func TestEstablishedConnectionOutlivesUnforward(t *testing.T) {
	lan, from, target := forwardingLAN(t)
	table, _ := openTestTable(t)
	client := lan.Members[0]
	if err := table.Forward(from, target); err != nil {
		t.Fatal(err)
	}
	established := dialEcho(t, client.Dial, from)

	if err := table.Unforward(from); err != nil {
		t.Fatal(err)
	}

	if forwards := mustForwards(t, table); len(forwards) != 0 {
		t.Fatalf("Forwards() = %v after Unforward, want none", forwards)
	}
	established.echo(t)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	conn, err := client.Dial(ctx, "tcp", from.String())
	if err == nil {
		conn.Close()
		t.Fatalf("a new connection to %s succeeded after Unforward", from)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("a new connection to %s: %v, want connection refused", from, err)
	}
}

func TestReopenedTableKeepsForwards(t *testing.T) {
	n := testnet.NewIPv4(t)
	first, name := openTestTable(t)
	target := serveEcho(t, listen(t, n.HostAddr))
	from := unusedPort(t, n.HostAddr)
	if err := first.Forward(from, target); err != nil {
		t.Fatal(err)
	}
	dialEcho(t, n.Dial, from)

	// As after a restart of the agent: a new Table on the same kernel table.
	second, err := Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()

	if got := mustForwards(t, second)[from]; got.To != target || got.Connections < 1 {
		t.Fatalf("reopened Forwards()[%s] = %+v, want To %s and Connections >= 1", from, got, target)
	}
	dialEcho(t, n.Dial, from)
	if err := second.Unforward(from); err != nil {
		t.Fatal(err)
	}
	// The first Table reads the kernel, not its memory.
	if forwards := mustForwards(t, first); len(forwards) != 0 {
		t.Fatalf("Forwards() = %v after Unforward through the reopened table, want none", forwards)
	}
	if err := second.Delete(); err != nil {
		t.Fatal(err)
	}
	if forwards, err := first.Forwards(); err == nil && len(forwards) != 0 {
		t.Fatalf("Forwards() = %v after Delete, want an error or none", forwards)
	}
	if err := second.Delete(); err != nil {
		t.Errorf("Delete of a deleted table: %v", err)
	}
}

func TestForwardReplacesTheTarget(t *testing.T) {
	n := testnet.NewIPv4(t)
	table, _ := openTestTable(t)
	oldListener := listen(t, n.HostAddr)
	oldTarget := serveEcho(t, oldListener)
	newTarget := serveEcho(t, listen(t, n.HostAddr))
	from := unusedPort(t, n.HostAddr)
	if err := table.Forward(from, oldTarget); err != nil {
		t.Fatal(err)
	}

	for range 2 { // the second time changes nothing
		if err := table.Forward(from, newTarget); err != nil {
			t.Fatal(err)
		}
	}

	if got := mustForwards(t, table); len(got) != 1 || got[from].To != newTarget {
		t.Fatalf("Forwards() = %v, want only %s -> %s", got, from, newTarget)
	}
	rules, err := table.forwardRules()
	if err != nil {
		t.Fatal(err)
	}
	if !isComplete(rules[from], newTarget) {
		t.Fatalf("rules of %s: %+v, want one per chain to %s", from, rules[from], newTarget)
	}
	// Only the new target can answer: the old one no longer listens.
	oldListener.Close()
	dialEcho(t, n.Dial, from)
}

func TestUnforwardOfAnAbsentForwardSucceeds(t *testing.T) {
	table, _ := openTestTable(t)
	if err := table.Unforward(netip.MustParseAddrPort("192.0.2.1:80")); err != nil {
		t.Fatal(err)
	}
}

func TestForwardRefusesMixedFamilies(t *testing.T) {
	table, _ := openTestTable(t)
	from := netip.MustParseAddrPort("192.0.2.1:80")
	for _, to := range []netip.AddrPort{
		netip.MustParseAddrPort("[2001:db8::1]:80"),
		netip.MustParseAddrPort("[::ffff:192.0.2.2]:80"),
	} {
		if err := table.Forward(from, to); err == nil {
			t.Errorf("Forward(%s, %s) succeeded, want an error", from, to)
		}
	}
	if forwards := mustForwards(t, table); len(forwards) != 0 {
		t.Fatalf("Forwards() = %v after refused forwards, want none", forwards)
	}
}
