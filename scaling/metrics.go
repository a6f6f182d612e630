package scaling

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the agent's Prometheus series.
type Metrics struct {
	Wakes           *prometheus.CounterVec
	Sleeps          *prometheus.CounterVec
	ParkingUndone   *prometheus.CounterVec
	WakeLatency     *prometheus.HistogramVec
	ParkedAddresses prometheus.Gauge
	Errors          *prometheus.CounterVec
	Leader          prometheus.Gauge
	Replays         *prometheus.CounterVec
	CapturesDropped prometheus.Counter
	DryRunDecisions *prometheus.CounterVec
	GroupsByPhase   *prometheus.GaugeVec
	Repairs         *prometheus.CounterVec
	// Forwards of parked addresses to where their group woke.
	Forwards             prometheus.Gauge
	ForwardedConnections prometheus.Counter
	ForwardGrace         prometheus.Gauge
	// APIRequests is the load the plugin puts on Nomad and Consul.
	APIRequests *prometheus.CounterVec
	// FollowedServices are the services whose instances are followed.
	FollowedServices prometheus.Gauge
}

// NewMetrics creates the series and registers them on reg (nil: a private
// registry, for tests).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &Metrics{
		Wakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeroscale_wakes_total", Help: "Scale-ups from zero triggered by a connection.",
		}, []string{"namespace", "job", "group"}),
		Sleeps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeroscale_sleeps_total", Help: "Scale-downs to zero of idle groups.",
		}, []string{"namespace", "job", "group"}),
		ParkingUndone: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeroscale_parking_undone_total", Help: "Parking attempts abandoned because traffic came.",
		}, []string{"namespace", "job", "group"}),
		WakeLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "zeroscale_wake_latency_seconds",
			Help:    "From the first SYN to the gate opening (stage=gate_open) and to the replayed SYN being accepted (stage=replay_accepted).",
			Buckets: []float64{0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120},
		}, []string{"stage"}),
		ParkedAddresses: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "zeroscale_parked_addresses", Help: "Service addresses whose gate is parked on this node.",
		}),
		Errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeroscale_errors_total", Help: "Errors by kind.",
		}, []string{"kind"}),
		Leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "zeroscale_leader", Help: "1 when this node decides scale-downs.",
		}),
		Replays: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeroscale_syn_replays_total",
			Help: "Captured SYNs by replay outcome (passed, already_connected, fallback_retransmit, woke_elsewhere: no instance serves that address now, too_old, unsupported).",
		}, []string{"result"}),
		CapturesDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "zeroscale_syn_captures_dropped_total", Help: "Captured SYNs dropped because a parked address held too many.",
		}),
		DryRunDecisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeroscale_dry_run_decisions_total", Help: "What dry_run mode would have done.",
		}, []string{"action"}),
		GroupsByPhase: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "zeroscale_groups", Help: "Gated groups by phase.",
		}, []string{"phase"}),
		Repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeroscale_repairs_total",
			Help: "Differences the reconciler found between the world and a record or the gate, by what it set (a phase, or orphan_entry).",
		}, []string{"to"}),
		Forwards: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "zeroscale_forwards",
			Help: "Parked addresses this node forwards to where their group woke (another port or node).",
		}),
		ForwardedConnections: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "zeroscale_forwarded_connections_total",
			Help: "Connections to a parked address forwarded to where its group woke.",
		}),
		ForwardGrace: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "zeroscale_forward_grace_seconds",
			Help: "How long after a wake a parked address forwards new connections (forward_grace).",
		}),
		APIRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zeroscale_api_requests_total",
			Help: "Requests this plugin sent to Nomad and Consul (api), blocking queries apart (kind=blocking, else once).",
		}, []string{"api", "kind"}),
		FollowedServices: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "zeroscale_followed_services",
			Help: "Consul services whose instances this node follows (groups settled asleep are not followed until they wake).",
		}),
	}
	reg.MustRegister(m.APIRequests, m.FollowedServices, m.Wakes, m.Sleeps, m.ParkingUndone, m.WakeLatency, m.ParkedAddresses, m.Errors,
		m.Leader, m.Replays, m.CapturesDropped, m.DryRunDecisions, m.GroupsByPhase, m.Repairs,
		m.Forwards, m.ForwardedConnections, m.ForwardGrace)
	return m
}

// CountRequests returns a hook for the API clients' OnRequest that counts
// requests to api ("nomad" or "consul"); a request carrying an index is a
// blocking query.
func (m *Metrics) CountRequests(api string) func(*http.Request) {
	once, blocking := m.APIRequests.WithLabelValues(api, "once"), m.APIRequests.WithLabelValues(api, "blocking")
	return func(r *http.Request) {
		if r.URL.Query().Has("index") {
			blocking.Inc()
			return
		}
		once.Inc()
	}
}
