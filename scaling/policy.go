// Package scaling decides when a task group sleeps and wakes: it reads
// zeroscale policies from Nomad's scaling blocks, runs each group's
// awake → parking → asleep → waking → awake cycle against the gate, Consul and
// Nomad (each behind a small interface), and reports what it did as Nomad
// scaling events and Prometheus metrics.
package scaling

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// GroupID names a task group.
type GroupID struct {
	Namespace string
	Job       string
	Group     string
}

func (g GroupID) String() string { return g.Namespace + "/" + g.Job + "/" + g.Group }

// Key is the group's key in Consul's KV store.
func (g GroupID) Key() string { return consul.GroupKey(g.Namespace, g.Job, g.Group) }

// ReadyMode says when a woken group counts as ready.
type ReadyMode string

const (
	// ReadyListen: a socket listens on the parked address (seen in the kernel).
	ReadyListen ReadyMode = "listen"
	// ReadyHealthy: the instance's Consul checks pass.
	ReadyHealthy ReadyMode = "healthy"
)

// Defaults for fields the policy leaves out.
const (
	DefaultIdleTimeout = 10 * time.Minute
	DefaultWakeCount   = 1
	DefaultWakeTimeout = 2 * time.Minute
	DefaultReady       = ReadyListen
)

// Policy is a validated zeroscale policy for one group.
type Policy struct {
	ID          string
	ModifyIndex uint64
	Target      GroupID
	Min, Max    int64

	IdleTimeout time.Duration
	WakeCount   int
	WakeTimeout time.Duration
	Ready       ReadyMode
	// AwakeDuring are windows in which the group is kept awake.
	AwakeDuring []Window
	// WakeWith are groups woken with this one, whose readiness it waits
	// for, and which do not sleep while it is awake.
	WakeWith []GroupID
	// Protocols are the transports gated at each service address: TCP
	// alone unless the policy says otherwise.
	Protocols []bpf.Protocol
}

// PolicyBlock is the name of the block inside `policy { … }`.
const PolicyBlock = "zeroscale"

// PolicyError is an invalid policy; Field names what to fix.
type PolicyError struct {
	Field string
	Msg   string
}

func (e *PolicyError) Error() string { return e.Field + ": " + e.Msg }

