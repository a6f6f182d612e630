package bpf

import (
	"bufio"
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
)

// MapMemory is the kernel memory each of the gate's maps holds, by map
// name, as the kernel charges it (memlock in the map's fdinfo): what the
// gate costs a node, whatever limits it runs under.
func (g *Gate) MapMemory() (map[string]uint64, error) {
	out := make(map[string]uint64)
	maps := reflect.ValueOf(g.objs.zeroscaleMaps)
	for i := range maps.NumField() {
		m, ok := maps.Field(i).Interface().(*ebpf.Map)
		if !ok || m == nil {
			continue
		}
		name := maps.Type().Field(i).Tag.Get("ebpf")
		n, err := memlock(m.FD())
		if err != nil {
			return nil, fmt.Errorf("read the memory of map %s: %w", name, err)
		}
		out[name] = n
	}
	return out, nil
}

// memlock reads the "memlock:" line of a map's fdinfo.
func memlock(fd int) (uint64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/self/fdinfo/%d", fd))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "memlock:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("no memlock line in fdinfo %d", fd)
}
