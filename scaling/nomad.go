package scaling

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/nomad/api"
)

// NomadAPI implements Nomad over the HTTP API.
type NomadAPI struct {
	client *api.Client

	mu     sync.Mutex
	allocs map[string]GroupID // allocations never change group
}

// NewNomadAPI connects to address with token (NOMAD_ADDR / NOMAD_TOKEN and
// the other NOMAD_* variables when empty).
func NewNomadAPI(address, token string) (*NomadAPI, error) {
	cfg := api.DefaultConfig()
	if address != "" {
		cfg.Address = address
	}
	if token != "" {
		cfg.SecretID = token
	}
	client, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("configure nomad client: %w", err)
	}
	return &NomadAPI{client: client, allocs: make(map[string]GroupID)}, nil
}

// Client exposes the API client.
func (n *NomadAPI) Client() *api.Client { return n.client }

func (n *NomadAPI) Policies(waitIndex uint64, wait time.Duration) ([]PolicyStub, uint64, error) {
	q := &api.QueryOptions{Namespace: "*", WaitIndex: waitIndex, WaitTime: wait}
	stubs, meta, err := n.client.Scaling().ListPolicies(q)
	if err != nil {
		return nil, waitIndex, fmt.Errorf("list scaling policies: %w", err)
	}
	out := make([]PolicyStub, 0, len(stubs))
	for _, s := range stubs {
		ns := s.Target["Namespace"]
		if ns == "" {
			ns = "default"
		}
		out = append(out, PolicyStub{
			ID:          s.ID,
			ModifyIndex: s.ModifyIndex,
			Enabled:     s.Enabled,
			Target:      GroupID{Namespace: ns, Job: s.Target["Job"], Group: s.Target["Group"]},
		})
	}
	return out, meta.LastIndex, nil
}

func (n *NomadAPI) Policy(id string) (*api.ScalingPolicy, error) {
	p, _, err := n.client.Scaling().GetPolicy(id, &api.QueryOptions{Namespace: "*"})
	if err != nil {
		return nil, fmt.Errorf("read scaling policy %s: %w", id, err)
	}
	return p, nil
}

// pinTargets are constraint attributes that keep a group on one node.
var pinTargets = map[string]bool{
	"${node.unique.id}":                       true,
	"${node.unique.name}":                     true,
	"${attr.unique.hostname}":                 true,
	"${attr.unique.network.ip-address}":       true,
	"${attr.unique.platform.aws.instance-id}": true,
}

func pins(cs []*api.Constraint) bool {
	for _, c := range cs {
		if c == nil || !pinTargets[c.LTarget] {
			continue
		}
		switch c.Operand {
		case "", "=", "==", "is":
			return true
		}
	}
	return false
}

func (n *NomadAPI) Group(id GroupID) (GroupSpec, error) {
	job, _, err := n.client.Jobs().Info(id.Job, &api.QueryOptions{Namespace: id.Namespace})
	if err != nil {
		return GroupSpec{}, fmt.Errorf("read job %s: %w", id.Job, err)
	}
	var tg *api.TaskGroup
	for _, g := range job.TaskGroups {
		if g.Name != nil && *g.Name == id.Group {
			tg = g
		}
	}
	if tg == nil {
		return GroupSpec{}, fmt.Errorf("job %s has no group %q", id.Job, id.Group)
	}
	spec := GroupSpec{Pinned: pins(job.Constraints) || pins(tg.Constraints)}
	if job.Version != nil {
		spec.JobVersion = *job.Version
	}
	if job.JobModifyIndex != nil {
		spec.JobModified = *job.JobModifyIndex
	}
	static := map[string]int{}
	for _, nw := range tg.Networks {
		for _, p := range nw.ReservedPorts {
			static[p.Label] = p.Value
		}
	}
	add := func(s *api.Service) {
		if s == nil {
			return
		}
		svc := ServiceSpec{Name: s.Name, PortLabel: s.PortLabel, Provider: s.Provider}
		if svc.Provider == "" {
			svc.Provider = "consul"
		}
		if v, ok := static[s.PortLabel]; ok {
			svc.StaticPort = v
		} else if p, err := strconv.Atoi(s.PortLabel); err == nil {
			svc.StaticPort = p
		}
		spec.Services = append(spec.Services, svc)
	}
	for _, s := range tg.Services {
		add(s)
	}
	for _, t := range tg.Tasks {
		for _, s := range t.Services {
			add(s)
		}
	}
	return spec, nil
}

