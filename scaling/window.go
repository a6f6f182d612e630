package scaling

import (
	"fmt"
	"strings"
	"time"
)

// Window is a weekly time window of awake_during, such as
// "Mon-Fri 08:00-19:00 Europe/Berlin": days, a time range (which may cross
// midnight: its end then falls on the next day) and a time zone from the
// system's tzdata (UTC when left out).
type Window struct {
	Days       [7]bool // by time.Weekday
	Start, End int     // minutes after midnight
	Loc        *time.Location
	Source     string
}

var weekdays = map[string]time.Weekday{
	"sun": time.Sunday, "mon": time.Monday, "tue": time.Tuesday, "wed": time.Wednesday,
	"thu": time.Thursday, "fri": time.Friday, "sat": time.Saturday,
}

// ParseWindow reads "DAYS HH:MM-HH:MM [ZONE]"; DAYS is "*", a day ("Mon"),
// a range ("Mon-Fri", "Fri-Mon") or a comma list of those ("Mon,Wed-Thu").
func ParseWindow(s string) (Window, error) {
	w := Window{Source: s, Loc: time.UTC}
	f := strings.Fields(s)
	if len(f) < 2 || len(f) > 3 {
		return w, fmt.Errorf("%q: want \"DAYS HH:MM-HH:MM [ZONE]\", as in \"Mon-Fri 08:00-19:00 Europe/Berlin\"", s)
	}
	if err := w.parseDays(f[0]); err != nil {
		return w, fmt.Errorf("%q: %w", s, err)
	}
	from, to, ok := strings.Cut(f[1], "-")
	var err error
	if !ok {
		return w, fmt.Errorf("%q: %q is not a time range HH:MM-HH:MM", s, f[1])
	}
	if w.Start, err = clock(from); err != nil {
		return w, fmt.Errorf("%q: %w", s, err)
	}
	if w.End, err = clock(to); err != nil {
		return w, fmt.Errorf("%q: %w", s, err)
	}
	if w.Start == w.End {
		return w, fmt.Errorf("%q: the window starts and ends at %s (use 00:00-24:00 for a whole day)", s, from)
	}
	if len(f) == 3 {
		if w.Loc, err = time.LoadLocation(f[2]); err != nil {
			return w, fmt.Errorf("%q: unknown time zone %q (from the system's tzdata)", s, f[2])
		}
	}
	return w, nil
}

func (w *Window) parseDays(spec string) error {
	if spec == "*" {
		for d := range w.Days {
			w.Days[d] = true
		}
		return nil
	}
	for _, part := range strings.Split(spec, ",") {
		from, to, isRange := strings.Cut(part, "-")
		a, ok := weekdays[strings.ToLower(from)]
		if !ok {
			return fmt.Errorf("%q is not a day (Mon, Tue, … Sun, or *)", from)
		}
		b := a
		if isRange {
			if b, ok = weekdays[strings.ToLower(to)]; !ok {
				return fmt.Errorf("%q is not a day (Mon, Tue, … Sun, or *)", to)
			}
		}
		for d := a; ; d = (d + 1) % 7 {
			w.Days[d] = true
			if d == b {
				break
			}
		}
	}
	return nil
}

// clock reads HH:MM (24:00 allowed as an end).
func clock(s string) (int, error) {
	var h, m int
	if n, err := fmt.Sscanf(s, "%d:%d", &h, &m); err != nil || n != 2 || len(s) != 5 ||
		h < 0 || m < 0 || m > 59 || h > 24 || h == 24 && m != 0 {
		return 0, fmt.Errorf("%q is not a time HH:MM", s)
	}
	return h*60 + m, nil
}

// Contains tells whether t falls inside the window.
func (w Window) Contains(t time.Time) bool {
	t = t.In(w.Loc)
	m := t.Hour()*60 + t.Minute()
	day := t.Weekday()
	if w.Start < w.End {
		return w.Days[day] && m >= w.Start && m < w.End
	}
	// Across midnight: the evening of a listed day, or the morning after.
	return w.Days[day] && m >= w.Start || w.Days[(day+6)%7] && m < w.End
}

// inWindow tells whether the policy keeps the group awake at t.
func (p *Policy) inWindow(t time.Time) (Window, bool) {
	for _, w := range p.AwakeDuring {
		if w.Contains(t) {
			return w, true
		}
	}
	return Window{}, false
}
