//! The real `cc-proxy` daemon as a child process, and the real
//! `cc-proxy-shim` run as a container runtime runs it.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running daemon. Dropping it kills it; [`Proxy::shutdown`] stops it
/// cleanly.
#[derive(Debug)]
pub struct Proxy {
    child: Option<Child>,
    /// Its listening socket.
    pub socket: PathBuf,
}

impl Proxy {
    /// Start `bin -socket-path <dir>/proxy.sock` and wait for the socket.
    pub fn start(bin: &Path, dir: &Path, log: &Path) -> Result<Self, String> {
        let socket = dir.join("proxy.sock");
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Process::new(bin);
        cmd.arg("-socket-path")
            .arg(&socket)
            // A guest under TCG on a busy host may take well over the
            // default 10 s to listen on its vsock ports: dialling (hybrid
            // vsock retries until it does) gets as long as READY.
            .args(["-log", "debug", "-ksm", "off", "--ready-timeout", "120s"])
            .args(["--dial-timeout", "120s"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        eprintln!("$ {}", crate::util::describe(&cmd));
        let child = cmd.spawn().map_err(|e| format!("{}: {e}", bin.display()))?;
        let mut p = Self {
            child: Some(child),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&p.socket).is_err() {
            if let Some(c) = &mut p.child {
                if let Ok(Some(s)) = c.try_wait() {
                    return Err(format!("cc-proxy exited at start: {s}"));
                }
            }
            if Instant::now() > deadline {
                return Err("cc-proxy did not listen within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(p)
    }

    /// SIGTERM, then wait for the exit status.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let Some(mut c) = self.child.take() else {
            return Err("already stopped".into());
        };
        let pid = c.id().to_string();
        let _ = Process::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait().map_err(|e| e.to_string())? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Err(format!("cc-proxy still running {timeout:?} after SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

/// Run `cc-proxy-shim -c <container> -t <token> -u <url>` with `input` on
/// its stdin (then EOF); returns its stdout, stderr and exit code.
pub fn run_shim(
    bin: &Path,
    container: &str,
    token: &str,
    url: &str,
    input: Vec<u8>,
    timeout: Duration,
) -> Result<super::hyper::Output, String> {
    let mut child = Process::new(bin)
        .args(["-c", container, "-t", token, "-u", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let mut stdin = child.stdin.take().ok_or("cc-proxy-shim stdin")?;
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let mut out = child.stdout.take().ok_or("cc-proxy-shim stdout")?;
    let mut err = child.stderr.take().ok_or("cc-proxy-shim stderr")?;
    let reader = std::thread::spawn(move || {
        let mut e = Vec::new();
        err.read_to_end(&mut e).map(|_| e)
    });
    let mut stdout = Vec::new();
    out.read_to_end(&mut stdout).map_err(|e| e.to_string())?;
    let stderr = reader
        .join()
        .map_err(|_| "stderr reader panicked".to_string())?
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("cc-proxy-shim still running after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    writer
        .join()
        .map_err(|_| "stdin writer panicked".to_string())?
        .map_err(|e| format!("cc-proxy-shim stdin: {e}"))?;
    let code = status
        .code()
        .ok_or_else(|| format!("cc-proxy-shim killed: {status}"))?;
    Ok(super::hyper::Output {
        stdout,
        stderr,
        code: u8::try_from(code).map_err(|_| format!("exit code {code}"))?,
    })
}