func fieldErr(field, format string, args ...any) error {
	return &PolicyError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// HasZeroscaleBlock tells whether a Nomad scaling policy is ours.
func HasZeroscaleBlock(p *api.ScalingPolicy) bool {
	if p == nil || p.Policy == nil {
		return false
	}
	_, ok := p.Policy[PolicyBlock]
	return ok
}

// ParsePolicy validates a Nomad scaling policy that has a zeroscale block.
// Errors name the field, as in `scaling.policy.zeroscale.idle_timeout`.
func ParsePolicy(p *api.ScalingPolicy) (Policy, error) {
	const base = "scaling.policy." + PolicyBlock
	if p == nil {
		return Policy{}, fieldErr("scaling", "no policy")
	}
	out := Policy{
		ID:          p.ID,
		ModifyIndex: p.ModifyIndex,
		Target: GroupID{
			Namespace: p.Target["Namespace"],
			Job:       p.Target["Job"],
			Group:     p.Target["Group"],
		},
		IdleTimeout: DefaultIdleTimeout,
		WakeCount:   DefaultWakeCount,
		WakeTimeout: DefaultWakeTimeout,
		Ready:       DefaultReady,
		Protocols:   []bpf.Protocol{bpf.TCP},
	}
	if out.Target.Namespace == "" {
		out.Target.Namespace = "default"
	}
	if out.Target.Job == "" || out.Target.Group == "" {
		return out, fieldErr("scaling", "policy %s does not target a job's task group", p.ID)
	}
	if p.Type != "" && p.Type != "horizontal" {
		return out, fieldErr("scaling.type", "%q: zeroscale scales task groups horizontally", p.Type)
	}
	if p.Min == nil || *p.Min != 0 {
		min := "unset"
		if p.Min != nil {
			min = fmt.Sprint(*p.Min)
		}
		return out, fieldErr("scaling.min", "is %s; it must be 0 so that zeroscale can scale the group to zero", min)
	}
	out.Min = *p.Min
	if p.Max == nil {
		return out, fieldErr("scaling.max", "must be set")
	}
	out.Max = *p.Max

	block, err := singleBlock(p.Policy[PolicyBlock])
	if err != nil {
		return out, fieldErr(base, "%s", err)
	}
	known := map[string]bool{"idle_timeout": true, "wake_count": true, "wake_timeout": true, "ready": true,
		"awake_during": true, "wake_with": true, "protocols": true}
	var unknown []string
	for k := range block {
		if !known[k] {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return out, fieldErr(base+"."+unknown[0], "unknown field (want idle_timeout, wake_count, wake_timeout, ready, awake_during, wake_with or protocols)")
	}

	if v, ok := block["idle_timeout"]; ok {
		if out.IdleTimeout, err = duration(v); err != nil {
			return out, fieldErr(base+".idle_timeout", "%s", err)
		}
		if out.IdleTimeout < time.Second {
			return out, fieldErr(base+".idle_timeout", "%s is too short (at least 1s)", out.IdleTimeout)
		}
	}
	if v, ok := block["wake_timeout"]; ok {
		if out.WakeTimeout, err = duration(v); err != nil {
			return out, fieldErr(base+".wake_timeout", "%s", err)
		}
		if out.WakeTimeout < time.Second {
			return out, fieldErr(base+".wake_timeout", "%s is too short (at least 1s)", out.WakeTimeout)
		}
	}
	if v, ok := block["wake_count"]; ok {
		n, err := integer(v)
		if err != nil {
			return out, fieldErr(base+".wake_count", "%s", err)
		}
		out.WakeCount = n
	}
	if out.WakeCount < 1 || int64(out.WakeCount) > out.Max {
		return out, fieldErr(base+".wake_count", "%d is outside 1..%d (scaling.min is 0, wake_count must be at least 1 and at most scaling.max)",
			out.WakeCount, out.Max)
	}
	if v, ok := block["awake_during"]; ok {
		list, err := stringList(v)
		if err != nil {
			return out, fieldErr(base+".awake_during", "%s", err)
		}
		for i, s := range list {
			w, err := ParseWindow(s)
			if err != nil {
				return out, fieldErr(fmt.Sprintf("%s.awake_during[%d]", base, i), "%s", err)
			}
			out.AwakeDuring = append(out.AwakeDuring, w)
		}
	}
	if v, ok := block["wake_with"]; ok {
		list, err := stringList(v)
		if err != nil {
			return out, fieldErr(base+".wake_with", "%s", err)
		}
		for i, s := range list {
			job, group, ok := strings.Cut(s, "/")
			if !ok || job == "" || group == "" || strings.Contains(group, "/") {
				return out, fieldErr(fmt.Sprintf("%s.wake_with[%d]", base, i), "%q is not JOB/GROUP", s)
			}
			dep := GroupID{Namespace: out.Target.Namespace, Job: job, Group: group}
			if dep == out.Target {
				return out, fieldErr(fmt.Sprintf("%s.wake_with[%d]", base, i), "%q is the group itself", s)
			}
			out.WakeWith = append(out.WakeWith, dep)
		}
	}
	if v, ok := block["protocols"]; ok {
		list, err := stringList(v)
		if err != nil {
			return out, fieldErr(base+".protocols", "%s", err)
		}
		if len(list) == 0 {
			return out, fieldErr(base+".protocols", "is empty; want \"tcp\", \"udp\" or both")
		}
		out.Protocols = nil
		for i, s := range list {
			p, err := bpf.ParseProtocol(strings.ToLower(strings.TrimSpace(s)))
			if err != nil {
				return out, fieldErr(fmt.Sprintf("%s.protocols[%d]", base, i), "%s", err)
			}
			if slices.Contains(out.Protocols, p) {
				return out, fieldErr(fmt.Sprintf("%s.protocols[%d]", base, i), "%q is listed twice", s)
			}
			out.Protocols = append(out.Protocols, p)
		}
	}
	if v, ok := block["ready"]; ok {
		s, ok := v.(string)
		if !ok {
			return out, fieldErr(base+".ready", "must be a string, %q or %q", ReadyListen, ReadyHealthy)
		}
		switch ReadyMode(s) {
		case ReadyListen, ReadyHealthy:
			out.Ready = ReadyMode(s)
		default:
			return out, fieldErr(base+".ready", "%q: want %q or %q", s, ReadyListen, ReadyHealthy)
		}
	}
	return out, nil
}

// singleBlock accepts the shapes a block takes once Nomad has stored it: a
// map, or a list holding one map.
func singleBlock(v any) (map[string]any, error) {
	switch b := v.(type) {
	case map[string]any:
		return b, nil
	case []any:
		if len(b) != 1 {
			return nil, fmt.Errorf("want exactly one %s block, got %d", PolicyBlock, len(b))
		}
		return singleBlock(b[0])
	case []map[string]any:
		if len(b) != 1 {
			return nil, fmt.Errorf("want exactly one %s block, got %d", PolicyBlock, len(b))
		}
		return b[0], nil
	case nil:
		return map[string]any{}, nil
	}
	return nil, fmt.Errorf("is a %T, want a block", v)
}

func duration(v any) (time.Duration, error) {
	s, ok := v.(string)
	if !ok {
		return 0, fmt.Errorf("must be a duration string like \"10m\", got %v", v)
	}
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration (like \"90s\" or \"10m\")", s)
	}
	return d, nil
}

// stringList accepts a list of strings as Nomad stores it.
func stringList(v any) ([]string, error) {
	switch l := v.(type) {
	case string:
		return []string{l}, nil
	case []string:
		return l, nil
	case []any:
		out := make([]string, len(l))
		for i, e := range l {
			s, ok := e.(string)
			if !ok {
				return nil, fmt.Errorf("[%d] is %v, want a string", i, e)
			}
			out[i] = s
		}
		return out, nil
	}
	return nil, fmt.Errorf("must be a list of strings, got %v", v)
}

func integer(v any) (int, error) {
	switch n := v.(type) {
	case int:
		return n, nil
	case int64:
		return int(n), nil
	case float64:
		if n != math.Trunc(n) || n > math.MaxInt32 || n < math.MinInt32 {
			return 0, fmt.Errorf("%v is not a whole number", n)
		}
		return int(n), nil
	case string:
		return 0, fmt.Errorf("%q must be a number, not a string", n)
	}
	return 0, fmt.Errorf("%v must be a number", v)
}
