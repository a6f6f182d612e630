package driver

import (
	"sync"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	pstructs "github.com/hashicorp/nomad/plugins/shared/structs"
	"github.com/zeroscale/nomad-driver-zeroscale/driver/sandbox"
)

// taskStateVersion is stored in every task handle; RecoverTask refuses state
// written by a version it does not know instead of misreading it.
//
//   - 1: the executor ran the command as the task's user, unisolated.
//   - 2: the executor ran our sandbox launcher as root (Sandbox says how it
//     isolated the task); commands exec'd in the task must go through it too.
const (
	taskStateVersion   = 2
	taskStateVersionV1 = 1
)

// TaskState is what Nomad keeps for us across client and plugin restarts:
// enough to reattach to the executor that supervises the task.
type TaskState struct {
	ReattachConfig *pstructs.ReattachConfig
	TaskConfig     *drivers.TaskConfig
	Pid            int
	StartedAt      time.Time
	Sandbox        *sandbox.Spec // since version 2
}

// taskStore maps task IDs to live handles.
type taskStore struct {
	mu    sync.RWMutex
	tasks map[string]*taskHandle
}

func newTaskStore() *taskStore {
	return &taskStore{tasks: make(map[string]*taskHandle)}
}

func (s *taskStore) Set(id string, h *taskHandle) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tasks[id] = h
}

func (s *taskStore) Get(id string) (*taskHandle, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	h, ok := s.tasks[id]
	return h, ok
}

func (s *taskStore) Delete(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.tasks, id)
}

// All returns the live handles.
func (s *taskStore) All() []*taskHandle {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*taskHandle, 0, len(s.tasks))
	for _, h := range s.tasks {
		out = append(out, h)
	}
	return out
}
