package bpf

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
)

// l4Target is what a reference parser, written apart from the C one, says
// about a frame: a pure SYN (SYN without ACK or RST) to dst, or (isDgram) a
// whole UDP datagram to dst, not a fragment, with every header inside the
// frame and the IP length. known is false for what the reference does not
// model (IPv6 extension headers).
func l4Target(b []byte) (dst netip.AddrPort, isSYN, isDgram, known bool) {
	if len(b) < 14 {
		return dst, false, false, true
	}
	off, proto := 14, binary.BigEndian.Uint16(b[12:])
	for i := 0; i < 2 && (proto == 0x8100 || proto == 0x88a8); i++ {
		if len(b) < off+4 {
			return dst, false, false, true
		}
		proto = binary.BigEndian.Uint16(b[off+2:])
		off += 4
	}
	var l4 []byte
	var addr netip.Addr
	var l4proto byte
	switch proto {
	case 0x0800:
		if len(b) < off+20 || b[off]>>4 != 4 || b[off]&0xf < 5 || (b[off+9] != 6 && b[off+9] != 17) {
			return dst, false, false, true
		}
		if binary.BigEndian.Uint16(b[off+6:])&0x3fff != 0 { // MF or an offset: a fragment
			return dst, false, false, true
		}
		l4proto = b[off+9]
		ihl, total := int(b[off]&0xf)*4, int(binary.BigEndian.Uint16(b[off+2:]))
		if total < ihl+l4min(l4proto) || off+total > len(b) {
			return dst, false, false, true
		}
		addr = netip.AddrFrom4([4]byte(b[off+16 : off+20]))
		l4 = b[off+ihl : off+total]
	case 0x86dd:
		if len(b) < off+40 || b[off]>>4 != 6 {
			return dst, false, false, true
		}
		if b[off+6] != 6 && b[off+6] != 17 {
			return dst, false, false, false // extension headers: not modelled here
		}
		l4proto = b[off+6]
		payload := int(binary.BigEndian.Uint16(b[off+4:]))
		if payload < l4min(l4proto) || off+40+payload > len(b) {
			return dst, false, false, true
		}
		addr = netip.AddrFrom16([16]byte(b[off+24 : off+40]))
		if addr.Is4In6() {
			return dst, false, false, true
		}
		l4 = b[off+40 : off+40+payload]
	default:
		return dst, false, false, true
	}
	dst = netip.AddrPortFrom(addr, binary.BigEndian.Uint16(l4[2:]))
	if l4proto == 17 {
		ulen := int(binary.BigEndian.Uint16(l4[4:]))
		return dst, false, ulen >= 8 && ulen <= len(l4), true
	}
	flags := l4[13]
	return dst, flags&(flagSYN|flagACK|flagRST) == flagSYN, false, true
}

func l4min(proto byte) int {
	if proto == 17 {
		return 8
	}
	return 20
}

