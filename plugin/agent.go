package plugin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
	"github.com/zeroscale/nomad-driver-zeroscale/driver"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/cgroups"
	"github.com/zeroscale/nomad-driver-zeroscale/scaling"
)

// nodeAgent runs the gate and the scaler on this node.
type nodeAgent struct {
	settings settings
	logger   hclog.Logger
	driver   *driver.Driver
	gate     *bpf.Gate
	registry *prometheus.Registry
	wg       sync.WaitGroup

	// attachMu guards attachErrs: why the gate is missing on a configured
	// interface. While any is missing nothing is parked (invariant 4).
	attachMu   sync.Mutex
	attachErrs map[string]error
	attached   *prometheus.GaugeVec
	// running: the scaler is up (Nomad and Consul clients too); only then
	// does the fingerprint say the gate is supported.
	running bool
	// operator serves /v1/ beside /metrics.
	operator *operatorAPI
}

// startNodeAgent loads the gate and starts everything in the background; it
// returns at once. The gate keeps its pinned state when ctx ends.
func startNodeAgent(ctx context.Context, s settings, logger hclog.Logger, drv *driver.Driver) *nodeAgent {
	a := &nodeAgent{settings: s, logger: logger.Named("agent"), driver: drv, registry: prometheus.NewRegistry(),
		attachErrs: make(map[string]error), operator: &operatorAPI{nomadAddress: s.Nomad.Address},
		attached: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "zeroscale_gate_attached",
			Help: "1 when the gate is attached on the interface, 0 when it must be and is not (nothing is parked then).",
		}, []string{"interface"}),
	}
	a.registry.MustRegister(a.attached)
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.run(ctx)
	}()
	return a
}

