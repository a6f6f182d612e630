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
	Replay(frame []byte, ifindex int, via *bpf.ReplayTarget) (bpf.ReplayResult, error)
	SYNPassed(bpf.Key, netip.AddrPort) bool
	// Bound looks for a TCP listener or a bound UDP socket at a key.
	Bound(bpf.Key, *bpf.ReplayTarget) (bpf.BoundSocket, error)
	// Keys reads back every entry in the kernel: the reconciler diffs
	// against this, never against what it believes it wrote.
	Keys() (map[bpf.Key]bpf.State, error)
	// MapPort, UnmapPort and MappedPorts: sockets on a port inside an
	// allocation's network namespace count as a service address's.
	MapPort(bpf.NsPort, bpf.Key) error
	UnmapPort(bpf.NsPort) error
	MappedPorts() (map[bpf.NsPort]bpf.Key, error)
	WatchListenPort(port uint16) error
}

// Namespaces finds the network namespaces allocations run in, when they
// have their own (docker, Nomad bridge mode); implemented by internal/netns.
type Namespaces interface {
	// Host is the node's own namespace (inode number).
	Host() uint32
	// OfProcess is the namespace of a process, named for socket lookups.
	OfProcess(pid int) (Netns, error)
	// OfAlloc finds the namespace of an allocation's processes; ok is false
	// when they share the node's namespace or none runs.
	OfAlloc(allocID string) (ns Netns, ok bool, err error)
	// WaitForwarding waits until the node's bridge ports into ns forward.
	WaitForwarding(ns Netns, timeout time.Duration) error
}

// Netns is an allocation's network namespace: its inode number (what the
// socket programs report) and its id in the node's namespace (what a socket
// lookup from the node takes).
type Netns struct {
	Inode uint32
	ID    int32
	Path  string // opens it, for WaitForwarding
}

// ScaleStatus is what Nomad says about a group's count.
type ScaleStatus struct {
	Desired int
	Running int
	// Stopped: the job was stopped (`nomad job stop`); the operator's intent
	// wins over any sleep or wake.
	Stopped bool
	// SleepRequested is the time of the latest sleep request: a scaling
	// event with meta zeroscale = "sleep_request", which Nomad records only
	// for a token that may scale the job.
	SleepRequested time.Time
}

// SleepRequestMeta marks a scaling event that asks the group to sleep now.
const SleepRequestMeta = "sleep_request"

// GroupSpec is what the agent needs from a group's job specification.
type GroupSpec struct {
	Services []ServiceSpec
	// Pinned: a constraint keeps the group on one node, so it comes back at
	// the same address.
	Pinned bool
	// OwnNetwork: the group's tasks have their own network namespace
	// (bridge mode, or a container driver), reached through port mappings.
	OwnNetwork  bool
	JobVersion  uint64
	JobModified uint64
}

// ServiceSpec is one service of a group.
type ServiceSpec struct {
	Name       string
	PortLabel  string
	StaticPort int    // 0 when the port is dynamic
	Provider   string // "consul" or "nomad"
	// MappedPort is the port's `to`: where the service listens inside its
	// allocation's own network namespace (docker, bridge mode); 0 when it
	// listens on the node port itself.
	MappedPort int
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
	// GroupStates reads every group's record (absent: no record).
	GroupStates() (map[string]consul.GroupState, error)
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
