package scaling

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

// FuzzParsePolicy feeds policy blocks of any shape, as JSON (the form Nomad
// stores them in): a malformed policy is an error naming a field under
// scaling.*, never a panic, and an accepted one is usable.
func FuzzParsePolicy(f *testing.F) {
	for _, seed := range []string{
		`{"idle_timeout":"10m","wake_count":1,"wake_timeout":"2m","ready":"listen"}`,
		`[{"idle_timeout":"90s","wake_count":2.0,"ready":"healthy"}]`,
		`{"idle_timeout":"ten minutes"}`,
		`{"idle_timeout":10}`,
		`{"wake_count":"2"}`,
		`{"wake_count":1.5}`,
		`{"wake_count":-1}`,
		`{"wake_count":1e300}`,
		`{"ready":true}`,
		`{"sleep":"now"}`,
		`[{},{}]`,
		`[]`,
		`null`,
		`"zeroscale"`,
		`{"idle_timeout":"-5s","wake_timeout":"9999999999h"}`,
	} {
		f.Add(seed, int64(3))
	}
	f.Fuzz(func(t *testing.T, block string, max int64) {
		var v any
		if json.Unmarshal([]byte(block), &v) != nil {
			return
		}
		p := zeroscalePolicy("p", web, 1, nil)
		p.Max = &max
		p.Policy = map[string]any{PolicyBlock: v}
		got, err := ParsePolicy(p)
		if err != nil {
			var pe *PolicyError
			if !errors.As(err, &pe) || !strings.HasPrefix(pe.Field, "scaling") {
				t.Fatalf("error %v does not name a scaling field", err)
			}
			return
		}
		if got.IdleTimeout < time.Second || got.WakeTimeout < time.Second || got.WakeCount < 1 ||
			int64(got.WakeCount) > max || (got.Ready != ReadyListen && got.Ready != ReadyHealthy) {
			t.Fatalf("accepted an unusable policy %+v from %s (max %d)", got, block, max)
		}
	})
}
