package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

const (
	ipprotoTCP = 6
	ipprotoUDP = 17
)

// Protocol is the transport a gate entry applies to. The zero value is TCP,
// so keys written before UDP existed keep their meaning.
type Protocol uint8

const (
	TCP Protocol = iota
	UDP
)

func (p Protocol) String() string {
	if p == UDP {
		return "udp"
	}
	return "tcp"
}

// ParseProtocol reads "tcp" or "udp".
func ParseProtocol(s string) (Protocol, error) {
	switch s {
	case "tcp":
		return TCP, nil
	case "udp":
		return UDP, nil
	}
	return 0, fmt.Errorf("unknown protocol %q (want \"tcp\" or \"udp\")", s)
}

func (p Protocol) ipproto() uint8 {
	if p == UDP {
		return ipprotoUDP
	}
	return ipprotoTCP
}

// State is what the gate does with packets to one service address.
type State uint32

const (
	// StateOpen passes packets and counts them.
	StateOpen State = 1
	// StateParked drops SYNs and reports them; other packets pass.
	StateParked State = 2
	// StateMoved answers SYNs with a RST: the service lives elsewhere now.
	StateMoved State = 3
)

func (s State) String() string {
	switch s {
	case StateOpen:
		return "open"
	case StateParked:
		return "parked"
	case StateMoved:
		return "moved"
	}
	return fmt.Sprintf("state(%d)", uint32(s))
}

// Key is one service address: a local address, a port and the protocol
// (TCP unless Proto says UDP).
type Key struct {
	Addr  netip.Addr
	Port  uint16
	Proto Protocol
}

// KeyFrom builds a TCP key from an address and port.
func KeyFrom(ap netip.AddrPort) Key {
	return Key{Addr: ap.Addr().Unmap().WithZone(""), Port: ap.Port()}
}

// WithProto is k for protocol p.
func (k Key) WithProto(p Protocol) Key {
	k.Proto = p
	return k
}

// AddrPort is k's address and port, without the protocol.
func (k Key) AddrPort() netip.AddrPort {
	return netip.AddrPortFrom(k.Addr, k.Port)
}

// String is "addr:port" for TCP, as before UDP existed, and
// "addr:port/udp" for UDP.
func (k Key) String() string {
	if k.Proto == UDP {
		return k.AddrPort().String() + "/udp"
	}
	return k.AddrPort().String()
}

func (k Key) bpf() zeroscaleGateKey {
	var out zeroscaleGateKey
	out.Addr = k.Addr.WithZone("").As16() // IPv4 becomes ::ffff:a.b.c.d
	out.Port = htons(k.Port)
	out.Proto = k.Proto.ipproto()
	return out
}

