// Package command is the operator CLI in the plugin binary, as `nomad` and
// `consul` are built: `nomad-driver-zeroscale status|wake|sleep`. It talks
// to Nomad with the operator's own address and token (the `nomad` CLI's
// flags and variables), so Nomad decides who may wake or sleep a job, and to
// a zeroscale agent's HTTP API for what only the agents know.
package command

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/user"
	"strings"
	"time"

	"github.com/hashicorp/cli"
	"github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/scaling"
)

// DefaultAgent is where a plugin serves its HTTP API unless metrics_address
// says otherwise.
const DefaultAgent = "127.0.0.1:9464"

// Run runs the CLI with args (without the program's name) and returns the
// exit code.
func Run(name, version string, args []string) int {
	ui := &cli.BasicUi{Reader: os.Stdin, Writer: os.Stdout, ErrorWriter: os.Stderr}
	c := cli.NewCLI(name, version)
	c.Args = args
	c.Commands = map[string]cli.CommandFactory{
		"status": func() (cli.Command, error) { return &statusCommand{meta{ui: ui, name: name}}, nil },
		"wake":   func() (cli.Command, error) { return &wakeCommand{meta{ui: ui, name: name}}, nil },
		"sleep":  func() (cli.Command, error) { return &sleepCommand{meta{ui: ui, name: name}}, nil },
	}
	code, err := c.Run()
	if err != nil {
		ui.Error(err.Error())
		return 1
	}
	return code
}

// IsCommand tells whether args name one of the CLI's commands.
func IsCommand(arg string) bool {
	switch arg {
	case "status", "wake", "sleep":
		return true
	}
	return false
}

// meta holds what every command takes: Nomad's address, token and
// namespace as the nomad CLI takes them, and the agent to ask.
type meta struct {
	ui        cli.Ui
	name      string
	address   string
	token     string
	namespace string
	agent     string
	asJSON    bool
}

func (m *meta) flags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&m.address, "address", os.Getenv("NOMAD_ADDR"), "")
	fs.StringVar(&m.token, "token", os.Getenv("NOMAD_TOKEN"), "")
	fs.StringVar(&m.namespace, "namespace", cmpOr(os.Getenv("NOMAD_NAMESPACE"), "default"), "")
	fs.StringVar(&m.agent, "agent", cmpOr(os.Getenv("ZEROSCALE_AGENT"), DefaultAgent), "")
	return fs
}

const commonHelp = `
General options:

  -address=<addr>    Nomad's HTTP API (NOMAD_ADDR; default http://127.0.0.1:4646).
  -token=<token>     Nomad ACL token (NOMAD_TOKEN). Wake and sleep act with it:
                     it must be allowed to scale the job.
  -namespace=<ns>    Nomad namespace (NOMAD_NAMESPACE; default "default").
  -agent=<host:port> A zeroscale agent's HTTP API: its metrics_address
                     (ZEROSCALE_AGENT; default 127.0.0.1:9464).
`

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func (m *meta) nomad() (*api.Client, error) {
	cfg := api.DefaultConfig() // also reads NOMAD_CACERT and the other NOMAD_* TLS variables
	if m.address != "" {
		cfg.Address = m.address
	}
	cfg.SecretID = m.token
	cfg.Namespace = m.namespace
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("configure the Nomad client: %w", err)
	}
	return c, nil
}

// requireAgents fails when no Nomad client runs the plugin.
func requireAgents(c *api.Client) error {
	nodes, _, err := c.Nodes().List(&api.QueryOptions{Params: map[string]string{"resources": "false"}})
	if err != nil {
		return fmt.Errorf("list Nomad's nodes: %w", err)
	}
	for _, n := range nodes {
		if d := n.Drivers["zeroscale"]; d != nil && d.Detected && d.Healthy {
			return nil
		}
	}
	return errors.New("no Nomad client runs the zeroscale plugin (no node reports a healthy zeroscale driver)")
}

// agentStatus asks the agent for every gated group.
func (m *meta) agentStatus(ctx context.Context) (scaling.Status, error) {
	var st scaling.Status
	url := "http://" + m.agent + "/v1/status"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return st, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return st, fmt.Errorf("no zeroscale agent answers at %s (%v): run this on a Nomad client, or give -agent with a plugin's metrics_address", m.agent, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("the zeroscale agent at %s answered %s: %s", m.agent, resp.Status, strings.TrimSpace(string(body)))
	}
	if err := json.Unmarshal(body, &st); err != nil {
		return st, fmt.Errorf("read the agent's status: %w", err)
	}
	return st, nil
}

// groupArg reads JOB/GROUP.
func (m *meta) groupArg(arg string) (scaling.GroupID, error) {
	job, group, ok := strings.Cut(arg, "/")
	if !ok || job == "" || group == "" || strings.Contains(group, "/") {
		return scaling.GroupID{}, fmt.Errorf("%q is not JOB/GROUP", arg)
	}
	return scaling.GroupID{Namespace: m.namespace, Job: job, Group: group}, nil
}

// requester names who asks, for the scaling event.
func requester() string {
	host, _ := os.Hostname()
	name := "someone"
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	return "the CLI (" + name + "@" + host + ")"
}

func findGroup(st scaling.Status, id scaling.GroupID) (scaling.GroupStatus, bool) {
	for _, g := range st.Groups {
		if g.Namespace == id.Namespace && g.Job == id.Job && g.Group == id.Group {
			return g, true
		}
	}
	return scaling.GroupStatus{}, false
}

func since(t time.Time) string { return time.Since(t).Round(100 * time.Millisecond).String() }
