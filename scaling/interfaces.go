package scaling

import (
	"net/netip"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Gate is the kernel side (implemented by *bpf.Gate).
type Gate interface {
	Park(bpf.Key) error
	Open(bpf.Key) error
	Move(bpf.Key) error
	Forget(bpf.Key) error
	State(bpf.Key) (bpf.State, bool, error)
	Activity(bpf.Key) (bpf.Activity, error)
	Replay(frame []byte, ifindex int) (bpf.ReplayResult, error)
	SYNPassed(bpf.Key, netip.AddrPort) bool
	// Keys reads back every entry in the kernel: the reconciler diffs
	// against this, never against what it believes it wrote.
	Keys() (map[bpf.Key]bpf.State, error)
}

// ScaleStatus is what Nomad says about a group's count.
type ScaleStatus struct {
	Desired int
	Running int
	// Stopped: the job was stopped (`nomad job stop`); the operator's intent
	// wins over any sleep or wake.
	Stopped bool
}

// GroupSpec is what the agent needs from a group's job specification.
type GroupSpec struct {
	Services []ServiceSpec
	// Pinned: a constraint keeps the group on one node, so it comes back at
	// the same address.
	Pinned      bool
	JobVersion  uint64
	JobModified uint64
}

// ServiceSpec is one service of a group.
type ServiceSpec struct {
	Name       string
	PortLabel  string
	StaticPort int    // 0 when the port is dynamic
	Provider   string // "consul" or "nomad"
}

// Nomad is the Nomad API as the agent uses it.
type Nomad interface {
	// Policies lists scaling policies, blocking until index moves past
	// waitIndex (0: answer at once).
	Policies(waitIndex uint64, wait time.Duration) ([]PolicyStub, uint64, error)
	Policy(id string) (*api.ScalingPolicy, error)
	Group(id GroupID) (GroupSpec, error)
	ScaleStatus(id GroupID) (ScaleStatus, error)
	// Scale sets the count (nil: only record an event).
	Scale(id GroupID, count *int, message string, isError bool, meta map[string]any) error
	// AllocGroup resolves an allocation to its group.
	AllocGroup(allocID string) (GroupID, error)
	// DeploymentActive tells whether the job's latest deployment still runs
	// (Nomad refuses scaling until it ends).
	DeploymentActive(id GroupID) (bool, error)
}

// PolicyStub identifies a scaling policy and its version.
type PolicyStub struct {
	ID          string
	ModifyIndex uint64
	Target      GroupID
	Enabled     bool
}

// Cluster is Consul as the agent uses it.
type Cluster interface {
	NodeName() string
	IsLeader() bool
	GroupState(group string) (consul.GroupState, error)
	SwapGroupState(group string, expected, next consul.GroupState) (consul.GroupState, error)
	DeleteGroupState(group string) error
	PublishActivity(group string, r consul.ActivityReport) error
	RegisterPlaceholder(consul.Placeholder) error
	DeregisterPlaceholder(consul.Placeholder) error
}

// Clock is time, replaceable in tests.
type Clock interface {
	Now() time.Time
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }
