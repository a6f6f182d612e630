package harness

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	napi "github.com/hashicorp/nomad/api"
)

// ACLOptions makes NewCluster run as a production cluster does: Consul
// serves HTTPS only, with ACLs on and "deny" by default; Nomad has ACLs on,
// bootstrapped by the harness; the Nomad agent has a Consul token of its
// own; and the plugin reaches both with tokens of its own, read from token
// files, trusting Consul's CA through ca_file.
type ACLOptions struct {
	// PluginNomadPolicy and PluginConsulPolicy are the rules of the
	// plugin's Nomad and Consul tokens; NomadAgentConsulPolicy those of the
	// Nomad agent's Consul token. Empty: examples/acl's file.
	PluginNomadPolicy      string
	PluginConsulPolicy     string
	NomadAgentConsulPolicy string
}

// The policy files of examples/acl, which the ACL tests load as they are.
const (
	PluginNomadPolicyFile      = "nomad-zeroscale.policy.hcl"
	PluginConsulPolicyFile     = "consul-zeroscale.policy.hcl"
	NomadAgentConsulPolicyFile = "consul-nomad-agent.hcl"
)

// ACLExample returns a policy file of examples/acl.
func ACLExample(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(RepoRoot(t), "examples", "acl", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func (o ACLOptions) withDefaults(t testing.TB) ACLOptions {
	t.Helper()
	if o.PluginNomadPolicy == "" {
		o.PluginNomadPolicy = ACLExample(t, PluginNomadPolicyFile)
	}
	if o.PluginConsulPolicy == "" {
		o.PluginConsulPolicy = ACLExample(t, PluginConsulPolicyFile)
	}
	if o.NomadAgentConsulPolicy == "" {
		o.NomadAgentConsulPolicy = ACLExample(t, NomadAgentConsulPolicyFile)
	}
	return o
}

// startACLConsul starts Consul over HTTPS with ACLs and makes the Consul
// tokens of the Nomad agent and the plugin.
func startACLConsul(t testing.TB, opts ACLOptions) (*Consul, *NomadACL) {
	t.Helper()
	opts = opts.withDefaults(t)
	c := StartConsul(t, ConsulOptions{ManagementToken: NewUUID(t), TLS: true})
	return c, &NomadACL{
		AgentConsulToken:  c.CreateToken(t, "nomad-agent", opts.NomadAgentConsulPolicy),
		PluginConsulToken: c.CreateToken(t, "zeroscale", opts.PluginConsulPolicy),
		PluginPolicy:      opts.PluginNomadPolicy,
	}
}

// NewUUID returns a random UUID, the form Consul and Nomad tokens take.
func NewUUID(t testing.TB) string {
	t.Helper()
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// WriteTokenFile writes a token file as an operator's tooling would: a new
// file, readable by its owner only, renamed over the old one.
func WriteTokenFile(t testing.TB, path, token string) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// aclConfig is what NomadOptions' TLS and ACL settings add to the agent's
// config: top-level blocks, lines of its consul block, and lines of the
// plugin's nomad and consul blocks. The plugin's token files go in dir.
func (n *Nomad) aclConfig(t testing.TB, dir string) (agent, consul, pluginNomad, pluginConsul string) {
	t.Helper()
	opts := n.opts
	if opts.Consul != nil && opts.Consul.Certs.CA != "" {
		consul = fmt.Sprintf("  ssl     = true\n  ca_file = %q\n", opts.Consul.Certs.CA)
		pluginConsul = fmt.Sprintf("      ca_file    = %q\n", opts.Consul.Certs.CA)
	}
	acl := opts.ACL
	if acl == nil {
		return "", consul, "", pluginConsul
	}
	if acl.PluginPolicy == "" {
		t.Fatal("NomadOptions.ACL needs a PluginPolicy")
	}
	if acl.AgentConsulToken != "" {
		consul += fmt.Sprintf("  token   = %q\n", acl.AgentConsulToken)
	}
	if acl.PluginConsulToken != "" {
		path := filepath.Join(dir, "zeroscale-consul.token")
		WriteTokenFile(t, path, acl.PluginConsulToken)
		pluginConsul += fmt.Sprintf("      token_file = %q\n", path)
	}
	// Nomad knows no token before it is bootstrapped: the file holds one it
	// will never know until bootstrapACL rewrites the file.
	n.pluginTokenFile = filepath.Join(dir, "zeroscale-nomad.token")
	WriteTokenFile(t, n.pluginTokenFile, NewUUID(t))
	pluginNomad = fmt.Sprintf("      token_file = %q\n", n.pluginTokenFile)
	return "acl {\n  enabled = true\n}\n", consul, pluginNomad, pluginConsul
}

// bootstrapACL bootstraps Nomad's ACLs with a management token of the
// harness's own (Nomad.Token), then creates the plugin's policy and token
// and writes the token to the plugin's token file, which the running
// plugin reads again.
func (n *Nomad) bootstrapACL(t testing.TB) {
	t.Helper()
	token := NewUUID(t)
	c, err := napi.NewClient(&napi.Config{Address: n.Addr})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		// Refused until the server has elected itself.
		_, _, err := c.ACLTokens().BootstrapOpts(token, nil)
		if err == nil {
			break
		}
		if n.process.exited() || time.Now().After(deadline) {
			t.Fatalf("nomad acl bootstrap: %v\n%s", err, n.Output())
		}
		time.Sleep(200 * time.Millisecond)
	}
	n.Token = token
	c = n.Client(t)
	const name = "zeroscale"
	if _, err := c.ACLPolicies().Upsert(&napi.ACLPolicy{Name: name, Description: "zeroscale plugin",
		Rules: n.opts.ACL.PluginPolicy}, nil); err != nil {
		t.Fatalf("nomad acl policy %s: %v\n%s", name, err, n.opts.ACL.PluginPolicy)
	}
	plugin, _, err := c.ACLTokens().Create(&napi.ACLToken{Name: name, Type: "client", Policies: []string{name}}, nil)
	if err != nil {
		t.Fatalf("nomad acl token for the plugin: %v", err)
	}
	WriteTokenFile(t, n.pluginTokenFile, plugin.SecretID)
}
