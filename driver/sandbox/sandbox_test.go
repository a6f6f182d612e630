package sandbox

import (
	"slices"
	"strings"
	"testing"
)

func validSpec() Spec {
	return Spec{
		Version: SpecVersion,
		UID:     65534,
		GID:     65534,
		Hide:    "/var/lib/nomad",
		Binds:   []string{"/var/lib/nomad/alloc/A/alloc", "/var/lib/nomad/alloc/A/web"},
		Dir:     "/var/lib/nomad/alloc/A/web",
	}
}

func TestSpecValidation(t *testing.T) {
	cases := []struct {
		name   string
		change func(*Spec)
		want   string
	}{
		{"valid", func(*Spec) {}, ""},
		{"another version", func(s *Spec) { s.Version = 2 }, "spec version 2"},
		{"relative hide", func(s *Spec) { s.Hide = "var/lib/nomad" }, "not absolute"},
		{"unclean bind", func(s *Spec) { s.Binds[0] = "/var/lib/nomad/alloc/../../../etc" }, "not absolute and clean"},
		{"bind outside hide", func(s *Spec) { s.Binds[1] = "/etc" }, `"/etc" is not below`},
		{"bind is hide", func(s *Spec) { s.Binds[1] = s.Hide }, "is not below"},
		{"hide the root", func(s *Spec) { s.Hide = "/" }, "cannot hide /"},
		{"nothing mounted back", func(s *Spec) { s.Binds = nil }, "nothing to mount back"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := validSpec()
			tc.change(&s)
			err := s.Validate()
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("validate: %v, want %q", err, tc.want)
			}
		})
	}
}

func TestArgsRoundTrip(t *testing.T) {
	s := validSpec()
	args, err := Args(&s, []string{"/bin/sh", "-c", "echo --"})
	if err != nil {
		t.Fatal(err)
	}
	if args[0] != Command {
		t.Fatalf("argv[1] %q", args[0])
	}
	got, argv, err := parseArgs(args[1:])
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(argv, []string{"/bin/sh", "-c", "echo --"}) || got.Hide != s.Hide || !slices.Equal(got.Binds, s.Binds) {
		t.Fatalf("parsed %+v %q", got, argv)
	}
	if _, _, err := parseArgs([]string{"{}", "/bin/sh"}); err == nil {
		t.Fatal("parsed arguments without --")
	}
}

// The launcher is root and dynamically linked: the task's variables must
// reach it only renamed, and nothing but them reach the command.
func TestTaskEnvironmentOnlyRenamedThroughTheLauncher(t *testing.T) {
	task := []string{"LD_PRELOAD=/alloc/evil.so", "GODEBUG=x=1", "PATH=/bin"}
	launcher := Env(task)
	for _, kv := range launcher {
		if !strings.HasPrefix(kv, EnvPrefix) {
			t.Fatalf("the launcher sees %q as it is", kv)
		}
	}
	got := taskEnv(append(launcher, "LD_LIBRARY_PATH=/host"))
	if !slices.Equal(got, task) {
		t.Fatalf("the command gets %q, want %q", got, task)
	}
}
