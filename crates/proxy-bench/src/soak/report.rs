//! samples.csv, summary.json, the growth judgement and docs/soak.svg.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::{Args, Sample, Stats};

/// RSS growth beyond this (and 1.5×) between the second and the last
/// quarter of the run is a leak.
const RSS_SLACK_KIB: f64 = 16.0 * 1024.0;
/// Likewise for open fds.
const FD_SLACK: f64 = 64.0;

/// Second- and last-quarter means, and what they say.
#[derive(Debug, Default)]
pub struct Growth {
    pub rss_q2: f64,
    pub rss_q4: f64,
    pub fds_q2: f64,
    pub fds_q4: f64,
    pub failures: Vec<String>,
}

fn mean(s: &[Sample], f: impl Fn(&Sample) -> u64) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    s.iter().map(|x| f(x) as f64).sum::<f64>() / s.len() as f64
}

/// Judge RSS and fds: the last quarter's mean may not exceed both 1.5×
/// the second quarter's and the slack above it.
pub fn growth(samples: &[Sample]) -> Growth {
    let n = samples.len();
    if n < 8 {
        return Growth::default();
    }
    let q2 = &samples[n / 4..n / 2];
    let q4 = &samples[n - n / 4..];
    let mut g = Growth {
        rss_q2: mean(q2, |s| s.rss_kib),
        rss_q4: mean(q4, |s| s.rss_kib),
        fds_q2: mean(q2, |s| s.fds),
        fds_q4: mean(q4, |s| s.fds),
        failures: Vec::new(),
    };
    if g.rss_q4 > 1.5 * g.rss_q2 && g.rss_q4 - g.rss_q2 > RSS_SLACK_KIB {
        g.failures.push(format!(
            "RSS grows: last-quarter mean {:.0} KiB vs second-quarter {:.0} KiB",
            g.rss_q4, g.rss_q2
        ));
    }
    if g.fds_q4 > 1.5 * g.fds_q2 && g.fds_q4 - g.fds_q2 > FD_SLACK {
        g.failures.push(format!(
            "open fds grow: last-quarter mean {:.0} vs second-quarter {:.0}",
            g.fds_q4, g.fds_q2
        ));
    }
    g
}

pub fn write_csv(path: &Path, samples: &[Sample]) -> Result<(), String> {
    let mut s = String::from("t_s,rss_kib,fds,commands,bytes_checked\n");
    for x in samples {
        let _ = writeln!(
            s,
            "{:.1},{},{},{},{}",
            x.t, x.rss_kib, x.fds, x.commands, x.bytes
        );
    }
    std::fs::write(path, s).map_err(|e| format!("{}: {e}", path.display()))
}

