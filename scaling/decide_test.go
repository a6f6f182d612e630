package scaling

import (
	"slices"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

func TestDecideRecordTable(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	addr := []consul.Address{{Service: "web", Addr: svcAddr, Node: "node-1"}}
	otherAddr := consul.Address{Service: "admin", Addr: "10.0.0.5:8081", Node: "node-1"}
	policy := Policy{WakeTimeout: 2 * time.Minute}
	count := func(n int, readAgo time.Duration) nomadView {
		return nomadView{status: ScaleStatus{Desired: n}, at: now.Add(-readAgo)}
	}
	rec := func(p consul.Phase, ago time.Duration) consul.GroupState {
		return consul.GroupState{Phase: p, Since: now.Add(-ago), Index: 3, Addresses: addr}
	}
	cases := []struct {
		name      string
		v         recordView
		wantPhase consul.Phase // "" means no change
	}{
		{"awake at its count: nothing to do",
			recordView{record: rec(consul.PhaseAwake, time.Hour), nomad: count(1, time.Second), known: addr}, ""},
		{"awake at count 0 with a known address: asleep and wakeable",
			recordView{record: rec(consul.PhaseAwake, time.Hour), nomad: count(0, time.Second), known: addr}, consul.PhaseAsleep},
		{"awake at count 0 with no address: nothing could wake it, leave it",
			recordView{record: rec(consul.PhaseAwake, time.Hour), nomad: count(0, time.Second)}, ""},
		{"a count read before the record changed is not evidence",
			recordView{record: rec(consul.PhaseAwake, time.Second), nomad: count(0, time.Minute), known: addr}, ""},
		{"a failed count read is not evidence",
			recordView{record: rec(consul.PhaseAwake, time.Hour), nomad: nomadView{at: now, err: ErrGroupGone}, known: addr}, ""},
		{"a stopped job is not repaired",
			recordView{record: rec(consul.PhaseAwake, time.Hour), nomad: nomadView{status: ScaleStatus{Stopped: true}, at: now}, known: addr}, ""},
		{"parking within its time: wait",
			recordView{record: rec(consul.PhaseParking, 10*time.Second), nomad: count(1, time.Second), parkAbandon: 30 * time.Second}, ""},
		{"parking beyond its time with the count up: undone",
			recordView{record: rec(consul.PhaseParking, time.Minute), nomad: count(1, time.Second), parkAbandon: 30 * time.Second}, consul.PhaseAwake},
		{"parking beyond its time with the count at 0: asleep",
			recordView{record: rec(consul.PhaseParking, time.Minute), nomad: count(0, time.Second), known: addr, parkAbandon: 30 * time.Second}, consul.PhaseAsleep},
		{"asleep at count 0: nothing to do",
			recordView{record: rec(consul.PhaseAsleep, time.Hour), nomad: count(0, time.Second), known: addr}, ""},
		{"asleep at count 0 with an address known since it slept: recorded, so it wakes there too",
			recordView{record: rec(consul.PhaseAsleep, time.Hour), nomad: count(0, time.Second), known: append(slices.Clone(addr), otherAddr)}, consul.PhaseAsleep},
		{"asleep with the count up, within settle: wait for the scale-down to land",
			recordView{record: rec(consul.PhaseAsleep, 5*time.Second), nomad: count(1, time.Second), settle: 15 * time.Second}, ""},
		{"asleep with the parked allocation still running: the scale-down never happened",
			recordView{record: rec(consul.PhaseAsleep, time.Minute), nomad: count(1, time.Second), oldAllocsRunning: true, settle: 15 * time.Second}, consul.PhaseAwake},
		{"asleep with the count raised by someone else: waking, readiness opens",
			recordView{record: rec(consul.PhaseAsleep, time.Minute), nomad: count(1, time.Second), settle: 15 * time.Second}, consul.PhaseWaking},
		{"waking run by this node: its own deadline applies",
			recordView{record: rec(consul.PhaseWaking, time.Hour), nomad: count(1, time.Second), wakingHere: true, policy: policy}, ""},
		{"waking by a vanished node, count up, past wake_timeout: open",
			recordView{record: rec(consul.PhaseWaking, 3*time.Minute), nomad: count(1, time.Second), policy: policy, settle: 15 * time.Second}, consul.PhaseAwake},
		{"waking by a vanished node, count 0, past wake_timeout: asleep again",
			recordView{record: rec(consul.PhaseWaking, 3*time.Minute), nomad: count(0, time.Second), known: addr, policy: policy, settle: 15 * time.Second}, consul.PhaseAsleep},
		{"waking by another node, count 0, clients held here past the takeover: taken over",
			recordView{record: rec(consul.PhaseWaking, 5*time.Second), nomad: count(0, time.Second), policy: policy,
				clientsWaiting: true, wakeTakeover: 3 * time.Second}, consul.PhaseWaking},
		{"waking by another node, count 0, no client held here: its node's business",
			recordView{record: rec(consul.PhaseWaking, 5*time.Second), nomad: count(0, time.Second), policy: policy,
				wakeTakeover: 3 * time.Second}, ""},
		{"waking by another node, count 0, within the takeover time: wait for its Scale",
			recordView{record: rec(consul.PhaseWaking, 2*time.Second), nomad: count(0, time.Second), policy: policy,
				clientsWaiting: true, wakeTakeover: 3 * time.Second}, ""},
		{"waking by another node, count up: not taken over",
			recordView{record: rec(consul.PhaseWaking, 5*time.Second), nomad: count(1, time.Second), policy: policy,
				clientsWaiting: true, wakeTakeover: 3 * time.Second}, ""},
		{"record lost, count 0: rebuilt asleep",
			recordView{record: rec(consul.PhaseAsleep, time.Hour), recordLost: true, nomad: count(0, time.Second), known: addr}, consul.PhaseAsleep},
		{"record lost, count up: rebuilt awake",
			recordView{record: rec(consul.PhaseAsleep, time.Hour), recordLost: true, nomad: count(1, time.Second), known: addr}, consul.PhaseAwake},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.v.now = now
			r, ok := decideRecord(tc.v)
			switch {
			case tc.wantPhase == "" && ok:
				t.Fatalf("changed the record to %s (%s), want no change", r.next.Phase, r.why)
			case tc.wantPhase != "" && !ok:
				t.Fatalf("no change, want %s", tc.wantPhase)
			case ok && r.next.Phase != tc.wantPhase:
				t.Fatalf("phase %s (%s), want %s", r.next.Phase, r.why, tc.wantPhase)
			}
			if ok && r.next.Phase == consul.PhaseAsleep && len(r.next.Addresses) < len(tc.v.known) {
				t.Fatalf("asleep at %v, known at %v: an address nothing could wake it at", r.next.Addresses, tc.v.known)
			}
			if ok && !tc.v.recordLost && tc.v.record.Phase == consul.PhaseAsleep && r.next.Phase == consul.PhaseAsleep && !r.next.Since.Equal(tc.v.record.Since) {
				t.Fatal("adding addresses to a sleeping record restarted its timers")
			}
		})
	}
}
