package testnet

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The host's stack answers every SYN of the storm (so the checksums are
// right and the SYNs arrived), and the SYN-ACKs come back into the client
// namespace (so none takes the default route out).
func TestSYNStormIsAnsweredIntoTheNamespace(t *testing.T) {
	n := NewIPv4(t)
	// The listener's backlog (somaxconn) holds every half-open connection
	// of the storm, so the stack answers each SYN, none with a cookie.
	ln, err := net.Listen("tcp", netip.AddrPortFrom(n.HostAddr, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	target := netip.MustParseAddrPort(ln.Addr().String())
	synAcks := n.listenSYNACKs(t, target)

	const total, rate = 1000, 4000
	storm := n.StartSYNStorm(t, StormOptions{Targets: []netip.AddrPort{target}, Rate: rate, Max: total, Duration: 10 * time.Second})
	r := storm.Wait()
	if r.Err != nil || r.Sent != total || r.Failed != 0 {
		t.Fatalf("storm: sent %d of %d, %d failed, error %v", r.Sent, total, r.Failed, r.Err)
	}
	if least := time.Duration(total-total/10) * time.Second / rate; r.Elapsed < least {
		t.Errorf("%d SYNs at %d/s took %s, less than %s: not paced", total, rate, r.Elapsed, least)
	}

	out, err := exec.Command("ip", "route", "get", n.StormSources().Addr().Next().String()).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "dev "+n.HostIf) {
		t.Errorf("the storm's sources are not routed into the namespace: %s %v", out, err)
	}

	// Every SYN-ACK to a storm source, once each (the stack retransmits).
	seen := map[netip.AddrPort]bool{}
	deadline := time.Now().Add(5 * time.Second)
	for len(seen) < total && time.Now().Before(deadline) {
		if to, ok := synAcks(deadline); ok {
			if !n.StormSources().Contains(to.Addr()) {
				t.Fatalf("SYN-ACK to %s, not a storm source", to)
			}
			seen[to] = true
		}
	}
	if len(seen) != total {
		t.Fatalf("the namespace saw SYN-ACKs to %d storm sources, want %d", len(seen), total)
	}
}

// A storm ends at its time bound, and at once when stopped.
func TestSYNStormStopsAtItsBounds(t *testing.T) {
	n := NewIPv4(t)
	target := netip.AddrPortFrom(n.HostAddr, 9) // discard: nothing listens
	timed := n.StartSYNStorm(t, StormOptions{Targets: []netip.AddrPort{target}, Rate: 2000, Max: 1_000_000, Duration: 300 * time.Millisecond})
	r := timed.Wait()
	if r.Err != nil || r.Sent < 500 || r.Sent > 700 || r.Elapsed > time.Second {
		t.Errorf("300 ms at 2000/s: sent %d in %s, error %v; want about 600", r.Sent, r.Elapsed, r.Err)
	}
	if rate := r.Rate(); rate < 1600 || rate > 2400 {
		t.Errorf("achieved rate %.0f/s, want about 2000/s", rate)
	}

	long := n.StartSYNStorm(t, StormOptions{Targets: []netip.AddrPort{target}, Rate: 2000, Max: 1_000_000, Duration: time.Hour})
	time.Sleep(100 * time.Millisecond)
	began := time.Now()
	r = long.Stop()
	if took := time.Since(began); took > 100*time.Millisecond || r.Sent > 400 {
		t.Errorf("stopped after %s with %d sent; want at once, about 200 sent", took, r.Sent)
	}
}

// listenSYNACKs opens a packet socket on the namespace's end of the veth;
// the function it returns waits until deadline for the next SYN-ACK from
// target and says whom it answers.
func (n *Net) listenSYNACKs(t *testing.T, target netip.AddrPort) func(deadline time.Time) (netip.AddrPort, bool) {
	t.Helper()
	var fd int
	err := n.Do(func() error {
		iface, err := net.InterfaceByName(n.PeerIf)
		if err != nil {
			return err
		}
		ethIP := int(htons(unix.ETH_P_IP))
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, ethIP); err != nil {
			return err
		}
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: iface.Index})
	})
	if err != nil {
		t.Fatalf("packet socket on %s: %v", n.PeerIf, err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	buf := make([]byte, 2048)
	return func(deadline time.Time) (netip.AddrPort, bool) {
		wait := max(time.Until(deadline), time.Millisecond)
		tv := unix.NsecToTimeval(wait.Nanoseconds())
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		for time.Now().Before(deadline) {
			// Outgoing packets (the storm's SYNs) show up too: only
			// SYN-ACKs from the target count.
			m, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				return netip.AddrPort{}, false
			}
			p := buf[:m]
			if len(p) < 40 || p[0]>>4 != 4 || p[9] != unix.IPPROTO_TCP {
				continue
			}
			tcp := p[int(p[0]&0x0f)*4:]
			if len(tcp) < 14 {
				continue
			}
			from := netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[12:16])), binary.BigEndian.Uint16(tcp[0:]))
			to := netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[16:20])), binary.BigEndian.Uint16(tcp[2:]))
			if from == target && tcp[13]&0x12 == 0x12 {
				return to, true
			}
		}
		return netip.AddrPort{}, false
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
