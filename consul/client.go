// Package consul is zeroscale's view of Consul: it watches the Nomad-registered
// instances of gated services, keeps placeholder instances registered while a
// group sleeps, elects the node that decides scale-downs, and carries each
// node's activity reports and the groups' sleep/wake phase in the KV store.
package consul

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	capi "github.com/hashicorp/consul/api"
	hclog "github.com/hashicorp/go-hclog"
)

// Config says how to reach the local Consul agent.
type Config struct {
	Address  string // host:port or URL; CONSUL_HTTP_ADDR, then 127.0.0.1:8500
	Token    string // CONSUL_HTTP_TOKEN when empty
	KVPrefix string // "zeroscale" when empty

	CAFile             string
	CertFile           string
	KeyFile            string
	TLSServerName      string
	InsecureSkipVerify bool

	// RequestTimeout bounds every call that Consul should answer at once
	// (KV reads and writes, registrations, TTL updates, sessions);
	// DefaultRequestTimeout when zero. Blocking queries are bounded by their
	// wait time, Consul's jitter and this.
	RequestTimeout time.Duration
}

// DefaultRequestTimeout bounds a call to Consul when Config does not say.
const DefaultRequestTimeout = 10 * time.Second

// Client wraps the Consul API with zeroscale's conventions.
type Client struct {
	api     *capi.Client
	prefix  string
	logger  hclog.Logger
	node    string
	timeout time.Duration // of one call that should answer at once
}

// New builds a client; it does not contact Consul.
func New(cfg Config, logger hclog.Logger) (*Client, error) {
	apiCfg := capi.DefaultConfig() // reads CONSUL_HTTP_* variables
	if cfg.Address != "" {
		addr := cfg.Address
		if scheme, rest, ok := strings.Cut(addr, "://"); ok {
			apiCfg.Scheme = scheme
			addr = rest
		}
		apiCfg.Address = addr
	} else if os.Getenv("CONSUL_HTTP_ADDR") == "" {
		apiCfg.Address = "127.0.0.1:8500"
	}
	if cfg.Token != "" {
		apiCfg.Token = cfg.Token
	}
	if cfg.CAFile != "" || cfg.CertFile != "" || cfg.KeyFile != "" || cfg.TLSServerName != "" || cfg.InsecureSkipVerify {
		apiCfg.TLSConfig = capi.TLSConfig{
			CAFile:             cfg.CAFile,
			CertFile:           cfg.CertFile,
			KeyFile:            cfg.KeyFile,
			Address:            cfg.TLSServerName,
			InsecureSkipVerify: cfg.InsecureSkipVerify,
		}
		if cfg.CAFile != "" || cfg.CertFile != "" {
			apiCfg.Scheme = "https"
		}
	}
	client, err := capi.NewClient(apiCfg)
	if err != nil {
		return nil, fmt.Errorf("configure consul client: %w", err)
	}
	prefix := strings.Trim(cfg.KVPrefix, "/")
	if prefix == "" {
		prefix = "zeroscale"
	}
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	timeout := cfg.RequestTimeout
	if timeout <= 0 {
		timeout = DefaultRequestTimeout
	}
	return &Client{api: client, prefix: prefix, logger: logger.Named("consul"), timeout: timeout}, nil
}

// requestContext bounds one call that Consul should answer at once: a hung
// agent or a dead TCP connection must not stall the caller (the agent's
// loop, the gate's wakes).
func (c *Client) requestContext(parent context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(parent, c.timeout)
}

// blockingContext bounds one blocking query of the given wait. Consul holds
// it for up to wait plus wait/16 of jitter; a connection silent for one
// request timeout beyond that is dead, and waiting on would hang the watch
// forever.
func (c *Client) blockingContext(parent context.Context, wait time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(parent, wait+wait/16+c.timeout)
}

// API exposes the underlying client.
func (c *Client) API() *capi.Client { return c.api }

// NodeName is the name of the local agent's node, fetched once.
func (c *Client) NodeName() (string, error) {
	if c.node != "" {
		return c.node, nil
	}
	ctx, cancel := c.requestContext(context.Background())
	defer cancel()
	// Agent().NodeName takes no options, hence no deadline: read
	// /v1/agent/self directly.
	var self struct{ Config struct{ NodeName string } }
	if _, err := c.api.Raw().Query("/v1/agent/self", &self, (&capi.QueryOptions{}).WithContext(ctx)); err != nil {
		return "", classify(err, "agent:read", "read the local agent's node name")
	}
	if self.Config.NodeName == "" {
		return "", errors.New("read the local agent's node name: the agent did not say")
	}
	c.node = self.Config.NodeName
	return c.node, nil
}

// PermissionError is an ACL denial. It names the permission zeroscale needs,
// so the operator can fix the token's policy instead of watching retries.
type PermissionError struct {
	Needs  string // e.g. `key_prefix "zeroscale/" { policy = "write" }`
	Action string
	Err    error
}

func (e *PermissionError) Error() string {
	return fmt.Sprintf("consul denied %s: the token needs %s: %v", e.Action, e.Needs, e.Err)
}

func (e *PermissionError) Unwrap() error { return e.Err }

// IsPermission reports whether err is an ACL denial.
func IsPermission(err error) bool {
	var pe *PermissionError
	return errors.As(err, &pe)
}

// classify wraps err, turning a 403 into a PermissionError and naming the
// action that timed out.
func classify(err error, needs, action string) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: consul did not answer in time: %w", action, err)
	}
	var se capi.StatusError
	if errors.As(err, &se) && se.Code == http.StatusForbidden ||
		strings.Contains(err.Error(), "403") && strings.Contains(strings.ToLower(err.Error()), "permission denied") ||
		strings.Contains(err.Error(), "ACL not found") {
		return &PermissionError{Needs: needs, Action: action, Err: err}
	}
	return fmt.Errorf("%s: %w", action, err)
}

// kvNeed is the ACL rule for the KV prefix.
func (c *Client) kvNeed() string {
	return fmt.Sprintf(`key_prefix "%s/" { policy = "write" }`, c.prefix)
}
