package plugin

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
)

// parse runs HCL through the plugin's hclspec (defaults included) and the
// msgpack decoding Nomad uses, as the client does.
func parse(t *testing.T, body string) Config {
	t.Helper()
	var c Config
	hclutils.NewConfigParser(configSpec).ParseHCL(t, "config {\n"+body+"\n}", &c)
	return c
}

func TestConfigDefaults(t *testing.T) {
	c := parse(t, "")
	s, err := c.validate()
	if err != nil {
		t.Fatal(err)
	}
	if c.MetricsAddress != "127.0.0.1:9464" || !c.SYNReplay || c.DryRun || c.BPFPinPath != bpf.DefaultPinPath ||
		c.Consul.KVPrefix != "" || len(c.Interfaces) != 0 || s.synMaxAge != time.Minute {
		t.Fatalf("defaults %+v", c)
	}
	if strings.Join(c.HealthCheckProcesses, ",") != "consul,nomad,pg_isready" {
		t.Fatalf("health check processes %v", c.HealthCheckProcesses)
	}
	if d := defaults(); d.MetricsAddress != c.MetricsAddress || d.SYNReplay != c.SYNReplay || d.SYNMaxAge != c.SYNMaxAge {
		t.Fatalf("defaults() %+v disagrees with the spec %+v", d, c)
	}
}

func TestConfigFull(t *testing.T) {
	files := secretFiles(t)
	c := parse(t, `
interfaces      = ["eth0", "lo"]
gate_mode {
  eth0 = "native"
  lo   = "generic"
}
metrics_address = ""
wake_from       = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
ignore_sources  = ["10.0.5.0/24"]
syn_replay      = false
syn_max_age     = "30s"
dry_run         = true
nomad {
  address = "https://nomad.service.consul:4646"
  token   = "secret"
}
consul {
  address    = "127.0.0.1:8501"
  kv_prefix  = "zs/prod"
  ca_file    = "`+files.ca+`"
  cert_file  = "`+files.cert+`"
  key_file   = "`+files.key+`"
  token_file = "`+files.token+`"
}
`)
	s, err := c.validate()
	if err != nil {
		t.Fatal(err)
	}
	if len(s.wakeFrom) != 3 || s.wakeFrom[2] != netip.MustParsePrefix("192.0.2.7/32") || s.gateModes["eth0"] != bpf.ModeNative ||
		s.gateModes["lo"] != bpf.ModeGeneric || c.SYNReplay || !c.DryRun || s.synMaxAge != 30*time.Second ||
		c.Nomad.Token != "secret" || c.Consul.KVPrefix != "zs/prod" || c.MetricsAddress != "" ||
		c.Consul.TokenFile != files.token || c.Consul.CertFile != files.cert {
		t.Fatalf("parsed %+v %+v", c, s)
	}
}

func TestConfigErrorsNameTheField(t *testing.T) {
	cases := map[string]string{
		`interfaces = ["eth0", "eth0"]`:                         `interfaces[1]: "eth0" is listed twice`,
		`interfaces = [""]`:                                     "interfaces[0]: empty interface name",
		`interfaces = ["a/b"]`:                                  "interfaces[0]:",
		`gate_mode { eth0 = "turbo" }`:                          `gate_mode["eth0"]: unknown gate mode "turbo"`,
		`metrics_address = "9464"`:                              "metrics_address:",
		`wake_from = ["10.0.0.0/33"]`:                           `wake_from: [0] "10.0.0.0/33" is not a CIDR prefix`,
		`ignore_sources = ["10.0.0.1", "nope"]`:                 `ignore_sources: [1] "nope"`,
		`health_check_processes = ["a-very-long-process-name"]`: "health_check_processes[0]:",
		`syn_max_age = "soon"`:                                  "syn_max_age:",
		`syn_max_age = "10ms"`:                                  "syn_max_age:",
		`forward_grace = "forever"`:                             "forward_grace:",
		`bpf_pin_path = "relative"`:                             "bpf_pin_path:",
		`bpf_pin_path = "/tmp/zeroscale"`:                       `bpf_pin_path: "/tmp/zeroscale" must be a directory below /sys/fs/bpf`,
		`bpf_pin_path = "/sys/fs/bpf/../../tmp"`:                "bpf_pin_path:",
		`bpf_pin_path = "/sys/fs/bpf"`:                          "bpf_pin_path:",
		`nomad { address = "127.0.0.1:4646" }`:                  "nomad.address:",
		`consul { address = "localhost" }`:                      "consul.address:",
		`consul { kv_prefix = "/" }`:                            "consul.kv_prefix:",
		`consul { cert_file = "/etc/c.pem" }`:                   "consul.cert_file:",
	}
	for body, want := range cases {
		c := parse(t, body)
		_, err := c.validate()
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want it to contain %q", body, err, want)
		}
	}
	// Several problems are reported together.
	c := parse(t, "wake_from = [\"x\"]\nsyn_max_age = \"x\"")
	if _, err := c.validate(); err == nil || !strings.Contains(err.Error(), "wake_from") || !strings.Contains(err.Error(), "syn_max_age") {
		t.Fatalf("combined error %v", err)
	}
}

