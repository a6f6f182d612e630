package harness

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"sync"
	"testing"

	capi "github.com/hashicorp/consul/api"
	napi "github.com/hashicorp/nomad/api"
)

// SleepingGroup is one group SleepingGroups made: a job with one group
// "web" at count 0, its services' names and the addresses they sleep at.
type SleepingGroup struct {
	Job      string
	Services []string
	Addrs    []netip.AddrPort
}

// sleepingJob is the template of SleepingGroups' jobs: a tiny Python
// server on every port of the group, pinned to the node, with a zeroscale
// policy.
const sleepingJob = `
job "template" {
  datacenters = ["*"]
  constraint {
    attribute = "${node.unique.name}"
    value     = "%s"
  }
  group "web" {
    count = 0
    update { min_healthy_time = "1s" }
    scaling {
      enabled = true
      min     = 0
      max     = 1
      policy {
        zeroscale {
          idle_timeout = "%s"
          wake_timeout = "2m"
          ready        = "listen"
        }
      }
    }
    task "server" {
      driver = "zeroscale"
      config {
        command = "/usr/bin/python3"
        args    = ["-c", "import os,socket,selectors\nsel=selectors.DefaultSelector()\nfor k,v in os.environ.items():\n  if k.startswith('NOMAD_PORT_'):\n    sel.register(socket.create_server((os.environ['NOMAD_IP_p0'],int(v))),selectors.EVENT_READ)\nwhile True:\n  for key,_ in sel.select():\n    c,_=key.fileobj.accept(); c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nok\\n'); c.close()"]
      }
      resources {
        cpu    = 20
        memory = 32
      }
    }
  }
}
`

// SleepingGroups registers n jobs whose group sleeps from the start, each
// with `services` services on static ports of the node's address from
// firstPort on. Nothing runs: each job is registered at count 0, and each
// service's placeholder is registered straight in Consul, as a group that
// went to sleep leaves it, so the plugin gates the addresses without n
// tasks having to start and idle first. Any group wakes for real: its task
// is a tiny Python server answering on every port of the group.
func (c *Cluster) SleepingGroups(t testing.TB, prefix string, n, services, firstPort int, idle string) []SleepingGroup {
	t.Helper()
	tmpl, err := c.API.Jobs().ParseHCL(fmt.Sprintf(sleepingJob, c.Node, idle), true)
	if err != nil {
		t.Fatalf("parse the sleeping groups' job: %v", err)
	}
	raw, err := json.Marshal(tmpl)
	if err != nil {
		t.Fatal(err)
	}
	api := c.Consul.Client(t, c.Consul.Token)
	groups := make([]SleepingGroup, n)
	for i := range groups {
		g := SleepingGroup{Job: fmt.Sprintf("%s-%d", prefix, i)}
		for j := 0; j < services; j++ {
			g.Services = append(g.Services, fmt.Sprintf("%s-%d-%d", prefix, i, j))
			g.Addrs = append(g.Addrs, netip.AddrPortFrom(c.Net.HostAddr, uint16(firstPort+i*services+j)))
		}
		groups[i] = g
	}
	// A few at once: each registration is one Raft write on the server.
	work := make(chan SleepingGroup)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for g := range work {
				if err := c.registerSleeping(raw, g, api); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for _, g := range groups {
		work <- g
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}
	return groups
}

func (c *Cluster) registerSleeping(tmpl []byte, g SleepingGroup, api *capi.Client) error {
	var job napi.Job
	if err := json.Unmarshal(tmpl, &job); err != nil {
		return err
	}
	job.ID, job.Name = &g.Job, &g.Job
	tg := job.TaskGroups[0]
	nw := &napi.NetworkResource{}
	for j, name := range g.Services {
		label := fmt.Sprintf("p%d", j)
		nw.ReservedPorts = append(nw.ReservedPorts, napi.Port{Label: label, Value: int(g.Addrs[j].Port())})
		tg.Services = append(tg.Services, &napi.Service{Name: name, PortLabel: label, Provider: "consul"})
	}
	tg.Networks = []*napi.NetworkResource{nw}
	if _, _, err := c.API.Jobs().Register(&job, nil); err != nil {
		return fmt.Errorf("register job %s: %w", g.Job, err)
	}
	for j, name := range g.Services {
		if err := api.Agent().ServiceRegister(placeholderOf(name, g.Addrs[j], g.Job)); err != nil {
			return fmt.Errorf("register the placeholder of %s: %w", name, err)
		}
	}
	return nil
}

// placeholderOf is the registration the plugin makes for a sleeping
// instance (consul.Placeholder; the consul package's tests import this
// one, so it cannot be imported here): same ID, tag and meta, so the plugin
// takes it over as its own.
func placeholderOf(service string, ap netip.AddrPort, job string) *capi.AgentServiceRegistration {
	h := sha256.Sum256([]byte(fmt.Sprintf("%s\x00%s\x00%s\x00%s\x00%s", "default", job, "web", service, ap)))
	id := "zeroscale-asleep-" + service + "-" + hex.EncodeToString(h[:6])
	return &capi.AgentServiceRegistration{
		ID: id, Name: service, Address: ap.Addr().String(), Port: int(ap.Port()),
		Tags: []string{"zeroscale-asleep"},
		Meta: map[string]string{"zeroscale-namespace": "default", "zeroscale-job": job, "zeroscale-group": "web",
			"external-source": "zeroscale"},
		Check: &capi.AgentServiceCheck{CheckID: id + "-ttl", Name: "zeroscale: service asleep, wakes on connect",
			TTL: "1h", Status: capi.HealthPassing, DeregisterCriticalServiceAfter: "1m"},
	}
}

// DeregisterAll removes every service instance registered through the
// node's Consul agent whose name starts with prefix.
func (c *Cluster) DeregisterAll(t testing.TB, prefix string) {
	t.Helper()
	api := c.Consul.Client(t, c.Consul.Token)
	svcs, err := api.Agent().ServicesWithFilter(fmt.Sprintf("Service matches %q", "^"+prefix))
	if err != nil {
		t.Fatalf("list services: %v", err)
	}
	for id := range svcs {
		_ = api.Agent().ServiceDeregister(id)
	}
}
