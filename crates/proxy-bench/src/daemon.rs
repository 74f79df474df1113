//! The real `cc-proxy` as a child process, its RSS and CPU time from
//! `/proc`, and a short temporary directory for the sockets.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A directory under `/tmp` (short, for 107-byte socket paths), removed on
/// drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// `/tmp/proxy-bench-<pid>-<n>`.
    pub fn new() -> Result<Self, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "proxy-bench-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Self(p))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running daemon; killed on drop unless shut down.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pid: u32,
    /// Its listening socket.
    pub socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `bin -socket-path <dir>/proxy.sock -log warn -ksm off <extra…>`,
    /// logging to `<dir>/cc-proxy.log`; waits until the socket accepts.
    pub fn start(bin: &Path, dir: &Path, extra: &[String]) -> Result<Self, String> {
        let socket = dir.join("proxy.sock");
        let log = dir.join("cc-proxy.log");
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("log: {e}"))?;
        let mut args: Vec<String> = vec![
            "-socket-path".into(),
            socket.to_string_lossy().into_owned(),
            "-log".into(),
            "warn".into(),
            "-ksm".into(),
            "off".into(),
        ];
        args.extend(extra.iter().cloned());
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut d = Self {
            pid: child.id(),
            child: Some(child),
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&d.socket).is_err() {
            d.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "cc-proxy did not listen within 20 s{}",
                    d.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(d)
    }

    /// An error if the daemon has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        if let Some(c) = &mut self.child {
            if let Ok(Some(s)) = c.try_wait() {
                self.child = None;
                return Err(format!("cc-proxy exited: {s}{}", self.log_tail()));
            }
        }
        Ok(())
    }

    /// The end of its log, for error messages (empty if there is none).
    pub fn log_tail(&self) -> String {
        let Ok(mut f) = File::open(&self.log) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        if s.trim().is_empty() {
            String::new()
        } else {
            format!("\n--- cc-proxy log (tail) ---\n{}", s.trim_end())
        }
    }

    /// Resident set size, in KiB (VmRSS of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> Result<u64, String> {
        rss_kib(self.pid)
    }

    /// CPU time used so far, user + system, in seconds.
    pub fn cpu_seconds(&self) -> Result<f64, String> {
        cpu_seconds(self.pid)
    }

    /// CPU time of its live threads, in seconds, to the nanosecond (for
    /// the short per-figure deltas, where clock ticks are too coarse).
    pub fn cpu_precise(&self) -> Result<f64, String> {
        cpu_precise(self.pid)
    }

    /// Write syscalls the daemon has made (`syscw` of `/proc/<pid>/io`:
    /// write, send, writev…; its `syscr` does not count recv on sockets).
    pub fn write_syscalls(&self) -> Result<u64, String> {
        let path = format!("/proc/{}/io", self.pid);
        let s = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        s.lines()
            .find_map(|l| l.strip_prefix("syscw:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no syscw in {path}"))
    }

    /// Proportional set size (Pss of `/proc/<pid>/smaps_rollup`), in KiB:
    /// shared pages (libc, the binary) count for a share.
    pub fn pss_kib(&self) -> Result<u64, String> {
        let path = format!("/proc/{}/smaps_rollup", self.pid);
        let s = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        s.lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no Pss in {path}"))
    }

    /// RssAnon and RssFile of `/proc/<pid>/status`, in KiB.
    pub fn rss_parts_kib(&self) -> Result<(u64, u64), String> {
        Ok((
            status_kib(self.pid, "RssAnon:")?,
            status_kib(self.pid, "RssFile:")?,
        ))
    }

    /// SIGTERM and wait for the exit.
    pub fn shutdown(&mut self) -> Result<ExitStatus, String> {
        let Some(mut c) = self.child.take() else {
            return Err("cc-proxy is not running".into());
        };
        let pid = libc::pid_t::try_from(self.pid).map_err(|_| "pid out of range".to_string())?;
        // SAFETY: kill(2) with a pid we spawned and have not yet reaped (so
        // it cannot have been reused) and a valid signal number.
        let r = unsafe { libc::kill(pid, libc::SIGTERM) };
        if r != 0 {
            let _ = c.kill();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait().map_err(|e| format!("wait: {e}"))? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Err("cc-proxy still running 10 s after SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    status_kib(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let s = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in {path}"))
}

/// Sum of the on-CPU time (first field of schedstat, ns) of a process's
/// live threads, in seconds.
pub fn cpu_precise(pid: u32) -> Result<f64, String> {
    let dir = format!("/proc/{pid}/task");
    let mut ns: u64 = 0;
    for e in fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let Ok(e) = e else { continue };
        let Ok(s) = fs::read_to_string(e.path().join("schedstat")) else {
            continue;
        };
        ns += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(ns as f64 / 1e9)
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let s = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // The command name is in parentheses and may hold spaces: fields are
    // counted after the last ')'. There, field 3 (state) is index 0, so
    // utime (14) and stime (15) are indices 11 and 12.
    let rest = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ok_or_else(|| format!("{path}: unexpected format"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{path}: no field {}", i + 3))
    };
    let ticks = field(11)? + field(12)?;
    Ok(ticks as f64 / clock_ticks())
}

/// Busy CPU time of the whole machine so far (user, nice, system, irq,
/// softirq of the `cpu` line of /proc/stat), in seconds.
pub fn machine_busy_seconds() -> Result<f64, String> {
    let s = fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("/proc/stat: no cpu line")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq …
    let ticks = get(0) + get(1) + get(2) + get(5) + get(6);
    Ok(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Raise the open-file limit (1000 shims need more than a default 1024
/// on both sides); the daemon inherits it.
pub fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return;
    }
    let want = r.rlim_max.min(16384);
    if r.rlim_cur < want {
        r.rlim_cur = want;
        // SAFETY: setrlimit reads the struct we pass; a soft limit at most
        // the hard one is always allowed.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    }
}

/// CPU time of this process, all its threads (ended ones too), user +
/// system, in seconds.
pub fn self_cpu() -> f64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// CPU time of the calling thread, user + system, in seconds. Linux
/// scales the two so that they add up to the scheduler's on-CPU time of
/// the thread, the count the daemon's `schedstat` figures read (as of the
/// thread's last accounting, at most a scheduler tick ago).
pub fn thread_cpu() -> Result<f64, String> {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) } != 0 {
        return Err(format!(
            "getrusage(RUSAGE_THREAD): {}",
            std::io::Error::last_os_error()
        ));
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(tv(u.ru_utime) + tv(u.ru_stime))
}

/// `f`, and the CPU time (user + system) the calling thread spent in it.
pub fn on_thread_cpu<T>(f: impl FnOnce() -> Result<T, String>) -> Result<(T, f64), String> {
    let c0 = thread_cpu()?;
    let t = f()?;
    Ok((t, thread_cpu()? - c0))
}
