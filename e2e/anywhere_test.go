package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/nat"
)

// Wake anywhere: a group on a dynamic port wakes at another port, and the
// address a client resolved while it slept forwards there.

// anywhereGrace is the plugin's forward_grace in these tests.
const anywhereGrace = 20 * time.Second

func TestWakeAnywhereDynamicPortOnOneNode(t *testing.T) {
	t.Parallel()
	c := harness.NewCluster(t, harness.ClusterOptions{PluginConfig: fmt.Sprintf("forward_grace = %q\n", anywhereGrace)})
	c.Run(t, harness.TestdataJob(t, "dynamic", "dynamic"), map[string]string{
		"nodes": fmt.Sprintf("[%q]", c.Node), "idle_timeout": "5s"})
	c.WaitHealthy(t, "dynamic", 120*time.Second)
	old := catalogAddr(t, c.Consul.Client(t, "").Health(), "dynamic", false)
	c.WaitDesired(t, "dynamic", "web", 0, 90*time.Second)
	c.WaitPlaceholder(t, "dynamic", old.Addr(), int(old.Port()), 60*time.Second)

	// While it sleeps another job takes its port, so it must wake at a new
	// one (the scheduler might otherwise pick the same port again).
	reservePort(t, c, old)

	// A client resolved the address from the catalog while it slept.
	resolved := catalogAddr(t, c.Consul.Client(t, "").Health(), "dynamic", true)
	if resolved != old {
		t.Fatalf("the catalog shows %s while asleep, want the placeholder at %s", resolved, old)
	}
	began := time.Now()
	code, body, err := c.HTTPGet(harness.URLFor(resolved.Addr(), int(resolved.Port())), 30*time.Second)
	if err != nil || code != 200 {
		t.Fatalf("first request to the resolved address: %d %v\n%s", code, err, c.Diagnose(t))
	}
	woke := time.Now()
	t.Logf("first request through the old address answered in %v: %q", woke.Sub(began).Round(time.Millisecond), strings.TrimSpace(body))

	moved := waitCatalogMoved(t, c.Consul.Client(t, "").Health(), "dynamic", old, 30*time.Second)
	t.Logf("woke at %s (slept at %s)", moved, old)
	if code, _, err := c.HTTPGet(harness.URLFor(moved.Addr(), int(moved.Port())), 10*time.Second); err != nil || code != 200 {
		t.Fatalf("request to the new catalog address: %d %v", code, err)
	}
	// A client stays connected, so the group stays awake past the grace.
	keepAwake(t, c.Net.Dial, moved)
	table := mustNATTable(t, "zeroscale-"+filepath.Base(c.Nomad.PinPath))
	fwds, err := table.Forwards()
	if err != nil {
		t.Fatal(err)
	}
	if f, ok := fwds[old]; !ok || f.To != moved || f.Connections < 1 {
		t.Fatalf("forwards %+v, want %s → %s with a connection", fwds, old, moved)
	}

	// After forward_grace the forward is gone, and the old address refuses
	// new clients at once (they find the new one in Consul).
	waitForwardsGone(t, table, old, time.Until(woke.Add(anywhereGrace+15*time.Second)))
	t.Logf("forward gone %v after the wake (forward_grace %v)", time.Since(woke).Round(time.Second), anywhereGrace)
	waitGateEntryGone(t, c, bpf.KeyFrom(old), 5*time.Second)
	if err := refusedAt(c.Net.Dial, old); err != nil {
		t.Fatal(err)
	}
}

// keepAwake holds a connection to addr open until the test ends: an open
// connection is activity.
func keepAwake(t *testing.T, dial func(context.Context, string, string) (net.Conn, error), addr netip.AddrPort) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := dial(ctx, "tcp", addr.String())
	if err != nil {
		t.Fatalf("connect to %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
}

// catalogAddr is the address Consul gives for service: its placeholder
// (asleep) or a passing instance registered by Nomad.
func catalogAddr(t *testing.T, health *capi.Health, service string, asleep bool) netip.AddrPort {
	t.Helper()
	tag := ""
	if asleep {
		tag = "zeroscale-asleep"
	}
	entries, _, err := health.Service(service, tag, !asleep, nil)
	if err != nil {
		t.Fatalf("catalog %s: %v", service, err)
	}
	for _, e := range entries {
		if asleep || e.Service.Meta["external-source"] == "nomad" {
			return netip.AddrPortFrom(netip.MustParseAddr(e.Service.Address), uint16(e.Service.Port))
		}
	}
	t.Fatalf("no %s instance of %s in the catalog", map[bool]string{true: "placeholder", false: "passing"}[asleep], service)
	return netip.AddrPort{}
}

// waitCatalogMoved waits for a passing instance of service at an address
// other than old.
func waitCatalogMoved(t *testing.T, health *capi.Health, service string, old netip.AddrPort, timeout time.Duration) netip.AddrPort {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		entries, _, err := health.Service(service, "", true, nil)
		if err == nil {
			for _, e := range entries {
				ap := netip.AddrPortFrom(netip.MustParseAddr(e.Service.Address), uint16(e.Service.Port))
				if e.Service.Meta["external-source"] == "nomad" && ap != old {
					return ap
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no passing instance of %s other than %s within %v", service, old, timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// reservePort runs a job that holds addr's port on the node (a task that
// does not listen), so Nomad gives it to nobody else.
func reservePort(t *testing.T, c *harness.Cluster, addr netip.AddrPort) {
	t.Helper()
	job := fmt.Sprintf(`job "holder" {
  datacenters = ["*"]
  group "holder" {
    network {
      port "held" {
        static = %d
      }
    }
    task "sleep" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
        args    = ["3600"]
      }
    }
  }
}
`, addr.Port())
	path := filepath.Join(t.TempDir(), "holder.nomad.hcl")
	if err := os.WriteFile(path, []byte(job), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := c.Nomad.CLI(t, "job", "run", path); err != nil {
		t.Fatalf("run the port holder: %v\n%s", err, out)
	}
}

func mustNATTable(t *testing.T, name string) *nat.Table {
	t.Helper()
	table, err := nat.Open(name)
	if err != nil {
		t.Fatalf("open the plugin's NAT table %s: %v", name, err)
	}
	t.Cleanup(func() { table.Close() })
	return table
}

// waitForwardsGone waits until from no longer forwards.
func waitForwardsGone(t *testing.T, table *nat.Table, from netip.AddrPort, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		fwds, err := table.Forwards()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := fwds[from]; !ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still forwards to %s after %v", from, fwds[from].To, timeout)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// refusedAt checks that a connect to addr is refused at once: not held by
// a parked gate, not forwarded.
func refusedAt(dial func(context.Context, string, string) (net.Conn, error), addr netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	conn, err := dial(ctx, "tcp", addr.String())
	if err == nil {
		conn.Close()
		return fmt.Errorf("%s still accepts connections after the forward ended", addr)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("connect to %s after the forward ended: %v, want refused at once", addr, err)
	}
	return nil
}

// waitGateEntryGone waits until the node's gate holds no entry for k.
func waitGateEntryGone(t *testing.T, c *harness.Cluster, k bpf.Key, timeout time.Duration) {
	t.Helper()
	gate, err := bpf.Load(bpf.Options{PinPath: c.Nomad.PinPath})
	if err != nil {
		t.Fatal(err)
	}
	defer gate.Close()
	deadline := time.Now().Add(timeout)
	for {
		s, ok, err := gate.State(k)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the gate still holds %s (%v) %v after the forward ended", k, s, timeout)
		}
		time.Sleep(250 * time.Millisecond)
	}
}
