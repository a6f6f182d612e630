package bpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// ErrUDPUnsupported means this kernel cannot run the programs only UDP
// services need; TCP is gated all the same.
var ErrUDPUnsupported = errors.New("UDP sockets cannot be looked up on this kernel")

// udpPrograms are the programs only UDP services need: the socket probe
// (the bpf_rdonly_cast kfunc, Linux 6.2) and the datagrams read behind port
// mappings (tp_btf/sock_recv_length, Linux 6.3). A kernel without them
// still runs the gate.
var udpPrograms = []string{"zs_probe", "zs_udp_recv"}

// withoutUDPPrograms is a copy of spec whose UDP-only programs are stubs
// that load on any kernel and are never attached or run.
func withoutUDPPrograms(spec *ebpf.CollectionSpec) *ebpf.CollectionSpec {
	out := spec.Copy()
	for _, name := range udpPrograms {
		out.Programs[name] = &ebpf.ProgramSpec{
			Name:         name,
			Type:         ebpf.SocketFilter,
			License:      "Dual MPL/GPL",
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
		}
	}
	return out
}

// loadWithFallback loads spec into g.objs; when the kernel refuses it and
// the same spec loads without the UDP-only programs, it keeps that and
// remembers why in g.udpErr.
func (g *Gate) loadWithFallback(spec *ebpf.CollectionSpec, opts *ebpf.CollectionOptions) error {
	full := spec
	if g.opts.withoutUDP {
		full = withoutUDPPrograms(spec)
	}
	err := full.LoadAndAssign(&g.objs, opts)
	if g.opts.withoutUDP && err == nil {
		g.udpErr = ErrUDPUnsupported
		return nil
	}
	if err == nil || errors.Is(err, ebpf.ErrMapIncompatible) {
		return err
	}
	if err2 := withoutUDPPrograms(spec).LoadAndAssign(&g.objs, opts); err2 != nil {
		return err // the gate itself does not load: report why
	}
	g.udpErr = fmt.Errorf("%w: %v", ErrUDPUnsupported, explainLoadError(err, g.opts.PinPath))
	g.logger.Warn("this kernel cannot run the programs UDP services need; TCP is gated, UDP readiness falls back to Consul health",
		"error", err)
	return nil
}

// UDPSupport is nil when UDP services get every part (socket lookups,
// datagrams read behind port mappings), else why not.
func (g *Gate) UDPSupport() error { return g.udpErr }
