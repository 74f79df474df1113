//! Medians over runs, targets, the terminal table, `report.json`,
//! `docs/PERFORMANCE.md` and the hand-written SVG chart.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::figures::{Metrics, Volumes, FANOUT_SESSIONS, STDOUT_SIZES};

/// A target for a figure.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// proxy / direct must be at least this.
    RatioMin(f64),
    /// proxy / direct must be at most this.
    RatioMax(f64),
    /// The proxy value must be at most this.
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

    fn met(self, proxy: f64, ratio: Option<f64>) -> bool {
        match (self, ratio) {
            (Self::RatioMin(t), Some(r)) => r >= t,
            (Self::RatioMax(t), Some(r)) => r <= t,
            (Self::Max(t), _) => proxy <= t,
            _ => false,
        }
    }
}

/// Values of one figure over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct Runs {
    /// Through the proxy, per run.
    pub proxy: Vec<f64>,
    /// Direct baseline, per run (empty if none).
    pub direct: Vec<f64>,
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
    /// Median through the proxy.
    pub proxy: f64,
    /// Median of the direct baseline.
    pub direct: Option<f64>,
    /// proxy / direct.
    pub ratio: Option<f64>,
    /// The target, if the figure has one.
    pub target: Option<Target>,
    /// The target as text.
    pub target_text: Option<String>,
    /// Whether the target is met.
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

fn series(runs: &[Metrics], key: &str) -> Vec<f64> {
    runs.iter().filter_map(|m| m.get(key).copied()).collect()
}

/// id, label, unit, proxy key, direct key, target.
type Spec = (
    String,
    String,
    &'static str,
    String,
    Option<String>,
    Option<Target>,
);

