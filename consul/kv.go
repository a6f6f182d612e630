package consul

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	capi "github.com/hashicorp/consul/api"
)

// GroupKey names a task group: <namespace>/<job>/<group>, each part escaped.
func GroupKey(namespace, job, group string) string {
	return url.PathEscape(namespace) + "/" + url.PathEscape(job) + "/" + url.PathEscape(group)
}

// ActivityReport is one node's summary of one group's service addresses.
type ActivityReport struct {
	Node        string    `json:"node"`
	Established int64     `json:"established"` // open real connections now
	LastActive  time.Time `json:"last_active"` // last real connection opened or closed
	Checks      uint64    `json:"checks"`      // health-check connections seen
	// Ungated names a socket of a protocol the group's policy does not gate
	// ("10.0.0.5:53/udp"), seen at one of its addresses on this node.
	Ungated string `json:"ungated,omitempty"`
	// ParkedEpoch acknowledges that this node closed its gate for the
	// group's parking attempt of that epoch.
	ParkedEpoch uint64    `json:"parked_epoch,omitempty"`
	Reported    time.Time `json:"reported"`
}

func (c *Client) activityKey(group, node string) string {
	return c.prefix + "/activity/" + group + "/" + url.PathEscape(node)
}

// PublishActivity writes this node's report for a group.
func (c *Client) PublishActivity(group string, r ActivityReport) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode activity report: %w", err)
	}
	ctx, cancel := c.requestContext(context.Background())
	defer cancel()
	_, err = c.api.KV().Put(&capi.KVPair{Key: c.activityKey(group, r.Node), Value: b}, writeOpts(ctx))
	return classify(err, c.kvNeed(), "publish activity of "+group)
}

// ReadActivity returns the reports of every node for a group, leaving out
// those older than maxAge (nodes that died or stopped reporting).
func (c *Client) ReadActivity(group string, maxAge time.Duration, now time.Time) ([]ActivityReport, error) {
	ctx, cancel := c.requestContext(context.Background())
	defer cancel()
	pairs, _, err := c.api.KV().List(c.prefix+"/activity/"+group+"/", queryOpts(ctx))
	if err != nil {
		return nil, classify(err, c.kvNeed(), "read activity of "+group)
	}
	var out []ActivityReport
	for _, p := range pairs {
		var r ActivityReport
		if err := json.Unmarshal(p.Value, &r); err != nil {
			c.logger.Warn("ignoring an unreadable activity report", "key", p.Key, "error", err)
			continue
		}
		if maxAge > 0 && now.Sub(r.Reported) > maxAge {
			continue
		}
		out = append(out, r)
	}
	return out, nil
}

// DeleteStaleActivity removes reports older than maxAge under the prefix.
func (c *Client) DeleteStaleActivity(maxAge time.Duration, now time.Time) error {
	ctx, cancel := c.requestContext(context.Background())
	pairs, _, err := c.api.KV().List(c.prefix+"/activity/", queryOpts(ctx))
	cancel()
	if err != nil {
		return classify(err, c.kvNeed(), "list activity reports")
	}
	for _, p := range pairs {
		var r ActivityReport
		if json.Unmarshal(p.Value, &r) == nil && now.Sub(r.Reported) <= maxAge {
			continue
		}
		if err := c.deleteKey(p.Key); err != nil {
			return classify(err, c.kvNeed(), "delete a stale activity report")
		}
	}
	return nil
}

// deleteKey deletes one key within the request timeout.
func (c *Client) deleteKey(key string) error {
	ctx, cancel := c.requestContext(context.Background())
	defer cancel()
	_, err := c.api.KV().Delete(key, writeOpts(ctx))
	return err
}

// queryOpts and writeOpts carry ctx's deadline to one request.
func queryOpts(ctx context.Context) *capi.QueryOptions {
	return (&capi.QueryOptions{}).WithContext(ctx)
}

