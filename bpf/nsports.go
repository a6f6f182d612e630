package bpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// NsPort is a port inside an allocation's own network namespace (a docker
// container, a Nomad bridge-mode allocation), identified by the namespace's
// inode number.
type NsPort struct {
	Netns uint32
	Port  uint16
}

func (p NsPort) String() string { return fmt.Sprintf("netns:[%d]:%d", p.Netns, p.Port) }

func (p NsPort) bpf() zeroscaleNsPort { return zeroscaleNsPort{Netns: p.Netns, Port: htons(p.Port)} }

// MapPort makes sockets on p count as activity of the service address k,
// the node address whose port mapping leads to p. Health checks through the
// mapping stay checks. A port maps for both protocols, whatever k's: TCP
// sockets count under k's TCP key, UDP datagrams read under its UDP key.
func (g *Gate) MapPort(p NsPort, k Key) error {
	if p.Netns == 0 || p.Port == 0 || !k.Addr.IsValid() || k.Port == 0 {
		return fmt.Errorf("map %s to %s: invalid port or address", p, k)
	}
	if err := g.WatchListenPort(p.Port); err != nil {
		return err
	}
	bp, bk := p.bpf(), k.bpf()
	if err := g.objs.NsPorts.Put(&bp, &bk); err != nil {
		return fmt.Errorf("map %s to %s: %w", p, k, err)
	}
	return nil
}

// UnmapPort stops counting p. Sockets counted already are uncounted as
// they close.
func (g *Gate) UnmapPort(p NsPort) error {
	bp := p.bpf()
	if err := g.objs.NsPorts.Delete(&bp); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unmap %s: %w", p, err)
	}
	return nil
}

// MappedPorts reads back every mapped port and its service address.
func (g *Gate) MappedPorts() (map[NsPort]Key, error) {
	out := make(map[NsPort]Key)
	var (
		bp zeroscaleNsPort
		bk zeroscaleGateKey
	)
	it := g.objs.NsPorts.Iterate()
	for it.Next(&bp, &bk) {
		out[NsPort{Netns: bp.Netns, Port: ntohs(bp.Port)}] = keyFromBPF(bk)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list mapped ports: %w", err)
	}
	return out, nil
}

// WatchListenPort reports listeners on port in every namespace, so that a
// service behind a port mapping is seen to listen on its mapped port. Forget
// keeps it watched.
func (g *Gate) WatchListenPort(port uint16) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.watched[port] {
		return nil
	}
	if err := g.objs.ListenPorts.Put(&port, uint8(1)); err != nil {
		return fmt.Errorf("watch listen on port %d: %w", port, err)
	}
	g.watched[port] = true
	return nil
}

// ReplayTarget says where the listener of a service behind a port mapping
// is: its namespace's id as the node's namespace knows it (see
// internal/netns), its address (unspecified for a wildcard listener) and the
// mapped port.
type ReplayTarget struct {
	NetnsID int32
	Addr    netip.Addr
	Port    uint16
	// Forward: the address forwards to where the service woke (the
	// kernel's NAT takes the SYN there); there is no listener here to wait
	// for, and the frame enters the stack at once.
	Forward bool
}

// The modes of struct replay_target.
const (
	replayLookupInNetns = 1
	replayForward       = 2
)

func (t *ReplayTarget) bpf() zeroscaleReplayTarget {
	if t == nil {
		return zeroscaleReplayTarget{}
	}
	if t.Forward {
		return zeroscaleReplayTarget{Set: replayForward}
	}
	out := zeroscaleReplayTarget{NetnsId: t.NetnsID, Set: replayLookupInNetns, Port: htons(t.Port)}
	if t.Addr.IsValid() && !t.Addr.IsUnspecified() {
		out.Addr = t.Addr.As16()
	}
	return out
}
