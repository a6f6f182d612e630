package plugin

import (
	"strings"
	"testing"
)

// configFields are the names a config error may start with.
var configFields = []string{"interfaces[", "gate_mode[", "metrics_address", "wake_from", "ignore_sources",
	"health_check_processes", "syn_max_age", "forward_grace", "bpf_pin_path", "nomad.address", "consul.address",
	"consul.kv_prefix", "consul.cert_file"}

// FuzzConfigValidate: any plugin config is accepted or refused with errors
// that each name their field, never a panic.
func FuzzConfigValidate(f *testing.F) {
	f.Add("eth0", "tc", "127.0.0.1:9464", "10.0.0.0/8", "10.0.5.0/24", "consul", "60s", "/sys/fs/bpf/zeroscale",
		"http://127.0.0.1:4646", "127.0.0.1:8500", "zeroscale")
	f.Add("", "turbo", "9464", "10.0.0.0/33", "nope", "a-very-long-process-name", "10ms", "relative",
		"127.0.0.1:4646", "localhost", "/")
	f.Add("a/b", "", "", "::1", "fe80::/10", "", "-1s", "", "unix:///var/run/nomad.sock", "unix:///tmp/consul.sock", " ")
	f.Fuzz(func(t *testing.T, iface, mode, metrics, wake, ignore, checker, maxAge, pin, nomadAddr, consulAddr, prefix string) {
		c := defaults()
		c.Interfaces = []string{iface}
		c.GateMode = map[string]string{iface: mode}
		c.MetricsAddress = metrics
		c.WakeFrom = []string{wake}
		c.IgnoreSources = []string{ignore}
		c.HealthCheckProcesses = []string{checker}
		c.SYNMaxAge = maxAge
		c.BPFPinPath = pin
		c.Nomad.Address = nomadAddr
		c.Consul.Address = consulAddr
		c.Consul.KVPrefix = prefix
		_, err := c.validate()
		if err == nil {
			return
		}
		for _, line := range strings.Split(err.Error(), "\n") {
			named := false
			for _, field := range configFields {
				named = named || strings.HasPrefix(line, field)
			}
			if !named {
				t.Fatalf("config error %q does not start with the field's name", line)
			}
		}
	})
}
