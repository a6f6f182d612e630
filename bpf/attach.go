package bpf

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// AttachMode is where the gate runs on an interface.
type AttachMode string

const (
	// ModeAuto picks native XDP for real NICs and tc ingress (tcx) for
	// virtual devices (lo, veth, bridges, …), falling back to generic XDP
	// on kernels without tcx (< 6.6). On a veth, native XDP turns GRO/TSO
	// off (~70% of throughput lost here) and generic XDP copies every
	// GRO-merged skb into a linear buffer (~20% of upload throughput);
	// tc ingress costs neither.
	ModeAuto AttachMode = ""
	// ModeNative runs XDP in the driver.
	ModeNative AttachMode = "native"
	// ModeGeneric runs XDP on the skb path.
	ModeGeneric AttachMode = "generic"
	// ModeTC runs the same gate as a tcx ingress program.
	ModeTC AttachMode = "tc"
)

// ParseAttachMode reads "auto", "native", "generic" or "tc".
func ParseAttachMode(s string) (AttachMode, error) {
	switch strings.ToLower(s) {
	case "", "auto":
		return ModeAuto, nil
	case "native", "driver":
		return ModeNative, nil
	case "generic", "skb":
		return ModeGeneric, nil
	case "tc", "tcx":
		return ModeTC, nil
	}
	return "", fmt.Errorf("unknown gate mode %q (want auto, native, generic or tc)", s)
}

// isVirtual tells devices without hardware behind them: they have no
// /sys/class/net/<if>/device link.
// isVirtual tells a device with no bus behind it (lo, veth, bridge, …). It
// asks the device's driver through ethtool in the caller's own namespace:
// /sys/class/net shows the namespace sysfs was mounted in, which is not
// ours when the agent runs in a namespace of its own.
func isVirtual(ifname string) bool {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return true
	}
	defer unix.Close(fd)
	info, err := unix.IoctlGetEthtoolDrvinfo(fd, ifname)
	if err != nil {
		return true // lo and some virtual drivers answer no ethtool at all
	}
	bus := unix.ByteSliceToString(info.Bus_info[:])
	return bus == "" || bus == "N/A" // a bridge says N/A
}

func gateLinkID(ifname string) string { return "gate_" + ifname }

type attachedLink struct {
	link.Link
	mode AttachMode
}

// Attach runs the gate on ifname and pins the link. A link pinned there by
// an earlier plugin process keeps gating until the new one is in place: it
// is updated in place when the mode is the same, replaced after the new one
// is attached otherwise. It returns the mode in effect.
func (g *Gate) Attach(ifname string, mode AttachMode) (AttachMode, error) {
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return "", fmt.Errorf("attach gate to %s: %w", ifname, err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()

	if l, ok := g.links[ifname]; ok && (mode == ModeAuto || mode == l.mode) {
		if err := l.Update(g.program(l.mode)); err != nil {
			return "", fmt.Errorf("update gate on %s: %w", ifname, err)
		}
		return l.mode, nil
	}

	path := g.linkPath(gateLinkID(ifname))
	old, oldMode := g.pinnedLink(path, iface.Index)
	if old != nil && (mode == ModeAuto && oldMode == g.autoMode(ifname) || mode == oldMode) {
		if err := old.Update(g.program(oldMode)); err == nil {
			g.links[ifname] = attachedLink{old, oldMode}
			g.logger.Debug("took over the pinned gate link", "interface", ifname, "mode", string(oldMode))
			return oldMode, nil
		}
	}

	effective := mode
	if effective == ModeAuto {
		effective = g.autoMode(ifname)
	}
	l, err := g.attach(iface.Index, effective)
	if err != nil && mode == ModeAuto {
		fallback := ModeGeneric
		g.logger.Info("falling back to generic XDP", "interface", ifname, "mode", string(effective), "error", err)
		effective = fallback
		l, err = g.attach(iface.Index, effective)
	}
	if err != nil {
		return "", fmt.Errorf("attach gate to %s in %s mode: %w", ifname, effective, err)
	}
	if old != nil {
		// The new link gates already; now drop the old one.
		_ = old.Unpin()
		_ = old.Close()
	}
	if err := l.Pin(path); err != nil {
		_ = l.Close()
		return "", fmt.Errorf("pin gate link of %s: %w", ifname, err)
	}
	if prev, ok := g.links[ifname]; ok {
		_ = prev.Close()
	}
	g.links[ifname] = attachedLink{l, effective}
	g.logger.Info("gate attached", "interface", ifname, "mode", string(effective))
	return effective, nil
}

func (g *Gate) autoMode(ifname string) AttachMode {
	if isVirtual(ifname) {
		return ModeTC
	}
	return ModeNative
}

func (g *Gate) program(mode AttachMode) *ebpf.Program {
	if mode == ModeTC {
		return g.objs.ZsGateTc
	}
	return g.objs.ZsGate
}

func (g *Gate) attach(ifindex int, mode AttachMode) (link.Link, error) {
	switch mode {
	case ModeTC:
		return link.AttachTCX(link.TCXOptions{Program: g.objs.ZsGateTc, Interface: ifindex, Attach: ebpf.AttachTCXIngress})
	case ModeNative:
		return link.AttachXDP(link.XDPOptions{Program: g.objs.ZsGate, Interface: ifindex, Flags: link.XDPDriverMode})
	default:
		return link.AttachXDP(link.XDPOptions{Program: g.objs.ZsGate, Interface: ifindex, Flags: link.XDPGenericMode})
	}
}

// pinnedLink loads the link pinned at path if it still gates ifindex; a
// stale pin (interface recreated, link defunct) is removed.
func (g *Gate) pinnedLink(path string, ifindex int) (link.Link, AttachMode) {
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return nil, ""
	}
	info, err := l.Info()
	if err == nil {
		if x := info.XDP(); x != nil && int(x.Ifindex) == ifindex {
			// The kernel does not report native vs generic; the pin's
			// mode is whatever auto would pick unless told otherwise.
			mode := ModeGeneric
			if !isVirtual(ifnameOf(ifindex)) {
				mode = ModeNative
			}
			return l, mode
		}
		if x := info.TCX(); x != nil && int(x.Ifindex) == ifindex {
			return l, ModeTC
		}
	}
	_ = l.Unpin()
	_ = l.Close()
	return nil, ""
}

func ifnameOf(ifindex int) string {
	if iface, err := net.InterfaceByIndex(ifindex); err == nil {
		return iface.Name
	}
	return ""
}

// Detach removes the gate from ifname.
func (g *Gate) Detach(ifname string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	path := g.linkPath(gateLinkID(ifname))
	var l link.Link
	if al, ok := g.links[ifname]; ok {
		l = al.Link
	} else {
		pinned, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return fmt.Errorf("detach gate from %s: %w", ifname, err)
		}
		l = pinned
	}
	delete(g.links, ifname)
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
	out := make([]string, 0, len(g.links))
	for name := range g.links {
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
		if name, ok := strings.CutPrefix(e.Name(), "gate_"); ok {
			out = append(out, name)
		}
	}
	return out, nil
}
