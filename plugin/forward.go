package plugin

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/nat"
	"github.com/zeroscale/nomad-driver-zeroscale/scaling"
)

// natTable names the nftables table of the forwards (in the node's network
// namespace; `uninstall` removes it) after the agent's pin path, so agents
// with their own pin paths on one host (tests) keep apart.
func natTable(pinPath string) string {
	if filepath.Clean(pinPath) == filepath.Clean(bpf.DefaultPinPath) {
		return "zeroscale"
	}
	return "zeroscale-" + filepath.Base(pinPath)
}

// forwarder adapts internal/nat to the scaler: it turns on IP forwarding the
// first time a forward leaves the node, and says so.
type forwarder struct {
	table  *nat.Table
	logger hclog.Logger

	mu        sync.Mutex
	forwarded map[bool]bool // IP forwarding checked, by "is IPv4"
}

func newForwarder(pinPath string, logger hclog.Logger) (*forwarder, error) {
	t, err := nat.Open(natTable(pinPath))
	if err != nil {
		return nil, err
	}
	return &forwarder{table: t, logger: logger, forwarded: map[bool]bool{}}, nil
}

func (f *forwarder) Forward(from, to netip.AddrPort) error {
	if err := f.ensureIPForwarding(to.Addr()); err != nil {
		return err
	}
	return f.table.Forward(from, to)
}

func (f *forwarder) Unforward(from netip.AddrPort) error { return f.table.Unforward(from) }

func (f *forwarder) Forwards() (map[netip.AddrPort]scaling.Forward, error) {
	fwds, err := f.table.Forwards()
	if err != nil {
		return nil, err
	}
	out := make(map[netip.AddrPort]scaling.Forward, len(fwds))
	for from, fw := range fwds {
		out[from] = scaling.Forward{To: fw.To, Connections: fw.Connections}
	}
	return out, nil
}

// ensureIPForwarding turns on forwarding for to's family when to is on
// another node: the forwarded packets cross this one.
func (f *forwarder) ensureIPForwarding(to netip.Addr) error {
	local, err := consul.LocalAddrs()
	if err != nil {
		return fmt.Errorf("list local addresses: %w", err)
	}
	if local[to.Unmap()] {
		return nil
	}
	v4 := to.Unmap().Is4()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.forwarded[v4] {
		return nil
	}
	changed, err := nat.EnableForwarding(v4)
	if err != nil {
		return fmt.Errorf("enable IP forwarding to reach %s: %w", to, err)
	}
	if changed {
		f.logger.Info("turned IP forwarding on, to forward a parked address to another node", "ipv4", v4)
	}
	f.forwarded[v4] = true
	return nil
}

// removeForwards deletes the forwards' table, for `uninstall`.
func removeForwards(pinPath string) error {
	t, err := nat.Open(natTable(pinPath))
	if err != nil {
		return fmt.Errorf("open the forwards' table: %w", err)
	}
	defer t.Close()
	if err := t.Delete(); err != nil {
		return fmt.Errorf("remove the forwards' table: %w", err)
	}
	return nil
}
