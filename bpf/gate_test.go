package bpf

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	hclog "github.com/hashicorp/go-hclog"
)

// These tests run the real programs in the kernel (BPF_PROG_TEST_RUN and
// real interfaces); they need root, which `make test` provides.

// Verdicts, in XDP's numbering; tc results are translated (see runGate).
const (
	xdpDrop = 1
	xdpPass = 2
	xdpTX   = 3 // the RST goes back out: XDP_TX, or a tc redirect
)

// testProgram selects the entry point runGate exercises: "xdp" or "tc".
var testProgram = "xdp"

// bothPrograms runs fn against the XDP and the tc entry points.
func bothPrograms(t *testing.T, fn func(t *testing.T)) {
	for _, prog := range []string{"xdp", "tc"} {
		t.Run(prog, func(t *testing.T) {
			testProgram = prog
			defer func() { testProgram = "xdp" }()
			fn(t)
		})
	}
}

var pinSeq atomic.Int64

func testPinPath(t testing.TB) string {
	return filepath.Join("/sys/fs/bpf", fmt.Sprintf("zs-test-%d-%d", os.Getpid(), pinSeq.Add(1)))
}

func loadGate(t testing.TB, opts Options) *Gate {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("BPF tests need root; run them through `make test`")
	}
	if opts.PinPath == "" {
		opts.PinPath = testPinPath(t)
	}
	if opts.Logger == nil {
		opts.Logger = hclog.New(&hclog.LoggerOptions{Name: "test", Level: hclog.Debug, Output: os.Stderr})
	}
	g, err := Load(opts)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	t.Cleanup(func() {
		_ = g.Close()
		if err := Uninstall(opts.PinPath); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	return g
}

func runGate(t *testing.T, g *Gate, data []byte) (uint32, []byte) {
	t.Helper()
	opts := &ebpf.RunOptions{Data: data, DataOut: make([]byte, len(data)+512)}
	prog := g.objs.ZsGate
	if testProgram == "tc" {
		prog = g.objs.ZsGateTc
	}
	ret, err := prog.Run(opts)
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	if testProgram == "tc" {
		switch int32(ret) {
		case -1: // TCX_NEXT
			ret = xdpPass
		case 2: // TC_ACT_SHOT
			ret = xdpDrop
		case 7: // TC_ACT_REDIRECT
			ret = xdpTX
		default:
			t.Fatalf("tc verdict %d", int32(ret))
		}
	}
	return ret, opts.DataOut
}

func skbTestRunAccepts(g *Gate, data []byte) bool {
	_, err := g.objs.ZsGateTc.Run(&ebpf.RunOptions{Data: data})
	return err == nil
}

func verdictName(v uint32) string {
	switch v {
	case xdpDrop:
		return "DROP"
	case xdpPass:
		return "PASS"
	case xdpTX:
		return "TX"
	}
	return fmt.Sprintf("verdict(%d)", v)
}

func expectVerdict(t *testing.T, g *Gate, name string, data []byte, want uint32) []byte {
	t.Helper()
	got, out := runGate(t, g, data)
	if got != want {
		t.Errorf("%s: verdict %s, want %s", name, verdictName(got), verdictName(want))
	}
	return out
}

// drainEvents returns the events that arrive within wait.
func drainEvents(g *Gate, wait time.Duration) []Event {
	var out []Event
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		select {
		case ev := <-g.Events():
			out = append(out, ev)
		case <-timer.C:
			return out
		}
	}
}

func counter(t *testing.T, g *Gate, name string) uint64 {
	t.Helper()
	c, err := g.Counters()
	if err != nil {
		t.Fatal(err)
	}
	v, ok := c[name]
	if !ok {
		t.Fatalf("no counter %q", name)
	}
	return v
}

var (
	server4 = netip.MustParseAddr("10.1.2.3")
	client4 = netip.MustParseAddr("192.0.2.7")
	server6 = netip.MustParseAddr("2001:db8::10")
	client6 = netip.MustParseAddr("2001:db8:1::77")
)

func TestVerdicts(t *testing.T) { bothPrograms(t, testVerdicts) }

