//! Min / median / max over runs, targets, the terminal table,
//! `report.json`, `docs/PERFORMANCE.md` and the hand-written SVG chart.
//!
//! Every figure is a value and, for most, a baseline measured in the same
//! run (direct sockets, the relay thread, the same series at fewer VMs).
//! Ratios are taken per run (value / baseline of that run); a target is
//! judged on the median over the runs, of the ratio or of the value.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::figures::{Metrics, Volumes, FANOUT_SESSIONS, STDOUT_SIZES};
use crate::series::Series;

/// Runs a target needs before its verdict counts (with fewer it is
/// provisional).
pub const RUNS_FOR_VERDICT: usize = 5;

/// The target of the daemon's CPU per GiB of stdout (4096-byte messages),
/// seconds.
const CPU_PER_GIB_TARGET: f64 = 0.2;

/// A target for a figure.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// value / baseline must be at least this.
    RatioMin(f64),
    /// value / baseline must be at most this.
    RatioMax(f64),
    /// The value must be at most this.
    Max(f64),
}

impl Target {
    fn text(self, unit: &str) -> String {
        match self {
            Self::RatioMin(v) => format!(">= {v}x"),
            Self::RatioMax(v) => format!("<= {v}x"),
            Self::Max(v) => format!("<= {v} {unit}"),
        }
    }

    fn met(self, value: f64, ratio: Option<f64>) -> bool {
        match (self, ratio) {
            (Self::RatioMin(t), Some(r)) => r >= t,
            (Self::RatioMax(t), Some(r)) => r <= t,
            (Self::Max(t), _) => value <= t,
            _ => false,
        }
    }
}

/// Minimum, median and maximum of a figure over the runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Largest.
    pub max: f64,
}

impl Stat {
    /// Of the finite values of `v`; `None` if there are none.
    pub fn of(v: &[f64]) -> Option<Self> {
        let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        Some(Self {
            min: s[0],
            median: median(&s),
            max: s[s.len() - 1],
        })
    }
}

/// Values of one figure over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct Runs {
    /// The figure, per run.
    pub value: Vec<f64>,
    /// Its baseline, per run (empty if none).
    pub baseline: Vec<f64>,
    /// value / baseline, per run that has both.
    pub ratio: Vec<f64>,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Stable key.
    pub id: String,
    /// What it is.
    pub label: String,
    /// Unit of the values.
    pub unit: &'static str,
    /// The figure (through the proxy, unless the label says otherwise).
    pub value: Stat,
    /// What it is compared with (`direct`, `relay thread`, `10 VMs`…).
    pub baseline_name: Option<&'static str>,
    /// The baseline, measured in the same runs.
    pub baseline: Option<Stat>,
    /// value / baseline of the same run, over the runs.
    pub ratio: Option<Stat>,
    /// The target, if the figure has one.
    pub target: Option<Target>,
    /// The target as text.
    pub target_text: Option<String>,
    /// Whether the target is met, on the medians (`None`: no target, or
    /// not judged: `--quick`, `--only`).
    pub pass: Option<bool>,
    /// Every run's values.
    pub runs: Runs,
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The values of `key` in every run that has it.
pub fn series_of(runs: &[Metrics], key: &str) -> Vec<f64> {
    runs.iter().filter_map(|m| m.get(key).copied()).collect()
}