func TestListsLongerThanTheirKernelMapsAreRefused(t *testing.T) {
	limits, err := bpf.Limits()
	if err != nil {
		t.Fatal(err)
	}
	hosts := func(n int) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).String()
		}
		return out
	}
	c := defaults()
	c.WakeFrom = hosts(limits.WakeFrom)
	c.IgnoreSources = hosts(limits.IgnoreSources)
	if _, err := c.validate(); err != nil {
		t.Fatalf("lists at the limit refused: %v", err)
	}
	c.WakeFrom = hosts(limits.WakeFrom + 1)
	c.IgnoreSources = append(hosts(limits.IgnoreSources), hosts(limits.IgnoreSources)...) // repeats count once
	_, err = c.validate()
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("wake_from: %d entries; the kernel map holds at most %d", limits.WakeFrom+1, limits.WakeFrom)) {
		t.Fatalf("error %v, want one naming wake_from and its limit", err)
	}
	if strings.Contains(err.Error(), "ignore_sources") {
		t.Fatalf("repeated entries counted twice: %v", err)
	}
	c = defaults()
	for i := 0; i <= limits.CheckerProcesses; i++ {
		c.HealthCheckProcesses = append(c.HealthCheckProcesses, fmt.Sprintf("checker%d", i))
	}
	if _, err := c.validate(); err == nil || !strings.Contains(err.Error(), "health_check_processes:") {
		t.Fatalf("error %v, want one naming health_check_processes", err)
	}
}

// files are a token file, a CA, a certificate it signed with its key, and
// things that are not what their field wants.
type files struct {
	token, empty, ca, cert, key, otherKey, notPEM, missing string
}

func secretFiles(t *testing.T) files {
	t.Helper()
	dir := t.TempDir()
	f := files{
		token: filepath.Join(dir, "token"), empty: filepath.Join(dir, "empty"), ca: filepath.Join(dir, "ca.pem"),
		cert: filepath.Join(dir, "cert.pem"), key: filepath.Join(dir, "key.pem"), otherKey: filepath.Join(dir, "other-key.pem"),
		notPEM: filepath.Join(dir, "not.pem"), missing: filepath.Join(dir, "missing"),
	}
	write := func(path string, data []byte) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	keyPEM := func(k *ecdsa.PrivateKey) []byte {
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
	}
	caKey, leafKey := newKey(), newKey()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	leafTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "client"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, caTmpl, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	write(f.token, []byte("6f1c2b3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c\n"))
	write(f.empty, []byte("\n"))
	write(f.ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}))
	write(f.cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}))
	write(f.key, keyPEM(leafKey))
	write(f.otherKey, keyPEM(newKey()))
	write(f.notPEM, []byte("not a certificate\n"))
	return f
}

