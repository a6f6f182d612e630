// Package e2e runs zeroscale the way users do: real Consul and Nomad agents,
// the plugin built from this checkout, real servers, and clients in a
// network namespace reaching the node over a veth pair.
package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	napi "github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// cluster is one node: Consul, Nomad with the plugin, and a client namespace.
type cluster struct {
	net    *testnet.Net
	consul *harness.Consul
	nomad  *harness.Nomad
	api    *napi.Client
	node   string
}

type clusterOpts struct {
	pluginConfig string
	dataDir      string
	persistent   bool
}

func newCluster(t *testing.T, opts clusterOpts) *cluster {
	t.Helper()
	n := testnet.NewIPv4(t)
	c := harness.StartConsul(t, harness.ConsulOptions{})
	cfg := fmt.Sprintf(`interfaces = [%q, "lo"]
metrics_address = ""
`, n.HostIf) + opts.pluginConfig
	nomad := harness.StartNomad(t, harness.NomadOptions{Consul: c, NetworkInterface: n.HostIf, PluginConfig: cfg, DataDir: opts.dataDir, Persistent: opts.persistent})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("plugin log:\n%s", tail(nomad.PluginLog(), 150))
		}
	})
	cl := &cluster{net: n, consul: c, nomad: nomad, api: nomad.Client(t)}
	cl.node = nomad.Node(t).Name
	return cl
}

// diagnose describes the jobs and their latest allocations.
func (c *cluster) diagnose(t *testing.T) string {
	var b strings.Builder
	jobs, _, _ := c.api.Jobs().List(nil)
	for _, j := range jobs {
		out, _ := c.nomad.CLI(t, "job", "status", "-evals", j.ID)
		b.WriteString(out)
		out, _ = c.nomad.CLI(t, "job", "scaling-events", "-verbose", j.ID)
		b.WriteString(out)
		allocs, _, _ := c.api.Jobs().Allocations(j.ID, true, nil)
		if len(allocs) > 0 {
			out, _ := c.nomad.CLI(t, "alloc", "status", "-verbose", allocs[0].ID)
			b.WriteString(out)
			for task := range allocs[0].TaskStates {
				logs, err := c.nomad.CLI(t, "alloc", "logs", "-stderr", allocs[0].ID, task)
				if err == nil {
					b.WriteString("stderr of " + task + ":\n" + tail(logs, 30) + "\n")
				}
			}
		}
	}
	return b.String()
}

func tail(s string, lines int) string {
	all := strings.Split(s, "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

func example(t *testing.T, name string) string {
	return filepath.Join(harness.RepoRoot(t), "examples", "jobs", name)
}

// run submits a job file with variables and waits for the deployment.
func (c *cluster) run(t *testing.T, file string, vars map[string]string) {
	t.Helper()
	args := []string{"job", "run", "-detach"}
	for k, v := range vars {
		args = append(args, "-var", k+"="+v)
	}
	args = append(args, file)
	out, err := c.nomad.CLI(t, args...)
	if err != nil {
		t.Fatalf("nomad job run: %v\n%s", err, out)
	}
}

// waitHealthy waits for n passing Nomad-registered instances of service.
func (c *cluster) waitHealthy(t *testing.T, service string, timeout time.Duration) {
	t.Helper()
	api := c.consul.Client(t, "")
	deadline := time.Now().Add(timeout)
	for {
		entries, _, err := api.Health().Service(service, "", true, nil)
		if err == nil {
			for _, e := range entries {
				if e.Service.Meta["external-source"] == "nomad" {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("service %s not healthy within %s\n%s", service, timeout, c.diagnose(t))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// httpGet fetches url from inside the client namespace.
func (c *cluster) httpGet(t *testing.T, url string, timeout time.Duration) (int, string, error) {
	t.Helper()
	client := &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return c.net.Dial(ctx, network, addr)
			},
		},
	}
	resp, err := client.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), nil
}

func freePort(t *testing.T, addr netip.Addr) int {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func TestHTTPExampleRunsAndServes(t *testing.T) {
	c := newCluster(t, clusterOpts{})

	out, err := c.nomad.CLI(t, "node", "status", "-self", "-verbose")
	if err != nil {
		t.Fatalf("node status: %v\n%s", err, out)
	}
	node := c.nomad.Node(t)
	d := node.Drivers["zeroscale"]
	if d == nil || !d.Healthy || d.Attributes["driver.zeroscale.gate"] != "true" || d.Attributes["driver.zeroscale.version"] == "" {
		t.Fatalf("zeroscale driver on the node: %+v\n%s", d, out)
	}
	if !strings.Contains(out, "driver.zeroscale.gate") {
		t.Fatalf("node status does not show the zeroscale attributes:\n%s", out)
	}

	port := freePort(t, c.net.HostAddr)
	c.run(t, example(t, "http.nomad.hcl"), map[string]string{"node": c.node, "port": fmt.Sprint(port), "idle_timeout": "1h"})
	c.waitHealthy(t, "http", 90*time.Second)

	url := fmt.Sprintf("http://%s:%d/", c.net.HostAddr, port)
	code, body, err := c.httpGet(t, url, 5*time.Second)
	if err != nil || code != 200 || !strings.Contains(body, "hello from a service that was asleep") {
		t.Fatalf("GET %s from the client namespace: %d %q %v", url, code, body, err)
	}

	out, err = c.nomad.CLI(t, "job", "stop", "-purge", "http")
	if err != nil {
		t.Fatalf("job stop: %v\n%s", err, out)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		entries, _, _ := c.consul.Client(t, "").Health().Service("http", "", false, nil)
		_, _, err := c.httpGet(t, url, time.Second)
		if len(entries) == 0 && err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after stop -purge: %d instances in Consul, server answering: %v", len(entries), err == nil)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if jobs, _, _ := c.api.Jobs().List(nil); len(jobs) != 0 {
		t.Fatalf("jobs after purge: %+v", jobs)
	}
}
