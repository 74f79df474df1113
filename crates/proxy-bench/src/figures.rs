//! One run of every figure: a fresh daemon, each measurement through it and
//! its baseline over a direct unix socket pair, back to back.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proxy_proto::hyper::io::IO_HEADER_LEN;
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use proxy_proto::payload::Hyper;
use proxy_proto::{Command, Frame, FrameKind, Header, Notification, Stream, HEADER_LEN};
use tokio::io::AsyncReadExt;

use crate::agent::Agent;
use crate::conn::{connect_shim_payload, json, Conn, IO_TIMEOUT};
use crate::daemon::{machine_busy_seconds, on_thread_cpu, self_cpu, Daemon, TempDir};
use crate::hash::Digest;
use crate::scaling::{self, ScaleVolumes};
use crate::wire::{
    drain, io_exit, io_message, next_frame, proxy_frame, stream_header, write_all, writev_all,
    Cycle, Framing, IoEnd, IoSink, Pattern, ProxyEnd, ProxySink, RecvBuf, Sink, BIG_BUF,
};

/// The io message sizes of the stdout figures (data bytes; 10228 is the
/// most one message carries).
pub const STDOUT_SIZES: [usize; 4] = [512, 1024, 4096, 10228];

/// stdin chunk size.
pub const STDIN_SIZE: usize = 4096;

/// Alternating blocks of proxy and direct round trips.
const HYPER_BLOCKS: usize = 20;

/// Untimed round trips at the start of each block.
const BLOCK_WARMUP: usize = 200;

/// Sessions of the fan-out figure.
pub const FANOUT_SESSIONS: usize = 64;

/// io message size of the fan-out figure.
const FANOUT_SIZE: usize = 4096;

/// What a shim modelled as its own OS thread reads at once (as cc-shim
/// does, with blocking reads).
pub(crate) const SHIM_READ: usize = 1 << 20;

/// How the fan-out's shims read.
#[derive(Debug, Clone, Copy)]
enum Readers {
    /// One blocking OS thread per shim, 1 MiB reads: every cc-shim is its
    /// own process.
    Threads,
    /// Every shim a task of one tokio thread (the earlier model; it lets
    /// the proxy's writes to different shims coalesce).
    Tokio,
}

/// The io message size whose daemon CPU per GiB is set beside a minimal
/// relay thread's.
pub const RELAY_SIZE: usize = 4096;

/// The fan-out ceiling writes a session's frames this many bytes at a time
/// (the proxy's writers cork up to `SMALL_BATCH`, 64 KiB).
const CEILING_BATCH: usize = 64 << 10;

/// What the stdout relay floor reads at once.
const RELAY_READ: usize = 64 << 10;

/// Size of a pre-built cycle of messages.
const CYCLE_BYTES: usize = 2 << 20;

/// Named values of one run (`<figure>.proxy`, `<figure>.direct`, …).
pub type Metrics = BTreeMap<String, f64>;

/// How much each figure moves.
#[derive(Debug, Clone)]
pub struct Volumes {
    /// Bytes per throughput figure.
    pub stream: u64,
    /// Timed Hyper round trips.
    pub hyper_calls: usize,
    /// Untimed round trips first.
    pub hyper_warmup: usize,
    /// Bytes per fan-out session.
    pub fanout_per_session: u64,
    /// Shims of the connect storm.
    pub storm: usize,
    /// The scaling series.
    pub scale: ScaleVolumes,
}

impl Volumes {
    /// `--quick`: a few seconds, still checked byte for byte.
    pub fn quick() -> Self {
        Self {
            stream: 16 << 20,
            hyper_calls: 500,
            hyper_warmup: 50,
            fanout_per_session: 256 << 10,
            storm: 1000,
            scale: ScaleVolumes::quick(),
        }
    }

    /// The default.
    pub fn full() -> Self {
        Self {
            stream: 256 << 20,
            hyper_calls: 20_000,
            hyper_warmup: 1000,
            fanout_per_session: 4 << 20,
            storm: 1000,
            scale: ScaleVolumes::full(),
        }
    }
}

/// Everything one run needs.
#[derive(Debug)]
pub struct Bench<'a> {
    /// The daemon binary.
    pub bin: &'a Path,
    /// Extra daemon arguments.
    pub extra: &'a [String],
    /// Data source.
    pub pattern: &'a Pattern,
    /// Volumes.
    pub vol: &'a Volumes,
    /// Only these figures (`None`: all of them).
    pub only: Option<&'a [String]>,
    /// Only these stdout message sizes (`None`: all of them).
    pub sizes: Option<&'a [usize]>,
}

/// The figures `--only` can name.
pub const FIGURES: [&str; 6] = ["stdout", "stdin", "hyper", "fanout", "storm", "scaling"];

impl Bench<'_> {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_none_or(|o| o.iter().any(|f| f == figure))
    }
}

struct Run<'a> {
    b: &'a Bench<'a>,
    tmp: TempDir,
    d: Daemon,
    m: Metrics,
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

pub(crate) fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

pub(crate) fn check(what: &str, got: Digest, want: Digest) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "WRONG BYTES in {what}: sent {want}, received {got}"
        ))
    }
}

pub(crate) fn check_exit(what: &str, got: Option<u8>, want: u8) -> Result<(), String> {
    if got == Some(want) {
        Ok(())
    } else {
        Err(format!("{what}: exit code {got:?}, expected {want}"))
    }
}

fn pair() -> Result<(UnixStream, UnixStream), String> {
    let (a, b) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("socket timeouts: {e}"))?;
    }
    Ok((a, b))
}

/// Run `write` on a thread and `read` here; if the reader fails, shut
/// `wsock` down so that a blocked writer returns.
fn pump<W, R, T>(wsock: &UnixStream, write: W, read: R) -> Result<T, String>
where
    W: FnOnce() -> Result<(), String> + Send,
    R: FnOnce() -> Result<T, String>,
{
    pump_with(
        || {
            let _ = wsock.shutdown(std::net::Shutdown::Both);
        },
        write,
        read,
    )
}

/// [`pump`], with `abort` run when the reader fails (to unblock a writer
/// of several sockets).
fn pump_with<A, W, R, T>(abort: A, write: W, read: R) -> Result<T, String>
where
    A: FnOnce(),
    W: FnOnce() -> Result<(), String> + Send,
    R: FnOnce() -> Result<T, String>,
{
    std::thread::scope(|sc| {
        let w = sc.spawn(write);
        let r = read();
        if r.is_err() {
            abort();
        }
        let w = w
            .join()
            .unwrap_or_else(|_| Err("the writer thread panicked".into()));
        let r = r?;
        w.map(|()| r)
    })
}

/// The direct baseline of a stream: `n` messages of `cycle`, then `tail`,
/// written into one end of a socket pair and drained from the other into
/// `sink`. Returns when the writing started, and the CPU seconds of the
/// writing thread and of the reading one (this) while they did.
fn through_pair<S: Sink>(
    cycle: &Cycle,
    n: u64,
    tail: &[u8],
    sink: &mut S,
) -> Result<(Instant, [f64; 2]), String> {
    let (a, b) = pair()?;
    let mut rb = RecvBuf::new(BIG_BUF);
    let writer_cpu = OnceLock::new();
    let t0 = Instant::now();
    let ((), reader_cpu) = pump(
        &a,
        || {
            let ((), c) = on_thread_cpu(|| cycle.write(&mut &a, n, tail))?;
            let _ = writer_cpu.set(c);
            Ok(())
        },
        || on_thread_cpu(|| drain(&mut &b, &mut rb, sink)),
    )?;
    let writer_cpu = writer_cpu.get().copied().unwrap_or(f64::NAN);
    Ok((t0, [writer_cpu, reader_cpu]))
}

