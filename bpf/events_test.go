package bpf

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"
	"unsafe"
)

// Programs of the previous version gate until Attach replaces them, so their
// shorter records must still be read, not dropped as short.
func TestEventsOfThePreviousLayoutStillDecode(t *testing.T) {
	e := zeroscaleEvent{Kind: uint32(EventWake), Ifindex: 3, TsNs: 42, Key: Key{Addr: server4, Port: 8080}.bpf(), Sport: htons(50000)}
	e.Saddr = client4.As16()
	full, err := binary.Append(nil, binary.NativeEndian, &e)
	if err != nil {
		t.Fatal(err)
	}
	if len(full) != int(unsafe.Sizeof(e)) || legacyEventSize != 192 {
		t.Fatalf("record is %d bytes, legacy %d: the layout moved", len(full), legacyEventSize)
	}
	ev, ok := decodeEvent(full[:legacyEventSize])
	if !ok {
		t.Fatal("a record of the previous layout was dropped")
	}
	if ev.Key != (Key{Addr: server4, Port: 8080}) || ev.Source != netip.AddrPortFrom(client4, 50000) || ev.Ifindex != 3 || ev.CgroupID != 0 || ev.PID != 0 {
		t.Fatalf("decoded %+v", ev)
	}
	if _, ok := decodeEvent(full[:legacyEventSize-1]); ok {
		t.Fatal("a truncated record was decoded")
	}
}

// A full event channel loses captures (their clients retransmit), never a
// wake report or a listener: under a SYN storm the lost listen events left
// woken groups shut until Consul caught up.
func TestListenEventsSurviveCapturesFillingTheChannel(t *testing.T) {
	g := loadGate(t, Options{ReportInterval: time.Hour, CaptureSYNs: true, MaxCapturePerKey: 1000, EventBuffer: 4})
	k := Key{Addr: server4, Port: 8080}
	if err := g.Park(k); err != nil {
		t.Fatal(err)
	}
	drainEvents(g, 50*time.Millisecond)
	for port := uint16(50000); port < 50020; port++ {
		expectVerdict(t, g, "SYN of a new client", syn(client4, server4, port, 8080).bytes(), xdpDrop)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	if err := g.WatchListenPort(port); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the reader has met the full channel
	ln, err = net.Listen("tcp", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wakes, listens int
	for _, ev := range drainEvents(g, 500*time.Millisecond) {
		if ev.Is(EventWake) {
			wakes++
		}
		if ev.Is(EventListen) && ev.Key.Port == port {
			listens++
		}
	}
	if wakes != 1 || listens != 1 {
		t.Fatalf("%d wake and %d listen events after 20 captures into a channel of 4: want 1 and 1", wakes, listens)
	}
	if g.DroppedEvents() == 0 {
		t.Fatal("no capture was dropped: the channel never filled, the test proves nothing")
	}
}