/// The table's rows from every run's metrics.
pub fn rows(runs: &[Metrics], vol: &Volumes) -> Vec<Row> {
    let mut spec: Vec<Spec> = Vec::new();
    for size in STDOUT_SIZES {
        let t = (size == 4096).then_some(Target::RatioMin(0.6));
        spec.push((
            format!("stdout_{size}"),
            format!("stdout, {size}-byte io messages"),
            "MiB/s",
            format!("stdout_{size}.proxy"),
            Some(format!("stdout_{size}.direct")),
            t,
        ));
    }
    spec.push((
        "stdin_4096".into(),
        "stdin, 4 KiB frames".into(),
        "MiB/s",
        "stdin_4096.proxy".into(),
        Some("stdin_4096.direct".into()),
        Some(Target::RatioMin(0.5)),
    ));
    for (k, label, unit, t) in [
        ("hyper_p50_us", "Hyper ping round trip, p50", "µs", None),
        (
            "hyper_p99_us",
            "Hyper ping round trip, p99",
            "µs",
            Some(Target::RatioMax(2.5)),
        ),
        (
            "hyper_calls_s",
            "Hyper ping, sequential calls",
            "calls/s",
            None,
        ),
    ] {
        spec.push((
            k.into(),
            label.into(),
            unit,
            format!("{k}.proxy"),
            Some(format!("{k}.direct")),
            t,
        ));
    }
    // Not the proxy: a thread relaying each frame unparsed, with blocking
    // reads and writes. What one more hop costs on this machine, whatever
    // the proxy does: the floor for the Hyper ratio. Then all of it again
    // with every thread on one CPU (no cross-CPU wake-ups). Reported, not
    // judged.
    for (tag, what) in [("", ""), ("_pinned", ", all on one CPU")] {
        for p in ["p50", "p99"] {
            let k = format!("hyper{tag}_{p}_us");
            if !tag.is_empty() {
                spec.push((
                    k.clone(),
                    format!("Hyper ping round trip{what}, {p}"),
                    "µs",
                    format!("{k}.proxy"),
                    Some(format!("{k}.direct")),
                    None,
                ));
            }
            spec.push((
                format!("{k}_relay_floor"),
                format!("  minimal relay thread instead of the proxy{what}, {p}"),
                "µs",
                format!("{k}.relay"),
                Some(format!("{k}.direct")),
                None,
            ));
        }
    }
    spec.push((
        "fanout".into(),
        format!(
            "fan-out, {FANOUT_SESSIONS} sessions x {} (vs direct stdout 4096)",
            size_text(vol.fanout_per_session)
        ),
        "MiB/s",
        "fanout.proxy".into(),
        Some("stdout_4096.direct".into()),
        Some(Target::RatioMin(0.5)),
    ));
    spec.push((
        "storm_ms".into(),
        format!("connect storm, {} shims, all answered", vol.storm),
        "ms",
        "storm_ms.proxy".into(),
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
            Some(Target::Max(12.0)),
        ),
    ] {
        spec.push((k.into(), label.clone(), "MiB", k.into(), None, t));
        spec.push((
            format!("{k}.anon"),
            "  of which anonymous (RssAnon)".to_string(),
            "MiB",
            format!("{k}.anon"),
            None,
            None,
        ));
    }
    spec.push((
        "cpu_run_s".into(),
        "daemon CPU (user+sys) per run".into(),
        "s",
        "cpu_run_s".into(),
        None,
        None,
    ));
    spec.push((
        "cpu_stdout_4096".into(),
        "daemon CPU per GiB of stdout, 4096-byte messages".into(),
        "s/GiB",
        "cpu_per_gib.stdout_4096".into(),
        None,
        None,
    ));

    spec.into_iter()
        .filter_map(|(id, label, unit, pk, dk, target)| {
            let p = series(runs, &pk);
            // A figure `--only` left out.
            if p.is_empty() {
                return None;
            }
            let d = dk.map(|k| series(runs, &k)).unwrap_or_default();
            let proxy = median(&p);
            let direct = (!d.is_empty()).then(|| median(&d));
            let ratio = direct.map(|d| proxy / d);
            let pass = target.map(|t| t.met(proxy, ratio));
            Some(Row {
                id,
                label,
                unit,
                proxy,
                direct,
                ratio,
                target,
                target_text: target.map(|t| t.text(unit)),
                pass,
                runs: Runs {
                    proxy: p,
                    direct: d,
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

fn num(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    match unit {
        "MiB/s" | "calls/s" => format!("{v:.0}"),
        "MiB" | "s" | "s/GiB" => format!("{v:.2}"),
        _ => format!("{v:.1}"),
    }
}

fn verdict(r: &Row) -> &'static str {
    match r.pass {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "",
    }
}

/// Cells of a row: figure, proxy, direct, ratio, target, verdict.
fn cells(r: &Row) -> [String; 6] {
    [
        format!("{} ({})", r.label, r.unit),
        num(r.proxy, r.unit),
        r.direct.map_or("-".into(), |d| num(d, r.unit)),
        r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
        r.target_text.clone().unwrap_or_else(|| "-".into()),
        verdict(r).into(),
    ]
}

const HEADS: [&str; 6] = ["figure", "proxy", "direct", "ratio", "target", ""];

/// The table for a terminal.
pub fn terminal_table(rows: &[Row]) -> String {
    let all: Vec<[String; 6]> = rows.iter().map(cells).collect();
    let mut w = HEADS.map(|h| h.chars().count());
    for c in &all {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: &[String; 6]| -> String {
        let mut s = String::new();
        for (i, cell) in c.iter().enumerate() {
            let pad = w[i] - cell.chars().count();
            if i == 0 || i == 4 || i == 5 {
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
    out.push_str(&"-".repeat(w.iter().sum::<usize>() + 2 * 5));
    out.push('\n');
    for c in &all {
        out.push_str(&line(c));
    }
    out
}

/// The table in Markdown.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | proxy | direct | ratio | target | |\n|---|---:|---:|---:|---|---|\n",
    );
    for r in rows {
        let c = cells(r);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4].replace(">=", "≥").replace("<=", "≤").replace('x', "×"),
            if c[5].is_empty() {
                String::new()
            } else {
                format!("**{}**", c[5])
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
    /// Runs whose medians are reported.
    pub repeat: usize,
    /// Bytes and counts of each figure.
    pub volumes: VolumesOut,
    /// Where it ran.
    pub machine: Machine,
    /// The daemon's binary and arguments.
    pub daemon: DaemonOut,
    /// The table.
    pub figures: Vec<Row>,
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
}

impl From<&Volumes> for VolumesOut {
    fn from(v: &Volumes) -> Self {
        Self {
            stream_bytes: v.stream,
            hyper_calls: v.hyper_calls,
            fanout_sessions: FANOUT_SESSIONS,
            fanout_bytes_per_session: v.fanout_per_session,
            storm_shims: v.storm,
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
    median(&series(runs, "other_load_cpus"))
}

/// `docs/PERFORMANCE.md`.
pub fn performance_md(r: &Report, commit: &str) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(s, "# Performance\n");
    let _ = writeln!(
        s,
        "Measured by `cargo xtask bench` (crate `crates/proxy-bench`): the release \
         `cc-proxy` daemon, started as a child process, against a mock hyperstart agent \
         and mock shims; every figure is paired with a baseline over a direct unix socket \
         pair carrying the same framed messages, in the same run. Every byte stream is \
         checked end to end (XXH64 of the bytes sent = XXH64 of the bytes received).\n"
    );
    let _ = writeln!(
        s,
        "Values are medians of {} run{}{}.\n",
        r.repeat,
        if r.repeat == 1 { "" } else { "s" },
        if r.quick { " (`--quick` volumes)" } else { "" }
    );
    let _ = writeln!(s, "## Results\n");
    s.push_str(&markdown_table(&r.figures));
    s.push('\n');
    if r.misses.is_empty() {
        let _ = writeln!(s, "All targets are met.\n");
    } else {
        let _ = writeln!(s, "Targets missed: {}.\n", r.misses.join(", "));
    }
    let _ = writeln!(
        s,
        "![stdout throughput by io message size, proxy vs direct](perf-throughput.svg)\n"
    );
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
        "```sh\ncargo xtask bench --repeat {} --report   # this page and perf-throughput.svg\n\
         cargo xtask bench                        # one run, table only (fails on a missed target)\n\
         cargo xtask bench --quick                # a few seconds; fails only on wrong bytes (CI)\n\
         cargo xtask bench --only hyper,fanout    # some figures, for profiling; nothing judged\n```\n",
        r.repeat
    );
    let _ = writeln!(
        s,
        "The raw numbers of every run, the targets and the machine are in \
         `target/bench/report.json`. The bench builds the release `cc-proxy` as it is best \
         shipped, statically linked (`RUSTFLAGS='-C target-feature=+crt-static'`, its own \
         `--target x86_64-unknown-linux-gnu`), and `proxy-bench`, and runs `proxy-bench \
         --cc-proxy target/x86_64-unknown-linux-gnu/release/cc-proxy`; the daemon \
         runs with `-socket-path <tmp>/proxy.sock -log warn -ksm off` and its defaults \
         otherwise (one worker thread, 4 MiB session buffers).\n"
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
        "- **stdin**: the shim writes {} as 4 KiB stdin frames; the agent reads the io \
         messages the daemon makes of them. Direct: the same stdin frames through a socket pair.",
        size_text(v.stream_bytes)
    );
    let _ = writeln!(
        s,
        "- **Hyper**: {} sequential `ping` calls with data `{{}}` (after a warm-up), each \
         answered by the agent's ACK; p50/p99 of the round trip and calls per second. \
         Direct: the same request frame to a peer that answers with a response frame of the \
         same size. Reported next to them (not judged): the same calls through a minimal \
         relay thread instead of the proxy, and all of it again with the daemon and every \
         thread of the bench pinned to one CPU. Blocks of proxy, direct and relayed calls \
         alternate.",
        v.hyper_calls
    );
    let _ = writeln!(
        s,
        "- **fan-out**: {} sessions on one VM, {} each; the agent interleaves 4096-byte \
         messages of every session on io; {} shims (tokio tasks on one thread) each read and \
         hash their own. Aggregate MiB/s, compared with the direct stdout baseline at 4096 bytes.",
        v.fanout_sessions,
        size_text(v.fanout_bytes_per_session),
        v.fanout_sessions
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
        "\nThe bench and the daemon share the machine's {} CPUs: through the proxy, three \
         busy threads (agent writer, daemon, shim reader) share them, where the direct \
         baseline has two.",
        m.nproc
    );
    let _ = writeln!(s, "\n## Where the misses come from\n");
    let row = |id: &str| r.figures.iter().find(|f| f.id == id);
    let pair = |id: &str| {
        row(id).map_or_else(
            || "(not measured)".to_string(),
            |f| {
                format!(
                    "{:.1} µs against {:.1} µs direct, {:.2}×",
                    f.proxy,
                    f.direct.unwrap_or(f64::NAN),
                    f.ratio.unwrap_or(f64::NAN)
                )
            },
        )
    };
    let _ = writeln!(
        s,
        "- **Hyper p99.** A call through any proxy crosses four sockets and wakes three \
         threads where the direct round trip crosses two and wakes two. The bench measures \
         what that alone costs here, in the same blocks: the same frames through a thread \
         that relays them unparsed with blocking reads and writes (no event loop, no work). \
         Its p99 is {relay}; cc-proxy's is {proxy}. On these machines (2 vCPUs under nested \
         virtualization, guest halt polling off: `haltpoll.guest_halt_poll_ns=0`) waking a \
         thread on an idle vCPU costs tens of microseconds, and where the kernel places three \
         threads on two CPUs decides the figure; the direct pair's two threads answer each \
         other on one CPU in under 4 µs. With every thread of the bench and the daemon pinned \
         to one CPU no wake-up crosses CPUs: the relay thread's p99 is {relay_pinned}, \
         cc-proxy's {proxy_pinned}. So the target of 2.5× is at the floor of what one more \
         hop costs on this machine. What cc-proxy adds above the floor is its event loop: \
         six syscalls per call (two `epoll_wait`, two reads, two writes; strace), where the \
         relay thread makes four. The absolute p99 is still well under the reference \
         daemon's 303 µs.",
        relay = pair("hyper_p99_us_relay_floor"),
        proxy = pair("hyper_p99_us"),
        relay_pinned = pair("hyper_pinned_p99_us_relay_floor"),
        proxy_pinned = pair("hyper_pinned_p99_us"),
    );
    let _ = writeln!(
        s,
        "- **Fan-out.** Three busy threads (agent writer, daemon, the shims' reader) share \
         two CPUs where the direct stream has two, so every figure here is bound by CPU \
         time per byte, and the single stream through the proxy reaches about 0.6× direct. \
         The agent interleaves the 64 sessions one 4 KiB message at a time, so one read \
         of io holds about one message per session; shim writers therefore wait a few \
         scheduler turns, and while the agent streams they wait for the next read of io \
         (autocorking, ended by a small read, a quiet millisecond, or a full queue), so \
         that a `writev` carries tens of KiB instead of one message \
         (`daemon_writes.fanout` in `report.json`). Where the kernel puts the three \
         threads still moves single runs by a factor of two or more."
    );
    s
}

/// The SVG chart of stdout MiB/s by message size, proxy vs direct.
pub fn throughput_svg(rows: &[Row], repeat: usize) -> String {
    let data: Vec<(usize, f64, f64)> = STDOUT_SIZES
        .iter()
        .filter_map(|&size| {
            let r = rows.iter().find(|r| r.id == format!("stdout_{size}"))?;
            Some((size, r.proxy, r.direct.unwrap_or(f64::NAN)))
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

fn nice_step(raw: f64) -> f64 {
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
        let mut m = Metrics::new();
        for (k, v) in [
            ("hyper_p99_us.proxy", 10.0),
            ("hyper_p99_us.direct", 5.0),
            ("hyper_p99_us.relay", 7.5),
            ("rss_one_vm_mib", 2.5),
        ] {
            m.insert(k.to_string(), v);
        }
        let rows = rows(&[m], &Volumes::quick());
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["hyper_p99_us", "hyper_p99_us_relay_floor", "rss_one_vm_mib"]
        );
        assert_eq!(rows[0].ratio, Some(2.0));
        assert_eq!(rows[0].pass, Some(true));
        // The relay floor is reported against the direct pair, not judged.
        assert_eq!(rows[1].ratio, Some(1.5));
        assert_eq!(rows[1].pass, None);
        assert_eq!(rows[2].pass, Some(true));
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
