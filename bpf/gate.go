// Package bpf loads and drives zeroscale's kernel side: the XDP gate keyed on
// service addresses, the socket activity counters and listen events, and the
// SYN replay program. Maps and links are pinned under a bpffs directory, so
// gating goes on while the plugin restarts and a new plugin picks the state up.
package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// DefaultPinPath is where maps and links live between plugin restarts.
const DefaultPinPath = "/sys/fs/bpf/zeroscale"

const (
	configFlagWakeFrom = 1
	configFlagCapture  = 2

	linksDir        = "links"
	sockStateLinkID = "sock_state"
	udpRecvLinkID   = "udp_recv"
)

// Options configures Load.
type Options struct {
	// PinPath is a directory on a bpffs; DefaultPinPath when empty.
	PinPath string
	// ReportInterval is the least time between two wake reports for one
	// parked address; SYNs in between are dropped and only counted.
	ReportInterval time.Duration
	// CaptureSYNs keeps the first SYN of each client connection attempt to a
	// parked address, for replay.
	CaptureSYNs bool
	// MaxCapturePerKey bounds captured SYNs per parked address.
	MaxCapturePerKey uint32
	// SYNMaxAge: a connection attempt older than this counts as new again.
	SYNMaxAge time.Duration
	// EventBuffer is how many capture events wait for Events (wakes and
	// listens wait apart, ahead of them).
	EventBuffer int
	Logger      hclog.Logger
	// withoutUDP loads the UDP-only programs as stubs, as on a kernel
	// that refuses them (for tests).
	withoutUDP bool
}

func (o *Options) setDefaults() {
	if o.PinPath == "" {
		o.PinPath = DefaultPinPath
	}
	if o.ReportInterval <= 0 {
		o.ReportInterval = 100 * time.Millisecond
	}
	if o.MaxCapturePerKey == 0 {
		o.MaxCapturePerKey = 1024
	}
	if o.SYNMaxAge <= 0 {
		o.SYNMaxAge = 60 * time.Second
	}
	if o.EventBuffer <= 0 {
		o.EventBuffer = 4096
	}
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
}

// Gate is the loaded data plane. Methods are safe for concurrent use.
type Gate struct {
	opts   Options
	logger hclog.Logger
	objs   zeroscaleObjects
	// recovered names the pinned maps of another layout that Load replaced.
	recovered []string

	mu        sync.Mutex
	links     map[string]attachedLink // gate links by interface name
	watched   map[uint16]bool         // ports watched for listeners beyond the gated ones
	sockLinks []link.Link

	replayMu sync.Mutex
	// udpErr says why the UDP-only programs are stubs; nil when they run.
	udpErr  error
	probeMu sync.Mutex

	events     chan Event
	reader     *ringbuf.Reader
	readerDone chan struct{}
	closing    chan struct{} // closed by Close: a reader waiting for room gives up
	dropped    uint64        // events lost because the channel was full
	// clampedReads counts Activity reads that found a negative
	// established count and reported 0.
	clampedReads atomic.Uint64
	closeOnce    sync.Once
}

// Load loads the programs, reuses maps pinned by an earlier plugin process,
// writes the config and attaches the socket program. Interfaces are attached
// separately with Attach.
func Load(opts Options) (*Gate, error) {
	opts.setDefaults()
	logger := opts.Logger.Named("bpf")

	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock rlimit: %w", err)
	}
	if err := ensureBPFFS(filepath.Dir(opts.PinPath)); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(opts.PinPath, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory: %w", err)
	}

	spec, err := loadZeroscale()
	if err != nil {
		return nil, fmt.Errorf("read embedded BPF object: %w", err)
	}
	g := &Gate{
		opts:       opts,
		logger:     logger,
		links:      make(map[string]attachedLink),
		watched:    make(map[uint16]bool),
		events:     make(chan Event),
		closing:    make(chan struct{}),
		readerDone: make(chan struct{}),
	}
	loadOpts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: opts.PinPath}}
	err = g.loadWithFallback(spec, loadOpts)
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		if g.recovered, err = replaceIncompatiblePins(spec, opts.PinPath, err, logger); err == nil {
			err = g.loadWithFallback(spec, loadOpts)
		}
	}
	if err != nil {
		return nil, explainLoadError(err, opts.PinPath)
	}

	if err := g.writeConfig(); err != nil {
		g.objs.Close()
		return nil, err
	}
	if err := g.attachSockState(); err != nil {
		g.closeLinks()
		g.objs.Close()
		return nil, err
	}
	g.reader, err = ringbuf.NewReader(g.objs.Events)
	if err != nil {
		g.closeLinks()
		g.objs.Close()
		return nil, fmt.Errorf("open event ring buffer: %w", err)
	}
	go g.readEvents()
	return g, nil
}

