package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	capi "github.com/hashicorp/consul/api"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// The fault suite: one test per fault, on real agents and the real kernel.
// Each ends with the same check: a connect to the service's address is
// served or refused at once, never held (a closed gate with no owner hangs).

const (
	// faultBound is how long the system may take to converge after a fault.
	faultBound = 30 * time.Second
	// refusedFast: a refusal slower than this was a held SYN, not a refusal.
	refusedFast = 2 * time.Second
)

// connectOutcome dials addr once from the client namespace: "served",
// "refused" (fast) or "held" (no answer within the dial timeout).
func connectOutcome(c *harness.Cluster, addr string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	began := time.Now()
	conn, err := c.Net.Dial(ctx, "tcp", addr)
	if err == nil {
		conn.Close()
		return "served"
	}
	if errors.Is(err, syscall.ECONNREFUSED) && time.Since(began) < refusedFast {
		return "refused"
	}
	return "held"
}

// neverHeld asserts that within faultBound a connect is served or refused
// at once, and says which.
func neverHeld(t *testing.T, c *harness.Cluster, addr string) string {
	t.Helper()
	deadline := time.Now().Add(faultBound)
	for {
		out := connectOutcome(c, addr)
		if out != "held" {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("a connect to %s is still held %s after the fault: a black-holed service\n%s", addr, faultBound, c.Diagnose(t))
		}
	}
}

