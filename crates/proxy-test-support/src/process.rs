//! [`ProxyProcess`]: a `cc-proxy` daemon under test.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::tempdir::TempDir;
use crate::MockClient;

/// The log kept for failure messages: the last 4 MiB.
const LOG_KEEP: usize = 4 << 20;

/// How much of the log a failure message shows: the last 64 KiB.
const LOG_SHOW: usize = 64 << 10;

/// Builder of a [`ProxyProcess`].
#[derive(Debug, Clone)]
pub struct ProxyProcessBuilder {
    bin: PathBuf,
    args: Vec<OsString>,
    start_timeout: Duration,
    pod_mode: bool,
    nofile: Option<u64>,
}

impl ProxyProcessBuilder {
    /// Pod mode: `-uri unix://<socket>` instead of `-socket-path <socket>`
    /// (the daemon serves one VM and exits after its UnregisterVM).
    pub fn pod_mode(mut self) -> Self {
        self.pod_mode = true;
        self
    }

    /// One more command-line argument (after `-socket-path … --log debug`).
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    /// More command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Start the daemon with this many file descriptors at most (soft and
    /// hard limit alike, so that it cannot raise them).
    pub fn nofile_limit(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// How long to wait for the socket to accept connections (default 10 s).
    pub fn start_timeout(mut self, d: Duration) -> Self {
        self.start_timeout = d;
        self
    }

    /// Spawn the daemon and wait until its socket accepts connections.
    ///
    /// `--ksm initial` is added unless the arguments choose a KSM mode, so
    /// that tests never touch the host's KSM settings.
    ///
    /// # Panics
    ///
    /// If the binary cannot be spawned, exits early, or its socket does not
    /// accept connections in time (the message includes its log).
    pub async fn start(self) -> ProxyProcess {
        let dir = TempDir::new();
        let socket = dir.socket("proxy.sock");
        let mut cmd = Command::new(&self.bin);
        if self.pod_mode {
            let mut uri = OsString::from("unix://");
            uri.push(&socket);
            cmd.arg("-uri").arg(uri);
        } else {
            cmd.arg("-socket-path").arg(&socket);
        }
        cmd.args(["--log", "debug"]);
        let chooses_ksm = self.args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == "-ksm" || a == "--ksm" || a.starts_with("-ksm=") || a.starts_with("--ksm=")
        });
        if !chooses_ksm {
            cmd.args(["--ksm", "initial"]);
        }
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the forked child before exec and
            // only calls setrlimit, which is async-signal-safe; it touches
            // no memory shared with the parent.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                        .map_err(std::io::Error::from)
                });
            }
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.bin.display()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stderr.take() {
            readers.push(spawn_reader(out, log.clone()));
        }
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_reader(out, log.clone()));
        }
        let mut p = ProxyProcess {
            child: Some(child),
            _dir: dir,
            socket,
            log,
            readers,
            args: self.args,
        };
        p.wait_accepting(self.start_timeout).await;
        p
    }
}

fn spawn_reader(
    mut out: impl Read + Send + 'static,
    log: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match out.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                    l.extend_from_slice(&chunk[..n]);
                    if l.len() > LOG_KEEP {
                        let cut = l.len() - LOG_KEEP / 2;
                        l.drain(..cut);
                    }
                }
            }
        }
    })
}

/// A running `cc-proxy`, listening on a socket in its own temp dir; killed
/// (and its log printed, if the test is failing) on drop.
pub struct ProxyProcess {
    child: Option<Child>,
    _dir: TempDir,
    socket: PathBuf,
    log: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    args: Vec<OsString>,
}

impl fmt::Debug for ProxyProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyProcess")
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("socket", &self.socket)
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

impl ProxyProcess {
    /// `bin -socket-path <tmp>/proxy.sock --log debug --ksm initial`.
    pub async fn start(bin: impl AsRef<Path>) -> Self {
        Self::builder(bin).start().await
    }

    /// Options (extra arguments, start timeout).
    pub fn builder(bin: impl AsRef<Path>) -> ProxyProcessBuilder {
        ProxyProcessBuilder {
            bin: bin.as_ref().to_owned(),
            args: Vec::new(),
            start_timeout: crate::DEFAULT_TIMEOUT,
            pod_mode: false,
            nofile: None,
        }
    }

    /// The proxy's listening socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `unix://<socket>`: the URL that RegisterVM responses must carry.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A new client connection.
    pub async fn client(&self) -> MockClient {
        MockClient::connect(&self.socket).await
    }

    /// Everything the daemon wrote to stderr and stdout so far (the tail
    /// if it was long).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// The last 64 KiB of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let l = self.log();
        let mut start = l.len().saturating_sub(LOG_SHOW);
        while !l.is_char_boundary(start) {
            start += 1;
        }
        l[start..].to_owned()
    }

    /// Wait until the log contains `needle`.
    ///
    /// # Panics
    ///
    /// After `timeout`, with the log.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.log().contains(needle) {
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "cc-proxy did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Assert the daemon is still running (it did not crash).
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("cc-proxy exited ({st}); log:\n{}", self.log_tail());
            }
        }
    }

    async fn wait_accepting(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.join_readers();
                    panic!(
                        "cc-proxy exited during start-up ({st}); log:\n{}",
                        self.log_tail()
                    );
                }
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "cc-proxy did not accept connections on {} within {timeout:?}; log:\n{}",
                    self.socket.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Send SIGTERM and wait for the exit status.
    ///
    /// # Panics
    ///
    /// If it does not exit within 10 s (the message includes the log).
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(crate::DEFAULT_TIMEOUT).await
    }

    /// Send a signal to the daemon.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = self.child.as_ref() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, sig);
        }
    }

    /// Wait for the daemon to exit by itself (pod mode, a signal).
    ///
    /// # Panics
    ///
    /// After `timeout`, with the log.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let c = self.child.as_mut().expect("the daemon was already reaped");
            match c.try_wait() {
                Ok(Some(st)) => {
                    self.child = None;
                    self.join_readers();
                    return st;
                }
                Ok(None) => {}
                Err(e) => panic!("waiting for cc-proxy: {e}"),
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "cc-proxy did not exit within {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.join_readers();
        if std::thread::panicking() {
            eprintln!(
                "----- cc-proxy log (last {} KiB) -----\n{}\n----- end of cc-proxy log -----",
                LOG_SHOW >> 10,
                self.log_tail()
            );
        }
    }
}
