// Command nomad-driver-zeroscale is the zeroscale Nomad plugin: the `zeroscale`
// task driver and the node agent that parks idle services and wakes them.
package main

import "github.com/zeroscale/nomad-driver-zeroscale/plugin"

func main() {
	plugin.Serve()
}
