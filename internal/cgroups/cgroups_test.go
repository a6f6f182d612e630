package cgroups

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

const testAlloc = "8d2f6c1e-5b7a-4f3e-9c0d-1a2b3c4d5e6f"

// testSlice creates a cgroup directory for this test under the real cgroup2
// mount and removes it (children first) when the test ends.
func testSlice(t *testing.T) (root, slice string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("cgroup tests need root; run them through `make test`")
	}
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	slice = filepath.Join(root, fmt.Sprintf("zeroscale-test-%d.slice", os.Getpid()))
	removeTree(slice) // leftovers of a crashed run
	if err := os.Mkdir(slice, 0o755); err != nil {
		t.Fatalf("create test cgroup: %v", err)
	}
	t.Cleanup(func() { removeTree(slice) })
	return root, slice
}

// removeTree removes cgroup directories bottom up: cgroupfs refuses
// os.RemoveAll, which would try to unlink the interface files.
func removeTree(dir string) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			removeTree(filepath.Join(dir, e.Name()))
		}
	}
	_ = syscall.Rmdir(dir)
}

func mkCgroup(t *testing.T, path string) uint64 {
	t.Helper()
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestAllocOfFindsTheAllocationOfATaskCgroup(t *testing.T) {
	_, slice := testSlice(t)
	id := mkCgroup(t, filepath.Join(slice, testAlloc+".web.scope"))

	alloc, ok, err := AllocOf(id)
	if err != nil || !ok || alloc != testAlloc {
		t.Fatalf("AllocOf(%d) = %q, %v, %v; want %s", id, alloc, ok, err, testAlloc)
	}
}

func TestACgroupWithoutAnAllocationIsNotOne(t *testing.T) {
	_, slice := testSlice(t)
	plain := mkCgroup(t, filepath.Join(slice, "plain.scope"))
	if alloc, ok, err := AllocOf(plain); err != nil || ok {
		t.Fatalf("AllocOf(plain cgroup) = %q, %v, %v; want not an allocation", alloc, ok, err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(slice, &st); err != nil {
		t.Fatal(err)
	}
	if alloc, ok, err := AllocOf(st.Ino); err != nil || ok {
		t.Fatalf("AllocOf(parent slice) = %q, %v, %v; want not an allocation", alloc, ok, err)
	}
}

func TestAnUnknownOrRemovedCgroupIsNotAnErrorButNotFound(t *testing.T) {
	root, slice := testSlice(t)
	r := NewResolver(root)
	if alloc, ok, err := r.AllocOf(1 << 62); err != nil || ok {
		t.Fatalf("AllocOf(unknown id) = %q, %v, %v; want not found", alloc, ok, err)
	}

	path := filepath.Join(slice, testAlloc+".db.scope")
	id := mkCgroup(t, path)
	if _, ok, err := r.AllocOf(id); err != nil || !ok {
		t.Fatalf("AllocOf(new cgroup) = %v, %v; want found", ok, err)
	}
	if err := syscall.Rmdir(path); err != nil {
		t.Fatal(err)
	}
	// A task that ended: the cached answer is still right for events it
	// emitted while it ran; a new walk forgets it.
	if _, _, err := r.AllocOf(1 << 61); err != nil {
		t.Fatal(err)
	}
	if alloc, ok, err := r.AllocOf(id); err != nil || ok {
		t.Fatalf("AllocOf(removed cgroup) = %q, %v, %v; want not found", alloc, ok, err)
	}
}

func TestACgroupCreatedAfterTheLastWalkIsFoundOnMiss(t *testing.T) {
	root, slice := testSlice(t)
	r := NewResolver(root)
	first := mkCgroup(t, filepath.Join(slice, testAlloc+".a.scope"))
	if _, ok, _ := r.AllocOf(first); !ok {
		t.Fatal("first cgroup not found")
	}
	other := "0b3e9a4c-2222-4c1d-8e7f-0123456789ab"
	second := mkCgroup(t, filepath.Join(slice, other+".b.scope"))
	if alloc, ok, err := r.AllocOf(second); err != nil || alloc != other {
		t.Fatalf("AllocOf(second) = %q, %v, %v; want %s", alloc, ok, err, other)
	}
}

func TestCgroupsBelowTheDepthLimitAreNotWalked(t *testing.T) {
	root, slice := testSlice(t)
	r := NewResolver(root)
	r.maxDepth = 2 // slice is at depth 1
	path := filepath.Join(slice, testAlloc+".web.scope", "deeper")
	if err := os.MkdirAll(path, 0o755); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := r.AllocOf(st.Ino); err != nil || ok {
		t.Fatalf("a cgroup at depth 3 was found with a limit of 2: %v %v", ok, err)
	}
}

func TestAllocFromPathReadsNomadLayouts(t *testing.T) {
	cases := []struct {
		path string
		want string
	}{
		{"nomad.slice/share.slice/" + testAlloc + ".web.scope", testAlloc},
		{"nomad.slice/reserve.slice/" + testAlloc + ".redis.scope", testAlloc},
		{"/nomad.slice/share.slice/" + testAlloc + ".web.scope/child", testAlloc},
		{"other/" + testAlloc + ".x", testAlloc},
		{"nomad.slice/share.slice/" + testAlloc, ""},                 // no '.' after the UUID
		{"nomad.slice/share.slice/x" + testAlloc + ".web.scope", ""}, // not at the start
		{"nomad.slice/share.slice/8d2f6c1e-5b7a-4f3e-9c0d-1a2b3c4d5e6g.web.scope", ""},
		{"nomad.slice/share.slice/8d2f6c1e_5b7a-4f3e-9c0d-1a2b3c4d5e6f.web.scope", ""},
		{"system.slice/docker-0123456789abcdef.scope", ""},
		{"", ""},
	}
	for _, tc := range cases {
		got, ok := AllocFromPath(tc.path)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("AllocFromPath(%q) = %q, %v; want %q", tc.path, got, ok, tc.want)
		}
	}
}

func TestMountPathsAreUnescaped(t *testing.T) {
	if got := unescapeMountPath(`/mnt/cgroup\040two`); got != "/mnt/cgroup two" {
		t.Fatalf("got %q", got)
	}
	if got := unescapeMountPath(`/a\b`); got != `/a\b` {
		t.Fatalf("got %q", got)
	}
}

func TestAllocOfProcessReadsTheTaskEnvironment(t *testing.T) {
	const alloc = "0b4c3a2e-1f7d-4c8e-9a6b-5d2e1f0a9b8c"
	cmd := exec.Command("sleep", "30")
	cmd.Env = []string{"NOMAD_ALLOC_ID=" + alloc}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	// Until the child has exec'd sleep, /proc shows the test's own
	// environment: ask until it has.
	deadline := time.Now().Add(5 * time.Second)
	got, ok, err := AllocOfProcess(cmd.Process.Pid)
	for err == nil && !ok && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
		got, ok, err = AllocOfProcess(cmd.Process.Pid)
	}
	if err != nil || !ok || got != alloc {
		t.Fatalf("AllocOfProcess = %q %v %v, want %s", got, ok, err, alloc)
	}
	// This test process runs in no allocation.
	if got, ok, err := AllocOfProcess(os.Getpid()); ok || err != nil {
		t.Fatalf("the test process resolved to %q %v %v", got, ok, err)
	}
	if _, ok, err := AllocOfProcess(1 << 30); ok || err != nil {
		t.Fatalf("a missing process: %v %v", ok, err)
	}
}

func TestProcessOfSocketFindsTheHolder(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	raw, err := pc.(*net.UDPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	var statErr error
	if err := raw.Control(func(fd uintptr) { statErr = syscall.Fstat(int(fd), &st) }); err != nil || statErr != nil {
		t.Fatal(err, statErr)
	}
	pid, ok, err := ProcessOfSocket(st.Ino)
	if err != nil || !ok || pid != os.Getpid() {
		t.Fatalf("holder of socket %d: %d %v %v, want this process %d", st.Ino, pid, ok, err, os.Getpid())
	}
	pc.Close()
	if _, ok, err := ProcessOfSocket(st.Ino); err != nil || ok {
		t.Fatalf("a closed socket still has a holder: %v %v", ok, err)
	}
}
