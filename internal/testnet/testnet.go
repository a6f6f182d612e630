// Package testnet gives tests a client host: a network namespace joined to
// the test's own namespace by a veth pair. Subnets are claimed with lock
// files, so test binaries of several packages running at once never collide.
package testnet

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const claimDir = "/tmp/zeroscale-testnet"

// Net is one client namespace. Host* live in the test's namespace, Peer* in
// the client's.
type Net struct {
	Name      string // namespace name, for `ip netns exec`
	HostIf    string
	PeerIf    string
	HostAddr  netip.Addr
	PeerAddr  netip.Addr
	HostAddr6 netip.Addr
	PeerAddr6 netip.Addr
	index     int
}

// New creates a namespace with a veth pair, IPv4 /24 and IPv6 /64 on both
// ends, and removes it when the test ends.
func New(t testing.TB) *Net { return create(t, true) }

// NewIPv4 is New without IPv6: a Nomad client on a dual-stack interface may
// give an allocation either address.
func NewIPv4(t testing.TB) *Net { return create(t, false) }

func create(t testing.TB, ipv6 bool) *Net {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("network namespace tests need root; run them through `make test`")
	}
	idx, err := claim()
	if err != nil {
		t.Fatalf("claim a test subnet: %v", err)
	}
	n := &Net{
		Name:      fmt.Sprintf("zs-test-%d", idx),
		HostIf:    fmt.Sprintf("zsh%d", idx),
		PeerIf:    fmt.Sprintf("zsp%d", idx),
		HostAddr:  netip.AddrFrom4([4]byte{10, 201, byte(idx), 1}),
		PeerAddr:  netip.AddrFrom4([4]byte{10, 201, byte(idx), 2}),
		HostAddr6: netip.MustParseAddr(fmt.Sprintf("fd00:201:%x::1", idx)),
		PeerAddr6: netip.MustParseAddr(fmt.Sprintf("fd00:201:%x::2", idx)),
		index:     idx,
	}
	t.Cleanup(func() {
		n.teardown()
		_ = os.Remove(filepath.Join(claimDir, strconv.Itoa(n.index)))
	})
	n.teardown() // leftovers of a crashed run; the claim stays ours
	// Each step is a command line; "ip" unless it says otherwise.
	steps := [][]string{
		{"ip", "netns", "add", n.Name},
		{"ip", "link", "add", n.HostIf, "type", "veth", "peer", "name", n.PeerIf},
		{"ip", "link", "set", n.PeerIf, "netns", n.Name},
	}
	if !ipv6 {
		// No IPv6 at all, not even link-local, so only the IPv4 address is
		// fingerprinted on the host end.
		n.HostAddr6, n.PeerAddr6 = netip.Addr{}, netip.Addr{}
		steps = append(steps,
			[]string{"sysctl", "-qw", "net.ipv6.conf." + n.HostIf + ".disable_ipv6=1"},
			[]string{"ip", "netns", "exec", n.Name, "sysctl", "-qw", "net.ipv6.conf." + n.PeerIf + ".disable_ipv6=1"})
	}
	steps = append(steps,
		[]string{"ip", "addr", "add", n.HostAddr.String() + "/24", "dev", n.HostIf},
		[]string{"ip", "-n", n.Name, "addr", "add", n.PeerAddr.String() + "/24", "dev", n.PeerIf})
	if ipv6 {
		steps = append(steps,
			[]string{"ip", "addr", "add", n.HostAddr6.String() + "/64", "dev", n.HostIf, "nodad"},
			[]string{"ip", "-n", n.Name, "addr", "add", n.PeerAddr6.String() + "/64", "dev", n.PeerIf, "nodad"})
	}
	steps = append(steps,
		[]string{"ip", "link", "set", n.HostIf, "up"},
		[]string{"ip", "-n", n.Name, "link", "set", n.PeerIf, "up"},
		[]string{"ip", "-n", n.Name, "link", "set", "lo", "up"})
	for _, args := range steps {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	if ipv6 {
		n.waitUp(t)
	}
	return n
}

func (n *Net) waitUp(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, _ := exec.Command("ip", "-n", n.Name, "-6", "addr", "show", "dev", n.PeerIf).CombinedOutput()
		if !strings.Contains(string(out), "tentative") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("IPv6 address on %s stayed tentative", n.PeerIf)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (n *Net) teardown() {
	_ = exec.Command("ip", "link", "del", n.HostIf).Run()
	_ = exec.Command("ip", "netns", "del", n.Name).Run()
}

// HostIfindex is the ifindex of the host end.
func (n *Net) HostIfindex(t testing.TB) int {
	t.Helper()
	iface, err := net.InterfaceByName(n.HostIf)
	if err != nil {
		t.Fatal(err)
	}
	return iface.Index
}

// Do runs fn on an OS thread inside the namespace. The thread is discarded
// afterwards rather than moved back.
func (n *Net) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Not unlocked: the thread ends with the goroutine.
		fd, err := unix.Open("/var/run/netns/"+n.Name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("open namespace %s: %w", n.Name, err)
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter namespace %s: %w", n.Name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Dial connects from inside the namespace.
func (n *Net) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := n.Do(func() error {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		conn = c
		return err
	})
	return conn, err
}

// Command runs a program inside the namespace.
func (n *Net) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// claim takes the lowest free subnet index, reclaiming those whose owner died.
func claim() (int, error) {
	if err := os.MkdirAll(claimDir, 0o755); err != nil {
		return 0, err
	}
	for idx := 1; idx < 255; idx++ {
		path := filepath.Join(claimDir, strconv.Itoa(idx))
		f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if err == nil {
			fmt.Fprintf(f, "%d\n", os.Getpid())
			f.Close()
			return idx, nil
		}
		if b, rerr := os.ReadFile(path); rerr == nil {
			pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
			if pid > 0 && syscall.Kill(pid, 0) != nil {
				_ = os.Remove(path)
				idx-- // retry this index
			}
		}
	}
	return 0, fmt.Errorf("all test subnets 10.201.1-254.0/24 are in use")
}
