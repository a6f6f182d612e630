package bench

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	napi "github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// The wake floor: what Nomad alone takes to start a group, measured beside
// the wakes in the same cluster. A copy of the example job runs with its
// scaling policy disabled, so the plugin neither gates nor scales it, and
// the bench scales it 0 → 1 itself. The floor is the time from the Scale
// call until the task's process accepts a TCP connection from the client
// namespace: the API call, evaluation, placement, the client starting the
// allocation (for docker the container, for bridge mode the CNI network)
// and the process starting up to listen(). A wake has the same Nomad part
// (the agent makes the Scale call instead of the bench) and adds what the
// gate and the agent do around it: the SYN seen and reported, the listen
// seen, the gate opened and the SYN replayed (or, replay off, the client's
// own retransmit).

// floorJob is an example's ungated copy.
type floorJob struct {
	job, group string
	port       int
}

// floorSuffix names the copy's job and services apart from the example's.
const floorSuffix = "-floor"

// runFloorJob registers the ungated copy of an example on a free port, waits
// until it is healthy, and scales it to 0.
func runFloorJob(b *testing.B, c *harness.Cluster, file string, vars map[string]string) *floorJob {
	src, err := os.ReadFile(harness.Example(b, file))
	if err != nil {
		b.Fatal(err)
	}
	port := harness.FreePort(b, c.Net.HostAddr)
	all := map[string]string{"node": c.Node, "port": strconv.Itoa(port), "idle_timeout": "3s"}
	for k, v := range vars {
		all[k] = v
	}
	var varFile strings.Builder
	for k, v := range all {
		fmt.Fprintf(&varFile, "%s = %s\n", k, strconv.Quote(v))
	}
	job, err := c.API.Jobs().ParseHCLOpts(&napi.JobsParseRequest{JobHCL: string(src), Variables: varFile.String(), Canonicalize: true})
	if err != nil {
		b.Fatalf("parse %s: %v", file, err)
	}
	if len(job.TaskGroups) != 1 {
		b.Fatalf("%s: %d groups, the floor copies one", file, len(job.TaskGroups))
	}
	id := *job.ID + floorSuffix
	job.ID, job.Name = &id, &id
	tg := job.TaskGroups[0]
	if tg.Scaling == nil {
		b.Fatalf("%s: no scaling block to disable", file)
	}
	disabled := false
	tg.Scaling.Enabled = &disabled
	for _, s := range tg.Services {
		s.Name += floorSuffix
	}
	for _, task := range tg.Tasks {
		for _, s := range task.Services {
			s.Name += floorSuffix
		}
	}
	if _, _, err := c.API.Jobs().Register(job, nil); err != nil {
		b.Fatalf("register %s: %v", id, err)
	}
	c.WaitHealthy(b, tg.Services[0].Name, 120*time.Second)
	f := &floorJob{job: id, group: *tg.Name, port: port}
	f.stop(b, c)
	return f
}

// floorSample is one start of the copy: until it accepted a connection,
// and until Nomad recorded its task as started (for the log: a task cannot
// serve much before it starts).
type floorSample struct {
	accepting, started time.Duration
}

// start scales the copy 0 → 1 and times it until its task listens, then
// scales it back to 0.
func (f *floorJob) start(b *testing.B, c *harness.Cluster) floorSample {
	// A deployment still running would make Nomad refuse the Scale, and
	// the retry would count.
	waitNoDeployment(b, c, f.job, 60*time.Second)
	target := hostPort(c.Net.HostAddr, f.port)
	began := time.Now()
	c.Scale(b, f.job, f.group, 1, "bench: floor start")
	listening, err := waitAccepting(c.Net, target, 60*time.Second)
	if err != nil {
		b.Fatalf("%s: %v\n%s", f.job, err, c.Diagnose(b))
	}
	// Not timed: the service answers, so what accepted was the task and
	// not a port mapping with nothing behind it.
	if status, _, err := c.HTTPGet("http://"+target+"/", 10*time.Second); err != nil || status != 200 {
		b.Fatalf("%s accepted but does not serve: status %d, %v", f.job, status, err)
	}
	f.stop(b, c)
	// After the stop: the client reports task events to the servers in
	// batches, a moment late.
	sample := floorSample{accepting: listening.Sub(began)}
	if started := f.taskStarted(b, c); !started.IsZero() {
		sample.started = started.Sub(began)
	}
	return sample
}

