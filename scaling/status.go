package scaling

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// The operator's view: what each gated group is doing, and asking a group to
// wake or sleep now with the operator's own Nomad token.

// GroupStatus is one gated group as the cluster's agents see it.
type GroupStatus struct {
	Namespace string    `json:"namespace"`
	Job       string    `json:"job"`
	Group     string    `json:"group"`
	Phase     string    `json:"phase"`
	Since     time.Time `json:"since"`
	Reason    string    `json:"reason,omitempty"`
	// Addresses are where it is served (awake) or parked (asleep).
	Addresses []string `json:"addresses"`
	Count     int      `json:"count"`
	Running   int      `json:"running"`
	// Connections open now on every node; LastActivity is the last one
	// opened or closed.
	Connections  int64      `json:"connections"`
	LastActivity *time.Time `json:"last_activity,omitempty"`
	// IdleLeft is how long until it may sleep, when awake and idle.
	IdleLeft    string   `json:"idle_left,omitempty"`
	IdleTimeout string   `json:"idle_timeout"`
	WakeCount   int      `json:"wake_count"`
	AwakeDuring []string `json:"awake_during,omitempty"`
	InWindow    bool     `json:"in_window,omitempty"`
	WakeWith    []string `json:"wake_with,omitempty"`
	Forwarding  []string `json:"forwarding,omitempty"`
	Errors      []string `json:"errors,omitempty"`
}

// Status is the agent's answer to /v1/status.
type Status struct {
	Node   string        `json:"node"`
	Leader bool          `json:"leader"`
	Groups []GroupStatus `json:"groups"`
}

// Status snapshots every gated group on the agent's goroutine.
func (a *Agent) Status(ctx context.Context) (Status, error) {
	out := make(chan Status, 1)
	a.Do(ctx, func() { out <- a.status() })
	select {
	case st := <-out:
		return st, nil
	case <-ctx.Done():
		return Status{}, fmt.Errorf("read the agent's status: %w", ctx.Err())
	}
}

func (a *Agent) status() Status {
	now := a.clock.Now()
	st := Status{Node: a.node, Leader: a.leader}
	for _, g := range a.groups {
		if g.policy == nil {
			continue
		}
		gs := GroupStatus{Namespace: g.id.Namespace, Job: g.id.Job, Group: g.id.Group,
			Phase: string(g.state.Phase), Since: g.state.Since, Reason: g.state.Reason,
			Count: g.nomad.status.Desired, Running: g.nomad.status.Running,
			IdleTimeout: g.policy.IdleTimeout.String(), WakeCount: g.policy.WakeCount}
		if g.state.Phase == consul.PhaseAwake {
			for k := range g.liveKeys() {
				gs.Addresses = append(gs.Addresses, k.String())
			}
		} else {
			for _, ad := range g.state.Addresses {
				gs.Addresses = append(gs.Addresses, ad.Addr)
			}
		}
		slices.Sort(gs.Addresses)
		established, last, _ := a.union(g, now)
		gs.Connections = established
		if !last.IsZero() {
			gs.LastActivity = &last
		}
		if g.state.Phase == consul.PhaseAwake && established == 0 {
			since := last
			for _, t := range []time.Time{g.firstSeen, g.awakeAt} {
				if t.After(since) {
					since = t
				}
			}
			gs.IdleLeft = max(g.policy.IdleTimeout-now.Sub(since), 0).Round(time.Second).String()
		}
		for _, w := range g.policy.AwakeDuring {
			gs.AwakeDuring = append(gs.AwakeDuring, w.Source)
		}
		_, gs.InWindow = g.policy.inWindow(now)
		for _, d := range g.policy.WakeWith {
			gs.WakeWith = append(gs.WakeWith, d.Job+"/"+d.Group)
		}
		parked := g.parkedKeys()
		for k, to := range a.forwards {
			if _, ok := parked[k]; ok {
				gs.Forwarding = append(gs.Forwarding, k.String()+" → "+to.String())
			}
		}
		if g.nomad.err != nil {
			gs.Errors = append(gs.Errors, g.nomad.err.Error())
		}
		st.Groups = append(st.Groups, gs)
	}
	slices.SortFunc(st.Groups, func(x, y GroupStatus) int {
		return strings.Compare(x.Namespace+"/"+x.Job+"/"+x.Group, y.Namespace+"/"+y.Job+"/"+y.Group)
	})
	return st
}

