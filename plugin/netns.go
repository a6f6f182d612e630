package plugin

import (
	"errors"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/internal/cgroups"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/netns"
	"github.com/zeroscale/nomad-driver-zeroscale/scaling"
)

// allocNamespaces finds allocations' own network namespaces by their
// processes (a container's, a bridge-mode allocation's): the node agent
// counts, readies and replays services behind port mappings there.
type allocNamespaces struct {
	finder netns.Finder
}

func newAllocNamespaces() (*allocNamespaces, error) {
	host, err := netns.Self()
	if err != nil {
		return nil, err
	}
	return &allocNamespaces{finder: netns.Finder{Host: host, AllocOf: cgroups.AllocOfProcess}}, nil
}

func (n *allocNamespaces) Host() uint32 { return n.finder.Host }

func (n *allocNamespaces) OfProcess(pid int) (scaling.Netns, error) {
	ns, err := netns.OfProcess(pid)
	return scaling.Netns(ns), err
}

func (n *allocNamespaces) WaitForwarding(ns scaling.Netns, timeout time.Duration) error {
	return netns.WaitForwarding(ns.Path, timeout)
}

func (n *allocNamespaces) OfAlloc(allocID string) (scaling.Netns, bool, error) {
	ns, _, err := n.finder.FindAllocation(allocID)
	if errors.Is(err, netns.ErrNotFound) {
		return scaling.Netns{}, false, nil
	}
	if err != nil {
		return scaling.Netns{}, false, err
	}
	return scaling.Netns(ns), true, nil
}
