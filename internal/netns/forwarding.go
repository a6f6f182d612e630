package netns

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
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
// through the kernel's link-watch); a packet routed there in between loses
// its ARP request and waits a second for the next. Once the ports forward,
// an unanswered ARP entry for the namespace's addresses (a health check
// that reached the mapping too early leaves one) is removed, so the next
// packet asks again at once instead of waiting for that entry's timer.
// Namespaces joined some other way return at once.
func WaitForwarding(path string, timeout time.Duration) error {
	ports, err := bridgePortsInto(path)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for _, port := range ports {
		for {
			state, err := os.ReadFile(filepath.Join("/sys/class/net", port.name, "brport", "state"))
			if err != nil {
				return fmt.Errorf("read the bridge port state of %s: %w", port.name, err)
			}
			if strings.TrimSpace(string(state)) == bridgePortForwarding {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("bridge port %s into %s is not forwarding after %s (state %s)", port.name, path, timeout, strings.TrimSpace(string(state)))
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err := clearUnansweredNeighbors(port); err != nil {
			return err
		}
	}
	return nil
}

// bridgePort is the node's end of a veth into a namespace, on a bridge.
type bridgePort struct {
	name   string
	bridge int          // the bridge's ifindex
	addrs  []netip.Addr // the namespace end's IPv4 addresses
}

// bridgePortsInto lists the node's ends of the veth pairs whose other end
// is in the namespace at path, when they are bridge ports.
func bridgePortsInto(path string) ([]bridgePort, error) {
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
	var ports []bridgePort
	for _, l := range links {
		if l.Type() != "veth" || l.Attrs().ParentIndex == 0 {
			continue
		}
		peer, err := netlink.LinkByIndex(l.Attrs().ParentIndex)
		if err != nil || peer.Type() != "veth" || peer.Attrs().MasterIndex == 0 {
			continue // not on this node's namespace, or not on a bridge
		}
		port := bridgePort{name: peer.Attrs().Name, bridge: peer.Attrs().MasterIndex}
		addrs, err := h.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return nil, fmt.Errorf("list the addresses of %s in %s: %w", l.Attrs().Name, path, err)
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok {
				port.addrs = append(port.addrs, ip.Unmap())
			}
		}
		ports = append(ports, port)
	}
	return ports, nil
}

// clearUnansweredNeighbors removes the bridge's incomplete or failed ARP
// entries for the port's namespace addresses.
func clearUnansweredNeighbors(port bridgePort) error {
	if len(port.addrs) == 0 {
		return nil
	}
	neighs, err := netlink.NeighList(port.bridge, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list the ARP entries of the bridge of %s: %w", port.name, err)
	}
	for _, n := range neighs {
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok || !slices.Contains(port.addrs, ip.Unmap()) || n.State&(netlink.NUD_INCOMPLETE|netlink.NUD_FAILED) == 0 {
			continue
		}
		if err := netlink.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("remove the unanswered ARP entry of %s: %w", ip, err)
		}
	}
	return nil
}
