package consul

import (
	"context"
	"math/rand/v2"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	capi "github.com/hashicorp/consul/api"
)

// PlaceholderTag marks the stand-in instance of a sleeping service.
const PlaceholderTag = "zeroscale-asleep"

// nomadServicePrefix starts the service IDs Nomad registers:
// _nomad-task-<alloc ID>-<task or group-NAME>-<service>-<port label>.
const nomadServicePrefix = "_nomad-task-"

// Instance is one registered instance of a service.
type Instance struct {
	ID      string
	Service string
	Address netip.Addr
	Port    uint16
	Node    string
	AllocID string // for Nomad-registered instances
	Passing bool   // every check passing
	// Checked: the instance has checks of its own. Without any, Consul
	// calls it passing from its registration on, before its task even
	// runs: that is no sign it serves.
	Checked  bool
	Tags     []string
	Meta     map[string]string
	Nomad    bool // registered by Nomad (external-source = nomad)
	Asleep   bool // a zeroscale placeholder
	Modified uint64
}

// AddrPort is the instance's address.
func (i Instance) AddrPort() netip.AddrPort { return netip.AddrPortFrom(i.Address, i.Port) }

// AllocIDFromServiceID extracts the allocation ID from a Nomad service ID.
func AllocIDFromServiceID(id string) (string, bool) {
	rest, ok := strings.CutPrefix(id, nomadServicePrefix)
	if !ok || len(rest) < 36 || (len(rest) > 36 && rest[36] != '-') {
		return "", false
	}
	alloc := rest[:36]
	if strings.Count(alloc, "-") != 4 {
		return "", false
	}
	return alloc, true
}

func instanceFrom(e *capi.ServiceEntry) (Instance, bool) {
	if e == nil || e.Service == nil {
		return Instance{}, false
	}
	addrText := e.Service.Address
	if addrText == "" && e.Node != nil {
		addrText = e.Node.Address
	}
	addr, err := netip.ParseAddr(addrText)
	if err != nil {
		// Hostnames cannot be gated: there is no address to key on.
		if ips, lerr := net.LookupIP(addrText); lerr == nil && len(ips) > 0 {
			addr, _ = netip.AddrFromSlice(ips[0])
		}
		if !addr.IsValid() {
			return Instance{}, false
		}
	}
	inst := Instance{
		ID:       e.Service.ID,
		Service:  e.Service.Service,
		Address:  addr.Unmap(),
		Port:     uint16(e.Service.Port),
		Tags:     e.Service.Tags,
		Meta:     e.Service.Meta,
		Passing:  e.Checks.AggregatedStatus() == capi.HealthPassing,
		Modified: e.Service.ModifyIndex,
	}
	if e.Node != nil {
		inst.Node = e.Node.Node
	}
	for _, c := range e.Checks {
		if c != nil && c.ServiceID == e.Service.ID {
			inst.Checked = true
		}
	}
	inst.Nomad = e.Service.Meta["external-source"] == "nomad"
	if alloc, ok := AllocIDFromServiceID(e.Service.ID); ok {
		inst.AllocID = alloc
		inst.Nomad = true
	}
	inst.Asleep = slices.Contains(e.Service.Tags, PlaceholderTag)
	return inst, true
}

// Watch follows the instances of a set of services and calls onChange with
// each service's full instance list: once when it starts following a
// service, then whenever the list changes.
//
// A blocking query holds one HTTP connection to the agent for as long as it
// waits, and the agent refuses a client more than
// limits.http_max_conns_per_client connections (200 by default): one
// blocking query per service left a node with 1,000 services blind to most
// of them. So only the first maxBlocking services get a blocking query each;
// one poller reads the others in turn with plain queries, one at a time, on
// one connection however many they are.
type Watch struct {
	client   *Client
	onChange func(service string, instances []Instance)
	onError  func(service string, err error)
	wait     time.Duration // of one blocking query

	// maxBlocking services at most have a blocking query, leaving most of
	// the agent's 200 connections to the plugin's other requests and to
	// the other clients on the host.
	maxBlocking int
	// The poller reads pollRate services a second, more if that would not
	// read each one every pollEvery, but never more than maxPollRate, nor
	// any one service more often than every minPollGap (see pollInterval).
	pollRate    float64
	maxPollRate float64
	pollEvery   time.Duration
	minPollGap  time.Duration

	mu       sync.Mutex
	ctx      context.Context
	services map[string]*followed
	polled   []string // the poller's services, in SetServices order
	// pollSoon are services new to the poller: read before its round, so
	// a service's first list does not wait for a whole round.
	pollSoon   []string
	pollWake   chan struct{} // the poller has new services
	stopPoller context.CancelFunc
	wg         sync.WaitGroup
}

