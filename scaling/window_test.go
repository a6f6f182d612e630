package scaling

import (
	"strings"
	"testing"
	"time"
)

func TestWindowContains(t *testing.T) {
	berlin, err := time.LoadLocation("Europe/Berlin")
	if err != nil {
		t.Fatal(err)
	}
	at := func(loc *time.Location, day, hh, mm int) time.Time {
		// 2026-11-30 is a Monday.
		return time.Date(2026, 11, 30+day, hh, mm, 0, 0, loc)
	}
	for _, c := range []struct {
		window string
		t      time.Time
		want   bool
	}{
		{"Mon-Fri 08:00-19:00 Europe/Berlin", at(berlin, 0, 8, 0), true},
		{"Mon-Fri 08:00-19:00 Europe/Berlin", at(berlin, 0, 7, 59), false},
		{"Mon-Fri 08:00-19:00 Europe/Berlin", at(berlin, 0, 19, 0), false},
		{"Mon-Fri 08:00-19:00 Europe/Berlin", at(berlin, 5, 12, 0), false},  // Saturday
		{"Mon-Fri 08:00-19:00 Europe/Berlin", at(time.UTC, 0, 7, 30), true}, // 08:30 in Berlin
		{"Fri-Mon 22:00-02:00", at(time.UTC, 0, 1, 59), true},               // Monday morning after Sunday
		{"Fri 22:00-02:00", at(time.UTC, 5, 1, 0), true},                    // Saturday 01:00, after Friday
		{"Fri 22:00-02:00", at(time.UTC, 4, 1, 0), false},                   // Friday 01:00: Thursday's night
		{"* 00:00-24:00", at(time.UTC, 2, 23, 59), true},
		{"Mon,Wed 10:00-11:00", at(time.UTC, 2, 10, 30), true},
		{"Mon,Wed 10:00-11:00", at(time.UTC, 1, 10, 30), false},
	} {
		w, err := ParseWindow(c.window)
		if err != nil {
			t.Fatalf("%q: %v", c.window, err)
		}
		if got := w.Contains(c.t); got != c.want {
			t.Errorf("%q contains %v: %v, want %v", c.window, c.t, got, c.want)
		}
	}
}

func TestWindowErrorsSayWhatIsWrong(t *testing.T) {
	for in, want := range map[string]string{
		"Mon-Fri":                         "DAYS HH:MM-HH:MM",
		"Mo 08:00-19:00":                  `"Mo" is not a day`,
		"Mon 8-19":                        `"8" is not a time`,
		"Mon 08:00-25:00":                 `"25:00" is not a time`,
		"Mon 08:00-08:00":                 "starts and ends",
		"Mon 08:00-09:00 Mars/Olympus":    "unknown time zone",
		"Mon 08:00-09:00 UTC extra words": "DAYS HH:MM-HH:MM",
	} {
		_, err := ParseWindow(in)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseWindow(%q) = %v, want an error saying %q", in, err, want)
		}
	}
}
