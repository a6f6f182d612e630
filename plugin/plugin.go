// Package plugin wires zeroscale together: the Nomad plugin that serves the
// `zeroscale` task driver and, once Nomad hands it its config, runs the node
// agent (gate, Consul and Nomad watches, scaler, metrics).
package plugin

import (
	"context"
	"fmt"
	"os"
	"reflect"
	"sync"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/driver"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/command"
)

// Serve runs the plugin for Nomad. `nomad-driver-zeroscale uninstall`
// instead detaches the gate and removes its pinned state.
func Serve() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "uninstall":
			path := bpf.DefaultPinPath
			if len(os.Args) > 2 {
				path = os.Args[2]
			}
			if err := bpf.Uninstall(path); err != nil {
				fmt.Fprintln(os.Stderr, "uninstall:", err)
				os.Exit(1)
			}
			if err := removeForwards(path); err != nil {
				fmt.Fprintln(os.Stderr, "uninstall:", err)
				os.Exit(1)
			}
			fmt.Println("zeroscale: gate detached and", path, "removed")
			return
		case "status", "wake", "sleep":
			os.Exit(command.Run("nomad-driver-zeroscale", driver.Version, os.Args[1:]))
		case "version", "--version", "-version":
			fmt.Println("nomad-driver-zeroscale", driver.Version)
			return
		}
	}
	plugins.ServeCtx(func(ctx context.Context, logger hclog.Logger) any {
		return New(ctx, logger)
	})
}

// Plugin is the DriverPlugin Nomad talks to.
type Plugin struct {
	*driver.Driver
	ctx    context.Context
	logger hclog.Logger

	mu      sync.Mutex
	started *Config
	agent   *nodeAgent
}

// New builds the plugin; nothing runs until SetConfig.
func New(ctx context.Context, logger hclog.Logger) *Plugin {
	return &Plugin{Driver: driver.New(ctx, logger), ctx: ctx, logger: logger.Named("zeroscale")}
}

// ConfigSchema is the plugin config block, the driver's fields included.
func (p *Plugin) ConfigSchema() (*hclspec.Spec, error) { return driver.WithConfigSpec(configSpec), nil }

// SetConfig validates the plugin config and starts the node agent once.
// An invalid config does not fail the call: the driver reports itself
// unhealthy with a message naming the field, visible in `nomad node status`.
func (p *Plugin) SetConfig(cfg *base.Config) error {
	if err := p.Driver.SetConfig(cfg); err != nil {
		return err
	}
	var c Config
	if cfg != nil && len(cfg.PluginConfig) > 0 {
		if err := base.MsgPackDecode(cfg.PluginConfig, &c); err != nil {
			msg := "invalid plugin config: " + err.Error()
			p.logger.Error(msg)
			p.Driver.SetHealthIssue(msg)
			return nil
		}
	} else {
		c = defaults()
	}
	s, err := c.validate()
	if err != nil {
		msg := "invalid plugin config: " + err.Error()
		p.logger.Error("invalid plugin config; the node agent is not started", "error", err)
		p.Driver.SetGateStatus(driver.GateStatus{Reason: "node agent not started: invalid plugin config"})
		p.Driver.SetHealthIssue(msg)
		return nil
	}
	p.Driver.SetHealthIssue("")

	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started != nil {
		if !reflect.DeepEqual(*p.started, c) {
			p.logger.Warn("plugin config changed; restart the Nomad client to apply it")
		}
		return nil
	}
	p.started = &c
	p.agent = startNodeAgent(p.ctx, s, p.logger, p.Driver)
	return nil
}

// defaults is the config when the plugin block has no config.
func defaults() Config {
	return Config{
		MetricsAddress:       "127.0.0.1:9464",
		HealthCheckProcesses: []string{"consul", "nomad", "pg_isready"},
		SYNReplay:            true,
		SYNMaxAge:            "60s",
		ForwardGrace:         "5m",
		BPFPinPath:           bpf.DefaultPinPath,
		Consul:               ConsulConfig{KVPrefix: "zeroscale"},
	}
}