// FuzzGateNeverMisreadsAFrame runs any frame through both entry points of
// the real gate: the verdict is pass, drop or RST, and the gate drops or
// answers only a pure SYN to a parked or moved address. Everything it does
// not understand passes.
func FuzzGateNeverMisreadsAFrame(f *testing.F) {
	parked4 := netip.MustParseAddrPort("10.0.0.5:8080")
	moved4 := netip.MustParseAddrPort("10.0.0.5:9090")
	parked6 := netip.MustParseAddrPort("[fd00::5]:8080")
	parkedUDP4 := netip.MustParseAddrPort("10.0.0.5:53")
	parkedUDP6 := netip.MustParseAddrPort("[fd00::5]:53")
	movedUDP4 := netip.MustParseAddrPort("10.0.0.5:5353")
	client4, client6 := netip.MustParseAddr("10.0.0.9"), netip.MustParseAddr("fd00::9")
	seeds := []frame{
		syn(client4, parked4.Addr(), 40000, parked4.Port()),
		syn(client4, moved4.Addr(), 40000, moved4.Port()),
		syn(client6, parked6.Addr(), 40000, parked6.Port()),
		syn(client4, netip.MustParseAddr("10.0.0.6"), 40000, 8080),
	}
	vlan := syn(client4, parked4.Addr(), 40001, parked4.Port())
	vlan.vlans = []uint16{7, 8}
	ack := syn(client4, parked4.Addr(), 40002, parked4.Port())
	ack.flags = flagACK | flagPSH
	frag := syn(client4, parked4.Addr(), 40003, parked4.Port())
	frag.fragField = 0x2000
	ext := syn(client6, parked6.Addr(), 40004, parked6.Port())
	ext.v6Ext = []v6ext{{proto: 0, len: 8}}
	seeds = append(seeds, vlan, ack, frag, ext)
	for _, d := range []frame{
		syn(client4, parkedUDP4.Addr(), 40005, parkedUDP4.Port()),
		syn(client6, parkedUDP6.Addr(), 40006, parkedUDP6.Port()),
		syn(client4, parked4.Addr(), 40007, parked4.Port()), // UDP to a TCP-only key
		syn(client4, movedUDP4.Addr(), 40008, movedUDP4.Port()),
	} {
		d.l4proto, d.tcpOptions, d.payload = ipprotoUDP, nil, []byte("\x12\x34\x01\x00query")
		seeds = append(seeds, d)
	}
	for _, s := range seeds {
		b := s.bytes()
		f.Add(b)
		f.Add(b[:len(b)-1]) // truncated: shorter than its IP length
		f.Add(b[:34])       // headers cut inside TCP
	}
	f.Add([]byte{})
	f.Add(make([]byte, 14))

	g := loadGate(f, Options{})
	for _, ap := range []netip.AddrPort{parked4, parked6} {
		if err := g.Park(KeyFrom(ap)); err != nil {
			f.Fatal(err)
		}
	}
	if err := g.Move(KeyFrom(moved4)); err != nil {
		f.Fatal(err)
	}
	for _, ap := range []netip.AddrPort{parkedUDP4, parkedUDP6} {
		if err := g.Park(KeyFrom(ap).WithProto(UDP)); err != nil {
			f.Fatal(err)
		}
	}
	if err := g.Move(KeyFrom(movedUDP4).WithProto(UDP)); err != nil {
		f.Fatal(err)
	}
	gated := map[netip.AddrPort]bool{parked4: true, moved4: true, parked6: true}
	// Only parked UDP addresses hold datagrams; a moved one passes them.
	gatedUDP := map[netip.AddrPort]bool{parkedUDP4: true, parkedUDP6: true}

	f.Fuzz(func(t *testing.T, data []byte) {
		dst, isSYN, isDgram, known := l4Target(data)
		for _, prog := range []*ebpf.Program{g.objs.ZsGate, g.objs.ZsGateTc} {
			ret, err := prog.Run(&ebpf.RunOptions{Data: data, DataOut: make([]byte, len(data)+512)})
			if err != nil {
				continue // the kernel's test run refuses frames it cannot build (too short)
			}
			verdict := ret
			if prog == g.objs.ZsGateTc {
				switch int32(ret) {
				case -1:
					verdict = xdpPass
				case 2:
					verdict = xdpDrop
				case 7:
					verdict = xdpTX
				default:
					t.Fatalf("tc verdict %d for % x", int32(ret), data)
				}
			}
			switch verdict {
			case xdpPass:
			case xdpDrop:
				if known && !(isSYN && gated[dst]) && !(isDgram && gatedUDP[dst]) {
					t.Fatalf("%s %s a frame that is not a pure SYN or datagram to a gated address (reference: %v syn=%v datagram=%v): % x",
						prog.String(), verdictName(verdict), dst, isSYN, isDgram, data)
				}
			case xdpTX:
				if known && !(isSYN && gated[dst]) {
					t.Fatalf("%s %s a frame that is not a pure SYN to a gated address (reference: %v syn=%v): % x",
						prog.String(), verdictName(verdict), dst, isSYN, data)
				}
			default:
				t.Fatalf("%s verdict %d for % x", prog.String(), verdict, data)
			}
		}
	})
}