// followed is one service of the watch. Whether a blocking query or the
// poller reads it, the list it last delivered stays here, so that moving
// between the two delivers no unchanged list.
type followed struct {
	cancel context.CancelFunc // of its blocking query; nil when polled
	// turn grows each time the service changes hands: a reader delivers
	// only on the turn it started reading in (guarded by Watch.mu).
	turn uint64

	// deliverMu is held from the comparison through onChange, so that when
	// the old and the new reader overlap during a hand-over, the service's
	// lists still arrive in the order they were read. It guards what follows.
	deliverMu sync.Mutex
	started   bool // a list was delivered
	delivered []Instance
}

// NewWatch creates a watch; nothing runs until SetServices.
func (c *Client) NewWatch(ctx context.Context, onChange func(string, []Instance), onError func(string, error)) *Watch {
	if onError == nil {
		onError = func(string, error) {}
	}
	return &Watch{
		client:      c,
		onChange:    onChange,
		onError:     onError,
		wait:        5 * time.Minute,
		maxBlocking: 64,
		pollRate:    50,
		maxPollRate: 250,
		pollEvery:   10 * time.Second,
		minPollGap:  time.Second,
		ctx:         ctx,
		services:    make(map[string]*followed),
		pollWake:    make(chan struct{}, 1),
	}
}

// SetServices makes the watch follow exactly these services, the most
// urgent first. The first 64 (maxBlocking) are followed with a blocking
// query each and hear of a change at once; the others are polled in turn
// and hear of it within about 10 s (pollEvery; longer beyond 2,500 polled
// services, as the poller's rate is bounded). A service that moves between
// the two is not delivered again unless its list changed.
func (w *Watch) SetServices(names []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	want := make(map[string]bool, len(names))
	w.polled = w.polled[:0]
	for _, name := range names {
		if want[name] {
			continue
		}
		want[name] = true
		blocking := len(want) <= w.maxBlocking
		if !blocking {
			w.polled = append(w.polled, name)
		}
		f, known := w.services[name]
		if known && (f.cancel != nil) == blocking {
			continue // stays where it is
		}
		if !known {
			f = &followed{}
			w.services[name] = f
		}
		f.turn++ // its reader so far, if any, no longer delivers
		if f.cancel != nil {
			f.cancel()
			f.cancel = nil
		}
		if blocking {
			w.startFollowing(name, f)
		} else {
			w.pollSoon = append(w.pollSoon, name)
		}
	}
	for name, f := range w.services {
		if !want[name] {
			if f.cancel != nil {
				f.cancel()
			}
			delete(w.services, name)
		}
	}
	// Keep each service still polled once (one may have moved out and back).
	queued := make(map[string]bool, len(w.pollSoon))
	w.pollSoon = slices.DeleteFunc(w.pollSoon, func(name string) bool {
		drop := queued[name] || !w.isPolled(name)
		queued[name] = true
		return drop
	})
	if len(w.polled) > 0 {
		w.startPoller()
		select {
		case w.pollWake <- struct{}{}:
		default:
		}
	}
}

// startFollowing gives a service a blocking query of its own. w.mu is held.
func (w *Watch) startFollowing(name string, f *followed) {
	ctx, cancel := context.WithCancel(w.ctx)
	f.cancel = cancel
	turn := f.turn
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		w.follow(ctx, name, f, turn)
	}()
}

// startPoller starts the poller unless it runs. w.mu is held.
func (w *Watch) startPoller() {
	if w.stopPoller != nil {
		return
	}
	ctx, cancel := context.WithCancel(w.ctx)
	w.stopPoller = cancel
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		w.poll(ctx)
	}()
}

// isPolled says whether the poller reads this service. w.mu is held.
func (w *Watch) isPolled(name string) bool {
	f, ok := w.services[name]
	return ok && f.cancel == nil
}

