package scaling

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// TestNomadAPIAgainstARealAgent checks the agent's view of Nomad on a real
// dev agent: the shape Nomad stores a zeroscale block in, the group spec,
// scale status, event-only scaling calls, and how refusals are classified.
func TestNomadAPIAgainstARealAgent(t *testing.T) {
	consul := harness.StartConsul(t, harness.ConsulOptions{})
	nomad := harness.StartNomad(t, harness.NomadOptions{Consul: consul, PluginConfig: "dry_run = true\nmetrics_address = \"\"\n"})
	api, err := NewNomadAPI(nomad.Addr, "")
	if err != nil {
		t.Fatal(err)
	}
	node := nomad.Node(t).Name

	// The python example with a long deployment, so a scale call meets an
	// active deployment.
	src, err := os.ReadFile(harness.Example(t, "http.nomad.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	job := strings.Replace(string(src), `min_healthy_time = "1s"`, `min_healthy_time = "5m"
      healthy_deadline = "10m"
      progress_deadline = "15m"`, 1)
	path := filepath.Join(t.TempDir(), "http.nomad.hcl")
	if err := os.WriteFile(path, []byte(job), 0o644); err != nil {
		t.Fatal(err)
	}
	port := harness.FreePorts(t, 1)[0]
	if out, err := nomad.CLI(t, "job", "run", "-detach", "-var", "node="+node, "-var", fmt.Sprintf("port=%d", port),
		"-var", "idle_timeout=90s", path); err != nil {
		t.Fatalf("job run: %v\n%s", err, out)
	}

	var stubs []PolicyStub
	deadline := time.Now().Add(30 * time.Second)
	for len(stubs) == 0 {
		stubs, _, err = api.Policies(0, 0)
		if err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatal("no scaling policy listed")
		}
	}
	want := GroupID{Namespace: "default", Job: "http", Group: "http"}
	if stubs[0].Target != want || !stubs[0].Enabled {
		t.Fatalf("policy stub %+v", stubs[0])
	}
	data, err := api.Policy(stubs[0].ID)
	if err != nil {
		t.Fatal(err)
	}
	policy, err := ParsePolicy(data)
	if err != nil {
		t.Fatalf("parse the policy as Nomad stores it (%#v): %v", data.Policy, err)
	}
	if policy.IdleTimeout != 90*time.Second || policy.WakeTimeout != 2*time.Minute || policy.WakeCount != 1 ||
		policy.Ready != ReadyListen || policy.Max != 1 {
		t.Fatalf("policy %+v", policy)
	}

	spec, err := api.Group(want)
	if err != nil {
		t.Fatal(err)
	}
	if !spec.Pinned || len(spec.Services) != 1 || spec.Services[0].Name != "http" || spec.Services[0].StaticPort != port ||
		spec.Services[0].Provider != "consul" {
		t.Fatalf("group spec %+v", spec)
	}

	deadline = time.Now().Add(60 * time.Second)
	for {
		st, err := api.ScaleStatus(want)
		if err == nil && st.Desired == 1 && st.Running == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("scale status %+v %v", st, err)
		}
		time.Sleep(250 * time.Millisecond)
	}

	if err := api.Scale(want, nil, "zeroscale: a test event", false, map[string]any{"zeroscale": "test"}); err != nil {
		t.Fatalf("event-only scale: %v", err)
	}
	zero := 0
	err = api.Scale(want, &zero, "zeroscale: during the deployment", false, nil)
	if err == nil || !IsDeploymentBlock(err) || !Retryable(err) {
		t.Fatalf("scale during a deployment: %v (retryable %v)", err, Retryable(err))
	}
	five := 5
	err = api.Scale(want, &five, "zeroscale: above max", false, nil)
	if err == nil || Retryable(err) {
		t.Fatalf("scale above max: %v (retryable %v), want a final refusal", err, Retryable(err))
	}
	t.Logf("refusals: above max → %v", err)

	allocs, _, err := api.Client().Jobs().Allocations("http", false, nil)
	if err != nil || len(allocs) == 0 {
		t.Fatalf("allocations %v", err)
	}
	if g, err := api.AllocGroup(allocs[0].ID); err != nil || g != want {
		t.Fatalf("alloc group %+v %v", g, err)
	}
}

// While the job list is followed, a sleeping group whose job does not
// change costs no request to Nomad beyond a resync; a change to its job is
// read at the next pass. When the list cannot be followed, groups are
// polled again.
func TestFollowedJobsReplacePolling(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	stub := JobStub{Namespace: web.Namespace, ID: web.Job, ModifyIndex: 10, JobModifyIndex: 5, SummaryIndex: 10}
	e.agent.OnJobs([]JobStub{stub})
	e.tick(time.Second) // the first list marks every group for one read
	reads := func(d time.Duration) int {
		before := e.nomad.statusReads
		for range int(d / (500 * time.Millisecond)) {
			e.tick(500 * time.Millisecond)
		}
		return e.nomad.statusReads - before
	}
	if n := reads(time.Minute); n != 0 {
		t.Fatalf("%d count reads in a minute of an unchanged job: want none", n)
	}
	stub.ModifyIndex, stub.SummaryIndex = 11, 11
	e.agent.OnJobs([]JobStub{stub})
	if n := reads(time.Second); n != 1 {
		t.Fatalf("%d count reads after the job changed: want 1", n)
	}
	if n := reads(5 * time.Minute); n != 1 {
		t.Fatalf("%d count reads over a resync interval: want 1", n)
	}
	e.agent.OnJobsLost()
	if n := reads(time.Minute); n < 10 {
		t.Fatalf("%d count reads in a minute without the job list: want polling every %s", n, e.agent.cfg.NomadPollInterval)
	}
}