func (a *nodeAgent) run(ctx context.Context) {
	s := a.settings
	gate, err := bpf.Load(bpf.Options{
		PinPath:     s.BPFPinPath,
		CaptureSYNs: s.SYNReplay,
		SYNMaxAge:   s.synMaxAge,
		Logger:      a.logger,
	})
	if err != nil {
		a.logger.Error("the XDP gate is unavailable on this node; nothing will be gated", "error", err)
		a.driver.SetGateStatus(driver.GateStatus{Reason: err.Error()})
		return
	}
	a.gate = gate
	defer gate.Close() // keeps the pins: gating goes on while the plugin restarts
	if replaced := gate.Recovered(); len(replaced) > 0 {
		a.logger.Warn("pinned maps of another zeroscale version were replaced; every address is open until the scaler parks what must be",
			"maps", replaced)
	}

	if err := gate.SetWakeFrom(s.wakeFrom); err != nil {
		a.logger.Error("cannot apply wake_from", "error", err)
	}
	if err := gate.SetIgnoreSources(s.ignoreSources); err != nil {
		a.logger.Error("cannot apply ignore_sources", "error", err)
	}
	if err := gate.SetCheckerComms(s.HealthCheckProcesses); err != nil {
		a.logger.Error("cannot apply health_check_processes", "error", err)
	}
	a.attachInterfaces()
	a.driver.SetGateStatus(driver.GateStatus{Reason: "node agent starting: waiting for Nomad and Consul"})

	metrics := scaling.NewMetrics(a.registry)
	a.registry.MustRegister(&gateCollector{gate: gate})
	if s.MetricsAddress != "" {
		go a.serveMetrics(ctx)
	}

	nomad, err := scaling.ConnectNomad(scaling.NomadConnection{
		Address: s.Nomad.Address, Token: s.Nomad.Token, TokenFile: s.Nomad.TokenFile, Logger: a.logger,
		OnRequest: metrics.CountRequests("nomad"),
	})
	if err != nil {
		a.logger.Error("cannot configure the Nomad client", "error", err)
		return
	}
	cc, err := consul.New(consul.Config{
		Address: s.Consul.Address, Token: s.Consul.Token, TokenFile: s.Consul.TokenFile, KVPrefix: s.Consul.KVPrefix,
		CAFile: s.Consul.CAFile, CertFile: s.Consul.CertFile, KeyFile: s.Consul.KeyFile,
		TLSServerName: s.Consul.TLSServerName, InsecureSkipVerify: s.Consul.InsecureSkipVerify,
		OnRequest: metrics.CountRequests("consul"),
	}, a.logger)
	if err != nil {
		a.logger.Error("cannot configure the Consul client", "error", err)
		return
	}
	node := a.waitForConsul(ctx, cc)
	if node == "" {
		return
	}

	namespaces, err := newAllocNamespaces()
	if err != nil {
		a.logger.Error("cannot read the node's network namespace", "error", err)
		return
	}
	// Without NAT a parked address the group did not come back at refuses
	// (a RST) instead of forwarding: the group is served all the same.
	var fwd scaling.Forwarder
	if f, err := newForwarder(s.BPFPinPath, a.logger.Named("forward")); err != nil {
		a.logger.Warn("cannot use the kernel's NAT; an address whose group woke elsewhere refuses instead of forwarding", "error", err)
	} else {
		fwd = f
	}
	// The watch's callbacks reach the agent built below.
	var agent *scaling.Agent
	watch := cc.NewWatch(ctx, func(service string, insts []consul.Instance) {
		agent.Do(ctx, func() { agent.OnInstances(service, insts) })
	}, func(service string, err error) {
		a.logger.Warn("service watch failed", "service", service, "error", err)
	})
	defer watch.Stop()
	placeholders := cc.NewPlaceholders(consul.PlaceholderOptions{})
	cluster := &consul.Cluster{Client: cc, Placeholders: placeholders, Node: node}
	agent = scaling.NewAgent(scaling.Config{
		Gate: gate, Nomad: nomad, Cluster: cluster, Logger: a.logger, Metrics: metrics,
		DryRun: s.DryRun, SYNReplay: s.SYNReplay, SYNMaxAge: s.synMaxAge,
		OnAwake: func(id scaling.GroupID, msg string) {
			a.driver.EmitGroupEvent(id.Namespace, id.Job, id.Group, msg)
		},
		OnUnrecorded: func(id scaling.GroupID, msg string) {
			a.driver.EmitGroupEvent(id.Namespace, id.Job, id.Group, msg)
		},
		GateReady:      a.gateReady,
		ListenerAlloc:  listenerAlloc(a.logger),
		SocketOwner:    socketOwner(a.logger),
		Namespaces:     namespaces,
		Forwarder:      fwd,
		ForwardGrace:   s.forwardGrace,
		FollowServices: watch.SetServices,
	})
	cluster.Leader = cc.NewLeader(consul.LeaderOptions{Name: node}, func(leader bool) {
		agent.Do(ctx, func() { agent.OnLeader(leader) })
	})

	reportErr := func(what string) func(error) {
		return func(err error) { a.logger.Warn(what, "error", err) }
	}
	goRun := func(f func()) {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			f()
		}()
	}
	goRun(func() { placeholders.Keep(ctx) })
	goRun(func() { cluster.Leader.Run(ctx, reportErr("leader election failed")) })
	goRun(func() {
		cc.WatchGroupStates(ctx, func(m map[string]consul.GroupState) {
			agent.Do(ctx, func() { agent.OnGroupStates(m) })
		}, reportErr("group state watch failed"))
	})
	goRun(func() {
		cc.WatchActivity(ctx, func(m map[string]map[string]consul.ActivityReport) {
			agent.Do(ctx, func() { agent.OnActivityReports(m) })
		}, reportErr("activity watch failed"))
	})
	goRun(func() { a.followPolicies(ctx, nomad, agent) })
	goRun(func() { a.followJobs(ctx, nomad, agent) })
	goRun(func() { a.rescanInterfaces(ctx) })
	goRun(func() { a.cleanStaleReports(ctx, cc, cluster) })

	a.logger.Info("node agent running", "node", node, "dry_run", s.DryRun, "syn_replay", s.SYNReplay)
	a.attachMu.Lock()
	a.running = true
	a.attachMu.Unlock()
	a.publishGateStatus()
	a.operator.setScaler(agent)
	agent.Run(ctx, gate.Events())
}

// waitForConsul retries until the local agent answers (it may start after
// the Nomad client).
func (a *nodeAgent) waitForConsul(ctx context.Context, cc *consul.Client) string {
	delay := time.Second
	for {
		node, err := cc.NodeName()
		if err == nil {
			return node
		}
		a.logger.Warn("waiting for the local Consul agent", "error", err)
		select {
		case <-ctx.Done():
			return ""
		case <-time.After(delay):
		}
		delay = min(2*delay, 30*time.Second)
	}
}

