package netns

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// bridgePortForwarding is BR_STATE_FORWARDING in brport/state.
const bridgePortForwarding = "3"

// WaitForwarding waits until every bridge port on the node that leads into
// the namespace at path forwards. A container's process can listen before
// the bridge lets its new port forward (the port follows the veth's carrier
// through the kernel's link-watch, up to a second later); a packet routed
// there in between loses its ARP request and waits a second for the next.
// Namespaces joined some other way return at once.
func WaitForwarding(path string, timeout time.Duration) error {
	ports, err := bridgePortsInto(path)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for _, port := range ports {
		for {
			state, err := os.ReadFile(filepath.Join("/sys/class/net", port, "brport", "state"))
			if err != nil {
				return fmt.Errorf("read the bridge port state of %s: %w", port, err)
			}
			if strings.TrimSpace(string(state)) == bridgePortForwarding {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("bridge port %s into %s is not forwarding after %s (state %s)", port, path, timeout, strings.TrimSpace(string(state)))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return nil
}

// bridgePortsInto names the node's ends of the veth pairs whose other end
// is in the namespace at path, when they are bridge ports.
func bridgePortsInto(path string) ([]string, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer unix.Close(fd)
	h, err := netlink.NewHandleAt(vnetns.NsHandle(fd))
	if err != nil {
		return nil, fmt.Errorf("enter network namespace %s: %w", path, err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list the links of %s: %w", path, err)
	}
	var ports []string
	for _, l := range links {
		if l.Type() != "veth" || l.Attrs().ParentIndex == 0 {
			continue
		}
		peer, err := netlink.LinkByIndex(l.Attrs().ParentIndex)
		if err != nil || peer.Type() != "veth" || peer.Attrs().MasterIndex == 0 {
			continue // not on this node's namespace, or not on a bridge
		}
		ports = append(ports, peer.Attrs().Name)
	}
	return ports, nil
}
