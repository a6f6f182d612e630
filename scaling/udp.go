package scaling

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Datagrams: UDP readiness and the protocols a policy leaves ungated.

const (
	// bindPollEvery paces the kernel lookups for a waking group's UDP
	// socket; bindPollFor bounds one round, after which the next pass
	// starts another with fresh targets (an allocation's namespace may be
	// known by then).
	bindPollEvery = 5 * time.Millisecond
	bindPollFor   = time.Second
	// protocolCheckEvery paces the lookups for sockets of ungated
	// protocols at an awake group's addresses.
	protocolCheckEvery = 15 * time.Second
)

// bindProbe is one address a waking group's UDP socket is looked for at.
type bindProbe struct {
	key   bpf.Key
	via   *bpf.ReplayTarget
	netns uint32 // the allocation's namespace behind a port mapping; 0: the node's
	port  uint16 // where the socket binds: the mapped port behind a mapping
}

// watchBinds looks for the UDP socket of a waking group off the loop. A
// bind is no state change that zs_sock_state could report, as a TCP listen
// is, so the kernel is asked every few milliseconds while the group wakes;
// a socket found is handled as a listen event (the same ownership rule).
func (a *Agent) watchBinds(g *group) {
	if g.bindWatch || g.policy == nil || !slices.Contains(g.protocols(), bpf.UDP) ||
		g.policy.Ready != ReadyListen && !g.unchecked() ||
		g.state.Phase != consul.PhaseWaking && !g.holding() {
		return
	}
	var probes []bindProbe
	for k := range g.keys() {
		if k.Proto != bpf.UDP || !a.isLocal(k.Addr) || g.readyKeys[k] {
			continue
		}
		p := bindProbe{key: k, port: k.Port}
		if via, ns := a.replayTarget(g, k); via != nil && !via.Forward {
			p.via, p.netns, p.port = via, ns.Inode, via.Port
		}
		probes = append(probes, p)
	}
	if len(probes) == 0 {
		return
	}
	g.bindWatch = true
	id, host := g.id, uint32(0)
	if a.cfg.Namespaces != nil {
		host = a.cfg.Namespaces.Host()
	}
	a.offLoop(func() func() {
		found := a.pollBinds(probes, host)
		return func() {
			if g := a.groups[id]; g != nil {
				g.bindWatch = false
			}
			for _, ev := range found {
				a.onListen(ev)
			}
		}
	})
}

// pollBinds asks the kernel for each probe's socket until one is found or
// bindPollFor passes, and returns listen events for the sockets found.
func (a *Agent) pollBinds(probes []bindProbe, host uint32) []bpf.Event {
	deadline := time.Now().Add(bindPollFor)
	for {
		var found []bpf.Event
		for _, p := range probes {
			b, err := a.cfg.Gate.Bound(p.key, p.via)
			if err != nil {
				a.logger.Debug("cannot look for a UDP socket", "address", p.key.String(), "error", err)
				return nil
			}
			if !b.Found {
				continue
			}
			ev := a.boundListen(b)
			ev.Key, ev.Netns, ev.Time, ev.Mono = p.key, host, time.Now(), bpf.MonotonicNow()
			if p.via != nil {
				ev.Key.Port, ev.Netns = p.port, p.netns
				if p.via.Addr.IsValid() {
					ev.Key.Addr = p.via.Addr
				}
			}
			found = append(found, ev)
		}
		if len(found) > 0 || !a.running.Load() || time.Now().After(deadline) {
			return found
		}
		time.Sleep(bindPollEvery)
	}
}

// checkProtocols looks, now and then (and with force, now), for a socket
// of a protocol g's policy does not gate at its live addresses on this node:
// a UDP socket under TCP-only gating, or a TCP listener under UDP-only. Such
// a service would be parked while its clients use it, and its clients could
// not wake it, so it is reported and the group is not parked. Only a socket
// of one of g's own allocations counts: docker's userland proxy binds both
// protocols of every mapped port on the node, whatever the service speaks.
func (a *Agent) checkProtocols(g *group, now time.Time, force bool) {
	if g.policy == nil || g.state.Phase != consul.PhaseAwake || !force && now.Sub(g.ungatedAt) < protocolCheckEvery {
		return
	}
	g.ungated = ""
	gated := g.protocols()
	checked := false
	for k := range g.liveKeys() {
		if !a.isLocal(k.Addr) || k.Proto != gated[0] {
			continue // each address once
		}
		for _, p := range []bpf.Protocol{bpf.TCP, bpf.UDP} {
			if slices.Contains(gated, p) {
				continue
			}
			other := k.WithProto(p)
			via, _ := a.replayTarget(g, other)
			if via != nil && via.Forward || via == nil && g.spec.OwnNetwork {
				continue // its own namespace is not known yet: the node's holds only the mapping's
			}
			checked = true
			b, err := a.cfg.Gate.Bound(other, via)
			if err != nil {
				a.logger.Debug("cannot look for a socket of an ungated protocol", "address", other.String(), "error", err)
				continue
			}
			if b.Found && a.socketOfGroup(g, b) {
				g.ungated = other.AddrPort().String() + "/" + p.String()
				g.ungatedAt = now
				return
			}
		}
	}
	if checked {
		// Until an address could be looked at (no instance yet, its
		// process not started), every pass looks again.
		g.ungatedAt = now
	}
}

// socketOfGroup tells whether a socket found by a kernel lookup belongs to
// one of g's allocations (when allocations can be told at all).
func (a *Agent) socketOfGroup(g *group, b bpf.BoundSocket) bool {
	if a.cfg.ListenerAlloc == nil {
		return true
	}
	alloc, ok := a.cfg.ListenerAlloc(a.boundListen(b))
	if !ok {
		return false
	}
	id, err := a.allocGroup(alloc)
	return err == nil && id == g.id
}

// boundListen is a socket found by Bound as a listen event, for
// ListenerAlloc: its cgroup, and the process holding it, which names the
// allocation where the cgroup cannot (tasks in cgroup v1 controllers).
func (a *Agent) boundListen(b bpf.BoundSocket) bpf.Event {
	ev := bpf.Event{Kind: bpf.EventListen, CgroupID: b.CgroupID}
	if a.cfg.SocketOwner != nil && b.Inode != 0 {
		ev.PID, _ = a.cfg.SocketOwner(b.Inode)
	}
	return ev
}

// ungatedSocket names a socket of an ungated protocol that any node saw at
// g's addresses, "" when none did.
func ungatedSocket(reports map[string]consul.ActivityReport) string {
	var found []string
	for _, r := range reports {
		if r.Ungated != "" {
			found = append(found, r.Ungated)
		}
	}
	slices.Sort(found)
	if len(found) == 0 {
		return ""
	}
	return found[0]
}

// protocolsMessage explains the error event of a group with an ungated
// socket: which field to change, and how.
func protocolsMessage(g *group, socket string) string {
	var gated []string
	for _, p := range g.protocols() {
		gated = append(gated, fmt.Sprintf("%q", p.String()))
	}
	want := `"udp"`
	if !strings.HasSuffix(socket, "/udp") {
		want = `"tcp"`
	}
	return fmt.Sprintf("zeroscale: not parking: a socket listens at %s, but scaling.policy.zeroscale.protocols is [%s]; "+
		"add %s so that its clients count as activity and wake it", socket, strings.Join(gated, ", "), want)
}

// packetWord names what a client's first packet to k was, for reasons and
// scaling events.
func packetWord(k bpf.Key) string {
	if k.Proto == bpf.UDP {
		return "datagram"
	}
	return "connect"
}
