package bpf

import "fmt"

// ListLimits are the capacities of the kernel maps behind the plugin's
// lists: a longer list cannot be applied, so configuration must refuse it
// (failing closed) rather than gate with part of it.
type ListLimits struct {
	WakeFrom         int
	IgnoreSources    int
	CheckerProcesses int
}

// Limits reads the capacities from the embedded BPF object, so they cannot
// drift from the maps the kernel gets.
func Limits() (ListLimits, error) {
	spec, err := loadZeroscale()
	if err != nil {
		return ListLimits{}, fmt.Errorf("read embedded BPF object: %w", err)
	}
	size := func(name string) (int, error) {
		m, ok := spec.Maps[name]
		if !ok {
			return 0, fmt.Errorf("read map limits: no map %q in the BPF object", name)
		}
		return int(m.MaxEntries), nil
	}
	var l ListLimits
	if l.WakeFrom, err = size(zeroscaleMapWakeFrom); err != nil {
		return l, err
	}
	if l.IgnoreSources, err = size(zeroscaleMapIgnoreSources); err != nil {
		return l, err
	}
	if l.CheckerProcesses, err = size(zeroscaleMapCheckerComms); err != nil {
		return l, err
	}
	return l, nil
}
