package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"
)

// ConsulOptions tunes a test Consul agent.
type ConsulOptions struct {
	// ManagementToken, when set, enables ACLs with default deny and this
	// bootstrap token (also the agent's own token, so it can register its
	// node).
	ManagementToken string
	NodeName        string
	// TLS serves the HTTP API over HTTPS only, with a server certificate
	// from MakeConsulCerts; there is no plain HTTP listener.
	TLS bool
}

// Consul is a running dev agent.
type Consul struct {
	*process
	// HTTPAddr is the API's host:port (HTTPS with ConsulOptions.TLS).
	HTTPAddr string
	DNSAddr  string
	NodeName string
	Token    string
	// Certs are the agent's CA and certificates (ConsulOptions.TLS); CA
	// is empty without TLS.
	Certs ConsulCerts
	dir   string
}

// ConsulCerts are a CA and certificates made with Consul's own `consul tls`
// commands, as its documentation has operators do.
type ConsulCerts struct {
	CA                    string // consul-agent-ca.pem
	ServerCert, ServerKey string // -server -dc dc1: server.dc1.consul, localhost, 127.0.0.1
	ClientCert, ClientKey string // -client -dc dc1
}

// MakeConsulCerts creates a CA, a server and a client certificate for dc1
// in a new directory.
func MakeConsulCerts(t testing.TB) ConsulCerts {
	t.Helper()
	dir := t.TempDir()
	for _, args := range [][]string{{"ca", "create"}, {"cert", "create", "-server", "-dc", "dc1"}, {"cert", "create", "-client", "-dc", "dc1"}} {
		cmd := exec.Command(Binary(t, "consul"), append([]string{"tls"}, args...)...)
		cmd.Dir = dir
		cmd.Env = cleanEnv()
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("consul tls %v: %v\n%s", args, err, out)
		}
	}
	at := func(name string) string { return filepath.Join(dir, name) }
	return ConsulCerts{
		CA:         at("consul-agent-ca.pem"),
		ServerCert: at("dc1-server-consul-0.pem"), ServerKey: at("dc1-server-consul-0-key.pem"),
		ClientCert: at("dc1-client-consul-0.pem"), ClientKey: at("dc1-client-consul-0-key.pem"),
	}
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
  enabled                  = true
  default_policy           = "deny"
  enable_token_persistence = false
  tokens {
    initial_management = %q
    agent              = %q
  }
}`, opts.ManagementToken, opts.ManagementToken)
	}
	// ports[0] serves the API: plain HTTP, or HTTPS alone.
	http, https, tls := ports[0], -1, ""
	var certs ConsulCerts
	if opts.TLS {
		certs = MakeConsulCerts(t)
		http, https = -1, ports[0]
		tls = fmt.Sprintf(`tls {
  defaults {
    ca_file   = %q
    cert_file = %q
    key_file  = %q
  }
}`, certs.CA, certs.ServerCert, certs.ServerKey)
	}
	cfg := fmt.Sprintf(`
node_name      = %q
bind_addr      = "127.0.0.1"
client_addr    = "127.0.0.1"
advertise_addr = "127.0.0.1"
log_level      = "INFO"
ports {
  http     = %d
  https    = %d
  dns      = %d
  server   = %d
  serf_lan = %d
  serf_wan = %d
  grpc     = -1
  grpc_tls = -1
}
%s
%s
`, opts.NodeName, http, https, ports[1], ports[2], ports[3], ports[4], acl, tls)
	cfgPath := filepath.Join(dir, "consul.hcl")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c := &Consul{
		HTTPAddr: fmt.Sprintf("127.0.0.1:%d", ports[0]),
		DNSAddr:  fmt.Sprintf("127.0.0.1:%d", ports[1]),
		NodeName: opts.NodeName,
		Token:    opts.ManagementToken,
		Certs:    certs,
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
	cfg := &capi.Config{Address: c.HTTPAddr, Token: token}
	if c.Certs.CA != "" {
		cfg.Scheme, cfg.TLSConfig = "https", capi.TLSConfig{CAFile: c.Certs.CA}
	}
	client, err := capi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return client
}

// CreateToken creates a policy of these rules, named name, and a token
// holding it alone; it returns the token's secret. It needs ACLs
// (ConsulOptions.ManagementToken).
func (c *Consul) CreateToken(t testing.TB, name, rules string) string {
	t.Helper()
	if c.Token == "" {
		t.Fatal("CreateToken: the agent runs without ACLs")
	}
	acl := c.Client(t, c.Token).ACL()
	policy, _, err := acl.PolicyCreate(&capi.ACLPolicy{Name: name, Rules: rules}, nil)
	if err != nil {
		t.Fatalf("consul policy %s: %v\n%s", name, err, rules)
	}
	token, _, err := acl.TokenCreate(&capi.ACLToken{Description: name,
		Policies: []*capi.ACLTokenPolicyLink{{ID: policy.ID}}}, nil)
	if err != nil {
		t.Fatalf("consul token for %s: %v", name, err)
	}
	return token.SecretID
}

// Stop stops the agent now.
func (c *Consul) Stop() { c.process.stop(10 * time.Second) }
