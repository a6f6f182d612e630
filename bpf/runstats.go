package bpf

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// RunStats is what the kernel counts of a program's runs while run-time
// statistics are on (EnableRunStats).
type RunStats struct {
	Runs    uint64
	Runtime time.Duration
}

// Since is the runs between an earlier reading and this one.
func (s RunStats) Since(earlier RunStats) RunStats {
	return RunStats{Runs: s.Runs - earlier.Runs, Runtime: s.Runtime - earlier.Runtime}
}

// PerRun is the mean time of one run.
func (s RunStats) PerRun() time.Duration {
	if s.Runs == 0 {
		return 0
	}
	return s.Runtime / time.Duration(s.Runs)
}

// EnableRunStats turns the kernel's BPF run-time statistics on, for every
// program, until the returned closer is closed. They are off by default:
// they cost two clock reads per run, which the figures then include.
func EnableRunStats() (io.Closer, error) {
	c, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
	if err != nil {
		return nil, fmt.Errorf("enable BPF run-time statistics: %w", err)
	}
	return c, nil
}

// PinnedGateRunStats sums the run statistics of the programs run by the
// gate links pinned under pinPath, by whichever process pinned them. A
// program that gates several interfaces (the tc gate on a veth and on lo)
// is counted once: its figures cover all of them.
func PinnedGateRunStats(pinPath string) (RunStats, error) {
	dir := filepath.Join(pinPath, linksDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return RunStats{}, fmt.Errorf("list pinned links: %w", err)
	}
	var total RunStats
	seen := map[ebpf.ProgramID]bool{}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), gateLinkID("")) {
			continue
		}
		id, err := linkedProgram(filepath.Join(dir, e.Name()))
		if err != nil {
			return RunStats{}, err
		}
		if seen[id] {
			continue
		}
		seen[id] = true
		s, err := programRunStats(id)
		if err != nil {
			return RunStats{}, err
		}
		total.Runs += s.Runs
		total.Runtime += s.Runtime
	}
	if len(seen) == 0 {
		return RunStats{}, fmt.Errorf("no gate link pinned under %s", dir)
	}
	return total, nil
}

func linkedProgram(path string) (ebpf.ProgramID, error) {
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return 0, fmt.Errorf("load pinned link %s: %w", path, err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return 0, fmt.Errorf("read pinned link %s: %w", path, err)
	}
	return info.Program, nil
}

func programRunStats(id ebpf.ProgramID) (RunStats, error) {
	prog, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return RunStats{}, fmt.Errorf("open program %d: %w", id, err)
	}
	defer prog.Close()
	s, err := prog.Stats()
	if err != nil {
		if errors.Is(err, ebpf.ErrNotSupported) {
			return RunStats{}, fmt.Errorf("program %d: this kernel keeps no run statistics: %w", id, err)
		}
		return RunStats{}, fmt.Errorf("read the run statistics of program %d: %w", id, err)
	}
	return RunStats{Runs: s.RunCount, Runtime: s.Runtime}, nil
}