#[allow(clippy::too_many_arguments)]
pub fn summary(
    args: &Args,
    kinds: &std::collections::BTreeMap<String, u64>,
    st: &Stats,
    passed: u64,
    failed: u64,
    failures: &[String],
    samples: &[Sample],
    g: &Growth,
    idle_fds: u64,
    end_fds: u64,
    end_rss: u64,
    elapsed: Duration,
) -> serde_json::Value {
    json!({
        "seconds": elapsed.as_secs_f64(),
        "planned_seconds": args.duration.as_secs(),
        "seed": args.seed,
        "vms": args.vms,
        "shims": args.vms * args.slots,
        "passed": passed,
        "failed": failed,
        "failures": failures,
        "failure_kinds": kinds,
        "commands": st.commands.get(),
        "negative_commands": st.negatives.get(),
        "registrations": st.registrations.get(),
        "sessions_completed": st.sessions_done.get(),
        "sessions_cut_by_faults": st.sessions_aborted.get(),
        "reconnects": st.reconnects.get(),
        "slow_reader_pauses": st.pauses.get(),
        "signals": st.signals.get(),
        "agent_ctl_messages": st.agent_ctl.get(),
        "faults": {
            "late_reply": st.fault_late.get(),
            "error_reply": st.fault_error.get(),
            "close_ctl": st.fault_close_ctl.get(),
            "close_io": st.fault_close_io.get(),
            "garbage_ctl": st.fault_garbage_ctl.get(),
            "garbage_io": st.fault_garbage_io.get(),
        },
        "bytes": {
            "output_sent_by_agents": st.output_sent.get(),
            "output_received_by_shims": st.output_received.get(),
            "stdin_sent_by_shims": st.stdin_sent.get(),
            "stdin_received_by_agents": st.stdin_received.get(),
            "lost_at_reconnects": st.lost_bytes.get(),
            "duplicated": st.duplicated_bytes.get(),
        },
        "rss_kib": {
            "first": samples.first().map_or(0, |s| s.rss_kib),
            "max": samples.iter().map(|s| s.rss_kib).max().unwrap_or(0),
            "last": samples.last().map_or(0, |s| s.rss_kib),
            "second_quarter_mean": g.rss_q2,
            "last_quarter_mean": g.rss_q4,
            "after_teardown": end_rss,
        },
        "fds": {
            "idle": idle_fds,
            "max": samples.iter().map(|s| s.fds).max().unwrap_or(0),
            "second_quarter_mean": g.fds_q2,
            "last_quarter_mean": g.fds_q4,
            "after_teardown": end_fds,
        },
        "samples": samples.len(),
    })
}

/// RSS (MiB, left axis) and open fds (right axis) over time.
pub fn svg(samples: &[Sample]) -> String {
    let (w, h) = (760.0f64, 320.0f64);
    let (l, r, t, b) = (64.0, 64.0, 36.0, 44.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let rss_max = nice(
        samples
            .iter()
            .map(|s| s.rss_kib as f64 / 1024.0)
            .fold(1.0, f64::max),
    );
    let fd_max = nice(samples.iter().map(|s| s.fds as f64).fold(1.0, f64::max));
    let x = |tv: f64| l + pw * tv / t_max;
    let y = |v: f64, max: f64| t + ph * (1.0 - v / max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{w}" height="{h}" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="20" text-anchor="middle" font-size="14">cc-proxy under the soak: RSS and open fds ({} s)</text>"##,
        w / 2.0,
        t_max.round()
    );
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let yy = t + ph * (1.0 - f);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#1f77b4">{:.0}</text><text x="{:.1}" y="{:.1}" fill="#d62728">{:.0}</text>"##,
            l + pw,
            l - 6.0,
            yy + 4.0,
            rss_max * f,
            l + pw + 6.0,
            yy + 4.0,
            fd_max * f
        );
        let xx = l + pw * f;
        let _ = writeln!(
            s,
            r##"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{:.0}</text>"##,
            t + ph + 16.0,
            t_max * f
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds</text>"##,
        l + pw / 2.0,
        h - 8.0
    );
    let _ = writeln!(
        s,
        r##"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle" fill="#1f77b4">RSS (MiB)</text>"##,
        t + ph / 2.0,
        t + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" transform="rotate(90 {:.1} {:.1})" text-anchor="middle" fill="#d62728">open fds</text>"##,
        w - 12.0,
        t + ph / 2.0,
        w - 12.0,
        t + ph / 2.0
    );
    for (color, f, max) in [
        (
            "#1f77b4",
            (|s: &Sample| s.rss_kib as f64 / 1024.0) as fn(&Sample) -> f64,
            rss_max,
        ),
        (
            "#d62728",
            (|s: &Sample| s.fds as f64) as fn(&Sample) -> f64,
            fd_max,
        ),
    ] {
        let pts: Vec<String> = samples
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.t), y(f(p), max)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"##,
            pts.join(" ")
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    s.push_str("</svg>\n");
    s
}

/// A round axis maximum at or above `v`.
fn nice(v: f64) -> f64 {
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}
