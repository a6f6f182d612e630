package command

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/scaling"
)

type statusCommand struct{ meta }

func (c *statusCommand) Synopsis() string {
	return "Show every gated group: state, addresses, activity, wakes"
}

func (c *statusCommand) Help() string {
	return strings.TrimSpace(`
Usage: `+c.name+` status [options] [JOB[/GROUP]]

  Shows every task group with a zeroscale policy in the namespace, or those of
  JOB, or JOB/GROUP: its state and since when, the addresses it is served or
  parked at, open connections, last activity and the idle time left, its
  count, the last wake and how long it took, and recent errors.

Options:

  -json   Print JSON instead.

Examples:

  $ `+c.name+` status
  $ `+c.name+` status -json web
  $ `+c.name+` status -agent 10.0.0.5:9464 web/frontend
`) + "\n" + commonHelp
}

// groupReport is one group in the status output.
type groupReport struct {
	scaling.GroupStatus
	LastWake  *wakeReport `json:"last_wake,omitempty"`
	LastError string      `json:"last_error,omitempty"`
}

type wakeReport struct {
	At      time.Time `json:"at"`
	Latency string    `json:"latency,omitempty"` // first SYN → gate open
	Reason  string    `json:"reason,omitempty"`
}

func (c *statusCommand) Run(args []string) int {
	fs := c.flags("status")
	fs.BoolVar(&c.asJSON, "json", false, "")
	if err := fs.Parse(args); err != nil || fs.NArg() > 1 {
		c.ui.Error(c.Help())
		return 1
	}
	client, err := c.nomad()
	if err != nil {
		c.ui.Error(err.Error())
		return 1
	}
	var want scaling.GroupID
	if fs.NArg() == 1 {
		job, group, _ := strings.Cut(fs.Arg(0), "/")
		want = scaling.GroupID{Namespace: c.namespace, Job: job, Group: group}
		if group != "" {
			_, err = scaling.FindPolicy(client, want)
		} else if _, _, err = client.Jobs().Info(job, nil); err != nil && strings.Contains(err.Error(), "404") {
			err = fmt.Errorf("job %q in namespace %q: %w", job, c.namespace, scaling.ErrUnknownJob)
		}
		if err != nil {
			c.ui.Error(err.Error())
			return 1
		}
	}
	if err := requireAgents(client); err != nil {
		c.ui.Error(err.Error())
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.agentStatus(ctx)
	if err != nil {
		c.ui.Error(err.Error())
		return 1
	}
	var out []groupReport
	for _, g := range st.Groups {
		if g.Namespace != c.namespace || want.Job != "" && g.Job != want.Job || want.Group != "" && g.Group != want.Group {
			continue
		}
		out = append(out, c.withEvents(client, g))
	}
	if want.Job != "" && len(out) == 0 {
		c.ui.Error(fmt.Sprintf("%s: %s", strings.Trim(want.Job+"/"+want.Group, "/"), scaling.ErrNoPolicy))
		return 1
	}
	if c.asJSON {
		b, _ := json.MarshalIndent(out, "", "  ")
		c.ui.Output(string(b))
		return 0
	}
	if len(out) == 0 {
		c.ui.Output("No gated groups in namespace " + c.namespace)
		return 0
	}
	for i, g := range out {
		if i > 0 {
			c.ui.Output("")
		}
		c.ui.Output(formatGroup(g))
	}
	return 0
}

// withEvents adds the last wake and error from the group's scaling events.
func (c *statusCommand) withEvents(client *api.Client, g scaling.GroupStatus) groupReport {
	r := groupReport{GroupStatus: g}
	st, _, err := client.Jobs().ScaleStatus(g.Job, &api.QueryOptions{Namespace: g.Namespace})
	if err != nil {
		r.LastError = "read the scaling events: " + err.Error()
		return r
	}
	// Nomad's count now, not the agent's last reading.
	r.Count, r.Running = st.TaskGroups[g.Group].Desired, st.TaskGroups[g.Group].Running
	for _, e := range st.TaskGroups[g.Group].Events { // newest first
		at := time.Unix(0, int64(e.Time))
		switch {
		case e.Error && r.LastError == "":
			r.LastError = at.Format(time.RFC3339) + " " + e.Message
		case r.LastWake == nil && e.Meta["zeroscale"] == "awake":
			r.LastWake = &wakeReport{At: at}
			if s, ok := e.Meta["gate_open_seconds"].(float64); ok {
				r.LastWake.Latency = time.Duration(s * float64(time.Second)).Round(time.Millisecond).String()
			}
		case r.LastWake == nil && e.Meta["zeroscale"] == "wake":
			r.LastWake = &wakeReport{At: at, Reason: strings.TrimPrefix(e.Message, "zeroscale: ")}
		}
	}
	return r
}

func formatGroup(g groupReport) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s/%s/%s\n", g.Namespace, g.Job, g.Group)
	state := g.Phase
	if !g.Since.IsZero() {
		state += " since " + g.Since.Local().Format("2006-01-02 15:04:05") + " (" + since(g.Since) + " ago)"
	}
	row := func(k, v string) { fmt.Fprintf(&b, "  %-14s %s\n", k, v) }
	row("State", state)
	if g.Reason != "" {
		row("Reason", g.Reason)
	}
	row("Count", fmt.Sprintf("%d (running %d; wakes to %d)", g.Count, g.Running, g.WakeCount))
	label := "Served at"
	if g.Phase != "awake" {
		label = "Parked at"
	}
	row(label, strings.Join(g.Addresses, ", "))
	activity := fmt.Sprintf("%d open connections", g.Connections)
	if g.LastActivity != nil {
		activity += "; last " + g.LastActivity.Local().Format("15:04:05") + " (" + since(*g.LastActivity) + " ago)"
	}
	row("Activity", activity)
	if g.IdleLeft != "" {
		row("Idle left", g.IdleLeft+" of "+g.IdleTimeout)
	}
	if g.LastWake != nil {
		w := g.LastWake.At.Local().Format("2006-01-02 15:04:05")
		if g.LastWake.Latency != "" {
			w += ", gate open " + g.LastWake.Latency + " after the first SYN"
		} else if g.LastWake.Reason != "" {
			w += ", " + g.LastWake.Reason
		}
		row("Last wake", w)
	}
	if len(g.AwakeDuring) > 0 {
		inside := "outside now"
		if g.InWindow {
			inside = "inside now"
		}
		row("Awake during", strings.Join(g.AwakeDuring, "; ")+" ("+inside+")")
	}
	if len(g.WakeWith) > 0 {
		row("Wakes with", strings.Join(g.WakeWith, ", "))
	}
	if len(g.Forwarding) > 0 {
		row("Forwarding", strings.Join(g.Forwarding, ", "))
	}
	for _, e := range g.Errors {
		row("Error", e)
	}
	if g.LastError != "" {
		row("Last error", g.LastError)
	}
	return strings.TrimRight(b.String(), "\n")
}
