//! `proxy-soak`: the release `cc-proxy` under a long random mix of every
//! command, with reconnecting shims, slow readers and faulty agents; every
//! reply and every byte checked, the daemon's RSS and open fds sampled.
//!
//! Run by `cargo xtask soak --minutes N` (or `--seconds N`), which builds
//! the release daemon and this binary. It starts the daemon as a child
//! process and plays everything else itself:
//!
//! - **20 VMs**, each an agent on two listening unix sockets (ctl, io)
//!   speaking hyperstart: READY, ACK/ERROR, stdio relocation, EOF and exit
//!   codes (`agent.rs`).
//! - **200 shims** (10 slots per VM), each running one process after
//!   another: AttachVM for a token (the first from RegisterVM), ConnectShim,
//!   Hyper `execcmd`/`newcontainer`, stdin in random pieces, signals
//!   (`SIGWINCH` with a size, others become KILLCONTAINER), EOF, the exit
//!   code, then DisconnectShim (or just a close). Some shims drop their
//!   connection mid-stream and reconnect with the same token; some pause
//!   reading (back-pressure down to the agent).
//! - **faults**: per VM every 8–25 s, an agent that answers later than
//!   `--ctl-timeout`, answers ERROR, closes its ctl or io channel, or sends
//!   garbage on ctl or io — after the last four the VM must be torn down,
//!   its shims' connections closed, and it is unregistered and registered
//!   again.
//! - **negative commands**: a duplicate RegisterVM, UnregisterVM and
//!   AttachVM of unknown VMs, ConnectShim with an unknown token, Hyper on
//!   an unattached connection, Signal and DisconnectShim from a non-shim.
//!
//! Every response is checked against what the rules say. Every stream is
//! self-describing (`check.rs`): stdout and stderr as received by the shim
//! and stdin as received by the agent must be the sent stream, in order,
//! without a byte twice; after a reconnect, one gap (bytes lost in the dead
//! socket's buffer) is allowed and counted. Where no reconnect happened the
//! XXH64 of both ends must match.
//!
//! Every second the daemon's VmRSS and open fd count are sampled to
//! `OUT/samples.csv`; at the end `OUT/summary.json` is written (and with
//! `--report`, `DOCS/soak.svg`), and the last line is
//! `soak: N passed, M failed`. The exit code is non-zero on any failed
//! check, a daemon crash, or RSS/fd growth (last-quarter mean over 1.5×
//! the second quarter's and more than 16 MiB / 64 fds above it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../daemon.rs"]
mod daemon;
#[allow(dead_code)]
#[path = "../hash.rs"]
mod hash;

mod agent;
mod check;
mod report;
mod shim;
mod vm;
mod wire;

use check::{RecvCheck, Which};
use hash::Xxh64;

const USAGE: &str = "usage: proxy-soak --cc-proxy PATH (--minutes N | --seconds N)
                  [--vms N] [--shims-per-vm N] [--seed N] [--out DIR]
                  [--reconnect-percent N] [--report] [--docs DIR]

  --cc-proxy PATH   the daemon binary (release build)
  --minutes N       how long to run (or --seconds N); default 1 minute
  --vms N           VMs (default 20)
  --shims-per-vm N  shim slots per VM (default 10)
  --seed N          the random seed (default: from the clock; printed)
  --reconnect-percent N
                    sessions whose shim reconnects mid-stream (default 15)
  --out DIR         samples.csv and summary.json (default target/soak)
  --report          also write DOCS/soak.svg
  --docs DIR        where --report writes (default docs)";

