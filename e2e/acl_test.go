package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"
	napi "github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// The ACL tests run the cluster as production runs it: Consul serves HTTPS
// only with ACLs on and "deny" by default, Nomad has ACLs on, and the plugin
// holds tokens of the policies in examples/acl, read from token files, and
// trusts Consul's CA through ca_file.

// TestACLExamplePoliciesAreEnoughToSleepAndWake: with the policies of
// examples/acl and nothing more, an idle group sleeps (count 0, a placeholder
// in Consul) and a connect wakes it once and is answered.
func TestACLExamplePoliciesAreEnoughToSleepAndWake(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{ACL: &harness.ACLOptions{}})
	requireACLsEnforced(t, c)
	port := c.RunExample(t, "http.nomad.hcl", "http", "5s")

	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	c.WaitPlaceholder(t, "http", c.Net.HostAddr, port, 30*time.Second)
	c.WaitNoneRunning(t, "http", 30*time.Second)

	began := time.Now()
	code, body, err := c.HTTPGet(c.URL(port), 60*time.Second)
	if err != nil || code != 200 || !strings.Contains(body, "hello from a service that was asleep") {
		t.Fatalf("GET that wakes: %d %q %v\n%s", code, body, err, c.Diagnose(t))
	}
	t.Logf("a GET woke the group and was answered in %v", time.Since(began).Round(time.Millisecond))
	logEvents(t, c, "http")
	evs := c.ScaleEvents(t, "http", "http")
	if n := harness.CountScaleTo(evs, 1); n != 1 {
		t.Fatalf("%d scale-up events, want 1", n)
	}
	for _, e := range evs {
		if e.Error {
			t.Errorf("error scaling event: %s", e.Message)
		}
	}
	// Denied calls are logged (and retried): none may be once the plugin
	// holds its Nomad token. (Until the harness bootstrapped Nomad's ACLs,
	// the token file held one Nomad did not know.)
	log := c.Nomad.PluginLog()
	if i := strings.Index(log, "token file changed; using the new token"); i >= 0 {
		log = log[i:]
	}
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "Permission denied") || strings.Contains(l, "consul denied") {
			t.Errorf("the plugin was denied something with the example policies: %s", l)
		}
	}

	// The CLI acts with the operator's token: one that may only read the
	// job cannot put it to sleep; the management token can.
	reader := nomadToken(t, c, "reader", `namespace "default" { policy = "read" }
node { policy = "read" }`)
	if out, code := cli(t, c, "", reader, "sleep", "http/http"); code != 1 || !strings.Contains(out, "403") {
		t.Fatalf("sleep with a read-only token: exit %d, want 1 and Nomad's 403:\n%s", code, out)
	}
	if st, _, err := c.API.Jobs().ScaleStatus("http", nil); err != nil || st.TaskGroups["http"].Desired != 1 {
		t.Fatalf("the read-only token's request changed the count: %+v %v", st, err)
	}
	if out, code := cli(t, c, "", c.Nomad.Token, "sleep", "http/http"); code != 0 {
		t.Fatalf("sleep with the management token: exit %d\n%s", code, out)
	}
}

// nomadToken creates a Nomad ACL policy of rules and a client token holding
// it alone.
func nomadToken(t *testing.T, c *harness.Cluster, name, rules string) string {
	t.Helper()
	if _, err := c.API.ACLPolicies().Upsert(&napi.ACLPolicy{Name: name, Rules: rules}, nil); err != nil {
		t.Fatalf("nomad policy %s: %v", name, err)
	}
	tok, _, err := c.API.ACLTokens().Create(&napi.ACLToken{Name: name, Type: "client", Policies: []string{name}}, nil)
	if err != nil {
		t.Fatalf("nomad token %s: %v", name, err)
	}
	return tok.SecretID
}

