// Package consul is zeroscale's view of Consul: it watches the Nomad-registered
// instances of gated services, keeps placeholder instances registered while a
// group sleeps, elects the node that decides scale-downs, and carries each
// node's activity reports and the groups' sleep/wake phase in the KV store.
package consul

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	capi "github.com/hashicorp/consul/api"
	hclog "github.com/hashicorp/go-hclog"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/tokenfile"
)

// Config says how to reach the local Consul agent. What it leaves empty
// comes from the CONSUL_HTTP_* variables, as for Consul's own CLI.
type Config struct {
	// Address is host:port, http://host:port, https://host:port or
	// unix:///path/to/http.sock; CONSUL_HTTP_ADDR, then 127.0.0.1:8500.
	Address string
	// Token, else the token in TokenFile (read again as the file changes),
	// else CONSUL_HTTP_TOKEN, else the token in CONSUL_HTTP_TOKEN_FILE.
	Token     string
	TokenFile string
	KVPrefix  string // "zeroscale" when empty

	// TLS, over each of CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY,
	// CONSUL_TLS_SERVER_NAME and CONSUL_HTTP_SSL_VERIFY=false. A CA or a
	// client certificate means https unless Address names its scheme.
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

	// OnRequest, if set, hears of each request to Consul before it is sent.
	OnRequest func(*http.Request)
}

// DefaultRequestTimeout bounds a call to Consul when Config does not say.
const DefaultRequestTimeout = 10 * time.Second

// DefaultAddress is the local agent's HTTP API when neither Config nor
// CONSUL_HTTP_ADDR says.
const DefaultAddress = "127.0.0.1:8500"

// Client wraps the Consul API with zeroscale's conventions.
type Client struct {
	api     *capi.Client
	prefix  string
	logger  hclog.Logger
	node    string
	timeout time.Duration // of one call that should answer at once
}

// New builds a client; it does not contact Consul. It reads a token file
// and the TLS files now, so a missing one is an error here.
func New(cfg Config, logger hclog.Logger) (*Client, error) {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	logger = logger.Named("consul")
	apiCfg, err := apiConfig(cfg, logger)
	if err != nil {
		return nil, err
	}
	client, err := capi.NewClient(apiCfg)
	if err != nil {
		return nil, fmt.Errorf("configure consul client: %w", err)
	}
	prefix := strings.Trim(cfg.KVPrefix, "/")
	if prefix == "" {
		prefix = "zeroscale"
	}
	timeout := cfg.RequestTimeout
	if timeout <= 0 {
		timeout = DefaultRequestTimeout
	}
	return &Client{api: client, prefix: prefix, logger: logger, timeout: timeout}, nil
}

// apiConfig is cfg over the CONSUL_HTTP_* variables, with an HTTP client of
// our own: the token must be read at each request (capi.Client keeps the
// one it was built with), and capi would build its own, unwrapped, client
// for a unix:// address.
func apiConfig(cfg Config, logger hclog.Logger) (*capi.Config, error) {
	apiCfg := capi.DefaultConfig() // reads the CONSUL_HTTP_* variables
	ep, err := ParseAddress(cmp.Or(cfg.Address, os.Getenv(capi.HTTPAddrEnvName), DefaultAddress))
	if err != nil {
		return nil, fmt.Errorf("consul address: %w", err)
	}
	apiCfg.Address = cmp.Or(ep.Host, ep.Socket) // capi sends a socket path as Host: localhost
	apiCfg.PathPrefix = ep.PathPrefix
	// The address's scheme, else https for a CA or a client certificate,
	// else what CONSUL_HTTP_SSL says (http by default).
	if ep.Scheme != "" {
		apiCfg.Scheme = ep.Scheme
	} else if cfg.CAFile != "" || cfg.CertFile != "" {
		apiCfg.Scheme = "https"
	}
	tlsCfg := &apiCfg.TLSConfig
	tlsCfg.CAFile = cmp.Or(cfg.CAFile, tlsCfg.CAFile)
	tlsCfg.CertFile = cmp.Or(cfg.CertFile, tlsCfg.CertFile)
	tlsCfg.KeyFile = cmp.Or(cfg.KeyFile, tlsCfg.KeyFile)
	tlsCfg.Address = cmp.Or(cfg.TLSServerName, tlsCfg.Address)
	tlsCfg.InsecureSkipVerify = cfg.InsecureSkipVerify || tlsCfg.InsecureSkipVerify

	transport := apiCfg.Transport
	if ep.Socket != "" {
		transport.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", ep.Socket)
		}
	}
	httpClient, err := capi.NewHttpClient(transport, *tlsCfg) // loads the CA and the client certificate
	if err != nil {
		return nil, fmt.Errorf("consul TLS: %w", err)
	}
	token, err := tokenfile.Choose(cfg.Token, cfg.TokenFile, capi.HTTPTokenEnvName, capi.HTTPTokenFileEnvName).Open(logger)
	if err != nil {
		return nil, fmt.Errorf("consul token: %w", err)
	}
	httpClient.Transport = &tokenfile.Transport{Base: transport, Header: "X-Consul-Token", Token: token, OnRequest: cfg.OnRequest}
	apiCfg.HttpClient = httpClient
	// The transport sets the header; this only keeps capi.NewClient from
	// reading CONSUL_HTTP_TOKEN_FILE again when a token was chosen before it.
	apiCfg.Token, apiCfg.TokenFile = token(), ""
	return apiCfg, nil
}

// Endpoint is where a Consul agent's HTTP API listens.
type Endpoint struct {
	Scheme     string // "http", "https", or "" when the address does not say
	Host       string // host:port; empty for a socket
	Socket     string // a unix socket's path
	PathPrefix string // of a reverse proxy in front of the agent
}

// ParseAddress reads an address the way Consul's clients take
// CONSUL_HTTP_ADDR: host:port, http://host:port[/prefix], https://… or
// unix:///path/to/socket.
func ParseAddress(addr string) (Endpoint, error) {
	scheme, rest, ok := strings.Cut(addr, "://")
	if !ok {
		scheme, rest = "", addr
	}
	switch scheme {
	case "unix":
		if !strings.HasPrefix(rest, "/") || strings.Trim(rest, "/") == "" {
			return Endpoint{}, fmt.Errorf("%q does not name a socket by its absolute path, as in unix:///run/consul/http.sock", addr)
		}
		return Endpoint{Socket: rest}, nil
	case "", "http", "https":
	default:
		return Endpoint{}, fmt.Errorf("%q: unknown scheme %q (http, https or unix)", addr, scheme)
	}
	host, prefix, _ := strings.Cut(rest, "/")
	if _, port, err := net.SplitHostPort(host); err != nil || !validPort(port) {
		// A URL may leave the port to its scheme; a bare address may not.
		if scheme == "" || host == "" || strings.ContainsAny(host, ":@?#") && !strings.HasPrefix(host, "[") {
			return Endpoint{}, fmt.Errorf("%q is not host:port or a URL like http://127.0.0.1:8500", addr)
		}
	}
	ep := Endpoint{Scheme: scheme, Host: host}
	if prefix = strings.Trim(prefix, "/"); prefix != "" {
		ep.PathPrefix = "/" + prefix
	}
	return ep, nil
}

func validPort(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n > 0 && n < 1<<16
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
