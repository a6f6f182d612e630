package bpf

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"unsafe"
)

// Programs of the previous version gate until Attach replaces them, so their
// shorter records must still be read, not dropped as short.
func TestEventsOfThePreviousLayoutStillDecode(t *testing.T) {
	e := zeroscaleEvent{Kind: uint32(EventWake), Ifindex: 3, TsNs: 42, Key: Key{server4, 8080}.bpf(), Sport: htons(50000)}
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
	if ev.Key != (Key{server4, 8080}) || ev.Source != netip.AddrPortFrom(client4, 50000) || ev.Ifindex != 3 || ev.CgroupID != 0 || ev.PID != 0 {
		t.Fatalf("decoded %+v", ev)
	}
	if _, ok := decodeEvent(full[:legacyEventSize-1]); ok {
		t.Fatal("a truncated record was decoded")
	}
}
