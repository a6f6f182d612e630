package bpf

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/internal/nat"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// wakeScenario parks an address, lets a client in the namespace connect, and
// starts the real server `serverDelay` after the first SYN. With replay, the
// captured SYN is re-injected once the listener exists; without, the client
// must retransmit. It returns how long the client's connect() took.
func wakeScenario(t *testing.T, addr func(*testnet.Net) netip.Addr, replay bool) time.Duration {
	t.Helper()
	n := testnet.New(t)
	g := loadGate(t, Options{ReportInterval: time.Second, CaptureSYNs: true})
	attach(t, g, n.HostIf)
	host := addr(n)
	port := freePort(t, host)
	k := Key{Addr: host, Port: port}
	if err := g.Park(k); err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(host, port).String()

	type result struct {
		took time.Duration
		err  error
	}
	done := make(chan result, 1)
	began := time.Now()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := n.Dial(ctx, "tcp", target)
		if err == nil {
			c.Close()
		}
		done <- result{time.Since(began), err}
	}()

	captured := waitCapture(t, g, k)

	// The service starts 200 ms after the first SYN, as a fast wake would.
	time.Sleep(200 * time.Millisecond)
	echoServer(t, target)
	if err := g.Open(k); err != nil {
		t.Fatal(err)
	}
	if replay {
		if g.SYNPassed(k, captured.Source) {
			t.Fatal("the client's SYN already passed; nothing to replay")
		}
		res, err := g.Replay(captured.Frame, captured.Ifindex, nil)
		for err == nil && res == ReplayNoListener {
			time.Sleep(5 * time.Millisecond)
			res, err = g.Replay(captured.Frame, captured.Ifindex, nil)
		}
		if err != nil || res != ReplayPassed {
			t.Fatalf("replay: %v %v", res, err)
		}
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("client connect: %v", r.err)
	}
	return r.took
}

func TestReplayCompletesTheOriginalConnect(t *testing.T) {
	bothModes(t, testReplayCompletesTheOriginalConnect)
}

func testReplayCompletesTheOriginalConnect(t *testing.T) {
	for _, tc := range []struct {
		name string
		addr func(*testnet.Net) netip.Addr
	}{
		{"ipv4", func(n *testnet.Net) netip.Addr { return n.HostAddr }},
		{"ipv6", func(n *testnet.Net) netip.Addr { return n.HostAddr6 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			with := wakeScenario(t, tc.addr, true)
			without := wakeScenario(t, tc.addr, false)
			t.Logf("connect() with replay %v, without %v", with, without)
			// Without replay the client waits for its 1 s SYN retransmit.
			if without < 900*time.Millisecond {
				t.Fatalf("without replay connect() took %v: the gate let the first SYN through", without)
			}
			// The server starts 200 ms after the first SYN; replay connects
			// right then (500 ms leaves room for a loaded machine).
			if with >= 500*time.Millisecond {
				t.Fatalf("with replay connect() took %v: the replayed SYN was not taken", with)
			}
		})
	}
}

func TestReplayAfterRetransmitIsRecognised(t *testing.T) {
	n := testnet.New(t)
	g := loadGate(t, Options{ReportInterval: time.Second, CaptureSYNs: true})
	attach(t, g, n.HostIf)
	port := freePort(t, n.HostAddr)
	k := Key{Addr: n.HostAddr, Port: port}
	_ = g.Park(k)
	target := netip.AddrPortFrom(n.HostAddr, port).String()

	conns := make(chan net.Conn, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := n.Dial(ctx, "tcp", target)
		if err != nil {
			t.Errorf("dial: %v", err)
		}
		conns <- c
	}()
	var captured Event
	for captured.Frame == nil {
		ev := <-g.Events()
		if ev.Is(EventCapture) {
			captured = ev
		}
	}
	echoServer(t, target)
	_ = g.Open(k)
	c := <-conns // connected by the client's own retransmit
	if c == nil {
		t.FailNow()
	}
	defer c.Close()
	if !g.SYNPassed(k, captured.Source) {
		t.Fatal("the retransmitted SYN was not marked as passed")
	}
	res, err := g.Replay(captured.Frame, captured.Ifindex, nil)
	if err != nil || res != ReplayConnected {
		t.Fatalf("replay of an already connected flow: %v %v, want %v", res, err, ReplayConnected)
	}
}

func TestReplayRefusesGarbage(t *testing.T) {
	g := loadGate(t, Options{})
	ack := syn(client4, server4, 1, 2)
	ack.flags = flagACK
	if res, err := g.Replay(ack.bytes(), 1, nil); err != nil || res != ReplayUnparseable {
		t.Fatalf("replay of an ACK: %v %v", res, err)
	}
	if _, err := g.Replay([]byte("short"), 1, nil); err == nil {
		t.Fatal("replay of 5 bytes succeeded")
	}
}

// An address whose service woke at another port forwards there (the
// kernel's NAT): its captured SYN is replayed with no listener of its own
// to wait for, and the client's original connect completes at the new port.
func TestReplayThroughAForward(t *testing.T) {
	n := testnet.NewIPv4(t)
	g := loadGate(t, Options{ReportInterval: time.Second, CaptureSYNs: true})
	attach(t, g, n.HostIf)
	parked := netip.AddrPortFrom(n.HostAddr, freePort(t, n.HostAddr))
	moved := netip.AddrPortFrom(n.HostAddr, freePort(t, n.HostAddr))
	k := KeyFrom(parked)
	if err := g.Park(k); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	began := time.Now()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := n.Dial(ctx, "tcp", parked.String())
		if err == nil {
			c.Close()
		}
		done <- err
	}()
	captured := waitCapture(t, g, k)

	echoServer(t, moved.String())
	if res, err := g.Replay(captured.Frame, captured.Ifindex, nil); err != nil || res != ReplayNoListener {
		t.Fatalf("replay at the parked address itself: %v %v, want no listener", res, err)
	}
	table, err := nat.Open(fmt.Sprintf("zs-bpf-test-%d", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = table.Delete(); table.Close() })
	if err := table.Forward(parked, moved); err != nil {
		t.Fatal(err)
	}
	if err := g.Open(k); err != nil {
		t.Fatal(err)
	}
	if res, err := g.Replay(captured.Frame, captured.Ifindex, &ReplayTarget{Forward: true}); err != nil || res != ReplayPassed {
		t.Fatalf("replay through the forward: %v %v", res, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("client connect: %v", err)
	}
	took := time.Since(began)
	// The client's own retransmit comes at 1 s: before it, only the
	// replayed SYN can have connected it.
	if took >= 900*time.Millisecond {
		t.Fatalf("connect() took %v: the replayed SYN did not go through the forward", took)
	}
	fwds, err := table.Forwards()
	if err != nil || fwds[parked].Connections != 1 {
		t.Fatalf("forwards %+v %v, want the replayed connection counted once", fwds, err)
	}
}

// waitCapture waits for the capture event of a SYN to k.
func waitCapture(t *testing.T, g *Gate, k Key) Event {
	t.Helper()
	for {
		select {
		case ev := <-g.Events():
			if ev.Is(EventCapture) && ev.Key == k {
				return ev
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no capture event for the client's SYN")
		}
	}
}
