package harness

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Dockerd is a docker daemon of the test's own: its own data root, exec
// root, socket and pid file, so it shares nothing with a system dockerd.
type Dockerd struct {
	*process
	// Endpoint is the daemon's API address, for Nomad's docker plugin.
	Endpoint string
	Socket   string
	ExecRoot string
	DataRoot string
	http     *http.Client
}

// BusyboxImage is the image ImportBusybox builds: a static busybox with
// sh and httpd, imported locally because no registry is reachable here.
const BusyboxImage = "zeroscale-e2e/busybox:1"

// StartDockerd starts dockerd (Debian's docker.io) and waits until it
// answers. When the test ends it removes every container, stops the daemon
// and whatever it left running or mounted, deletes the docker0 bridge if the
// daemon created it, and sets the FORWARD policy back to ACCEPT.
//
// Start it before the Nomad agent that uses it: cleanups run in reverse, so
// Nomad stops its containers before the daemon goes.
func StartDockerd(t testing.TB) *Dockerd {
	t.Helper()
	bin, err := exec.LookPath("dockerd")
	if err != nil {
		t.Fatal("dockerd not found: install Debian's docker.io (make system-deps)")
	}
	for _, tool := range []string{"containerd", "runc", "docker-proxy", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: dockerd needs it (make system-deps installs docker.io and iptables)", tool)
		}
	}
	// Unix socket paths are limited to 108 bytes and containerd puts its
	// own below the exec root: keep that short.
	execRoot, err := os.MkdirTemp("", "zsd-")
	if err != nil {
		t.Fatal(err)
	}
	dataRoot := t.TempDir()
	_, bridgeErr := net.InterfaceByName("docker0")
	bridgeExisted := bridgeErr == nil

	d := &Dockerd{
		Socket:   filepath.Join(execRoot, "docker.sock"),
		ExecRoot: execRoot,
		DataRoot: dataRoot,
	}
	d.Endpoint = "unix://" + d.Socket
	d.http = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dialer net.Dialer
			return dialer.DialContext(ctx, "unix", d.Socket)
		},
	}}
	d.process = startProcess(t, "dockerd", cleanEnv(), bin,
		"--data-root", dataRoot,
		"--exec-root", execRoot,
		"--pidfile", filepath.Join(execRoot, "dockerd.pid"),
		"-H", d.Endpoint,
		"--log-level", "warn")
	t.Cleanup(func() {
		d.removeContainers()
		d.process.stop(20 * time.Second)
		// Shims of containers the daemon could not remove name the exec
		// root on their command lines.
		killUnder(execRoot, dataRoot)
		unmountUnder(execRoot)
		unmountUnder(dataRoot)
		_ = os.RemoveAll(execRoot)
		if !bridgeExisted {
			_ = exec.Command("ip", "link", "del", "docker0").Run()
		}
		forwardAccept(t)
	})
	waitFor(t, "dockerd to answer /info", 60*time.Second, d.process, func() bool {
		resp, err := d.http.Get("http://docker/info")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	// dockerd turns on forwarding and sets the FORWARD policy to DROP,
	// which would cut Nomad's own bridge networking off.
	forwardAccept(t)
	return d
}

func forwardAccept(t testing.TB) {
	if out, err := exec.Command("iptables", "-P", "FORWARD", "ACCEPT").CombinedOutput(); err != nil {
		t.Errorf("iptables -P FORWARD ACCEPT: %v: %s", err, out)
	}
}

// ImportBusybox builds BusyboxImage from /bin/busybox (Debian's
// busybox-static) with `docker import`.
func (d *Dockerd) ImportBusybox(t testing.TB) {
	t.Helper()
	const busybox = "/bin/busybox"
	if !isStatic(busybox) {
		t.Fatalf("%s is missing or dynamically linked: install Debian's busybox-static (make system-deps)", busybox)
	}
	bin, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	entries := []tar.Header{
		{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bin))},
		{Name: "bin/sh", Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777},
		{Name: "bin/httpd", Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777},
		{Name: "tmp/", Typeflag: tar.TypeDir, Mode: 0o1777},
	}
	for _, h := range entries {
		h.ModTime = time.Unix(0, 0)
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(bin); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	repo, tag, _ := strings.Cut(BusyboxImage, ":")
	q := url.Values{"fromSrc": {"-"}, "repo": {repo}, "tag": {tag}}
	resp, err := d.http.Post("http://docker/images/create?"+q.Encode(), "application/x-tar", &buf)
	if err != nil {
		t.Fatalf("docker import: %v", err)
	}
	defer resp.Body.Close()
	// The answer is a stream of JSON messages; a failure is one with an
	// error, with status 200 all the same.
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || bytes.Contains(body, []byte(`"error"`)) {
		t.Fatalf("docker import: %s: %s", resp.Status, body)
	}
}

// isStatic tells an ELF executable without a program interpreter.
func isStatic(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

// Container is the part of the daemon's container list the tests read.
type Container struct {
	ID    string
	Names []string
	State string
	Image string
}

// Containers lists every container, running or not.
func (d *Dockerd) Containers(t testing.TB) []Container {
	t.Helper()
	list, err := d.containers()
	if err != nil {
		t.Fatalf("list containers: %v", err)
	}
	return list
}

func (d *Dockerd) containers() ([]Container, error) {
	resp, err := d.http.Get("http://docker/containers/json?all=1")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s", resp.Status)
	}
	var list []Container
	return list, json.NewDecoder(resp.Body).Decode(&list)
}

// Inspect returns the daemon's record of a container as generic JSON.
func (d *Dockerd) Inspect(t testing.TB, id string) map[string]any {
	t.Helper()
	resp, err := d.http.Get("http://docker/containers/" + id + "/json")
	if err != nil {
		t.Fatalf("inspect %s: %v", id, err)
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatalf("inspect %s: %v", id, err)
	}
	return out
}

func (d *Dockerd) removeContainers() {
	if d.process.exited() {
		return
	}
	list, err := d.containers()
	if err != nil {
		return
	}
	for _, c := range list {
		req, _ := http.NewRequest(http.MethodDelete, "http://docker/containers/"+c.ID+"?force=1&v=1", nil)
		if resp, err := d.http.Do(req); err == nil {
			resp.Body.Close()
		}
	}
}
