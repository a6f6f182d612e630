package scaling

import (
	"testing"

	"github.com/hashicorp/nomad/api"
)

func TestServiceNameResolvesTheJobsVariables(t *testing.T) {
	id, name, ns := "web-preview-42", "web", "staging"
	job := &api.Job{ID: &id, Name: &name, Namespace: &ns}
	for _, c := range []struct{ in, task, want string }{
		{"plain", "", "plain"},
		{"${NOMAD_JOB_NAME}", "", "web"},
		{"${NOMAD_JOB_ID}-api", "", "web-preview-42-api"},
		{"${NOMAD_NAMESPACE}-${NOMAD_GROUP_NAME}", "", "staging-front"},
		{"${JOB}-${TASKGROUP}-${TASK}", "nginx", "web-front-nginx"},
		{"${BASE}", "nginx", "web-front-nginx"},
		{"${BASE}", "", "web-front"},
		// Per-node variables are not the job's to resolve: left as written.
		{"${node.unique.name}-web", "", "${node.unique.name}-web"},
	} {
		if got := serviceName(c.in, job, "front", c.task); got != c.want {
			t.Errorf("serviceName(%q, task %q) = %q, want %q", c.in, c.task, got, c.want)
		}
	}
	unnamed := &api.Job{ID: &id}
	if got := serviceName("${NOMAD_JOB_NAME}", unnamed, "front", ""); got != id {
		t.Errorf("a job without a name: %q, want its ID %q", got, id)
	}
}
