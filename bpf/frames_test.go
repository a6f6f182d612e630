package bpf

import (
	"encoding/binary"
	"net/netip"
)

// frame describes a test packet; bytes() renders it with correct lengths
// and checksums, so tests state only what differs from a plain SYN.
type frame struct {
	srcMAC, dstMAC [6]byte
	vlans          []uint16 // 802.1Q tags, outermost first
	outerQinQ      bool     // outermost tag uses 0x88a8
	src, dst       netip.Addr
	sport, dport   uint16
	flags          uint8
	seq, ack       uint32
	window         uint16
	ttl            uint8
	ipID           uint16
	df             bool
	tos            uint8
	ipOptions      []byte // IPv4, multiple of 4 bytes
	v6Ext          []v6ext
	tcpOptions     []byte // multiple of 4 bytes
	payload        []byte
	l4proto        uint8  // defaults to TCP
	fragField      uint16 // IPv4 flags+offset bits beyond DF (MF, offset)
	etherType      uint16 // overrides the L3 ethertype
}

type v6ext struct {
	proto uint8 // the header's own type: 0 hop-by-hop, 43 routing, 60 dest opts, 44 fragment, 51 AH
	len   int   // total bytes (multiple of 8; AH multiple of 4)
}

const (
	flagFIN = 0x01
	flagSYN = 0x02
	flagRST = 0x04
	flagPSH = 0x08
	flagACK = 0x10
)

var (
	clientMAC = [6]byte{0x02, 0, 0, 0, 0, 0x02}
	serverMAC = [6]byte{0x02, 0, 0, 0, 0, 0x01}
	// SYN options as Linux sends them: MSS, SACK ok, timestamps, nop, wscale.
	linuxSYNOptions = []byte{2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7}
)

func syn(src, dst netip.Addr, sport, dport uint16) frame {
	return frame{
		srcMAC: clientMAC, dstMAC: serverMAC,
		src: src, dst: dst, sport: sport, dport: dport,
		flags: flagSYN, seq: 0x11223344, window: 64240, ttl: 64, ipID: 0x1234, df: true,
		tcpOptions: linuxSYNOptions,
	}
}

func (f frame) bytes() []byte {
	proto := f.l4proto
	if proto == 0 {
		proto = ipprotoTCP
	}
	l4 := f.l4()
	var l3 []byte
	if f.dst.Is4() {
		l3 = f.ipv4(proto, l4)
	} else {
		l3 = f.ipv6(proto, l4)
	}
	out := append([]byte{}, f.dstMAC[:]...)
	out = append(out, f.srcMAC[:]...)
	for i, tag := range f.vlans {
		tpid := uint16(0x8100)
		if i == 0 && f.outerQinQ {
			tpid = 0x88a8
		}
		out = binary.BigEndian.AppendUint16(out, tpid)
		out = binary.BigEndian.AppendUint16(out, tag)
	}
	et := f.etherType
	if et == 0 {
		et = 0x0800
		if !f.dst.Is4() {
			et = 0x86dd
		}
	}
	out = binary.BigEndian.AppendUint16(out, et)
	return append(out, l3...)
}

func (f frame) l4() []byte {
	if f.l4proto != 0 && f.l4proto != ipprotoTCP {
		udp := make([]byte, 8)
		binary.BigEndian.PutUint16(udp[0:], f.sport)
		binary.BigEndian.PutUint16(udp[2:], f.dport)
		binary.BigEndian.PutUint16(udp[4:], uint16(8+len(f.payload)))
		return append(udp, f.payload...)
	}
	hl := 20 + len(f.tcpOptions)
	tcp := make([]byte, hl, hl+len(f.payload))
	binary.BigEndian.PutUint16(tcp[0:], f.sport)
	binary.BigEndian.PutUint16(tcp[2:], f.dport)
	binary.BigEndian.PutUint32(tcp[4:], f.seq)
	binary.BigEndian.PutUint32(tcp[8:], f.ack)
	tcp[12] = byte(hl/4) << 4
	tcp[13] = f.flags
	binary.BigEndian.PutUint16(tcp[14:], f.window)
	copy(tcp[20:], f.tcpOptions)
	tcp = append(tcp, f.payload...)
	var pseudo []byte
	if f.dst.Is4() {
		pseudo = append(pseudo, f.src.AsSlice()...)
		pseudo = append(pseudo, f.dst.AsSlice()...)
		pseudo = append(pseudo, 0, ipprotoTCP)
		pseudo = binary.BigEndian.AppendUint16(pseudo, uint16(len(tcp)))
	} else {
		pseudo = append(pseudo, f.src.AsSlice()...)
		pseudo = append(pseudo, f.dst.AsSlice()...)
		pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(tcp)))
		pseudo = append(pseudo, 0, 0, 0, ipprotoTCP)
	}
	binary.BigEndian.PutUint16(tcp[16:], ^fold(sum(tcp, sum(pseudo, 0))))
	return tcp
}

func (f frame) ipv4(proto uint8, l4 []byte) []byte {
	hl := 20 + len(f.ipOptions)
	ip := make([]byte, hl)
	ip[0] = 0x40 | byte(hl/4)
	ip[1] = f.tos
	binary.BigEndian.PutUint16(ip[2:], uint16(hl+len(l4)))
	binary.BigEndian.PutUint16(ip[4:], f.ipID)
	frag := f.fragField
	if f.df {
		frag |= 0x4000
	}
	binary.BigEndian.PutUint16(ip[6:], frag)
	ip[8] = f.ttl
	ip[9] = proto
	copy(ip[12:16], f.src.AsSlice())
	copy(ip[16:20], f.dst.AsSlice())
	copy(ip[20:], f.ipOptions)
	binary.BigEndian.PutUint16(ip[10:], ^fold(sum(ip, 0)))
	return append(ip, l4...)
}

func (f frame) ipv6(proto uint8, l4 []byte) []byte {
	var ext []byte
	next := proto
	// Build extension headers back to front so each names its successor.
	for i := len(f.v6Ext) - 1; i >= 0; i-- {
		e := f.v6Ext[i]
		h := make([]byte, e.len)
		h[0] = next
		if e.proto == 51 {
			h[1] = byte(e.len/4 - 2)
		} else if e.proto != 44 {
			h[1] = byte(e.len/8 - 1)
		}
		ext = append(h, ext...)
		next = e.proto
	}
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(l4)))
	ip[6] = next
	ip[7] = f.ttl
	copy(ip[8:24], f.src.AsSlice())
	copy(ip[24:40], f.dst.AsSlice())
	ip = append(ip, ext...)
	return append(ip, l4...)
}

// rstFor is the exact frame the gate must send back for a SYN to a moved
// address.
func rstFor(s frame) []byte {
	ack := s.seq + 1 + uint32(len(s.payload))
	if s.flags&flagFIN != 0 {
		ack++
	}
	r := frame{
		srcMAC: s.dstMAC, dstMAC: s.srcMAC,
		vlans: s.vlans, outerQinQ: s.outerQinQ,
		src: s.dst, dst: s.src, sport: s.dport, dport: s.sport,
		flags: flagRST | flagACK, seq: 0, ack: ack, window: 0,
		ttl: 64, ipID: 0, df: true,
	}
	return r.bytes()
}