// taskStarted is when Nomad recorded the task of the copy's newest
// allocation as started.
func (f *floorJob) taskStarted(b *testing.B, c *harness.Cluster) time.Time {
	allocs, _, err := c.API.Jobs().Allocations(f.job, false, nil)
	if err != nil || len(allocs) == 0 {
		b.Fatalf("allocations of %s: %d, %v", f.job, len(allocs), err)
	}
	newest := slices.MaxFunc(allocs, func(x, y *napi.AllocationListStub) int { return cmp.Compare(x.CreateIndex, y.CreateIndex) })
	for _, state := range newest.TaskStates {
		for _, e := range state.Events {
			if e.Type == napi.TaskStarted {
				return time.Unix(0, e.Time)
			}
		}
	}
	return time.Time{}
}

func (f *floorJob) stop(b *testing.B, c *harness.Cluster) {
	c.Scale(b, f.job, f.group, 0, "bench: floor stop")
	c.WaitNoneRunning(b, f.job, 60*time.Second)
}

// quickNeighbourRetries makes the kernel ask again for the address of a
// neighbour on bridge every 10 ms instead of every second, until the bench
// ends. Docker maps the port before the container's interface is up: a
// floor probe sent then goes to an address no one answers yet, and the
// kernel would hold the next ones until its next ARP request, up to a
// second later, though the container answers long before. The wake does
// not meet this (the gate lets no SYN in before the task listens), so the
// floor must not either. Nothing else on the bridge depends on it.
func quickNeighbourRetries(b *testing.B, bridge string) {
	path := "/proc/sys/net/ipv4/neigh/" + bridge + "/retrans_time_ms"
	before, err := os.ReadFile(path)
	if err != nil {
		b.Fatalf("ARP retry time of %s: %v", bridge, err)
	}
	if err := os.WriteFile(path, []byte("10"), 0o644); err != nil {
		b.Fatalf("ARP retry time of %s: %v", bridge, err)
	}
	// Registered after the cluster's cleanups, so it runs before the
	// bridge can be deleted; a bridge gone already needs nothing back.
	b.Cleanup(func() { _ = os.WriteFile(path, before, 0o644) })
}

// waitNoDeployment waits until the job's latest deployment, if any, has
// ended.
func waitNoDeployment(b *testing.B, c *harness.Cluster, job string, timeout time.Duration) {
	ended := []string{napi.DeploymentStatusSuccessful, napi.DeploymentStatusFailed, napi.DeploymentStatusCancelled}
	deadline := time.Now().Add(timeout)
	for {
		d, _, err := c.API.Jobs().LatestDeployment(job, nil)
		if err == nil && (d == nil || slices.Contains(ended, d.Status)) {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("deployment of %s still running after %v (%v)", job, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Polling for the floor: a closed port with no gate refuses at once, so a
// connect is tried every floorPoll; one that has no answer within
// floorAttempt (a SYN lost while the port mapping is being set up) is
// abandoned for the next.
const (
	floorPoll    = 5 * time.Millisecond
	floorAttempt = 50 * time.Millisecond
)

// waitAccepting connects to addr from inside the namespace until a
// connection is accepted, and returns when it was.
func waitAccepting(n *testnet.Net, addr string, timeout time.Duration) (time.Time, error) {
	var accepted time.Time
	var lastErr error
	// One thread in the namespace for the whole poll, not one per try.
	err := n.Do(func() error {
		deadline := time.Now().Add(timeout)
		for range int(timeout/floorPoll) + 1 {
			ctx, cancel := context.WithTimeout(context.Background(), floorAttempt)
			conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			cancel()
			if err == nil {
				accepted = time.Now()
				conn.Close()
				return nil
			}
			lastErr = err
			if time.Now().After(deadline) {
				break
			}
			time.Sleep(floorPoll)
		}
		return fmt.Errorf("%s not accepting within %v: %w", addr, timeout, lastErr)
	})
	return accepted, err
}