// Stop ends every watch and waits for them.
func (w *Watch) Stop() {
	w.mu.Lock()
	for name, f := range w.services {
		if f.cancel != nil {
			f.cancel()
		}
		delete(w.services, name)
	}
	w.polled, w.pollSoon = nil, nil
	if w.stopPoller != nil {
		w.stopPoller()
		w.stopPoller = nil
	}
	w.mu.Unlock()
	w.wg.Wait()
}

// deliver hands a service's list to onChange unless it is the list last
// delivered, or the reader lost the service (to the other tier, or it is
// no longer followed) since it started reading on this turn.
func (w *Watch) deliver(name string, f *followed, turn uint64, list []Instance) {
	f.deliverMu.Lock()
	defer f.deliverMu.Unlock()
	w.mu.Lock()
	current := w.services[name] == f && f.turn == turn
	w.mu.Unlock()
	if !current || f.started && reflect.DeepEqual(list, f.delivered) {
		return
	}
	f.started, f.delivered = true, list
	w.onChange(name, slices.Clone(list)) // the callee may reorder its copy
}

// readFailures is how the reads of one service have been failing.
type readFailures struct {
	count          int
	reportedDenied bool
}

// failed reports a failed read of a service and says how long to wait
// before reading it again.
func (w *Watch) failed(name string, err error, fails *readFailures) time.Duration {
	err = classify(err, `service "`+name+`" { policy = "read" } and node_prefix "" { policy = "read" }`,
		"read instances of service "+name)
	fails.count++
	if IsPermission(err) {
		// Report once; fixing the token's policy needs an operator, so
		// read slowly instead of spinning.
		if !fails.reportedDenied {
			w.onError(name, err)
			fails.reportedDenied = true
		}
		return time.Minute
	}
	w.onError(name, err)
	return backoff(fails.count)
}

// follow runs blocking queries for one service until ctx ends.
//
// A new index does not mean new instances: Consul answers a blocking query
// when anything its index covers changes, and for a service with no
// instances that index is the whole catalog's (any node, service or check
// write, such as the agent syncing its node before a registration). So
// deliver compares what was read with what was last delivered.
func (w *Watch) follow(ctx context.Context, name string, f *followed, turn uint64) {
	var index uint64
	var fails readFailures
	for ctx.Err() == nil {
		qctx, cancel := w.client.blockingContext(ctx, w.wait)
		q := (&capi.QueryOptions{WaitIndex: index, WaitTime: w.wait}).WithContext(qctx)
		entries, meta, err := w.client.api.Health().Service(name, "", false, q)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(w.failed(name, err, &fails)):
			}
			continue
		}
		fails = readFailures{}
		var changed bool
		if index, changed = advanceIndex(index, meta.LastIndex); changed {
			w.deliver(name, f, turn, instancesFrom(entries))
		}
	}
}

// pollInterval is the time between the starts of two of the poller's reads
// when it has n services: pollRate reads a second (50), more if that would
// not read each one every pollEvery (10 s), but no more than maxPollRate
// (250, so beyond 2,500 services a round takes longer than pollEvery), nor
// than one read of each service every minPollGap (1 s: a few services are
// not read 50 times a second). The agent forwards each read to a server;
// reads are one at a time, so a slow answer slows the rate further.
func (w *Watch) pollInterval(n int) time.Duration {
	services := float64(max(n, 1))
	rate := max(w.pollRate, services/w.pollEvery.Seconds())
	rate = min(rate, w.maxPollRate, services/w.minPollGap.Seconds())
	return time.Duration(float64(time.Second) / rate)
}

// poll reads the services that have no blocking query, one at a time, until
// ctx ends: first those new to it, then all of them in turn.
func (w *Watch) poll(ctx context.Context) {
	p := poller{w: w, failures: make(map[string]*polledFailures)}
	for {
		pick, n, retryAt := p.next(time.Now())
		if pick.f == nil {
			// Nothing to read before retryAt (never, when zero): wait for
			// it or for new services.
			var retry <-chan time.Time
			if !retryAt.IsZero() {
				retry = time.After(time.Until(retryAt))
			}
			select {
			case <-ctx.Done():
				return
			case <-w.pollWake:
			case <-retry:
			}
			continue
		}
		began := time.Now()
		p.read(ctx, pick)
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Until(began.Add(w.pollInterval(n)))):
		}
	}
}

