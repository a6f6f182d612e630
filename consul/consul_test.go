package consul

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"
	hclog "github.com/hashicorp/go-hclog"
	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

func testLogger(t *testing.T) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug})
}

func newClient(t *testing.T, addr, token string) *Client {
	t.Helper()
	c, err := New(Config{Address: addr, Token: token, KVPrefix: "zs-test"}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

const allocID = "8d1b7c4e-2f5a-4c1e-9b7d-3e2f1a0b9c8d"

// registerLikeNomad registers an instance the way Nomad's service hook does.
func registerLikeNomad(t *testing.T, api *capi.Client, service, addr string, port int) string {
	t.Helper()
	id := fmt.Sprintf("_nomad-task-%s-group-web-%s-http", allocID, service)
	err := api.Agent().ServiceRegister(&capi.AgentServiceRegistration{
		ID: id, Name: service, Address: addr, Port: port,
		Meta: map[string]string{"external-source": "nomad"},
	})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestAllocIDFromServiceID(t *testing.T) {
	for id, want := range map[string]string{
		"_nomad-task-" + allocID + "-group-web-web-http": allocID,
		"_nomad-task-" + allocID + "-server-db-pg":       allocID,
		"_nomad-task-short-group-web":                    "",
		"web-1":                                          "",
		"_nomad-task-" + strings.Repeat("x", 36) + "-a":  "",
	} {
		got, ok := AllocIDFromServiceID(id)
		if got != want || ok != (want != "") {
			t.Errorf("%q: %q %v, want %q", id, got, ok, want)
		}
	}
}

func TestWatchSeesInstancesComeAndGo(t *testing.T) {
	agent := harness.StartConsul(t, harness.ConsulOptions{})
	c := newClient(t, agent.HTTPAddr, "")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	updates := make(chan []Instance, 16)
	w := c.NewWatch(ctx, func(service string, insts []Instance) {
		if service == "web" {
			updates <- insts
		}
	}, func(service string, err error) { t.Logf("watch %s: %v", service, err) })
	w.SetServices([]string{"web"})
	defer w.Stop()

	next := func(what string) []Instance {
		t.Helper()
		select {
		case u := <-updates:
			return u
		case <-time.After(10 * time.Second):
			t.Fatalf("no update: %s", what)
		}
		return nil
	}
	if got := next("initial"); len(got) != 0 {
		t.Fatalf("initial instances %+v", got)
	}

	began := time.Now()
	id := registerLikeNomad(t, agent.Client(t, ""), "web", "10.7.0.5", 8080)
	got := next("after register")
	seen := time.Since(began)
	if len(got) != 1 {
		t.Fatalf("instances %+v", got)
	}
	inst := got[0]
	if inst.AllocID != allocID || !inst.Nomad || inst.Asleep || inst.Node != agent.NodeName ||
		inst.AddrPort() != netip.MustParseAddrPort("10.7.0.5:8080") || !inst.Passing {
		t.Fatalf("instance %+v", inst)
	}
	t.Logf("watch saw a new instance %v after registration", seen)

	began = time.Now()
	if err := agent.Client(t, "").Agent().ServiceDeregister(id); err != nil {
		t.Fatal(err)
	}
	if got := next("after deregister"); len(got) != 0 {
		t.Fatalf("after deregister: %+v", got)
	}
	t.Logf("watch saw the instance go after %v", time.Since(began))

	// Stopping the watch of a service stops its updates.
	w.SetServices(nil)
	registerLikeNomad(t, agent.Client(t, ""), "web", "10.7.0.6", 8080)
	select {
	case u := <-updates:
		t.Fatalf("update after the service was dropped: %+v", u)
	case <-time.After(500 * time.Millisecond):
	}
}

// TestWatchResetsWhenTheIndexGoesBackwards drives the watch against a fake
// HTTP endpoint (pure index logic; the real agent is covered above).
func TestWatchResetsWhenTheIndexGoesBackwards(t *testing.T) {
	var mu sync.Mutex
	var seenIndexes []string
	responses := []uint64{100, 50, 60}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		n := len(seenIndexes)
		seenIndexes = append(seenIndexes, r.URL.Query().Get("index"))
		mu.Unlock()
		if n >= len(responses) {
			<-r.Context().Done()
			return
		}
		w.Header().Set("X-Consul-Index", fmt.Sprint(responses[n]))
		// A different port each time: the watch delivers only changes.
		fmt.Fprintf(w, `[{"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"x","Service":"web","Address":"10.0.0.1","Port":%d},"Checks":[]}]`, 80+n)
	}))
	defer srv.Close()
	c := newClient(t, srv.URL, "")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var calls atomic.Int32
	w := c.NewWatch(ctx, func(string, []Instance) { calls.Add(1) }, nil)
	w.SetServices([]string{"web"})
	deadline := time.Now().Add(5 * time.Second)
	for calls.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	w.Stop()
	mu.Lock()
	defer mu.Unlock()
	// The 2nd answer (50 < 100) resets the index: the 3rd query starts from
	// the fresh value, never from the stale 100.
	if len(seenIndexes) < 3 || seenIndexes[0] != "" || seenIndexes[1] != "100" || seenIndexes[2] != "1" {
		t.Fatalf("query indexes %v, want [\"\" 100 1 ...]", seenIndexes)
	}
	if calls.Load() != 3 {
		t.Fatalf("%d updates, want 3", calls.Load())
	}
}

