package consul

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	capi "github.com/hashicorp/consul/api"
)

// Meta keys on placeholders, naming the group that sleeps behind them.
const (
	MetaNamespace = "zeroscale-namespace"
	MetaJob       = "zeroscale-job"
	MetaGroup     = "zeroscale-group"
)

// Placeholder stands in for a sleeping service instance: same name, address
// and port, so DNS and catalog users keep resolving the address.
type Placeholder struct {
	Service   string
	Address   netip.Addr
	Port      uint16
	Namespace string
	Job       string
	Group     string
}

// ID is stable for the same service, address and group, so registering again
// after a restart changes nothing.
func (p Placeholder) ID() string {
	h := sha256.Sum256([]byte(fmt.Sprintf("%s\x00%s\x00%s\x00%s\x00%s", p.Namespace, p.Job, p.Group, p.Service,
		netip.AddrPortFrom(p.Address, p.Port))))
	return "zeroscale-asleep-" + p.Service + "-" + hex.EncodeToString(h[:6])
}

func (p Placeholder) checkID() string { return p.ID() + "-ttl" }

// PlaceholderOptions tunes the TTL check.
type PlaceholderOptions struct {
	// TTL of the check the plugin keeps passing; when the plugin dies the
	// check turns critical (and DNS stops answering with it) after TTL.
	TTL time.Duration
	// DeregisterAfter removes a critical placeholder from the catalog.
	DeregisterAfter time.Duration
}

// Placeholders registers stand-ins through the local agent and keeps their
// TTL checks passing.
type Placeholders struct {
	client *Client
	opts   PlaceholderOptions

	mu   sync.Mutex
	regs map[string]Placeholder // by ID
}

// NewPlaceholders returns a registry; run Keep to refresh TTLs.
func (c *Client) NewPlaceholders(opts PlaceholderOptions) *Placeholders {
	if opts.TTL <= 0 {
		opts.TTL = 30 * time.Second
	}
	if opts.DeregisterAfter < time.Minute {
		opts.DeregisterAfter = time.Minute // Consul's minimum
	}
	return &Placeholders{client: c, opts: opts, regs: make(map[string]Placeholder)}
}

func (ps *Placeholders) registration(p Placeholder) *capi.AgentServiceRegistration {
	return &capi.AgentServiceRegistration{
		ID:      p.ID(),
		Name:    p.Service,
		Address: p.Address.String(),
		Port:    int(p.Port),
		Tags:    []string{PlaceholderTag},
		Meta: map[string]string{
			MetaNamespace:     p.Namespace,
			MetaJob:           p.Job,
			MetaGroup:         p.Group,
			"external-source": "zeroscale",
		},
		Check: &capi.AgentServiceCheck{
			CheckID:                        p.checkID(),
			Name:                           "zeroscale: service asleep, wakes on connect",
			TTL:                            ps.opts.TTL.String(),
			Status:                         capi.HealthPassing,
			DeregisterCriticalServiceAfter: ps.opts.DeregisterAfter.String(),
		},
	}
}

// Register adds the placeholder (or refreshes it); idempotent.
func (ps *Placeholders) Register(p Placeholder) error {
	ctx, cancel := ps.client.requestContext(context.Background())
	defer cancel()
	opts := capi.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(ctx)
	if err := ps.client.api.Agent().ServiceRegisterOpts(ps.registration(p), opts); err != nil {
		return classify(err, `service "`+p.Service+`" { policy = "write" }`, "register placeholder for "+p.Service)
	}
	ps.mu.Lock()
	ps.regs[p.ID()] = p
	ps.mu.Unlock()
	return nil
}

// Deregister removes the placeholder; removing an absent one is not an error.
func (ps *Placeholders) Deregister(p Placeholder) error {
	ps.mu.Lock()
	delete(ps.regs, p.ID())
	ps.mu.Unlock()
	ctx, cancel := ps.client.requestContext(context.Background())
	defer cancel()
	err := ps.client.api.Agent().ServiceDeregisterOpts(p.ID(), queryOpts(ctx))
	if err != nil && !isNotFound(err) {
		return classify(err, `service "`+p.Service+`" { policy = "write" }`, "remove placeholder for "+p.Service)
	}
	return nil
}

func isNotFound(err error) bool {
	var se capi.StatusError
	return errors.As(err, &se) && se.Code == 404
}

// Registered lists what this process keeps alive.
func (ps *Placeholders) Registered() []Placeholder {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	out := make([]Placeholder, 0, len(ps.regs))
	for _, p := range ps.regs {
		out = append(out, p)
	}
	return out
}

// Keep refreshes the TTL checks every third of the TTL until ctx ends, and
// re-registers placeholders the agent lost (for example after its restart).
func (ps *Placeholders) Keep(ctx context.Context) {
	tick := time.NewTicker(ps.opts.TTL / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for _, p := range ps.Registered() {
			if ps.refresh(ctx, p) == nil {
				continue
			}
			if rerr := ps.Register(p); rerr != nil {
				ps.client.logger.Warn("could not refresh placeholder", "service", p.Service, "address",
					netip.AddrPortFrom(p.Address, p.Port), "error", rerr)
			}
		}
	}
}

// refresh passes the placeholder's TTL check once, within the request timeout.
func (ps *Placeholders) refresh(ctx context.Context, p Placeholder) error {
	ctx, cancel := ps.client.requestContext(ctx)
	defer cancel()
	return ps.client.api.Agent().UpdateTTLOpts(p.checkID(), "asleep; a connection wakes it", capi.HealthPassing, queryOpts(ctx))
}

// LocalPlaceholders lists the placeholders registered on the local agent, by any
// process: after a plugin restart they say which groups sleep.
func (c *Client) LocalPlaceholders() ([]Placeholder, error) {
	ctx, cancel := c.requestContext(context.Background())
	defer cancel()
	services, err := c.api.Agent().ServicesWithFilterOpts(fmt.Sprintf("%q in Tags", PlaceholderTag), queryOpts(ctx))
	if err != nil {
		return nil, classify(err, `service_prefix "" { policy = "read" }`, "list placeholders")
	}
	var out []Placeholder
	for _, s := range services {
		if !slices.Contains(s.Tags, PlaceholderTag) {
			continue
		}
		addr, err := netip.ParseAddr(s.Address)
		if err != nil {
			continue
		}
		out = append(out, Placeholder{
			Service:   s.Service,
			Address:   addr.Unmap(),
			Port:      uint16(s.Port),
			Namespace: s.Meta[MetaNamespace],
			Job:       s.Meta[MetaJob],
			Group:     s.Meta[MetaGroup],
		})
	}
	return out, nil
}

// String is for logs.
func (p Placeholder) String() string {
	return p.Service + "@" + p.Address.String() + ":" + strconv.Itoa(int(p.Port))
}
