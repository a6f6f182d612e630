package bpf

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
	"golang.org/x/sys/unix"
)

// An earlier version left a "policies" map of another layout pinned, and its
// gate, still attached through a pinned link, black-holes the interface.
func TestLoadReplacesPinsOfAnotherLayoutInsteadOfStrandingTheGate(t *testing.T) {
	n := testnet.New(t)
	pin := testPinPath(t)
	t.Cleanup(func() { _ = Uninstall(pin) })
	if err := os.MkdirAll(filepath.Join(pin, linksDir), 0o700); err != nil {
		t.Fatal(err)
	}

	old, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "policies",
		Type:       ebpf.Hash,
		KeySize:    20,
		ValueSize:  8, // ours has 16
		MaxEntries: 1024,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Pin(filepath.Join(pin, "policies")); err != nil {
		t.Fatal(err)
	}
	parked := Key{Addr: n.HostAddr, Port: freePort(t, n.HostAddr)}.bpf()
	if err := old.Put(&parked, uint64(StateParked)); err != nil {
		t.Fatal(err)
	}
	// The old gate drops everything, and holds its map as real ones do.
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.XDP,
		Instructions: asm.Instructions{
			asm.LoadMapPtr(asm.R1, old.FD()),
			asm.Mov.Imm(asm.R0, xdpDrop),
			asm.Return(),
		},
		License: "GPL",
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: n.HostIfindex(t), Flags: link.XDPGenericMode})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Pin(filepath.Join(pin, linksDir, gateLinkID(n.HostIf))); err != nil {
		t.Fatal(err)
	}
	_ = l.Close() // the old process is gone; the pin keeps the gate

	target := netip.AddrPortFrom(n.HostAddr, freePort(t, n.HostAddr)).String()
	echoServer(t, target)
	if err := dialOnce(n, target, 300*time.Millisecond); err == nil {
		t.Fatal("the old gate let a connection through: the test proves nothing")
	}

	g := loadGate(t, Options{PinPath: pin})
	if got := g.Recovered(); !slices.Equal(got, []string{"policies"}) {
		t.Fatalf("recovered maps %v, want [policies]", got)
	}
	if vs := g.objs.Policies.ValueSize(); vs != 16 {
		t.Fatalf("policies value size %d after load, want ours (16)", vs)
	}
	if keys, err := g.Keys(); err != nil || len(keys) != 0 {
		t.Fatalf("keys after recovery %v %v, want an empty gate", keys, err)
	}
	entries, err := os.ReadDir(filepath.Join(pin, linksDir))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() != sockStateLinkID && e.Name() != udpRecvLinkID {
			t.Fatalf("link %s of the old version is still pinned", e.Name())
		}
	}
	if err := dialOnce(n, target, 2*time.Second); err != nil {
		t.Fatalf("the old gate still drops: %v", err)
	}

	// The new pins are ours: the next process takes them over as they are.
	k := Key{Addr: n.HostAddr, Port: 8080}
	if err := g.Park(k); err != nil {
		t.Fatal(err)
	}
	g.Close()
	g2, err := Load(Options{PinPath: pin})
	if err != nil {
		t.Fatalf("load over our own pins: %v", err)
	}
	defer g2.Close()
	if got := g2.Recovered(); len(got) != 0 {
		t.Fatalf("recovered %v from pins of the same layout", got)
	}
	if s, ok, _ := g2.State(k); !ok || s != StateParked {
		t.Fatalf("state after reload %v %v, want parked", s, ok)
	}
}

func TestLoadRefusesAPinPathOutsideBPFFSAndMountsNothing(t *testing.T) {
	dir := t.TempDir()
	_, err := Load(Options{PinPath: filepath.Join(dir, "zeroscale")})
	if err == nil || !strings.Contains(err.Error(), "not below /sys/fs/bpf") {
		t.Fatalf("load with a pin path under %s: %v, want a refusal", dir, err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.BPF_FS_MAGIC {
		_ = unix.Unmount(dir, 0)
		t.Fatalf("a bpffs was mounted over %s", dir)
	}
}
