package bpf

import (
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

func totalMemory(t *testing.T, g *Gate) (uint64, map[string]uint64) {
	t.Helper()
	m, err := g.MapMemory()
	if err != nil {
		t.Fatal(err)
	}
	var total uint64
	for _, n := range m {
		total += n
	}
	return total, m
}

// The maps keyed by gated address grow with the addresses gated, not with
// their capacity times the CPUs: a node with many CPUs and few services pays
// for the services.
func TestMapMemoryFollowsTheAddressesGated(t *testing.T) {
	g := loadGate(t, Options{ReportInterval: time.Second})
	empty, byMap := totalMemory(t, g)
	var names []string
	for name, n := range byMap {
		names = append(names, name+"="+fmtKiB(n))
	}
	slices.Sort(names)
	t.Logf("%d CPUs; no address gated: %s in all (%s)", ebpf.MustPossibleCPU(), fmtKiB(empty), strings.Join(names, " "))
	const n = 1000
	for i := range n {
		k := Key{Addr: netip.AddrFrom4([4]byte{10, 99, byte(i >> 8), byte(i)}), Port: 8080}
		if err := g.Park(k); err != nil {
			t.Fatal(err)
		}
	}
	full, byMapFull := totalMemory(t, g)
	perAddress := (full - empty) / n
	t.Logf("%d addresses gated: %s in all, %d bytes per address (stats %s → %s)", n, fmtKiB(full), perAddress,
		fmtKiB(byMap["stats"]), fmtKiB(byMapFull["stats"]))
	// An empty hash table keeps its buckets (16 bytes each); preallocated,
	// the per-CPU stats alone took 65536 × 72 bytes per CPU.
	if byMap["stats"] > 2<<20 {
		t.Errorf("the per-CPU stats map holds %s with no address gated: preallocated", fmtKiB(byMap["stats"]))
	}
	if full <= empty {
		t.Errorf("gating %d addresses took no memory (%d → %d): the accounting is not read", n, empty, full)
	}
	// Per address: a policy, an activity record and stats per CPU, with
	// the hash tables' overhead; far below a preallocated table's share.
	if limit := uint64(2048 + 256*runtime.NumCPU()); perAddress > limit {
		t.Errorf("%d bytes per gated address, want at most %d", perAddress, limit)
	}
}

func fmtKiB(n uint64) string { return fmt.Sprintf("%.1fKiB", float64(n)/1024) }
