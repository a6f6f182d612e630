package consul

import (
	"context"
	"errors"
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
	// Wait is how long one blocking read of the lock key waits for a change
	// (15 s when zero). The read is abandoned after Wait, Consul's jitter
	// and the request timeout, so a dead connection cannot hold it.
	Wait time.Duration
	// Name identifies this candidate in the lock value (node name).
	Name string
}

// Leader takes part in the election for `<prefix>/leader`: exactly one node
// decides scale-downs; losing the session stops its decisions at once.
//
// It speaks the protocol of Consul's api.Lock (same key flags, session
// behaviour and lock-delay handling), so candidates of either kind exclude
// each other, but every call it makes has a deadline: api.Lock makes its
// calls without one, so a hung agent could stall the election for good.
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
	if opts.Wait <= 0 {
		opts.Wait = 15 * time.Second
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
		led, err := l.campaign(ctx)
		if led {
			// Leadership ended (lost or given up): campaign again at once.
			failures, denied = 0, false
			if err != nil && ctx.Err() == nil {
				onError(err)
			}
			continue
		}
		if err == nil || ctx.Err() != nil {
			continue
		}
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
	}
}

func (l *Leader) set(v bool) {
	if l.isLeader.Swap(v) != v {
		l.client.logger.Info("leadership changed", "leader", v, "node", l.opts.Name)
		l.onChange(v)
	}
}

func (l *Leader) need() string {
	return `session_prefix "" { policy = "write" } and ` + l.client.kvNeed()
}

// campaign creates a session, takes the lock with it and holds it until
// the lock or the session is lost or ctx ends; then it releases what it
// holds. led tells whether this node led in between.
func (l *Leader) campaign(ctx context.Context) (led bool, err error) {
	session, err := l.createSession(ctx)
	if err != nil {
		return false, err
	}
	// The session lives as long as sctx; keepSession ends it (and with it
	// every wait below) when a renewal cannot succeed within the TTL.
	sctx, endSession := context.WithCancel(ctx)
	renewing := make(chan struct{})
	go func() {
		defer close(renewing)
		l.keepSession(sctx, session, endSession)
	}()
	defer func() {
		endSession()
		<-renewing
		l.destroySession(session)
	}()

	if held, err := l.acquire(sctx, session); !held {
		return false, err
	}
	l.set(true)
	err = l.hold(sctx, session)
	// Stop deciding before any cleanup call, which may itself be slow.
	l.set(false)
	l.release(session)
	return true, err
}

func (l *Leader) createSession(ctx context.Context) (string, error) {
	ctx, cancel := l.client.requestContext(ctx)
	defer cancel()
	id, _, err := l.client.api.Session().Create(&capi.SessionEntry{
		Name:      "zeroscale leader " + l.opts.Name,
		TTL:       l.opts.SessionTTL.String(),
		LockDelay: l.opts.LockDelay,
		Behavior:  capi.SessionBehaviorRelease,
	}, writeOpts(ctx))
	if err != nil {
		return "", classify(err, l.need(), "create the leader election session")
	}
	return id, nil
}

// keepSession renews the session every half TTL until ctx ends. When it
// cannot renew it within the TTL, or Consul no longer knows it, the session
// is as good as gone: it calls lost so the leader steps down without
// waiting for Consul to say so (Consul may keep it for up to twice the TTL).
func (l *Leader) keepSession(ctx context.Context, id string, lost func()) {
	defer lost()
	ttl := l.opts.SessionTTL
	renewed := time.Now()
	wait := ttl / 2
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		// A renewal answered after the TTL proves nothing: bound it by both.
		rctx, cancel := context.WithTimeout(ctx, min(l.client.timeout, time.Until(renewed.Add(ttl))))
		entry, _, err := l.client.api.Session().Renew(id, writeOpts(rctx))
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err == nil && entry == nil:
			l.client.logger.Warn("the leader election session ended", "node", l.opts.Name)
			return
		case err == nil:
			renewed, wait = time.Now(), ttl/2
			if t, perr := time.ParseDuration(entry.TTL); perr == nil && t > 0 {
				wait = t / 2 // Consul may raise the TTL
			}
		case time.Since(renewed) >= ttl:
			l.client.logger.Warn("could not renew the leader election session within its TTL",
				"node", l.opts.Name, "ttl", ttl, "error", classify(err, l.need(), "renew the leader election session"))
			return
		default:
			wait = time.Second
		}
	}
}

