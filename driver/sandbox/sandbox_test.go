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
		Root:    []string{"/bin", "/etc", "/usr"},
		Binds: []Bind{
			{Source: "/var/lib/nomad/alloc/A/alloc", Target: "/var/lib/nomad/alloc/A/alloc"},
			{Source: "/var/lib/nomad/alloc/A/web", Target: "/var/lib/nomad/alloc/A/web"},
		},
		Dir: "/var/lib/nomad/alloc/A/web",
	}
}

func TestSpecValidation(t *testing.T) {
	cases := []struct {
		name   string
		change func(*Spec)
		want   string
	}{
		{"valid", func(*Spec) {}, ""},
		{"another version", func(s *Spec) { s.Version = 1 }, "spec version 1"},
		{"relative root path", func(s *Spec) { s.Root[0] = "bin" }, "not absolute"},
		{"unclean bind", func(s *Spec) { s.Binds[0].Source = "/var/lib/nomad/alloc/../../../etc" }, "not absolute and clean"},
		{"bind in a read-only host dir", func(s *Spec) { s.Binds[1].Target = "/etc/web" }, `"/etc/web" meets "/etc"`},
		{"bind holding a read-only host dir", func(s *Spec) { s.Root = append(s.Root, s.Binds[1].Target+"/bin") }, `web" meets "/var/lib/nomad/alloc/A/web/bin"`},
		{"nested binds", func(s *Spec) { s.Binds[1].Target = s.Binds[0].Target + "/web" }, "nest"},
		{"the host's root", func(s *Spec) { s.Root = []string{"/"} }, `"/" meets /dev`},
		{"the host's /dev", func(s *Spec) { s.Root = append(s.Root, "/dev/shm") }, "meets /dev"},
		{"tmp over the task dir", func(s *Spec) { s.TmpTargets = []string{"/var/lib"} }, `tmp target "/var/lib" meets`},
		{"tmpfs in the task dir", func(s *Spec) { s.Tmpfs = []string{s.Dir + "/tmp"} }, "lies in"},
		{"no task dir", func(s *Spec) { s.Binds = nil }, "no task dir"},
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
	if !slices.Equal(argv, []string{"/bin/sh", "-c", "echo --"}) || !slices.Equal(got.Root, s.Root) || !slices.Equal(got.Binds, s.Binds) {
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
