package bpf

import (
	"context"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/internal/netns"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

const mappedPort = 8080

// portMapping forwards node:port to the container namespace's mappedPort as
// docker and the CNI portmap plugin do: DNAT for packets that arrive
// (PREROUTING) and for the node's own (OUTPUT), forwarding allowed. Rules and
// the forwarding switch are restored when the test ends.
func portMapping(t *testing.T, node netip.AddrPort, ctr *testnet.Net) {
	t.Helper()
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	forward, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		t.Fatal(err)
	}
	run("sysctl", "-qw", "net.ipv4.ip_forward=1")
	t.Cleanup(func() {
		_ = os.WriteFile("/proc/sys/net/ipv4/ip_forward", forward, 0o644)
	})
	to := netip.AddrPortFrom(ctr.PeerAddr, mappedPort).String()
	dport := strconv.Itoa(int(node.Port()))
	rules := [][]string{
		{"-t", "nat", "PREROUTING", "-d", node.Addr().String(), "-p", "tcp", "--dport", dport, "-j", "DNAT", "--to-destination", to},
		{"-t", "nat", "OUTPUT", "-d", node.Addr().String(), "-p", "tcp", "--dport", dport, "-j", "DNAT", "--to-destination", to},
		{"-t", "filter", "FORWARD", "-d", ctr.PeerAddr.String(), "-j", "ACCEPT"},
		{"-t", "filter", "FORWARD", "-s", ctr.PeerAddr.String(), "-j", "ACCEPT"},
	}
	for _, r := range rules {
		run(append([]string{"iptables", "-w", r[0], r[1], "-I", r[2]}, r[3:]...)...)
		t.Cleanup(func() {
			_ = exec.Command("iptables", append([]string{"-w", r[0], r[1], "-D", r[2]}, r[3:]...)...).Run()
		})
	}
	run("ip", "-n", ctr.Name, "route", "replace", "default", "via", ctr.HostAddr.String())
}

// listenIn starts an echo server on mappedPort inside the namespace.
func listenIn(t *testing.T, n *testnet.Net) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := n.Do(func() (err error) {
		ln, err = net.Listen("tcp", ":"+strconv.Itoa(mappedPort))
		return err
	}); err != nil {
		t.Fatalf("listen in %s: %v", n.Name, err)
	}
	return serveEcho(t, ln)
}

