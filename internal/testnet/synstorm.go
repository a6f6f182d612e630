package testnet

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// benchmarkRange is RFC 2544's range for benchmark traffic: no real host
// has these addresses, so a storm's sources cannot be mistaken for one.
var benchmarkRange = netip.MustParsePrefix("198.18.0.0/15")

// StormSources is the block of the benchmark range that this namespace's
// storms send from: a /23 per claimed subnet index, so that tests storming
// at once each have a route of their own back to their namespace.
func (n *Net) StormSources() netip.Prefix {
	base := benchmarkRange.Addr().As4()
	block := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(n.index)<<9
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(block >> 24), byte(block >> 16), byte(block >> 8), byte(block)}), 23)
}

// StormOptions bounds a SYN storm in rate, time and count.
type StormOptions struct {
	// Targets are the addresses SYNs go to, in turn. They must be IPv4
	// addresses on the veth's subnet: the test's namespace is then where
	// they end, never a router towards a real network.
	Targets []netip.AddrPort
	// Rate is SYNs per second.
	Rate int
	// Duration and Max end the storm, whichever comes first.
	Duration time.Duration
	Max      int
}

// StormResult is what a storm sent.
type StormResult struct {
	Sent    int
	Failed  int // sendto errors
	Elapsed time.Duration
	Err     error // why the storm could not start or stopped early
}

// Rate is the achieved rate in SYNs per second.
func (r StormResult) Rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Sent) / r.Elapsed.Seconds()
}

// Storm is a SYN storm running from the namespace.
type Storm struct {
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}
	sent     atomic.Int64
	result   StormResult
}

// stormTick is how often the storm sends the SYNs that are due: at 10,000
// SYNs/s a batch of 50.
const stormTick = 5 * time.Millisecond

// StartSYNStorm sends raw TCP SYNs from inside the namespace, with source
// addresses and ports spread over StormSources (each SYN its own source
// address and port), at a fixed rate until a bound is reached. The SYN-ACKs
// of whatever answers are routed back into the namespace, which drops them
// quietly (it has no such address and blackholes the block), so nothing of
// the storm leaves the test's namespaces. The test's cleanup stops the
// storm and removes the routes.
func (n *Net) StartSYNStorm(t testing.TB, opts StormOptions) *Storm {
	t.Helper()
	if opts.Rate <= 0 || opts.Duration <= 0 || opts.Max <= 0 {
		t.Fatalf("SYN storm: rate, duration and max must be bounded (got %d/s, %s, %d)", opts.Rate, opts.Duration, opts.Max)
	}
	subnet := netip.PrefixFrom(n.HostAddr, 24).Masked()
	if len(opts.Targets) == 0 {
		t.Fatal("SYN storm: no targets")
	}
	for _, ap := range opts.Targets {
		if !subnet.Contains(ap.Addr()) {
			t.Fatalf("SYN storm: target %s is not on the veth's subnet %s", ap, subnet)
		}
	}
	n.routeStormSources(t)
	var fd int
	err := n.Do(func() error {
		// IPPROTO_RAW implies IP_HDRINCL: we write the IPv4 header.
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		return err
	})
	if err != nil {
		t.Fatalf("SYN storm: raw socket in %s: %v", n.Name, err)
	}
	s := &Storm{stop: make(chan struct{}), done: make(chan struct{})}
	go s.run(fd, n.StormSources(), opts)
	t.Cleanup(func() { s.Stop() })
	return s
}

