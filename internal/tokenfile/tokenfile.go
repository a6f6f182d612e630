// Package tokenfile gives the Nomad and Consul API clients their ACL token
// from a file that is re-read as it changes, so a rotated token is used
// without restarting the plugin, and the token never has to sit in the
// plugin's config block (which /v1/agent/self shows to anyone with
// agent:read).
package tokenfile

import (
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
	"unicode"

	hclog "github.com/hashicorp/go-hclog"
)

// Interval is how often a token file is read again, at most: a rewritten
// file is in use by the next request after it.
const Interval = time.Second

// Read returns the token a file holds: its contents without surrounding
// whitespace. A missing, unreadable or empty file is an error, and so is one
// whose token could not be sent in an HTTP header.
func Read(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	token := strings.TrimSpace(string(data))
	switch {
	case token == "":
		return "", fmt.Errorf("%s is empty", path)
	case strings.ContainsFunc(token, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }):
		return "", fmt.Errorf("%s holds more than one word; it must hold just the token", path)
	}
	return token, nil
}

// File is a token file, read again at most once per Interval when its token
// is asked for.
type File struct {
	path     string
	interval time.Duration
	logger   hclog.Logger

	mu        sync.Mutex
	token     string
	readAt    time.Time
	lastError string // logged once, not on every request
}

// Open reads the token file now; a missing, unreadable or empty file is an
// error.
func Open(path string, logger hclog.Logger) (*File, error) {
	token, err := Read(path)
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	return &File{path: path, interval: Interval, logger: logger, token: token, readAt: time.Now()}, nil
}

// Token is the file's token, read again when Interval has passed since the
// last read. When the file has become unreadable or empty (a rewrite in
// progress, a mistake) the last token read stays in use: the failure is
// logged, and the requests' own errors say whether the old token still works.
func (f *File) Token() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if time.Since(f.readAt) < f.interval {
		return f.token
	}
	f.readAt = time.Now()
	token, err := Read(f.path)
	if err != nil {
		if err.Error() != f.lastError {
			f.lastError = err.Error()
			f.logger.Warn("cannot read the token file again; keeping the token read before", "path", f.path, "error", err)
		}
		return f.token
	}
	f.lastError = ""
	if token != f.token {
		f.token = token
		f.logger.Info("token file changed; using the new token", "path", f.path)
	}
	return f.token
}

// Source is where a client's ACL token comes from: a fixed token or a file.
type Source struct {
	Token string
	File  string
	// From says what chose it: "token" or "token_file" (the config's fields),
	// or the environment variable's name; "" when there is no token.
	From string
}

// Choose picks the token by precedence: the config's token, then its token
// file, then the environment's tokenVar, then fileVar. (A config that sets
// both its token and its token file is refused before this.)
func Choose(token, file, tokenVar, fileVar string) Source {
	switch {
	case token != "":
		return Source{Token: token, From: "token"}
	case file != "":
		return Source{File: file, From: "token_file"}
	case os.Getenv(tokenVar) != "":
		return Source{Token: os.Getenv(tokenVar), From: tokenVar}
	case os.Getenv(fileVar) != "":
		return Source{File: os.Getenv(fileVar), From: fileVar}
	}
	return Source{}
}

// Open returns the source's token as a function for Transport. A file is
// read now (a missing, unreadable or empty one is an error naming where it
// was chosen) and again as it changes.
func (s Source) Open(logger hclog.Logger) (func() string, error) {
	if s.File == "" {
		token := s.Token
		return func() string { return token }, nil
	}
	f, err := Open(s.File, logger)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.From, err)
	}
	return f.Token, nil
}

// Transport sets the ACL token header on every request, asking Token each
// time, so a client built once follows a rewritten token file. It replaces
// a header the API client set from its own, fixed, config; with no token it
// leaves the request as it is.
type Transport struct {
	Base   http.RoundTripper
	Header string // "X-Nomad-Token", "X-Consul-Token"
	Token  func() string
	// OnRequest, if set, hears of each request before it is sent (the
	// plugin counts the load it puts on the agents).
	OnRequest func(*http.Request)
}

// RoundTrip sends a copy of req carrying the current token (a RoundTripper
// must not change the caller's request).
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if t.OnRequest != nil {
		t.OnRequest(req)
	}
	token := t.Token()
	if token == "" {
		return t.Base.RoundTrip(req)
	}
	r := req.Clone(req.Context())
	r.Header.Set(t.Header, token)
	return t.Base.RoundTrip(r)
}

// CloseIdleConnections passes on to Base, for http.Client.CloseIdleConnections.
func (t *Transport) CloseIdleConnections() {
	if c, ok := t.Base.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}
