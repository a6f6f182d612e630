package netns

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/internal/cgroups"
)

const testAlloc = "5e1c2a9b-7d3f-4b6a-8c0e-2f4d6b8a0c1e"

// startProcess runs sleep with the allocation's environment, in a new network
// namespace when own is true, and ends it with the test.
func startProcess(t *testing.T, own bool) int {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("network namespace tests need root; run them through `make test`")
	}
	args := []string{"sleep", "60"}
	if own {
		args = append([]string{"unshare", "--net"}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), "NOMAD_ALLOC_ID="+testAlloc)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %v: %v", args, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd.Process.Pid
}

// waitNamespace waits until unshare has exec'd sleep in its new namespace.
func waitNamespace(t *testing.T, pid int, host uint32) uint32 {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		inode, err := InodeOfProcess(pid)
		if err == nil && inode != host {
			if exe, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe"); exe != "" && exe != "/usr/bin/unshare" {
				return inode
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d never entered its own namespace (inode %d, host %d, err %v)", pid, inode, host, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestFindAllocationFindsItsOwnNamespaceAndNamesIt(t *testing.T) {
	host, err := Self()
	if err != nil {
		t.Fatal(err)
	}
	// A process of the same allocation on the node's namespace (as a
	// logmon would be) must not be taken for it.
	startProcess(t, false)
	pid := startProcess(t, true)
	inode := waitNamespace(t, pid, host)

	f := Finder{Host: host, AllocOf: cgroups.AllocOfProcess}
	ns, found, err := f.FindAllocation(testAlloc)
	if err != nil {
		t.Fatalf("find the allocation's namespace: %v", err)
	}
	if ns.Inode != inode || found != pid {
		t.Fatalf("found namespace %d through process %d, want %d through %d", ns.Inode, found, inode, pid)
	}
	if ns.ID < 0 {
		t.Fatalf("namespace id %d", ns.ID)
	}
	again, err := OfProcess(pid)
	if err != nil || again != ns {
		t.Fatalf("second lookup gave %+v, %v; want the same %+v", again, err, ns)
	}

	if _, _, err := f.FindAllocation("00000000-0000-4000-8000-000000000000"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("an allocation without processes: %v, want ErrNotFound", err)
	}
}

// A bridge with STP holds a new port in listening and learning for twice its
// forward delay: WaitForwarding must wait that out, and say so when it
// cannot.
func TestWaitForwardingWaitsForTheBridgePort(t *testing.T) {
	const (
		bridge   = "zsnsbr0"
		hostIf   = "zsnsh0"
		peerIf   = "zsnsp0"
		ns       = "zs-netns-test"
		peerAddr = "10.209.0.2"
	)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	cleanup := func() {
		_ = exec.Command("ip", "link", "del", hostIf).Run()
		_ = exec.Command("ip", "link", "del", bridge).Run()
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
	cleanup()
	t.Cleanup(cleanup)
	// forward_delay is in hundredths of a second: 2 × 0.5 s here.
	run("ip", "link", "add", bridge, "type", "bridge", "stp_state", "1", "forward_delay", "50")
	run("ip", "link", "set", bridge, "up")
	run("ip", "netns", "add", ns)
	run("ip", "link", "add", hostIf, "type", "veth", "peer", "name", peerIf)
	run("ip", "link", "set", peerIf, "netns", ns)
	run("ip", "link", "set", hostIf, "master", bridge)
	run("ip", "link", "set", hostIf, "up")
	run("ip", "-n", ns, "link", "set", peerIf, "up")
	run("ip", "addr", "add", "10.209.0.1/24", "dev", bridge)
	run("ip", "-n", ns, "addr", "add", peerAddr+"/24", "dev", peerIf)

	path := "/var/run/netns/" + ns
	ports, err := bridgePortsInto(path)
	if err != nil || len(ports) != 1 || ports[0].name != hostIf || len(ports[0].addrs) != 1 || ports[0].addrs[0].String() != peerAddr {
		t.Fatalf("bridge ports into the namespace: %+v %v, want %s to %s", ports, err, hostIf, peerAddr)
	}
	if err := WaitForwarding(path, 50*time.Millisecond); err == nil {
		t.Fatal("a port in STP listening passed as forwarding")
	}
	// A packet for the namespace while the port does not forward leaves an
	// unanswered ARP entry with its own retry timer.
	if c, err := net.Dial("udp", peerAddr+":9"); err == nil {
		_, _ = c.Write([]byte("x"))
		c.Close()
	}
	if out, _ := exec.Command("ip", "neigh", "show", peerAddr, "dev", bridge).CombinedOutput(); !strings.Contains(string(out), "INCOMPLETE") && !strings.Contains(string(out), "FAILED") {
		t.Fatalf("no unanswered ARP entry to clear: %q", out)
	}
	began := time.Now()
	if err := WaitForwarding(path, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("forwarding after %v", time.Since(began).Round(time.Millisecond))
	state, _ := os.ReadFile("/sys/class/net/" + hostIf + "/brport/state")
	if string(state) != "3\n" {
		t.Fatalf("state %q after waiting", state)
	}
	if out, _ := exec.Command("ip", "neigh", "show", peerAddr, "dev", bridge).CombinedOutput(); strings.Contains(string(out), "INCOMPLETE") || strings.Contains(string(out), "FAILED") {
		t.Fatalf("the unanswered ARP entry is still there: %q", out)
	}
}