// poller is the state of Watch.poll, its goroutine's alone.
type poller struct {
	w        *Watch
	cursor   int // in w.polled, of the round-robin
	failures map[string]*polledFailures
}

// polledFailures are a polled service's failing reads and when to read it
// again.
type polledFailures struct {
	readFailures
	retryAt time.Time
}

// pollPick is a service the poller is to read, on its turn.
type pollPick struct {
	name string
	f    *followed
	turn uint64
}

// next picks the service to read now, and says how many the poller has.
// When none is due it picks none and says when the first retry is due.
func (p *poller) next(now time.Time) (pick pollPick, polled int, retryAt time.Time) {
	w := p.w
	w.mu.Lock()
	defer w.mu.Unlock()
	due := func(name string) bool {
		fails, ok := p.failures[name]
		if ok && fails.retryAt.After(now) {
			if retryAt.IsZero() || fails.retryAt.Before(retryAt) {
				retryAt = fails.retryAt
			}
			return false
		}
		return true
	}
	picked := func(name string) (pollPick, int, time.Time) {
		f := w.services[name]
		return pollPick{name: name, f: f, turn: f.turn}, len(w.polled), time.Time{}
	}
	for len(w.pollSoon) > 0 {
		name := w.pollSoon[0]
		w.pollSoon = w.pollSoon[1:]
		if w.isPolled(name) && due(name) {
			return picked(name)
		}
	}
	for range len(w.polled) {
		if p.cursor >= len(w.polled) {
			p.cursor = 0
			p.forgetDropped()
		}
		name := w.polled[p.cursor]
		p.cursor++
		if due(name) {
			return picked(name)
		}
	}
	return pollPick{}, len(w.polled), retryAt
}

// forgetDropped forgets the failures of services no longer polled. w.mu is
// held.
func (p *poller) forgetDropped() {
	for name := range p.failures {
		if !p.w.isPolled(name) {
			delete(p.failures, name)
		}
	}
}

// read reads one polled service and delivers its list, or counts the
// failure and sets when to read it again.
func (p *poller) read(ctx context.Context, pick pollPick) {
	rctx, cancel := p.w.client.requestContext(ctx)
	defer cancel()
	entries, _, err := p.w.client.api.Health().Service(pick.name, "", false, queryOpts(rctx))
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		fails := p.failures[pick.name]
		if fails == nil {
			fails = &polledFailures{}
			p.failures[pick.name] = fails
		}
		fails.retryAt = time.Now().Add(p.w.failed(pick.name, err, &fails.readFailures))
		return
	}
	delete(p.failures, pick.name)
	p.w.deliver(pick.name, pick.f, pick.turn, instancesFrom(entries))
}

// advanceIndex is the blocking-query index after an answer at last, and
// whether the answer is news. The index must grow; if it goes backwards (a
// restored or new cluster) the watch starts over from 1 (0 would not block).
func advanceIndex(prev, last uint64) (uint64, bool) {
	switch {
	case last < prev:
		return 1, true
	case last == prev:
		return prev, false
	case last == 0:
		return 1, true
	}
	return last, true
}

// backoff grows to 30 s with ±25 % jitter, so many nodes do not retry in step.
func backoff(failures int) time.Duration {
	d := time.Second << min(failures-1, 5)
	d = min(d, 30*time.Second)
	jitter := time.Duration(rand.Int64N(int64(d) / 2))
	return d - d/4 + jitter
}

// Instances reads a service's instances once.
func (c *Client) Instances(service string) ([]Instance, error) {
	ctx, cancel := c.requestContext(context.Background())
	defer cancel()
	entries, _, err := c.api.Health().Service(service, "", false, queryOpts(ctx))
	if err != nil {
		return nil, classify(err, `service "`+service+`" { policy = "read" }`, "read instances of service "+service)
	}
	return instancesFrom(entries), nil
}

// instancesFrom is the instances of Consul's entries, less those that have
// no address to gate.
func instancesFrom(entries []*capi.ServiceEntry) []Instance {
	var out []Instance
	for _, e := range entries {
		if inst, ok := instanceFrom(e); ok {
			out = append(out, inst)
		}
	}
	return out
}

// LocalAddrs lists the addresses bound on this host's interfaces, to tell
// which instances this node serves.
func LocalAddrs() (map[netip.Addr]bool, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	out := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out[p.Addr().Unmap()] = true
		}
	}
	return out, nil
}
