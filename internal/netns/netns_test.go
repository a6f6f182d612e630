package netns

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
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