// routeStormSources sends the test namespace's traffic to StormSources
// (SYN-ACKs, replayed SYNs' answers) into the client namespace instead of
// the default route, and blackholes it there.
func (n *Net) routeStormSources(t testing.TB) {
	t.Helper()
	block := n.StormSources().String()
	steps := [][]string{
		{"ip", "route", "replace", block, "via", n.PeerAddr.String(), "dev", n.HostIf},
		// The namespace forwards like its creator (ip_forward may be on):
		// a blackhole drops without an ICMP error in return.
		{"ip", "-n", n.Name, "route", "replace", "blackhole", block},
	}
	for _, args := range steps {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	t.Cleanup(func() {
		_ = exec.Command("ip", "route", "del", block, "via", n.PeerAddr.String(), "dev", n.HostIf).Run()
		_ = exec.Command("ip", "-n", n.Name, "route", "del", "blackhole", block).Run()
	})
}

func (s *Storm) run(fd int, sources netip.Prefix, opts StormOptions) {
	defer close(s.done)
	defer unix.Close(fd)
	pkt := make([]byte, synLen)
	size := 1 << (32 - sources.Bits())
	base := binary.BigEndian.Uint32(sources.Addr().AsSlice())
	ticker := time.NewTicker(stormTick)
	defer ticker.Stop()
	began := time.Now()
	var sent, failed int
	defer func() {
		s.result.Sent, s.result.Failed, s.result.Elapsed = sent, failed, time.Since(began)
	}()
	for sent < opts.Max {
		elapsed := time.Since(began)
		if elapsed >= opts.Duration {
			return
		}
		due := min(opts.Max, int(float64(opts.Rate)*elapsed.Seconds())+1)
		for ; sent < due; sent++ {
			// Source address and port from the SYN's number: each SYN is a
			// connection attempt of its own, up to size × 64,512 SYNs.
			src := base + uint32(sent%size)
			sport := uint16(1024 + (sent/size)%64512)
			dst := opts.Targets[sent%len(opts.Targets)]
			buildSYN(pkt, src, sport, dst, uint16(sent))
			to := &unix.SockaddrInet4{Addr: dst.Addr().As4()}
			if err := unix.Sendto(fd, pkt, 0, to); err != nil {
				failed++
				if failed > 1000 && failed > sent/2 {
					s.result.Err = fmt.Errorf("sendto %s: %w", dst, err)
					return
				}
			}
		}
		s.sent.Store(int64(sent))
		select {
		case <-s.stop:
			return
		case <-ticker.C:
		}
	}
}

// Sent is how many SYNs the storm has sent so far.
func (s *Storm) Sent() int { return int(s.sent.Load()) }

// Wait waits until the storm reaches its bounds.
func (s *Storm) Wait() StormResult {
	<-s.done
	return s.result
}

// Stop ends the storm early (or not: it may be over already) and returns
// what it sent.
func (s *Storm) Stop() StormResult {
	s.stopOnce.Do(func() { close(s.stop) })
	return s.Wait()
}

// synLen is an IPv4 header and a TCP header with the MSS option, as
// clients send them.
const synLen = 20 + 24

// buildSYN writes a SYN from src:sport to dst into pkt (synLen bytes), with
// the IPv4 and TCP checksums.
func buildSYN(pkt []byte, src uint32, sport uint16, dst netip.AddrPort, id uint16) {
	clear(pkt)
	ip := pkt[:20]
	ip[0] = 0x45 // version 4, 5 words
	binary.BigEndian.PutUint16(ip[2:], synLen)
	binary.BigEndian.PutUint16(ip[4:], id)
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // don't fragment
	ip[8], ip[9] = 64, unix.IPPROTO_TCP
	binary.BigEndian.PutUint32(ip[12:], src)
	d := dst.Addr().As4()
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], checksum(0, ip))

	tcp := pkt[20:]
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], rand.Uint32()) // initial sequence number
	tcp[12] = 6 << 4                                   // 6 words: the header and the MSS option
	tcp[13] = 0x02                                     // SYN
	binary.BigEndian.PutUint16(tcp[14:], 64240)        // window
	tcp[20], tcp[21] = 2, 4                            // MSS option, 4 bytes
	binary.BigEndian.PutUint16(tcp[22:], 1460)
	// The pseudo-header: addresses, protocol, TCP length.
	var pseudo [12]byte
	copy(pseudo[0:], ip[12:20])
	pseudo[9] = unix.IPPROTO_TCP
	binary.BigEndian.PutUint16(pseudo[10:], uint16(len(tcp)))
	binary.BigEndian.PutUint16(tcp[16:], checksum(sum(0, pseudo[:]), tcp))
}

// sum adds b to the one's complement sum acc, 16 bits at a time.
func sum(acc uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		acc += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		acc += uint32(b[len(b)-1]) << 8
	}
	return acc
}

// checksum is the Internet checksum (RFC 1071) of b, continuing acc.
func checksum(acc uint32, b []byte) uint16 {
	acc = sum(acc, b)
	for acc>>16 != 0 {
		acc = acc&0xffff + acc>>16
	}
	return ^uint16(acc)
}