// TestWatchDeliversOnlyChanges: Consul answers a blocking query whenever
// anything under its index changes (for a service without instances, the
// whole catalog), so a new index alone is not news. This is what made
// TestWatchSeesInstancesComeAndGo flaky: the agent syncing its node info
// just before the registration woke the watch with the same empty list.
func TestWatchDeliversOnlyChanges(t *testing.T) {
	const none = `[]`
	const one = `[{"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"x","Service":"web","Address":"10.0.0.1","Port":80},"Checks":[]}]`
	answers := []struct {
		index uint64
		body  string
	}{{10, none}, {11, none}, {12, one}, {13, one}, {14, one}, {15, none}}
	var served atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := int(served.Add(1)) - 1
		if n >= len(answers) {
			<-r.Context().Done()
			return
		}
		w.Header().Set("X-Consul-Index", fmt.Sprint(answers[n].index))
		fmt.Fprint(w, answers[n].body)
	}))
	defer srv.Close()
	c := newClient(t, srv.URL, "")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var sizes []int
	w := c.NewWatch(ctx, func(_ string, insts []Instance) {
		mu.Lock()
		sizes = append(sizes, len(insts))
		mu.Unlock()
	}, nil)
	w.SetServices([]string{"web"})
	deadline := time.Now().Add(5 * time.Second)
	for int(served.Load()) <= len(answers) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	w.Stop()
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(sizes) != "[0 1 0]" {
		t.Fatalf("delivered lists of sizes %v, want [0 1 0]: the first answer, then only changes", sizes)
	}
}

func lookup(t *testing.T, dnsAddr, name string) []string {
	t.Helper()
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", dnsAddr)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	addrs, _ := r.LookupHost(ctx, name)
	return addrs
}