/// A row before the runs are looked at.
struct Spec {
    id: String,
    label: String,
    unit: &'static str,
    key: String,
    base: Option<(&'static str, String)>,
    target: Option<Target>,
}

fn spec(
    id: impl Into<String>,
    label: impl Into<String>,
    unit: &'static str,
    key: impl Into<String>,
    base: Option<(&'static str, String)>,
    target: Option<Target>,
) -> Spec {
    Spec {
        id: id.into(),
        label: label.into(),
        unit,
        key: key.into(),
        base,
        target,
    }
}

fn direct(key: &str) -> Option<(&'static str, String)> {
    Some(("direct", key.to_string()))
}

/// The table's rows from every run's metrics; targets are judged only if
/// `judge`.
pub fn rows(runs: &[Metrics], vol: &Volumes, judge: bool) -> Vec<Row> {
    let mut v: Vec<Spec> = Vec::new();
    for size in STDOUT_SIZES {
        let t = match size {
            512 => Some(Target::RatioMin(0.5)),
            4096 => Some(Target::RatioMin(0.7)),
            _ => None,
        };
        v.push(spec(
            format!("stdout_{size}"),
            format!("stdout, {size}-byte io messages"),
            "MiB/s",
            format!("stdout_{size}.proxy"),
            direct(&format!("stdout_{size}.direct")),
            t,
        ));
    }
    v.push(spec(
        "stdin_4096",
        "stdin, 4 KiB frames",
        "MiB/s",
        "stdin_4096.proxy",
        direct("stdin_4096.direct"),
        Some(Target::RatioMin(0.5)),
    ));
    // Hyper: judged against the minimal relay thread of the same blocks
    // (one more hop, nothing else: the floor for any proxy), unpinned and
    // with every thread on one CPU; shown against direct too.
    for (tag, what, t) in [("", "", 1.0), ("_pinned", ", all on one CPU", 1.3)] {
        let k = |p: &str| format!("hyper{tag}_{p}_us");
        v.push(spec(
            k("p50"),
            format!("Hyper ping round trip{what}, p50"),
            "µs",
            format!("{}.proxy", k("p50")),
            direct(&format!("{}.direct", k("p50"))),
            None,
        ));
        v.push(spec(
            k("p99"),
            format!("Hyper ping round trip{what}, p99"),
            "µs",
            format!("{}.proxy", k("p99")),
            Some(("relay thread", format!("{}.relay", k("p99")))),
            Some(Target::RatioMax(t)),
        ));
        v.push(spec(
            format!("{}_vs_direct", k("p99")),
            format!("Hyper ping round trip{what}, p99"),
            "µs",
            format!("{}.proxy", k("p99")),
            direct(&format!("{}.direct", k("p99"))),
            None,
        ));
        for p in ["p50", "p99"] {
            v.push(spec(
                format!("{}_relay_floor", k(p)),
                format!("  minimal relay thread instead of the proxy{what}, {p}"),
                "µs",
                format!("{}.relay", k(p)),
                direct(&format!("{}.direct", k(p))),
                None,
            ));
        }
        if tag.is_empty() {
            v.push(spec(
                "hyper_calls_s",
                "Hyper ping, sequential calls",
                "calls/s",
                "hyper_calls_s.proxy",
                direct("hyper_calls_s.direct"),
                None,
            ));
        }
    }
    let fan = format!(
        "fan-out, {FANOUT_SESSIONS} sessions x {}",
        size_text(vol.fanout_per_session)
    );
    v.push(spec(
        "fanout_threads",
        format!("{fan}, a thread per shim (vs direct stdout 4096)"),
        "MiB/s",
        "fanout_threads.proxy",
        direct("stdout_4096.direct"),
        Some(Target::RatioMin(0.5)),
    ));
    v.push(spec(
        "fanout_threads_vs_relay",
        format!("{fan}, a thread per shim (vs the relay floor)"),
        "MiB/s",
        "fanout_threads.proxy",
        Some(("relay floor", "fanout_relay.proxy".into())),
        Some(Target::RatioMin(1.5)),
    ));
    v.push(spec(
        "fanout_tokio",
        format!("{fan}, shims on one tokio thread"),
        "MiB/s",
        "fanout_tokio.proxy",
        direct("stdout_4096.direct"),
        None,
    ));
    v.push(spec(
        "fanout_relay",
        "  relay floor: a demultiplexing thread instead of the proxy, a thread per shim",
        "MiB/s",
        "fanout_relay.proxy",
        direct("stdout_4096.direct"),
        None,
    ));
    v.push(spec(
        "fanout_ceiling",
        "  ceiling: no proxy, one thread writes each shim's socket 64 KiB at a time, a thread per shim",
        "MiB/s",
        "fanout_ceiling.proxy",
        direct("stdout_4096.direct"),
        None,
    ));
    v.push(spec(
        "storm_ms",
        format!("connect storm, {} shims, all answered", vol.storm),
        "ms",
        "storm_ms.proxy",
        None,
        None,
    ));
    for (k, label, t) in [
        ("rss_idle_mib", "daemon RSS, idle, no VM".to_string(), None),
        (
            "rss_one_vm_mib",
            "daemon RSS, idle, one VM".to_string(),
            Some(Target::Max(3.0)),
        ),
        (
            "rss_1000_shims_mib",
            format!("daemon RSS, {} shims connected", vol.storm),
            Some(Target::Max(8.0)),
        ),
    ] {
        v.push(spec(k, label, "MiB", k, None, t));
        v.push(spec(
            format!("{k}.anon"),
            "  of which anonymous (RssAnon)",
            "MiB",
            format!("{k}.anon"),
            None,
            None,
        ));
    }
    v.push(spec(
        "cpu_run_s",
        "daemon CPU (user+sys) per run",
        "s",
        "cpu_run_s",
        None,
        None,
    ));
    v.push(spec(
        "cpu_stdout_4096",
        "daemon CPU per GiB of stdout, 4096-byte messages",
        "s/GiB",
        "cpu_per_gib.stdout_4096",
        None,
        Some(Target::Max(CPU_PER_GIB_TARGET)),
    ));
    // The same figure against what the job costs a minimal relay thread in
    // the same run (the absolute target is below any copying relay on a
    // small shared host): informative, no target.
    v.push(spec(
        "cpu_stdout_4096_vs_relay",
        "daemon CPU per GiB vs a minimal relay's, 4096-byte messages",
        "s/GiB",
        "cpu_per_gib.stdout_4096",
        Some(("minimal relay", "cpu_per_gib.stdout_4096.relay".into())),
        None,
    ));
    v.push(spec(
        "cpu_stdout_4096_direct",
        "  direct socket pair: its writer's and reader's CPU per GiB (the reader hashes)",
        "s/GiB",
        "cpu_per_gib.stdout_4096.direct",
        None,
        None,
    ));
    // How cost grows (the scaling series; see their own tables).
    for kind in ["idle", "trickle"] {
        v.push(spec(
            format!("fleet_rss_added_per_vm_{kind}"),
            format!("daemon RSS per added VM (2 sessions), 1 to 1000 VMs, {kind}"),
            "KiB",
            format!("fleet.rss_added_kib_per_vm.{kind}"),
            None,
            Some(Target::Max(24.0)),
        ));
    }
    for t in crate::scaling::STREAM_THREADS {
        v.push(spec(
            format!("streams_16_t{t}"),
            format!("stdout, 16 VMs streaming at once, --threads {t} (vs 1 VM)"),
            "MiB/s",
            format!("streams.t{t}.16"),
            Some(("1 VM", format!("streams.t{t}.1"))),
            Some(Target::RatioMin(1.0)),
        ));
    }
    for (kind, what, t) in [
        (
            "rss_per_vm_kib.idle",
            "RSS per VM, idle",
            Some(Target::RatioMax(1.2)),
        ),
        (
            "rss_per_vm_kib.trickle",
            "RSS per VM, trickling",
            Some(Target::RatioMax(1.2)),
        ),
        ("cpu_us_s_per_vm.trickle", "CPU per VM, trickling", None),
        (
            "cpu_us_per_msg.trickle",
            "CPU per trickle message delivered",
            Some(Target::RatioMax(1.2)),
        ),
        ("cpu_us_s_per_vm.idle", "CPU per VM, idle", None),
    ] {
        let unit = if kind.starts_with("rss") {
            "KiB"
        } else if kind.contains("per_msg") {
            "µs"
        } else {
            "µs/s"
        };
        v.push(spec(
            format!("fleet_bend_{}", kind.replace('.', "_")),
            format!("daemon {what}, at 1000 VMs (vs at 10)"),
            unit,
            format!("fleet.{kind}.1000"),
            Some(("10 VMs", format!("fleet.{kind}.10"))),
            t,
        ));
    }

    v.into_iter()
        .filter_map(|sp| {
            let p = series_of(runs, &sp.key);
            // A figure `--only` left out.
            let value = Stat::of(&p)?;
            let (baseline_name, d, ratios) = match &sp.base {
                Some((name, bk)) => {
                    let d = series_of(runs, bk);
                    let ratios: Vec<f64> = runs
                        .iter()
                        .filter_map(|m| Some(m.get(&sp.key)? / m.get(bk)?))
                        .collect();
                    (Some(*name), d, ratios)
                }
                None => (None, Vec::new(), Vec::new()),
            };
            let baseline = Stat::of(&d);
            let ratio = Stat::of(&ratios);
            let pass = sp
                .target
                .filter(|_| judge)
                .map(|t| t.met(value.median, ratio.map(|r| r.median)));
            Some(Row {
                id: sp.id,
                label: sp.label,
                unit: sp.unit,
                value,
                baseline_name: baseline_name.filter(|_| baseline.is_some()),
                baseline,
                ratio,
                target: sp.target,
                target_text: sp.target.map(|t| t.text(sp.unit)),
                pass,
                runs: Runs {
                    value: p,
                    baseline: d,
                    ratio: ratios,
                },
            })
        })
        .collect()
}

/// `4 MiB`, `256 KiB`, `512 B`.
pub fn size_text(b: u64) -> String {
    if b >= 1 << 20 && b % (1 << 20) == 0 {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 && b % (1 << 10) == 0 {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

/// A value in its unit's precision.
pub fn num(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    match unit {
        "MiB/s" | "calls/s" | "msgs/s" => format!("{v:.0}"),
        "MiB" | "s" | "s/GiB" | "ms/s" => format!("{v:.2}"),
        _ => format!("{v:.1}"),
    }
}

/// `median [min–max]`, or the median alone when all runs agree or there
/// is one.
pub fn stat_text(s: &Stat, f: impl Fn(f64) -> String) -> String {
    let (lo, mid, hi) = (f(s.min), f(s.median), f(s.max));
    if lo == hi {
        mid
    } else {
        format!("{mid} [{lo}–{hi}]")
    }
}

fn verdict(r: &Row, repeat: usize) -> String {
    let mark = if repeat < RUNS_FOR_VERDICT { "*" } else { "" };
    match r.pass {
        Some(true) => format!("met{mark}"),
        Some(false) => format!("NOT MET{mark}"),
        None => String::new(),
    }
}

const COLS: usize = 7;

/// Cells of a row: figure, value, baseline name, baseline, ratio, target,
/// verdict.
fn cells(r: &Row, repeat: usize) -> [String; COLS] {
    let n = |v: f64| num(v, r.unit);
    [
        format!("{} ({})", r.label, r.unit),
        stat_text(&r.value, n),
        r.baseline_name.unwrap_or("-").to_string(),
        r.baseline.map_or("-".into(), |b| stat_text(&b, n)),
        r.ratio
            .map_or("-".into(), |x| stat_text(&x, |v| format!("{v:.2}x"))),
        r.target_text.clone().unwrap_or_else(|| "-".into()),
        verdict(r, repeat),
    ]
}

const HEADS: [&str; COLS] = [
    "figure",
    "value: median [min–max]",
    "vs",
    "baseline",
    "ratio",
    "target",
    "verdict",
];

/// The table for a terminal.
pub fn terminal_table(rows: &[Row], repeat: usize) -> String {
    let all: Vec<[String; COLS]> = rows.iter().map(|r| cells(r, repeat)).collect();
    let mut w = HEADS.map(|h| h.chars().count());
    for c in &all {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: &[String; COLS]| -> String {
        let mut s = String::new();
        for (i, cell) in c.iter().enumerate() {
            let pad = w[i] - cell.chars().count();
            if matches!(i, 0 | 2 | 5 | 6) {
                s.push_str(cell);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            }
            s.push_str("  ");
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&HEADS.map(String::from));
    out.push_str(&"-".repeat(w.iter().sum::<usize>() + 2 * (COLS - 1)));
    out.push('\n');
    for c in &all {
        out.push_str(&line(c));
    }
    out
}

/// The table in Markdown.
pub fn markdown_table(rows: &[Row], repeat: usize) -> String {
    let mut out = String::from(
        "| figure | value: median [min–max] | vs | baseline | ratio | target | verdict |\n\
         |---|---:|---|---:|---:|---|---|\n",
    );
    for r in rows {
        let c = cells(r, repeat);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            c[0].strip_prefix("  ")
                .map_or_else(|| c[0].clone(), |rest| format!("↳ {rest}")),
            c[1],
            c[2],
            c[3],
            c[4].replace('x', "×"),
            c[5].replace(">=", "≥").replace("<=", "≤").replace('x', "×"),
            if c[6].is_empty() {
                String::new()
            } else {
                format!("**{}**", c[6])
            }
        );
    }
    out
}

/// The machine the bench ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel, as uname prints it.
    pub kernel: String,
    /// When (UTC, ISO 8601).
    pub date: String,
    /// Total memory, MiB.
    pub mem_mib: u64,
}

impl Machine {
    /// Read it from /proc.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let kernel = format!(
            "{} {} {}",
            read("/proc/sys/kernel/ostype"),
            read("/proc/sys/kernel/osrelease"),
            std::env::consts::ARCH
        );
        let mem_mib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |k| k / 1024);
        Self {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            date: utc_now(),
            mem_mib,
        }
    }
}

/// Now, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The whole report, as written to `report.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Format version.
    pub format: u32,
    /// `--quick`.
    pub quick: bool,
    /// Runs summarised.
    pub repeat: usize,
    /// Bytes and counts of each figure.
    pub volumes: VolumesOut,
    /// Where it ran.
    pub machine: Machine,
    /// The daemon's binary and arguments.
    pub daemon: DaemonOut,
    /// A note at the top of PERFORMANCE.md (`--note`).
    pub note: Option<String>,
    /// The table.
    pub figures: Vec<Row>,
    /// The scaling series.
    pub series: Vec<Series>,
    /// Every run's raw metrics.
    pub runs: Vec<Metrics>,
    /// Figures that missed their target.
    pub misses: Vec<String>,
    /// No target missed.
    pub all_targets_met: bool,
    /// Every byte stream matched end to end.
    pub bytes_ok: bool,
}

/// Volumes, for the report.
#[derive(Debug, Serialize)]
pub struct VolumesOut {
    /// Bytes per throughput figure.
    pub stream_bytes: u64,
    /// Timed Hyper calls.
    pub hyper_calls: usize,
    /// Fan-out sessions.
    pub fanout_sessions: usize,
    /// Bytes per fan-out session.
    pub fanout_bytes_per_session: u64,
    /// Connect-storm shims.
    pub storm_shims: usize,
    /// Fleet series: idle window, seconds.
    pub fleet_idle_s: f64,
    /// Fleet series: trickle window, seconds.
    pub fleet_trickle_s: f64,
    /// Streams series: bytes per step, over all VMs.
    pub streams_total_bytes: u64,
    /// Hyper series: seconds per step.
    pub hyper_window_s: f64,
}

impl From<&Volumes> for VolumesOut {
    fn from(v: &Volumes) -> Self {
        Self {
            stream_bytes: v.stream,
            hyper_calls: v.hyper_calls,
            fanout_sessions: FANOUT_SESSIONS,
            fanout_bytes_per_session: v.fanout_per_session,
            storm_shims: v.storm,
            fleet_idle_s: v.scale.idle.as_secs_f64(),
            fleet_trickle_s: v.scale.trickle.as_secs_f64(),
            streams_total_bytes: v.scale.stream_total,
            hyper_window_s: v.scale.hyper_window.as_secs_f64(),
        }
    }
}

/// The daemon, for the report.
#[derive(Debug, Serialize)]
pub struct DaemonOut {
    /// Path of the binary.
    pub binary: String,
    /// Its arguments (the socket path varies per run).
    pub args: Vec<String>,
}

/// Median CPUs other processes kept busy during the runs.
pub fn other_load(runs: &[Metrics]) -> f64 {
    median(&series_of(runs, "other_load_cpus"))
}

/// `docs/PERFORMANCE.md`.
pub fn performance_md(r: &Report, commit: &str) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(s, "# Performance\n");
    if let Some(note) = &r.note {
        let _ = writeln!(s, "> {note}\n");
    }
    let _ = writeln!(
        s,
        "Measured by `cargo xtask bench` (crate `crates/proxy-bench`): the release \
         `cc-proxy` daemon, started as a child process, against a mock hyperstart agent \
         and mock shims; every figure is paired with a baseline measured in the same run \
         (a direct unix socket pair carrying the same framed messages, a minimal relay \
         thread, or the same series at fewer VMs). Every byte stream is checked end to \
         end (XXH64 of the bytes sent = XXH64 of the bytes received; the scaling \
         series' trickle byte for byte).\n"
    );
    let _ = writeln!(
        s,
        "{} run{}{}, each against fresh daemons. Every figure shows the median and, in \
         brackets, the smallest and the largest of the runs; a ratio is taken within each \
         run (value / baseline of the same run) and then summarised the same way. A \
         target is judged on the median, and counts only with {RUNS_FOR_VERDICT} runs or \
         more (`--repeat {RUNS_FOR_VERDICT}`); verdicts marked * come from fewer runs and \
         are provisional.\n",
        r.repeat,
        if r.repeat == 1 { "" } else { "s" },
        if r.quick { " (`--quick` volumes)" } else { "" }
    );
    let _ = writeln!(s, "## Results\n");
    s.push_str(&markdown_table(&r.figures, r.repeat));
    s.push('\n');
    if r.quick {
        let _ = writeln!(s, "`--quick` volumes: targets not judged.\n");
    } else if r.misses.is_empty() {
        let _ = writeln!(s, "All targets are met.\n");
    } else {
        let _ = writeln!(s, "Targets not met: {}.\n", r.misses.join(", "));
    }
    let _ = writeln!(
        s,
        "![stdout throughput by io message size, proxy vs direct](perf-throughput.svg)\n"
    );
    if !r.series.is_empty() {
        let _ = writeln!(s, "## How cost grows\n");
        for se in &r.series {
            let _ = writeln!(s, "### {}\n", se.title);
            s.push_str(&crate::series::markdown(se));
            s.push('\n');
            if se.chart {
                let _ = writeln!(s, "![{}](perf-{}.svg)\n", se.title, se.id);
            }
        }
    }
    let _ = writeln!(s, "## Machine\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| CPUs (`nproc`) | {} |", m.nproc);
    let _ = writeln!(s, "| CPU | {} |", m.cpu_model);
    let _ = writeln!(s, "| memory | {} MiB |", m.mem_mib);
    let _ = writeln!(s, "| kernel | {} |", m.kernel);
    let _ = writeln!(s, "| date | {} |", m.date);
    let _ = writeln!(
        s,
        "| other load during the runs | {:.2} CPUs busy (median) |",
        other_load(&r.runs)
    );
    if !commit.is_empty() {
        let _ = writeln!(s, "| commit | {commit} |");
    }
    let _ = writeln!(s, "| daemon | `cc-proxy {}` |", r.daemon.args.join(" "));
    s.push('\n');
    let v = &r.volumes;
    let _ = writeln!(s, "## Reproduce\n");
    let _ = writeln!(
        s,
        "```sh\ncargo xtask bench --repeat {RUNS_FOR_VERDICT} --report   # this page and its charts (docs/perf-*.svg)\n\
         cargo xtask bench                        # one run, table only (fails on a target not met)\n\
         cargo xtask bench --quick                # a smoke run; fails only on wrong bytes (CI)\n\
         cargo xtask bench --only fanout,scaling  # some figures, for profiling; nothing judged\n```\n"
    );
    let _ = writeln!(
        s,
        "The raw numbers of every run, the targets and the machine are in \
         `target/bench/report.json`. The bench builds the release `cc-proxy` as it is best \
         shipped, statically linked (`RUSTFLAGS='-C target-feature=+crt-static'`, its own \
         `--target x86_64-unknown-linux-gnu`), and `proxy-bench`, and runs `proxy-bench \
         --cc-proxy target/x86_64-unknown-linux-gnu/release/cc-proxy`; the daemon \
         runs with `-socket-path <tmp>/proxy.sock -log warn -ksm off` and its defaults \
         otherwise (one worker thread, 4 MiB session buffers), except where a series sets \
         `--threads`.\n"
    );
    let _ = writeln!(s, "## What is measured\n");
    let _ = writeln!(
        s,
        "- **stdout**: the agent writes {} of io messages of each size on one session's \
         seq (pre-built, written in 1 MiB chunks); the shim reads stdout frames into a 512 KiB \
         buffer and hashes them. Timed from the first write to the last byte read. Direct: \
         the same io messages through a socket pair, parsed and hashed the same way.",
        size_text(v.stream_bytes)
    );
    let _ = writeln!(
        s,
        "- **CPU per GiB of stdout**: the daemon's on-CPU time (`schedstat`) over the \
         stdout figure at 4096 bytes, per GiB of data. Beside it, in the same run, a \
         minimal relay doing the same job without a proxy: the same io stream, written the \
         same way, through a socket pair to one thread that reads it in 64 KiB reads, \
         parses the io headers and writes every read's worth of messages as stdout frames \
         (the proxy's framing) in one `writev` to another socket pair, read and hashed by \
         the same reader as the proxy's; its figure is that thread's user + system time \
         (`getrusage(RUSAGE_THREAD)`) from its first read to its last write. The ratio \
         daemon / relay is taken within each run and has no target; the target of \
         {CPU_PER_GIB_TARGET} s/GiB stays absolute. Below them, the CPU of the direct \
         pair's writer and reader threads, for scale (the reader hashes what it reads). \
         `report.json` has each of these threads' CPU seconds (`thread_cpu.*`)."
    );
    let _ = writeln!(
        s,
        "- **stdin**: the shim writes {} as 4 KiB stdin frames; the agent reads the io \
         messages the daemon makes of them. Direct: the same stdin frames through a socket pair.",
        size_text(v.stream_bytes)
    );
    let _ = writeln!(
        s,
        "- **Hyper**: {} sequential `ping` calls with data `{{}}` (after a warm-up), each \
         answered by the agent's ACK; p50/p99 of the round trip and calls per second. \
         The p99 is judged against a minimal relay thread in the same blocks: the same \
         frames relayed unparsed, with blocking reads and writes (one more hop each way and \
         nothing else, the floor for any proxy). Direct: the same request frame to a peer \
         that answers with a response frame of the same size. All of it again with the \
         daemon and every thread of the bench pinned to one CPU. Blocks of proxy, direct \
         and relayed calls alternate.",
        v.hyper_calls
    );
    let _ = writeln!(
        s,
        "- **fan-out**: {n} sessions on one VM, {} each; the agent interleaves 4096-byte \
         messages of every session on io. Every cc-shim is its own process, so the judged \
         row reads each session with its own OS thread (blocking 1 MiB reads on a std \
         `UnixStream` that sent ConnectShim). Second row: the {n} shims as tasks of one \
         tokio thread (the earlier model: one reader that drains every socket in turn lets \
         the proxy's writes coalesce, which flatters it). Relay floor: no proxy; the same \
         io stream through a socket pair to one thread that reads it in 1 MiB reads and \
         writes each io message as one stdout frame (`writev`) to its session's socket \
         pair, read by the same {n} OS threads. Aggregate MiB/s; every session hashed.",
        size_text(v.fanout_bytes_per_session),
        n = v.fanout_sessions,
    );
    let _ = writeln!(
        s,
        "- **connect storm**: RegisterVM with {n} tokens, then {n} connections each sending \
         ConnectShim (tokens are claimable before their process starts); time until every \
         one is answered.",
        n = v.storm_shims
    );
    let _ = writeln!(
        s,
        "- **RSS**: VmRSS of `/proc/<pid>/status`, idle right after start, idle with one \
         VM registered (5 tokens), and with the storm's {} shims connected. VmRSS counts \
         every resident page of the binary and of libc, which other processes share; \
         `report.json` also has RssAnon, RssFile and Pss for each. **CPU**: utime + stime \
         of `/proc/<pid>/stat` for the whole run (clock-tick resolution); per figure, \
         `report.json` has the daemon's on-CPU time from `schedstat` (`cpu.*`), the \
         bench's own (`harness_cpu.*`) and the daemon's write syscalls \
         (`daemon_writes.*`, from `/proc/<pid>/io`).",
        v.storm_shims
    );
    let _ = writeln!(
        s,
        "- **fleet** (how cost grows): a fresh daemon; VMs are added to 1, 10, 100 and \
         1000, each with 2 sessions (a shim connected with ConnectShim, a process started \
         with newcontainer). The agents and shims of all the VMs are tasks of one tokio \
         runtime (two worker threads) in the bench (two listening unix sockets per VM, dialled by the daemon). \
         At each step: {} idle, then {} with a trickle on every session (one {}-byte io \
         message every {} ms), each shim checking every byte it gets. RSS is VmRSS at the \
         end of each window; CPU is the daemon's on-CPU time over the window (`schedstat`, \
         nanoseconds; utime + stime of `/proc/<pid>/stat` is in `report.json` as \
         `fleet.cpu_ticks_ms_s.*`, but its 10 ms ticks are too coarse for the idle \
         windows). Per VM: (RSS − RSS before the first VM) / VMs and CPU / VMs. The RSS \
         per added VM is (RSS at 1000 − RSS at 1) / 999. The idle windows of later steps \
         follow the earlier steps' trickle, so buffers a session kept count there. Where \
         the bench, sharing the CPUs, delivers less than the offered trickle (see the \
         delivered rate), CPU per VM understates the cost; the CPU bend is therefore \
         judged per message delivered.",
        secs_text(v.fleet_idle_s),
        secs_text(v.fleet_trickle_s),
        crate::scaling::TRICKLE_BYTES,
        crate::scaling::TRICKLE_EVERY.as_millis()
    );
    let _ = writeln!(
        s,
        "- **streams**: a fresh daemon with `--threads 1`, another with `--threads 2`; \
         1, 4, 16 and 64 VMs stream at once, one session each, {} of 4096-byte io \
         messages in all per step (split between the VMs); every agent writer and every \
         shim reader is its own OS thread. Aggregate MiB/s from the first write to the \
         last byte; every stream hashed.",
        size_text(v.streams_total_bytes)
    );
    let _ = writeln!(
        s,
        "- **Hyper calls per second**: 1, 8 and 64 runtimes (connections, each an OS \
         thread making sequential `ping` calls) for {} each: all attached to one VM \
         (one agent answering them in turn), and each on its own VM.",
        secs_text(v.hyper_window_s)
    );
    let _ = writeln!(
        s,
        "\nThe bench and the daemon share the machine's {} CPUs: through the proxy, three \
         busy threads (agent writer, daemon, shim reader) share them, where the direct \
         baseline has two; with 64 shim threads, more.",
        m.nproc
    );
    let _ = writeln!(s, "\n## Reading the figures\n");
    let load = other_load(&r.runs);
    if load > 0.2 {
        let _ = writeln!(
            s,
            "- **This machine was not quiet**: other processes kept {load:.2} of its {} CPUs \
             busy during the runs (median). Every figure that needs CPU time is disturbed, \
             throughput and tail latency most; the spread columns show by how much.",
            m.nproc
        );
    }
    let row = |id: &str| r.figures.iter().find(|f| f.id == id);
    let med = |id: &str| row(id).map_or(f64::NAN, |f| f.value.median);
    let _ = writeln!(
        s,
        "- **Fan-out, real shims.** With a thread per shim, cc-proxy reached {:.0} MiB/s; \
         with the same shims as tasks of one tokio thread, {:.0} MiB/s; the relay floor, \
         {:.0} MiB/s (medians). The two reader models differ in what they let the \
         proxy do: one thread draining all 64 sockets in turn reads late, so the proxy's \
         writes to one shim can pile up and go out in large batches; 64 blocking readers \
         each wake as soon as their socket has data, as real cc-shim processes do, so \
         writes stay small. The relay thread writes one frame per io message and wakes a \
         reader per message: the cost of demultiplexing without any batching. The \
         ceiling, {:.0} MiB/s, has no proxy at all: one thread writes each session's \
         frames straight to its socket, 64 KiB at a time, under the same 64 reader \
         threads. No proxy can pass it (a proxy also reads the agent's socket: one \
         more copy in and one more out per byte).",
        med("fanout_threads"),
        med("fanout_tokio"),
        med("fanout_relay"),
        med("fanout_ceiling"),
    );
    let _ = writeln!(
        s,
        "- **Hyper calls per second, one runtime.** One runtime on one VM and one runtime \
         on its own VM are the same setup; where their figures differ, that is where the \
         kernel happened to place the three threads of a call (runtime, daemon, agent) for \
         the window, not a difference of the daemon. Where the fleet's idle CPU is \
         zero, no thread of the daemon ran at all in the idle windows (no on-CPU time in \
         `schedstat`); its bend is then not defined and not judged."
    );
    let _ = writeln!(
        s,
        "- **Spread.** Single runs of the same figure differ by up to 2× on this class of \
         machine (where the kernel places three or more busy threads on two vCPUs); \
         judge by the median of {RUNS_FOR_VERDICT} runs, and read the brackets."
    );
    s
}

