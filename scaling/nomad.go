package scaling

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/nomad/api"
)

// DefaultNomadRequestTimeout bounds a call to Nomad when NomadAPI does not say.
const DefaultNomadRequestTimeout = 10 * time.Second

// nomadDefaultWait is how long Nomad holds a blocking query that names no
// wait time.
const nomadDefaultWait = 5 * time.Minute

// NomadAPI implements Nomad over the HTTP API. Every call has a deadline, so
// a hung server or a dead TCP connection cannot stall the agent.
type NomadAPI struct {
	client *api.Client

	// RequestTimeout bounds each call Nomad should answer at once (policy,
	// job and allocation reads, scale status, scale);
	// DefaultNomadRequestTimeout when zero. Set it before the first call.
	// The blocking policy list is bounded by its wait, Nomad's jitter and
	// this.
	RequestTimeout time.Duration

	mu     sync.Mutex
	allocs map[string]GroupID // allocations never change group
}

// NewNomadAPI connects to address with token (NOMAD_ADDR / NOMAD_TOKEN and
// the other NOMAD_* variables when empty); ConnectNomad also takes a token
// file.
func NewNomadAPI(address, token string) (*NomadAPI, error) {
	return ConnectNomad(NomadConnection{Address: address, Token: token})
}

// Client exposes the API client.
func (n *NomadAPI) Client() *api.Client { return n.client }

func (n *NomadAPI) requestTimeout() time.Duration {
	if n.RequestTimeout > 0 {
		return n.RequestTimeout
	}
	return DefaultNomadRequestTimeout
}

// requestContext bounds one call that Nomad should answer at once.
func (n *NomadAPI) requestContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), n.requestTimeout())
}

// nomadFailed wraps err with the action, saying so when Nomad did not answer
// in time.
func nomadFailed(err error, action string) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: nomad did not answer in time: %w", action, err)
	}
	return fmt.Errorf("%s: %w", action, err)
}

