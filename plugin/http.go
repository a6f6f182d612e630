package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/scaling"
)

// The operator API on the agent's listener (metrics_address), beside
// /metrics:
//
//	GET  /v1/status                                  every gated group, JSON
//	POST /v1/groups/{namespace}/{job}/{group}/wake   with X-Nomad-Token
//	POST /v1/groups/{namespace}/{job}/{group}/sleep  with X-Nomad-Token
//
// Wake and sleep act with the caller's Nomad token, never the plugin's: Nomad
// accepts them only from a token that may scale the job.
type operatorAPI struct {
	nomadAddress string

	mu     sync.Mutex
	scaler *scaling.Agent // nil until the scaler runs
}

func (o *operatorAPI) setScaler(a *scaling.Agent) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.scaler = a
}

func (o *operatorAPI) register(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/status", o.status)
	mux.HandleFunc("POST /v1/groups/{namespace}/{job}/{group}/{action}", o.act)
}

func (o *operatorAPI) status(w http.ResponseWriter, r *http.Request) {
	o.mu.Lock()
	scaler := o.scaler
	o.mu.Unlock()
	if scaler == nil {
		writeError(w, http.StatusServiceUnavailable, "the node agent is starting: waiting for Nomad and Consul")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	st, err := scaler.Status(ctx)
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (o *operatorAPI) act(w http.ResponseWriter, r *http.Request) {
	id := scaling.GroupID{Namespace: r.PathValue("namespace"), Job: r.PathValue("job"), Group: r.PathValue("group")}
	token := r.Header.Get("X-Nomad-Token")
	if token == "" {
		token = strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	}
	cfg := api.DefaultConfig()
	if o.nomadAddress != "" {
		cfg.Address = o.nomadAddress
	}
	cfg.SecretID = token
	client, err := api.NewClient(cfg)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	by := "the HTTP API of " + r.Host
	switch r.PathValue("action") {
	case "wake":
		count, scaled, err := scaling.RequestWake(client, id, by)
		if err != nil {
			writeError(w, statusOf(err), err.Error())
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"count": count, "scaled": scaled})
	case "sleep":
		if err := scaling.RequestSleep(client, id, by); err != nil {
			writeError(w, statusOf(err), err.Error())
			return
		}
		writeJSON(w, http.StatusAccepted, map[string]any{"requested": true})
	default:
		writeError(w, http.StatusNotFound, "unknown action "+r.PathValue("action")+" (want wake or sleep)")
	}
}

// statusOf maps an operator error to an HTTP status.
func statusOf(err error) int {
	switch {
	case errors.Is(err, scaling.ErrUnknownJob), errors.Is(err, scaling.ErrUnknownGroup), errors.Is(err, scaling.ErrNoPolicy):
		return http.StatusNotFound
	case strings.Contains(err.Error(), "403"):
		return http.StatusForbidden
	}
	return http.StatusBadGateway
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]string{"error": msg})
}