// Errors of the operator requests, for clear messages and exit codes.
var (
	ErrUnknownJob   = errors.New("no such job")
	ErrUnknownGroup = errors.New("no such group")
	ErrNoPolicy     = errors.New("the group has no zeroscale policy")
)

// FindPolicy reads the zeroscale policy of a group with the caller's client.
func FindPolicy(c *api.Client, id GroupID) (Policy, error) {
	q := &api.QueryOptions{Namespace: id.Namespace}
	job, _, err := c.Jobs().Info(id.Job, q)
	if err != nil {
		if code, ok := statusCode(err); ok && code == 404 {
			return Policy{}, fmt.Errorf("job %q in namespace %q: %w", id.Job, id.Namespace, ErrUnknownJob)
		}
		return Policy{}, fmt.Errorf("read job %s: %w", id.Job, err)
	}
	var tg *api.TaskGroup
	for _, g := range job.TaskGroups {
		if g.Name != nil && *g.Name == id.Group {
			tg = g
		}
	}
	if tg == nil {
		return Policy{}, fmt.Errorf("job %s has no group %q: %w", id.Job, id.Group, ErrUnknownGroup)
	}
	if tg.Scaling == nil || tg.Scaling.Policy[PolicyBlock] == nil {
		return Policy{}, fmt.Errorf("%s/%s: %w (add scaling { policy { zeroscale { … } } })", id.Job, id.Group, ErrNoPolicy)
	}
	p := *tg.Scaling
	p.Target = map[string]string{"Namespace": id.Namespace, "Job": id.Job, "Group": id.Group}
	policy, err := ParsePolicy(&p)
	if err != nil {
		return Policy{}, fmt.Errorf("%s/%s: invalid zeroscale policy: %w", id.Job, id.Group, err)
	}
	return policy, nil
}

// RequestWake raises a sleeping group to its wake_count with the caller's
// token (Nomad checks that it may scale the job); the agents see the count
// rise and open the gate once it is ready. It returns the count it set, or
// false when the group already runs.
func RequestWake(c *api.Client, id GroupID, by string) (int, bool, error) {
	policy, err := FindPolicy(c, id)
	if err != nil {
		return 0, false, err
	}
	q := &api.QueryOptions{Namespace: id.Namespace}
	st, _, err := c.Jobs().ScaleStatus(id.Job, q)
	if err != nil {
		return 0, false, fmt.Errorf("read the count of %s/%s: %w", id.Job, id.Group, err)
	}
	if st.TaskGroups[id.Group].Desired > 0 {
		return st.TaskGroups[id.Group].Desired, false, nil
	}
	count := policy.WakeCount
	_, _, err = c.Jobs().Scale(id.Job, id.Group, &count, "zeroscale: wake requested by "+by, false,
		map[string]any{"zeroscale": "wake", "reason": "requested by " + by}, &api.WriteOptions{Namespace: id.Namespace})
	if err != nil {
		return 0, false, fmt.Errorf("scale %s/%s to %d: %w", id.Job, id.Group, count, err)
	}
	return count, true, nil
}

// RequestSleep asks the agents to put a group to sleep now: a scaling event
// recorded with the caller's token (Nomad records it only for a token that
// may scale the job), which the elected agent acts on within seconds.
func RequestSleep(c *api.Client, id GroupID, by string) error {
	if _, err := FindPolicy(c, id); err != nil {
		return err
	}
	_, _, err := c.Jobs().Scale(id.Job, id.Group, nil, "zeroscale: sleep requested by "+by, false,
		map[string]any{"zeroscale": SleepRequestMeta, "by": by}, &api.WriteOptions{Namespace: id.Namespace})
	if err != nil {
		return fmt.Errorf("record the sleep request for %s/%s: %w", id.Job, id.Group, err)
	}
	return nil
}