func TestPlaceholderResolvesAndExpires(t *testing.T) {
	agent := harness.StartConsul(t, harness.ConsulOptions{})
	c := newClient(t, agent.HTTPAddr, "")
	ps := c.NewPlaceholders(PlaceholderOptions{TTL: 2 * time.Second})
	p := Placeholder{Service: "nginx", Address: netip.MustParseAddr("10.7.0.9"), Port: 8080, Namespace: "default", Job: "web", Group: "web"}
	if err := ps.Register(p); err != nil {
		t.Fatal(err)
	}
	if err := ps.Register(p); err != nil { // idempotent
		t.Fatal(err)
	}
	insts, err := c.Instances("nginx")
	if err != nil {
		t.Fatal(err)
	}
	if len(insts) != 1 || !insts[0].Asleep || !insts[0].Passing || insts[0].Meta[MetaJob] != "web" {
		t.Fatalf("placeholder instances %+v", insts)
	}
	local, err := c.LocalPlaceholders()
	if err != nil || len(local) != 1 || local[0] != p {
		t.Fatalf("local placeholders %+v %v", local, err)
	}

	// Many more placeholders cost no more requests to keep.
	var requests atomic.Int64
	kc, err := New(Config{Address: agent.HTTPAddr, KVPrefix: "zs-test", OnRequest: func(*http.Request) { requests.Add(1) }}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ps = kc.NewPlaceholders(PlaceholderOptions{TTL: 2 * time.Second})
	for i := range 50 {
		q := p
		if i > 0 {
			q.Service, q.Port = fmt.Sprintf("other-%d", i), uint16(9000+i)
		}
		if err := ps.Register(q); err != nil {
			t.Fatal(err)
		}
	}
	requests.Store(0)
	ctx, cancel := context.WithCancel(context.Background())
	go ps.Keep(ctx)
	// Kept alive past several TTLs, it keeps resolving.
	time.Sleep(5 * time.Second)
	if got := lookup(t, agent.DNSAddr, "nginx.service.consul"); len(got) != 1 || got[0] != "10.7.0.9" {
		t.Fatalf("DNS while kept alive: %v", got)
	}
	if n := requests.Load(); n > 2*8 {
		t.Fatalf("%d requests to keep 50 placeholders for 5 s (a period of 667 ms): want at most 2 per period", n)
	}
	// The agent loses one (restarted without its state): it comes back.
	if err := agent.Client(t, "").Agent().ServiceDeregister(p.ID()); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(lookup(t, agent.DNSAddr, "nginx.service.consul")) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("a placeholder the agent lost was not registered again")
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The plugin dies: nobody refreshes the TTL, the check turns critical and
	// DNS stops answering with the placeholder.
	cancel()
	deadline = time.Now().Add(10 * time.Second)
	for len(lookup(t, agent.DNSAddr, "nginx.service.consul")) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("DNS still answers for a placeholder nobody keeps alive")
		}
		time.Sleep(200 * time.Millisecond)
	}
	insts, _ = c.Instances("nginx")
	if len(insts) != 1 || insts[0].Passing {
		t.Fatalf("placeholder after TTL: %+v, want critical", insts)
	}

	if err := ps.Deregister(p); err != nil {
		t.Fatal(err)
	}
	if err := ps.Deregister(p); err != nil {
		t.Fatalf("deregistering twice: %v", err)
	}
	if insts, _ := c.Instances("nginx"); len(insts) != 0 {
		t.Fatalf("after deregister: %+v", insts)
	}
}

