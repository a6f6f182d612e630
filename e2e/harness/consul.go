package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"
)

// ConsulOptions tunes a test Consul agent.
type ConsulOptions struct {
	// ManagementToken, when set, enables ACLs with default deny and this
	// bootstrap token.
	ManagementToken string
	NodeName        string
}

// Consul is a running dev agent.
type Consul struct {
	*process
	HTTPAddr string
	DNSAddr  string
	NodeName string
	Token    string
	dir      string
}

// StartConsul starts `consul agent -dev` on free loopback ports and stops it
// when the test ends.
func StartConsul(t testing.TB, opts ConsulOptions) *Consul {
	t.Helper()
	bin := Binary(t, "consul")
	ports := FreePorts(t, 5)
	dir := t.TempDir()
	if opts.NodeName == "" {
		opts.NodeName = fmt.Sprintf("zs-consul-%d", ports[0])
	}
	acl := ""
	if opts.ManagementToken != "" {
		acl = fmt.Sprintf(`acl {
  enabled        = true
  default_policy = "deny"
  tokens {
    initial_management = %q
    agent              = %q
  }
}`, opts.ManagementToken, opts.ManagementToken)
	}
	cfg := fmt.Sprintf(`
node_name      = %q
bind_addr      = "127.0.0.1"
client_addr    = "127.0.0.1"
advertise_addr = "127.0.0.1"
log_level      = "INFO"
ports {
  http     = %d
  dns      = %d
  server   = %d
  serf_lan = %d
  serf_wan = %d
  grpc     = -1
  grpc_tls = -1
}
%s
`, opts.NodeName, ports[0], ports[1], ports[2], ports[3], ports[4], acl)
	cfgPath := filepath.Join(dir, "consul.hcl")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c := &Consul{
		HTTPAddr: fmt.Sprintf("127.0.0.1:%d", ports[0]),
		DNSAddr:  fmt.Sprintf("127.0.0.1:%d", ports[1]),
		NodeName: opts.NodeName,
		Token:    opts.ManagementToken,
		dir:      dir,
	}
	c.process = startProcess(t, "consul", cleanEnv(), bin, "agent", "-dev", "-config-file", cfgPath)
	t.Cleanup(func() { c.process.stop(10 * time.Second) })

	client := c.Client(t, opts.ManagementToken)
	waitFor(t, "consul leader and node registration", 60*time.Second, c.process, func() bool {
		leader, err := client.Status().Leader()
		if err != nil || leader == "" {
			return false
		}
		node, _, err := client.Catalog().Node(opts.NodeName, nil)
		return err == nil && node != nil
	})
	return c
}

// Client returns an API client for the agent with the given token.
func (c *Consul) Client(t testing.TB, token string) *capi.Client {
	t.Helper()
	client, err := capi.NewClient(&capi.Config{Address: c.HTTPAddr, Token: token})
	if err != nil {
		t.Fatal(err)
	}
	return client
}

// Stop stops the agent now.
func (c *Consul) Stop() { c.process.stop(10 * time.Second) }
