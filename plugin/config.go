package plugin

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/nomad/plugins/shared/hclspec"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
)

// configSpec is the `plugin "nomad-driver-zeroscale" { config { … } }` block.
var configSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"interfaces": hclspec.NewAttr("interfaces", "list(string)", false),
	"gate_mode":  hclspec.NewBlockAttrs("gate_mode", "string", false),
	"metrics_address": hclspec.NewDefault(
		hclspec.NewAttr("metrics_address", "string", false),
		hclspec.NewLiteral(`"127.0.0.1:9464"`),
	),
	"wake_from":      hclspec.NewAttr("wake_from", "list(string)", false),
	"ignore_sources": hclspec.NewAttr("ignore_sources", "list(string)", false),
	"health_check_processes": hclspec.NewDefault(
		hclspec.NewAttr("health_check_processes", "list(string)", false),
		hclspec.NewLiteral(`["consul", "nomad", "pg_isready"]`),
	),
	"syn_replay": hclspec.NewDefault(
		hclspec.NewAttr("syn_replay", "bool", false),
		hclspec.NewLiteral("true"),
	),
	"syn_max_age": hclspec.NewDefault(
		hclspec.NewAttr("syn_max_age", "string", false),
		hclspec.NewLiteral(`"60s"`),
	),
	"forward_grace": hclspec.NewDefault(
		hclspec.NewAttr("forward_grace", "string", false),
		hclspec.NewLiteral(`"5m"`),
	),
	"dry_run": hclspec.NewDefault(
		hclspec.NewAttr("dry_run", "bool", false),
		hclspec.NewLiteral("false"),
	),
	"bpf_pin_path": hclspec.NewDefault(
		hclspec.NewAttr("bpf_pin_path", "string", false),
		hclspec.NewLiteral(`"`+bpf.DefaultPinPath+`"`),
	),
	"nomad": hclspec.NewBlock("nomad", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"address":    hclspec.NewAttr("address", "string", false),
		"token":      hclspec.NewAttr("token", "string", false),
		"token_file": hclspec.NewAttr("token_file", "string", false),
	})),
	"consul": hclspec.NewBlock("consul", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"address":              hclspec.NewAttr("address", "string", false),
		"token":                hclspec.NewAttr("token", "string", false),
		"token_file":           hclspec.NewAttr("token_file", "string", false),
		"kv_prefix":            hclspec.NewDefault(hclspec.NewAttr("kv_prefix", "string", false), hclspec.NewLiteral(`"zeroscale"`)),
		"ca_file":              hclspec.NewAttr("ca_file", "string", false),
		"cert_file":            hclspec.NewAttr("cert_file", "string", false),
		"key_file":             hclspec.NewAttr("key_file", "string", false),
		"tls_server_name":      hclspec.NewAttr("tls_server_name", "string", false),
		"insecure_skip_verify": hclspec.NewAttr("insecure_skip_verify", "bool", false),
	})),
})

// Config is the decoded plugin config.
type Config struct {
	Interfaces           []string          `codec:"interfaces"`
	GateMode             map[string]string `codec:"gate_mode"`
	MetricsAddress       string            `codec:"metrics_address"`
	WakeFrom             []string          `codec:"wake_from"`
	IgnoreSources        []string          `codec:"ignore_sources"`
	HealthCheckProcesses []string          `codec:"health_check_processes"`
	SYNReplay            bool              `codec:"syn_replay"`
	SYNMaxAge            string            `codec:"syn_max_age"`
	ForwardGrace         string            `codec:"forward_grace"`
	DryRun               bool              `codec:"dry_run"`
	BPFPinPath           string            `codec:"bpf_pin_path"`
	Nomad                NomadConfig       `codec:"nomad"`
	Consul               ConsulConfig      `codec:"consul"`
}

// NomadConfig says how to reach the Nomad API.
type NomadConfig struct {
	Address   string `codec:"address"`
	Token     string `codec:"token"`
	TokenFile string `codec:"token_file"` // read again as it changes
}

// ConsulConfig says how to reach the local Consul agent.
type ConsulConfig struct {
	Address            string `codec:"address"`
	Token              string `codec:"token"`
	TokenFile          string `codec:"token_file"` // read again as it changes
	KVPrefix           string `codec:"kv_prefix"`
	CAFile             string `codec:"ca_file"`
	CertFile           string `codec:"cert_file"`
	KeyFile            string `codec:"key_file"`
	TLSServerName      string `codec:"tls_server_name"`
	InsecureSkipVerify bool   `codec:"insecure_skip_verify"`
}

// settings is Config checked and converted.
type settings struct {
	Config
	wakeFrom      []netip.Prefix
	ignoreSources []netip.Prefix
	gateModes     map[string]bpf.AttachMode
	synMaxAge     time.Duration
	forwardGrace  time.Duration
}

