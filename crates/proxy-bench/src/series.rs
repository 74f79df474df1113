//! The scaling series as tables (terminal, Markdown) and hand-written SVG
//! line charts: the median of the runs at each point, with a whisker from
//! the smallest to the largest.

use std::fmt::Write as _;

use serde::Serialize;

use crate::figures::Metrics;
use crate::report::{num, series_of, stat_text, Stat};
use crate::scaling::{
    FLEET_SESSIONS, FLEET_VMS, HYPER_RUNTIMES, STREAM_THREADS, STREAM_VMS, TRICKLE_EVERY,
};

/// One line of a series: a value at each x.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// Its name in the legend and the table's heading.
    pub name: String,
    /// Metric key of each point: `<key>.<x>`.
    pub key: String,
    /// Min / median / max at each x (`None`: not measured).
    pub points: Vec<Option<Stat>>,
}

/// A scaling series.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Stable key; the chart is `docs/perf-<id>.svg` if `chart`.
    pub id: &'static str,
    /// What it shows.
    pub title: String,
    /// What x counts.
    pub x_name: &'static str,
    /// The x values.
    pub xs: Vec<usize>,
    /// Unit of the values.
    pub unit: &'static str,
    /// The lines.
    pub lines: Vec<Line>,
    /// Whether it has a chart.
    pub chart: bool,
}

/// id, title, x name, xs, unit, chart, lines (name, key, scale).
type Def = (
    &'static str,
    String,
    &'static str,
    Vec<usize>,
    &'static str,
    bool,
    Vec<(String, String, f64)>,
);

/// Every series that has data in `runs`.
pub fn all(runs: &[Metrics]) -> Vec<Series> {
    let fleet = FLEET_VMS.to_vec();
    let kinds = |prefix: &str, scale: f64| -> Vec<(String, String, f64)> {
        [("idle", "idle"), ("trickle", "trickling")]
            .iter()
            .map(|(k, name)| (name.to_string(), format!("{prefix}.{k}"), scale))
            .collect()
    };
    let defs: Vec<Def> = vec![
        (
            "fleet-rss",
            "daemon RSS with N VMs, 2 sessions each".into(),
            "VMs",
            fleet.clone(),
            "MiB",
            false,
            kinds("fleet.rss_kib", 1.0 / 1024.0),
        ),
        (
            "fleet-rss-per-vm",
            "daemon RSS per VM: (RSS − RSS with no VM) / VMs".into(),
            "VMs",
            fleet.clone(),
            "KiB",
            true,
            kinds("fleet.rss_per_vm_kib", 1.0),
        ),
        (
            "fleet-cpu",
            "daemon CPU with N VMs, 2 sessions each (ms of CPU per s)".into(),
            "VMs",
            fleet.clone(),
            "ms/s",
            false,
            kinds("fleet.cpu_ms_s", 1.0),
        ),
        (
            "fleet-cpu-per-vm",
            "daemon CPU per VM (µs of CPU per s)".into(),
            "VMs",
            fleet.clone(),
            "µs/s",
            true,
            kinds("fleet.cpu_us_s_per_vm", 1.0),
        ),
        (
            "fleet-trickle",
            format!(
                "trickle messages delivered per second (offered: {} per VM)",
                FLEET_SESSIONS as u128 * 1000 / TRICKLE_EVERY.as_millis().max(1)
            ),
            "VMs",
            FLEET_VMS.to_vec(),
            "msgs/s",
            false,
            vec![("delivered".into(), "fleet.trickle_msgs_s".into(), 1.0)],
        ),
        (
            "streams",
            "aggregate stdout, N VMs streaming at once (4096-byte io messages)".into(),
            "VMs",
            STREAM_VMS.to_vec(),
            "MiB/s",
            true,
            STREAM_THREADS
                .iter()
                .map(|t| (format!("--threads {t}"), format!("streams.t{t}"), 1.0))
                .collect(),
        ),
        (
            "hyper",
            "Hyper ping calls per second, N runtimes calling at once".into(),
            "runtimes",
            HYPER_RUNTIMES.to_vec(),
            "calls/s",
            true,
            vec![
                ("on one VM".into(), "hyperscale.one_vm".into(), 1.0),
                ("on N VMs".into(), "hyperscale.sep_vms".into(), 1.0),
            ],
        ),
    ];
    defs.into_iter()
        .filter_map(|(id, title, x_name, xs, unit, chart, lines)| {
            let lines: Vec<Line> = lines
                .into_iter()
                .map(|(name, key, scale)| {
                    let points = xs
                        .iter()
                        .map(|x| {
                            let v: Vec<f64> = series_of(runs, &format!("{key}.{x}"))
                                .into_iter()
                                .map(|v| v * scale)
                                .collect();
                            Stat::of(&v)
                        })
                        .collect();
                    Line { name, key, points }
                })
                .collect();
            lines
                .iter()
                .any(|l| l.points.iter().any(Option::is_some))
                .then_some(Series {
                    id,
                    title,
                    x_name,
                    xs,
                    unit,
                    lines,
                    chart,
                })
        })
        .collect()
}

