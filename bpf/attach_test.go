package bpf

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// In the test's own namespace sysfs agrees with ethtool: a device with a
// bus behind it has a "device" link. Both ends of a veth are virtual, also
// seen from inside another namespace, where sysfs would show ours.
func TestIsVirtualAsksTheDriver(t *testing.T) {
	ifaces, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, iface := range ifaces {
		_, err := os.Stat(filepath.Join("/sys/class/net", iface.Name, "device"))
		got, want := isVirtual(iface.Name), err != nil
		if _, gone := net.InterfaceByName(iface.Name); gone != nil {
			continue // another test's veth, removed meanwhile
		}
		if got != want {
			t.Errorf("isVirtual(%s) = %v, sysfs says %v", iface.Name, got, want)
		}
	}
	n := testnet.NewIPv4(t)
	if !isVirtual(n.HostIf) {
		t.Errorf("the veth end %s is not virtual", n.HostIf)
	}
	var inside bool
	if err := n.Do(func() error { inside = isVirtual(n.PeerIf); return nil }); err != nil {
		t.Fatal(err)
	}
	if !inside {
		t.Errorf("the veth end %s, seen from its namespace, is not virtual", n.PeerIf)
	}
}
