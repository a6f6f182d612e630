package plugin

import (
	"fmt"
	"net/netip"
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
  address   = "127.0.0.1:8501"
  kv_prefix = "zs/prod"
  ca_file   = "/etc/consul/ca.pem"
}
`)
	s, err := c.validate()
	if err != nil {
		t.Fatal(err)
	}
	if len(s.wakeFrom) != 3 || s.wakeFrom[2] != netip.MustParsePrefix("192.0.2.7/32") || s.gateModes["eth0"] != bpf.ModeNative ||
		s.gateModes["lo"] != bpf.ModeGeneric || c.SYNReplay || !c.DryRun || s.synMaxAge != 30*time.Second ||
		c.Nomad.Token != "secret" || c.Consul.KVPrefix != "zs/prod" || c.MetricsAddress != "" {
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
