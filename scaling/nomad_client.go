package scaling

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/tokenfile"
)

// NomadConnection says how to reach Nomad. What it leaves empty comes from
// NOMAD_ADDR, NOMAD_TOKEN, NOMAD_TOKEN_FILE and the other NOMAD_* variables.
type NomadConnection struct {
	Address string // http://, https:// or unix:// URL
	// Token, else the token in TokenFile (read again as the file changes),
	// else NOMAD_TOKEN, else the token in NOMAD_TOKEN_FILE.
	Token     string
	TokenFile string
	Logger    hclog.Logger
	// OnRequest, if set, hears of each request to Nomad before it is sent.
	OnRequest func(*http.Request)
}

// ConnectNomad builds the Nomad client; it does not contact Nomad. A token
// file is read now, so a missing one is an error here.
func ConnectNomad(c NomadConnection) (*NomadAPI, error) {
	logger := c.Logger
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	cfg := api.DefaultConfig()
	if c.Address != "" {
		cfg.Address = c.Address
	}
	token, err := tokenfile.Choose(c.Token, c.TokenFile, "NOMAD_TOKEN", "NOMAD_TOKEN_FILE").Open(logger.Named("nomad"))
	if err != nil {
		return nil, fmt.Errorf("nomad token: %w", err)
	}
	cfg.SecretID = "" // the transport sets it, read at each request
	if cfg.HttpClient, err = nomadHTTPClient(cfg, token, c.OnRequest); err != nil {
		return nil, fmt.Errorf("configure nomad client: %w", err)
	}
	client, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("configure nomad client: %w", err)
	}
	return &NomadAPI{client: client, allocs: make(map[string]GroupID)}, nil
}

// nomadHTTPClient is the client api.NewClient would build (its defaults,
// TLS from cfg, a unix socket's dialer) with the token set at each request:
// api.Client.SetSecretID is not safe while requests run.
func nomadHTTPClient(cfg *api.Config, token func() string, onRequest func(*http.Request)) (*http.Client, error) {
	u, err := url.Parse(cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("invalid address %q: %w", cfg.Address, err)
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSHandshakeTimeout = 10 * time.Second
	transport.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	transport.ForceAttemptHTTP2 = false // as api.NewClient: exec streams want HTTP/1
	if u.Scheme == "unix" {
		transport.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", u.Path)
		}
	}
	if err := api.ConfigureTLS(&http.Client{Transport: transport}, cfg.TLSConfig); err != nil {
		return nil, err
	}
	return &http.Client{Transport: &tokenfile.Transport{Base: transport, Header: "X-Nomad-Token", Token: token, OnRequest: onRequest}}, nil
}