fn secs_text(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.0} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

/// The SVG chart of stdout MiB/s by message size, proxy vs direct.
pub fn throughput_svg(rows: &[Row], repeat: usize) -> String {
    let data: Vec<(usize, f64, f64)> = STDOUT_SIZES
        .iter()
        .filter_map(|&size| {
            let r = rows.iter().find(|r| r.id == format!("stdout_{size}"))?;
            Some((
                size,
                r.value.median,
                r.baseline.map_or(f64::NAN, |b| b.median),
            ))
        })
        .collect();
    let (w, h) = (720.0_f64, 400.0_f64);
    let (left, right, top, bottom) = (70.0, 20.0, 64.0, 60.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max = data
        .iter()
        .flat_map(|&(_, p, d)| [p, d])
        .filter(|v| v.is_finite())
        .fold(1.0_f64, f64::max);
    let step = nice_step(max / 5.0);
    let top_v = (max / step).ceil() * step;
    let y = |v: f64| top + plot_h * (1.0 - v / top_v);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{w}" height="{h}" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">stdout throughput by io message size (median of {repeat} run{})</text>"##,
        w / 2.0,
        if repeat == 1 { "" } else { "s" }
    );
    let mut v = 0.0;
    while v <= top_v + step / 2.0 {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#dddddd"/>"##,
            left + plot_w
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            left - 6.0,
            yy + 4.0
        );
        v += step;
    }
    let _ = writeln!(
        s,
        r##"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">MiB/s</text>"##,
        top + plot_h / 2.0,
        top + plot_h / 2.0
    );
    let groups = data.len().max(1) as f64;
    let gw = plot_w / groups;
    let bw = gw * 0.32;
    for (i, &(size, p, d)) in data.iter().enumerate() {
        let gx = left + gw * i as f64 + gw / 2.0;
        for (k, (val, color)) in [(p, "#2b6cb0"), (d, "#a0aec0")].into_iter().enumerate() {
            if !val.is_finite() {
                continue;
            }
            let x = gx - bw - 2.0 + k as f64 * (bw + 4.0);
            let yy = y(val);
            let _ = writeln!(
                s,
                r##"<rect x="{x:.1}" y="{yy:.1}" width="{bw:.1}" height="{:.1}" fill="{color}"/>"##,
                top + plot_h - yy
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{val:.0}</text>"##,
                x + bw / 2.0,
                yy - 4.0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{size} B</text>"##,
            top + plot_h + 18.0
        );
        if p.is_finite() && d.is_finite() && d > 0.0 {
            let _ = writeln!(
                s,
                r##"<text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555555">{:.2}x</text>"##,
                top + plot_h + 34.0,
                p / d
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333333"/>"##,
        top + plot_h,
        left + plot_w,
        top + plot_h
    );
    let lx = left + 10.0;
    let _ = writeln!(
        s,
        r##"<rect x="{lx}" y="36" width="12" height="12" fill="#2b6cb0"/><text x="{}" y="46">through cc-proxy</text>"##,
        lx + 16.0
    );
    let _ = writeln!(
        s,
        r##"<rect x="{}" y="36" width="12" height="12" fill="#a0aec0"/><text x="{}" y="46">direct socket pair</text>"##,
        lx + 140.0,
        lx + 156.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555555">io message data size (ratio proxy/direct below)</text>"##,
        left + plot_w / 2.0,
        h - 8.0
    );
    s.push_str("</svg>\n");
    s
}

pub(crate) fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let n = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * mag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn date_is_iso() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }

    #[test]
    fn rows_leave_out_figures_without_data_and_judge_the_rest() {
        // What `--only hyper` records: Hyper figures and RSS, no streams.
        let mut runs = Vec::new();
        for (proxy, relay) in [(10.0, 12.0), (30.0, 10.0), (11.0, 10.0)] {
            let mut m = Metrics::new();
            for (k, v) in [
                ("hyper_p99_us.proxy", proxy),
                ("hyper_p99_us.direct", 5.0),
                ("hyper_p99_us.relay", relay),
                ("rss_one_vm_mib", 2.5),
            ] {
                m.insert(k.to_string(), v);
            }
            runs.push(m);
        }
        let rows = rows(&runs, &Volumes::quick(), true);
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "hyper_p99_us",
                "hyper_p99_us_vs_direct",
                "hyper_p99_us_relay_floor",
                "rss_one_vm_mib"
            ]
        );
        // Ratios within each run: 10/12, 30/10, 11/10; the verdict on
        // their median (1.1 > 1.0), not on the ratio of the medians.
        let r = rows[0].ratio.unwrap();
        assert!((r.min - 10.0 / 12.0).abs() < 1e-9);
        assert!((r.median - 1.1).abs() < 1e-9);
        assert!((r.max - 3.0).abs() < 1e-9);
        assert_eq!(rows[0].baseline_name, Some("relay thread"));
        assert_eq!(rows[0].pass, Some(false));
        assert_eq!(rows[0].value.median, 11.0);
        assert_eq!(rows[1].baseline_name, Some("direct"));
        assert_eq!(rows[1].pass, None);
        // The relay floor is reported against the direct pair, not judged.
        assert_eq!(rows[2].ratio.unwrap().median, 2.0);
        assert_eq!(rows[2].pass, None);
        assert_eq!(rows[3].pass, Some(true));
        // Not judged (--quick, --only): no verdicts.
        let rows = super::rows(&runs, &Volumes::quick(), false);
        assert!(rows.iter().all(|r| r.pass.is_none()));
        let t = terminal_table(&rows, 3);
        assert!(t.contains("11.0 [10.0–30.0]"), "{t}");
    }

    #[test]
    fn cpu_against_the_relay_has_a_ratio_per_run_and_no_verdict() {
        let mut runs = Vec::new();
        for (daemon, relay) in [(0.6, 0.3), (0.5, 0.5), (0.9, 0.3)] {
            let mut m = Metrics::new();
            m.insert("cpu_per_gib.stdout_4096".into(), daemon);
            m.insert("cpu_per_gib.stdout_4096.relay".into(), relay);
            m.insert("cpu_per_gib.stdout_4096.direct".into(), 0.4);
            runs.push(m);
        }
        let rows = rows(&runs, &Volumes::quick(), true);
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "cpu_stdout_4096",
                "cpu_stdout_4096_vs_relay",
                "cpu_stdout_4096_direct"
            ]
        );
        // The absolute target is judged as before.
        assert_eq!(rows[0].pass, Some(false));
        assert!(rows[0].baseline.is_none());
        let r = &rows[1];
        assert_eq!(r.baseline_name, Some("minimal relay"));
        assert_eq!(r.value.median, 0.6);
        assert_eq!(r.baseline.unwrap().median, 0.3);
        // 2, 1 and 3 within the runs.
        let ratio = r.ratio.unwrap();
        assert!((ratio.min - 1.0).abs() < 1e-9);
        assert!((ratio.median - 2.0).abs() < 1e-9);
        assert!((ratio.max - 3.0).abs() < 1e-9);
        assert!(r.target.is_none());
        assert_eq!(r.pass, None);
        assert_eq!(rows[2].pass, None);
        let t = terminal_table(&rows, 3);
        assert!(t.contains("2.00x [1.00x–3.00x]"), "{t}");
    }

    #[test]
    fn targets() {
        assert!(Target::RatioMin(0.6).met(1.0, Some(0.7)));
        assert!(!Target::RatioMin(0.6).met(1.0, Some(0.5)));
        assert!(Target::RatioMax(2.5).met(1.0, Some(2.0)));
        assert!(Target::Max(3.0).met(2.9, None));
        assert!(!Target::Max(3.0).met(3.1, None));
    }
}
