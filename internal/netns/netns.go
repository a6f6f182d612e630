// Package netns finds the network namespaces that Nomad allocations run in
// (a docker container's, a bridge-mode allocation's) and names them the way
// BPF socket lookups need: by the id the node's own namespace gives them.
package netns

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"

	"github.com/vishvananda/netlink"
)

// Namespace is one network namespace as the node sees it.
type Namespace struct {
	// Inode is the namespace's inode number: what the kernel's socket
	// programs report.
	Inode uint32
	// ID is the namespace's id in the node's namespace (RTM_GETNSID): what
	// a BPF socket lookup from the node takes to look inside it.
	ID int32
	// Path opens it (/proc/<pid>/ns/net of a process inside).
	Path string
}

// Self is the inode of the calling process's network namespace.
func Self() (uint32, error) { return inodeOf("/proc/self/ns/net") }

// InodeOfProcess is the inode of a process's network namespace.
func InodeOfProcess(pid int) (uint32, error) {
	return inodeOf(fmt.Sprintf("/proc/%d/ns/net", pid))
}

func inodeOf(path string) (uint32, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("read network namespace %s: %w", path, err)
	}
	return uint32(st.Ino), nil
}

// OfProcess returns the network namespace of a process, giving it an id in
// the node's namespace if it has none yet (ids are how the kernel names a
// peer namespace; assigning one changes nothing else).
func OfProcess(pid int) (Namespace, error) {
	return OfFile(fmt.Sprintf("/proc/%d/ns/net", pid))
}

// Finder finds an allocation's namespace by its processes.
type Finder struct {
	// Host is the node's namespace inode: processes there are skipped.
	Host uint32
	// AllocOf names the allocation a process belongs to.
	AllocOf func(pid int) (allocID string, ok bool, err error)
	// Proc is the procfs root ("/proc" when empty).
	Proc string
}

// ErrNotFound: no process of the allocation runs outside the node's
// namespace (host networking, or the allocation has no process yet).
var ErrNotFound = errors.New("no process of the allocation in its own network namespace")

// FindAllocation scans the processes outside the node's namespace for one of
// allocID and returns its namespace and that process.
func (f Finder) FindAllocation(allocID string) (Namespace, int, error) {
	proc := f.Proc
	if proc == "" {
		proc = "/proc"
	}
	entries, err := os.ReadDir(proc)
	if err != nil {
		return Namespace{}, 0, fmt.Errorf("list processes: %w", err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		inode, err := inodeOf(fmt.Sprintf("%s/%d/ns/net", proc, pid))
		if err != nil || inode == f.Host {
			continue // gone, a kernel thread, or on the node's namespace
		}
		alloc, ok, err := f.AllocOf(pid)
		if err != nil || !ok || alloc != allocID {
			continue
		}
		ns, err := OfProcess(pid)
		if err != nil {
			return Namespace{}, 0, err
		}
		return ns, pid, nil
	}
	return Namespace{}, 0, ErrNotFound
}

// OfFile returns the network namespace behind a file such as
// /var/run/netns/<name> or /proc/<pid>/ns/net, giving it an id in the
// node's namespace if it has none yet.
func OfFile(path string) (Namespace, error) {
	inode, err := inodeOf(path)
	if err != nil {
		return Namespace{}, err
	}
	f, err := os.Open(path)
	if err != nil {
		return Namespace{}, fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer f.Close()
	fd := int(f.Fd())
	id, err := netlink.GetNetNsIdByFd(fd)
	if err == nil && id < 0 {
		// -1 asks the kernel to pick a free id.
		if err = netlink.SetNetNsIdByFd(fd, -1); err == nil {
			id, err = netlink.GetNetNsIdByFd(fd)
		}
	}
	if err != nil {
		return Namespace{}, fmt.Errorf("name the network namespace %s: %w", path, err)
	}
	if id < 0 {
		return Namespace{}, fmt.Errorf("name the network namespace %s: the kernel gave it no id", path)
	}
	return Namespace{Inode: inode, ID: int32(id), Path: path}, nil
}