func TestLeaderElectionAndFailover(t *testing.T) {
	agent := harness.StartConsul(t, harness.ConsulOptions{})
	type candidate struct {
		leader *Leader
		cancel context.CancelFunc
		done   chan struct{}
	}
	start := func(name string) *candidate {
		c := newClient(t, agent.HTTPAddr, "")
		ctx, cancel := context.WithCancel(context.Background())
		cand := &candidate{leader: c.NewLeader(LeaderOptions{Name: name}, nil), cancel: cancel, done: make(chan struct{})}
		go func() {
			defer close(cand.done)
			cand.leader.Run(ctx, func(err error) { t.Logf("%s: %v", name, err) })
		}()
		t.Cleanup(func() { cancel(); <-cand.done })
		return cand
	}
	a, b := start("node-a"), start("node-b")

	waitOne := func(what string) *candidate {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			la, lb := a.leader.IsLeader(), b.leader.IsLeader()
			if la && lb {
				t.Fatalf("%s: two leaders", what)
			}
			if la {
				return a
			}
			if lb {
				return b
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: no leader", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	first := waitOne("initial")
	other := a
	if first == a {
		other = b
	}
	// Watch for two leaders at once for a while.
	for i := 0; i < 20; i++ {
		waitOne("steady")
		time.Sleep(25 * time.Millisecond)
	}

	// The leader stops: the other takes over (a clean stop releases the lock).
	began := time.Now()
	first.cancel()
	<-first.done
	if first.leader.IsLeader() {
		t.Fatal("a stopped candidate still claims leadership")
	}
	deadline := time.Now().Add(30 * time.Second)
	for !other.leader.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("no failover")
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("failover after a clean stop took %v", time.Since(began))

	// Losing the session (as when a node is cut off) stops decisions at once.
	api := agent.Client(t, "")
	pair, _, err := api.KV().Get(other.leader.Key(), nil)
	if err != nil || pair == nil || pair.Session == "" {
		t.Fatalf("lock key %+v %v", pair, err)
	}
	began = time.Now()
	if _, err := api.Session().Destroy(pair.Session, nil); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for other.leader.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("leader kept leading after its session was destroyed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("leader noticed the lost session after %v", time.Since(began))
	// …and campaigns again.
	deadline = time.Now().Add(30 * time.Second)
	for !other.leader.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("no new leader after the session was destroyed")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestActivityUnionAndStaleReports(t *testing.T) {
	agent := harness.StartConsul(t, harness.ConsulOptions{})
	c := newClient(t, agent.HTTPAddr, "")
	group := GroupKey("default", "web/app", "api")
	now := time.Now()
	reports := []ActivityReport{
		{Node: "node-a", Established: 0, LastActive: now.Add(-time.Hour), Reported: now},
		{Node: "node-b", Established: 2, LastActive: now.Add(-time.Second), Reported: now},
		{Node: "node-dead", Established: 5, LastActive: now.Add(-2 * time.Hour), Reported: now.Add(-time.Hour)},
	}
	for _, r := range reports {
		if err := c.PublishActivity(group, r); err != nil {
			t.Fatal(err)
		}
	}
	got, err := c.ReadActivity(group, 5*time.Minute, now)
	if err != nil {
		t.Fatal(err)
	}
	nodes := map[string]ActivityReport{}
	for _, r := range got {
		nodes[r.Node] = r
	}
	if len(nodes) != 2 || nodes["node-b"].Established != 2 || !nodes["node-a"].LastActive.Equal(reports[0].LastActive) {
		t.Fatalf("union %+v, want node-a and node-b only", got)
	}
	if err := c.DeleteStaleActivity(5*time.Minute, now); err != nil {
		t.Fatal(err)
	}
	if all, _ := c.ReadActivity(group, 0, now); len(all) != 2 {
		t.Fatalf("after deleting stale reports: %+v", all)
	}
	// Another group's reports are not mixed in.
	if other, _ := c.ReadActivity(GroupKey("default", "web", "app"), 0, now); len(other) != 0 {
		t.Fatalf("reports of another group: %+v", other)
	}
}

func TestGroupStateCheckAndSet(t *testing.T) {
	agent := harness.StartConsul(t, harness.ConsulOptions{})
	c := newClient(t, agent.HTTPAddr, "")
	group := GroupKey("default", "web", "web")

	st, err := c.GroupState(group)
	if err != nil || st.Phase != PhaseAwake || st.Index != 0 {
		t.Fatalf("absent state %+v %v", st, err)
	}
	asleep, err := c.SwapGroupState(group, st, GroupState{Phase: PhaseAsleep, Epoch: 1, By: "a"})
	if err != nil || asleep.Phase != PhaseAsleep || asleep.Index == 0 {
		t.Fatalf("swap: %+v %v", asleep, err)
	}

	// Ten nodes race to wake it: exactly one wins.
	var wins atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			_, err := c.SwapGroupState(group, asleep, GroupState{Phase: PhaseWaking, Epoch: 1, By: fmt.Sprint(i)})
			if err == nil {
				wins.Add(1)
			} else if !errors.Is(err, ErrConflict) {
				t.Errorf("swap: %v", err)
			}
		}(i)
	}
	wg.Wait()
	if wins.Load() != 1 {
		t.Fatalf("%d winners, want 1", wins.Load())
	}

	changes := make(chan map[string]GroupState, 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go c.WatchGroupStates(ctx, func(m map[string]GroupState) { changes <- m }, nil)
	m := <-changes
	if m[group].Phase != PhaseWaking {
		t.Fatalf("watched state %+v", m)
	}
	cur, _ := c.GroupState(group)
	if _, err := c.SwapGroupState(group, cur, GroupState{Phase: PhaseAwake, By: "x"}); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-changes:
		if m[group].Phase != PhaseAwake {
			t.Fatalf("watched state %+v", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("watch missed the change")
	}
}

func TestTooWeakTokenNamesTheMissingPermission(t *testing.T) {
	agent := harness.StartConsul(t, harness.ConsulOptions{ManagementToken: "root-token"})
	root := agent.Client(t, "root-token")
	policy, _, err := root.ACL().PolicyCreate(&capi.ACLPolicy{
		Name:  "read-only",
		Rules: `node_prefix "" { policy = "read" } service_prefix "" { policy = "read" }`,
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	token, _, err := root.ACL().TokenCreate(&capi.ACLToken{Policies: []*capi.ACLTokenPolicyLink{{ID: policy.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(t, agent.HTTPAddr, token.SecretID)

	err = c.PublishActivity(GroupKey("default", "web", "web"), ActivityReport{Node: "n", Reported: time.Now()})
	var pe *PermissionError
	if !errors.As(err, &pe) || !strings.Contains(pe.Needs, `key_prefix "zs-test/"`) {
		t.Fatalf("publish with a read-only token: %v", err)
	}
	ps := c.NewPlaceholders(PlaceholderOptions{})
	err = ps.Register(Placeholder{Service: "web", Address: netip.MustParseAddr("10.0.0.1"), Port: 80})
	if !errors.As(err, &pe) || !strings.Contains(pe.Needs, `service "web"`) {
		t.Fatalf("register with a read-only token: %v", err)
	}
	if _, err := c.SwapGroupState("g", GroupState{}, GroupState{Phase: PhaseAsleep}); !IsPermission(err) {
		t.Fatalf("group state with a read-only token: %v", err)
	}

	// The election reports the denial once instead of spinning.
	var reports atomic.Int32
	var last atomic.Value
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	defer cancel()
	c.NewLeader(LeaderOptions{Name: "n"}, nil).Run(ctx, func(err error) {
		reports.Add(1)
		last.Store(err)
	})
	if reports.Load() != 1 {
		t.Fatalf("election reported %d errors in 4s, want exactly 1", reports.Load())
	}
	if err := last.Load().(error); !IsPermission(err) || !strings.Contains(err.Error(), "session") {
		t.Fatalf("election error %v", err)
	}
	// Watches read fine with this token.
	if _, err := c.Instances("web"); err != nil {
		t.Fatalf("read with a read token: %v", err)
	}
}

// TestMain doubles as a leader candidate process when asked, so a test can
// kill a leader the way a node dies: without releasing anything.
func TestMain(m *testing.M) {
	if addr := os.Getenv("ZS_TEST_LEADER_CONSUL"); addr != "" {
		c, err := New(Config{Address: addr, KVPrefix: "zs-test"}, nil)
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		l := c.NewLeader(LeaderOptions{Name: "doomed"}, func(leader bool) {
			if leader {
				fmt.Println("LEADER")
			}
		})
		l.Run(context.Background(), nil)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestFailoverWhenTheLeaderDies(t *testing.T) {
	agent := harness.StartConsul(t, harness.ConsulOptions{})
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	doomed := exec.Command(self)
	doomed.Env = append(os.Environ(), "ZS_TEST_LEADER_CONSUL="+agent.HTTPAddr)
	out, err := doomed.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := doomed.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = doomed.Process.Kill(); _ = doomed.Wait() })
	line := make(chan string, 1)
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			line <- s.Text()
		}
	}()
	select {
	case l := <-line:
		if l != "LEADER" {
			t.Fatalf("candidate said %q", l)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the first candidate never led")
	}

	c := newClient(t, agent.HTTPAddr, "")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	survivor := c.NewLeader(LeaderOptions{Name: "survivor", SessionTTL: 10 * time.Second}, nil)
	go survivor.Run(ctx, nil)
	time.Sleep(time.Second)
	if survivor.IsLeader() {
		t.Fatal("two leaders")
	}

	began := time.Now()
	if err := doomed.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(40 * time.Second)
	for !survivor.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("no failover within 40s of the leader dying")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Consul expires a session between TTL and twice the TTL.
	t.Logf("failover after the leader was killed took %v (session TTL 10s)", time.Since(began))
}

// TestREADMEPolicyIsEnough gives the plugin exactly the ACL policy README.md
// documents and runs everything it does against Consul.
func TestREADMEPolicyIsEnough(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join(harness.RepoRoot(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	section := string(readme)
	i := strings.Index(section, "### Consul ACLs")
	if i < 0 {
		t.Fatal("README has no Consul ACLs section")
	}
	section = section[i:]
	start := strings.Index(section, "```hcl\n")
	end := strings.Index(section[start+7:], "```")
	if start < 0 || end < 0 {
		t.Fatal("no hcl block in the ACL section")
	}
	rules := section[start+7 : start+7+end]

	agent := harness.StartConsul(t, harness.ConsulOptions{ManagementToken: "root-token"})
	root := agent.Client(t, "root-token")
	policy, _, err := root.ACL().PolicyCreate(&capi.ACLPolicy{Name: "zeroscale", Rules: rules}, nil)
	if err != nil {
		t.Fatalf("create the README policy: %v\n%s", err, rules)
	}
	token, _, err := root.ACL().TokenCreate(&capi.ACLToken{Policies: []*capi.ACLTokenPolicyLink{{ID: policy.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(Config{Address: agent.HTTPAddr, Token: token.SecretID}, testLogger(t)) // default prefix
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.NodeName(); err != nil {
		t.Fatalf("node name: %v", err)
	}
	group := GroupKey("default", "web", "web")
	if err := c.PublishActivity(group, ActivityReport{Node: "n", Reported: time.Now()}); err != nil {
		t.Fatalf("publish: %v", err)
	}
	if _, err := c.ReadActivity(group, 0, time.Now()); err != nil {
		t.Fatalf("read activity: %v", err)
	}
	if _, err := c.SwapGroupState(group, GroupState{}, GroupState{Phase: PhaseAsleep}); err != nil {
		t.Fatalf("group state: %v", err)
	}
	ps := c.NewPlaceholders(PlaceholderOptions{TTL: 3 * time.Second})
	p := Placeholder{Service: "web", Address: netip.MustParseAddr("10.0.0.1"), Port: 80, Namespace: "default", Job: "web", Group: "web"}
	if err := ps.Register(p); err != nil {
		t.Fatalf("placeholder: %v", err)
	}
	if err := c.API().Agent().UpdateTTL(p.checkID(), "", capi.HealthPassing); err != nil {
		t.Fatalf("TTL update: %v", err)
	}
	if _, err := c.LocalPlaceholders(); err != nil {
		t.Fatalf("list placeholders: %v", err)
	}
	if insts, err := c.Instances("web"); err != nil || len(insts) != 1 {
		t.Fatalf("instances %v %v", insts, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	l := c.NewLeader(LeaderOptions{Name: "n"}, nil)
	var lerr atomic.Value
	go l.Run(ctx, func(err error) { lerr.Store(err) })
	for !l.IsLeader() {
		if ctx.Err() != nil {
			t.Fatalf("no leadership with the README policy: %v", lerr.Load())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := ps.Deregister(p); err != nil {
		t.Fatalf("deregister: %v", err)
	}
}

// An instance without checks of its own passes in Consul from its
// registration on: Checked tells it from one whose checks pass. Every
// group's record is read at once by GroupStates.
func TestInstancesSayWhetherTheyHaveChecksAndRecordsReadAtOnce(t *testing.T) {
	agent := harness.StartConsul(t, harness.ConsulOptions{})
	c := newClient(t, agent.HTTPAddr, "")
	api := agent.Client(t, "")
	registerLikeNomad(t, api, "web", "10.7.0.5", 8080)
	err := api.Agent().ServiceRegister(&capi.AgentServiceRegistration{
		ID: "checked-web", Name: "web", Address: "10.7.0.6", Port: 8080,
		Check: &capi.AgentServiceCheck{TTL: "1m", Status: capi.HealthPassing},
	})
	if err != nil {
		t.Fatal(err)
	}
	insts, err := c.Instances("web")
	if err != nil || len(insts) != 2 {
		t.Fatalf("instances %+v, %v", insts, err)
	}
	for _, inst := range insts {
		if !inst.Passing || inst.Checked != (inst.ID == "checked-web") {
			t.Errorf("%s: passing %v checked %v", inst.ID, inst.Passing, inst.Checked)
		}
	}

	a, b := GroupKey("default", "a", "web"), GroupKey("default", "b", "web")
	if _, err := c.SwapGroupState(a, GroupState{}, GroupState{Phase: PhaseAsleep, Epoch: 2}); err != nil {
		t.Fatal(err)
	}
	all, err := c.GroupStates()
	if err != nil {
		t.Fatal(err)
	}
	if st, ok := all[a]; !ok || st.Phase != PhaseAsleep || st.Epoch != 2 || st.Index == 0 {
		t.Fatalf("record of %s: %+v (%v)", a, st, ok)
	}
	if st, ok := all[b]; ok {
		t.Fatalf("a record for %s, which has none: %+v", b, st)
	}
}
