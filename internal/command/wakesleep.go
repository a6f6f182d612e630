package command

import (
	"context"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/scaling"
)

type wakeCommand struct{ meta }

func (c *wakeCommand) Synopsis() string {
	return "Wake a sleeping group now, without sending it traffic"
}

func (c *wakeCommand) Help() string {
	return strings.TrimSpace(`
Usage: `+c.name+` wake [options] JOB/GROUP

  Scales a sleeping group to its wake_count with your Nomad token (it must be
  allowed to scale the job), then waits until the agents open its gate and
  prints how long that took. A group already awake is left alone.

Options:

  -detach        Return once the count is raised.
  -timeout=<d>   How long to wait for readiness (default: 2m).

Examples:

  $ `+c.name+` wake web/frontend
  $ NOMAD_TOKEN=… `+c.name+` wake -detach reports/batch
`) + "\n" + commonHelp
}

func (c *wakeCommand) Run(args []string) int {
	fs := c.flags("wake")
	detach := fs.Bool("detach", false, "")
	timeout := fs.Duration("timeout", 2*time.Minute, "")
	id, client, ok := c.target(fs, args, c.Help())
	if !ok {
		return 1
	}
	began := time.Now()
	count, scaled, err := scaling.RequestWake(client, id, requester())
	if err != nil {
		c.ui.Error(err.Error())
		return 1
	}
	if !scaled {
		c.ui.Output(fmt.Sprintf("%s/%s is already awake (count %d)", id.Job, id.Group, count))
		return 0
	}
	c.ui.Output(fmt.Sprintf("%s/%s scaled to %d", id.Job, id.Group, count))
	if *detach {
		return 0
	}
	if err := c.waitAwake(client, id, count, began, *timeout); err != nil {
		c.ui.Error(err.Error())
		return 1
	}
	c.ui.Output(fmt.Sprintf("%s/%s is awake: ready %s after the request", id.Job, id.Group, time.Since(began).Round(time.Millisecond)))
	return 0
}

// waitAwake waits until the agent says the group is awake, or, with no
// agent to ask, until Nomad runs count allocations of it.
func (c *wakeCommand) waitAwake(client *api.Client, id scaling.GroupID, count int, began time.Time, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := c.agentStatus(ctx)
		cancel()
		if err == nil {
			if g, ok := findGroup(st, id); ok && g.Phase == "awake" && g.Since.After(began.Add(-time.Second)) {
				return nil
			}
		} else if s, _, serr := client.Jobs().ScaleStatus(id.Job, nil); serr == nil && s.TaskGroups[id.Group].Running >= count {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s/%s not ready within %s", id.Job, id.Group, timeout)
}

type sleepCommand struct{ meta }

func (c *sleepCommand) Synopsis() string { return "Put a group to sleep now" }

func (c *sleepCommand) Help() string {
	return strings.TrimSpace(`
Usage: `+c.name+` sleep [options] JOB/GROUP

  Asks the agents to put the group to sleep now, even with connections open:
  its gate parks and its count goes to 0 within seconds. The request is a
  scaling event recorded with your Nomad token, which Nomad accepts only from
  a token allowed to scale the job. Inside an awake_during window the
  schedule wins and the group stays up.

Options:

  -detach        Return once the request is recorded.
  -timeout=<d>   How long to wait for the count to reach 0 (default: 1m).

Examples:

  $ `+c.name+` sleep web/frontend
`) + "\n" + commonHelp
}

func (c *sleepCommand) Run(args []string) int {
	fs := c.flags("sleep")
	detach := fs.Bool("detach", false, "")
	timeout := fs.Duration("timeout", time.Minute, "")
	id, client, ok := c.target(fs, args, c.Help())
	if !ok {
		return 1
	}
	began := time.Now()
	if err := scaling.RequestSleep(client, id, requester()); err != nil {
		c.ui.Error(err.Error())
		return 1
	}
	c.ui.Output(fmt.Sprintf("sleep requested for %s/%s", id.Job, id.Group))
	if *detach {
		return 0
	}
	deadline := time.Now().Add(*timeout)
	for time.Now().Before(deadline) {
		st, _, err := client.Jobs().ScaleStatus(id.Job, nil)
		if err == nil && st.TaskGroups[id.Group].Desired == 0 && st.TaskGroups[id.Group].Running == 0 {
			c.ui.Output(fmt.Sprintf("%s/%s is asleep: %s after the request", id.Job, id.Group, time.Since(began).Round(time.Millisecond)))
			return 0
		}
		time.Sleep(250 * time.Millisecond)
	}
	c.ui.Error(fmt.Sprintf("%s/%s still runs %s after the request (inside an awake_during window?)", id.Job, id.Group, *timeout))
	return 1
}

// target parses a command's flags and its JOB/GROUP argument and connects to
// a Nomad where the plugin runs; on failure it has said why.
func (m *meta) target(fs *flag.FlagSet, args []string, help string) (scaling.GroupID, *api.Client, bool) {
	if err := fs.Parse(args); err != nil || fs.NArg() != 1 {
		m.ui.Error(help)
		return scaling.GroupID{}, nil, false
	}
	id, err := m.groupArg(fs.Arg(0))
	if err == nil {
		var client *api.Client
		if client, err = m.nomad(); err == nil {
			if err = requireAgents(client); err == nil {
				return id, client, true
			}
		}
	}
	m.ui.Error(err.Error())
	return scaling.GroupID{}, nil, false
}
