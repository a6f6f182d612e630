package scaling

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// hungNomad accepts TCP connections and never answers: a server whose
// process hangs, or a peer whose packets stopped arriving mid-connection.
func hungNomad(t *testing.T) string {
	t.Helper()
	p := harness.StartFaultProxy(t)
	p.Cut(harness.Held)
	return "http://" + p.Addr
}

func TestHungNomadCallsTimeOutAndStayRetryable(t *testing.T) {
	const timeout = 300 * time.Millisecond
	n, err := NewNomadAPI(hungNomad(t), "")
	if err != nil {
		t.Fatal(err)
	}
	n.RequestTimeout = timeout
	id := GroupID{Namespace: "default", Job: "web", Group: "web"}
	zero := 0
	for _, call := range []struct {
		name, action string
		do           func() error
	}{
		{"scale status", "read scale status of", func() error {
			_, err := n.ScaleStatus(id)
			return err
		}},
		{"scale", "scale ", func() error {
			return n.Scale(id, &zero, "idle", false, nil)
		}},
		{"job read", "read job web", func() error {
			_, err := n.Group(id)
			return err
		}},
		{"policy read", "read scaling policy p1", func() error {
			_, err := n.Policy("p1")
			return err
		}},
		{"allocation read", "read allocation a1", func() error {
			_, err := n.AllocGroup("a1")
			return err
		}},
	} {
		t.Run(call.name, func(t *testing.T) {
			began := time.Now()
			err := call.do()
			took := time.Since(began)
			t.Logf("%s against a hung server returned after %v: %v", call.name, took, err)
			if err == nil {
				t.Fatal("no error from a hung server")
			}
			if took > 2*timeout {
				t.Errorf("took %v, want at most %v (2× the request timeout)", took, 2*timeout)
			}
			if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), call.action) ||
				!strings.Contains(err.Error(), "did not answer in time") {
				t.Errorf("error %q should wrap context.DeadlineExceeded and name the action %q", err, call.action)
			}
			if !Retryable(err) {
				t.Errorf("a timeout is not retryable: %v", err)
			}
		})
	}

	// The blocking policy list is bounded by its wait, Nomad's jitter
	// (wait/16) and the request timeout.
	t.Run("blocking policy list", func(t *testing.T) {
		const wait = 400 * time.Millisecond
		bound := wait + wait/16 + timeout
		began := time.Now()
		_, index, err := n.Policies(7, wait)
		took := time.Since(began)
		t.Logf("a blocking policy list against a hung server returned after %v (bound %v): %v", took, bound, err)
		if err == nil || index != 7 {
			t.Fatalf("want an error and the index kept, got %v at %d", err, index)
		}
		if took < wait || took > bound+timeout {
			t.Errorf("took %v, want about %v", took, bound)
		}
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "list scaling policies") {
			t.Errorf("error %q should wrap context.DeadlineExceeded and name the action", err)
		}
		if !Retryable(err) {
			t.Errorf("a timeout is not retryable: %v", err)
		}
	})
}