// waitNoneRunning waits until no allocation of the job runs (Nomad's
// scale status counts an allocation told to stop as not running while its
// task may still be serving).
func waitNoneRunning(t *testing.T, c *harness.Cluster) {
	t.Helper()
	deadline := time.Now().Add(faultBound)
	for {
		allocs, _, err := c.API.Jobs().Allocations("http", false, nil)
		running := 0
		for _, a := range allocs {
			if a.ClientStatus == "running" {
				running++
			}
		}
		if err == nil && running == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("allocations still running %s after the scale to 0", faultBound)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// parkPinned parks key in the node's pinned gate from outside the plugin,
// as an earlier plugin process would have left it.
func parkPinned(t *testing.T, c *harness.Cluster, key bpf.Key) {
	t.Helper()
	gate, err := bpf.Load(bpf.Options{PinPath: c.Nomad.PinPath})
	if err != nil {
		t.Fatal(err)
	}
	defer gate.Close()
	if err := gate.Park(key); err != nil {
		t.Fatal(err)
	}
}

// waitPluginRestarted waits until Nomad runs a plugin process other than pid.
func waitPluginRestarted(t *testing.T, c *harness.Cluster, pid int) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for p := pluginPIDOrZero(c); p == 0 || p == pid; p = pluginPIDOrZero(c) {
		if time.Now().After(deadline) {
			t.Fatal("Nomad did not restart the plugin")
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// eventuallyServed asserts that connects are served or refused fast, and
// that within faultBound one is served.
func eventuallyServed(t *testing.T, c *harness.Cluster, port int) {
	t.Helper()
	addr := netip.AddrPortFrom(c.Net.HostAddr, uint16(port)).String()
	deadline := time.Now().Add(faultBound)
	for neverHeld(t, c, addr) != "served" {
		if time.Now().After(deadline) {
			t.Fatalf("no connect to %s was served within %s: a group at count 0 that a connect cannot wake\n%s", addr, faultBound, c.Diagnose(t))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// getServed asserts that a GET from the client namespace is answered by the
// real service.
func getServed(t *testing.T, c *harness.Cluster, port int) {
	t.Helper()
	code, body, err := c.HTTPGet(c.URL(port), faultBound)
	if err != nil || code != 200 || !strings.Contains(body, "hello from a service that was asleep") {
		t.Fatalf("GET: %d %q %v\n%s", code, body, err, c.Diagnose(t))
	}
}

func nomadCLI(t *testing.T, c *harness.Cluster, args ...string) {
	t.Helper()
	if out, err := c.Nomad.CLI(t, args...); err != nil {
		t.Fatalf("nomad %v: %v\n%s", args, err, out)
	}
}

// operatorScale runs `nomad job scale` as an operator would, waiting out
// the job's running deployment (Nomad refuses scaling during one).
func operatorScale(t *testing.T, c *harness.Cluster, count int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := c.Nomad.CLI(t, "job", "scale", "-detach", "http", "http", fmt.Sprint(count))
		if err == nil {
			return
		}
		if !strings.Contains(out, "active deployment") || time.Now().After(deadline) {
			t.Fatalf("nomad job scale: %v\n%s", err, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func TestFaultOperatorScalesToZeroWhileAwakeThenAConnectWakesIt(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "http.nomad.hcl", "http", "1h")
	operatorScale(t, c, 0)
	c.WaitDesired(t, "http", "http", 0, faultBound)
	waitNoneRunning(t, c)
	// A connect in the moment between the task's listener closing and the
	// gate parking is refused (fast); any connect after that wakes it.
	eventuallyServed(t, c, port)
	getServed(t, c, port)
	if n := harness.CountScaleTo(c.ScaleEvents(t, "http", "http"), 1); n != 1 {
		t.Fatalf("%d scale-ups, want the one wake", n)
	}
}

func TestFaultKVWipedWhileAsleepThenAConnectWakesIt(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "http.nomad.hcl", "http", "4s")
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	if _, err := c.Consul.Client(t, "").KV().DeleteTree("zeroscale/", nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // the watches see the wipe
	getServed(t, c, port)
	// The record is rebuilt from Nomad and the catalog.
	deadline := time.Now().Add(faultBound)
	for {
		pair, _, err := c.Consul.Client(t, "").KV().Get("zeroscale/groups/default/http/http", nil)
		if err == nil && pair != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the group's record was not rebuilt")
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func TestFaultOperatorScalesUpWhileAsleepAndTheGateOpens(t *testing.T) {
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", harness.FreePorts(t, 1)[0])
	c := harness.NewCluster(t, harness.ClusterOptions{PluginConfig: fmt.Sprintf("metrics_address = %q\n", metricsAddr)})
	port := c.RunExample(t, "http.nomad.hcl", "http", "4s")
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	if v := harness.Metric(t, metricsAddr, "zeroscale_parked_addresses"); v < 1 {
		t.Fatalf("parked addresses %v while asleep", v)
	}
	operatorScale(t, c, 1)
	c.WaitHealthy(t, "http", 60*time.Second)
	deadline := time.Now().Add(faultBound)
	for harness.Metric(t, metricsAddr, "zeroscale_parked_addresses") != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the gate is still parked %s after an operator's scale-up", faultBound)
		}
		time.Sleep(250 * time.Millisecond)
	}
	getServed(t, c, port)
}

func TestFaultJobStopOfASleepingJobRefusesFastAndLeavesNothing(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	addr := func(port int) string { return netip.AddrPortFrom(c.Net.HostAddr, uint16(port)).String() }
	consulAPI := c.Consul.Client(t, "")
	placeholders := func() int {
		entries, _, err := consulAPI.Health().Service("http", "zeroscale-asleep", false, nil)
		if err != nil {
			t.Fatal(err)
		}
		return len(entries)
	}
	for _, purge := range []bool{false, true} {
		port := c.RunExample(t, "http.nomad.hcl", "http", "4s")
		c.WaitDesired(t, "http", "http", 0, 60*time.Second)
		if placeholders() != 1 {
			t.Fatal("no placeholder while asleep")
		}
		args := []string{"job", "stop", "-detach"}
		if purge {
			args = append(args, "-purge")
		}
		nomadCLI(t, c, append(args, "http")...)
		// The operator's intent wins: refused at once, not woken.
		deadline := time.Now().Add(faultBound)
		for {
			out := neverHeld(t, c, addr(port))
			if out == "refused" && placeholders() == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("purge=%v: connect %s, %d placeholders; want refused and none", purge, out, placeholders())
			}
			time.Sleep(500 * time.Millisecond)
		}
		if !purge {
			if n := harness.CountScaleTo(c.ScaleEvents(t, "http", "http"), 1); n != 0 {
				t.Fatalf("a stopped job was woken %d times", n)
			}
		}
	}
}

func TestFaultMissingInterfaceParksNothingAndTheDriverSaysWhy(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{Interfaces: []string{"zs-missing0", "lo"}, GateDown: true})
	node := c.Nomad.Node(t)
	attrs := node.Drivers["zeroscale"]
	if attrs == nil || attrs.Attributes["driver.zeroscale.gate"] != "false" ||
		!strings.Contains(attrs.Attributes["driver.zeroscale.gate.reason"], "zs-missing0") {
		t.Fatalf("driver attributes %+v, want gate=false and a reason naming zs-missing0", attrs)
	}
	port := c.RunExample(t, "http.nomad.hcl", "http", "3s")
	time.Sleep(15 * time.Second)
	st, _, err := c.API.Jobs().ScaleStatus("http", nil)
	if err != nil || st.TaskGroups["http"].Desired != 1 {
		t.Fatalf("the group was scaled down although SYNs could not reach a gate: %+v %v", st, err)
	}
	var reported bool
	for _, e := range c.ScaleEvents(t, "http", "http") {
		reported = reported || e.Error && strings.Contains(e.Message, "zs-missing0")
	}
	if !reported {
		t.Fatal("no error scaling event says why the idle group is not parked")
	}
	getServed(t, c, port)
}

func TestFaultEntryParkedByARemovedPolicyIsRemovedAtStart(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := harness.FreePort(t, c.Net.HostAddr)
	key := bpf.KeyFrom(netip.AddrPortFrom(c.Net.HostAddr, uint16(port)))
	pid := pluginPID(t, c)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// While no plugin runs, an entry appears that no policy claims: what a
	// policy removed while the plugin was down leaves behind.
	parkPinned(t, c, key)
	if out := connectOutcome(c, key.String()); out != "held" {
		t.Fatalf("connect %s with the orphan parked, want held (the fault)", out)
	}
	waitPluginRestarted(t, c, pid)
	if out := neverHeld(t, c, key.String()); out != "refused" {
		t.Fatalf("connect %s, want refused (nothing listens there)", out)
	}
}

func TestFaultForeignListenerOnAParkedPortDoesNotOpenTheGate(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "http.nomad.hcl", "http", "4s")
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	// A process outside Nomad listens on the parked address for a moment.
	ln, err := net.Listen("tcp", netip.AddrPortFrom(c.Net.HostAddr, uint16(port)).String())
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	ln.Close()
	time.Sleep(time.Second)
	getServed(t, c, port)
	if n := harness.CountScaleTo(c.ScaleEvents(t, "http", "http"), 1); n != 1 {
		t.Fatalf("%d scale-ups, want the one wake", n)
	}
}

func TestManyWakesInARowServeEveryFirstConnection(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "http.nomad.hcl", "http", "3s")
	const cycles = 10
	var latencies []time.Duration
	for i := 0; i < cycles; i++ {
		c.WaitDesired(t, "http", "http", 0, 90*time.Second)
		began := time.Now()
		// curl from the client namespace: one request, one connection.
		out, err := inNS(t, c, 40*time.Second, "curl", "-sS", "-m", "30", c.URL(port))
		if err != nil || !strings.Contains(out, "hello from a service that was asleep") {
			t.Fatalf("wake %d of %d: %v\n%s\n%s", i+1, cycles, err, out, c.Diagnose(t))
		}
		latencies = append(latencies, time.Since(began))
	}
	t.Logf("%d consecutive sleep → wake cycles, each first request served: %v", cycles, latencies)
}

// waitPhase waits until the group's record in Consul says phase.
func waitPhase(t *testing.T, c *harness.Cluster, phase string, timeout time.Duration) {
	t.Helper()
	kv := c.Consul.Client(t, "").KV()
	deadline := time.Now().Add(timeout)
	for {
		pair, _, err := kv.Get("zeroscale/groups/default/http/http", nil)
		if err == nil && pair != nil && strings.Contains(string(pair.Value), `"phase":"`+phase+`"`) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the group's record did not reach %s within %s", phase, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestFaultConsulGoesAwayWhileParking(t *testing.T) {
	proxy := harness.StartFaultProxy(t)
	c := harness.NewCluster(t, harness.ClusterOptions{ConsulProxy: proxy})
	port := c.RunExample(t, "http.nomad.hcl", "http", "4s")
	waitPhase(t, c, "parking", 60*time.Second)
	proxy.Cut(harness.Refused)
	// Served either way: parking undone locally, or (if the commit won the
	// race) woken without Consul.
	if out := neverHeld(t, c, netip.AddrPortFrom(c.Net.HostAddr, uint16(port)).String()); out != "served" {
		t.Fatalf("connect %s with Consul away during parking, want served", out)
	}
	getServed(t, c, port)
}

func TestFaultConsulGoesAwayDuringAWake(t *testing.T) {
	proxy := harness.StartFaultProxy(t)
	c := harness.NewCluster(t, harness.ClusterOptions{ConsulProxy: proxy})
	port := c.RunExample(t, "http.nomad.hcl", "http", "4s")
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	proxy.Cut(harness.Refused)
	getServed(t, c, port)
	// Consul comes back: the node's state is written (awake, or a later
	// parking that supersedes it), and the group sleeps again when idle.
	proxy.Restore()
	c.WaitDesired(t, "http", "http", 0, 90*time.Second)
	waitPhase(t, c, "asleep", faultBound)
	eventuallyServed(t, c, port)
	getServed(t, c, port)
}

func TestFaultNomadUnreachableDuringAWakeIsServedWhenItReturns(t *testing.T) {
	proxy := harness.StartFaultProxy(t)
	c := harness.NewCluster(t, harness.ClusterOptions{NomadProxy: proxy})
	port := c.RunExample(t, "http.nomad.hcl", "http", "4s")
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	proxy.Cut(harness.Held) // calls hang: only their timeouts end them
	done := make(chan error, 1)
	go func() {
		code, body, err := c.HTTPGet(c.URL(port), 90*time.Second)
		if err == nil && (code != 200 || !strings.Contains(body, "hello from a service that was asleep")) {
			err = fmt.Errorf("status %d body %q", code, body)
		}
		done <- err
	}()
	time.Sleep(8 * time.Second)
	select {
	case err := <-done:
		t.Fatalf("answered while Nomad was away: %v", err)
	default:
	}
	proxy.Restore()
	if err := <-done; err != nil {
		t.Fatalf("the connect made while Nomad was away: %v\n%s", err, c.Diagnose(t))
	}
}

func TestFaultPluginKilledBetweenAsleepAndScaleDownOpens(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "http.nomad.hcl", "http", "1h")
	allocs, _, err := c.API.Jobs().Allocations("http", false, nil)
	if err != nil || len(allocs) != 1 {
		t.Fatalf("allocations %v %v", allocs, err)
	}
	pid := pluginPID(t, c)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// What a crash right after the record said asleep and the gate closed,
	// before Scale(0), leaves behind.
	key := bpf.KeyFrom(netip.AddrPortFrom(c.Net.HostAddr, uint16(port)))
	record := fmt.Sprintf(`{"phase":"asleep","epoch":1,"since":%q,"by":"crashed","addresses":[{"service":"http","addr":%q,"node":%q}],"allocs":[%q],"reason":"idle"}`,
		time.Now().UTC().Format(time.RFC3339Nano), key.String(), c.Node, allocs[0].ID)
	if _, err := c.Consul.Client(t, "").KV().Put(&capi.KVPair{Key: "zeroscale/groups/default/http/http", Value: []byte(record)}, nil); err != nil {
		t.Fatal(err)
	}
	parkPinned(t, c, key)
	waitPluginRestarted(t, c, pid)
	// The instance never stopped: the gate must open, not wait for a wake.
	deadline := time.Now().Add(faultBound)
	for connectOutcome(c, key.String()) != "served" {
		if time.Now().After(deadline) {
			t.Fatalf("the running instance is still behind a closed gate %s after the restart", faultBound)
		}
	}
	waitPhase(t, c, "awake", faultBound)
	if n := harness.CountScaleTo(c.ScaleEvents(t, "http", "http"), 1); n != 0 {
		t.Fatalf("%d scale-ups: the group never slept", n)
	}
}

func TestFaultJobReRegisteredWhileAsleep(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "http.nomad.hcl", "http", "4s")
	vars := map[string]string{"node": c.Node, "port": fmt.Sprint(port)}
	addr := netip.AddrPortFrom(c.Net.HostAddr, uint16(port)).String()

	// A changed policy: the new version runs at count 1 and is served.
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	vars["idle_timeout"] = "1h"
	c.Run(t, harness.Example(t, "http.nomad.hcl"), vars)
	if out := neverHeld(t, c, addr); out == "held" {
		t.Fatal("held")
	}
	getServed(t, c, port)

	// The policy removed, the job at count 0: no longer gated, refused.
	src, err := os.ReadFile(harness.Example(t, "http.nomad.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(src)
	i, j := strings.Index(text, "    scaling {"), strings.Index(text, "    task \"server\"")
	text = strings.Replace(text[:i]+text[j:], "count = 1", "count = 0", 1)
	file := filepath.Join(t.TempDir(), "http-no-policy.nomad.hcl")
	if err := os.WriteFile(file, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	delete(vars, "idle_timeout")
	vars["idle_timeout"] = "1h" // declared by the file, unused now
	c.Run(t, file, vars)
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	deadline := time.Now().Add(faultBound)
	for neverHeld(t, c, addr) != "refused" {
		if time.Now().After(deadline) {
			t.Fatal("a group without a policy at count 0 is not refused fast")
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func TestFaultScaleDownErrorThatWasAppliedStillSleepsAndWakes(t *testing.T) {
	proxy := harness.StartFaultProxy(t)
	c := harness.NewCluster(t, harness.ClusterOptions{NomadProxy: proxy})
	port := c.RunExample(t, "http.nomad.hcl", "http", "4s")
	waitPhase(t, c, "parking", 60*time.Second)
	proxy.Cut(harness.AnswersLost) // Scale(0) is applied; its answer is lost
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	time.Sleep(2 * time.Second)
	proxy.Restore()
	waitPhase(t, c, "asleep", faultBound)
	eventuallyServed(t, c, port)
	getServed(t, c, port)
}

func TestFaultKVRestoredFromAnOlderSnapshotStillWakes(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "http.nomad.hcl", "http", "4s")
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	getServed(t, c, port)
	waitPhase(t, c, "awake", faultBound)
	snap, _, err := c.Consul.Client(t, "").Snapshot().Save(nil)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(snap)
	snap.Close()
	if err != nil {
		t.Fatal(err)
	}
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	waitPhase(t, c, "asleep", faultBound)
	// The record goes back to "awake" while the group sleeps.
	if err := c.Consul.Client(t, "").Snapshot().Restore(nil, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	eventuallyServed(t, c, port)
	getServed(t, c, port)
}

func TestFaultPinsOfAnOlderLayoutDoNotStrandAParkedAddress(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := harness.FreePort(t, c.Net.HostAddr)
	key := bpf.KeyFrom(netip.AddrPortFrom(c.Net.HostAddr, uint16(port)))
	c.Nomad.WhileDown(t, func() {
		// An address parked by the old version.
		parkPinned(t, c, key)
		// An upgrade changes the layout of a pinned map: the attached
		// programs keep the old map (with the parked address) while the pin
		// names one of another layout.
		path := filepath.Join(c.Nomad.PinPath, "policies")
		old, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		keySize := old.KeySize()
		old.Close()
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		other, err := ebpf.NewMap(&ebpf.MapSpec{Name: "policies", Type: ebpf.Hash, KeySize: keySize, ValueSize: 8, MaxEntries: 16})
		if err != nil {
			t.Fatal(err)
		}
		if err := other.Pin(path); err != nil {
			t.Fatal(err)
		}
		other.Close()
		if out := connectOutcome(c, key.String()); out != "held" {
			t.Fatalf("connect %s before the upgrade's start, want held (the fault)", out)
		}
	})
	if out := neverHeld(t, c, key.String()); out != "refused" {
		t.Fatalf("connect %s after the start, want refused (nothing listens, nothing parks)", out)
	}
	if !strings.Contains(c.Nomad.PluginLog(), "pinned maps of another zeroscale version were replaced") {
		t.Fatal("the replacement of the pins was not logged")
	}
}
