// Package examples holds the client config and job files users start from;
// this test keeps them well-formed (the e2e suite runs and validates the
// jobs against a real Nomad agent).
package examples

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclparse"
)

func TestExamplesParse(t *testing.T) {
	files, err := filepath.Glob("jobs/*.hcl")
	if err != nil || len(files) < 4 {
		t.Fatalf("example jobs: %v %v", files, err)
	}
	files = append(files, "agent.hcl")
	parser := hclparse.NewParser()
	for _, f := range files {
		if _, diags := parser.ParseHCLFile(f); diags.HasErrors() {
			t.Errorf("%s: %s", f, diags.Error())
		}
	}
}

var staticPort = regexp.MustCompile(`static\s+= var\.port`)

// The jobs gate well only with a zeroscale policy, a count, a static port
// and a node pin; check each says so.
func TestExampleJobsFollowTheRules(t *testing.T) {
	files, _ := filepath.Glob("jobs/*.hcl")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		src := string(b)
		for _, want := range []string{"zeroscale {", "count = 1", `attribute = "${node.unique.name}"`, "min     = 0"} {
			if !strings.Contains(src, want) {
				t.Errorf("%s lacks %q", f, want)
			}
		}
		// hclfmt aligns the = of a block's attributes.
		if !staticPort.MatchString(src) {
			t.Errorf("%s lacks a static port (static = var.port)", f)
		}
	}
}

func TestAgentConfigNamesThePlugin(t *testing.T) {
	b, err := os.ReadFile("agent.hcl")
	if err != nil {
		t.Fatal(err)
	}
	file, diags := hclparse.NewParser().ParseHCL(b, "agent.hcl")
	if diags.HasErrors() {
		t.Fatal(diags)
	}
	content, _, diags := file.Body.PartialContent(&hcl.BodySchema{
		Blocks: []hcl.BlockHeaderSchema{{Type: "plugin", LabelNames: []string{"name"}}},
	})
	if diags.HasErrors() {
		t.Fatal(diags)
	}
	if len(content.Blocks) != 1 || content.Blocks[0].Labels[0] != "nomad-driver-zeroscale" {
		t.Fatalf("plugin blocks %+v", content.Blocks)
	}
}
