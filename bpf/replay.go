package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// ReplayResult says what happened to a re-injected SYN.
type ReplayResult int

const (
	// ReplayPassed: a listener exists; the SYN entered the stack.
	ReplayPassed ReplayResult = iota + 1
	// ReplayNoListener: nothing listens yet; try again shortly.
	ReplayNoListener
	// ReplayConnected: the client's own retransmit already got through.
	ReplayConnected
	// ReplayUnparseable: the frame is not a complete TCP SYN.
	ReplayUnparseable
)

func (r ReplayResult) String() string {
	switch r {
	case ReplayPassed:
		return "passed"
	case ReplayNoListener:
		return "no-listener"
	case ReplayConnected:
		return "already-connected"
	case ReplayUnparseable:
		return "unparseable"
	}
	return fmt.Sprintf("replay(%d)", int(r))
}

// ErrReplayUnsupported means this kernel cannot inject frames (BPF_PROG_RUN
// live frames need Linux 5.18): clients fall back to their own retransmit.
var ErrReplayUnsupported = errors.New("SYN replay unsupported by this kernel")

// xdpMd mirrors struct xdp_md, the context of an XDP test run.
type xdpMd struct {
	Data           uint32
	DataEnd        uint32
	DataMeta       uint32
	IngressIfindex uint32
	RxQueueIndex   uint32
	EgressIfindex  uint32
}

// Replay re-injects a captured SYN frame as if it had just arrived on
// ifindex. Checksums are recomputed first: frames captured on veth or lo
// carry only a partial TCP checksum. via, when set, is where the listener
// sits behind a port mapping; the frame still enters at the node address and
// the stack's NAT takes it there.
func (g *Gate) Replay(frame []byte, ifindex int, via *ReplayTarget) (ReplayResult, error) {
	fixed, err := FixChecksums(frame)
	if err != nil {
		return ReplayUnparseable, err
	}
	g.replayMu.Lock()
	defer g.replayMu.Unlock()
	target := via.bpf()
	if err := g.objs.ReplayTargets.Put(uint32(0), &target); err != nil {
		return 0, fmt.Errorf("set the replay target: %w", err)
	}
	_, err = g.objs.ZsReplay.Run(&ebpf.RunOptions{
		Data:    fixed,
		Context: xdpMd{DataEnd: uint32(len(fixed)), IngressIfindex: uint32(ifindex)},
		Flags:   unix.BPF_F_TEST_XDP_LIVE_FRAMES,
		Repeat:  1,
	})
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, ebpf.ErrNotSupported) {
			return 0, fmt.Errorf("%w: %v", ErrReplayUnsupported, err)
		}
		return 0, fmt.Errorf("replay SYN on ifindex %d: %w", ifindex, err)
	}
	var result uint32
	if err := g.objs.ReplayResult.Lookup(uint32(0), &result); err != nil {
		return 0, fmt.Errorf("read replay result: %w", err)
	}
	return ReplayResult(result), nil
}

// SYNPassed tells whether a SYN of this client connection attempt went
// through the open gate after it was captured (its own retransmit). It is
// false for UDP: each held datagram is its own message.
func (g *Gate) SYNPassed(k Key, client netip.AddrPort) bool {
	if k.Proto == UDP {
		return false
	}
	fk := zeroscaleFlowKey{Dst: k.bpf(), Saddr: client.Addr().As16(), Sport: htons(client.Port())}
	var f zeroscaleSynFlow
	if err := g.objs.SynFlows.Lookup(&fk, &f); err != nil {
		return false
	}
	return f.Passed != 0
}

