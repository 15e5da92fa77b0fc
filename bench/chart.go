package bench

import (
	"fmt"
	"html"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Chart geometry, in SVG user units (pixels).
const (
	chartWidth  = 920
	chartLabelW = 150 // server names, left of the bars
	chartValueW = 190 // the value (and spread) right of the longest bar
	chartBarH   = 16
	chartBarGap = 5
	chartTitleH = 58
	chartRowH   = 26 // a row's heading
	chartRowGap = 14
	chartFootH  = 40
)

// Bar fills by role: the primary stands out, other blockd configurations
// share its hue, peers are grey, a ceiling is an outline.
var chartFill = map[string]string{
	"primary":   "#1f5fa8",
	RoleBlockd:  "#7aa6d6",
	RolePeer:    "#a0a0a0",
	RoleCeiling: "none",
}

func (r *Report) role(server string) string {
	if server == r.Primary {
		return "primary"
	}
	if ro := r.Roles[server]; ro != "" {
		return ro
	}
	return RolePeer
}

// WriteSVG draws the matrix as a bar chart, one panel per row: every
// server's median IOPS as a bar on the row's own scale (rows differ by
// orders of magnitude), its rounds' range as a whisker, and the value. A
// cell that failed or did not run is named instead of drawn. The SVG is
// self-contained (no scripts, no external fonts or styles).
func (r *Report) WriteSVG(w io.Writer) error {
	barW := float64(chartWidth - chartLabelW - chartValueW - 20)
	height := chartTitleH + chartFootH
	for range r.Rows {
		height += chartRowH + len(r.Servers)*(chartBarH+chartBarGap) + chartRowGap
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n",
		chartWidth, height, chartWidth, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#ffffff"/>`+"\n", chartWidth, height)
	title := "blockd and peers: IOPS per fio row (median of rounds; whiskers: min–max)"
	fmt.Fprintf(&b, `<text x="10" y="22" font-size="15" font-weight="bold">%s</text>`+"\n", esc(title))
	sub := fmt.Sprintf("%s · %s, %d CPUs, kernel %s, %s", r.Started.UTC().Format("2006-01-02 15:04Z"),
		r.Host.Hostname, r.Host.CPUs, r.Host.Kernel, r.Host.FioVersion)
	fmt.Fprintf(&b, `<text x="10" y="42" fill="#555">%s</text>`+"\n", esc(sub))

	y := chartTitleH
	for _, row := range r.Rows {
		job := ""
		if res, ok := r.firstResult(row.Name); ok {
			job = fmt.Sprintf(" — %s, bs %s, %d×%d in flight", row.RW, blockSize(row.BS), res.Job.Jobs, res.Job.IODepth)
		}
		fmt.Fprintf(&b, `<text x="10" y="%d" font-weight="bold">%s</text><text x="%d" y="%d" fill="#555">%s</text>`+"\n",
			y+16, esc(row.Name), 10+7*len(row.Name)+10, y+16, esc(strings.TrimPrefix(job, " — ")))
		y += chartRowH
		top := 0.0
		for _, s := range r.Servers {
			if res, ok := r.Lookup(row.Name, s); ok && res.Err == "" {
				top = max(top, res.IOPS, slices.Max(append([]float64{0}, res.Samples...)))
			}
		}
		for _, s := range r.Servers {
			role := r.role(s)
			fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", chartLabelW-8, y+chartBarH-4, esc(s))
			res, ok := r.Lookup(row.Name, s)
			switch {
			case !ok:
				fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#999">%s</text>`+"\n", chartLabelW, y+chartBarH-4, esc(r.whyMissing(s)))
			case res.Err != "" || top <= 0:
				fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#b00">error: %s</text>`+"\n", chartLabelW, y+chartBarH-4, esc(firstLine(res.Err)))
			default:
				wd := barW * res.IOPS / top
				stroke := ""
				if role == RoleCeiling {
					stroke = ` stroke="#333" stroke-width="1.5" stroke-dasharray="4 2"`
				}
				fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"%s><title>%s %s: %s IOPS</title></rect>`+"\n",
					chartLabelW, y, wd, chartBarH, chartFill[role], stroke, esc(row.Name), esc(s), fmtIOPS(res.IOPS))
				value := fmtIOPS(res.IOPS) + " IOPS"
				right := wd
				if len(res.Samples) > 1 {
					lo, hi := slices.Min(res.Samples), slices.Max(res.Samples)
					x0, x1 := float64(chartLabelW)+barW*lo/top, float64(chartLabelW)+barW*hi/top
					mid := float64(y) + chartBarH/2
					fmt.Fprintf(&b, `<path d="M%.1f %.1fH%.1fM%.1f %.1fV%.1fM%.1f %.1fV%.1f" stroke="#222" fill="none"/>`+"\n",
						x0, mid, x1, x0, mid-4, mid+4, x1, mid-4, mid+4)
					value += fmt.Sprintf(" (%s–%s)", fmtIOPS(lo), fmtIOPS(hi))
					right = max(right, x1-float64(chartLabelW))
				}
				if res.ServerCPUPerIO > 0 {
					value += fmt.Sprintf(", %.1f µs CPU/IO", res.ServerCPUPerIO)
				}
				fmt.Fprintf(&b, `<text x="%.1f" y="%d">%s</text>`+"\n", float64(chartLabelW)+right+6, y+chartBarH-4, esc(value))
			}
			y += chartBarH + chartBarGap
		}
		y += chartRowGap
	}
	// Legend.
	x := 10
	for _, l := range []struct{ role, text string }{
		{"primary", r.Primary + " (memory volume)"},
		{RoleBlockd, "other blockd volumes"},
		{RolePeer, "peer NBD servers"},
		{RoleCeiling, "ceiling: fio on the disk, no NBD"},
	} {
		stroke := ""
		if l.role == RoleCeiling {
			stroke = ` stroke="#333" stroke-dasharray="4 2"`
		}
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="14" height="12" fill="%s"%s/><text x="%d" y="%d">%s</text>`+"\n",
			x, y+8, chartFill[l.role], stroke, x+20, y+18, esc(l.text))
		x += 40 + 7*len(l.text)
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func (r *Report) firstResult(row string) (Result, bool) {
	for _, res := range r.Results {
		if res.Row == row && res.Err == "" {
			return res, true
		}
	}
	return Result{}, false
}

// blockSize writes a block size as fio's rows are named: 4k, 1M.
func blockSize(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dM", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dk", n>>10)
	}
	return fmt.Sprint(n)
}

func esc(s string) string { return html.EscapeString(s) }

// SaveSVG writes the chart to dir/<started>.svg, next to Save's JSON, and
// copies it to dir/latest.svg (which bench/README.md shows), and returns
// the first path.
func (r *Report) SaveSVG(dir string) (string, error) {
	var b strings.Builder
	if err := r.WriteSVG(&b); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("save chart: %w", err)
	}
	path := filepath.Join(dir, r.Started.UTC().Format("20060102T150405Z")+".svg")
	for _, p := range []string{path, filepath.Join(dir, "latest.svg")} {
		if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
			return "", fmt.Errorf("save chart: %w", err)
		}
	}
	return path, nil
}
