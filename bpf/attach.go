package bpf

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf/link"
)

// AttachMode is how XDP runs on an interface.
type AttachMode string

const (
	// ModeAuto picks native XDP for real NICs and generic XDP for virtual
	// devices (lo, veth, bridges, …), where native XDP turns GRO/TSO off and
	// costs throughput (measured ~70% on veth here).
	ModeAuto AttachMode = ""
	// ModeNative runs in the driver.
	ModeNative AttachMode = "native"
	// ModeGeneric runs on the skb path.
	ModeGeneric AttachMode = "generic"
)

// ParseAttachMode reads "auto", "native" or "generic".
func ParseAttachMode(s string) (AttachMode, error) {
	switch strings.ToLower(s) {
	case "", "auto":
		return ModeAuto, nil
	case "native", "driver":
		return ModeNative, nil
	case "generic", "skb":
		return ModeGeneric, nil
	}
	return "", fmt.Errorf("unknown XDP mode %q (want auto, native or generic)", s)
}

// isVirtual tells devices without hardware behind them: they have no
// /sys/class/net/<if>/device link.
func isVirtual(ifname string) bool {
	_, err := os.Stat(filepath.Join("/sys/class/net", ifname, "device"))
	return err != nil
}

func xdpLinkID(ifname string) string { return "xdp_" + ifname }

// Attach runs the gate on ifname and pins the link. If a link pinned by an
// earlier plugin process is still attached there, its program is swapped in
// place, so gating has no gap. It returns the mode in effect.
func (g *Gate) Attach(ifname string, mode AttachMode) (AttachMode, error) {
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return "", fmt.Errorf("attach gate to %s: %w", ifname, err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()

	if l, ok := g.xdpLinks[ifname]; ok {
		if err := l.Update(g.objs.ZsGate); err != nil {
			return "", fmt.Errorf("update gate on %s: %w", ifname, err)
		}
		return g.modeOf(l, mode, ifname), nil
	}

	path := g.linkPath(xdpLinkID(ifname))
	if old, err := link.LoadPinnedLink(path, nil); err == nil {
		if pinnedOn(old) == iface.Index {
			if err := old.Update(g.objs.ZsGate); err == nil {
				g.xdpLinks[ifname] = old
				g.logger.Debug("took over pinned gate link", "interface", ifname)
				return g.modeOf(old, mode, ifname), nil
			}
		}
		// The interface was recreated or the link is defunct: start afresh.
		_ = old.Unpin()
		_ = old.Close()
	}

	effective := mode
	if effective == ModeAuto {
		effective = ModeNative
		if isVirtual(ifname) {
			effective = ModeGeneric
		}
	}
	l, err := attachXDP(g, iface.Index, effective)
	if err != nil && mode == ModeAuto && effective == ModeNative {
		g.logger.Info("native XDP refused, using generic", "interface", ifname, "error", err)
		effective = ModeGeneric
		l, err = attachXDP(g, iface.Index, effective)
	}
	if err != nil {
		return "", fmt.Errorf("attach gate to %s in %s mode: %w", ifname, effective, err)
	}
	if err := l.Pin(path); err != nil {
		_ = l.Close()
		return "", fmt.Errorf("pin gate link of %s: %w", ifname, err)
	}
	g.xdpLinks[ifname] = l
	g.logger.Info("gate attached", "interface", ifname, "mode", effective)
	return effective, nil
}

func attachXDP(g *Gate, ifindex int, mode AttachMode) (link.Link, error) {
	flags := link.XDPGenericMode
	if mode == ModeNative {
		flags = link.XDPDriverMode
	}
	return link.AttachXDP(link.XDPOptions{Program: g.objs.ZsGate, Interface: ifindex, Flags: flags})
}

// modeOf reports the mode of an existing link: the requested one if given,
// else what auto would have chosen (the kernel does not report it).
func (g *Gate) modeOf(_ link.Link, requested AttachMode, ifname string) AttachMode {
	if requested != ModeAuto {
		return requested
	}
	if isVirtual(ifname) {
		return ModeGeneric
	}
	return ModeNative
}

func pinnedOn(l link.Link) int {
	info, err := l.Info()
	if err != nil {
		return -1
	}
	if x := info.XDP(); x != nil {
		return int(x.Ifindex)
	}
	return -1
}

// Detach removes the gate from ifname.
func (g *Gate) Detach(ifname string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	path := g.linkPath(xdpLinkID(ifname))
	l, ok := g.xdpLinks[ifname]
	if !ok {
		pinned, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return fmt.Errorf("detach gate from %s: %w", ifname, err)
		}
		l = pinned
	}
	delete(g.xdpLinks, ifname)
	if err := l.Unpin(); err != nil && !errors.Is(err, os.ErrNotExist) {
		_ = l.Close()
		return fmt.Errorf("unpin gate link of %s: %w", ifname, err)
	}
	return l.Close()
}

// Attached lists the interfaces this process has attached to.
func (g *Gate) Attached() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]string, 0, len(g.xdpLinks))
	for name := range g.xdpLinks {
		out = append(out, name)
	}
	return out
}

// PinnedInterfaces lists interfaces with a pinned gate link, attached by
// this or an earlier process.
func (g *Gate) PinnedInterfaces() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(g.opts.PinPath, linksDir))
	if err != nil {
		return nil, fmt.Errorf("list pinned links: %w", err)
	}
	var out []string
	for _, e := range entries {
		if name, ok := strings.CutPrefix(e.Name(), "xdp_"); ok {
			out = append(out, name)
		}
	}
	return out, nil
}