// FixChecksums returns a copy of an Ethernet frame carrying TCP or UDP over
// IPv4 or IPv6 with the IPv4 header and TCP or UDP checksums recomputed.
func FixChecksums(frame []byte) ([]byte, error) {
	out := append([]byte(nil), frame...)
	off := 14
	if len(out) < off {
		return nil, errors.New("frame shorter than an Ethernet header")
	}
	proto := binary.BigEndian.Uint16(out[12:14])
	for i := 0; i < 2 && (proto == 0x8100 || proto == 0x88a8); i++ {
		if len(out) < off+4 {
			return nil, errors.New("truncated VLAN header")
		}
		proto = binary.BigEndian.Uint16(out[off+2 : off+4])
		off += 4
	}
	switch proto {
	case 0x0800:
		if len(out) < off+20 {
			return nil, errors.New("truncated IPv4 header")
		}
		ip := out[off:]
		ihl := int(ip[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(ip[2:4]))
		l4 := ip[9]
		if ip[0]>>4 != 4 || ihl < 20 || len(ip) < total || (l4 != ipprotoTCP && l4 != ipprotoUDP) || total < ihl+l4HeaderLen(l4) {
			return nil, errors.New("not a complete IPv4 TCP or UDP packet")
		}
		ip[10], ip[11] = 0, 0
		binary.BigEndian.PutUint16(ip[10:12], ^fold(sum(ip[:ihl], 0)))
		seg := ip[ihl:total]
		var pseudo [12]byte
		copy(pseudo[0:4], ip[12:16])
		copy(pseudo[4:8], ip[16:20])
		pseudo[9] = l4
		binary.BigEndian.PutUint16(pseudo[10:12], uint16(len(seg)))
		if err := setL4Checksum(l4, seg, sum(pseudo[:], 0)); err != nil {
			return nil, err
		}
	case 0x86dd:
		if len(out) < off+40 {
			return nil, errors.New("truncated IPv6 header")
		}
		ip := out[off:]
		plen := int(binary.BigEndian.Uint16(ip[4:6]))
		if len(ip) < 40+plen {
			return nil, errors.New("not a complete IPv6 packet")
		}
		next, hdr := ip[6], 40
		for i := 0; i < 6 && next != ipprotoTCP && next != ipprotoUDP; i++ {
			if hdr+8 > 40+plen {
				return nil, errors.New("truncated IPv6 extension header")
			}
			var n int
			switch next {
			case 0, 43, 60:
				n = (int(ip[hdr+1]) + 1) * 8
			case 51:
				n = (int(ip[hdr+1]) + 2) * 4
			default:
				return nil, errors.New("not a TCP or UDP packet")
			}
			next = ip[hdr]
			hdr += n
		}
		if (next != ipprotoTCP && next != ipprotoUDP) || hdr+l4HeaderLen(next) > 40+plen {
			return nil, errors.New("not a complete IPv6 TCP or UDP packet")
		}
		seg := ip[hdr : 40+plen]
		var pseudo [40]byte
		copy(pseudo[0:16], ip[8:24])
		copy(pseudo[16:32], ip[24:40])
		binary.BigEndian.PutUint32(pseudo[32:36], uint32(len(seg)))
		pseudo[39] = next
		if err := setL4Checksum(next, seg, sum(pseudo[:], 0)); err != nil {
			return nil, err
		}
	default:
		return nil, errors.New("not an IP packet")
	}
	return out, nil
}

func l4HeaderLen(proto uint8) int {
	if proto == ipprotoUDP {
		return 8
	}
	return 20
}

// setL4Checksum writes the TCP or UDP checksum of seg, the segment from its
// transport header to the end of the IP payload.
func setL4Checksum(proto uint8, seg []byte, pseudo uint32) error {
	if proto == ipprotoTCP {
		seg[16], seg[17] = 0, 0
		binary.BigEndian.PutUint16(seg[16:18], ^fold(sum(seg, pseudo)))
		return nil
	}
	// The UDP length must match the segment: a datagram is replayed whole.
	if int(binary.BigEndian.Uint16(seg[4:6])) != len(seg) {
		return errors.New("UDP length does not match the IP payload")
	}
	seg[6], seg[7] = 0, 0
	c := ^fold(sum(seg, pseudo))
	if c == 0 {
		c = 0xffff // RFC 768: a computed zero is sent as all ones
	}
	binary.BigEndian.PutUint16(seg[6:8], c)
	return nil
}

// sum adds b as big-endian 16-bit words (RFC 1071).
func sum(b []byte, acc uint32) uint32 {
	for len(b) >= 2 {
		acc += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint32(b[0]) << 8
	}
	return acc
}

func fold(s uint32) uint16 {
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// PrepareLoopbackReplay lets the stack take SYNs replayed on lo: a frame
// injected there has a local source (127.0.0.1 or the node's own address),
// which input routing drops as martian unless lo accepts local sources and
// routes 127/8. Only lo's settings change.
func PrepareLoopbackReplay() error {
	for _, name := range []string{"accept_local", "route_localnet"} {
		path := "/proc/sys/net/ipv4/conf/lo/" + name
		if err := os.WriteFile(path, []byte("1"), 0o644); err != nil {
			return fmt.Errorf("set %s: %w", path, err)
		}
	}
	return nil
}

// BoundSocket is what Bound found at a service address.
type BoundSocket struct {
	// Found: a TCP listener, or a UDP socket that would receive a datagram
	// sent to the address.
	Found bool
	// CgroupID is the cgroup v2 id of the process that made the socket.
	CgroupID uint64
	// Inode is the socket's inode number, as /proc/<pid>/fd names it.
	Inode uint64
}

// Bound asks the kernel whether a socket of k's protocol would take a new
// client at k: a TCP listener or a bound UDP socket, in the node's namespace
// or, with via, at the mapped port in an allocation's. A UDP socket's bind
// has no state change for zs_sock_state to report, so a waking UDP service is
// asked, not heard.
func (g *Gate) Bound(k Key, via *ReplayTarget) (BoundSocket, error) {
	if g.udpErr != nil {
		return BoundSocket{}, g.udpErr
	}
	q := zeroscaleProbeQuery{Addr: k.Addr.As16(), Port: htons(k.Port), Proto: k.Proto.ipproto()}
	if via != nil && !via.Forward {
		q.InNetns, q.NetnsId, q.Port = 1, via.NetnsID, htons(via.Port)
		if via.Addr.IsValid() && !via.Addr.IsUnspecified() {
			q.Addr = via.Addr.As16()
		}
	}
	g.probeMu.Lock()
	defer g.probeMu.Unlock()
	if err := g.objs.ProbeQueries.Put(uint32(0), &q); err != nil {
		return BoundSocket{}, fmt.Errorf("ask for a socket at %s: %w", k, err)
	}
	// The packet is only the program's context; nothing is sent.
	if _, err := g.objs.ZsProbe.Run(&ebpf.RunOptions{Data: make([]byte, 64), Repeat: 1}); err != nil {
		return BoundSocket{}, fmt.Errorf("look for a socket at %s: %w", k, err)
	}
	var a zeroscaleProbeAnswer
	if err := g.objs.ProbeAnswers.Lookup(uint32(0), &a); err != nil {
		return BoundSocket{}, fmt.Errorf("read the socket lookup for %s: %w", k, err)
	}
	found := a.Found != 0
	if found && k.Proto == TCP && a.State != 10 {
		found = false // a connection, not a listener
	}
	return BoundSocket{Found: found, CgroupID: a.CgroupId, Inode: a.Inode}, nil
}
