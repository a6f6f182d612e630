package testnet

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// LAN is a switched IPv4 subnet: a bridge in the test's namespace, holding
// the subnet's first address, and member namespaces on veth ports of it,
// like hosts on one switch. Members are Nets whose HostAddr is the bridge's.
type LAN struct {
	Bridge  string
	Addr    netip.Addr // the bridge's address (the test's namespace)
	Members []*Net
	index   int
}

// NewLAN creates a bridge in 10.202.<claimed>.0/24 and members namespaces
// on it, at .11, .12, …, and removes them when the test ends.
func NewLAN(t testing.TB, members int) *LAN {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("network namespace tests need root; run them through `make test`")
	}
	if members < 1 || members > 50 {
		t.Fatalf("NewLAN: %d members (1 to 50)", members)
	}
	idx, err := claim()
	if err != nil {
		t.Fatalf("claim a test subnet: %v", err)
	}
	l := &LAN{
		Bridge: fmt.Sprintf("zsbr%d", idx),
		Addr:   netip.AddrFrom4([4]byte{10, 202, byte(idx), 1}),
		index:  idx,
	}
	for i := range members {
		l.Members = append(l.Members, &Net{
			Name:     fmt.Sprintf("zs-lan-%d-%d", idx, i),
			HostIf:   fmt.Sprintf("zsl%dp%d", idx, i),
			PeerIf:   "eth0",
			HostAddr: l.Addr,
			PeerAddr: netip.AddrFrom4([4]byte{10, 202, byte(idx), byte(11 + i)}),
			index:    idx,
		})
	}
	t.Cleanup(func() {
		l.teardown()
		_ = os.Remove(filepath.Join(claimDir, strconv.Itoa(idx)))
	})
	l.teardown()
	steps := [][]string{
		{"ip", "link", "add", l.Bridge, "type", "bridge"},
		// Forward at once: no STP listening/learning delay.
		{"ip", "link", "set", l.Bridge, "type", "bridge", "forward_delay", "0"},
		{"sysctl", "-qw", "net.ipv6.conf." + l.Bridge + ".disable_ipv6=1"},
		{"ip", "addr", "add", l.Addr.String() + "/24", "dev", l.Bridge},
		{"ip", "link", "set", l.Bridge, "up"},
	}
	for _, m := range l.Members {
		steps = append(steps,
			[]string{"ip", "netns", "add", m.Name},
			[]string{"ip", "link", "add", m.HostIf, "type", "veth", "peer", "name", m.PeerIf, "netns", m.Name},
			[]string{"sysctl", "-qw", "net.ipv6.conf." + m.HostIf + ".disable_ipv6=1"},
			[]string{"ip", "netns", "exec", m.Name, "sysctl", "-qw", "net.ipv6.conf." + m.PeerIf + ".disable_ipv6=1"},
			[]string{"ip", "link", "set", m.HostIf, "master", l.Bridge},
			[]string{"ip", "link", "set", m.HostIf, "up"},
			[]string{"ip", "-n", m.Name, "addr", "add", m.PeerAddr.String() + "/24", "dev", m.PeerIf},
			[]string{"ip", "-n", m.Name, "link", "set", m.PeerIf, "up"},
			[]string{"ip", "-n", m.Name, "link", "set", "lo", "up"},
			[]string{"ip", "-n", m.Name, "route", "add", "default", "via", l.Addr.String()})
	}
	for _, args := range steps {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return l
}

func (l *LAN) teardown() {
	for _, m := range l.Members {
		m.teardown()
	}
	_ = exec.Command("ip", "link", "del", l.Bridge).Run()
}

// Path is the member's namespace file, for nsenter --net=.
func (n *Net) Path() string { return "/var/run/netns/" + n.Name }