// followPolicies keeps the agent's policies current with blocking queries.
func (a *nodeAgent) followPolicies(ctx context.Context, nomad *scaling.NomadAPI, agent *scaling.Agent) {
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		stubs, next, err := nomad.Policies(index, 5*time.Minute)
		if err != nil {
			failures++
			a.logger.Warn("cannot list scaling policies", "error", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(min(time.Duration(failures)*time.Second, 30*time.Second)):
			}
			continue
		}
		failures = 0
		if next < index {
			next = 0
		}
		index = next
		done := make(chan struct{})
		agent.Do(ctx, func() {
			defer close(done)
			agent.OnPolicies(stubs)
		})
		select {
		case <-done:
		case <-ctx.Done():
			return
		}
	}
}

// followJobs tells the agent when jobs change, with one blocking query over
// every job, so it need not poll each group's count.
func (a *nodeAgent) followJobs(ctx context.Context, nomad *scaling.NomadAPI, agent *scaling.Agent) {
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		stubs, next, err := nomad.Jobs(index, 5*time.Minute)
		if err != nil {
			failures++
			if failures == 1 {
				a.logger.Warn("cannot list jobs: polling each group's count instead", "error", err)
			}
			agent.Do(ctx, agent.OnJobsLost)
			select {
			case <-ctx.Done():
				return
			case <-time.After(min(time.Duration(failures)*time.Second, 30*time.Second)):
			}
			index = 0 // start over: changes meanwhile were missed
			continue
		}
		if failures > 0 {
			a.logger.Info("following jobs again", "after_failures", failures)
		}
		failures = 0
		if next < index {
			next = 0
		}
		index = next
		agent.Do(ctx, func() { agent.OnJobs(stubs) })
	}
}

// every runs f every d until ctx ends.
func every(ctx context.Context, d time.Duration, f func()) {
	tick := time.NewTicker(d)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			f()
		}
	}
}

// cleanStaleReports lets the leader remove reports of nodes long gone.
func (a *nodeAgent) cleanStaleReports(ctx context.Context, cc *consul.Client, cluster *consul.Cluster) {
	every(ctx, 10*time.Minute, func() {
		if cluster.IsLeader() {
			if err := cc.DeleteStaleActivity(time.Hour, time.Now()); err != nil {
				a.logger.Warn("cannot clean stale activity reports", "error", err)
			}
		}
	})
}

// wantedInterfaces is the configured list, or every interface that is up.
func (a *nodeAgent) wantedInterfaces() []string {
	if len(a.settings.Interfaces) > 0 {
		return a.settings.Interfaces
	}
	ifaces, err := net.Interfaces()
	if err != nil {
		a.logger.Warn("cannot list interfaces", "error", err)
		return nil
	}
	var out []string
	for _, i := range ifaces {
		if i.Flags&net.FlagUp != 0 {
			out = append(out, i.Name)
		}
	}
	return out
}

func (a *nodeAgent) attachInterfaces() {
	attached := a.gate.Attached()
	configured := len(a.settings.Interfaces) > 0
	failed := make(map[string]error)
	for _, name := range a.wantedInterfaces() {
		if slices.Contains(attached, name) {
			a.attached.WithLabelValues(name).Set(1)
			continue
		}
		mode, err := a.gate.Attach(name, a.settings.gateModes[name])
		if err != nil {
			if configured {
				// A configured interface without the gate: SYNs arriving
				// there could never wake a parked service, so nothing is
				// parked until it is attached.
				failed[name] = err
				a.attached.WithLabelValues(name).Set(0)
				a.logger.Warn("cannot attach the gate; nothing is parked until it is; will retry", "interface", name, "error", err)
			} else {
				a.logger.Debug("cannot attach the gate", "interface", name, "error", err)
			}
			continue
		}
		a.attached.WithLabelValues(name).Set(1)
		a.logger.Info("gating interface", "interface", name, "mode", mode)
		if name == "lo" && a.settings.SYNReplay {
			if err := bpf.PrepareLoopbackReplay(); err != nil {
				a.logger.Warn("SYNs replayed on lo will be dropped; local clients wait for their retransmit", "error", err)
			} else {
				a.logger.Info("set accept_local and route_localnet on lo so replayed SYNs from local clients are taken")
			}
		}
	}
	a.attachMu.Lock()
	a.attachErrs = failed
	a.attachMu.Unlock()
	a.publishGateStatus()
}

