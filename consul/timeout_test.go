package consul

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// hungConsul accepts TCP connections and never answers: an agent whose
// process hangs, or a peer whose packets stopped arriving mid-connection.
func hungConsul(t *testing.T) string {
	t.Helper()
	p := harness.StartFaultProxy(t)
	p.Cut(harness.Held)
	return p.Addr
}

func TestHungConsulCallsTimeOut(t *testing.T) {
	const timeout = 300 * time.Millisecond
	c, err := New(Config{Address: hungConsul(t), KVPrefix: "zs-test", RequestTimeout: timeout}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	group := GroupKey("default", "web", "web")
	placeholder := Placeholder{Service: "web", Address: netip.MustParseAddr("10.0.0.1"), Port: 80,
		Namespace: "default", Job: "web", Group: "web"}
	for _, call := range []struct {
		name, action string
		do           func() error
	}{
		{"KV write", "publish activity of " + group, func() error {
			return c.PublishActivity(group, ActivityReport{Node: "n", Reported: time.Now()})
		}},
		{"group state read", "read state of " + group, func() error {
			_, err := c.GroupState(group)
			return err
		}},
		{"group state check-and-set", "change state of " + group, func() error {
			_, err := c.SwapGroupState(group, GroupState{}, GroupState{Phase: PhaseAsleep})
			return err
		}},
		{"placeholder registration", "register placeholder for web", func() error {
			return c.NewPlaceholders(PlaceholderOptions{}).Register(placeholder)
		}},
		{"placeholder removal", "remove placeholder for web", func() error {
			return c.NewPlaceholders(PlaceholderOptions{}).Deregister(placeholder)
		}},
		{"instances read", "read instances of service web", func() error {
			_, err := c.Instances("web")
			return err
		}},
		{"node name", "read the local agent's node name", func() error {
			_, err := c.NodeName()
			return err
		}},
	} {
		t.Run(call.name, func(t *testing.T) {
			began := time.Now()
			err := call.do()
			took := time.Since(began)
			t.Logf("%s against a hung agent returned after %v: %v", call.name, took, err)
			if err == nil {
				t.Fatal("no error from a hung agent")
			}
			if took > 2*timeout {
				t.Errorf("took %v, want at most %v (2× the request timeout)", took, 2*timeout)
			}
			if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), call.action) ||
				!strings.Contains(err.Error(), "did not answer in time") {
				t.Errorf("error %q should wrap context.DeadlineExceeded and name the action %q", err, call.action)
			}
		})
	}
}

// TestHungConsulBlockingQueriesTimeOut: a blocking query is bounded by its
// wait, Consul's jitter (wait/16) and the request timeout, and the watch
// reports the failure instead of hanging on the dead connection.
func TestHungConsulBlockingQueriesTimeOut(t *testing.T) {
	const timeout = 300 * time.Millisecond
	c, err := New(Config{Address: hungConsul(t), KVPrefix: "zs-test", RequestTimeout: timeout}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	t.Run("service watch", func(t *testing.T) {
		const wait = 400 * time.Millisecond
		errs := make(chan error, 1)
		w := c.NewWatch(ctx, func(string, []Instance) {}, func(_ string, err error) {
			select {
			case errs <- err:
			default:
			}
		})
		w.wait = wait
		began := time.Now()
		w.SetServices([]string{"web"})
		defer w.Stop()
		bound := wait + wait/16 + timeout
		select {
		case err := <-errs:
			took := time.Since(began)
			t.Logf("the watch reported after %v (bound %v): %v", took, bound, err)
			if took > bound+timeout {
				t.Errorf("took %v, want about %v", took, bound)
			}
			if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "read instances of service web") {
				t.Errorf("error %q should wrap context.DeadlineExceeded and name the action", err)
			}
		case <-time.After(5 * bound):
			t.Fatalf("no error within %v", 5*bound)
		}
	})

	t.Run("leader election", func(t *testing.T) {
		errs := make(chan error, 1)
		lctx, lcancel := context.WithCancel(ctx)
		done := make(chan struct{})
		began := time.Now()
		l := c.NewLeader(LeaderOptions{Name: "n"}, nil)
		go func() {
			defer close(done)
			l.Run(lctx, func(err error) {
				select {
				case errs <- err:
				default:
				}
			})
		}()
		defer func() { lcancel(); <-done }()
		select {
		case err := <-errs:
			took := time.Since(began)
			t.Logf("the election reported after %v: %v", took, err)
			if took > 2*timeout {
				t.Errorf("took %v, want at most %v", took, 2*timeout)
			}
			if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "leader election session") {
				t.Errorf("error %q should wrap context.DeadlineExceeded and name the action", err)
			}
		case <-time.After(10 * timeout):
			t.Fatalf("no error within %v", 10*timeout)
		}
		if l.IsLeader() {
			t.Fatal("leader without Consul")
		}
	})
}

// TestBlockingQueriesOutliveTheRequestTimeout: the request timeout bounds
// calls that should answer at once, never a blocking query that is waiting
// as asked.
func TestBlockingQueriesOutliveTheRequestTimeout(t *testing.T) {
	agent := harness.StartConsul(t, harness.ConsulOptions{})
	const timeout = 200 * time.Millisecond
	c, err := New(Config{Address: agent.HTTPAddr, KVPrefix: "zs-test", RequestTimeout: timeout}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var failures atomic.Int32
	report := func(what string) func(error) {
		return func(err error) {
			failures.Add(1)
			t.Errorf("%s: %v", what, err)
		}
	}

	w := c.NewWatch(ctx, func(string, []Instance) {}, func(_ string, err error) { report("watch")(err) })
	w.wait = time.Second // five request timeouts
	w.SetServices([]string{"web"})
	defer w.Stop()

	l := c.NewLeader(LeaderOptions{Name: "n", Wait: time.Second}, nil)
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.Run(ctx, report("election"))
	}()
	defer func() { cancel(); <-done }()

	deadline := time.Now().Add(10 * time.Second)
	for !l.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("no leadership")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Several blocking waits of the watch and of the leader's lock watch.
	for i := 0; i < 30; i++ {
		if !l.IsLeader() {
			t.Fatal("lost leadership while Consul was up")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if failures.Load() != 0 {
		t.Fatalf("%d failures while Consul was up", failures.Load())
	}
}