// readLock reads the lock key, blocking while it stays at index (0: answer
// at once).
func (l *Leader) readLock(ctx context.Context, index uint64) (*capi.KVPair, uint64, error) {
	ctx, cancel := l.client.blockingContext(ctx, l.opts.Wait)
	defer cancel()
	q := &capi.QueryOptions{WaitIndex: index, WaitTime: l.opts.Wait, RequireConsistent: true}
	pair, meta, err := l.client.api.KV().Get(l.Key(), q.WithContext(ctx))
	if err != nil {
		return nil, index, err
	}
	next, _ := advanceIndex(index, meta.LastIndex)
	return pair, next, nil
}

func (l *Leader) lockEntry(session string) *capi.KVPair {
	return &capi.KVPair{Key: l.Key(), Value: []byte(l.opts.Name), Session: session, Flags: capi.LockFlagValue}
}

// acquire waits until the lock is free and takes it; false without an
// error when ctx or the session ended first.
func (l *Leader) acquire(ctx context.Context, session string) (bool, error) {
	var index uint64
	for {
		pair, next, err := l.readLock(ctx, index)
		if ctx.Err() != nil {
			return false, nil
		}
		if err != nil {
			return false, classify(err, l.need(), "read the leader lock")
		}
		if pair != nil && pair.Flags != capi.LockFlagValue {
			return false, errors.New("the leader lock key " + l.Key() + " holds something else than a lock")
		}
		if pair != nil && pair.Session == session {
			return true, nil
		}
		if pair != nil && pair.Session != "" { // held: wait for a change
			index = next
			continue
		}
		rctx, cancel := l.client.requestContext(ctx)
		ok, _, err := l.client.api.KV().Acquire(l.lockEntry(session), writeOpts(rctx))
		cancel()
		if ctx.Err() != nil {
			return false, nil
		}
		if err != nil {
			return false, classify(err, l.need(), "take the leader lock")
		}
		if ok {
			return true, nil
		}
		// Refused with no holder seen: another candidate just won, or the
		// lock-delay after the last holder's session ended is in force.
		// Look again once the delay is over.
		index = 0
		select {
		case <-ctx.Done():
			return false, nil
		case <-time.After(l.opts.LockDelay):
		}
	}
}

// hold watches the lock until another session has it or ctx (or the
// session) ends. Like api.Lock it rides out a brief outage (3 retries 1 s
// apart); keepSession bounds how long.
func (l *Leader) hold(ctx context.Context, session string) error {
	var index uint64
	retries := 3
	for {
		pair, next, err := l.readLock(ctx, index)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			if retries == 0 {
				return classify(err, l.need(), "watch the leader lock")
			}
			retries--
			index = 0
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(time.Second):
			}
			continue
		}
		retries = 3
		if pair == nil || pair.Session != session {
			return nil
		}
		index = next
	}
}

// release gives the lock up explicitly, so the next leader need not sit out
// the lock-delay; it runs after ctx may have ended, with its own deadline.
func (l *Leader) release(session string) {
	ctx, cancel := l.client.requestContext(context.Background())
	defer cancel()
	if _, _, err := l.client.api.KV().Release(l.lockEntry(session), writeOpts(ctx)); err != nil {
		l.client.logger.Debug("could not release the leader lock", "error", classify(err, l.need(), "release the leader lock"))
	}
}

func (l *Leader) destroySession(session string) {
	ctx, cancel := l.client.requestContext(context.Background())
	defer cancel()
	if _, err := l.client.api.Session().Destroy(session, writeOpts(ctx)); err != nil {
		l.client.logger.Debug("could not destroy the leader election session", "error",
			classify(err, l.need(), "destroy the leader election session"))
	}
}