func TestTokenAndTLSErrorsNameTheField(t *testing.T) {
	f := secretFiles(t)
	t.Setenv("NOMAD_TOKEN", "")
	t.Setenv("NOMAD_TOKEN_FILE", "")
	t.Setenv("CONSUL_HTTP_TOKEN", "")
	t.Setenv("CONSUL_HTTP_TOKEN_FILE", "")
	for _, c := range []struct{ name, body, want string }{
		{"nomad token and token_file", `nomad { token = "t" token_file = "` + f.token + `" }`,
			"nomad.token: set together with nomad.token_file"},
		{"consul token and token_file", `consul { token = "t" token_file = "` + f.token + `" }`,
			"consul.token: set together with consul.token_file"},
		{"missing nomad token file", `nomad { token_file = "` + f.missing + `" }`,
			"nomad.token_file: open " + f.missing + ": no such file or directory"},
		{"missing consul token file", `consul { token_file = "` + f.missing + `" }`,
			"consul.token_file: open " + f.missing},
		{"empty token file", `consul { token_file = "` + f.empty + `" }`, "consul.token_file: " + f.empty + " is empty"},
		{"token file that is a directory", `nomad { token_file = "` + filepath.Dir(f.token) + `" }`, "nomad.token_file: read "},
		{"cert without key", `consul { cert_file = "` + f.cert + `" }`, "consul.cert_file: set without key_file"},
		{"key without cert", `consul { key_file = "` + f.key + `" }`, "consul.key_file: set without cert_file"},
		{"cert with another key", `consul {
  cert_file = "` + f.cert + `"
  key_file  = "` + f.otherKey + `"
}`, "consul.cert_file: " + f.cert + " with key_file " + f.otherKey + ": private key does not match public key"},
		{"missing key", `consul {
  cert_file = "` + f.cert + `"
  key_file  = "` + f.missing + `"
}`, "consul.key_file: open " + f.missing},
		{"missing ca file", `consul { ca_file = "` + f.missing + `" }`, "consul.ca_file: open " + f.missing},
		{"ca file without a certificate", `consul { ca_file = "` + f.notPEM + `" }`, "consul.ca_file: " + f.notPEM + " holds no PEM certificate"},
		{"plain http with a CA", `consul {
  address = "http://127.0.0.1:8501"
  ca_file = "` + f.ca + `"
}`, `consul.address: "http://127.0.0.1:8501" is plain http, but ca_file or cert_file is set`},
		{"unknown scheme", `consul { address = "tcp://127.0.0.1:8500" }`, `consul.address: "tcp://127.0.0.1:8500": unknown scheme "tcp"`},
		{"relative socket", `consul { address = "unix://consul.sock" }`, "consul.address: \"unix://consul.sock\" does not name a socket"},
		{"bad port", `consul { address = "127.0.0.1:http" }`, "consul.address:"},
		{"nomad socket without a path", `nomad { address = "unix://" }`, "nomad.address:"},
	} {
		_, err := parse(t, c.body).validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want it to contain %q", c.name, err, c.want)
		}
	}

	// The environment's token file counts only when nothing before it does,
	// and its error names the variable.
	t.Setenv("NOMAD_TOKEN_FILE", f.missing)
	if _, err := parse(t, "").validate(); err == nil || !strings.Contains(err.Error(), "NOMAD_TOKEN_FILE: open "+f.missing) {
		t.Errorf("missing NOMAD_TOKEN_FILE: %v", err)
	}
	for _, body := range []string{`nomad { token = "t" }`, `nomad { token_file = "` + f.token + `" }`} {
		if _, err := parse(t, body).validate(); err != nil {
			t.Errorf("%s with a missing NOMAD_TOKEN_FILE, which does not count: %v", body, err)
		}
	}
	t.Setenv("NOMAD_TOKEN", "from-env")
	if _, err := parse(t, "").validate(); err != nil {
		t.Errorf("NOMAD_TOKEN comes before NOMAD_TOKEN_FILE: %v", err)
	}
	t.Setenv("CONSUL_HTTP_TOKEN_FILE", f.empty)
	if _, err := parse(t, "").validate(); err == nil || !strings.Contains(err.Error(), "CONSUL_HTTP_TOKEN_FILE: "+f.empty+" is empty") {
		t.Errorf("empty CONSUL_HTTP_TOKEN_FILE: %v", err)
	}
}

func TestSocketAddressesAndTLSAreAccepted(t *testing.T) {
	f := secretFiles(t)
	for _, body := range []string{
		`consul { address = "unix:///run/consul/http.sock" }`,
		`nomad { address = "unix:///run/nomad/http.sock" }`,
		`consul {
  address              = "https://consul.example:8501/proxied"
  ca_file              = "` + f.ca + `"
  tls_server_name      = "server.dc1.consul"
  insecure_skip_verify = false
}`,
		`consul {
  address   = "unix:///run/consul/https.sock"
  cert_file = "` + f.cert + `"
  key_file  = "` + f.key + `"
}`,
		`nomad { token_file = "` + f.token + `" }`,
	} {
		if _, err := parse(t, body).validate(); err != nil {
			t.Errorf("%s: %v", body, err)
		}
	}
}
