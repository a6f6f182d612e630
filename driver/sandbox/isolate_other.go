//go:build !linux

package sandbox

import "errors"

// DefaultCapabilities is empty where there is no sandbox.
var DefaultCapabilities = map[int]string{}

func isolate(*Spec) error { return errors.New("the sandbox runs only on Linux") }

func execCommand([]string, []string) int { return ExitSetup }

// LandlockABI is 0: no Landlock outside Linux.
func LandlockABI() int { return 0 }