// A service behind a port mapping (its sockets in its own namespace, as in
// docker or Nomad bridge mode) is counted under its node address, its health
// checks through the mapping stay checks, its listener is reported with its
// namespace, and a captured SYN is replayed through the mapping once it
// listens there.
func TestPortMappedService(t *testing.T) {
	client, ctr := testnet.New(t), testnet.New(t)
	g := loadGate(t, Options{ReportInterval: time.Second, CaptureSYNs: true})
	attach(t, g, client.HostIf)
	if err := g.SetCheckerComms([]string{"consul"}); err != nil {
		t.Fatal(err)
	}
	node := netip.AddrPortFrom(client.HostAddr, freePort(t, client.HostAddr))
	portMapping(t, node, ctr)
	k := KeyFrom(node)
	ns, err := netns.OfFile("/var/run/netns/" + ctr.Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Open(k); err != nil {
		t.Fatal(err)
	}
	mapped := NsPort{Netns: ns.Inode, Port: mappedPort}
	if err := g.MapPort(mapped, k); err != nil {
		t.Fatal(err)
	}
	if got, err := g.MappedPorts(); err != nil || got[mapped] != k || len(got) != 1 {
		t.Fatalf("mapped ports read back %v, %v; want %s → %s", got, err, mapped, k)
	}

	ln := listenIn(t, ctr)
	listen := waitEvent(t, g, func(ev Event) bool { return ev.Is(EventListen) && ev.Key.Port == mappedPort })
	if listen.Netns != ns.Inode {
		t.Fatalf("listen event names namespace %d, want the container's %d", listen.Netns, ns.Inode)
	}

	// A real client through the mapping.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, "tcp", node.String())
	if err != nil {
		out, _ := exec.Command("sh", "-c", "iptables -t nat -L -v -n | head -20; ip -n "+ctr.Name+" route; ip -n "+ctr.Name+" addr; ss -ltn -N "+ctr.Name).CombinedOutput()
		t.Fatalf("connect through the port mapping: %v\n%s", err, out)
	}
	waitActivity(t, g, k, "client through the mapping", func(a Activity) bool { return a.Established == 1 && a.Opened == 1 })
	c.Close()
	waitActivity(t, g, k, "client gone", func(a Activity) bool { return a.Established == 0 && a.Closed == 1 })

	// The node's Consul agent checks the node address; NAT takes it in.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	checker := filepath.Join(t.TempDir(), "consul")
	if err := os.Symlink(self, checker); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(checker)
	cmd.Env = append(os.Environ(), "ZS_TEST_DIAL="+node.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("check through the mapping: %v: %s", err, out)
	}
	a := waitActivity(t, g, k, "check through the mapping", func(a Activity) bool { return a.Checks == 1 })
	if a.Opened != 1 {
		t.Fatalf("a health check through the port mapping counted as activity: %+v", a)
	}
	// A checker inside the allocation's namespace (as Nomad runs checks of
	// bridge-mode groups) over its loopback.
	cmd = exec.Command("nsenter", "--net=/var/run/netns/"+ctr.Name, checker)
	cmd.Env = append(os.Environ(), "ZS_TEST_DIAL=127.0.0.1:"+strconv.Itoa(mappedPort))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("check inside the namespace: %v: %s", err, out)
	}
	a = waitActivity(t, g, k, "check inside the namespace", func(a Activity) bool { return a.Checks == 2 })
	if a.Opened != 1 {
		t.Fatalf("a health check inside the allocation's namespace counted as activity: %+v", a)
	}

	// Asleep: the service is gone, a client's SYN is captured.
	ln.Close()
	if err := g.Park(k); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		c, err := client.Dial(ctx, "tcp", node.String())
		if err == nil {
			_, err = c.Write([]byte("x"))
			c.Close()
		}
		done <- err
	}()
	captured := waitEvent(t, g, func(ev Event) bool { return ev.Is(EventCapture) && ev.Key == k })
	via := &ReplayTarget{NetnsID: ns.ID, Port: mappedPort}
	if res, err := g.Replay(captured.Frame, captured.Ifindex, via); err != nil || res != ReplayNoListener {
		t.Fatalf("replay before the service listens: %v %v, want no-listener", res, err)
	}
	listenIn(t, ctr)
	if err := g.Open(k); err != nil {
		t.Fatal(err)
	}
	if g.SYNPassed(k, captured.Source) {
		t.Fatal("the client's retransmit got through first; nothing to replay")
	}
	// Without the target the node has no listener at the node address: the
	// replay would wait for the client's retransmit.
	if res, err := g.Replay(captured.Frame, captured.Ifindex, nil); err != nil || res != ReplayNoListener {
		t.Fatalf("replay at the node address: %v %v, want no-listener", res, err)
	}
	res, err := g.Replay(captured.Frame, captured.Ifindex, via)
	for err == nil && res == ReplayNoListener {
		time.Sleep(5 * time.Millisecond)
		res, err = g.Replay(captured.Frame, captured.Ifindex, via)
	}
	if err != nil || res != ReplayPassed {
		t.Fatalf("replay through the mapping: %v %v", res, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("the client's original connect: %v", err)
	}

	if err := g.UnmapPort(mapped); err != nil {
		t.Fatal(err)
	}
	if got, _ := g.MappedPorts(); len(got) != 0 {
		t.Fatalf("after unmap: %v", got)
	}
}

func waitEvent(t *testing.T, g *Gate, match func(Event) bool) Event {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case ev := <-g.Events():
			if match(ev) {
				return ev
			}
		case <-deadline:
			t.Fatal("no matching kernel event")
		}
	}
}