// gateReady is nil when the gate is attached on every configured interface.
func (a *nodeAgent) gateReady() error {
	a.attachMu.Lock()
	defer a.attachMu.Unlock()
	names := make([]string, 0, len(a.attachErrs))
	for name := range a.attachErrs {
		names = append(names, name)
	}
	if len(names) == 0 {
		return nil
	}
	slices.Sort(names)
	return fmt.Errorf("gate not attached on interface %s (config field interfaces): %w", names[0], a.attachErrs[names[0]])
}

// publishGateStatus tells the fingerprint whether the gate works: only once
// the scaler runs and the gate is attached everywhere it must be.
func (a *nodeAgent) publishGateStatus() {
	a.attachMu.Lock()
	running := a.running
	a.attachMu.Unlock()
	if !running {
		return
	}
	if err := a.gateReady(); err != nil {
		a.driver.SetGateStatus(driver.GateStatus{Reason: err.Error()})
		return
	}
	a.driver.SetGateStatus(driver.GateStatus{Supported: true})
}

// listenerAlloc resolves listeners to Nomad allocations through cgroup v2.
// The process's own cgroup list comes first (it names Nomad's v1 and v2
// cgroups alike); the v2 cgroup id from the kernel covers a process that
// exited before it was read.
func listenerAlloc(logger hclog.Logger) func(bpf.Event) (string, bool) {
	return func(ev bpf.Event) (string, bool) {
		if alloc, ok, err := cgroups.AllocOfProcess(ev.PID); ok {
			return alloc, true
		} else if err != nil {
			logger.Debug("cannot read a listener's cgroups", "pid", ev.PID, "error", err)
		}
		alloc, ok, err := cgroups.AllocOf(ev.CgroupID)
		if err != nil {
			logger.Debug("cannot resolve a listener's cgroup", "cgroup_id", ev.CgroupID, "error", err)
		}
		return alloc, ok
	}
}

// socketOwner finds the process of a socket found by a kernel lookup.
func socketOwner(logger hclog.Logger) func(uint64) (int, bool) {
	return func(inode uint64) (int, bool) {
		pid, ok, err := cgroups.ProcessOfSocket(inode)
		if err != nil {
			logger.Debug("cannot find a socket's process", "inode", inode, "error", err)
		}
		return pid, ok
	}
}

// rescanInterfaces attaches to interfaces that appear later (or that were
// missing at start).
func (a *nodeAgent) rescanInterfaces(ctx context.Context) {
	every(ctx, 10*time.Second, a.attachInterfaces)
}

func (a *nodeAgent) serveMetrics(ctx context.Context) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.registry, promhttp.HandlerOpts{}))
	a.operator.register(mux)
	srv := &http.Server{Addr: a.settings.MetricsAddress, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		a.logger.Error("metrics endpoint failed", "address", a.settings.MetricsAddress, "error", err)
	}
}

// gateCollector exports the kernel's counters.
type gateCollector struct{ gate *bpf.Gate }

var (
	gatePacketsDesc = prometheus.NewDesc("zeroscale_gate_packets_total",
		"Packets seen by the XDP gate, by outcome.", []string{"outcome"}, nil)
	synsDroppedDesc = prometheus.NewDesc("zeroscale_syns_dropped_total",
		"SYNs dropped at parked addresses (reported as wakes or not).", nil, nil)
)

func (c *gateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- gatePacketsDesc
	ch <- synsDroppedDesc
}

func (c *gateCollector) Collect(ch chan<- prometheus.Metric) {
	counters, err := c.gate.Counters()
	if err != nil {
		return
	}
	for name, v := range counters {
		ch <- prometheus.MustNewConstMetric(gatePacketsDesc, prometheus.CounterValue, float64(v), name)
	}
	ch <- prometheus.MustNewConstMetric(synsDroppedDesc, prometheus.CounterValue,
		float64(counters["parked_syn_dropped"]+counters["wake_denied"]))
}