func keyFromBPF(k zeroscaleGateKey) Key {
	out := Key{Addr: netip.AddrFrom16(k.Addr).Unmap(), Port: ntohs(k.Port)}
	if k.Proto == ipprotoUDP {
		out.Proto = UDP
	}
	return out
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
func ntohs(v uint16) uint16 { return htons(v) }

// Park closes the gate for k: SYNs are dropped and reported. Re-parking
// resets the report stamp and the capture count.
func (g *Gate) Park(k Key) error { return g.setState(k, StateParked) }

// Open lets packets to k pass.
func (g *Gate) Open(k Key) error { return g.setState(k, StateOpen) }

// Move makes the gate answer SYNs to k with a RST.
func (g *Gate) Move(k Key) error { return g.setState(k, StateMoved) }

func (g *Gate) setState(k Key, s State) error {
	if !k.Addr.IsValid() || k.Port == 0 {
		return fmt.Errorf("set %s to %s: invalid address", k, s)
	}
	bk := k.bpf()
	// Counters are created once and never overwritten, so state changes do
	// not reset them.
	if err := g.objs.Stats.Update(&bk, make([]zeroscaleGateStats, ebpf.MustPossibleCPU()), ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("create counters for %s: %w", k, err)
	}
	if err := g.objs.Activity.Update(&bk, &zeroscaleSockActivity{}, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("create activity for %s: %w", k, err)
	}
	port := k.Port
	if err := g.objs.ListenPorts.Put(&port, uint8(1)); err != nil {
		return fmt.Errorf("watch listen on port %d: %w", k.Port, err)
	}
	if err := g.objs.Policies.Put(&bk, &zeroscaleGatePolicy{State: uint32(s)}); err != nil {
		return fmt.Errorf("set %s to %s: %w", k, s, err)
	}
	return nil
}

// Forget removes k and its counters.
func (g *Gate) Forget(k Key) error {
	bk := k.bpf()
	var errs []error
	for _, m := range []*ebpf.Map{g.objs.Policies, g.objs.Stats, g.objs.Activity} {
		if err := m.Delete(&bk); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	// After the activity entry, so that no new socket is counted for k.
	if err := g.uncountSockets(bk); err != nil {
		errs = append(errs, err)
	}
	// Stop watching the port for listeners unless another key uses it.
	keys, err := g.Keys()
	if err != nil {
		errs = append(errs, err)
	} else {
		g.mu.Lock()
		used := g.watched[k.Port]
		g.mu.Unlock()
		for other := range keys {
			used = used || other.Port == k.Port
		}
		if !used {
			port := k.Port
			if err := g.objs.ListenPorts.Delete(&port); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("forget %s: %w", k, err)
	}
	return nil
}

// uncountSockets drops the sockets counted for k. Left behind, a socket
// counted before Forget would, when it closes, be uncounted from the fresh
// entry that Park or Open creates for k later: one below zero for good.
// Keys are collected first because deleting while iterating a hash map can
// restart the iteration.
func (g *Gate) uncountSockets(bk zeroscaleGateKey) error {
	var (
		sock  uint64
		owner zeroscaleGateKey
		stale []uint64
	)
	it := g.objs.CountedSocks.Iterate()
	for it.Next(&sock, &owner) {
		if owner == bk {
			stale = append(stale, sock)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list counted sockets: %w", err)
	}
	for _, sock := range stale {
		if err := g.objs.CountedSocks.Delete(&sock); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("uncount socket: %w", err)
		}
	}
	return nil
}

// State returns the gate state of k; ok is false when k is not gated.
func (g *Gate) State(k Key) (s State, ok bool, err error) {
	var p zeroscaleGatePolicy
	bk := k.bpf()
	if err := g.objs.Policies.Lookup(&bk, &p); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return 0, false, nil
		}
		return 0, false, fmt.Errorf("read state of %s: %w", k, err)
	}
	return State(p.State), true, nil
}

// Keys lists every gated address and its state.
func (g *Gate) Keys() (map[Key]State, error) {
	out := make(map[Key]State)
	var (
		bk zeroscaleGateKey
		p  zeroscaleGatePolicy
	)
	it := g.objs.Policies.Iterate()
	for it.Next(&bk, &p) {
		out[keyFromBPF(bk)] = State(p.State)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list gated addresses: %w", err)
	}
	return out, nil
}

// Activity is what the kernel saw for one service address.
type Activity struct {
	// Socket level, health checks excluded.
	Established int64     // connections open now
	Opened      uint64    // connections accepted
	Closed      uint64    // connections ended
	Bytes       uint64    // bytes of ended connections, both directions
	LastActive  time.Time // last accept or close; zero if none
	// Health-check connections (checker processes, ignore_sources).
	Checks    uint64
	LastCheck time.Time
	// Packet level, at the gate.
	Packets     uint64
	PacketBytes uint64
	LastPacket  time.Time
	SYNsDropped uint64
	Reports     uint64
	RSTs        uint64
	Denied      uint64
	Captured    uint64
	CheckSYNs   uint64 // health-check SYNs let through while parked, never a wake
}

// Busy tells whether real traffic is flowing or happened after since.
func (a Activity) Busy(since time.Time) bool {
	return a.Established > 0 || a.LastActive.After(since)
}

// Activity reads the counters of k.
func (g *Gate) Activity(k Key) (Activity, error) {
	bk := k.bpf()
	var act zeroscaleSockActivity
	if err := g.objs.Activity.Lookup(&bk, &act); err != nil {
		return Activity{}, fmt.Errorf("read activity of %s: %w", k, err)
	}
	var perCPU []zeroscaleGateStats
	if err := g.objs.Stats.Lookup(&bk, &perCPU); err != nil {
		return Activity{}, fmt.Errorf("read counters of %s: %w", k, err)
	}
	a := Activity{
		Established: act.Established,
		Opened:      act.Opened,
		Closed:      act.Closed,
		Bytes:       act.Bytes,
		LastActive:  monoToWall(act.LastActiveNs),
		Checks:      act.Checks,
		LastCheck:   monoToWall(act.LastCheckNs),
	}
	if a.Established < 0 {
		// Only a socket counted under an earlier entry for k can do this
		// (Forget racing an accept); idle detection must not see "minus
		// one connection open".
		g.clampedReads.Add(1)
		g.logger.Debug("clamped a negative established count", "address", k.String(), "established", a.Established)
		a.Established = 0
	}
	var lastSeen uint64
	for _, s := range perCPU {
		a.Packets += s.Packets
		a.PacketBytes += s.Bytes
		a.SYNsDropped += s.SynsDropped
		a.Reports += s.Reports
		a.RSTs += s.Rsts
		a.Denied += s.Denied
		a.Captured += s.Captured
		a.CheckSYNs += s.CheckSyns
		lastSeen = max(lastSeen, s.LastSeenNs)
	}
	a.LastPacket = monoToWall(lastSeen)
	return a, nil
}

// monoToWall converts a bpf_ktime_get_ns stamp (CLOCK_MONOTONIC) to wall time.
func monoToWall(ns uint64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return time.Time{}
	}
	now := time.Now()
	return now.Add(-time.Duration(uint64(ts.Nano()) - ns))
}

// MonotonicNow is the kernel's clock for event stamps, for measuring
// latencies against Event.Mono.
func MonotonicNow() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}