// TestACLWithoutScaleJobTheIdleGroupStaysUpAndThePluginSaysWhy: a plugin
// token whose Nomad policy lacks scale-job cannot scale the idle group down
// (nor record a scaling event saying so); the group keeps running and
// serving, and the plugin logs the denial once, however many times it tries.
func TestACLWithoutScaleJobTheIdleGroupStaysUpAndThePluginSaysWhy(t *testing.T) {
	example := harness.ACLExample(t, harness.PluginNomadPolicyFile)
	policy := strings.Replace(example, `, "scale-job"`, "", 1)
	if policy == example || strings.Contains(policy, "scale-job\"") {
		t.Fatalf("cannot take scale-job out of %s:\n%s", harness.PluginNomadPolicyFile, example)
	}
	metrics := fmt.Sprintf("127.0.0.1:%d", harness.FreePorts(t, 1)[0])
	c := harness.NewCluster(t, harness.ClusterOptions{
		ACL:          &harness.ACLOptions{PluginNomadPolicy: policy},
		PluginConfig: fmt.Sprintf("metrics_address = %q\n", metrics),
	})
	port := c.RunExample(t, "http.nomad.hcl", "http", "3s")

	// Each idle timeout the leader parks the group and is refused the
	// scale-down; wait for the second refusal.
	const refused = `zeroscale_errors_total{kind="scale_down"}`
	deadline := time.Now().Add(60 * time.Second)
	for harness.Metric(t, metrics, refused) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v after 60s, want 2 refused scale-downs\n%s", refused, harness.Metric(t, metrics, refused), c.Diagnose(t))
		}
		time.Sleep(500 * time.Millisecond)
	}
	st, _, err := c.API.Jobs().ScaleStatus("http", nil)
	if err != nil || st.TaskGroups["http"].Desired != 1 {
		t.Fatalf("scale status %+v %v: the group must stay at 1 without scale-job", st, err)
	}
	if n := harness.CountScaleTo(c.ScaleEvents(t, "http", "http"), 0); n != 0 {
		t.Fatalf("%d scale-downs recorded without scale-job", n)
	}
	getServed(t, c, port)

	var denials []string
	for _, l := range strings.Split(c.Nomad.PluginLog(), "\n") {
		if strings.Contains(l, "[ERROR]") && strings.Contains(l, "could not scale to 0") {
			denials = append(denials, l)
		}
	}
	if len(denials) != 1 || !strings.Contains(denials[0], "403") || !strings.Contains(denials[0], "Permission denied") ||
		!strings.Contains(denials[0], "default/http/http") ||
		!strings.Contains(denials[0], `needs the "scale-job" capability in namespace "default"`) {
		t.Fatalf("want one error line naming the group and Nomad's 403 after %v refusals, got %d:\n%s",
			harness.Metric(t, metrics, refused), len(denials), strings.Join(denials, "\n"))
	}
	t.Logf("the plugin parked the group %d times and says, once: %s",
		strings.Count(c.Nomad.PluginLog(), "parking idle group"), denials[0])

	// Nomad cannot record the error as a scaling event without scale-job:
	// the group's task shows it as a task event instead.
	allocs, _, err := c.API.Jobs().Allocations("http", false, nil)
	if err != nil {
		t.Fatal(err)
	}
	var events []string
	for _, stub := range allocs {
		for _, ts := range stub.TaskStates {
			for _, ev := range ts.Events {
				if strings.Contains(ev.DisplayMessage, "zeroscale") || strings.Contains(ev.Message, "zeroscale") {
					events = append(events, ev.DisplayMessage+ev.Message)
				}
			}
		}
	}
	found := false
	for _, ev := range events {
		found = found || strings.Contains(ev, `needs the "scale-job" capability in namespace "default"`)
	}
	if !found {
		t.Fatalf("no task event names the missing capability; zeroscale task events: %q", events)
	}
}

// requireACLsEnforced checks that the harness really turned ACLs on:
// without a token, Consul refuses a write and Nomad a read.
func requireACLsEnforced(t *testing.T, c *harness.Cluster) {
	t.Helper()
	if _, err := c.Consul.Client(t, "").KV().Put(&capi.KVPair{Key: "zeroscale/probe"}, nil); err == nil || !strings.Contains(err.Error(), "403") {
		t.Fatalf("Consul KV write without a token: %v, want a 403", err)
	}
	anonymous, err := napi.NewClient(&napi.Config{Address: c.Nomad.Addr})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := anonymous.Jobs().List(nil); err == nil || !strings.Contains(err.Error(), "403") {
		t.Fatalf("Nomad job list without a token: %v, want a 403", err)
	}
}
