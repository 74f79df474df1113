//! How cost grows: the scaling series, each against a fresh daemon.
//!
//! - **fleet**: daemon RSS and CPU with 1, 10, 100 and 1000 VMs, each with
//!   two sessions (a shim connected, a process started), idle and with a
//!   trickle of output on every session. The agents and shims of all the
//!   VMs are tasks of one tokio runtime in the bench ([`Fleet`]); every
//!   trickled byte is checked against the pattern where the shim reads it.
//! - **streams**: aggregate stdout throughput with 1, 4, 16 and 64 VMs
//!   streaming at once (one session each, 4096-byte io messages), the
//!   daemon run with `--threads 1` and with `--threads 2`; every agent
//!   writer and every shim reader is its own OS thread (1 MiB reads).
//! - **hyper**: Hyper `ping` calls per second with 1, 8 and 64 runtimes
//!   (connections, each its own OS thread making sequential calls) on one
//!   VM and on as many separate VMs.
//!
//! Metric keys: `fleet.*`, `streams.t<threads>.<vms>`,
//! `hyperscale.{one_vm,sep_vms}.<runtimes>` (see `report::series`).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use proxy_proto::hyper::ctl::{Code, CtlHeader, CTL_HEADER_LEN};
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use proxy_proto::payload::Hyper;
use proxy_proto::{Command, Frame, FrameKind, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::{relocated, Agent, Started, ACK};
use crate::conn::{json, Conn, IO_TIMEOUT};
use crate::daemon::{Daemon, TempDir};
use crate::figures::{
    check, check_exit, mib, read_threads, round_trips, settle, start_process, Bench, Metrics,
    SHIM_READ,
};
use crate::wire::{io_exit, io_header, proxy_frame, Cycle, Framing, Pattern, RecvBuf};

/// VMs of the fleet series.
pub const FLEET_VMS: [usize; 4] = [1, 10, 100, 1000];

/// Sessions per VM in the fleet series.
pub const FLEET_SESSIONS: usize = 2;

/// Streaming VMs of the throughput series.
pub const STREAM_VMS: [usize; 4] = [1, 4, 16, 64];

/// The daemon's `--threads` of the throughput series.
pub const STREAM_THREADS: [u16; 2] = [1, 2];

/// Concurrent runtimes of the Hyper series.
pub const HYPER_RUNTIMES: [usize; 3] = [1, 8, 64];

/// The trickle: every session gets one io message of this many bytes…
pub const TRICKLE_BYTES: usize = 100;

/// …this often.
pub const TRICKLE_EVERY: Duration = Duration::from_millis(100);

/// io message size of the throughput series.
const STREAM_SIZE: usize = 4096;

/// How long the scaling series measure.
#[derive(Debug, Clone)]
pub struct ScaleVolumes {
    /// CPU is measured over this long, idle.
    pub idle: Duration,
    /// And over this long with the trickle on.
    pub trickle: Duration,
    /// Bytes of each step of the throughput series, over all VMs.
    pub stream_total: u64,
    /// Each step of the Hyper series calls for this long.
    pub hyper_window: Duration,
}

impl ScaleVolumes {
    /// `--quick`.
    pub fn quick() -> Self {
        Self {
            idle: Duration::from_millis(400),
            trickle: Duration::from_millis(600),
            stream_total: 16 << 20,
            hyper_window: Duration::from_millis(200),
        }
    }

    /// The default.
    pub fn full() -> Self {
        Self {
            idle: Duration::from_secs(2),
            trickle: Duration::from_secs(3),
            stream_total: 256 << 20,
            hyper_window: Duration::from_secs(1),
        }
    }
}

/// Every scaling series, into `m`.
pub fn run(b: &Bench<'_>, m: &mut Metrics) -> Result<(), String> {
    with_daemon(b, &[], "fleet", |d, dir| fleet(b, d, dir, m))?;
    for t in STREAM_THREADS {
        let extra = ["--threads".to_string(), t.to_string()];
        with_daemon(b, &extra, &format!("streams --threads {t}"), |d, dir| {
            streams(b, t, d, dir, m)
        })?;
    }
    with_daemon(b, &[], "hyper", |d, dir| hyper(b, d, dir, m))
}

/// `f` against a fresh daemon (the bench's extra arguments, then
/// `extra`), which must then exit cleanly on SIGTERM.
fn with_daemon<F>(b: &Bench<'_>, extra: &[String], what: &str, f: F) -> Result<(), String>
where
    F: FnOnce(&Daemon, &Path) -> Result<(), String>,
{
    let tmp = TempDir::new()?;
    let mut args = b.extra.to_vec();
    args.extend(extra.iter().cloned());
    let mut d = Daemon::start(b.bin, tmp.path(), &args)?;
    match f(&d, tmp.path()) {
        Ok(()) => {
            let s = d.shutdown()?;
            if s.success() {
                Ok(())
            } else {
                Err(format!(
                    "scaling, {what}: cc-proxy exited with {s} after SIGTERM{}",
                    d.log_tail()
                ))
            }
        }
        Err(e) => {
            let alive = d.check_alive().err().unwrap_or_default();
            Err(format!("scaling, {what}: {e}{alive}{}", d.log_tail()))
        }
    }
}

// ----- fleet -----

/// What the fleet's tasks share with the bench.
#[derive(Debug, Default)]
struct Shared {
    /// The agents write their trickle while this is set.
    trickle: AtomicBool,
    /// Trickle bytes the agents wrote.
    sent: AtomicU64,
    /// Trickle bytes the shims received (and checked).
    received: AtomicU64,
    /// The first failure of any task.
    error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, e: String) {
        if let Ok(mut g) = self.error.lock() {
            g.get_or_insert(e);
        }
    }

    fn check(&self) -> Result<(), String> {
        match self.error.lock() {
            Ok(g) => g.clone().map_or(Ok(()), Err),
            Err(_) => Err("a fleet task panicked".into()),
        }
    }
}

/// Where stream `j` of VM `i` starts in the pattern.
fn stream_base(vm: usize, session: usize) -> u64 {
    (vm * FLEET_SESSIONS + session) as u64 * 7919 * 131
}

/// Mock agents and shims of many VMs: tasks of one tokio runtime (two
/// worker threads).
struct Fleet {
    rtm: tokio::runtime::Runtime,
    dir: PathBuf,
    shared: Arc<Shared>,
    pattern: Arc<Pattern>,
    started_tx: Sender<Result<Started, String>>,
    started: Receiver<Result<Started, String>>,
    vms: usize,
}

impl Fleet {
    fn new(dir: PathBuf) -> Result<Self, String> {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let rtm = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fleet")
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let (started_tx, started) = mpsc::channel();
        Ok(Self {
            rtm,
            dir,
            shared: Arc::new(Shared::default()),
            pattern: Arc::new(Pattern::new()),
            started_tx,
            started,
            vms: 0,
        })
    }

    /// Register VMs (through `rt`) until there are `n`, each with its
    /// sessions' shims connected and processes started.
    fn grow(&mut self, rt: &mut Conn, socket: &Path, n: usize) -> Result<(), String> {
        while self.vms < n {
            let i = self.vms;
            let dir = self.dir.join(format!("vm-{i}"));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let (ctl_path, io_path) = (dir.join("ctl.sock"), dir.join("io.sock"));
            let listen = |p: &Path| -> Result<tokio::net::UnixListener, String> {
                let l = std::os::unix::net::UnixListener::bind(p)
                    .map_err(|e| format!("bind {}: {e}", p.display()))?;
                l.set_nonblocking(true)
                    .map_err(|e| format!("set_nonblocking: {e}"))?;
                let _g = self.rtm.enter();
                tokio::net::UnixListener::from_std(l).map_err(|e| format!("tokio listener: {e}"))
            };
            let (ctl_l, io_l) = (listen(&ctl_path)?, listen(&io_path)?);
            let (shared, pattern, started) = (
                self.shared.clone(),
                self.pattern.clone(),
                self.started_tx.clone(),
            );
            self.rtm.spawn(async move {
                if let Err(e) = vm_agent(ctl_l, io_l, i, &shared, pattern, started).await {
                    shared.fail(format!("fleet agent of VM {i}: {e}"));
                }
            });
            let vm = format!("fleet-{i}");
            let tokens = rt.register_vm(&vm, &ctl_path, &io_path, FLEET_SESSIONS as u32)?;
            for (j, t) in tokens.iter().enumerate() {
                let mut shim = Conn::connect(socket, 64 << 10)?;
                shim.connect_shim(t)?;
                start_process(
                    rt,
                    || match self.started.recv_timeout(IO_TIMEOUT) {
                        Ok(r) => r,
                        Err(_) => Err(format!("no newcontainer reached the agent of {vm}")),
                    },
                    t,
                    &format!("{vm}-{j}"),
                )?;
                let Conn { s, rb } = shim;
                s.set_nonblocking(true)
                    .map_err(|e| format!("set_nonblocking: {e}"))?;
                let s = {
                    let _g = self.rtm.enter();
                    tokio::net::UnixStream::from_std(s).map_err(|e| format!("tokio socket: {e}"))?
                };
                let (shared, pattern) = (self.shared.clone(), self.pattern.clone());
                self.rtm.spawn(async move {
                    if let Err(e) = shim_reader(s, rb, stream_base(i, j), &shared, &pattern).await {
                        shared.fail(format!("fleet shim {j} of VM {i}: {e}"));
                    }
                });
            }
            self.vms += 1;
        }
        self.shared.check()
    }
}

/// One VM's agent: READY on ctl, ACK to every ctl message (reporting the
/// processes started), and while the trickle is on, one io message per
/// session every [`TRICKLE_EVERY`].
async fn vm_agent(
    ctl_l: tokio::net::UnixListener,
    io_l: tokio::net::UnixListener,
    vm: usize,
    shared: &Arc<Shared>,
    pattern: Arc<Pattern>,
    started: Sender<Result<Started, String>>,
) -> Result<(), String> {
    let (mut ctl, _) = ctl_l
        .accept()
        .await
        .map_err(|e| format!("accept ctl: {e}"))?;
    let ready = CtlHeader {
        code: Code::Ready as u32,
        len: CTL_HEADER_LEN as u32,
    }
    .to_bytes();
    ctl.write_all(&ready)
        .await
        .map_err(|e| format!("READY: {e}"))?;
    let (io, _) = io_l.accept().await.map_err(|e| format!("accept io: {e}"))?;
    drop((ctl_l, io_l));
    let seqs: Arc<Mutex<Vec<u64>>> = Arc::default();
    let writer = {
        let (seqs, shared) = (seqs.clone(), shared.clone());
        tokio::spawn(async move {
            if let Err(e) = trickle(io, vm, &seqs, &shared, &pattern).await {
                shared.fail(format!("fleet agent of VM {vm}, io: {e}"));
            }
        })
    };
    let mut rb = RecvBuf::new(64 << 10);
    let r = loop {
        while let Some(h) = rb.data().get(..CTL_HEADER_LEN) {
            let mut b = [0u8; CTL_HEADER_LEN];
            b.copy_from_slice(h);
            let h = CtlHeader::parse(&b);
            let len = h.len as usize;
            if !(CTL_HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
                return Err(format!("a ctl message of length {len}"));
            }
            if rb.data().len() < len {
                break;
            }
            if let Some(Code::NewContainer | Code::ExecCmd) = Code::from_u32(h.code) {
                let s = relocated(&rb.data()[CTL_HEADER_LEN..len]);
                if let (Ok(s), Ok(mut g)) = (&s, seqs.lock()) {
                    g.push(s.stdio);
                }
                let _ = started.send(s);
            }
            rb.consume(len);
            ctl.write_all(&ACK).await.map_err(|e| format!("ACK: {e}"))?;
        }
        match ctl.read(rb.spare()?).await {
            Ok(0) | Err(_) => break Ok(()),
            Ok(n) => rb.filled(n),
        }
    };
    writer.abort();
    r
}

/// The io side of a fleet agent.
async fn trickle(
    mut io: tokio::net::UnixStream,
    vm: usize,
    seqs: &Mutex<Vec<u64>>,
    shared: &Shared,
    pattern: &Pattern,
) -> Result<(), String> {
    let mut tick = tokio::time::interval(TRICKLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut written = [0u64; FLEET_SESSIONS];
    let mut msg = Vec::with_capacity(TRICKLE_BYTES + 12);
    loop {
        tick.tick().await;
        if !shared.trickle.load(Ordering::Relaxed) {
            continue;
        }
        let seqs: Vec<u64> = seqs.lock().map(|g| g.clone()).unwrap_or_default();
        for (j, &seq) in seqs.iter().enumerate().take(FLEET_SESSIONS) {
            msg.clear();
            msg.extend_from_slice(&io_header(seq, TRICKLE_BYTES));
            let off = stream_base(vm, j) + written[j];
            msg.extend_from_slice(pattern.slice(off as usize, TRICKLE_BYTES));
            io.write_all(&msg)
                .await
                .map_err(|e| format!("write: {e}"))?;
            written[j] += TRICKLE_BYTES as u64;
            shared
                .sent
                .fetch_add(TRICKLE_BYTES as u64, Ordering::Relaxed);
        }
    }
}

/// A fleet shim: every stdout byte must be the next of its stream.
async fn shim_reader(
    mut s: tokio::net::UnixStream,
    mut rb: RecvBuf,
    base: u64,
    shared: &Shared,
    pattern: &Pattern,
) -> Result<(), String> {
    let mut pos = 0u64;
    loop {
        while let Some((kind, at, total)) = proxy_frame(rb.data())? {
            let FrameKind::Stream(Stream::Stdout) = kind else {
                return Err(format!("unexpected {kind:?} frame"));
            };
            let mut p = &rb.data()[at..total];
            while !p.is_empty() {
                let k = p.len().min(4096);
                if p[..k] != *pattern.slice((base + pos) as usize, k) {
                    return Err(format!("WRONG BYTES in the trickle at offset {pos}"));
                }
                p = &p[k..];
                pos += k as u64;
                shared.received.fetch_add(k as u64, Ordering::Relaxed);
            }
            rb.consume(total);
        }
        let n = s
            .read(rb.spare()?)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        rb.filled(n);
    }
}

/// The daemon's CPU: on-CPU ns of its threads (schedstat) and
/// utime + stime (clock ticks), in seconds.
fn cpu(d: &Daemon) -> Result<(f64, f64), String> {
    Ok((d.cpu_precise()?, d.cpu_seconds()?))
}

fn fleet(b: &Bench<'_>, d: &Daemon, dir: &Path, m: &mut Metrics) -> Result<(), String> {
    let sv = &b.vol.scale;
    settle();
    let base = d.rss_kib()? as f64;
    m.insert("fleet.rss_kib.base".into(), base);
    let mut fleet = Fleet::new(dir.join("fleet"))?;
    let mut rt = Conn::connect(&d.socket, 64 << 10)?;
    for n in FLEET_VMS {
        let t = Instant::now();
        fleet.grow(&mut rt, &d.socket, n)?;
        let setup = t.elapsed().as_secs_f64();
        settle();
        // Idle.
        let (c0, t0) = (cpu(d)?, Instant::now());
        std::thread::sleep(sv.idle);
        let (c1, secs) = (cpu(d)?, t0.elapsed().as_secs_f64());
        let idle_rss = d.rss_kib()? as f64;
        let idle_ms = (c1.0 - c0.0) * 1000.0 / secs;
        m.insert(format!("fleet.rss_kib.idle.{n}"), idle_rss);
        m.insert(format!("fleet.cpu_ms_s.idle.{n}"), idle_ms);
        m.insert(
            format!("fleet.cpu_ticks_ms_s.idle.{n}"),
            (c1.1 - c0.1) * 1000.0 / secs,
        );
        // Trickle: a tick to start, then the window.
        fleet.shared.trickle.store(true, Ordering::Relaxed);
        std::thread::sleep(TRICKLE_EVERY * 2);
        let (c0, r0, t0) = (
            cpu(d)?,
            fleet.shared.received.load(Ordering::Relaxed),
            Instant::now(),
        );
        std::thread::sleep(sv.trickle);
        let (c1, r1, secs) = (
            cpu(d)?,
            fleet.shared.received.load(Ordering::Relaxed),
            t0.elapsed().as_secs_f64(),
        );
        let trickle_rss = d.rss_kib()? as f64;
        fleet.shared.trickle.store(false, Ordering::Relaxed);
        let trickle_ms = (c1.0 - c0.0) * 1000.0 / secs;
        m.insert(format!("fleet.rss_kib.trickle.{n}"), trickle_rss);
        m.insert(format!("fleet.cpu_ms_s.trickle.{n}"), trickle_ms);
        m.insert(
            format!("fleet.cpu_ticks_ms_s.trickle.{n}"),
            (c1.1 - c0.1) * 1000.0 / secs,
        );
        let rate = (r1 - r0) as f64 / TRICKLE_BYTES as f64 / secs;
        m.insert(format!("fleet.trickle_msgs_s.{n}"), rate);
        // Per message delivered: fair where the bench (sharing the CPUs)
        // did not keep up the offered rate.
        if rate > 0.0 {
            m.insert(
                format!("fleet.cpu_us_per_msg.trickle.{n}"),
                trickle_ms * 1000.0 / rate,
            );
        }
        // Everything written must arrive, byte for byte.
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            fleet.shared.check()?;
            let (s, r) = (
                fleet.shared.sent.load(Ordering::Relaxed),
                fleet.shared.received.load(Ordering::Relaxed),
            );
            if s == r {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "fleet of {n} VMs: {r} of the {s} trickled bytes arrived"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (kind, rss, ms) in [
            ("idle", idle_rss, idle_ms),
            ("trickle", trickle_rss, trickle_ms),
        ] {
            m.insert(
                format!("fleet.rss_per_vm_kib.{kind}.{n}"),
                (rss - base) / n as f64,
            );
            m.insert(
                format!("fleet.cpu_us_s_per_vm.{kind}.{n}"),
                ms * 1000.0 / n as f64,
            );
        }
        eprintln!(
            "  fleet of {n:>4} VMs x {FLEET_SESSIONS} sessions (set up in {setup:.1} s): RSS idle {:.2} MiB, \
             trickling {:.2} MiB; CPU idle {idle_ms:.2} ms/s, trickling {trickle_ms:.2} ms/s \
             ({rate:.0} messages/s)",
            idle_rss / 1024.0,
            trickle_rss / 1024.0
        );
    }
    let (first, last) = (FLEET_VMS[0], FLEET_VMS[FLEET_VMS.len() - 1]);
    for kind in ["idle", "trickle"] {
        let at = |n: usize| m.get(&format!("fleet.rss_kib.{kind}.{n}")).copied();
        if let (Some(a), Some(z)) = (at(first), at(last)) {
            m.insert(
                format!("fleet.rss_added_kib_per_vm.{kind}"),
                (z - a) / (last - first) as f64,
            );
        }
    }
    drop(rt);
    drop(fleet);
    Ok(())
}

// ----- streams -----

fn streams(
    b: &Bench<'_>,
    threads: u16,
    d: &Daemon,
    dir: &Path,
    m: &mut Metrics,
) -> Result<(), String> {
    let most = STREAM_VMS[STREAM_VMS.len() - 1];
    let mut agents = Vec::with_capacity(most);
    let mut tokens = Vec::with_capacity(most);
    // A runtime connection per VM: a Hyper with a token goes through the
    // connection of the token's VM.
    let mut rts = Vec::with_capacity(most);
    for i in 0..most {
        let a = Agent::start(&dir.join(format!("vm-{i}")))?;
        let mut rt = Conn::connect(&d.socket, 64 << 10)?;
        tokens.push(rt.register_vm(
            &format!("stream-{i}"),
            &a.ctl_path,
            &a.io_path,
            STREAM_VMS.len() as u32,
        )?);
        agents.push(a);
        rts.push(rt);
    }
    for (k, &v) in STREAM_VMS.iter().enumerate() {
        let what = format!("{v} VMs streaming at once, --threads {threads}");
        let mut socks = Vec::with_capacity(v);
        let mut streams = Vec::with_capacity(v);
        let per_vm = b.vol.scale.stream_total / v as u64 / STREAM_SIZE as u64;
        for i in 0..v {
            let mut shim = Conn::connect(&d.socket, SHIM_READ)?;
            shim.connect_shim(&tokens[i][k])?;
            let seq = start_process(
                &mut rts[i],
                || agents[i].next_started(),
                &tokens[i][k],
                &format!("stream-{i}-{k}"),
            )?;
            let cycle = Cycle::new(b.pattern, Framing::Io, &[seq], STREAM_SIZE, 512 << 10);
            let want = cycle.expected(b.pattern, 1, per_vm)[0];
            streams.push((cycle, want, io_exit(seq, i as u8 + 1)));
            socks.push((shim.s, shim.rb));
        }
        let ios: Vec<&UnixStream> = agents
            .iter_mut()
            .take(v)
            .map(Agent::io)
            .collect::<Result<_, _>>()?;
        let want: Vec<_> = streams.iter().map(|s| s.1).collect();
        let t0 = Instant::now();
        let sinks = std::thread::scope(|sc| {
            let writers: Vec<_> = ios
                .iter()
                .zip(&streams)
                .map(|(io, (cycle, _, tail))| {
                    sc.spawn(move || cycle.write(&mut &**io, per_vm, tail))
                })
                .collect();
            let r = read_threads(socks, &want);
            if r.is_err() {
                for io in &ios {
                    let _ = io.shutdown(std::net::Shutdown::Both);
                }
            }
            for w in writers {
                w.join()
                    .unwrap_or_else(|_| Err("a writer thread panicked".into()))?;
            }
            r
        })
        .map_err(|e| format!("{what}: {e}"))?;
        let mut done = t0;
        let mut total = 0;
        for (i, s) in sinks.iter().enumerate() {
            check(&format!("{what}, VM {i}"), s.digest(), want[i])?;
            check_exit(&format!("{what}, VM {i}"), s.exit, i as u8 + 1)?;
            done = done.max(s.done_at.ok_or("a stream finished without its data")?);
            total += want[i].len;
        }
        let v_mib = mib(total) / done.duration_since(t0).as_secs_f64().max(1e-9);
        m.insert(format!("streams.t{threads}.{v}"), v_mib);
        eprintln!("  {what}: {v_mib:8.1} MiB/s aggregate");
    }
    for (i, rt) in rts.iter_mut().enumerate() {
        rt.unregister_vm(&format!("stream-{i}"))?;
    }
    Ok(())
}

// ----- Hyper -----

fn hyper(b: &Bench<'_>, d: &Daemon, dir: &Path, m: &mut Metrics) -> Result<(), String> {
    let most = HYPER_RUNTIMES[HYPER_RUNTIMES.len() - 1];
    let payload =
        json(&Hyper::new("ping", vec![], Some("{}")).map_err(|e| format!("Hyper: {e}"))?)?;
    let req = Frame::command(Command::Hyper, payload).to_bytes();
    // One VM, `most` runtimes attached to it.
    let one = Agent::start(&dir.join("one"))?;
    let mut one_rt = Vec::with_capacity(most);
    let mut c = Conn::connect(&d.socket, 64 << 10)?;
    c.register_vm("hyper-one", &one.ctl_path, &one.io_path, 0)?;
    one_rt.push(c);
    for _ in 1..most {
        let mut c = Conn::connect(&d.socket, 64 << 10)?;
        c.attach_vm("hyper-one")?;
        one_rt.push(c);
    }
    // `most` VMs, a runtime each.
    let mut sep = Vec::with_capacity(most);
    let mut sep_rt = Vec::with_capacity(most);
    for i in 0..most {
        let a = Agent::start(&dir.join(format!("sep-{i}")))?;
        let mut c = Conn::connect(&d.socket, 64 << 10)?;
        c.register_vm(&format!("hyper-{i}"), &a.ctl_path, &a.io_path, 0)?;
        sep.push(a);
        sep_rt.push(c);
    }
    let pings0: u64 = one.pings() + sep.iter().map(Agent::pings).sum::<u64>();
    let mut calls = 0u64;
    for r in HYPER_RUNTIMES {
        for (mode, conns) in [("one_vm", &mut one_rt), ("sep_vms", &mut sep_rt)] {
            let (n, rate) = concurrent_calls(&mut conns[..r], &req, b.vol.scale.hyper_window)?;
            calls += n;
            m.insert(format!("hyperscale.{mode}.{r}"), rate);
            eprintln!(
                "  Hyper ping, {r:>2} runtimes on {}: {rate:8.0} calls/s",
                if mode == "one_vm" {
                    "one VM".to_string()
                } else {
                    format!("{r} VMs")
                }
            );
        }
    }
    let pings = one.pings() + sep.iter().map(Agent::pings).sum::<u64>() - pings0;
    if pings != calls {
        return Err(format!(
            "Hyper series: {calls} calls answered, but the agents saw {pings} pings"
        ));
    }
    Ok(())
}

/// Sequential `req` round trips on every connection at once, each from
/// its own thread, for `window` after a short warm-up; the calls made
/// in all (warm-up included) and the aggregate calls/s of the window.
fn concurrent_calls(
    conns: &mut [Conn],
    req: &[u8],
    window: Duration,
) -> Result<(u64, f64), String> {
    const WARMUP: usize = 20;
    const BATCH: usize = 10;
    let start = Barrier::new(conns.len() + 1);
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let hs: Vec<_> = conns
            .iter_mut()
            .map(|c| {
                let (start, stop) = (&start, &stop);
                sc.spawn(move || -> Result<(u64, u64), String> {
                    let Conn { s, rb } = c;
                    let mut lat = Vec::new();
                    let warm = round_trips(s, rb, req, WARMUP, &mut lat);
                    start.wait();
                    warm?;
                    let mut timed = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        lat.clear();
                        round_trips(s, rb, req, BATCH, &mut lat)?;
                        timed += BATCH as u64;
                    }
                    Ok((WARMUP as u64 + timed, timed))
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        std::thread::sleep(window);
        stop.store(true, Ordering::Relaxed);
        let mut all = 0;
        let mut timed = 0;
        let mut first_err = None;
        for h in hs {
            match h.join() {
                Ok(Ok((a, t))) => {
                    all += a;
                    timed += t;
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert("a runtime thread panicked".to_string());
                }
            }
        }
        // The last batches end a little after the window.
        let secs = t0.elapsed().as_secs_f64();
        match first_err {
            Some(e) => Err(e),
            None => Ok((all, timed as f64 / secs)),
        }
    })
}
