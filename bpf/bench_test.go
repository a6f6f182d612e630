package bpf

import (
	"net"
	"net/netip"
	"testing"
	"time"
)

// Per-packet cost of the gate with 10,000 gated addresses, measured in the
// kernel; `go test -bench . ./bpf/` (make bench prints the same figures).
func BenchmarkGate(b *testing.B) {
	g := loadGate(b, Options{ReportInterval: time.Hour, CaptureSYNs: true})
	for i := 0; i < 10000; i++ {
		k := Key{Addr: netip.AddrFrom4([4]byte{10, 50, byte(i >> 8), byte(i)}), Port: 8080}
		if err := g.Open(k); err != nil {
			b.Fatal(err)
		}
	}
	open := Key{Addr: netip.AddrFrom4([4]byte{10, 50, 0, 7}), Port: 8080}
	parked := Key{Addr: netip.AddrFrom4([4]byte{10, 50, 0, 9}), Port: 8080}
	if err := g.Park(parked); err != nil {
		b.Fatal(err)
	}
	data := func(dst netip.Addr, flags uint8) []byte {
		f := syn(client4, dst, 40000, 8080)
		f.flags, f.tcpOptions, f.payload = flags, nil, make([]byte, 1400)
		return f.bytes()
	}
	cases := []struct {
		name  string
		frame []byte
		want  uint32
	}{
		{"miss", data(netip.MustParseAddr("10.60.0.1"), flagACK|flagPSH), xdpPass},
		{"open", data(open.Addr, flagACK|flagPSH), xdpPass},
		{"parked-data", data(parked.Addr, flagACK|flagPSH), xdpPass},
		{"parked-syn", syn(client4, parked.Addr, 40000, 8080).bytes(), xdpDrop},
	}
	ifindex := nonLoopbackIfindex(b)
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			ret, d, err := g.MeasureGate(tc.frame, b.N, ifindex)
			if err != nil {
				b.Fatal(err)
			}
			if ret != tc.want {
				b.Fatalf("verdict %s, want %s", verdictName(ret), verdictName(tc.want))
			}
			b.ReportMetric(float64(d.Nanoseconds()), "ns/packet")
		})
	}
	b.Run("empty-program", func(b *testing.B) {
		d, err := MeasureEmptyXDP(cases[0].frame, b.N, ifindex)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(d.Nanoseconds()), "ns/packet")
	})
}

func nonLoopbackIfindex(b *testing.B) int {
	ifaces, err := net.Interfaces()
	if err != nil {
		b.Fatal(err)
	}
	for _, i := range ifaces {
		if i.Flags&net.FlagLoopback == 0 {
			return i.Index
		}
	}
	b.Fatal("no interface but lo")
	return 0
}
