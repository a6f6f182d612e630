package scaling

import (
	"cmp"
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// The decide half of the reconciler: pure functions from an observation to
// what must change. They read no clock and call nothing, so each safety
// invariant is a table case in decide_test.go.

// recordView is what decideRecord needs about one group.
type recordView struct {
	now    time.Time
	record consul.GroupState
	// recordLost: this node held a record that Consul no longer has (KV
	// wiped or restored); record is this node's last copy with Index 0.
	recordLost bool
	nomad      nomadView
	policy     Policy
	// known are every address the group is known to serve at; allocs the
	// allocations registered now (their instances are not a wake later).
	known  []consul.Address
	allocs []string
	// oldAllocsRunning: a passing instance of an allocation that was running
	// when the group parked is still registered.
	oldAllocsRunning bool
	// wakingHere: this node runs the wake and enforces its deadline.
	wakingHere bool
	// clientsWaiting: this node dropped SYNs for the group since the
	// record last changed; wakeTakeover is how long a wake may leave the
	// count at 0 before such a node takes it over.
	clientsWaiting bool
	wakeTakeover   time.Duration
	// settle is how long a Scale takes to show in Nomad and the catalog;
	// parkAbandon is how long a parking may last before anyone undoes it.
	settle      time.Duration
	parkAbandon time.Duration
}

// recordRepair is a corrected group record and why.
type recordRepair struct {
	next consul.GroupState
	why  string
	// takeOver: this node becomes the wake's owner and scales the group.
	takeOver bool
}

// decideRecord derives what the group's record must say from Nomad's count
// (invariant 2: a group at count 0 whose address is known is asleep and
// wakeable; invariant 3: a group with a running instance is not left parked
// beyond a bound). It returns false when the record agrees with the world,
// or when Nomad's count was not read after the record last changed (a count
// older than the record may predate the Scale of that very change).
func decideRecord(v recordView) (recordRepair, bool) {
	if !v.nomad.fresh(v.record.Since) || v.nomad.status.Stopped {
		return recordRepair{}, false
	}
	desired := v.nomad.status.Desired
	age := v.now.Sub(v.record.Since)
	cur := v.record

	asleep := func(why string) (recordRepair, bool) {
		if len(v.known) == 0 {
			return recordRepair{}, false // no address: nothing could wake it
		}
		next := cur
		next.Phase, next.Since, next.Reason = consul.PhaseAsleep, v.now, why
		if cur.Phase == consul.PhaseAwake {
			next.Epoch = cur.Epoch + 1
		}
		next.Addresses = slices.Clone(v.known)
		next.Allocs = slices.Clone(cur.Allocs)
		for _, id := range v.allocs {
			if !slices.Contains(next.Allocs, id) {
				next.Allocs = append(next.Allocs, id)
			}
		}
		sort.Strings(next.Allocs)
		next.FirstSYN = time.Time{}
		return recordRepair{next: next, why: why}, true
	}
	awake := func(why string) (recordRepair, bool) {
		next := cur
		next.Phase, next.Since, next.Reason, next.FirstSYN = consul.PhaseAwake, v.now, why, time.Time{}
		return recordRepair{next: next, why: why}, true
	}

	if v.recordLost {
		if desired == 0 {
			return asleep("record rebuilt from Nomad: count is 0")
		}
		return awake(fmt.Sprintf("record rebuilt from Nomad: count is %d", desired))
	}

	switch cur.Phase {
	case consul.PhaseAwake:
		if desired == 0 {
			return asleep("count is 0 in Nomad: asleep and wakeable")
		}
	case consul.PhaseParking:
		if age <= v.parkAbandon {
			return recordRepair{}, false
		}
		if desired == 0 {
			return asleep("parking finished by someone else: count is 0")
		}
		return awake(fmt.Sprintf("parking abandoned after %s", age.Round(time.Second)))
	case consul.PhaseAsleep:
		if desired == 0 {
			// Instances arrive one service at a time: a group found asleep
			// by its first service's placeholder must also be wakeable at
			// the addresses its other services turn up at.
			if more := missingAddresses(cur.Addresses, v.known); len(more) > 0 {
				next := cur
				next.Addresses = append(slices.Clone(cur.Addresses), more...)
				sortAddresses(next.Addresses)
				why := fmt.Sprintf("%d more addresses known while asleep", len(more))
				return recordRepair{next: next, why: why}, true
			}
			return recordRepair{}, false
		}
		if age <= v.settle {
			return recordRepair{}, false
		}
		if v.oldAllocsRunning {
			return awake("the scale-down to 0 never happened")
		}
		next := cur
		next.Phase, next.Since, next.FirstSYN = consul.PhaseWaking, v.now, time.Time{}
		next.Reason = fmt.Sprintf("count raised to %d outside zeroscale", desired)
		return recordRepair{next: next, why: next.Reason}, true
	case consul.PhaseWaking:
		if v.wakingHere {
			return recordRepair{}, false // the waker enforces its own deadline
		}
		if desired == 0 && v.clientsWaiting && age > v.wakeTakeover {
			// The node that began the wake scales at once; a count still
			// at 0 means it died (or cannot reach Nomad) before it did.
			// Clients here wait on it: take the wake over.
			next := cur
			next.Since = v.now
			next.Reason = fmt.Sprintf("wake taken over from %s: count still 0 after %s", cmp.Or(cur.By, "another node"), age.Round(time.Second))
			return recordRepair{next: next, why: next.Reason, takeOver: true}, true
		}
		if age <= v.policy.WakeTimeout+v.settle {
			return recordRepair{}, false
		}
		if desired > 0 {
			return awake("not ready within wake_timeout; gate opened so clients are served or refused, never held")
		}
		return asleep("wake abandoned: count is still 0")
	}
	return recordRepair{}, false
}

// missingAddresses are the known addresses the record does not hold.
func missingAddresses(recorded, known []consul.Address) []consul.Address {
	var out []consul.Address
	for _, k := range known {
		if !slices.ContainsFunc(recorded, func(r consul.Address) bool { return r.Addr == k.Addr }) {
			out = append(out, k)
		}
	}
	return out
}

func sortAddresses(addrs []consul.Address) {
	sort.Slice(addrs, func(i, j int) bool { return addrs[i].Addr < addrs[j].Addr })
}
