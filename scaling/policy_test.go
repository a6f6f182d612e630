package scaling

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
)

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func TestParsePolicyDefaultsAndShapes(t *testing.T) {
	for name, shape := range map[string]any{
		"list of maps": []any{map[string]any{}},
		"map":          map[string]any{},
		"empty block":  nil,
	} {
		p := zeroscalePolicy("p", web, 1, nil)
		p.Policy = map[string]any{"zeroscale": shape}
		got, err := ParsePolicy(p)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got.IdleTimeout != 10*time.Minute || got.WakeCount != 1 || got.WakeTimeout != 2*time.Minute || got.Ready != ReadyListen {
			t.Fatalf("%s: defaults %+v", name, got)
		}
		if got.Target != web {
			t.Fatalf("%s: target %+v", name, got.Target)
		}
	}
	p := zeroscalePolicy("p", web, 1, map[string]any{"idle_timeout": "90s", "wake_count": float64(2), "wake_timeout": "30s", "ready": "healthy"})
	got, err := ParsePolicy(p)
	if err != nil {
		t.Fatal(err)
	}
	if got.IdleTimeout != 90*time.Second || got.WakeCount != 2 || got.WakeTimeout != 30*time.Second || got.Ready != ReadyHealthy {
		t.Fatalf("parsed %+v", got)
	}
}

func TestParsePolicyErrorsNameTheField(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*api.ScalingPolicy)
		field  string
	}{
		{"bad duration", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"idle_timeout": "ten minutes"} }, "scaling.policy.zeroscale.idle_timeout"},
		{"number duration", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"wake_timeout": 30} }, "scaling.policy.zeroscale.wake_timeout"},
		{"too short", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"idle_timeout": "10ms"} }, "scaling.policy.zeroscale.idle_timeout"},
		{"wake_count above max", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"wake_count": 4} }, "scaling.policy.zeroscale.wake_count"},
		{"wake_count zero", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"wake_count": 0} }, "scaling.policy.zeroscale.wake_count"},
		{"wake_count fraction", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"wake_count": 1.5} }, "scaling.policy.zeroscale.wake_count"},
		{"wake_count string", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"wake_count": "1"} }, "scaling.policy.zeroscale.wake_count"},
		{"ready", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"ready": "soon"} }, "scaling.policy.zeroscale.ready"},
		{"typo", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"idle_timout": "1m"} }, "scaling.policy.zeroscale.idle_timout"},
		{"two blocks", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = []any{map[string]any{}, map[string]any{}} }, "scaling.policy.zeroscale"},
		{"not a block", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = "yes" }, "scaling.policy.zeroscale"},
		{"min not zero", func(p *api.ScalingPolicy) { p.Min = ptr(int64(1)) }, "scaling.min"},
		{"min unset", func(p *api.ScalingPolicy) { p.Min = nil }, "scaling.min"},
		{"max unset", func(p *api.ScalingPolicy) { p.Max = nil }, "scaling.max"},
		{"no target", func(p *api.ScalingPolicy) { p.Target = map[string]string{} }, "scaling"},
		{"vertical", func(p *api.ScalingPolicy) { p.Type = "vertical_cpu" }, "scaling.type"},
		{"bad window", func(p *api.ScalingPolicy) {
			p.Policy["zeroscale"] = map[string]any{"awake_during": []any{"Mon-Fri 08:00-19:00", "Someday 9-5"}}
		}, "scaling.policy.zeroscale.awake_during[1]"},
		{"window not a list of strings", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"awake_during": 8} }, "scaling.policy.zeroscale.awake_during"},
		{"wake_with not JOB/GROUP", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"wake_with": []any{"postgres"}} }, "scaling.policy.zeroscale.wake_with[0]"},
		{"protocols unknown", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"protocols": []any{"tcp", "sctp"}} }, "scaling.policy.zeroscale.protocols[1]"},
		{"protocols twice", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"protocols": []any{"udp", "udp"}} }, "scaling.policy.zeroscale.protocols[1]"},
		{"protocols empty", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"protocols": []any{}} }, "scaling.policy.zeroscale.protocols"},
		{"protocols not strings", func(p *api.ScalingPolicy) { p.Policy["zeroscale"] = map[string]any{"protocols": 17} }, "scaling.policy.zeroscale.protocols"},
		{"wake_with itself", func(p *api.ScalingPolicy) {
			p.Policy["zeroscale"] = map[string]any{"wake_with": []any{p.Target["Job"] + "/" + p.Target["Group"]}}
		}, "scaling.policy.zeroscale.wake_with[0]"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := zeroscalePolicy("p", web, 1, map[string]any{})
			tc.mutate(p)
			_, err := ParsePolicy(p)
			pe, ok := err.(*PolicyError)
			if !ok {
				t.Fatalf("err %v (%T), want a PolicyError", err, err)
			}
			if pe.Field != tc.field {
				t.Fatalf("field %q, want %q (%v)", pe.Field, tc.field, err)
			}
			if !strings.HasPrefix(err.Error(), tc.field+": ") {
				t.Fatalf("message %q does not start with the field", err)
			}
		})
	}
	if HasZeroscaleBlock(&api.ScalingPolicy{Policy: map[string]any{"check": nil}}) {
		t.Fatal("an autoscaler policy was taken for ours")
	}
}

func TestParsePolicyProtocols(t *testing.T) {
	p, err := ParsePolicy(zeroscalePolicy("p", web, 1, map[string]any{}))
	if err != nil || !slices.Equal(p.Protocols, []bpf.Protocol{bpf.TCP}) {
		t.Fatalf("default protocols %v %v, want tcp", p.Protocols, err)
	}
	p, err = ParsePolicy(zeroscalePolicy("p", web, 1, map[string]any{"protocols": []any{"UDP", "tcp"}}))
	if err != nil || !slices.Equal(p.Protocols, []bpf.Protocol{bpf.UDP, bpf.TCP}) {
		t.Fatalf("protocols %v %v, want udp, tcp", p.Protocols, err)
	}
}