func (n *NomadAPI) Policies(waitIndex uint64, wait time.Duration) ([]PolicyStub, uint64, error) {
	if waitIndex > 0 && wait <= 0 {
		wait = nomadDefaultWait // say it, so the deadline below is right
	}
	// Nomad holds a blocking query for up to wait plus wait/16 of jitter; a
	// connection silent for one request timeout beyond that is dead.
	ctx, cancel := context.WithTimeout(context.Background(), wait+wait/16+n.requestTimeout())
	defer cancel()
	q := &api.QueryOptions{Namespace: "*", WaitIndex: waitIndex, WaitTime: wait}
	stubs, meta, err := n.client.Scaling().ListPolicies(q.WithContext(ctx))
	if err != nil {
		return nil, waitIndex, nomadFailed(err, "list scaling policies")
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

// JobStub says when a job last changed: its spec or status (ModifyIndex,
// which a Scale or a stop moves) or its allocations' counts (SummaryIndex).
type JobStub struct {
	Namespace, ID  string
	ModifyIndex    uint64
	JobModifyIndex uint64 // the spec's version
	SummaryIndex   uint64
}

// Jobs lists every job's stub, blocking until index moves past waitIndex:
// one query tells which of many groups' counts may have changed.
func (n *NomadAPI) Jobs(waitIndex uint64, wait time.Duration) ([]JobStub, uint64, error) {
	if waitIndex > 0 && wait <= 0 {
		wait = nomadDefaultWait
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait+wait/16+n.requestTimeout())
	defer cancel()
	q := &api.QueryOptions{Namespace: "*", WaitIndex: waitIndex, WaitTime: wait}
	stubs, meta, err := n.client.Jobs().List(q.WithContext(ctx))
	if err != nil {
		return nil, waitIndex, nomadFailed(err, "list jobs")
	}
	out := make([]JobStub, 0, len(stubs))
	for _, s := range stubs {
		js := JobStub{Namespace: s.Namespace, ID: s.ID, ModifyIndex: s.ModifyIndex, JobModifyIndex: s.JobModifyIndex}
		if s.JobSummary != nil {
			js.SummaryIndex = s.JobSummary.ModifyIndex
		}
		out = append(out, js)
	}
	return out, meta.LastIndex, nil
}

func (n *NomadAPI) Policy(id string) (*api.ScalingPolicy, error) {
	ctx, cancel := n.requestContext()
	defer cancel()
	p, _, err := n.client.Scaling().GetPolicy(id, (&api.QueryOptions{Namespace: "*"}).WithContext(ctx))
	if err != nil {
		return nil, nomadFailed(err, "read scaling policy "+id)
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

// ownNetwork tells whether a group's tasks get their own network namespace:
// bridge or CNI network mode, or a container driver on its default network.
func ownNetwork(tg *api.TaskGroup) bool {
	for _, nw := range tg.Networks {
		if nw.Mode == "bridge" || strings.HasPrefix(nw.Mode, "cni/") {
			return true
		}
	}
	for _, t := range tg.Tasks {
		switch t.Driver {
		case "docker", "podman", "containerd-driver":
			if mode, _ := t.Config["network_mode"].(string); mode != "host" {
				return true
			}
		}
	}
	return false
}

func (n *NomadAPI) Group(id GroupID) (GroupSpec, error) {
	ctx, cancel := n.requestContext()
	defer cancel()
	job, _, err := n.client.Jobs().Info(id.Job, (&api.QueryOptions{Namespace: id.Namespace}).WithContext(ctx))
	if err != nil {
		return GroupSpec{}, nomadFailed(err, "read job "+id.Job)
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
	spec := GroupSpec{Pinned: pins(job.Constraints) || pins(tg.Constraints), OwnNetwork: ownNetwork(tg)}
	if job.Version != nil {
		spec.JobVersion = *job.Version
	}
	if job.JobModifyIndex != nil {
		spec.JobModified = *job.JobModifyIndex
	}
	static, mapped := map[string]int{}, map[string]int{}
	for _, nw := range tg.Networks {
		for _, p := range nw.ReservedPorts {
			static[p.Label] = p.Value
			if p.To > 0 {
				mapped[p.Label] = p.To
			}
		}
		for _, p := range nw.DynamicPorts {
			if p.To > 0 {
				mapped[p.Label] = p.To
			}
		}
	}
	add := func(s *api.Service, task string) {
		if s == nil {
			return
		}
		svc := ServiceSpec{Name: serviceName(s.Name, job, id.Group, task), PortLabel: s.PortLabel, Provider: s.Provider}
		if svc.Provider == "" {
			svc.Provider = "consul"
		}
		if v, ok := static[s.PortLabel]; ok {
			svc.StaticPort = v
		} else if p, err := strconv.Atoi(s.PortLabel); err == nil {
			svc.StaticPort = p
		}
		svc.MappedPort = mapped[s.PortLabel]
		spec.Services = append(spec.Services, svc)
	}
	for _, s := range tg.Services {
		add(s, "")
	}
	for _, t := range tg.Tasks {
		for _, s := range t.Services {
			add(s, t.Name)
		}
	}
	return spec, nil
}

// serviceName resolves the variables Nomad fills into a service's name
// from the job alone (its names, and the legacy ${JOB}, ${TASKGROUP},
// ${TASK} and ${BASE}), so the plugin watches the name Consul shows.
// Per-node or per-allocation variables stay as written: such a service
// is not found, and the group is not parked.
func serviceName(name string, job *api.Job, group, task string) string {
	if !strings.Contains(name, "${") {
		return name
	}
	jobID := ptrOr(job.ID)
	jobName := cmp.Or(ptrOr(job.Name), jobID)
	base := jobName + "-" + group
	if task != "" {
		base += "-" + task
	}
	return strings.NewReplacer(
		"${NOMAD_JOB_NAME}", jobName,
		"${NOMAD_JOB_ID}", jobID,
		"${NOMAD_GROUP_NAME}", group,
		"${NOMAD_TASK_NAME}", task,
		"${NOMAD_NAMESPACE}", cmp.Or(ptrOr(job.Namespace), "default"),
		"${JOB}", jobName,
		"${TASKGROUP}", group,
		"${TASK}", task,
		"${BASE}", base,
	).Replace(name)
}

func ptrOr(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func (n *NomadAPI) ScaleStatus(id GroupID) (ScaleStatus, error) {
	ctx, cancel := n.requestContext()
	defer cancel()
	st, _, err := n.client.Jobs().ScaleStatus(id.Job, (&api.QueryOptions{Namespace: id.Namespace}).WithContext(ctx))
	if err != nil {
		return ScaleStatus{}, nomadFailed(err, fmt.Sprintf("read scale status of %s", id))
	}
	g, ok := st.TaskGroups[id.Group]
	if !ok {
		return ScaleStatus{}, fmt.Errorf("read scale status of %s: %w", id, ErrGroupGone)
	}
	out := ScaleStatus{Desired: g.Desired, Running: g.Running, Stopped: st.JobStopped}
	for _, e := range g.Events {
		if e.Meta["zeroscale"] == SleepRequestMeta && !e.Error {
			if at := time.Unix(0, int64(e.Time)); at.After(out.SleepRequested) {
				out.SleepRequested = at
			}
		}
	}
	return out, nil
}

// DeploymentActive tells whether the job's latest deployment still runs:
// Nomad refuses to scale the job until it ends.
func (n *NomadAPI) DeploymentActive(id GroupID) (bool, error) {
	ctx, cancel := n.requestContext()
	defer cancel()
	d, _, err := n.client.Jobs().LatestDeployment(id.Job, (&api.QueryOptions{Namespace: id.Namespace}).WithContext(ctx))
	if err != nil {
		return false, nomadFailed(err, fmt.Sprintf("read the latest deployment of %s", id))
	}
	if d == nil {
		return false, nil
	}
	switch d.Status {
	case api.DeploymentStatusSuccessful, api.DeploymentStatusFailed, api.DeploymentStatusCancelled:
		return false, nil
	}
	return true, nil
}

func (n *NomadAPI) Scale(id GroupID, count *int, message string, isError bool, meta map[string]any) error {
	ctx, cancel := n.requestContext()
	defer cancel()
	_, _, err := n.client.Jobs().Scale(id.Job, id.Group, count, message, isError, meta,
		(&api.WriteOptions{Namespace: id.Namespace}).WithContext(ctx))
	if errors.Is(err, context.DeadlineExceeded) {
		// Retryable like any transport error; note that Nomad may still
		// have applied it.
		err = fmt.Errorf("nomad did not answer in time: %w", err)
	}
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
	ctx, cancel := n.requestContext()
	defer cancel()
	alloc, _, err := n.client.Allocations().Info(allocID, (&api.QueryOptions{Namespace: "*"}).WithContext(ctx))
	if err != nil {
		return GroupID{}, nomadFailed(err, "read allocation "+allocID)
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

func (e *ScaleError) Error() string {
	msg := fmt.Sprintf("scale %s: %v", e.Group, e.Err)
	if forbidden(e.Err) {
		// Name the fix: without it, the operator sees only "Permission
		// denied" and the group never sleeps (nor records an event why).
		msg += fmt.Sprintf(`: the Nomad token needs the "scale-job" capability in namespace %q`, e.Group.Namespace)
	}
	return msg
}

func (e *ScaleError) Unwrap() error { return e.Err }

// forbidden recognises Nomad's 403: an ACL token without the capability.
func forbidden(err error) bool {
	var ue api.UnexpectedResponseError
	if errors.As(err, &ue) {
		return ue.StatusCode() == http.StatusForbidden
	}
	code, ok := statusCode(err)
	return ok && code == http.StatusForbidden
}

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