/// The daemon's waits, short enough for faults to be seen quickly.
const CTL_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Args {
    bin: PathBuf,
    duration: Duration,
    vms: usize,
    slots: usize,
    seed: u64,
    out: PathBuf,
    report: bool,
    docs: PathBuf,
    reconnect_pct: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        bin: PathBuf::new(),
        duration: Duration::from_secs(60),
        vms: 20,
        slots: 10,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        out: PathBuf::from("target/soak"),
        report: false,
        docs: PathBuf::from("docs"),
        reconnect_pct: 15,
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> Result<u64, String> {
        v.as_deref()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{what} needs a number"))
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "--cc-proxy" => a.bin = it.next().ok_or("--cc-proxy needs a path")?.into(),
            "--minutes" => a.duration = Duration::from_secs(60 * num(it.next(), "--minutes")?),
            "--seconds" => a.duration = Duration::from_secs(num(it.next(), "--seconds")?),
            "--vms" => a.vms = num(it.next(), "--vms")?.max(1) as usize,
            "--shims-per-vm" => a.slots = num(it.next(), "--shims-per-vm")?.max(1) as usize,
            "--seed" => a.seed = num(it.next(), "--seed")?,
            "--reconnect-percent" => {
                a.reconnect_pct = num(it.next(), "--reconnect-percent")?.min(100)
            }
            "--out" => a.out = it.next().ok_or("--out needs a directory")?.into(),
            "--report" => a.report = true,
            "--docs" => a.docs = it.next().ok_or("--docs needs a directory")?.into(),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`\n\n{USAGE}")),
        }
    }
    if a.bin.as_os_str().is_empty() {
        return Err(format!("--cc-proxy is required\n\n{USAGE}"));
    }
    if a.duration.is_zero() {
        return Err("the run must last at least a second".into());
    }
    Ok(a)
}

/// xorshift64*: small, fast, seeded per task.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` ≥ 1).
    pub fn below(&mut self, n: u64) -> u64 {
        self.u64() % n.max(1)
    }

    /// True with probability `p` percent.
    pub fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

/// A counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What happened, for the summary.
#[derive(Debug, Default)]
pub struct Stats {
    pub commands: Counter,
    pub sessions_done: Counter,
    pub sessions_aborted: Counter,
    pub reconnects: Counter,
    pub pauses: Counter,
    pub signals: Counter,
    pub signals_delivered: Counter,
    pub output_sent: Counter,
    pub output_received: Counter,
    pub stdin_sent: Counter,
    pub stdin_received: Counter,
    pub lost_bytes: Counter,
    pub duplicated_bytes: Counter,
    pub agent_ctl: Counter,
    pub registrations: Counter,
    pub fault_late: Counter,
    pub fault_error: Counter,
    pub fault_close_ctl: Counter,
    pub fault_close_io: Counter,
    pub fault_garbage_ctl: Counter,
    pub fault_garbage_io: Counter,
    pub negatives: Counter,
}

/// Everything the soak's tasks share.
#[derive(Debug)]
pub struct Soak {
    pub socket: PathBuf,
    pub url: String,
    pub stats: Stats,
    passed: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// Every failure by kind (its message with the numbers taken out).
    kinds: Mutex<std::collections::BTreeMap<String, u64>>,
    stop: AtomicBool,
    /// Sessions by id, for the agents.
    pub sessions: Mutex<HashMap<u32, Arc<Sess>>>,
    next_sid: AtomicU32,
    /// How late a late agent answers.
    pub late: Duration,
    /// Percent of sessions whose shim reconnects mid-stream.
    pub reconnect_pct: u64,
}

impl Soak {
    /// Count a check; record (and print the first few of) failures.
    pub fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        if ok {
            self.passed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let n = self.failed.fetch_add(1, Ordering::Relaxed);
        let msg = what();
        let kind: String = msg
            .split(|c: char| c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("N");
        *self.kinds.lock().expect("kinds").entry(kind).or_default() += 1;
        if n < 20 {
            eprintln!("soak: FAILED: {msg}");
        }
        let mut f = self.failures.lock().expect("failures");
        if f.len() < 200 {
            f.push(msg);
        }
    }

    /// Check a command's reply: `want_ok` says whether it should succeed.
    /// An excused reply (its VM being faulted) counts either way.
    pub fn reply(&self, what: &str, r: &Result<wire::Reply, String>, want_ok: bool, excused: bool) {
        self.stats.commands.add(1);
        let ok = match r {
            Ok(Ok(_)) => want_ok || excused,
            Ok(Err(_)) => !want_ok || excused,
            Err(_) => excused,
        };
        self.check(ok, || {
            format!(
                "{what}: expected {}, got {}",
                if want_ok {
                    "success"
                } else {
                    "an error response"
                },
                match r {
                    Ok(Ok(p)) => format!("success {}", String::from_utf8_lossy(p)),
                    Ok(Err(m)) => format!("error {m:?}"),
                    Err(e) => e.clone(),
                }
            )
        });
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn new_sid(&self) -> u32 {
        self.next_sid.fetch_add(1, Ordering::Relaxed)
    }
}

/// One process's session, shared by its shim and its agent.
#[derive(Debug)]
pub struct Sess {
    pub sid: u32,
    pub out_len: u64,
    pub err_len: u64,
    pub code: u8,
    /// Hashes of what the agent sent: stdout, stderr.
    pub sent: Mutex<(Xxh64, Xxh64)>,
    /// What the agent received on stdin.
    pub stdin_recv: Mutex<RecvCheck>,
    pub stdin_eof: tokio::sync::watch::Sender<bool>,
}

impl Sess {
    pub fn new(sid: u32, out_len: u64, err_len: u64, code: u8) -> Self {
        Self {
            sid,
            out_len,
            err_len,
            code,
            sent: Mutex::new((Xxh64::new(0), Xxh64::new(0))),
            stdin_recv: Mutex::new(RecvCheck::new(sid, Which::Stdin)),
            stdin_eof: tokio::sync::watch::channel(false).0,
        }
    }
}

/// A VM as the soak's runtime sees it.
#[derive(Debug)]
pub struct VmState {
    pub cid: String,
    pub ctl_path: PathBuf,
    pub io_path: PathBuf,
    /// The current registration; 0 while none is usable.
    pub epoch: tokio::sync::watch::Sender<u64>,
    /// The current registration is being faulted (or shut down).
    pub dying: AtomicBool,
    /// Held shared around commands that reach the agent's ctl (Hyper,
    /// Signal); held exclusively while a ctl fault is staged, so that the
    /// fault's reply is exactly predictable.
    pub gate: tokio::sync::RwLock<()>,
    /// The registration's tokens, one per slot, taken by the slot.
    pub tokens: Mutex<Vec<Option<String>>>,
}

impl VmState {
    /// A failure of a session of `epoch` is excused: its VM is faulted.
    pub fn excused(&self, epoch: u64) -> bool {
        self.dying.load(Ordering::SeqCst) || *self.epoch.borrow() != epoch
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("proxy-soak: {e}");
            return ExitCode::from(2);
        }
    };
    daemon::raise_nofile();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxy-soak: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("proxy-soak: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One sample of the daemon.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub t: f64,
    pub rss_kib: u64,
    pub fds: u64,
    pub commands: u64,
    pub bytes: u64,
}

fn fd_count(pid: u32) -> Result<u64, String> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .map_err(|e| format!("{dir}: {e}"))?
        .count() as u64)
}

async fn run(args: Args) -> Result<bool, String> {
    let dir = daemon::TempDir::new()?;
    let extra: Vec<String> = [
        "--ctl-timeout",
        "1s",
        "--shim-timeout",
        "10s",
        "--process-timeout",
        "10s",
        "--ready-timeout",
        "10s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut d = daemon::Daemon::start(&args.bin, dir.path(), &extra)?;
    let pid = d.pid();
    let soak = Arc::new(Soak {
        socket: d.socket.clone(),
        url: format!("unix://{}", d.socket.display()),
        stats: Stats::default(),
        passed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        kinds: Mutex::new(Default::default()),
        stop: AtomicBool::new(false),
        sessions: Mutex::new(HashMap::new()),
        next_sid: AtomicU32::new(1),
        late: CTL_TIMEOUT + Duration::from_millis(400),
        reconnect_pct: args.reconnect_pct,
    });
    eprintln!(
        "soak: {} VMs × {} shims for {:?}, seed {}, daemon pid {pid}",
        args.vms, args.slots, args.duration, args.seed
    );
    let idle_fds = fd_count(pid)?;

    let start = Instant::now();
    let deadline = start + args.duration;
    let mut vms = Vec::new();
    for i in 0..args.vms {
        let s = soak.clone();
        let vdir = dir.path().join(format!("vm{i}"));
        std::fs::create_dir_all(&vdir).map_err(|e| format!("{}: {e}", vdir.display()))?;
        let seed = args.seed ^ ((i as u64 + 1) << 32);
        let slots = args.slots;
        vms.push(tokio::spawn(async move {
            vm::drive(s, i, vdir, slots, seed).await
        }));
    }
    let chaos = {
        let s = soak.clone();
        let seed = args.seed ^ 0xc4a05;
        tokio::spawn(async move { vm::negatives(s, seed, deadline).await })
    };

    // Sample every second until the deadline, then until everything ends.
    let mut samples: Vec<Sample> = Vec::new();
    let mut crashed: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_print = Instant::now();
    let all_done = |vms: &Vec<tokio::task::JoinHandle<()>>| vms.iter().all(|h| h.is_finished());
    loop {
        tick.tick().await;
        if let Err(e) = d.check_alive() {
            crashed = Some(e);
            break;
        }
        let s = Sample {
            t: start.elapsed().as_secs_f64(),
            rss_kib: daemon::rss_kib(pid)?,
            fds: fd_count(pid)?,
            commands: soak.stats.commands.get(),
            bytes: soak.stats.output_received.get() + soak.stats.stdin_received.get(),
        };
        samples.push(s);
        if last_print.elapsed() >= Duration::from_secs(30) {
            last_print = Instant::now();
            eprintln!(
                "soak: {:>5.0} s  RSS {:>6} KiB  fds {:>4}  commands {}  sessions {}  MiB {}  failed {}",
                s.t,
                s.rss_kib,
                s.fds,
                s.commands,
                soak.stats.sessions_done.get(),
                s.bytes >> 20,
                soak.failed.load(Ordering::Relaxed)
            );
        }
        if Instant::now() >= deadline {
            soak.stop.store(true, Ordering::SeqCst);
            let late = (Instant::now() - deadline).as_secs();
            if late > 0 && late % 10 == 0 {
                eprintln!(
                    "soak: winding down: {} VM drivers and {} sessions still running",
                    vms.iter().filter(|h| !h.is_finished()).count(),
                    soak.sessions.lock().expect("sessions").len()
                );
            }
            if all_done(&vms) && chaos.is_finished() {
                break;
            }
            if Instant::now() > deadline + Duration::from_secs(120) {
                soak.check(false, || "the run did not wind down within 120 s".into());
                break;
            }
        }
    }
    soak.stop.store(true, Ordering::SeqCst);
    for h in vms {
        if h.is_finished() {
            if let Err(e) = h.await {
                soak.check(false, || format!("a VM driver panicked: {e}"));
            }
        } else {
            h.abort();
        }
    }
    chaos.abort();

    // Everything is unregistered and closed: the daemon's fds go back to
    // where they were when idle.
    let mut end_fds = 0;
    if crashed.is_none() {
        for _ in 0..50 {
            end_fds = fd_count(pid)?;
            if end_fds <= idle_fds {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        soak.check(end_fds <= idle_fds, || {
            format!(
                "{end_fds} fds open after every VM and connection is gone ({idle_fds} when idle)"
            )
        });
    }
    let end_rss = if crashed.is_none() {
        daemon::rss_kib(pid).unwrap_or(0)
    } else {
        0
    };
    let exit = if crashed.is_none() {
        Some(d.shutdown())
    } else {
        None
    };
    if let Some(e) = &crashed {
        soak.check(false, || format!("the daemon crashed: {e}"));
    }
    match &exit {
        Some(Ok(s)) => soak.check(s.success(), || {
            format!("cc-proxy exited with {s} after SIGTERM")
        }),
        Some(Err(e)) => soak.check(false, || e.clone()),
        None => {}
    }

    let growth = report::growth(&samples);
    for g in &growth.failures {
        soak.check(false, || g.clone());
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    report::write_csv(&args.out.join("samples.csv"), &samples)?;
    let passed = soak.passed.load(Ordering::Relaxed);
    let failed = soak.failed.load(Ordering::Relaxed);
    let failures = soak.failures.lock().expect("failures").clone();
    let kinds = soak.kinds.lock().expect("kinds").clone();
    let summary = report::summary(
        &args,
        &kinds,
        &soak.stats,
        passed,
        failed,
        &failures,
        &samples,
        &growth,
        idle_fds,
        end_fds,
        end_rss,
        start.elapsed(),
    );
    let path = args.out.join("summary.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())? + "\n",
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    if args.report {
        let svg = report::svg(&samples);
        let p = args.docs.join("soak.svg");
        std::fs::write(&p, svg).map_err(|e| format!("{}: {e}", p.display()))?;
        eprintln!("soak: wrote {}", p.display());
    }
    let st = &soak.stats;
    println!(
        "soak: {} commands, {failed} failed; {} sessions ({} cut by faults), {} reconnects, {} MiB out / {} MiB in checked, {} bytes lost at reconnects, {} duplicated",
        st.commands.get(),
        st.sessions_done.get(),
        st.sessions_aborted.get(),
        st.reconnects.get(),
        st.output_received.get() >> 20,
        st.stdin_received.get() >> 20,
        st.lost_bytes.get(),
        st.duplicated_bytes.get()
    );
    println!(
        "soak: RSS {} → {} KiB (max {}), fds {} → {} (max {}); samples in {}",
        samples.first().map_or(0, |s| s.rss_kib),
        samples.last().map_or(0, |s| s.rss_kib),
        samples.iter().map(|s| s.rss_kib).max().unwrap_or(0),
        samples.first().map_or(0, |s| s.fds),
        samples.last().map_or(0, |s| s.fds),
        samples.iter().map(|s| s.fds).max().unwrap_or(0),
        args.out.join("samples.csv").display()
    );
    for f in failures.iter().take(20) {
        println!("soak: failure: {f}");
    }
    for (k, n) in &kinds {
        println!("soak: {n} × {k}");
    }
    println!("soak: {passed} passed, {failed} failed");
    drop(dir);
    Ok(failed == 0)
}