func writeOpts(ctx context.Context) *capi.WriteOptions {
	return (&capi.WriteOptions{}).WithContext(ctx)
}

// Phase of a group in its sleep/wake cycle.
type Phase string

const (
	PhaseAwake   Phase = "awake"
	PhaseParking Phase = "parking"
	PhaseAsleep  Phase = "asleep"
	PhaseWaking  Phase = "waking"
)

// Address is a service address of a group, with the node that serves it.
type Address struct {
	Service string `json:"service"`
	Addr    string `json:"addr"` // ip:port
	Node    string `json:"node"`
}

// GroupState is the cluster-wide record of a group's phase. Nodes change it
// only by check-and-set, so concurrent wakes from many nodes agree on one
// winner.
type GroupState struct {
	Phase     Phase     `json:"phase"`
	Epoch     uint64    `json:"epoch"` // grows with every parking attempt
	Since     time.Time `json:"since"`
	By        string    `json:"by"`               // node that made the change
	Addresses []Address `json:"addresses"`        // what was parked
	Allocs    []string  `json:"allocs,omitempty"` // allocations running when parking began
	Reason    string    `json:"reason,omitempty"` // for logs and events
	// Forced: an operator asked for this parking; traffic does not undo it.
	Forced bool `json:"forced,omitempty"`
	// FirstSYN is the kernel time (wall clock) of the SYN that woke the group.
	FirstSYN time.Time `json:"first_syn,omitzero"`
	// Index is the KV ModifyIndex this state was read at (0: absent).
	Index uint64 `json:"-"`
}

func (c *Client) groupStateKey(group string) string { return c.prefix + "/groups/" + group }

// GroupState reads a group's record; absent means awake with Index 0.
func (c *Client) GroupState(group string) (GroupState, error) {
	ctx, cancel := c.requestContext(context.Background())
	defer cancel()
	p, _, err := c.api.KV().Get(c.groupStateKey(group), (&capi.QueryOptions{RequireConsistent: true}).WithContext(ctx))
	if err != nil {
		return GroupState{}, classify(err, c.kvNeed(), "read state of "+group)
	}
	if p == nil {
		return GroupState{Phase: PhaseAwake}, nil
	}
	return decodeState(p)
}

// GroupStates reads every group's record at once (a consistent read), by
// group key; a group without a record is absent.
func (c *Client) GroupStates() (map[string]GroupState, error) {
	ctx, cancel := c.requestContext(context.Background())
	defer cancel()
	prefix := c.prefix + "/groups/"
	pairs, _, err := c.api.KV().List(prefix, (&capi.QueryOptions{RequireConsistent: true}).WithContext(ctx))
	if err != nil {
		return nil, classify(err, c.kvNeed(), "read the group states")
	}
	return c.decodeStates(prefix, pairs), nil
}

// decodeStates maps group key → record, skipping (and logging) any record
// that cannot be read.
func (c *Client) decodeStates(prefix string, pairs capi.KVPairs) map[string]GroupState {
	out := make(map[string]GroupState, len(pairs))
	for _, p := range pairs {
		st, err := decodeState(p)
		if err != nil {
			c.logger.Warn("ignoring an unreadable group state", "error", err)
			continue
		}
		out[strings.TrimPrefix(p.Key, prefix)] = st
	}
	return out
}

func decodeState(p *capi.KVPair) (GroupState, error) {
	var st GroupState
	if err := json.Unmarshal(p.Value, &st); err != nil {
		return GroupState{}, fmt.Errorf("decode state at %s: %w", p.Key, err)
	}
	st.Index = p.ModifyIndex
	return st, nil
}

// ErrConflict means another node changed the state first.
var ErrConflict = errors.New("group state changed concurrently")

