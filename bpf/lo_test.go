package bpf

import (
	"context"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"
)

func TestReplayOverLoopback(t *testing.T) {
	restore := saveSysctls(t, "net/ipv4/conf/lo/accept_local", "net/ipv4/conf/lo/route_localnet")
	defer restore()
	if err := PrepareLoopbackReplay(); err != nil {
		t.Fatal(err)
	}
	g := loadGate(t, Options{ReportInterval: time.Second, CaptureSYNs: true})
	if _, err := g.Attach("lo", ModeAuto); err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"127.0.0.1", "::1"} {
		addr := netip.MustParseAddr(host)
		port := freePort(t, addr)
		k := Key{Addr: addr, Port: port}
		_ = g.Park(k)
		target := netip.AddrPortFrom(addr, port).String()
		done := make(chan time.Duration, 1)
		began := time.Now()
		go func() {
			c, err := (&net.Dialer{}).DialContext(context.Background(), "tcp", target)
			if err == nil {
				c.Close()
			}
			done <- time.Since(began)
		}()
		var ev Event
		for ev.Frame == nil {
			e := <-g.Events()
			if e.Is(EventCapture) && e.Key == k {
				ev = e
			}
		}
		echoServer(t, target)
		_ = g.Open(k)
		res, err := g.Replay(ev.Frame, ev.Ifindex, nil)
		for err == nil && res == ReplayNoListener {
			res, err = g.Replay(ev.Frame, ev.Ifindex, nil)
		}
		took := <-done
		t.Logf("%s: replay %v %v, connect took %v", host, res, err, took)
		if err != nil || res != ReplayPassed {
			t.Fatalf("%s: replay %v %v", host, res, err)
		}
		if took >= 900*time.Millisecond {
			t.Fatalf("%s: connect took %v: the stack dropped the replayed SYN", host, took)
		}
	}
}

func saveSysctls(t *testing.T, names ...string) func() {
	saved := map[string][]byte{}
	for _, n := range names {
		b, err := os.ReadFile("/proc/sys/" + n)
		if err != nil {
			t.Fatal(err)
		}
		saved[n] = b
	}
	return func() {
		for n, b := range saved {
			_ = os.WriteFile("/proc/sys/"+n, b, 0o644)
		}
	}
}