func testVerdicts(t *testing.T) {
	g := loadGate(t, Options{ReportInterval: time.Nanosecond, CaptureSYNs: true})
	parked4 := Key{Addr: server4, Port: 8080}
	parked6 := Key{Addr: server6, Port: 8080}
	open4 := Key{Addr: server4, Port: 9090}
	moved4 := Key{Addr: server4, Port: 7070}
	moved6 := Key{Addr: server6, Port: 7070}
	for _, k := range []Key{parked4, parked6} {
		if err := g.Park(k); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.Open(open4); err != nil {
		t.Fatal(err)
	}
	for _, k := range []Key{moved4, moved6} {
		if err := g.Move(k); err != nil {
			t.Fatal(err)
		}
	}

	withFlags := func(f frame, flags uint8) frame { f.flags = flags; return f }
	synV4 := syn(client4, server4, 40000, 8080)
	synV6 := syn(client6, server6, 40000, 8080)

	cases := []struct {
		name string
		f    frame
		want uint32
	}{
		{"v4 SYN to parked", synV4, xdpDrop},
		{"v6 SYN to parked", synV6, xdpDrop},
		{"v4 SYN-ACK to parked", withFlags(synV4, flagSYN|flagACK), xdpPass},
		{"v4 ACK to parked", withFlags(synV4, flagACK), xdpPass},
		{"v4 PSH-ACK to parked", withFlags(synV4, flagPSH|flagACK), xdpPass},
		{"v4 RST to parked", withFlags(synV4, flagRST), xdpPass},
		{"v4 SYN+RST to parked", withFlags(synV4, flagSYN|flagRST), xdpPass},
		{"v4 FIN to parked", withFlags(synV4, flagFIN|flagACK), xdpPass},
		{"v6 ACK to parked", withFlags(synV6, flagACK), xdpPass},
		{"v4 SYN to open", syn(client4, server4, 40000, 9090), xdpPass},
		{"v4 SYN to unknown port", syn(client4, server4, 40000, 1234), xdpPass},
		{"v4 SYN to unknown address", syn(client4, netip.MustParseAddr("10.1.2.4"), 40000, 8080), xdpPass},
		{"v6 SYN to unknown address", syn(client6, netip.MustParseAddr("2001:db8::11"), 40000, 8080), xdpPass},
		{"v4 ACK to moved", withFlags(syn(client4, server4, 40000, 7070), flagACK), xdpPass},
	}
	for _, tc := range cases {
		expectVerdict(t, g, tc.name, tc.f.bytes(), tc.want)
	}

	t.Run("SYN with payload and no options", func(t *testing.T) {
		f := synV4
		f.tcpOptions = nil
		f.payload = []byte("fast open data")
		expectVerdict(t, g, "SYN+data", f.bytes(), xdpDrop)
	})

	t.Run("UDP and other protocols pass", func(t *testing.T) {
		udp := synV4
		udp.l4proto = 17
		expectVerdict(t, g, "v4 UDP to parked addr:port", udp.bytes(), xdpPass)
		udp6 := synV6
		udp6.l4proto = 17
		expectVerdict(t, g, "v6 UDP to parked addr:port", udp6.bytes(), xdpPass)
		icmp := synV4
		icmp.l4proto = 1
		expectVerdict(t, g, "ICMP", icmp.bytes(), xdpPass)
		arp := synV4
		arp.etherType = 0x0806
		expectVerdict(t, g, "ARP", arp.bytes(), xdpPass)
		ipx := synV4
		ipx.etherType = 0x8137
		expectVerdict(t, g, "unknown ethertype", ipx.bytes(), xdpPass)
	})

	t.Run("fragments pass", func(t *testing.T) {
		mf := synV4
		mf.fragField = 0x2000 // more fragments, offset 0
		mf.df = false
		expectVerdict(t, g, "v4 first fragment", mf.bytes(), xdpPass)
		later := synV4
		later.fragField = 185 // offset 1480 bytes
		later.df = false
		expectVerdict(t, g, "v4 later fragment", later.bytes(), xdpPass)
		frag6 := synV6
		frag6.v6Ext = []v6ext{{proto: 44, len: 8}}
		expectVerdict(t, g, "v6 fragment header", frag6.bytes(), xdpPass)
		hopThenFrag := synV6
		hopThenFrag.v6Ext = []v6ext{{proto: 0, len: 8}, {proto: 44, len: 8}}
		expectVerdict(t, g, "v6 hop-by-hop then fragment", hopThenFrag.bytes(), xdpPass)
	})

	t.Run("IP options are skipped, not misread", func(t *testing.T) {
		for _, n := range []int{4, 8, 40} {
			f := synV4
			f.ipOptions = make([]byte, n)
			f.ipOptions[0] = 1 // NOPs, then end of list
			expectVerdict(t, g, fmt.Sprintf("v4 SYN with %d option bytes", n), f.bytes(), xdpDrop)
		}
		// Options shaped like a parked port must not be read as TCP.
		f := syn(client4, server4, 40000, 9999)
		f.ipOptions = []byte{0x1f, 0x90, 0x1f, 0x90} // 8080, 8080
		expectVerdict(t, g, "v4 options that look like ports", f.bytes(), xdpPass)
	})

	t.Run("bad header lengths pass", func(t *testing.T) {
		b := synV4.bytes()
		b[14] = 0x44 // IHL 4 < 5
		expectVerdict(t, g, "v4 IHL 4", b, xdpPass)
		b = synV4.bytes()
		b[14] = 0x4f // IHL 15: options run into the TCP header and beyond
		expectVerdict(t, g, "v4 IHL 15 past the packet", b, xdpPass)
		b = synV4.bytes()
		b[14] = 0x65 // version 6 in an IPv4 ethertype
		expectVerdict(t, g, "v4 ethertype with version 6", b, xdpPass)
		b = synV4.bytes()
		b[14+20+12] = 0x40 // TCP data offset 4 < 5
		expectVerdict(t, g, "TCP doff 4", b, xdpPass)
		b = synV4.bytes()
		b[14+20+12] = 0xf0 // TCP data offset 15 beyond the segment
		expectVerdict(t, g, "TCP doff 15", b, xdpPass)
		b = synV4.bytes()
		b[14+2], b[14+3] = 0x00, 0x20 // IP total length 32 < IHL + TCP
		expectVerdict(t, g, "v4 total length too small", b, xdpPass)
		b = synV4.bytes()
		b[14+2], b[14+3] = 0x05, 0xdc // IP total length 1500 > frame
		expectVerdict(t, g, "v4 total length beyond the frame", b, xdpPass)
		b = synV6.bytes()
		b[14+4], b[14+5] = 0x05, 0xdc // payload length beyond the frame
		expectVerdict(t, g, "v6 payload length beyond the frame", b, xdpPass)
		b = synV6.bytes()
		b[14] = 0x40 // version 4 in an IPv6 ethertype
		expectVerdict(t, g, "v6 ethertype with version 4", b, xdpPass)
		// Ethernet padding after the IP packet is fine.
		padded := append(synV4.bytes(), make([]byte, 10)...)
		expectVerdict(t, g, "v4 SYN with Ethernet padding", padded, xdpDrop)
	})

	t.Run("VLAN", func(t *testing.T) {
		one := synV4
		one.vlans = []uint16{100}
		expectVerdict(t, g, "802.1Q", one.bytes(), xdpDrop)
		two := synV6
		two.vlans = []uint16{100, 200}
		two.outerQinQ = true
		expectVerdict(t, g, "QinQ v6", two.bytes(), xdpDrop)
		three := synV4
		three.vlans = []uint16{1, 2, 3}
		expectVerdict(t, g, "three tags are not understood", three.bytes(), xdpPass)
	})

	t.Run("IPv6 extension headers", func(t *testing.T) {
		f := synV6
		f.v6Ext = []v6ext{{proto: 0, len: 8}, {proto: 60, len: 16}, {proto: 43, len: 24}, {proto: 51, len: 12}}
		expectVerdict(t, g, "hop-by-hop, dest opts, routing, AH", f.bytes(), xdpDrop)
		many := synV6
		for i := 0; i < 7; i++ {
			many.v6Ext = append(many.v6Ext, v6ext{proto: 60, len: 8})
		}
		expectVerdict(t, g, "seven extension headers are not understood", many.bytes(), xdpPass)
		esp := synV6
		esp.v6Ext = []v6ext{{proto: 50, len: 8}}
		expectVerdict(t, g, "ESP is not understood", esp.bytes(), xdpPass)
		mapped := syn(client6, netip.MustParseAddr("::ffff:10.1.2.3"), 40000, 8080)
		expectVerdict(t, g, "v4-mapped destination in IPv6", mapped.bytes(), xdpPass)
	})

	t.Run("truncated at every offset", func(t *testing.T) {
		frames := map[string]frame{"v4": synV4, "v6": synV6}
		opts := synV4
		opts.ipOptions = []byte{1, 1, 1, 0}
		opts.vlans = []uint16{7}
		frames["v4 options vlan"] = opts
		ext := synV6
		ext.v6Ext = []v6ext{{proto: 0, len: 8}, {proto: 60, len: 16}}
		frames["v6 ext"] = ext
		for name, f := range frames {
			full := f.bytes()
			before := counter(t, g, "parked_syn_dropped")
			// BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet
			// header, and drivers never hand those to XDP.
			for n := 14; n < len(full); n++ {
				if testProgram == "tc" && !skbTestRunAccepts(g, full[:n]) {
					// The kernel's skb test run refuses a frame whose IP
					// header is cut; the XDP run covers those lengths.
					continue
				}
				got, _ := runGate(t, g, full[:n])
				if got != xdpPass {
					t.Errorf("%s truncated to %d/%d bytes: %s, want PASS", name, n, len(full), verdictName(got))
				}
			}
			if after := counter(t, g, "parked_syn_dropped"); after != before {
				t.Errorf("%s: truncated frames were taken for SYNs (%d drops)", name, after-before)
			}
			expectVerdict(t, g, name+" complete", full, xdpDrop)
		}
	})

	t.Run("moved answers with an exact RST", func(t *testing.T) {
		for _, f := range []frame{
			syn(client4, server4, 40001, 7070),
			syn(client6, server6, 40001, 7070),
			func() frame { f := syn(client4, server4, 40002, 7070); f.vlans = []uint16{42}; return f }(),
			func() frame {
				f := syn(client4, server4, 40003, 7070)
				f.ipOptions = []byte{1, 1, 1, 0}
				f.payload = []byte("data in the SYN")
				return f
			}(),
			func() frame {
				f := syn(client6, server6, 40004, 7070)
				f.v6Ext = []v6ext{{proto: 0, len: 8}}
				f.vlans = []uint16{1, 2}
				return f
			}(),
		} {
			got, out := runGate(t, g, f.bytes())
			if got != xdpTX {
				t.Errorf("SYN to moved %s:%d: %s, want TX", f.dst, f.dport, verdictName(got))
				continue
			}
			if want := rstFor(f); !bytes.Equal(out, want) {
				t.Errorf("RST for %s:%d vlans=%v\n got %x\nwant %x", f.dst, f.dport, f.vlans, out, want)
			}
		}
	})
}

func TestParkedSYNEventsAndRateLimit(t *testing.T) { bothPrograms(t, testParkedSYNEventsAndRateLimit) }

func testParkedSYNEventsAndRateLimit(t *testing.T) {
	g := loadGate(t, Options{ReportInterval: time.Hour, CaptureSYNs: true, MaxCapturePerKey: 3})
	k := Key{Addr: server4, Port: 8080}
	if err := g.Park(k); err != nil {
		t.Fatal(err)
	}
	drainEvents(g, 50*time.Millisecond)

	first := syn(client4, server4, 50000, 8080)
	expectVerdict(t, g, "first SYN", first.bytes(), xdpDrop)
	evs := drainEvents(g, 200*time.Millisecond)
	if len(evs) != 1 || !evs[0].Is(EventWake) || !evs[0].Is(EventCapture) {
		t.Fatalf("first SYN: events %+v, want one wake+capture", evs)
	}
	ev := evs[0]
	if ev.Key != k || ev.Source != netip.AddrPortFrom(client4, 50000) {
		t.Fatalf("event key %v source %v", ev.Key, ev.Source)
	}
	if !bytes.Equal(ev.Frame, first.bytes()) || ev.FrameLen != len(first.bytes()) {
		t.Fatalf("captured frame %x (len %d), want %x", ev.Frame, ev.FrameLen, first.bytes())
	}
	if d := time.Since(ev.Time); d < 0 || d > 5*time.Second {
		t.Fatalf("event time %v is %v from now", ev.Time, d)
	}

	// The same client retransmitting: dropped, no new report, no new capture.
	expectVerdict(t, g, "retransmit", first.bytes(), xdpDrop)
	// New clients within the interval: captured, not reported as wakes.
	for port := uint16(50001); port <= 50004; port++ {
		expectVerdict(t, g, "new client", syn(client4, server4, port, 8080).bytes(), xdpDrop)
	}
	evs = drainEvents(g, 200*time.Millisecond)
	if len(evs) != 2 {
		t.Fatalf("got %d events for 1 retransmit + 4 new clients, want 2 captures (limit 3)", len(evs))
	}
	for _, e := range evs {
		if e.Is(EventWake) || !e.Is(EventCapture) {
			t.Fatalf("event %+v, want capture only", e)
		}
	}
	a, err := g.Activity(k)
	if err != nil {
		t.Fatal(err)
	}
	if a.SYNsDropped != 6 || a.Reports != 1 || a.Captured != 3 {
		t.Fatalf("counters %+v, want 6 dropped, 1 report, 3 captured", a)
	}
	if c := counter(t, g, "syn_capture_limit"); c != 2 {
		t.Fatalf("capture limit counter %d, want 2", c)
	}

	// Re-parking starts a fresh report window.
	if err := g.Park(k); err != nil {
		t.Fatal(err)
	}
	expectVerdict(t, g, "after re-park", syn(client4, server4, 50010, 8080).bytes(), xdpDrop)
	evs = drainEvents(g, 200*time.Millisecond)
	if len(evs) != 1 || !evs[0].Is(EventWake) {
		t.Fatalf("after re-park: %+v, want a wake", evs)
	}
	// Counters survive state changes.
	if a2, _ := g.Activity(k); a2.SYNsDropped != 7 {
		t.Fatalf("dropped counter %d after re-park, want 7", a2.SYNsDropped)
	}
}

func TestWakeAllowList(t *testing.T) { bothPrograms(t, testWakeAllowList) }

func testWakeAllowList(t *testing.T) {
	g := loadGate(t, Options{ReportInterval: time.Nanosecond})
	k := Key{Addr: server4, Port: 8080}
	k6 := Key{Addr: server6, Port: 8080}
	_ = g.Park(k)
	_ = g.Park(k6)
	if err := g.SetWakeFrom([]netip.Prefix{netip.MustParsePrefix("192.0.2.0/28"), netip.MustParsePrefix("2001:db8:1::/48")}); err != nil {
		t.Fatal(err)
	}
	drainEvents(g, 20*time.Millisecond)

	expectVerdict(t, g, "allowed v4", syn(client4, server4, 1000, 8080).bytes(), xdpDrop)
	expectVerdict(t, g, "denied v4", syn(netip.MustParseAddr("192.0.2.99"), server4, 1001, 8080).bytes(), xdpDrop)
	expectVerdict(t, g, "allowed v6", syn(client6, server6, 1002, 8080).bytes(), xdpDrop)
	expectVerdict(t, g, "denied v6", syn(netip.MustParseAddr("2001:db8:2::1"), server6, 1003, 8080).bytes(), xdpDrop)
	evs := drainEvents(g, 200*time.Millisecond)
	if len(evs) != 2 {
		t.Fatalf("events %+v, want 2 (the allowed sources)", evs)
	}
	for _, e := range evs {
		if e.Source.Port() != 1000 && e.Source.Port() != 1002 {
			t.Fatalf("a denied source was reported: %v", e.Source)
		}
	}
	if c := counter(t, g, "wake_denied"); c != 2 {
		t.Fatalf("denied counter %d, want 2", c)
	}

	// An empty list lets anyone wake again.
	if err := g.SetWakeFrom(nil); err != nil {
		t.Fatal(err)
	}
	expectVerdict(t, g, "anyone", syn(netip.MustParseAddr("198.51.100.1"), server4, 1004, 8080).bytes(), xdpDrop)
	if evs := drainEvents(g, 200*time.Millisecond); len(evs) != 1 {
		t.Fatalf("after clearing the list: %d events, want 1", len(evs))
	}
}

func TestKeysStateAndForget(t *testing.T) { bothPrograms(t, testKeysStateAndForget) }

func testKeysStateAndForget(t *testing.T) {
	g := loadGate(t, Options{})
	a := Key{Addr: server4, Port: 80}
	b := Key{Addr: server6, Port: 443}
	_ = g.Park(a)
	_ = g.Open(b)
	keys, err := g.Keys()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || keys[a] != StateParked || keys[b] != StateOpen {
		t.Fatalf("keys %v", keys)
	}
	if err := g.Forget(a); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := g.State(a); ok {
		t.Fatal("forgotten key still gated")
	}
	if _, err := g.Activity(a); err == nil {
		t.Fatal("forgotten key still has activity")
	}
	expectVerdict(t, g, "SYN to forgotten key", syn(client4, server4, 1, 80).bytes(), xdpPass)
	if err := g.Park(Key{Port: 80}); err == nil {
		t.Fatal("parking an invalid address succeeded")
	}
}

func TestFixChecksums(t *testing.T) {
	for _, f := range []frame{syn(client4, server4, 1, 2), syn(client6, server6, 3, 4)} {
		good := f.bytes()
		broken := append([]byte(nil), good...)
		// What veth and lo hand to XDP: a partial TCP checksum.
		tcpOff := 14 + 20
		if f.dst.Is6() {
			tcpOff = 14 + 40
		}
		broken[tcpOff+16], broken[tcpOff+17] = 0xab, 0xcd
		if f.dst.Is4() {
			broken[14+10] = 0
		}
		fixed, err := FixChecksums(broken)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(fixed, good) {
			t.Fatalf("fixed %x\nwant  %x", fixed, good)
		}
	}
	if _, err := FixChecksums([]byte{1, 2, 3}); err == nil {
		t.Fatal("a 3-byte frame was accepted")
	}
}
