package bpf

import (
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// MeasureGate runs the gate program on frame repeat times in the kernel
// (BPF_PROG_TEST_RUN) as if received on ifindex (not lo: local clients take
// an extra socket lookup) and returns its verdict and the mean time per run.
func (g *Gate) MeasureGate(frame []byte, repeat, ifindex int) (uint32, time.Duration, error) {
	return measure(g.objs.ZsGate, frame, repeat, ifindex)
}

func measure(prog *ebpf.Program, frame []byte, repeat, ifindex int) (uint32, time.Duration, error) {
	began := time.Now()
	ret, err := prog.Run(&ebpf.RunOptions{
		Data:    frame,
		Repeat:  uint32(repeat),
		Context: xdpMd{DataEnd: uint32(len(frame)), IngressIfindex: uint32(ifindex)},
	})
	if err != nil {
		return 0, 0, fmt.Errorf("test-run the program: %w", err)
	}
	return ret, time.Since(began) / time.Duration(repeat), nil
}

// MeasureEmptyXDP is the same measurement for a program that only returns
// XDP_PASS: the test-run machinery's own cost, to subtract.
func MeasureEmptyXDP(frame []byte, repeat, ifindex int) (time.Duration, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.XDP,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()},
	})
	if err != nil {
		return 0, fmt.Errorf("load an empty XDP program: %w", err)
	}
	defer prog.Close()
	_, d, err := measure(prog, frame, repeat, ifindex)
	return d, err
}
