package scaling

import (
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// tokenRecorder is a Nomad API that answers the policy list and records
// the X-Nomad-Token of each request. (A Nomad agent with ACLs takes long to
// start; this tests the client's wiring, Nomad's ACLs are Nomad's.)
type tokenRecorder struct {
	mu     sync.Mutex
	tokens []string
}

func (r *tokenRecorder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	r.tokens = append(r.tokens, req.Header.Get("X-Nomad-Token"))
	r.mu.Unlock()
	w.Header().Set("X-Nomad-Index", "1")
	w.Header().Set("X-Nomad-KnownLeader", "true")
	w.Header().Set("X-Nomad-LastContact", "0")
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte("[]"))
}

// lastToken lists the policies through n and returns the token Nomad saw.
func (r *tokenRecorder) lastToken(t *testing.T, n *NomadAPI) string {
	t.Helper()
	if _, _, err := n.Policies(0, 0); err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.tokens[len(r.tokens)-1]
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestNomadTokenFileIsReadAgainWhenRewritten(t *testing.T) {
	rec := &tokenRecorder{}
	srv := httptest.NewServer(rec)
	defer srv.Close()
	file := filepath.Join(t.TempDir(), "nomad-token")
	writeFile(t, file, "first-token\n")
	n, err := ConnectNomad(NomadConnection{Address: srv.URL, TokenFile: file})
	if err != nil {
		t.Fatal(err)
	}
	if got := rec.lastToken(t, n); got != "first-token" {
		t.Fatalf("Nomad saw token %q, want the file's", got)
	}
	writeFile(t, file, "second-token\n")
	deadline := time.Now().Add(5 * time.Second)
	for rec.lastToken(t, n) != "second-token" {
		if time.Now().After(deadline) {
			t.Fatalf("the rewritten token file was not read again; Nomad saw %q", rec.tokens)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestNomadTokenPrecedence(t *testing.T) {
	rec := &tokenRecorder{}
	srv := httptest.NewServer(rec)
	defer srv.Close()
	dir := t.TempDir()
	cfgFile, envFile := filepath.Join(dir, "cfg"), filepath.Join(dir, "env")
	writeFile(t, cfgFile, "from-token-file")
	writeFile(t, envFile, "from-NOMAD_TOKEN_FILE")
	t.Setenv("NOMAD_TOKEN", "from-NOMAD_TOKEN")
	t.Setenv("NOMAD_TOKEN_FILE", envFile)
	for _, c := range []struct {
		conn NomadConnection
		want string
	}{
		{NomadConnection{Token: "from-token"}, "from-token"},
		{NomadConnection{TokenFile: cfgFile}, "from-token-file"},
		{NomadConnection{}, "from-NOMAD_TOKEN"},
	} {
		c.conn.Address = srv.URL
		n, err := ConnectNomad(c.conn)
		if err != nil {
			t.Fatal(err)
		}
		if got := rec.lastToken(t, n); got != c.want {
			t.Errorf("%+v: Nomad saw %q, want %q", c.conn, got, c.want)
		}
	}
	t.Setenv("NOMAD_TOKEN", "")
	n, err := ConnectNomad(NomadConnection{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	if got := rec.lastToken(t, n); got != "from-NOMAD_TOKEN_FILE" {
		t.Errorf("Nomad saw %q, want NOMAD_TOKEN_FILE's", got)
	}

	_, err = ConnectNomad(NomadConnection{Address: srv.URL, TokenFile: filepath.Join(dir, "missing")})
	if err == nil || !strings.Contains(err.Error(), "token_file: open ") {
		t.Errorf("missing token file: %v", err)
	}
	t.Setenv("NOMAD_TOKEN_FILE", filepath.Join(dir, "missing"))
	if _, err = ConnectNomad(NomadConnection{Address: srv.URL}); err == nil || !strings.Contains(err.Error(), "NOMAD_TOKEN_FILE: open ") {
		t.Errorf("missing NOMAD_TOKEN_FILE: %v", err)
	}
}

func TestNomadOverAUnixSocketWithAToken(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "nomad.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	rec := &tokenRecorder{}
	srv := httptest.NewUnstartedServer(rec)
	srv.Listener = l
	srv.Start()
	defer srv.Close()
	n, err := ConnectNomad(NomadConnection{Address: "unix://" + socket, Token: "sock-token"})
	if err != nil {
		t.Fatal(err)
	}
	if got := rec.lastToken(t, n); got != "sock-token" {
		t.Fatalf("Nomad saw %q over the socket", got)
	}
}

func TestScaleDeniedNamesTheCapability(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "Permission denied", http.StatusForbidden)
	}))
	defer srv.Close()
	n, err := ConnectNomad(NomadConnection{Address: srv.URL, Token: "weak"})
	if err != nil {
		t.Fatal(err)
	}
	zero := 0
	err = n.Scale(GroupID{Namespace: "web", Job: "shop", Group: "front"}, &zero, "zeroscale: idle", false, nil)
	want := `scale web/shop/front: Unexpected response code: 403 (Permission denied): the Nomad token needs the "scale-job" capability in namespace "web"`
	if err == nil || err.Error() != want || Retryable(err) {
		t.Fatalf("Scale: %v (retryable %v), want %q, not retryable", err, Retryable(err), want)
	}
}
