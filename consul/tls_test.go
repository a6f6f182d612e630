package consul

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"
	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// These tests start Consul agents the harness does not offer: HTTPS only
// with client certificates and ACLs, and HTTP on a unix socket.

// startConsulAgent runs `consul agent -dev` with extra config (ports and
// listeners included) and stops it when the test ends.
func startConsulAgent(t *testing.T, config string) {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "consul.hcl")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(harness.Binary(t, "consul"), "agent", "-dev", "-config-file", path)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGINT)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if t.Failed() {
			t.Logf("consul output:\n%s", out.String())
		}
	})
}

// consulConfig is a dev agent's config on free loopback ports, with the
// given HTTP listeners and more.
func consulConfig(t *testing.T, http, https int, more string) string {
	ports := harness.FreePorts(t, 2)
	return fmt.Sprintf(`
node_name      = "zs-%d"
bind_addr      = "127.0.0.1"
advertise_addr = "127.0.0.1"
client_addr    = "127.0.0.1"
log_level      = "INFO"
ports {
  http     = %d
  https    = %d
  dns      = -1
  grpc     = -1
  grpc_tls = -1
  server   = %d
  serf_lan = %d
  serf_wan = -1
}
%s`, ports[0], http, https, ports[0], ports[1], more)
}

// eventually retries f for up to 30 s (an agent electing itself, a token
// file read again).
func eventually(t *testing.T, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// makeCerts creates a CA, a server and a client certificate with Consul's
// own `consul tls` commands.
func makeCerts(t *testing.T) (dir string) {
	t.Helper()
	dir = t.TempDir()
	for _, args := range [][]string{{"ca", "create"}, {"cert", "create", "-server", "-dc", "dc1"}, {"cert", "create", "-client", "-dc", "dc1"}} {
		cmd := exec.Command(harness.Binary(t, "consul"), append([]string{"tls"}, args...)...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("consul tls %v: %v\n%s", args, err, out)
		}
	}
	return dir
}

func writeToken(t *testing.T, path, token string) {
	t.Helper()
	// As an operator's tooling would: a new file renamed over the old one.
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestTLSAndATokenFileRotatedWhileRunning(t *testing.T) {
	certs := makeCerts(t)
	ca := filepath.Join(certs, "consul-agent-ca.pem")
	clientCert, clientKey := filepath.Join(certs, "dc1-client-consul-0.pem"), filepath.Join(certs, "dc1-client-consul-0-key.pem")
	const management = "5b0a1f9e-64c2-4c3e-9f6b-2a7d9c1e8b40"
	https := harness.FreePorts(t, 1)[0]
	startConsulAgent(t, consulConfig(t, -1, https, fmt.Sprintf(`
tls {
  defaults {
    ca_file   = %q
    cert_file = %q
    key_file  = %q
  }
  https { verify_incoming = true }
}
acl {
  enabled        = true
  default_policy = "deny"
  tokens {
    initial_management = %q
    agent              = %q
  }
}
`, ca, filepath.Join(certs, "dc1-server-consul-0.pem"), filepath.Join(certs, "dc1-server-consul-0-key.pem"), management, management)))
	addr := fmt.Sprintf("127.0.0.1:%d", https)

	root, err := capi.NewClient(&capi.Config{Address: addr, Scheme: "https", Token: management,
		TLSConfig: capi.TLSConfig{CAFile: ca, CertFile: clientCert, KeyFile: clientKey}})
	if err != nil {
		t.Fatal(err)
	}
	var policy *capi.ACLPolicy
	eventually(t, "create a policy", func() (err error) {
		policy, _, err = root.ACL().PolicyCreate(&capi.ACLPolicy{Name: "zs-kv",
			Rules: `key_prefix "zs-tls/" { policy = "write" }  agent_prefix "" { policy = "read" }`}, nil)
		return err
	})
	good, _, err := root.ACL().TokenCreate(&capi.ACLToken{Policies: []*capi.ACLTokenPolicyLink{{ID: policy.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	weak, _, err := root.ACL().TokenCreate(&capi.ACLToken{Description: "no rights"}, nil)
	if err != nil {
		t.Fatal(err)
	}

	tokenFile := filepath.Join(t.TempDir(), "consul-token")
	writeToken(t, tokenFile, good.SecretID)
	// No scheme in the address: the CA and the client certificate mean https.
	c, err := New(Config{Address: addr, TokenFile: tokenFile, CAFile: ca, CertFile: clientCert, KeyFile: clientKey,
		KVPrefix: "zs-tls"}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	group := GroupKey("default", "web", "web")
	publish := func() error {
		return c.PublishActivity(group, ActivityReport{Node: "n1", Reported: time.Now()})
	}
	if err := publish(); err != nil {
		t.Fatalf("publish over TLS with the token file's token: %v", err)
	}
	if reports, err := c.ReadActivity(group, time.Hour, time.Now()); err != nil || len(reports) != 1 {
		t.Fatalf("read back: %v %v", reports, err)
	}
	if node, err := c.NodeName(); err != nil || node == "" {
		t.Fatalf("node name over TLS: %q %v", node, err)
	}

	// The file is rewritten with a token without rights, then with one
	// Consul does not know: the running client uses each, and says what
	// is missing.
	for _, rotated := range []struct{ token, consulSays string }{
		{weak.SecretID, "Permission denied"},
		{"0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0", "ACL not found"},
	} {
		writeToken(t, tokenFile, rotated.token)
		eventually(t, "a denial once the file holds "+rotated.token, func() error {
			err := publish()
			var pe *PermissionError
			if errors.As(err, &pe) && strings.Contains(pe.Error(), `key_prefix "zs-tls/" { policy = "write" }`) &&
				strings.Contains(pe.Error(), rotated.consulSays) {
				t.Logf("with the rotated token: %v", err)
				return nil
			}
			return fmt.Errorf("publish: %v, want a permission error naming the rule and saying %q", err, rotated.consulSays)
		})
	}
	writeToken(t, tokenFile, good.SecretID)
	eventually(t, "publish once the good token is back", publish)

	// The TLS settings are what makes it work: without the CA, or with
	// another server name, the server is not trusted; without the client
	// certificate the server refuses (with TLS 1.3 the client may see the
	// alert or only the reset that follows it).
	for name, cfg := range map[string]Config{
		"no ca_file":   {Address: addr, Token: good.SecretID, CertFile: clientCert, KeyFile: clientKey},
		"no cert_file": {Address: "https://" + addr, Token: good.SecretID, CAFile: ca},
		"wrong tls_server_name": {Address: addr, Token: good.SecretID, CAFile: ca, CertFile: clientCert, KeyFile: clientKey,
			TLSServerName: "server.dc2.consul"},
	} {
		c, err := New(cfg, testLogger(t))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		_, err = c.NodeName()
		t.Logf("%s: %v", name, err)
		if err == nil || name != "no cert_file" && !strings.Contains(err.Error(), "tls: failed to verify certificate") {
			t.Errorf("%s: %v, want a TLS error", name, err)
		}
	}
}

func TestConsulOverAUnixSocket(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "http.sock")
	startConsulAgent(t, consulConfig(t, harness.FreePorts(t, 1)[0], -1, fmt.Sprintf(`addresses { http = "unix://%s" }`, socket)))
	c, err := New(Config{Address: "unix://" + socket, KVPrefix: "zs-unix"}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	var node string
	eventually(t, "the agent's node name over the socket", func() (err error) {
		node, err = c.NodeName()
		return err
	})
	group := GroupKey("default", "web", "web")
	eventually(t, "a KV write over the socket", func() error {
		_, err := c.SwapGroupState(group, GroupState{}, GroupState{Phase: PhaseAsleep})
		return err
	})
	if st, err := c.GroupState(group); err != nil || st.Phase != PhaseAsleep {
		t.Fatalf("read back %+v %v", st, err)
	}
	// A blocking watch too, and an agent endpoint.
	states := make(chan map[string]GroupState, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go c.WatchGroupStates(ctx, func(m map[string]GroupState) {
		select {
		case states <- m:
		default:
		}
	}, func(err error) { t.Errorf("watch: %v", err) })
	select {
	case m := <-states:
		if m[group].Phase != PhaseAsleep {
			t.Fatalf("watched %+v", m)
		}
	case <-ctx.Done():
		t.Fatal("no watch result over the socket")
	}
	ps := c.NewPlaceholders(PlaceholderOptions{})
	if err := ps.Register(Placeholder{Service: "web", Address: netip.MustParseAddr("10.0.0.1"), Port: 80}); err != nil {
		t.Fatalf("register over the socket: %v", err)
	}
	t.Logf("node %s over %s", node, socket)
}

func TestParseAddressTakesWhatConsulsClientsTake(t *testing.T) {
	for addr, want := range map[string]Endpoint{
		"127.0.0.1:8500":                 {Host: "127.0.0.1:8500"},
		"https://consul.example":         {Scheme: "https", Host: "consul.example"},
		"https://consul.example:8501/p/": {Scheme: "https", Host: "consul.example:8501", PathPrefix: "/p"},
		"http://[::1]:8500":              {Scheme: "http", Host: "[::1]:8500"},
		"unix:///run/consul/http.sock":   {Socket: "/run/consul/http.sock"},
	} {
		if got, err := ParseAddress(addr); err != nil || got != want {
			t.Errorf("%q: %+v %v, want %+v", addr, got, err, want)
		}
	}
	for _, addr := range []string{"localhost", "h:0", "h:70000", "http://h:x", "https://", "unix://", "unix://rel.sock", "tcp://a:1"} {
		if _, err := ParseAddress(addr); err == nil {
			t.Errorf("%q accepted", addr)
		}
	}
}
