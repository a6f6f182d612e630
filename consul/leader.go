package consul

import (
	"context"
	"sync/atomic"
	"time"

	capi "github.com/hashicorp/consul/api"
)

// LeaderOptions tunes the election.
type LeaderOptions struct {
	// SessionTTL bounds how long a dead leader holds the lock (Consul's
	// minimum is 10 s; it may take up to twice that to expire).
	SessionTTL time.Duration
	// LockDelay is how long Consul refuses the lock after a session was
	// invalidated; short, because scale-down decisions are idempotent.
	LockDelay time.Duration
	// Name identifies this candidate in the lock value (node name).
	Name string
}

// Leader takes part in the election for `<prefix>/leader`: exactly one node
// decides scale-downs; losing the session stops its decisions at once.
type Leader struct {
	client   *Client
	opts     LeaderOptions
	isLeader atomic.Bool
	onChange func(bool)
}

// NewLeader prepares an election candidate; Run takes part.
func (c *Client) NewLeader(opts LeaderOptions, onChange func(bool)) *Leader {
	if opts.SessionTTL < 10*time.Second {
		opts.SessionTTL = 10 * time.Second
	}
	if opts.LockDelay <= 0 {
		opts.LockDelay = time.Second
	}
	if onChange == nil {
		onChange = func(bool) {}
	}
	return &Leader{client: c, opts: opts, onChange: onChange}
}

// IsLeader tells whether this node holds the lock now.
func (l *Leader) IsLeader() bool { return l.isLeader.Load() }

// Key is the lock's KV key.
func (l *Leader) Key() string { return l.client.prefix + "/leader" }

// Run campaigns until ctx ends, releasing the lock on the way out. Errors
// are reported through onError; an ACL denial is reported once and retried
// slowly.
func (l *Leader) Run(ctx context.Context, onError func(error)) {
	if onError == nil {
		onError = func(error) {}
	}
	failures := 0
	denied := false
	for ctx.Err() == nil {
		lock, err := l.client.api.LockOpts(&capi.LockOptions{
			Key:   l.Key(),
			Value: []byte(l.opts.Name),
			SessionOpts: &capi.SessionEntry{
				Name:      "zeroscale leader " + l.opts.Name,
				TTL:       l.opts.SessionTTL.String(),
				LockDelay: l.opts.LockDelay,
				Behavior:  capi.SessionBehaviorRelease,
			},
			MonitorRetries:   3,
			MonitorRetryTime: time.Second,
			LockWaitTime:     15 * time.Second,
		})
		if err != nil {
			onError(err)
			return
		}
		lost, err := lock.Lock(ctx.Done())
		if err != nil {
			err = classify(err, `session_prefix "" { policy = "write" } and `+l.client.kvNeed(), "take part in the leader election")
			failures++
			delay := backoff(failures)
			if IsPermission(err) {
				if !denied {
					onError(err)
					denied = true
				}
				delay = time.Minute
			} else {
				onError(err)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			continue
		}
		if lost == nil { // ctx ended while waiting
			return
		}
		failures, denied = 0, false
		l.set(true)
		select {
		case <-lost:
			l.set(false)
		case <-ctx.Done():
			l.set(false)
			_ = lock.Unlock()
			return
		}
		_ = lock.Unlock()
	}
}

func (l *Leader) set(v bool) {
	if l.isLeader.Swap(v) != v {
		l.client.logger.Info("leadership changed", "leader", v, "node", l.opts.Name)
		l.onChange(v)
	}
}
