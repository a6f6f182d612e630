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

// Watch follows the instances of a set of services with blocking queries and
// calls onChange with each service's full instance list: once when it starts
// following a service, then whenever the list changes.
type Watch struct {
	client   *Client
	onChange func(service string, instances []Instance)
	onError  func(service string, err error)
	wait     time.Duration

	mu      sync.Mutex
	ctx     context.Context
	cancels map[string]context.CancelFunc
	wg      sync.WaitGroup
}

// NewWatch creates a watch; nothing runs until SetServices.
func (c *Client) NewWatch(ctx context.Context, onChange func(string, []Instance), onError func(string, error)) *Watch {
	if onError == nil {
		onError = func(string, error) {}
	}
	return &Watch{
		client:   c,
		onChange: onChange,
		onError:  onError,
		wait:     5 * time.Minute,
		ctx:      ctx,
		cancels:  make(map[string]context.CancelFunc),
	}
}

// SetServices makes the watch follow exactly these services.
func (w *Watch) SetServices(names []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	want := make(map[string]bool, len(names))
	for _, n := range names {
		want[n] = true
		if _, ok := w.cancels[n]; ok {
			continue
		}
		ctx, cancel := context.WithCancel(w.ctx)
		w.cancels[n] = cancel
		w.wg.Add(1)
		go func(name string) {
			defer w.wg.Done()
			w.follow(ctx, name)
		}(n)
	}
	for n, cancel := range w.cancels {
		if !want[n] {
			cancel()
			delete(w.cancels, n)
		}
	}
}

// Stop ends every watch and waits for them.
func (w *Watch) Stop() {
	w.mu.Lock()
	for n, cancel := range w.cancels {
		cancel()
		delete(w.cancels, n)
	}
	w.mu.Unlock()
	w.wg.Wait()
}

// follow runs blocking queries for one service until ctx ends.
//
// A new index does not mean new instances: Consul answers a blocking query
// when anything its index covers changes, and for a service with no
// instances that index is the whole catalog's (any node, service or check
// write, such as the agent syncing its node before a registration). So the
// watch compares what it read with what it last delivered.
func (w *Watch) follow(ctx context.Context, name string) {
	var index uint64
	var failures int
	var reportedDenied bool
	var delivered []Instance
	var started bool
	for ctx.Err() == nil {
		qctx, cancel := w.client.blockingContext(ctx, w.wait)
		q := (&capi.QueryOptions{WaitIndex: index, WaitTime: w.wait, AllowStale: false}).WithContext(qctx)
		entries, meta, err := w.client.api.Health().Service(name, "", false, q)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			err = classify(err, `service "`+name+`" { policy = "read" } and node_prefix "" { policy = "read" }`,
				"read instances of service "+name)
			failures++
			delay := backoff(failures)
			if IsPermission(err) {
				// Report once; fixing the token's policy needs an operator, so
				// poll slowly instead of spinning.
				if !reportedDenied {
					w.onError(name, err)
					reportedDenied = true
				}
				delay = time.Minute
			} else {
				w.onError(name, err)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			continue
		}
		failures, reportedDenied = 0, false
		var changed bool
		if index, changed = advanceIndex(index, meta.LastIndex); !changed {
			continue
		}
		var out []Instance
		for _, e := range entries {
			if inst, ok := instanceFrom(e); ok {
				out = append(out, inst)
			}
		}
		if started && reflect.DeepEqual(out, delivered) {
			continue
		}
		started, delivered = true, out
		w.onChange(name, slices.Clone(out)) // the callee may reorder its copy
	}
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
	var out []Instance
	for _, e := range entries {
		if inst, ok := instanceFrom(e); ok {
			out = append(out, inst)
		}
	}
	return out, nil
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
