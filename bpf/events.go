package bpf

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf/ringbuf"
)

// EventKind says why the kernel reported.
type EventKind uint32

const (
	// EventWake: a SYN to a parked address (at most one per address per
	// report interval).
	EventWake EventKind = 1
	// EventCapture: the first SYN of a client connection attempt to a parked
	// address, or one of the first datagrams of a UDP flow, kept for replay.
	// A record can be both wake and capture.
	EventCapture EventKind = 2
	// EventListen: a socket started listening on a watched port.
	EventListen EventKind = 4
)

// Event is one decoded ring-buffer record.
type Event struct {
	Kind    EventKind
	Key     Key            // the service address (for listen: the listener's, maybe unspecified)
	Source  netip.AddrPort // the client, for wake and capture
	Ifindex int            // interface the SYN arrived on
	Mono    time.Duration  // kernel monotonic time of the event
	Time    time.Time      // the same, as wall time
	// Frame holds the first bytes of the dropped SYN, or the whole held
	// datagram; FrameLen is its full length (Frame is complete when they
	// are equal).
	Frame    []byte
	FrameLen int
	// CgroupID and PID name the listening process, for listen events: the
	// cgroup v2 id (the inode of its directory under the cgroup2 mount) and
	// the process id as the initial pid namespace sees it. Both are zero
	// for other kinds and for records from an earlier program version.
	CgroupID uint64
	PID      int
	// Netns is the listener's network namespace (its inode number), for
	// listen events: the node's own, or an allocation's behind a port
	// mapping.
	Netns uint32
}

// Is reports whether the event has kind k.
func (e Event) Is(k EventKind) bool { return e.Kind&k != 0 }

// DroppedEvents counts events lost because nobody read Events fast enough:
// captures, and wakes and listens only if priorityBuffer of them wait.
func (g *Gate) DroppedEvents() uint64 { return atomic.LoadUint64(&g.dropped) }

// priorityBuffer holds wake and listen events between the ring buffer's
// reader and Events: the kernel reports a wake at most once per address per
// interval and a listen per socket, so a storm does not fill it.
const priorityBuffer = 16384

// readEvents drains the ring buffer without ever waiting, so the kernel's
// buffer does not overflow while the scaler is busy: wakes and listens go to
// one queue, captures to another, and deliver hands them on, wakes and
// listens first. Under a SYN storm the captures filled a single channel and
// the listen events were lost with them, leaving woken groups shut until
// Consul caught up; a reader that waited for room instead let the kernel's
// buffer overflow, which loses any event.
func (g *Gate) readEvents() {
	defer close(g.readerDone)
	priority := make(chan Event, priorityBuffer)
	captures := make(chan Event, g.opts.EventBuffer)
	delivered := make(chan struct{})
	go func() {
		defer close(delivered)
		g.deliver(priority, captures)
	}()
	defer func() {
		close(priority)
		close(captures)
		<-delivered
	}()
	var rec ringbuf.Record
	for {
		if err := g.reader.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				return
			}
			g.logger.Warn("could not read a kernel event", "error", err)
			continue
		}
		ev, ok := decodeEvent(rec.RawSample)
		if !ok {
			g.logger.Warn("dropped a short kernel event", "bytes", len(rec.RawSample))
			continue
		}
		queue := captures // a capture alone: its client retransmits if it is lost
		if ev.Is(EventWake | EventListen) {
			queue = priority
		}
		select {
		case queue <- ev:
		default:
			atomic.AddUint64(&g.dropped, 1)
		}
	}
}

// deliver hands queued events to Events, wakes and listens before captures,
// until both queues are closed and empty (or the gate closes).
func (g *Gate) deliver(priority, captures <-chan Event) {
	defer close(g.events)
	for priority != nil || captures != nil {
		var ev Event
		var ok bool
		select {
		case ev, ok = <-priority:
			if !ok {
				priority = nil
				continue
			}
		default:
			select {
			case ev, ok = <-priority:
				if !ok {
					priority = nil
					continue
				}
			case ev, ok = <-captures:
				if !ok {
					captures = nil
					continue
				}
			}
		}
		select {
		case g.events <- ev:
		case <-g.closing:
			return
		}
	}
}

// legacyEventSize is the record size before the listener's cgroup and pid
// were appended. Programs of the previous version stay attached until the
// new ones replace them, so a wake reported in between has that size.
var legacyEventSize = int(unsafe.Offsetof(zeroscaleEvent{}.CgroupId))

func decodeEvent(raw []byte) (Event, bool) {
	var e zeroscaleEvent
	size := int(unsafe.Sizeof(e))
	if len(raw) < legacyEventSize {
		return Event{}, false
	}
	// A held datagram's record goes on past the event with the rest of its
	// frame (struct dgram_event).
	var rest []byte
	if len(raw) > size {
		rest = raw[size:]
	}
	if len(raw) < size {
		raw = append(append(make([]byte, 0, size), raw...), make([]byte, size-len(raw))...)
	}
	if _, err := binary.Decode(raw, binary.NativeEndian, &e); err != nil {
		return Event{}, false
	}
	capLen := min(int(e.CapLen), len(e.Frame))
	restLen := min(max(int(e.CapLen)-len(e.Frame), 0), len(rest))
	ev := Event{
		Kind:     EventKind(e.Kind),
		Key:      keyFromBPF(e.Key),
		Ifindex:  int(e.Ifindex),
		Mono:     time.Duration(e.TsNs),
		Time:     monoToWall(e.TsNs),
		FrameLen: int(e.FrameLen),
		CgroupID: e.CgroupId,
		PID:      int(e.Tgid),
		Netns:    e.Netns,
	}
	if EventKind(e.Kind)&(EventWake|EventCapture) != 0 {
		ev.Source = netip.AddrPortFrom(netip.AddrFrom16(e.Saddr).Unmap(), ntohs(e.Sport))
		ev.Frame = append(append(make([]byte, 0, capLen+restLen), e.Frame[:capLen]...), rest[:restLen]...)
	}
	return ev, true
}
