package driver

import (
	"fmt"
	"os"
	"testing"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/client/lib/cgroupslib"
	"github.com/hashicorp/nomad/client/lib/numalib"
)

// TestMain prepares the Nomad cgroup tree the way a Nomad client does at
// startup (cpuset partitions on cgroups v1), since the harness runs the driver
// without a client.
func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		topology := numalib.Scan(numalib.PlatformScanners(false))
		if err := cgroupslib.Init(hclog.NewNullLogger(), topology.UsableCores().String()); err != nil {
			fmt.Fprintf(os.Stderr, "initialize nomad cgroups: %v\n", err)
			os.Exit(1)
		}
	}
	os.Exit(m.Run())
}