// Recovered names the pinned maps that Load found with another version's
// layout. When it is not empty, Load detached that version's programs and
// removed all its pins: the gate started empty, and whatever was parked
// must be parked again.
func (g *Gate) Recovered() []string {
	return slices.Clone(g.recovered)
}

// replaceIncompatiblePins clears a pin path whose maps another zeroscale
// version left with a different layout. That version's programs stay
// attached through their pinned links and keep gating with those maps,
// parked entries included, which this version can neither read nor change:
// a parked service would stay black-holed with no owner. So the old links
// are detached and every pin is removed, failing towards serving. It returns
// the incompatible maps' names.
func replaceIncompatiblePins(spec *ebpf.CollectionSpec, pinPath string, loadErr error, logger hclog.Logger) ([]string, error) {
	names := incompatiblePins(spec, pinPath)
	if len(names) == 0 {
		// Nothing to name: the pins changed under us, or the loader sees
		// something we do not. Tearing down blindly is not ours to do.
		return nil, loadErr
	}
	logger.Warn("maps pinned by another zeroscale version have another layout; "+
		"detaching its programs and starting with empty maps",
		"maps", strings.Join(names, ","), "pin_path", pinPath, "error", loadErr)
	if err := Uninstall(pinPath); err != nil {
		return names, fmt.Errorf("replace pinned maps %s of another layout: %w", strings.Join(names, ", "), err)
	}
	if err := os.MkdirAll(filepath.Join(pinPath, linksDir), 0o700); err != nil {
		return names, fmt.Errorf("create pin directory: %w", err)
	}
	return names, nil
}

// incompatiblePins lists the maps of spec pinned under pinPath whose type,
// sizes or flags differ from the spec's, by the loader's own rule.
func incompatiblePins(spec *ebpf.CollectionSpec, pinPath string) []string {
	var names []string
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, ms.Name), nil)
		if err != nil {
			continue
		}
		if err := ms.Compatible(m); errors.Is(err, ebpf.ErrMapIncompatible) {
			names = append(names, name)
		}
		_ = m.Close()
	}
	slices.Sort(names)
	return names
}

// explainLoadError prints verifier errors in full and turns an incompatible
// pinned map (left by another version) into advice.
func explainLoadError(err error, pinPath string) error {
	var verr *ebpf.VerifierError
	if errors.As(err, &verr) {
		return fmt.Errorf("load BPF programs: verifier rejected them:\n%+v", verr)
	}
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return fmt.Errorf("load BPF programs: a map pinned under %s by another zeroscale version has a different layout; "+
			"run `nomad-driver-zeroscale uninstall` (or remove %s) and restart: %w", pinPath, pinPath, err)
	}
	return fmt.Errorf("load BPF programs: %w", err)
}

// BPFFSRoot is where bpffs lives; pins go only below it.
const BPFFSRoot = "/sys/fs/bpf"