// validate checks every field; errors name the field as written in HCL.
func (c Config) validate() (settings, error) {
	s := settings{Config: c, gateModes: map[string]bpf.AttachMode{}}
	var errs []error
	fail := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}

	seen := map[string]bool{}
	for i, name := range c.Interfaces {
		switch {
		case strings.TrimSpace(name) == "":
			fail(fmt.Sprintf("interfaces[%d]", i), "empty interface name")
		case len(name) > 15 || strings.ContainsAny(name, "/ \t"):
			fail(fmt.Sprintf("interfaces[%d]", i), "%q is not an interface name", name)
		case seen[name]:
			fail(fmt.Sprintf("interfaces[%d]", i), "%q is listed twice", name)
		}
		seen[name] = true
	}
	for name, mode := range c.GateMode {
		m, err := bpf.ParseAttachMode(mode)
		if err != nil {
			fail(fmt.Sprintf("gate_mode[%q]", name), "%v", err)
			continue
		}
		s.gateModes[name] = m
	}
	if c.MetricsAddress != "" {
		if _, port, err := net.SplitHostPort(c.MetricsAddress); err != nil || port == "" {
			fail("metrics_address", "%q is not host:port (use \"\" to turn metrics off)", c.MetricsAddress)
		}
	}
	var err error
	if s.wakeFrom, err = prefixes(c.WakeFrom); err != nil {
		fail("wake_from", "%v", err)
	}
	if s.ignoreSources, err = prefixes(c.IgnoreSources); err != nil {
		fail("ignore_sources", "%v", err)
	}
	limits, err := bpf.Limits()
	if err != nil {
		fail("plugin", "%v", err)
	}
	// Lists longer than their kernel maps fail closed: a part of wake_from
	// applied would wake on too few sources, or on any if none applied.
	tooLong := func(field string, n, limit int) {
		if err == nil && n > limit {
			fail(field, "%d entries; the kernel map holds at most %d", n, limit)
		}
	}
	tooLong("wake_from", len(distinct(s.wakeFrom)), limits.WakeFrom)
	tooLong("ignore_sources", len(distinct(s.ignoreSources)), limits.IgnoreSources)
	tooLong("health_check_processes", len(distinct(c.HealthCheckProcesses)), limits.CheckerProcesses)
	for i, p := range c.HealthCheckProcesses {
		if p == "" || len(p) > 15 {
			fail(fmt.Sprintf("health_check_processes[%d]", i), "%q is not a process name (1–15 bytes, as in /proc/PID/comm)", p)
		}
	}
	if c.SYNMaxAge != "" {
		if s.synMaxAge, err = time.ParseDuration(c.SYNMaxAge); err != nil || s.synMaxAge < time.Second {
			fail("syn_max_age", "%q is not a duration of at least 1s", c.SYNMaxAge)
		}
	}
	if c.ForwardGrace != "" {
		if s.forwardGrace, err = time.ParseDuration(c.ForwardGrace); err != nil || s.forwardGrace < time.Second {
			fail("forward_grace", "%q is not a duration of at least 1s", c.ForwardGrace)
		}
	}
	if c.BPFPinPath != "" && !strings.HasPrefix(filepath.Clean(c.BPFPinPath), bpf.BPFFSRoot+"/") {
		fail("bpf_pin_path", "%q must be a directory below %s (a bpffs)", c.BPFPinPath, bpf.BPFFSRoot)
	}
	if c.Nomad.Address != "" && !nomadURL(c.Nomad.Address) {
		fail("nomad.address", "%q is not a URL like http://127.0.0.1:4646 or unix:///run/nomad.sock", c.Nomad.Address)
	}
	checkToken("nomad", c.Nomad.Token, c.Nomad.TokenFile, "NOMAD_TOKEN", "NOMAD_TOKEN_FILE", fail)
	checkToken("consul", c.Consul.Token, c.Consul.TokenFile, "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", fail)
	checkConsulConnection(c.Consul, fail)
	if p := c.Consul.KVPrefix; p != "" && (strings.Trim(p, "/") == "" || strings.ContainsAny(p, " \t\n")) {
		fail("consul.kv_prefix", "%q is not a usable KV prefix", p)
	}
	return s, errors.Join(errs...)
}

// nomadURL: http(s)://host[:port] or unix:///path, as the Nomad API client
// takes them.
func nomadURL(addr string) bool {
	u, err := url.Parse(addr)
	if err != nil {
		return false
	}
	switch u.Scheme {
	case "http", "https":
		return u.Host != ""
	case "unix":
		return u.Host == "" && strings.HasPrefix(u.Path, "/") && strings.Trim(u.Path, "/") != ""
	}
	return false
}

// distinct drops repeats: the kernel maps hold each entry once.
func distinct[T comparable](in []T) []T {
	seen := make(map[T]bool, len(in))
	var out []T
	for _, v := range in {
		if !seen[v] {
			seen[v] = true
			out = append(out, v)
		}
	}
	return out
}

// prefixes parses CIDR prefixes; a bare address means just that host.
func prefixes(in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for i, s := range in {
		s = strings.TrimSpace(s)
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
			continue
		}
		return nil, fmt.Errorf("[%d] %q is not a CIDR prefix or an address", i, s)
	}
	return out, nil
}
