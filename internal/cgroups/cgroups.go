// Package cgroups maps a cgroup v2 id, as the kernel reports it with
// bpf_get_current_cgroup_id, to the Nomad allocation whose task runs in that
// cgroup. On cgroup v2 the id is the inode number of the cgroup's directory,
// so finding it is a walk of the cgroup2 mount; results are cached because
// the walk reads every cgroup directory on the node.
package cgroups

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
)

const (
	// DefaultMaxDepth bounds the walk: Nomad puts tasks at depth 3
	// (nomad.slice/share.slice/<alloc>.<task>.scope); deeper cgroups are
	// ones a task made for itself.
	DefaultMaxDepth = 5
	// maxGone bounds the remembered ids of cgroups that no longer exist.
	maxGone = 1024
)

// Resolver finds the allocation of a cgroup id under one cgroup2 mount. It
// walks again only on a miss, so a cgroup removed since the last walk still
// resolves to its allocation until then: right for the events its process
// emitted while it lived. Methods are safe for concurrent use.
type Resolver struct {
	root     string
	maxDepth int

	mu sync.Mutex
	// allocs holds, for every cgroup the last walk saw, its allocation
	// ID or "" when its path names none. It is rebuilt on each walk, so
	// removed cgroups drop out.
	allocs map[uint64]string
	// gone holds ids a walk did not find. Cgroup ids are never reused,
	// so a cgroup missing once stays missing: asking again must not
	// walk again.
	gone map[uint64]struct{}
}

// NewResolver resolves ids under root, which must be a cgroup2 mount.
func NewResolver(root string) *Resolver {
	return &Resolver{
		root:     root,
		maxDepth: DefaultMaxDepth,
		allocs:   make(map[uint64]string),
		gone:     make(map[uint64]struct{}),
	}
}

var (
	defaultOnce     sync.Once
	defaultResolver *Resolver
	defaultErr      error
)

// AllocOf returns the Nomad allocation whose task runs in the cgroup with
// id cgroupID, looked up under the node's cgroup2 mount. ok is false when
// the cgroup is gone or its path names no allocation; err is for a node
// where the lookup cannot work at all (no cgroup2 mount, unreadable).
func AllocOf(cgroupID uint64) (allocID string, ok bool, err error) {
	defaultOnce.Do(func() {
		var root string
		root, defaultErr = Root()
		if defaultErr == nil {
			defaultResolver = NewResolver(root)
		}
	})
	if defaultErr != nil {
		return "", false, defaultErr
	}
	return defaultResolver.AllocOf(cgroupID)
}

// AllocOf is the package-level AllocOf under r's root.
func (r *Resolver) AllocOf(cgroupID uint64) (allocID string, ok bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if alloc, seen := r.allocs[cgroupID]; seen {
		return alloc, alloc != "", nil
	}
	if _, gone := r.gone[cgroupID]; gone {
		return "", false, nil
	}
	// A miss is a cgroup created after the last walk (a task that just
	// started) or one already removed: only a fresh walk tells which.
	allocs, err := r.walk()
	if err != nil {
		return "", false, err
	}
	r.allocs = allocs
	alloc, seen := allocs[cgroupID]
	if !seen {
		if len(r.gone) >= maxGone {
			clear(r.gone)
		}
		r.gone[cgroupID] = struct{}{}
	}
	return alloc, alloc != "", nil
}

// walk maps the inode of every cgroup directory down to maxDepth to the
// allocation its path names. It stays on the root's filesystem: on a hybrid
// layout the v1 hierarchies are mounted beside the v2 one, and their inode
// numbers are another space that would alias v2 ids.
func (r *Resolver) walk() (map[uint64]string, error) {
	var rootStat syscall.Stat_t
	if err := syscall.Stat(r.root, &rootStat); err != nil {
		return nil, fmt.Errorf("stat cgroup root %s: %w", r.root, err)
	}
	out := make(map[uint64]string, len(r.allocs))
	err := filepath.WalkDir(r.root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			// A cgroup removed while we walk is not an error: it is gone.
			if path != r.root && errors.Is(err, fs.ErrNotExist) {
				return fs.SkipDir
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(r.root, path)
		depth := 0
		if rel != "." {
			depth = strings.Count(rel, string(filepath.Separator)) + 1
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(path, &st); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return fs.SkipDir
			}
			return fmt.Errorf("stat %s: %w", path, err)
		}
		if st.Dev != rootStat.Dev {
			return fs.SkipDir
		}
		alloc, _ := AllocFromPath(rel)
		out[st.Ino] = alloc
		if depth >= r.maxDepth {
			return fs.SkipDir
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("walk cgroups under %s: %w", r.root, err)
	}
	return out, nil
}

// AllocFromPath extracts a Nomad allocation ID from a cgroup path: Nomad on
// cgroup v2 runs a task in nomad.slice/{share,reserve}.slice/<alloc>.<task>.scope,
// so any path element that starts with a UUID and a '.' names it. The
// outermost such element wins: Nomad made it, deeper ones the task did.
func AllocFromPath(path string) (string, bool) {
	for _, elem := range strings.Split(filepath.ToSlash(path), "/") {
		if len(elem) > 36 && elem[36] == '.' && isUUID(elem[:36]) {
			return elem[:36], true
		}
	}
	return "", false
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
				return false
			}
		}
	}
	return true
}

// Root finds the node's cgroup2 mount: /sys/fs/cgroup on a unified layout,
// /sys/fs/cgroup/unified on a hybrid one (v1 controllers beside it).
func Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// "id parent maj:min root mountpoint options [optional...] - fstype source superoptions"
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, field := range fields {
			if field == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(fields) || fields[sep+1] != "cgroup2" {
			continue
		}
		mounts = append(mounts, unescapeMountPath(fields[4]))
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read mounts: %w", err)
	}
	if len(mounts) == 0 {
		return "", errors.New("find cgroup2 mount: none in /proc/self/mountinfo (cgroup v1 only?)")
	}
	for _, preferred := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		for _, m := range mounts {
			if m == preferred {
				return m, nil
			}
		}
	}
	return mounts[0], nil
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			v := 0
			valid := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					valid = false
					break
				}
				v = v*8 + int(c-'0')
			}
			if valid {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// AllocOfProcess returns the Nomad allocation a process runs in, from
// /proc/<pid>/cgroup (every hierarchy, so cgroup v1 nodes work too: there
// Nomad places tasks at /nomad/<alloc>.<task> in the v1 controllers, which a
// v2 cgroup id cannot name), then from the task environment Nomad sets
// (NOMAD_ALLOC_ID), which also covers container drivers.
func AllocOfProcess(pid int) (allocID string, ok bool, err error) {
	if pid <= 0 {
		return "", false, nil
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		if os.IsNotExist(err) || errors.Is(err, syscall.ESRCH) {
			return "", false, nil // the process is gone
		}
		return "", false, fmt.Errorf("read cgroups of process %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		// hierarchy-ID:controllers:path
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if alloc, ok := AllocFromPath(parts[2]); ok {
			return alloc, true, nil
		}
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return "", false, nil
	}
	for _, kv := range strings.Split(string(env), "\x00") {
		if v, found := strings.CutPrefix(kv, "NOMAD_ALLOC_ID="); found && isUUID(v) {
			return v, true, nil
		}
	}
	return "", false, nil
}