fn cell(p: &Option<Stat>, unit: &str) -> String {
    p.as_ref()
        .map_or_else(|| "-".into(), |s| stat_text(s, |v| num(v, unit)))
}

/// A series as a Markdown table.
pub fn markdown(s: &Series) -> String {
    let mut out = format!("| {} |", s.x_name);
    for l in &s.lines {
        let _ = write!(out, " {} ({}) |", l.name, s.unit);
    }
    out.push_str("\n|---:|");
    for _ in &s.lines {
        out.push_str("---:|");
    }
    out.push('\n');
    for (i, x) in s.xs.iter().enumerate() {
        let _ = write!(out, "| {x} |");
        for l in &s.lines {
            let _ = write!(out, " {} |", cell(&l.points[i], s.unit));
        }
        out.push('\n');
    }
    out
}

/// A series for a terminal.
pub fn terminal(s: &Series) -> String {
    let mut out = format!("{} ({}):\n", s.title, s.unit);
    let mut rows = vec![std::iter::once(s.x_name.to_string())
        .chain(s.lines.iter().map(|l| l.name.clone()))
        .collect::<Vec<_>>()];
    for (i, x) in s.xs.iter().enumerate() {
        rows.push(
            std::iter::once(x.to_string())
                .chain(s.lines.iter().map(|l| cell(&l.points[i], s.unit)))
                .collect(),
        );
    }
    let cols = rows[0].len();
    let w: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = String::from("  ");
        for (c, v) in r.iter().enumerate() {
            line.push_str(&" ".repeat(w[c] - v.chars().count()));
            line.push_str(v);
            line.push_str("   ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

const COLORS: [&str; 3] = ["#2b6cb0", "#dd6b20", "#38a169"];

/// A series as an SVG line chart: x evenly spaced (the series grow by
/// factors), y from 0; medians joined, whiskers from min to max.
pub fn svg(s: &Series, repeat: usize) -> String {
    let (w, h) = (720.0_f64, 400.0_f64);
    let (left, right, top, bottom) = (80.0, 30.0, 70.0, 56.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max = s
        .lines
        .iter()
        .flat_map(|l| l.points.iter().flatten().map(|p| p.max))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let step = crate::report::nice_step(if max > 0.0 { max / 5.0 } else { 1.0 });
    let top_v = ((max / step).ceil() * step).max(step);
    let y = |v: f64| top + plot_h * (1.0 - v.max(0.0) / top_v);
    let n = s.xs.len().max(1);
    let x = |i: usize| {
        if n == 1 {
            left + plot_w / 2.0
        } else {
            left + 20.0 + (plot_w - 40.0) * i as f64 / (n - 1) as f64
        }
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(o, r##"<rect width="{w}" height="{h}" fill="#ffffff"/>"##);
    let _ = writeln!(
        o,
        r##"<text x="{}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"##,
        w / 2.0,
        esc(&s.title)
    );
    let _ = writeln!(
        o,
        r##"<text x="{}" y="40" text-anchor="middle" fill="#555555">median of {repeat} run{}; whiskers: min to max</text>"##,
        w / 2.0,
        if repeat == 1 { "" } else { "s" }
    );
    let mut v = 0.0;
    while v <= top_v + step / 2.0 {
        let yy = y(v);
        let _ = writeln!(
            o,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#dddddd"/>"##,
            left + plot_w
        );
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 6.0,
            yy + 4.0,
            tick(v, step)
        );
        v += step;
    }
    let _ = writeln!(
        o,
        r##"<text x="18" y="{c:.1}" text-anchor="middle" transform="rotate(-90 18 {c:.1})">{}</text>"##,
        esc(s.unit),
        c = top + plot_h / 2.0
    );
    let _ = writeln!(
        o,
        r##"<line x1="{left}" y1="{b:.1}" x2="{:.1}" y2="{b:.1}" stroke="#333333"/>"##,
        left + plot_w,
        b = top + plot_h
    );
    for (i, xv) in s.xs.iter().enumerate() {
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{xv}</text>"##,
            x(i),
            top + plot_h + 18.0
        );
    }
    let _ = writeln!(
        o,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555555">{} (each step a multiple of the last)</text>"##,
        left + plot_w / 2.0,
        h - 10.0,
        s.x_name
    );
    for (k, l) in s.lines.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, Stat)> = l
            .points
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (x(i), p)))
            .collect();
        let path: Vec<String> = pts
            .iter()
            .map(|(xx, p)| format!("{xx:.1},{:.1}", y(p.median)))
            .collect();
        let _ = writeln!(
            o,
            r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"##,
            path.join(" ")
        );
        for (xx, p) in &pts {
            let (y0, y1) = (y(p.min), y(p.max));
            let _ = writeln!(
                o,
                r##"<line x1="{xx:.1}" y1="{y0:.1}" x2="{xx:.1}" y2="{y1:.1}" stroke="{color}"/><line x1="{:.1}" y1="{y0:.1}" x2="{:.1}" y2="{y0:.1}" stroke="{color}"/><line x1="{:.1}" y1="{y1:.1}" x2="{:.1}" y2="{y1:.1}" stroke="{color}"/>"##,
                xx - 4.0,
                xx + 4.0,
                xx - 4.0,
                xx + 4.0
            );
            let ym = y(p.median);
            let _ = writeln!(
                o,
                r##"<circle cx="{xx:.1}" cy="{ym:.1}" r="3.5" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="11" fill="{color}">{}</text>"##,
                xx + 6.0,
                ym - 6.0 + 14.0 * k as f64,
                num(p.median, s.unit)
            );
        }
        let lx = left + 10.0 + 170.0 * k as f64;
        let _ = writeln!(
            o,
            r##"<rect x="{lx}" y="50" width="12" height="12" fill="{color}"/><text x="{}" y="60">{}</text>"##,
            lx + 16.0,
            esc(&l.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

fn tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_with_data_get_tables_and_charts() {
        let mut runs = Vec::new();
        for k in 0..3 {
            let mut m = Metrics::new();
            for (x, v) in [(1, 10.0), (4, 30.0), (16, 35.0), (64, 20.0)] {
                m.insert(format!("streams.t1.{x}"), v + k as f64);
            }
            runs.push(m);
        }
        let s = all(&runs);
        assert_eq!(s.len(), 1, "only the series with data");
        assert_eq!(s[0].id, "streams");
        let md = markdown(&s[0]);
        assert!(md.contains("| 4 | 31 [30–32] | - |"), "{md}");
        let svg = svg(&s[0], 3);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("--threads 1"));
    }
}
