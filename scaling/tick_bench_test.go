package scaling

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// BenchmarkTickWithManyGroups times one reconciler pass over 1,000 groups
// settled asleep (go test -run '^$' -bench TickWithManyGroups ./scaling/).
func BenchmarkTickWithManyGroups(b *testing.B) {
	nomad := newFakeNomad()
	for i := range 1000 {
		id := GroupID{"default", fmt.Sprintf("job-%d", i), "web"}
		nomad.policies[fmt.Sprintf("p%d", i)] = zeroscalePolicy(fmt.Sprintf("p%d", i), id, 10, defaultBlock())
		nomad.specs[id] = GroupSpec{Services: []ServiceSpec{{Name: fmt.Sprintf("svc-%d", i), PortLabel: "http", StaticPort: 20000 + i, Provider: "consul"}}, Pinned: true}
		nomad.status[id] = ScaleStatus{}
	}
	e := newEnv(b, newFakeKV(), nomad, "node-1", []string{"10.0.0.5"})
	e.agent.OnLeader(true)
	e.agent.OnPolicies(nomad.stubs())
	var stubs []JobStub
	for i := range 1000 {
		id := GroupID{"default", fmt.Sprintf("job-%d", i), "web"}
		stubs = append(stubs, JobStub{Namespace: id.Namespace, ID: id.Job, ModifyIndex: 3})
		ap := netip.AddrPortFrom(netip.MustParseAddr("10.0.0.5"), uint16(20000+i))
		e.agent.OnInstances(fmt.Sprintf("svc-%d", i), []consul.Instance{{Service: fmt.Sprintf("svc-%d", i), Address: ap.Addr(), Port: ap.Port(),
			Node: "node-1", Asleep: true, Passing: true, Meta: map[string]string{consul.MetaNamespace: id.Namespace, consul.MetaJob: id.Job, consul.MetaGroup: id.Group}}})
	}
	e.agent.OnJobs(stubs)
	for range 10 {
		e.tick(time.Second)
	}
	e.tick(2 * time.Minute)
	if n := len(e.agent.Services()); n != 0 {
		b.Fatalf("%d services still followed", n)
	}
	b.ResetTimer()
	for range b.N {
		e.tick(500 * time.Millisecond)
	}
}
