package command

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hashicorp/nomad/api"
)

// A cluster whose nodes run no zeroscale plugin gets a clear error (the real
// CLI is exercised against real agents in e2e/operator_test.go).
func TestRequireAgentsNamesTheMissingPlugin(t *testing.T) {
	for name, nodes := range map[string]string{
		"no nodes":            `[]`,
		"no zeroscale driver": `[{"ID":"n1","Name":"n1","Drivers":{"docker":{"Detected":true,"Healthy":true}}}]`,
		"unhealthy driver":    `[{"ID":"n1","Name":"n1","Drivers":{"zeroscale":{"Detected":true,"Healthy":false}}}]`,
	} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/v1/nodes" {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("X-Nomad-Index", "1")
			_, _ = w.Write([]byte(nodes))
		}))
		client, err := api.NewClient(&api.Config{Address: srv.URL})
		if err != nil {
			t.Fatal(err)
		}
		err = requireAgents(client)
		srv.Close()
		if err == nil || !strings.Contains(err.Error(), "no Nomad client runs the zeroscale plugin") {
			t.Errorf("%s: %v", name, err)
		}
	}
}