// ensureBPFFS checks that dir is on a bpffs below BPFFSRoot. It never mounts
// over a directory that holds anything: only an empty BPFFSRoot itself gets a
// bpffs mounted, as systemd does at boot.
func ensureBPFFS(dir string) error {
	dir = filepath.Clean(dir)
	if dir != BPFFSRoot && !strings.HasPrefix(dir, BPFFSRoot+"/") {
		return fmt.Errorf("pin path: %s is not below %s", dir, BPFFSRoot)
	}
	if isBPFFS(BPFFSRoot) != nil {
		entries, err := os.ReadDir(BPFFSRoot)
		if err != nil {
			return fmt.Errorf("pin path: read %s: %w", BPFFSRoot, err)
		}
		if len(entries) > 0 {
			return fmt.Errorf("pin path: %s is not a bpffs and not empty; mount one there (mount -t bpf bpf %s)", BPFFSRoot, BPFFSRoot)
		}
		if err := unix.Mount("bpf", BPFFSRoot, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("pin path: mount bpffs at %s: %w", BPFFSRoot, err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pin path: create %s: %w", dir, err)
	}
	return isBPFFS(dir)
}

// isBPFFS is nil when dir is on a bpffs.
func isBPFFS(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("pin path: stat %s: %w", dir, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("pin path: %s is not on a bpffs", dir)
	}
	return nil
}

func (g *Gate) writeConfig() error {
	inum, err := currentNetnsInode()
	if err != nil {
		return err
	}
	var flags uint32
	if g.opts.CaptureSYNs {
		flags |= configFlagCapture
	}
	// Keep the wake_from flag as the pinned config has it: the allow-list
	// survives a restart until SetWakeFrom replaces it.
	var old zeroscaleGateConfig
	if err := g.objs.Config.Lookup(uint32(0), &old); err == nil {
		flags |= old.Flags & configFlagWakeFrom
	}
	cfg := zeroscaleGateConfig{
		ReportIntervalNs: uint64(g.opts.ReportInterval),
		SynMaxAgeNs:      uint64(g.opts.SYNMaxAge),
		Flags:            flags,
		MaxCapture:       g.opts.MaxCapturePerKey,
		NetnsInum:        inum,
	}
	if err := g.objs.Config.Put(uint32(0), &cfg); err != nil {
		return fmt.Errorf("write gate config: %w", err)
	}
	return nil
}

// currentNetnsInode reads the namespace of the calling thread: /proc/self
// names the main thread, which a process may have moved elsewhere.
func currentNetnsInode() (uint32, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return 0, fmt.Errorf("read network namespace: %w", err)
	}
	return uint32(st.Ino), nil
}

// attachSockState attaches the socket programs and pins their links. A link
// pinned by the previous process is replaced after the new one is attached,
// so no transition is missed; both running for a moment is harmless because
// the program counts each socket at most once (and a datagram's read only
// stamps a time).
func (g *Gate) attachSockState() error {
	for _, tp := range []struct {
		prog *ebpf.Program
		id   string
		name string
	}{
		{g.objs.ZsSockState, sockStateLinkID, "tp_btf/inet_sock_set_state"},
		{g.objs.ZsUdpRecv, udpRecvLinkID, "tp_btf/sock_recv_length"},
	} {
		if tp.id == udpRecvLinkID && g.udpErr != nil {
			continue // a stub on this kernel
		}
		l, err := link.AttachTracing(link.TracingOptions{Program: tp.prog})
		if err != nil {
			return fmt.Errorf("attach %s: %w", tp.name, err)
		}
		path := g.linkPath(tp.id)
		if old, err := link.LoadPinnedLink(path, nil); err == nil {
			_ = old.Unpin()
			_ = old.Close()
		}
		if err := l.Pin(path); err != nil {
			_ = l.Close()
			return fmt.Errorf("pin the link of %s: %w", tp.name, err)
		}
		g.mu.Lock()
		g.sockLinks = append(g.sockLinks, l)
		g.mu.Unlock()
	}
	return nil
}

func (g *Gate) linkPath(id string) string {
	return filepath.Join(g.opts.PinPath, linksDir, id)
}

// Events delivers wake, capture and listen events. It is closed by Close.
func (g *Gate) Events() <-chan Event {
	return g.events
}

// Close releases this process's handles. Pinned maps and links stay, so the
// gate keeps working until the next Load or Uninstall.
func (g *Gate) Close() error {
	g.closeOnce.Do(func() {
		close(g.closing)
		if g.reader != nil {
			_ = g.reader.Close()
			<-g.readerDone
		}
		g.closeLinks()
		g.objs.Close()
	})
	return nil
}

func (g *Gate) closeLinks() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for name, l := range g.links {
		_ = l.Close()
		delete(g.links, name)
	}
	for _, l := range g.sockLinks {
		_ = l.Close()
	}
	g.sockLinks = nil
}

// Uninstall detaches everything pinned under pinPath and removes the pins.
func Uninstall(pinPath string) error {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	dir := filepath.Join(pinPath, linksDir)
	entries, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("list pinned links: %w", err)
	}
	var errs []error
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("load pinned link %s: %w", path, err))
			_ = os.Remove(path)
			continue
		}
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", path, err))
		}
		_ = l.Close()
	}
	if err := os.RemoveAll(pinPath); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", pinPath, err))
	}
	return errors.Join(errs...)
}

// Probe tells whether this kernel can run the gate: BTF present and the
// programs accepted by the verifier. It loads nothing persistent.
func Probe() error {
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		return fmt.Errorf("no kernel BTF at /sys/kernel/btf/vmlinux (needs CONFIG_DEBUG_INFO_BTF)")
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("remove memlock rlimit: %w", err)
	}
	spec, err := loadZeroscale()
	if err != nil {
		return fmt.Errorf("read embedded BPF object: %w", err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		// The gate without the UDP-only programs is still the gate.
		if stubbed, err2 := ebpf.NewCollection(withoutUDPPrograms(spec)); err2 == nil {
			stubbed.Close()
			return nil
		}
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return fmt.Errorf("verifier rejected the programs: %s", strings.Join(verr.Log[max(0, len(verr.Log)-3):], " "))
		}
		return fmt.Errorf("load BPF programs: %w", err)
	}
	coll.Close()
	return nil
}
