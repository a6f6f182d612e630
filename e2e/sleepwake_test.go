package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	napi "github.com/hashicorp/nomad/api"
)

// scaleEvents returns the group's scaling events, oldest first.
func (c *cluster) scaleEvents(t *testing.T, job, group string) []napi.ScalingEvent {
	t.Helper()
	st, _, err := c.api.Jobs().ScaleStatus(job, nil)
	if err != nil {
		t.Fatalf("scale status: %v", err)
	}
	evs := st.TaskGroups[group].Events
	out := make([]napi.ScalingEvent, len(evs))
	for i, e := range evs {
		out[len(evs)-1-i] = e
	}
	return out
}

func countEvents(evs []napi.ScalingEvent, count int64) int {
	n := 0
	for _, e := range evs {
		if e.Count != nil && *e.Count == count && !e.Error {
			n++
		}
	}
	return n
}

func (c *cluster) waitDesired(t *testing.T, job, group string, want int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, _, err := c.api.Jobs().ScaleStatus(job, nil)
		if err == nil && st.TaskGroups[group].Desired == want && (want > 0 || st.TaskGroups[group].Running == 0) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("group %s not at %d within %s\n%s", group, want, timeout, c.diagnose(t))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func TestSleepAndWakeHTTP(t *testing.T) {
	c := newCluster(t, clusterOpts{})
	port := freePort(t, c.net.HostAddr)
	c.run(t, example(t, "http.nomad.hcl"), map[string]string{"node": c.node, "port": fmt.Sprint(port), "idle_timeout": "5s"})
	c.waitHealthy(t, "http", 90*time.Second)
	url := fmt.Sprintf("http://%s:%d/", c.net.HostAddr, port)
	if code, _, err := c.httpGet(t, url, 5*time.Second); err != nil || code != 200 {
		t.Fatalf("first GET: %d %v", code, err)
	}

	// Consul checks it every second; it still goes to sleep.
	c.waitDesired(t, "http", "http", 0, 60*time.Second)
	t.Logf("events: %+v", c.scaleEvents(t, "http", "http"))

	began := time.Now()
	code, body, err := c.httpGet(t, url, 30*time.Second)
	took := time.Since(began)
	if err != nil || code != 200 || !strings.Contains(body, "asleep") {
		t.Fatalf("GET that wakes: %d %q %v\n%s", code, body, err, c.diagnose(t))
	}
	t.Logf("woke and answered in %v", took)
	evs := c.scaleEvents(t, "http", "http")
	for _, e := range evs {
		t.Logf("event: count=%v err=%v %s", deref(e.Count), e.Error, e.Message)
	}
	if n := countEvents(evs, 1); n != 1 {
		t.Fatalf("%d scale-up events, want 1", n)
	}
}

func deref(p *int64) any {
	if p == nil {
		return "nil"
	}
	return *p
}
