package bpf

import (
	"net/netip"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// A storm at a parked address runs the pinned gate once per SYN at least
// (ARP and the like run it too), and the kernel times those runs.
func TestPinnedGateRunStatsCountTheStorm(t *testing.T) {
	n := testnet.NewIPv4(t)
	pin := testPinPath(t)
	g := loadGate(t, Options{PinPath: pin, ReportInterval: time.Hour})
	if _, err := g.Attach(n.HostIf, ModeAuto); err != nil {
		t.Fatal(err)
	}
	parked := netip.AddrPortFrom(n.HostAddr, 8080)
	if err := g.Park(KeyFrom(parked)); err != nil {
		t.Fatal(err)
	}
	stats, err := EnableRunStats()
	if err != nil {
		t.Fatal(err)
	}
	defer stats.Close()
	before, err := PinnedGateRunStats(pin)
	if err != nil {
		t.Fatal(err)
	}
	dropsBefore := counter(t, g, "parked_syn_dropped")

	const syns = 2000
	r := n.StartSYNStorm(t, testnet.StormOptions{Targets: []netip.AddrPort{parked}, Rate: 10000, Max: syns, Duration: 5 * time.Second}).Wait()
	if r.Err != nil || r.Sent != syns {
		t.Fatalf("storm: sent %d of %d, error %v", r.Sent, syns, r.Err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for counter(t, g, "parked_syn_dropped")-dropsBefore < syns && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if dropped := counter(t, g, "parked_syn_dropped") - dropsBefore; dropped != syns {
		t.Fatalf("the gate dropped %d SYNs of %d", dropped, syns)
	}
	after, err := PinnedGateRunStats(pin)
	if err != nil {
		t.Fatal(err)
	}
	d := after.Since(before)
	if d.Runs < syns || d.Runtime <= 0 {
		t.Fatalf("the kernel counted %d runs in %s for %d SYNs", d.Runs, d.Runtime, syns)
	}
	if per := d.PerRun(); per <= 0 || per > 100*time.Microsecond {
		t.Errorf("%s per run: not a gate's per-packet cost", per)
	}
	t.Logf("%d runs, %s per run", d.Runs, d.PerRun())
}

// With no gate pinned there is nothing to read, and it says so.
func TestPinnedGateRunStatsWithoutAGate(t *testing.T) {
	pin := testPinPath(t)
	loadGate(t, Options{PinPath: pin})
	if _, err := PinnedGateRunStats(pin); err == nil {
		t.Fatal("no error with no gate attached")
	}
}