func (n *NomadAPI) ScaleStatus(id GroupID) (ScaleStatus, error) {
	st, _, err := n.client.Jobs().ScaleStatus(id.Job, &api.QueryOptions{Namespace: id.Namespace})
	if err != nil {
		return ScaleStatus{}, fmt.Errorf("read scale status of %s: %w", id, err)
	}
	g, ok := st.TaskGroups[id.Group]
	if !ok {
		return ScaleStatus{}, fmt.Errorf("read scale status of %s: no such group", id)
	}
	return ScaleStatus{Desired: g.Desired, Running: g.Running}, nil
}

func (n *NomadAPI) Scale(id GroupID, count *int, message string, isError bool, meta map[string]any) error {
	_, _, err := n.client.Jobs().Scale(id.Job, id.Group, count, message, isError, meta,
		&api.WriteOptions{Namespace: id.Namespace})
	if err != nil {
		return &ScaleError{Group: id, Err: err}
	}
	return nil
}

func (n *NomadAPI) AllocGroup(allocID string) (GroupID, error) {
	n.mu.Lock()
	if g, ok := n.allocs[allocID]; ok {
		n.mu.Unlock()
		return g, nil
	}
	n.mu.Unlock()
	alloc, _, err := n.client.Allocations().Info(allocID, &api.QueryOptions{Namespace: "*"})
	if err != nil {
		return GroupID{}, fmt.Errorf("read allocation %s: %w", allocID, err)
	}
	g := GroupID{Namespace: alloc.Namespace, Job: alloc.JobID, Group: alloc.TaskGroup}
	n.mu.Lock()
	n.allocs[allocID] = g
	n.mu.Unlock()
	return g, nil
}

// ScaleError is a failed Scale call, classified for retrying.
type ScaleError struct {
	Group GroupID
	Err   error
}

func (e *ScaleError) Error() string { return fmt.Sprintf("scale %s: %v", e.Group, e.Err) }
func (e *ScaleError) Unwrap() error { return e.Err }

// Retryable tells whether the same call may succeed later: a running
// deployment, server errors, unreachable Nomad. Other 4xx answers (count
// outside the policy's bounds, missing permission) will not.
func Retryable(err error) bool {
	if err == nil {
		return false
	}
	if IsDeploymentBlock(err) {
		return true
	}
	var ue api.UnexpectedResponseError
	if errors.As(err, &ue) {
		return ue.StatusCode() >= 500 || ue.StatusCode() == http.StatusTooManyRequests
	}
	if code, ok := statusCode(err); ok {
		return code >= 500 || code == http.StatusTooManyRequests
	}
	return true // transport errors
}

// IsDeploymentBlock recognises "job scaling blocked due to active deployment".
func IsDeploymentBlock(err error) bool {
	return err != nil && strings.Contains(err.Error(), "active deployment")
}

// statusCode reads "Unexpected response code: 400 (…)" from older error texts.
func statusCode(err error) (int, bool) {
	msg := err.Error()
	const marker = "Unexpected response code: "
	i := strings.Index(msg, marker)
	if i < 0 {
		return 0, false
	}
	rest := msg[i+len(marker):]
	j := strings.IndexFunc(rest, func(r rune) bool { return r < '0' || r > '9' })
	if j <= 0 {
		return 0, false
	}
	code, err2 := strconv.Atoi(rest[:j])
	return code, err2 == nil
}