fn elapsed(t0: Instant, done: Option<Instant>) -> Result<f64, String> {
    let done = done.ok_or("the reader finished without its data")?;
    Ok(done.duration_since(t0).as_secs_f64().max(1e-9))
}

/// `newcontainer` data with stdio left for the daemon to relocate.
pub(crate) fn newcontainer_data(id: &str) -> String {
    serde_json::json!({
        "id": id,
        "rootfs": "rootfs",
        "image": "busybox",
        "process": {
            "terminal": false,
            "stdio": 0,
            "stderr": 0,
            "args": ["cat"],
            "envs": [{"env": "PATH", "value": "/bin"}],
            "workdir": "/"
        }
    })
    .to_string()
}

/// `newcontainer` with `token` through `rt`; `started` gives what the
/// agent saw of it. Returns the seq the daemon gave its stdio.
pub(crate) fn start_process(
    rt: &mut Conn,
    started: impl FnOnce() -> Result<crate::agent::Started, String>,
    token: &str,
    id: &str,
) -> Result<u64, String> {
    rt.hyper("newcontainer", Some(token), &newcontainer_data(id))?;
    let s = started()?;
    if s.id != id || s.stdio < 3 || s.stderr != s.stdio + 1 {
        return Err(format!(
            "newcontainer {id} reached the agent relocated as {s:?}"
        ));
    }
    Ok(s.stdio)
}

/// Run one of everything against a fresh daemon.
pub fn run_once(b: &Bench<'_>) -> Result<Metrics, String> {
    let busy0 = machine_busy_seconds()?;
    let self0 = self_cpu();
    let t0 = Instant::now();
    let tmp = TempDir::new()?;
    let d = Daemon::start(b.bin, tmp.path(), b.extra)?;
    let mut r = Run {
        b,
        tmp,
        d,
        m: Metrics::new(),
    };
    let res = r.all().and_then(|()| {
        // What the rest of the machine used meanwhile: the bench and the
        // daemon are not alone on a shared host, and their figures say so.
        let other = machine_busy_seconds()?
            - busy0
            - (self_cpu() - self0)
            - r.m.get("cpu_run_s").copied().unwrap_or(0.0);
        let load = (other / t0.elapsed().as_secs_f64()).max(0.0);
        r.set("other_load_cpus", load);
        if load > 0.2 {
            eprintln!(
                "  warning: other processes kept {load:.2} CPUs busy during this run; its figures are disturbed"
            );
        } else {
            eprintln!("  other processes: {load:.2} CPUs busy on average");
        }
        Ok(())
    });
    match res {
        Ok(()) => {
            let s = r.d.shutdown()?;
            if !s.success() {
                return Err(format!(
                    "cc-proxy exited with {s} after SIGTERM{}",
                    r.d.log_tail()
                ));
            }
            let mut m = r.m;
            if b.wants("scaling") {
                scaling::run(b, &mut m)?;
            }
            Ok(m)
        }
        Err(e) => {
            let alive = r.d.check_alive().err().unwrap_or_default();
            Err(format!("{e}{}{}", alive, r.d.log_tail()))
        }
    }
}

