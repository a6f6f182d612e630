package bench

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The proxies the warm path compares the gate with. Both run one worker with
// their default buffers, as a user would start them, and listen on the same
// port on every address given (the client namespaces' host ends).

// proxyForward is one listener of a proxy: a port and where it forwards to.
type proxyForward struct {
	Port int
	To   string // host:port
	// Mode is haproxy's: "tcp" (L4) or "http" (L7). nginx stream is L4.
	Mode string
}

// ngxStreamModule is where Debian's libnginx-mod-stream installs nginx's
// TCP proxy module.
const ngxStreamModule = "/usr/lib/nginx/modules/ngx_stream_module.so"

// startNginxStream runs nginx as a plain TCP (stream) proxy: the L4
// counterpart of the gate's direct path.
func startNginxStream(b *testing.B, binds []netip.Addr, forwards []proxyForward) {
	bin, err := exec.LookPath("nginx")
	if err != nil {
		b.Fatal("nginx not installed (make system-deps installs Debian's nginx-light)")
	}
	if _, err := os.Stat(ngxStreamModule); err != nil {
		b.Fatalf("nginx's stream module is not at %s (make bench installs Debian's libnginx-mod-stream): %v", ngxStreamModule, err)
	}
	dir := b.TempDir()
	errorLog := filepath.Join(dir, "error.log")
	var servers strings.Builder
	for _, f := range forwards {
		servers.WriteString("  server {\n")
		for _, a := range binds {
			fmt.Fprintf(&servers, "    listen %s;\n", netip.AddrPortFrom(a, uint16(f.Port)))
		}
		fmt.Fprintf(&servers, "    proxy_pass %s;\n  }\n", f.To)
	}
	cfg := fmt.Sprintf(`load_module %s;
worker_processes 1;
pid %s;
error_log %s warn;
events {
  worker_connections 512;
}
stream {
%s}
`, ngxStreamModule, filepath.Join(dir, "nginx.pid"), errorLog, servers.String())
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		b.Fatal(err)
	}
	// -e: nginx opens its error log before reading the config; keep it
	// away from /var/log/nginx.
	startProxy(b, "nginx", errorLog, listenAddrs(binds, forwards),
		bin, "-g", "daemon off;", "-c", path, "-p", dir, "-e", errorLog)
}

// startHAProxy runs haproxy with a frontend and a backend per forward, in
// the forward's mode: http is an L7 proxy like the activators of Knative,
// KEDA HTTP and Sablier; tcp is L4, like nginx stream.
func startHAProxy(b *testing.B, binds []netip.Addr, forwards []proxyForward) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		b.Fatal("haproxy not installed (make bench installs Debian's haproxy)")
	}
	var cfg strings.Builder
	cfg.WriteString(`global
  maxconn 1000
  nbthread 1
defaults
  timeout connect 5s
  timeout client 30s
  timeout server 30s
`)
	for i, f := range forwards {
		var addrs []string
		for _, a := range binds {
			addrs = append(addrs, netip.AddrPortFrom(a, uint16(f.Port)).String())
		}
		fmt.Fprintf(&cfg, "frontend in%d\n  mode %s\n  bind %s\n  default_backend out%d\n", i, f.Mode, strings.Join(addrs, ","), i)
		if f.Mode == "http" {
			cfg.WriteString("  option http-keep-alive\n")
		}
		fmt.Fprintf(&cfg, "backend out%d\n  mode %s\n  server s1 %s\n", i, f.Mode, f.To)
	}
	dir := b.TempDir()
	path := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	startProxy(b, "haproxy", filepath.Join(dir, "output.log"), listenAddrs(binds, forwards), bin, "-db", "-f", path)
}

func listenAddrs(binds []netip.Addr, forwards []proxyForward) []string {
	var out []string
	for _, f := range forwards {
		for _, a := range binds {
			out = append(out, netip.AddrPortFrom(a, uint16(f.Port)).String())
		}
	}
	return out
}

// startProxy runs a proxy in the foreground as a child of the bench, in a
// process group of its own (nginx's master has a worker), stops it when the
// bench ends, and waits until every listener accepts.
func startProxy(b *testing.B, name, logPath string, listeners []string, bin string, args ...string) {
	out, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		out.Close()
		b.Fatalf("start %s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		out.Close()
		close(exited)
	}()
	b.Cleanup(func() {
		// SIGTERM stops both at once, nginx's master taking its worker
		// along. The group kill is for a child that did not stop; it is
		// sent before the child is reaped, so the group id is still ours.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for _, addr := range listeners {
		for {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-exited:
				log, _ := os.ReadFile(logPath)
				b.Fatalf("%s exited before listening on %s:\n%s", name, addr, log)
			default:
			}
			if time.Now().After(deadline) {
				log, _ := os.ReadFile(logPath)
				b.Fatalf("%s not listening on %s within 10s: %v\n%s", name, addr, err, log)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}