// SwapGroupState writes st if the record is still at expected.Index (0: must
// not exist). On a lost race it returns ErrConflict.
func (c *Client) SwapGroupState(group string, expected GroupState, st GroupState) (GroupState, error) {
	b, err := json.Marshal(st)
	if err != nil {
		return GroupState{}, fmt.Errorf("encode group state: %w", err)
	}
	ctx, cancel := c.requestContext(context.Background())
	defer cancel()
	// One transaction sets the record and returns its new index: a CAS and a
	// read back were two round trips on the wake's path.
	ops := capi.TxnOps{{KV: &capi.KVTxnOp{Verb: capi.KVCAS, Key: c.groupStateKey(group), Value: b, Index: expected.Index}}}
	ok, resp, _, err := c.api.Txn().Txn(ops, queryOpts(ctx))
	if err != nil {
		return GroupState{}, classify(err, c.kvNeed(), "change state of "+group)
	}
	if !ok {
		for _, e := range resp.Errors {
			if strings.Contains(strings.ToLower(e.What), "permission denied") {
				return GroupState{}, &PermissionError{Needs: c.kvNeed(), Action: "change state of " + group, Err: errors.New(e.What)}
			}
		}
		return GroupState{}, ErrConflict
	}
	if len(resp.Results) != 1 || resp.Results[0].KV == nil {
		return GroupState{}, fmt.Errorf("change state of %s: the transaction returned no entry", group)
	}
	st.Index = resp.Results[0].KV.ModifyIndex
	return st, nil
}

// DeleteGroupState forgets a group (its policy went away).
func (c *Client) DeleteGroupState(group string) error {
	return classify(c.deleteKey(c.groupStateKey(group)), c.kvNeed(), "delete state of "+group)
}

// WatchGroupStates calls onChange with every group record whenever any
// changes, until ctx ends.
func (c *Client) WatchGroupStates(ctx context.Context, onChange func(map[string]GroupState), onError func(error)) {
	prefix := c.prefix + "/groups/"
	c.watchPrefix(ctx, prefix, func(pairs capi.KVPairs) {
		onChange(c.decodeStates(prefix, pairs))
	}, onError, "watch group states")
}

// WatchActivity calls onChange with every node's latest report per group
// (group key → node → report) whenever any changes, until ctx ends.
func (c *Client) WatchActivity(ctx context.Context, onChange func(map[string]map[string]ActivityReport), onError func(error)) {
	prefix := c.prefix + "/activity/"
	c.watchPrefix(ctx, prefix, func(pairs capi.KVPairs) {
		out := make(map[string]map[string]ActivityReport)
		for _, p := range pairs {
			var r ActivityReport
			if err := json.Unmarshal(p.Value, &r); err != nil {
				continue
			}
			rest := strings.TrimPrefix(p.Key, prefix)
			i := strings.LastIndexByte(rest, '/')
			if i < 0 {
				continue
			}
			group := rest[:i]
			if out[group] == nil {
				out[group] = make(map[string]ActivityReport)
			}
			out[group][r.Node] = r
		}
		onChange(out)
	}, onError, "watch activity reports")
}

// prefixWait is how long one blocking list query of a KV prefix waits.
const prefixWait = 5 * time.Minute

// watchPrefix runs blocking list queries on a KV prefix.
func (c *Client) watchPrefix(ctx context.Context, prefix string, onChange func(capi.KVPairs), onError func(error), action string) {
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		qctx, cancel := c.blockingContext(ctx, prefixWait)
		q := (&capi.QueryOptions{WaitIndex: index, WaitTime: prefixWait}).WithContext(qctx)
		pairs, meta, err := c.api.KV().List(prefix, q)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			err = classify(err, c.kvNeed(), action)
			if onError != nil {
				onError(err)
			}
			delay := backoff(failures)
			if IsPermission(err) {
				delay = time.Minute
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			continue
		}
		failures = 0
		var changed bool
		if index, changed = advanceIndex(index, meta.LastIndex); !changed {
			continue
		}
		onChange(pairs)
	}
}