impl Run<'_> {
    fn set(&mut self, k: &str, v: f64) {
        self.m.insert(k.to_string(), v);
    }

    /// VmRSS in MiB; RssAnon, RssFile and Pss go into the metrics as
    /// `<key>.anon`, `<key>.file` and `<key>.pss`.
    fn rss_mib(&mut self, key: &str) -> Result<f64, String> {
        let rss = self.d.rss_kib()? as f64 / 1024.0;
        let (anon, file) = self.d.rss_parts_kib()?;
        self.set(key, rss);
        self.set(&format!("{key}.anon"), anon as f64 / 1024.0);
        self.set(&format!("{key}.file"), file as f64 / 1024.0);
        if let Ok(pss) = self.d.pss_kib() {
            self.set(&format!("{key}.pss"), pss as f64 / 1024.0);
        }
        Ok(rss)
    }

    fn all(&mut self) -> Result<(), String> {
        settle();
        let idle = self.rss_mib("rss_idle_mib")?;

        let mut agent = Agent::start(&self.tmp.path().join("vm-io"))?;
        let mut rt = Conn::connect(&self.d.socket, 64 << 10)?;
        let tokens = rt.register_vm(
            "bench-io",
            &agent.ctl_path,
            &agent.io_path,
            STDOUT_SIZES.len() as u32 + 1,
        )?;
        agent.io()?;
        settle();
        let one = self.rss_mib("rss_one_vm_mib")?;
        eprintln!("  RSS: idle {idle:.2} MiB, one VM {one:.2} MiB");

        if self.b.wants("storm") {
            self.storm()?;
        }

        for (i, &size) in STDOUT_SIZES.iter().enumerate() {
            // fan-out is compared with the direct stdout at 4096 bytes.
            if !self.b.wants("stdout") {
                if size == 4096 && self.b.wants("fanout") {
                    let (d, _) = self.stdout_direct(size)?;
                    self.set(&format!("stdout_{size}.direct"), d);
                }
                continue;
            }
            if self.b.sizes.is_some_and(|s| !s.contains(&size)) {
                continue;
            }
            let p = self.stdout_proxy(&mut rt, &mut agent, &tokens[i], size)?;
            let (d, direct_cpu) = self.stdout_direct(size)?;
            self.set(&format!("stdout_{size}.proxy"), p);
            self.set(&format!("stdout_{size}.direct"), d);
            eprintln!(
                "  stdout {size:>5}-byte messages: proxy {p:8.1} MiB/s, direct {d:8.1} MiB/s ({:.2}x)",
                p / d
            );
            self.set(&format!("cpu_per_gib.stdout_{size}.direct"), direct_cpu);
            if size == RELAY_SIZE {
                let r = self.stdout_relay(size)?;
                self.set(&format!("stdout_{size}.relay"), r);
                let k = format!("cpu_per_gib.stdout_{size}");
                let (daemon, relay, direct) = (
                    self.m[&k],
                    self.m[&format!("{k}.relay")],
                    self.m[&format!("{k}.direct")],
                );
                eprintln!(
                    "  stdout {size:>5}-byte messages, CPU per GiB: daemon {daemon:.3} s, minimal relay thread \
                     {relay:.3} s ({:.2}x); direct pair's writer + reader {direct:.3} s; relay {r:.1} MiB/s",
                    daemon / relay
                );
            }
        }

        if self.b.wants("stdin") {
            let p = self.stdin_proxy(&mut rt, &mut agent, &tokens[STDOUT_SIZES.len()])?;
            let d = self.stdin_direct()?;
            self.set("stdin_4096.proxy", p);
            self.set("stdin_4096.direct", d);
            eprintln!(
                "  stdin 4 KiB frames:            proxy {p:8.1} MiB/s, direct {d:8.1} MiB/s ({:.2}x)",
                p / d
            );
        }

        if self.b.wants("hyper") {
            self.hyper(&mut rt, &agent, "")?;
            // Again with the daemon and every thread of the bench on one
            // CPU: no wake-up crosses CPUs, so what is left is what the
            // software costs (reported, not judged).
            let all = affinity()?;
            if let Some(cpu) = first_of_several(&all) {
                let pids = [std::process::id(), self.d.pid()];
                // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
                let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                // SAFETY: `cpu` is below CPU_SETSIZE.
                unsafe { libc::CPU_SET(cpu, &mut one) };
                set_affinity(&pids, &one)?;
                let r = self.hyper(&mut rt, &agent, "_pinned");
                set_affinity(&pids, &all)?;
                r?;
            }
        }
        if self.b.wants("fanout") {
            self.fanout()?;
        }

        rt.unregister_vm("bench-io")?;
        drop(agent);
        let cpu = self.d.cpu_seconds()?;
        self.set("cpu_run_s", cpu);
        eprintln!("  daemon CPU for the run: {cpu:.2} s");
        Ok(())
    }

    fn shim(&self, token: &str, buf: usize) -> Result<Conn, String> {
        let mut c = Conn::connect(&self.d.socket, buf)?;
        c.connect_shim(token)?;
        Ok(c)
    }

    /// `newcontainer` with `token`; the seq the daemon gave its stdio.
    fn start_process(rt: &mut Conn, agent: &Agent, token: &str, id: &str) -> Result<u64, String> {
        start_process(rt, || agent.next_started(), token, id)
    }

    /// The daemon's and the harness's CPU seconds, and the daemon's write
    /// syscalls, so far.
    fn cpu_now(&self) -> Result<(f64, f64, u64), String> {
        Ok((self.d.cpu_precise()?, self_cpu(), self.d.write_syscalls()?))
    }

    /// Record the daemon's and the harness's CPU seconds since `cpu0`;
    /// returns the daemon's.
    fn cpu_since(&mut self, key: &str, cpu0: (f64, f64, u64)) -> Result<f64, String> {
        let (d, h, w) = self.cpu_now()?;
        let (d, h) = (d - cpu0.0, h - cpu0.1);
        self.set(&format!("cpu.{key}"), d);
        self.set(&format!("harness_cpu.{key}"), h);
        self.set(
            &format!("daemon_writes.{key}"),
            w.saturating_sub(cpu0.2) as f64,
        );
        Ok(d)
    }

    // ----- stdout -----

    fn stdout_proxy(
        &mut self,
        rt: &mut Conn,
        agent: &mut Agent,
        token: &str,
        size: usize,
    ) -> Result<f64, String> {
        let what = format!("stdout through the proxy, {size}-byte messages");
        let mut shim = self.shim(token, BIG_BUF)?;
        let seq = Self::start_process(rt, agent, token, &format!("stdout-{size}"))?;
        let cycle = Cycle::new(self.b.pattern, Framing::Io, &[seq], size, CYCLE_BYTES);
        let n = self.b.vol.stream / size as u64;
        let want = cycle.expected(self.b.pattern, 1, n)[0];
        let code = (size % 200) as u8 + 1;
        let tail = io_exit(seq, code);
        let io = agent.io()?;
        let mut sink = ProxySink::new(Stream::Stdout, want.len, ProxyEnd::Exit);
        let cpu0 = self.cpu_now()?;
        let t0 = Instant::now();
        let Conn { s, rb } = &mut shim;
        pump(
            io,
            || cycle.write(&mut &*io, n, &tail),
            || drain(&mut &*s, rb, &mut sink),
        )
        .map_err(|e| format!("{what}: {e}"))?;
        let secs = elapsed(t0, sink.done_at)?;
        let cpu = self.cpu_since(&format!("stdout_{size}"), cpu0)?;
        self.set(&format!("cpu_per_gib.stdout_{size}"), cpu / gib(want.len));
        check(&what, sink.digest(), want)?;
        check_exit(&what, sink.exit, code)?;
        shim.disconnect_shim()?;
        Ok(mib(want.len) / secs)
    }

    /// MiB/s, and the CPU its writer and reader threads took per GiB (their
    /// CPU seconds are in `thread_cpu.stdout_{size}_direct.*`).
    fn stdout_direct(&mut self, size: usize) -> Result<(f64, f64), String> {
        let what = format!("stdout over a direct socket, {size}-byte messages");
        let seq = 3;
        let cycle = Cycle::new(self.b.pattern, Framing::Io, &[seq], size, CYCLE_BYTES);
        let n = self.b.vol.stream / size as u64;
        let want = cycle.expected(self.b.pattern, 1, n)[0];
        let tail = io_exit(seq, 7);
        let mut sink = IoSink::new(seq, want.len, IoEnd::EofExit);
        let (t0, [wcpu, rcpu]) =
            through_pair(&cycle, n, &tail, &mut sink).map_err(|e| format!("{what}: {e}"))?;
        let secs = elapsed(t0, sink.done_at)?;
        check(&what, sink.digest(), want)?;
        check_exit(&what, sink.exit, 7)?;
        self.set(&format!("thread_cpu.stdout_{size}_direct.writer"), wcpu);
        self.set(&format!("thread_cpu.stdout_{size}_direct.reader"), rcpu);
        Ok((mib(want.len) / secs, (wcpu + rcpu) / gib(want.len)))
    }

    /// The floor of the stdout figure's CPU: no proxy; the same io stream,
    /// written the same way, through a socket pair to one thread that reads
    /// it in 64 KiB reads, parses the io messages and writes every read's
    /// worth of them as stdout frames in one `writev` to a socket pair, read
    /// and hashed by the same reader as the proxy's row. Returns MiB/s;
    /// records the relay thread's CPU (user + system, `getrusage`) from its
    /// first read to its last write, per GiB
    /// (`cpu_per_gib.stdout_{size}.relay`), and the writer's and reader's.
    fn stdout_relay(&mut self, size: usize) -> Result<f64, String> {
        let what = format!("stdout through a minimal relay thread, {size}-byte messages");
        let seq = 3;
        let cycle = Cycle::new(self.b.pattern, Framing::Io, &[seq], size, CYCLE_BYTES);
        let n = self.b.vol.stream / size as u64;
        let want = cycle.expected(self.b.pattern, 1, n)[0];
        let code = (size % 200) as u8 + 1;
        let tail = io_exit(seq, code);
        let (aw, ar) = pair()?;
        let (rw, sr) = pair()?;
        let mut rb = RecvBuf::new(BIG_BUF);
        let mut sink = ProxySink::new(Stream::Stdout, want.len, ProxyEnd::Exit);
        let writer_cpu = OnceLock::new();
        let t0 = Instant::now();
        let (relay_cpu, reader_cpu) = pump(
            &aw,
            || {
                let ((), c) = on_thread_cpu(|| cycle.write(&mut &aw, n, &tail))?;
                let _ = writer_cpu.set(c);
                Ok(())
            },
            || {
                std::thread::scope(|sc| {
                    let relay = sc.spawn(|| {
                        let r = on_thread_cpu(|| relay_stream(&ar, &rw, seq));
                        if r.is_err() {
                            // Unblock the writer and the reader.
                            let _ = ar.shutdown(std::net::Shutdown::Both);
                            let _ = rw.shutdown(std::net::Shutdown::Both);
                        }
                        r.map(|((), c)| c)
                    });
                    let r = on_thread_cpu(|| drain(&mut &sr, &mut rb, &mut sink));
                    if r.is_err() {
                        let _ = ar.shutdown(std::net::Shutdown::Both);
                        let _ = rw.shutdown(std::net::Shutdown::Both);
                    }
                    let relayed = relay
                        .join()
                        .unwrap_or_else(|_| Err("the relay thread panicked".into()))
                        .map_err(|e| format!("relay: {e}"));
                    let ((), reader_cpu) = r?;
                    Ok((relayed?, reader_cpu))
                })
            },
        )
        .map_err(|e| format!("{what}: {e}"))?;
        let secs = elapsed(t0, sink.done_at)?;
        check(&what, sink.digest(), want)?;
        check_exit(&what, sink.exit, code)?;
        let key = format!("stdout_{size}_relay");
        self.set(&format!("thread_cpu.{key}.relay"), relay_cpu);
        self.set(
            &format!("thread_cpu.{key}.writer"),
            writer_cpu.get().copied().unwrap_or(f64::NAN),
        );
        self.set(&format!("thread_cpu.{key}.reader"), reader_cpu);
        self.set(
            &format!("cpu_per_gib.stdout_{size}.relay"),
            relay_cpu / gib(want.len),
        );
        Ok(mib(want.len) / secs)
    }

    // ----- stdin -----

    fn stdin_proxy(
        &mut self,
        rt: &mut Conn,
        agent: &mut Agent,
        token: &str,
    ) -> Result<f64, String> {
        let what = "stdin through the proxy, 4 KiB frames";
        let mut shim = self.shim(token, BIG_BUF)?;
        let seq = Self::start_process(rt, agent, token, "stdin")?;
        let (cycle, n, want, tail) = self.stdin_stream();
        let mut sink = IoSink::new(seq, want.len, IoEnd::Eof);
        let cpu0 = self.cpu_now()?;
        let t0 = Instant::now();
        {
            let (io, rb) = agent.io_reader()?;
            let s = &shim.s;
            pump(
                s,
                || cycle.write(&mut &*s, n, &tail),
                || drain(&mut &*io, rb, &mut sink),
            )
            .map_err(|e| format!("{what}: {e}"))?;
        }
        let secs = elapsed(t0, sink.done_at)?;
        self.cpu_since("stdin_4096", cpu0)?;
        check(what, sink.digest(), want)?;
        // The process exits; its shim hears of it.
        write_all(&mut agent.io()?, &io_exit(seq, 42))?;
        let mut exit = ProxySink::new(Stream::Stdout, 0, ProxyEnd::Exit);
        let Conn { s, rb } = &mut shim;
        drain(&mut &*s, rb, &mut exit).map_err(|e| format!("{what}, exit: {e}"))?;
        check_exit(what, exit.exit, 42)?;
        shim.disconnect_shim()?;
        Ok(mib(want.len) / secs)
    }

    /// The stdin figure's stream, the same through the proxy and direct:
    /// 4 KiB stdin frames, how many, their digest, and the EOF frame.
    fn stdin_stream(&self) -> (Cycle, u64, Digest, [u8; proxy_proto::HEADER_LEN]) {
        let cycle = Cycle::new(
            self.b.pattern,
            Framing::Stdin,
            &[0],
            STDIN_SIZE,
            CYCLE_BYTES,
        );
        let n = self.b.vol.stream / STDIN_SIZE as u64;
        let want = cycle.expected(self.b.pattern, 1, n)[0];
        (cycle, n, want, stream_header(Stream::Stdin, 0))
    }

    fn stdin_direct(&mut self) -> Result<f64, String> {
        let what = "stdin over a direct socket, 4 KiB frames";
        let (cycle, n, want, tail) = self.stdin_stream();
        let mut sink = ProxySink::new(Stream::Stdin, want.len, ProxyEnd::EmptyFrame);
        let (t0, _) =
            through_pair(&cycle, n, &tail, &mut sink).map_err(|e| format!("{what}: {e}"))?;
        let secs = elapsed(t0, sink.done_at)?;
        check(what, sink.digest(), want)?;
        Ok(mib(want.len) / secs)
    }

    // ----- Hyper round trips -----

    /// Hyper round trips, their metrics keyed `hyper{tag}_*`.
    fn hyper(&mut self, rt: &mut Conn, agent: &Agent, tag: &str) -> Result<(), String> {
        let payload =
            json(&Hyper::new("ping", vec![], Some("{}")).map_err(|e| format!("Hyper: {e}"))?)?;
        let req = Frame::command(Command::Hyper, payload.clone()).to_bytes();
        let (warm, n) = (self.b.vol.hyper_warmup, self.b.vol.hyper_calls);
        let blocks = HYPER_BLOCKS.min(n.max(1));
        let pings0 = agent.pings();

        // Direct: the same request frame to a peer thread that answers each
        // with a response frame of the same size as the proxy's.
        let (a, b) = pair()?;
        // The floor for any proxy: the same, through a thread that relays
        // each frame as it is (no parsing, blocking reads and writes, no
        // event loop): one more hop each way, and nothing else.
        let (c, r1) = pair()?;
        let (r2, b2) = pair()?;
        let answer = Header::new(
            FrameKind::Response {
                command: Command::Hyper,
                error: false,
            },
            0,
        )
        .to_bytes();
        let want = warm + n + blocks * BLOCK_WARMUP;
        let peer = |b: &UnixStream| -> Result<(), String> {
            let rb = &mut RecvBuf::new(64 << 10);
            let mut answered = 0;
            loop {
                let Some((kind, at, total)) = next_frame(rb, &mut &*b)? else {
                    return if answered == want {
                        Ok(())
                    } else {
                        Err(format!("the peer answered {answered} of {want} calls"))
                    };
                };
                if kind != FrameKind::Command(Command::Hyper) || rb.data()[at..total] != payload[..]
                {
                    return Err("WRONG BYTES in the direct Hyper request".into());
                }
                rb.consume(total);
                write_all(&mut &*b, &answer)?;
                answered += 1;
            }
        };
        let relay = || -> Result<(), String> {
            let (rq, rs) = (&mut RecvBuf::new(64 << 10), &mut RecvBuf::new(64 << 10));
            let relayed = (|| {
                while let Some((_, _, total)) = next_frame(rq, &mut &r1)? {
                    write_all(&mut &r2, &rq.data()[..total])?;
                    rq.consume(total);
                    let (_, _, total) =
                        next_frame(rs, &mut &r2)?.ok_or("the relay's peer closed")?;
                    write_all(&mut &r1, &rs.data()[..total])?;
                    rs.consume(total);
                }
                Ok(())
            })();
            let _ = r2.shutdown(std::net::Shutdown::Write);
            relayed
        };

        // Blocks of proxy, direct and relayed calls alternate, so that all
        // see the same scheduling (where the kernel puts the threads decides
        // much of a round trip on a small host).
        let mut d_rb = RecvBuf::new(64 << 10);
        let mut f_rb = RecvBuf::new(64 << 10);
        let Conn { s, rb } = rt;
        let mut sides = [
            Side::new("Hyper ping", s, rb, n),
            Side::new("direct", &a, &mut d_rb, n),
            Side::new("relayed", &c, &mut f_rb, n),
        ];
        let mut cpu = (0.0, 0.0);
        let mut calls = || -> Result<(), String> {
            for side in &mut sides {
                side.untimed(&req, warm)?;
            }
            for k in 0..blocks {
                let calls = n * (k + 1) / blocks - n * k / blocks;
                for (i, side) in sides.iter_mut().enumerate() {
                    // Untimed calls first: switching sides moves threads
                    // between CPUs, and that transient belongs to none. The
                    // proxy's CPU counters are read before them, not
                    // between them and the timed calls (reading /proc there
                    // slowed the first timed calls of every block).
                    let c0 = if i == 0 { Some(self.cpu_now()?) } else { None };
                    side.untimed(&req, BLOCK_WARMUP)?;
                    side.timed(&req, calls)?;
                    if let Some(c0) = c0 {
                        let c1 = self.cpu_now()?;
                        cpu.0 += c1.0 - c0.0;
                        cpu.1 += c1.1 - c0.1;
                    }
                }
            }
            Ok(())
        };
        std::thread::scope(|sc| {
            let peers = [
                sc.spawn(|| peer(&b)),
                sc.spawn(|| peer(&b2)),
                sc.spawn(relay),
            ];
            let r = calls();
            // EOF (or, after a failure, a shutdown) ends the helper threads.
            for sock in [&a, &c] {
                let how = if r.is_ok() {
                    std::net::Shutdown::Write
                } else {
                    std::net::Shutdown::Both
                };
                let _ = sock.shutdown(how);
            }
            if r.is_err() {
                let _ = r2.shutdown(std::net::Shutdown::Both);
            }
            let mut helpers = Ok(());
            for (p, what) in peers
                .into_iter()
                .zip(["direct peer", "relayed peer", "relay"])
            {
                let done = p
                    .join()
                    .unwrap_or_else(|_| Err("the thread panicked".into()))
                    .map_err(|e| format!("{what}: {e}"));
                if helpers.is_ok() {
                    helpers = done;
                }
            }
            r.and(helpers)
        })?;
        self.set(&format!("cpu.hyper{tag}"), cpu.0);
        self.set(&format!("harness_cpu.hyper{tag}"), cpu.1);
        let answered = agent.pings() - pings0;
        let calls = warm + n + blocks * BLOCK_WARMUP;
        if answered != calls as u64 {
            return Err(format!(
                "Hyper ping: {calls} calls answered, but the agent saw {answered} pings with data {{}}"
            ));
        }
        let [proxy, direct, relayed] = sides.map(Side::rtt);
        for (k, (p, d, f)) in [
            ("p50_us", (proxy.p50_us, direct.p50_us, relayed.p50_us)),
            ("p99_us", (proxy.p99_us, direct.p99_us, relayed.p99_us)),
            ("calls_s", (proxy.calls_s, direct.calls_s, relayed.calls_s)),
        ] {
            let k = format!("hyper{tag}_{k}");
            self.set(&format!("{k}.proxy"), p);
            self.set(&format!("{k}.direct"), d);
            self.set(&format!("{k}.relay"), f);
        }
        eprintln!(
            "  Hyper ping{tag}:  proxy p50 {:.1} µs p99 {:.1} µs {:.0}/s; direct p50 {:.1} µs p99 {:.1} µs {:.0}/s; \
             minimal relay p50 {:.1} µs p99 {:.1} µs",
            proxy.p50_us,
            proxy.p99_us,
            proxy.calls_s,
            direct.p50_us,
            direct.p99_us,
            direct.calls_s,
            relayed.p50_us,
            relayed.p99_us
        );
        Ok(())
    }

    // ----- fan-out -----

    /// The fan-out rows: through the proxy with one OS thread per shim and
    /// with every shim a task of one tokio thread, and the relay floor (a
    /// minimal demultiplexing thread instead of the proxy) under the same
    /// OS-thread readers. Keys `fanout_threads`, `fanout_tokio`,
    /// `fanout_relay` (`.proxy`).
    fn fanout(&mut self) -> Result<(), String> {
        let t = self.fanout_proxy(Readers::Threads)?;
        let k = self.fanout_proxy(Readers::Tokio)?;
        let r = self.fanout_relay()?;
        let c = self.fanout_ceiling()?;
        self.set("fanout_threads.proxy", t);
        self.set("fanout_tokio.proxy", k);
        self.set("fanout_relay.proxy", r);
        self.set("fanout_ceiling.proxy", c);
        eprintln!(
            "  fan-out {FANOUT_SESSIONS} sessions x {:.2} MiB: proxy, a thread per shim {t:8.1} MiB/s; \
             proxy, shims on one tokio thread {k:8.1} MiB/s; relay floor {r:8.1} MiB/s; \
             no proxy (ceiling) {c:8.1} MiB/s",
            mib(self.b.vol.fanout_per_session)
        );
        Ok(())
    }

    /// The fan-out stream: 4096-byte io messages of every session in
    /// turn, the digests each session must receive, and the exits.
    fn fanout_stream(&self, seqs: &[u64]) -> (Cycle, u64, Vec<Digest>, Vec<u8>) {
        let cycle = Cycle::new(self.b.pattern, Framing::Io, seqs, FANOUT_SIZE, 4 << 20);
        let n = seqs.len() as u64 * (self.b.vol.fanout_per_session / FANOUT_SIZE as u64);
        let want = cycle.expected(self.b.pattern, seqs.len(), n);
        let mut tail = Vec::new();
        for (i, &seq) in seqs.iter().enumerate() {
            tail.extend_from_slice(&io_exit(seq, i as u8 + 1));
        }
        (cycle, n, want, tail)
    }

    /// Check every session's bytes and exit code; aggregate MiB/s.
    fn fanout_result(
        what: &str,
        sinks: &[ProxySink],
        want: &[Digest],
        t0: Instant,
    ) -> Result<f64, String> {
        let mut done = t0;
        let mut total = 0;
        for (i, s) in sinks.iter().enumerate() {
            check(&format!("{what}, session {i}"), s.digest(), want[i])?;
            check_exit(&format!("{what}, session {i}"), s.exit, i as u8 + 1)?;
            done = done.max(s.done_at.ok_or("a session finished without its data")?);
            total += want[i].len;
        }
        let secs = done.duration_since(t0).as_secs_f64().max(1e-9);
        Ok(mib(total) / secs)
    }

    fn fanout_proxy(&mut self, readers: Readers) -> Result<f64, String> {
        let (what, key, buf) = match readers {
            Readers::Threads => (
                "fan-out through the proxy, a thread per shim",
                "fanout_threads",
                SHIM_READ,
            ),
            Readers::Tokio => (
                "fan-out through the proxy, shims on one tokio thread",
                "fanout_tokio",
                256 << 10,
            ),
        };
        let mut agent = Agent::start(&self.tmp.path().join(format!("vm-{key}")))?;
        let mut rt = Conn::connect(&self.d.socket, 64 << 10)?;
        let vm = format!("bench-{key}");
        let tokens =
            rt.register_vm(&vm, &agent.ctl_path, &agent.io_path, FANOUT_SESSIONS as u32)?;
        let mut shims = Vec::with_capacity(FANOUT_SESSIONS);
        let mut seqs = Vec::with_capacity(FANOUT_SESSIONS);
        for (i, t) in tokens.iter().enumerate() {
            shims.push(self.shim(t, buf)?);
            seqs.push(Self::start_process(
                &mut rt,
                &agent,
                t,
                &format!("{key}-{i}"),
            )?);
        }
        let (cycle, n, want, tail) = self.fanout_stream(&seqs);
        let io = agent.io()?;
        let cpu0 = self.cpu_now()?;
        let t0 = Instant::now();
        let sinks = match readers {
            Readers::Threads => {
                let socks: Vec<(UnixStream, RecvBuf)> =
                    shims.into_iter().map(|c| (c.s, c.rb)).collect();
                pump(
                    io,
                    || cycle.write(&mut &*io, n, &tail),
                    || read_threads(socks, &want),
                )
            }
            Readers::Tokio => {
                let rtm = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("tokio runtime: {e}"))?;
                let tasks = spawn_tokio_readers(&rtm, shims, &want)?;
                pump(
                    io,
                    || cycle.write(&mut &*io, n, &tail),
                    || {
                        rtm.block_on(async {
                            let all = async {
                                let mut out = Vec::with_capacity(tasks.len());
                                for (i, t) in tasks.into_iter().enumerate() {
                                    let s = t
                                        .await
                                        .map_err(|e| format!("session {i}: {e}"))?
                                        .map_err(|e| format!("session {i}: {e}"))?;
                                    out.push(s);
                                }
                                Ok::<_, String>(out)
                            };
                            tokio::time::timeout(IO_TIMEOUT, all)
                                .await
                                .map_err(|_| "timed out".to_string())?
                        })
                    },
                )
            }
        }
        .map_err(|e| format!("{what}: {e}"))?;
        let v = Self::fanout_result(what, &sinks, &want, t0)?;
        self.cpu_since(key, cpu0)?;
        rt.unregister_vm(&vm)?;
        Ok(v)
    }

    /// The floor of any fan-out: the same io stream through a socket pair
    /// to one thread that reads it in 1 MiB reads, parses the io messages
    /// and writes each as one stdout frame (`writev` of header and data)
    /// to its session's socket pair; the ends of the processes become
    /// ProcessExited frames. The same OS-thread readers as the proxy's row
    /// read and hash them.
    fn fanout_relay(&mut self) -> Result<f64, String> {
        let what = "fan-out through a minimal relay thread";
        let seqs: Vec<u64> = (0..FANOUT_SESSIONS as u64).map(|i| 3 + 2 * i).collect();
        let (cycle, n, want, tail) = self.fanout_stream(&seqs);
        let (aw, ar) = pair()?;
        let mut relay_ends = Vec::with_capacity(FANOUT_SESSIONS);
        let mut socks = Vec::with_capacity(FANOUT_SESSIONS);
        for _ in 0..FANOUT_SESSIONS {
            let (r, s) = pair()?;
            relay_ends.push(r);
            socks.push((s, RecvBuf::new(SHIM_READ)));
        }
        let t0 = Instant::now();
        let sinks = pump(
            &aw,
            || cycle.write(&mut &aw, n, &tail),
            || {
                std::thread::scope(|sc| {
                    let relay = sc.spawn(|| relay_io(&ar, &relay_ends, &seqs));
                    let r = read_threads(socks, &want);
                    if r.is_err() {
                        let _ = ar.shutdown(std::net::Shutdown::Both);
                        for s in &relay_ends {
                            let _ = s.shutdown(std::net::Shutdown::Both);
                        }
                    }
                    let relayed = relay
                        .join()
                        .unwrap_or_else(|_| Err("the relay thread panicked".into()))
                        .map_err(|e| format!("relay: {e}"));
                    let r = r?;
                    relayed.map(|()| r)
                })
            },
        )
        .map_err(|e| format!("{what}: {e}"))?;
        Self::fanout_result(what, &sinks, &want, t0)
    }

    /// The ceiling of any fan-out: no agent socket, no proxy and nothing
    /// to parse. One thread walks the same messages in memory and writes
    /// each session's stdout frames straight to that session's socket,
    /// [`CEILING_BATCH`] bytes at a time (the largest batch the proxy's
    /// writers cork), then its ProcessExited; the same OS-thread readers
    /// read and hash them. A proxy does all of this and more (it also
    /// reads the agent's socket), so it cannot be faster.
    fn fanout_ceiling(&mut self) -> Result<f64, String> {
        let what = "fan-out with no proxy";
        let seqs: Vec<u64> = (0..FANOUT_SESSIONS as u64).map(|i| 3 + 2 * i).collect();
        let (cycle, n, want, _) = self.fanout_stream(&seqs);
        let mut ends = Vec::with_capacity(FANOUT_SESSIONS);
        let mut socks = Vec::with_capacity(FANOUT_SESSIONS);
        for _ in 0..FANOUT_SESSIONS {
            let (w, r) = pair()?;
            ends.push(w);
            socks.push((r, RecvBuf::new(SHIM_READ)));
        }
        let write = || -> Result<(), String> {
            let mut pending: Vec<Vec<u8>> = (0..FANOUT_SESSIONS)
                .map(|_| Vec::with_capacity(CEILING_BATCH + FANOUT_SIZE + HEADER_LEN))
                .collect();
            for m in 0..n {
                let (i, data) = cycle.message(m);
                let p = &mut pending[i];
                p.extend_from_slice(&stream_header(Stream::Stdout, data.len()));
                p.extend_from_slice(data);
                if p.len() >= CEILING_BATCH {
                    write_all(&mut &ends[i], p)?;
                    p.clear();
                }
            }
            let exited = FrameKind::Notification(Notification::ProcessExited);
            for (i, p) in pending.iter_mut().enumerate() {
                p.extend_from_slice(&Header::new(exited, 1).to_bytes());
                p.push(i as u8 + 1);
                write_all(&mut &ends[i], p)?;
            }
            Ok(())
        };
        let t0 = Instant::now();
        let abort = || {
            for s in &ends {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        };
        let sinks = pump_with(abort, write, || read_threads(socks, &want))
            .map_err(|e| format!("{what}: {e}"))?;
        Self::fanout_result(what, &sinks, &want, t0)
    }

    // ----- connect storm -----

    fn storm(&mut self) -> Result<(), String> {
        let n = self.b.vol.storm;
        let mut agent = Agent::start(&self.tmp.path().join("vm-storm"))?;
        let mut rt = Conn::connect(&self.d.socket, 64 << 10)?;
        let tokens = rt.register_vm("bench-storm", &agent.ctl_path, &agent.io_path, n as u32)?;
        agent.io()?;
        let frames = tokens
            .iter()
            .map(|t| Ok(Frame::command(Command::ConnectShim, connect_shim_payload(t)?).to_bytes()))
            .collect::<Result<Vec<_>, String>>()?;
        let cpu0 = self.cpu_now()?;
        let t0 = Instant::now();
        let mut conns = Vec::with_capacity(n);
        for f in &frames {
            let s = UnixStream::connect(&self.d.socket)
                .map_err(|e| format!("connect storm: connect #{}: {e}", conns.len()))?;
            write_all(&mut &s, f)?;
            conns.push(s);
        }
        let mut rb = RecvBuf::new(4096);
        for (i, s) in conns.iter().enumerate() {
            s.set_read_timeout(Some(IO_TIMEOUT))
                .map_err(|e| format!("timeout: {e}"))?;
            let (kind, total) = loop {
                if let Some((kind, _, total)) = proxy_frame(rb.data())? {
                    break (kind, total);
                }
                if rb.read_from(&mut &*s)? == 0 {
                    return Err(format!("connect storm: shim #{i} closed without an answer"));
                }
            };
            rb.consume(total);
            let ok = FrameKind::Response {
                command: Command::ConnectShim,
                error: false,
            };
            if kind != ok || !rb.data().is_empty() {
                return Err(format!("connect storm: shim #{i} got {kind:?}"));
            }
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        self.cpu_since("storm", cpu0)?;
        settle();
        let rss = self.rss_mib("rss_1000_shims_mib")?;
        self.set("storm_ms.proxy", ms);
        eprintln!("  connect storm: {n} shims answered in {ms:.1} ms; RSS with them {rss:.2} MiB");
        drop(conns);
        rt.unregister_vm("bench-storm")?;
        Ok(())
    }
}

/// One blocking reader thread per socket, each hashing the stdout frames
/// of its session until ProcessExited.
pub(crate) fn read_threads(
    socks: Vec<(UnixStream, RecvBuf)>,
    want: &[Digest],
) -> Result<Vec<ProxySink>, String> {
    std::thread::scope(|sc| {
        let mut hs = Vec::with_capacity(socks.len());
        for (i, ((s, mut rb), w)) in socks.into_iter().zip(want).enumerate() {
            let h = std::thread::Builder::new()
                .name(format!("shim-{i}"))
                .stack_size(256 << 10)
                .spawn_scoped(sc, move || {
                    let mut sink = ProxySink::new(Stream::Stdout, w.len, ProxyEnd::Exit);
                    let r = drain(&mut &s, &mut rb, &mut sink);
                    if r.is_err() {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    r.map(|()| sink)
                })
                .map_err(|e| format!("spawn a shim thread: {e}"))?;
            hs.push(h);
        }
        let mut out = Vec::with_capacity(hs.len());
        let mut first_err = None;
        for (i, h) in hs.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(s)) => out.push(s),
                Ok(Err(e)) => {
                    first_err.get_or_insert(format!("session {i}: {e}"));
                }
                Err(_) => {
                    first_err.get_or_insert(format!("session {i}: the thread panicked"));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    })
}

/// The shims as tasks of `rtm` (one thread), each hashing its session.
#[allow(clippy::type_complexity)]
fn spawn_tokio_readers(
    rtm: &tokio::runtime::Runtime,
    shims: Vec<Conn>,
    want: &[Digest],
) -> Result<Vec<tokio::task::JoinHandle<Result<ProxySink, String>>>, String> {
    let _g = rtm.enter();
    let mut tasks = Vec::with_capacity(shims.len());
    for (shim, w) in shims.into_iter().zip(want) {
        let Conn { s, mut rb } = shim;
        s.set_nonblocking(true)
            .map_err(|e| format!("set_nonblocking: {e}"))?;
        let mut s =
            tokio::net::UnixStream::from_std(s).map_err(|e| format!("tokio socket: {e}"))?;
        let mut sink = ProxySink::new(Stream::Stdout, w.len, ProxyEnd::Exit);
        tasks.push(rtm.spawn(async move {
            loop {
                if sink.consume(&mut rb)? {
                    return Ok::<_, String>(sink);
                }
                let n = s
                    .read(rb.spare()?)
                    .await
                    .map_err(|e| format!("read: {e} ({})", sink.progress()))?;
                if n == 0 {
                    return Err(format!("closed ({})", sink.progress()));
                }
                rb.filled(n);
            }
        }));
    }
    Ok(tasks)
}

/// The relay floor's thread: io messages from `io` to stdout frames on
/// `outs[i]` for `seqs[i]`, until every session's process has exited (EOF,
/// then its one-byte exit code, as a ProcessExited frame).
fn relay_io(io: &UnixStream, outs: &[UnixStream], seqs: &[u64]) -> Result<(), String> {
    let index: std::collections::HashMap<u64, usize> =
        seqs.iter().enumerate().map(|(i, &s)| (s, i)).collect();
    let mut eof = vec![false; seqs.len()];
    let mut left = seqs.len();
    let mut rb = RecvBuf::new(SHIM_READ);
    while left > 0 {
        while let Some((seq, total)) = io_message(rb.data())? {
            let &i = index
                .get(&seq)
                .ok_or_else(|| format!("an io message for unknown seq {seq}"))?;
            let data = &rb.data()[IO_HEADER_LEN..total];
            if let Some((header, exited)) = shim_frame(&mut eof[i], data)? {
                write_two(&outs[i], &header, data)?;
                if exited {
                    left -= 1;
                }
            }
            rb.consume(total);
        }
        if left > 0 && rb.read_from(&mut &*io)? == 0 {
            return Err("the agent's io closed early".into());
        }
    }
    Ok(())
}

/// The header of the frame a relay sends a shim for one io message of its
/// session, followed by the message's data: a stdout frame for data, the
/// ProcessExited notification for the one-byte exit code after EOF (then
/// `true`: the session is over), nothing for the EOF itself. `eof`: whether
/// the session's EOF came (set here).
fn shim_frame(eof: &mut bool, data: &[u8]) -> Result<Option<([u8; HEADER_LEN], bool)>, String> {
    if *eof {
        if data.len() != 1 {
            return Err(format!("a {}-byte io message after EOF", data.len()));
        }
        let exited = FrameKind::Notification(Notification::ProcessExited);
        Ok(Some((Header::new(exited, 1).to_bytes(), true)))
    } else if data.is_empty() {
        *eof = true;
        Ok(None)
    } else {
        Ok(Some((stream_header(Stream::Stdout, data.len()), false)))
    }
}

/// The stdout relay floor's thread: the io messages of `seq` from `io`,
/// read at most [`RELAY_READ`] bytes at a time, to frames on `out` (as
/// [`shim_frame`] makes them), every read's worth in one `writev`, until
/// the process's exit.
fn relay_stream(io: &UnixStream, out: &UnixStream, seq: u64) -> Result<(), String> {
    // Room for a read of RELAY_READ after a partial message.
    let mut rb = RecvBuf::new(RELAY_READ + MAX_MESSAGE_LEN);
    let most = RELAY_READ / (IO_HEADER_LEN + 1) + 1;
    let mut headers: Vec<[u8; HEADER_LEN]> = Vec::with_capacity(most);
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(most);
    let mut eof = false;
    loop {
        let data = rb.data();
        let (mut at, mut exited) = (0, false);
        while let Some((s, total)) = io_message(&data[at..])? {
            if s != seq {
                return Err(format!("an io message for seq {s}, not {seq}"));
            }
            let body = (at + IO_HEADER_LEN, at + total);
            if let Some((header, last)) = shim_frame(&mut eof, &data[body.0..body.1])? {
                headers.push(header);
                spans.push(body);
                exited = last;
            }
            at += total;
            if exited {
                break;
            }
        }
        if exited && at != data.len() {
            return Err("io messages after the process's exit".into());
        }
        // One allocation per read (the slices borrow `rb`, which the next
        // read changes).
        let mut iov: Vec<IoSlice<'_>> = headers
            .iter()
            .zip(&spans)
            .flat_map(|(h, &(from, to))| [IoSlice::new(h), IoSlice::new(&data[from..to])])
            .collect();
        writev_all(out, &mut iov)?;
        headers.clear();
        spans.clear();
        rb.consume(at);
        if exited {
            return Ok(());
        }
        if rb.read_front(&mut &*io, RELAY_READ)? == 0 {
            return Err("the agent's io closed early".into());
        }
    }
}

/// `a` then `b` in one `writev` (more if the kernel took less).
fn write_two(s: &UnixStream, a: &[u8], b: &[u8]) -> Result<(), String> {
    writev_all(s, &mut [IoSlice::new(a), IoSlice::new(b)])
}

/// The CPUs this thread may run on.
fn affinity() -> Result<libc::cpu_set_t, String> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(format!(
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(set)
}

/// The first CPU of `set`, if it has more than one.
fn first_of_several(set: &libc::cpu_set_t) -> Option<usize> {
    // SAFETY: reading a valid cpu_set_t.
    if unsafe { libc::CPU_COUNT(set) } < 2 {
        return None;
    }
    (0..libc::CPU_SETSIZE as usize).find(|&c| {
        // SAFETY: reading a valid cpu_set_t; `c` is below CPU_SETSIZE.
        unsafe { libc::CPU_ISSET(c, set) }
    })
}

/// Set the CPUs of every thread of the processes `pids` (threads they
/// start later inherit it).
fn set_affinity(pids: &[u32], set: &libc::cpu_set_t) -> Result<(), String> {
    for pid in pids {
        let dir = format!("/proc/{pid}/task");
        let tasks = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
        for t in tasks.flatten() {
            let Some(tid) = t
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // SAFETY: `set` is a valid cpu_set_t of the size passed.
            let rc = unsafe {
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set)
            };
            if rc != 0 {
                return Err(format!(
                    "sched_setaffinity({tid}): {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
    }
    Ok(())
}

/// One path of the Hyper figure: its socket and receive buffer, and the
/// times of its timed round trips.
struct Side<'a> {
    name: &'static str,
    s: &'a UnixStream,
    rb: &'a mut RecvBuf,
    lat: Vec<u64>,
    secs: f64,
}

impl<'a> Side<'a> {
    fn new(name: &'static str, s: &'a UnixStream, rb: &'a mut RecvBuf, n: usize) -> Self {
        Self {
            name,
            s,
            rb,
            lat: Vec::with_capacity(n),
            secs: 0.0,
        }
    }

    fn untimed(&mut self, req: &[u8], n: usize) -> Result<(), String> {
        round_trips(self.s, self.rb, req, n, &mut Vec::new())
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", self.name))
    }

    fn timed(&mut self, req: &[u8], n: usize) -> Result<(), String> {
        self.secs += round_trips(self.s, self.rb, req, n, &mut self.lat)
            .map_err(|e| format!("{}: {e}", self.name))?;
        Ok(())
    }

    fn rtt(mut self) -> Rtt {
        Rtt::of(&mut self.lat, self.secs)
    }
}

/// Latency figures of a series of round trips.
#[derive(Debug, Clone, Copy)]
struct Rtt {
    p50_us: f64,
    p99_us: f64,
    calls_s: f64,
}

impl Rtt {
    /// From round-trip times (ns) and the seconds they took in all.
    fn of(lat: &mut [u64], secs: f64) -> Self {
        lat.sort_unstable();
        let pct = |p: usize| -> f64 {
            let i = (lat.len() * p / 100).min(lat.len().saturating_sub(1));
            lat.get(i).copied().unwrap_or(0) as f64 / 1000.0
        };
        Self {
            p50_us: pct(50),
            p99_us: pct(99),
            calls_s: lat.len() as f64 / secs.max(1e-9),
        }
    }
}

/// `n` sequential round trips: write `req`, read one response to Hyper
/// (empty payload, no error). Pushes each time (ns) to `lat`; returns the
/// seconds they took.
pub(crate) fn round_trips(
    s: &UnixStream,
    rb: &mut RecvBuf,
    req: &[u8],
    n: usize,
    lat: &mut Vec<u64>,
) -> Result<f64, String> {
    let ok = FrameKind::Response {
        command: Command::Hyper,
        error: false,
    };
    let t_start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        write_all(&mut &*s, req)?;
        let (kind, at, total) = next_frame(rb, &mut &*s)?.ok_or("closed")?;
        if kind != ok || at != total {
            return Err(format!(
                "call {i}: expected an empty Hyper response, got {kind:?} with {} bytes",
                total - at
            ));
        }
        rb.consume(total);
        lat.push(t.elapsed().as_nanos() as u64);
    }
    Ok(t_start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through [`relay_stream`]: the io stream a cycle writes, and what
    /// arrives at the shim's end.
    fn relayed(size: usize, n: u64, tail: &[u8]) -> (Result<(), String>, ProxySink, Digest) {
        let p = Pattern::new();
        let c = Cycle::new(&p, Framing::Io, &[3], size, 100_000);
        let want = c.expected(&p, 1, n)[0];
        let (aw, ar) = pair().unwrap();
        let (rw, sr) = pair().unwrap();
        let mut sink = ProxySink::new(Stream::Stdout, want.len, ProxyEnd::Exit);
        let relay = std::thread::scope(|sc| {
            let w = sc.spawn(|| c.write(&mut &aw, n, tail));
            let relay = sc.spawn(|| {
                let r = relay_stream(&ar, &rw, 3);
                // What a failed relay does: the reader sees the end.
                let _ = rw.shutdown(std::net::Shutdown::Both);
                let _ = ar.shutdown(std::net::Shutdown::Both);
                r
            });
            let mut rb = RecvBuf::new(BIG_BUF);
            let _ = drain(&mut &sr, &mut rb, &mut sink);
            let _ = w.join().unwrap();
            relay.join().unwrap()
        });
        (relay, sink, want)
    }

    #[test]
    fn the_stdout_relay_floor_delivers_every_byte_and_the_exit() {
        // 4108-byte messages straddle the 64 KiB reads; 10240-byte ones are
        // the largest.
        for size in [4096, 10228, 1] {
            let (r, sink, want) = relayed(size, 3000, &io_exit(3, 9));
            r.unwrap();
            assert_eq!(sink.digest(), want, "{size}-byte messages");
            assert_eq!(sink.exit, Some(9));
        }
    }

    #[test]
    fn the_stdout_relay_floor_refuses_another_seq() {
        let mut tail = io_exit(5, 1);
        tail.extend_from_slice(&io_exit(3, 9));
        let (r, sink, _) = relayed(4096, 100, &tail);
        let e = r.unwrap_err();
        assert!(e.contains("seq 5"), "{e}");
        assert_eq!(sink.exit, None);
    }

    #[test]
    fn shim_frames_of_a_session() {
        let mut eof = false;
        let (h, last) = shim_frame(&mut eof, b"abc").unwrap().unwrap();
        assert_eq!(h, stream_header(Stream::Stdout, 3));
        assert!(!last);
        assert!(shim_frame(&mut eof, b"").unwrap().is_none());
        assert!(eof);
        let (h, last) = shim_frame(&mut eof, &[7]).unwrap().unwrap();
        let exited = FrameKind::Notification(Notification::ProcessExited);
        assert_eq!(h, Header::new(exited, 1).to_bytes());
        assert!(last);
        assert!(shim_frame(&mut eof, b"xy").is_err());
    }
}
