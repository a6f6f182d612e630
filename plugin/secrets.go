package plugin

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"strings"

	"github.com/zeroscale/nomad-driver-zeroscale/consul"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/tokenfile"
)

// failFunc records a config error naming its field.
type failFunc func(field, format string, args ...any)

// checkToken refuses a block that sets both token and token_file, and a
// token file (the block's, or the environment's when that is what counts)
// that cannot be read now: the clients read it again as it changes, but a
// node agent that could never authenticate should not start.
func checkToken(block, token, file, tokenVar, fileVar string, fail failFunc) {
	if token != "" && file != "" {
		fail(block+".token", "set together with %s.token_file; set one of them (token_file keeps the token out of the agent's /v1/agent/self)", block)
		return
	}
	src := tokenfile.Choose(token, file, tokenVar, fileVar)
	if src.File == "" {
		return
	}
	if _, err := tokenfile.Read(src.File); err != nil {
		field := src.From // the environment variable's name
		if field == "token_file" {
			field = block + ".token_file"
		}
		fail(field, "%v", err)
	}
}

// checkConsulConnection checks the Consul block's address and TLS files
// the way the client will use them, so a mistake shows in the fingerprint
// instead of in the node agent's log.
func checkConsulConnection(c ConsulConfig, fail failFunc) {
	if c.Address != "" {
		ep, err := consul.ParseAddress(c.Address)
		switch {
		case err != nil:
			fail("consul.address", "%v", err)
		case ep.Scheme == "http" && (c.CAFile != "" || c.CertFile != ""):
			fail("consul.address", "%q is plain http, but ca_file or cert_file is set: use https://", c.Address)
		}
	}
	if c.CAFile != "" {
		if pem, err := os.ReadFile(c.CAFile); err != nil {
			fail("consul.ca_file", "%v", err)
		} else if !x509.NewCertPool().AppendCertsFromPEM(pem) {
			fail("consul.ca_file", "%s holds no PEM certificate", c.CAFile)
		}
	}
	switch {
	case c.CertFile != "" && c.KeyFile == "":
		fail("consul.cert_file", "set without key_file; they go together")
	case c.KeyFile != "" && c.CertFile == "":
		fail("consul.key_file", "set without cert_file; they go together")
	case c.CertFile != "":
		certPEM, certErr := os.ReadFile(c.CertFile)
		if certErr != nil {
			fail("consul.cert_file", "%v", certErr)
		}
		keyPEM, keyErr := os.ReadFile(c.KeyFile)
		if keyErr != nil {
			fail("consul.key_file", "%v", keyErr)
		}
		if certErr == nil && keyErr == nil {
			if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
				fail("consul.cert_file", "%s with key_file %s: %s", c.CertFile, c.KeyFile, strings.TrimPrefix(err.Error(), "tls: "))
			}
		}
	}
}
