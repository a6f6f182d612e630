package bpf

import (
	"testing"
)

func TestLimitsAreTheKernelMapsCapacities(t *testing.T) {
	l, err := Limits()
	if err != nil {
		t.Fatal(err)
	}
	if l.WakeFrom != 4096 || l.IgnoreSources != 4096 || l.CheckerProcesses != 64 {
		t.Fatalf("limits %+v, want the max_entries of wake_from, ignore_sources and checker_comms (4096, 4096, 64)", l)
	}
}
