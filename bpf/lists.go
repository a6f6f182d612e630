package bpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// SetWakeFrom replaces the wake allow-list. With an empty list anyone may
// wake a parked service; otherwise SYNs from other sources are dropped
// without a report.
func (g *Gate) SetWakeFrom(prefixes []netip.Prefix) error {
	if err := g.replacePrefixes(g.objs.WakeFrom, prefixes); err != nil {
		return fmt.Errorf("set wake_from: %w", err)
	}
	var cfg zeroscaleGateConfig
	if err := g.objs.Config.Lookup(uint32(0), &cfg); err != nil {
		return fmt.Errorf("set wake_from: read config: %w", err)
	}
	if len(prefixes) > 0 {
		cfg.Flags |= configFlagWakeFrom
	} else {
		cfg.Flags &^= configFlagWakeFrom
	}
	if err := g.objs.Config.Put(uint32(0), &cfg); err != nil {
		return fmt.Errorf("set wake_from: write config: %w", err)
	}
	return nil
}

// SetIgnoreSources replaces the prefixes whose connections are never
// activity (remote health checkers, monitoring).
func (g *Gate) SetIgnoreSources(prefixes []netip.Prefix) error {
	if err := g.replacePrefixes(g.objs.IgnoreSources, prefixes); err != nil {
		return fmt.Errorf("set ignore_sources: %w", err)
	}
	return nil
}

// SetCheckerComms replaces the process names whose outgoing connections are
// health checks (the local Consul and Nomad agents: "consul", "nomad").
func (g *Gate) SetCheckerComms(comms []string) error {
	want := make(map[[16]byte]bool, len(comms))
	for _, c := range comms {
		if c == "" || len(c) > 15 {
			return fmt.Errorf("set checker processes: %q is not a 1–15 byte process name", c)
		}
		var k [16]byte
		copy(k[:], c)
		want[k] = true
	}
	var stale [][16]byte
	var k [16]byte
	var v uint8
	it := g.objs.CheckerComms.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("set checker processes: %w", err)
	}
	for k := range want {
		if err := g.objs.CheckerComms.Put(k, uint8(1)); err != nil {
			return fmt.Errorf("set checker processes: %w", err)
		}
	}
	for _, k := range stale {
		if err := g.objs.CheckerComms.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("set checker processes: %w", err)
		}
	}
	return nil
}

func lpmKeyOf(p netip.Prefix) zeroscaleLpmKey {
	p = p.Masked()
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return zeroscaleLpmKey{Prefixlen: uint32(bits), Addr: p.Addr().As16()}
}

// replacePrefixes adds the new prefixes before removing old ones, so a
// source allowed by both lists is never refused in between.
func (g *Gate) replacePrefixes(m *ebpf.Map, prefixes []netip.Prefix) error {
	want := make(map[zeroscaleLpmKey]bool, len(prefixes))
	for _, p := range prefixes {
		if !p.IsValid() {
			return fmt.Errorf("invalid prefix %v", p)
		}
		want[lpmKeyOf(p)] = true
	}
	for k := range want {
		if err := m.Put(&k, uint8(1)); err != nil {
			return err
		}
	}
	var stale []zeroscaleLpmKey
	var k zeroscaleLpmKey
	var v uint8
	it := m.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range stale {
		if err := m.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}
