package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/lifeboat-dr/lifeboat/protect"
)

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// size prints a byte count the way people read them.
func size(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// age prints how long ago, to the second.
func age(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	return d.Round(time.Second).String()
}

// progressLine shows a cycle's progress on one line of a terminal, or a line
// every few seconds elsewhere.
type progressLine struct {
	w     io.Writer
	tty   bool
	start time.Time
	last  time.Time
	shown bool
	await time.Time // when a finalize began waiting for the VM to run at production
}

func newProgressLine(w *os.File) *progressLine {
	return &progressLine{w: w, tty: isTerminal(w), start: time.Now()}
}

// isTerminal reports whether f is a terminal (progress is redrawn in place there).
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func (p *progressLine) show(pr protect.Progress) {
	now := time.Now()
	if !p.tty && now.Sub(p.last) < 5*time.Second && (pr.Phase == "send" || pr.Phase == "await") {
		return
	}
	if pr.Phase == "await" {
		if p.await.IsZero() {
			p.await = now
		}
		p.last = now
		p.line(fmt.Sprintf("vm %s: handed over; waiting for it to run at its production site and replicate (%s)", pr.VM, now.Sub(p.await).Round(time.Second)))
		return
	}
	p.last = now
	pct := 100.0
	if pr.Total > 0 {
		pct = float64(pr.Done) * 100 / float64(pr.Total)
	}
	el := now.Sub(p.start).Seconds()
	rate := 0.0
	if el > 0 {
		rate = float64(pr.Done) / el
	}
	if pr.Phase == "snapshot" {
		p.line(fmt.Sprintf("vm %s: taking the instant of every disk", pr.VM))
		return
	}
	p.line(fmt.Sprintf("vm %s point %d: %-8s %s / %s (%.0f%%), sent %s, %s/s", pr.VM, pr.Point, pr.Phase,
		size(pr.Done), size(pr.Total), pct, size(pr.Sent), size(int64(rate))))
}

// line shows one progress line: in place on a terminal, else as a line.
func (p *progressLine) line(line string) {
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", line)
		p.shown = true
	} else {
		fmt.Fprintln(p.w, line)
	}
}

func (p *progressLine) done() {
	if p.tty && p.shown {
		fmt.Fprint(p.w, "\r\033[K")
	}
}
