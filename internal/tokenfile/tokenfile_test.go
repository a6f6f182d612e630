package tokenfile

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestReadRefusesWhatCannotBeAToken(t *testing.T) {
	dir := t.TempDir()
	for content, want := range map[string]string{
		"":                 "is empty",
		" \n\t\n":          "is empty",
		"one\ntwo\n":       "more than one word",
		"a token":          "more than one word",
		"\x00\x01binary\n": "more than one word",
	} {
		path := filepath.Join(dir, "token")
		write(t, path, content)
		if _, err := Read(path); err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), path) {
			t.Errorf("%q: error %v, want one naming the file and saying %q", content, err, want)
		}
	}
	if _, err := Read(filepath.Join(dir, "missing")); !os.IsNotExist(err) {
		t.Errorf("missing file: %v", err)
	}
	write(t, filepath.Join(dir, "token"), "  s3cret\n")
	if got, err := Read(filepath.Join(dir, "token")); got != "s3cret" || err != nil {
		t.Errorf("Read = %q, %v", got, err)
	}
}

func TestFileIsReadAgainAndKeepsTheLastGoodToken(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	write(t, path, "first\n")
	f, err := Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	write(t, path, "second\n")
	if got := f.Token(); got != "first" {
		t.Fatalf("re-read before the interval: %q", got)
	}
	f.interval = 0 // every call reads
	if got := f.Token(); got != "second" {
		t.Fatalf("after a rewrite: %q", got)
	}
	write(t, path, "") // a rewrite in progress
	if got := f.Token(); got != "second" {
		t.Fatalf("while empty: %q", got)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if got := f.Token(); got != "second" {
		t.Fatalf("while missing: %q", got)
	}
	write(t, path, "third")
	if got := f.Token(); got != "third" {
		t.Fatalf("after it came back: %q", got)
	}
}

func TestChooseFollowsThePrecedence(t *testing.T) {
	t.Setenv("ZS_TOKEN", "env-token")
	t.Setenv("ZS_TOKEN_FILE", "/env/file")
	for _, c := range []struct {
		token, file string
		want        Source
	}{
		{"cfg", "", Source{Token: "cfg", From: "token"}},
		{"", "/cfg/file", Source{File: "/cfg/file", From: "token_file"}},
		{"", "", Source{Token: "env-token", From: "ZS_TOKEN"}},
	} {
		if got := Choose(c.token, c.file, "ZS_TOKEN", "ZS_TOKEN_FILE"); got != c.want {
			t.Errorf("Choose(%q, %q) = %+v, want %+v", c.token, c.file, got, c.want)
		}
	}
	t.Setenv("ZS_TOKEN", "")
	if got := Choose("", "", "ZS_TOKEN", "ZS_TOKEN_FILE"); got != (Source{File: "/env/file", From: "ZS_TOKEN_FILE"}) {
		t.Errorf("env file: %+v", got)
	}
	t.Setenv("ZS_TOKEN_FILE", "")
	if got := Choose("", "", "ZS_TOKEN", "ZS_TOKEN_FILE"); got != (Source{}) {
		t.Errorf("nothing: %+v", got)
	}
	if _, err := (Source{File: "/nonexistent", From: "ZS_TOKEN_FILE"}).Open(nil); err == nil || !strings.HasPrefix(err.Error(), "ZS_TOKEN_FILE: ") {
		t.Errorf("a missing file's error does not say where it was chosen: %v", err)
	}
}

func TestTransportSetsTheCurrentTokenOnACopy(t *testing.T) {
	var seen []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen = append(seen, r.Header.Get("X-Test-Token"))
	}))
	defer srv.Close()
	token := "old"
	client := &http.Client{Transport: &Transport{Base: http.DefaultTransport, Header: "X-Test-Token", Token: func() string { return token }}}
	req, _ := http.NewRequest("GET", srv.URL, nil)
	req.Header.Set("X-Test-Token", "baked-in")
	for _, tok := range []string{"old", "new", ""} {
		token = tok
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	if strings.Join(seen, ",") != "old,new,baked-in" {
		t.Fatalf("server saw tokens %q", seen)
	}
	if req.Header.Get("X-Test-Token") != "baked-in" {
		t.Fatal("the caller's request was changed")
	}
}
