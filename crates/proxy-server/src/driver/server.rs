//! The daemon: the listening socket, the shared state, VM registration and
//! teardown, shutdown.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proxy_proto::payload::{AttachVm, IoResponse, RegisterVm};
use proxy_vsock::AgentConnector;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::Config;
use crate::ksm::Ksm;
use crate::reader::MessageReader;
use crate::registry::{ConnId, NewToken, ProxyError, Registry, VmId};
use crate::rules::ctl::CtlChannel;
use crate::vm::{Channels, Vm, VmEvents, VmOptions};

/// The state every task shares. Locked briefly, never across an await.
#[derive(Debug, Default)]
pub struct State {
    /// The rules, and the single owner of every VM (its running handle
    /// included), token, claim and process.
    pub registry: Registry<Arc<Vm>>,
}

/// What the daemon's tasks share.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
    state: Mutex<State>,
    /// `unix://<socket path>`, handed out in RegisterVM/AttachVM replies.
    pub url: String,
    next_conn: AtomicU64,
    /// Set to true to stop: connections close, the daemon exits.
    pub shutdown: watch::Sender<bool>,
    /// Pod mode: exit after UnregisterVM.
    pub pod_mode: bool,
    ksm: Option<Arc<Ksm>>,
    /// The memory budget (`--memory-budget`).
    pub budget: crate::session::Budget,
    /// Client connections open now.
    pub connections: std::sync::atomic::AtomicUsize,
    /// Daemon-wide counters for the metrics endpoint (docs/METRICS.md).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// How agent channels are dialed: the real transports, unless
    /// [`with_connector`](Self::with_connector) said otherwise.
    pub connector: Arc<dyn AgentConnector>,
}

impl Shared {
    /// Shared state for a daemon listening at `socket_path`.
    pub fn new(
        config: Config,
        socket_path: &Path,
        pod_mode: bool,
        ksm: Option<Arc<Ksm>>,
    ) -> Arc<Self> {
        Self::with_connector(
            config,
            socket_path,
            pod_mode,
            ksm,
            Arc::new(proxy_vsock::Connector),
        )
    }

    /// [`new`](Self::new), dialing agents through `connector` (a test's
    /// substitute transport).
    pub fn with_connector(
        config: Config,
        socket_path: &Path,
        pod_mode: bool,
        ksm: Option<Arc<Ksm>>,
        connector: Arc<dyn AgentConnector>,
    ) -> Arc<Self> {
        let registry = Registry::with_handles(crate::registry::TokenLimits {
            per_vm: config.max_tokens_per_vm,
            total: config.max_tokens,
        });
        let budget = crate::session::budget(config.memory_budget as usize);
        Arc::new(Self {
            config,
            state: Mutex::new(State { registry }),
            budget,
            connections: std::sync::atomic::AtomicUsize::new(0),
            url: format!("unix://{}", socket_path.display()),
            next_conn: AtomicU64::new(0),
            shutdown: watch::channel(false).0,
            pod_mode,
            ksm,
            metrics: Arc::default(),
            connector,
        })
    }

    /// Lock the state. A poisoned lock (a panic elsewhere) is taken over:
    /// the registry's methods leave it consistent at every return.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection id.
    pub fn next_conn(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// A VM by id.
    pub fn vm(&self, id: VmId) -> Option<Arc<Vm>> {
        self.state().registry.vm_handle(id).cloned()
    }

    /// RegisterVM: reserve, connect the channels, wait READY, start the
    /// VM's tasks. On failure nothing stays registered.
    pub async fn register_vm(
        self: &Arc<Self>,
        req: RegisterVm,
    ) -> Result<(VmId, IoResponse), ProxyError> {
        let (vm_id, tokens) = self.state().registry.register_vm(&req, new_token)?;
        let span = tracing::info_span!("vm", vm = %req.container_id);
        match self
            .bring_up(vm_id, &req, &tokens)
            .instrument(span.clone())
            .await
        {
            Ok(()) => {
                span.in_scope(|| info!(tokens = tokens.len(), "VM registered"));
                if let Some(k) = &self.ksm {
                    k.kick();
                }
                Ok((vm_id, self.io_response(tokens)))
            }
            Err(e) => {
                self.state().registry.remove_vm(vm_id);
                span.in_scope(|| warn!(error = %e, "RegisterVM failed"));
                Err(e)
            }
        }
    }

    async fn bring_up(
        self: &Arc<Self>,
        vm_id: VmId,
        req: &RegisterVm,
        tokens: &[NewToken],
    ) -> Result<(), ProxyError> {
        let waited = self.config.ready_timeout;
        let deadline = Instant::now() + waited;
        let opts = VmOptions::from_config(&self.config, self.budget.clone());
        let dial = crate::agent::Dial {
            deadline,
            dial_timeout: self.config.dial_timeout,
            connector: self.connector.clone(),
        };
        let (ctl_r, ctl_w) = dial.connect("ctl", &req.ctl_serial).await?;
        let (io_r, io_w) = dial.connect("io", &req.io_serial).await?;
        debug!("agent channels connected, waiting for READY");
        let mut ctl = CtlChannel::new(opts.ctl_options(waited), deadline.into_std());
        let mut ctl_r = MessageReader::new(ctl_r, ctl.decoder()).lazy(crate::vm::CTL_SMALL);
        crate::vm::wait_ready(&mut ctl_r, &mut ctl).await?;
        if !req.console.is_empty() {
            spawn_console(
                req.console.clone(),
                req.container_id.clone(),
                self.connector.clone(),
            );
        }
        let events: Arc<dyn VmEvents> = Arc::new(Events(Arc::downgrade(self)));
        let vm = Vm::start(
            vm_id,
            req.container_id.clone(),
            Channels {
                ctl_r,
                ctl_w,
                ctl,
                io_r,
                io_w,
            },
            opts,
            events,
        );
        for t in tokens {
            vm.add_session(t.token.clone(), t.io_base);
        }
        let refused = self.state().registry.vm_ready(vm_id, vm);
        if let Err(vm) = refused {
            vm.shut("registration abandoned");
            return Err(ProxyError::ShuttingDown);
        }
        Ok(())
    }

    /// AttachVM.
    pub fn attach_vm(&self, req: &AttachVm) -> Result<(VmId, IoResponse), ProxyError> {
        let mut st = self.state();
        let (vm_id, tokens) = st.registry.attach_vm(req, new_token)?;
        let vm = st
            .registry
            .vm_handle(vm_id)
            .cloned()
            .ok_or(ProxyError::VmGone)?;
        drop(st);
        for t in &tokens {
            vm.add_session(t.token.clone(), t.io_base);
        }
        Ok((vm_id, self.io_response(tokens)))
    }

    fn io_response(&self, tokens: Vec<NewToken>) -> IoResponse {
        IoResponse {
            url: self.url.clone(),
            tokens: tokens.into_iter().map(|t| t.token).collect(),
        }
    }

    /// Tear a VM down: forget it and its tokens, close its sessions (their
    /// shims' connections close once their queued output is written).
    pub fn teardown(&self, vm_id: VmId, reason: &str) {
        let gone = self.state().registry.vm_gone(vm_id, reason);
        if let Some(vm) = gone.handle {
            vm.shut(reason);
        }
    }

    /// One line of statistics.
    pub fn log_stats(&self) {
        let (vms, tokens, list) = {
            let st = self.state();
            (
                st.registry.vm_count(),
                st.registry.token_count(),
                st.registry
                    .vm_handles()
                    .map(|(_, vm)| vm.clone())
                    .collect::<Vec<_>>(),
            )
        };
        info!(vms, tokens, "stats");
        for vm in list {
            let sessions = vm.sessions();
            let queued: usize = sessions.iter().map(|s| s.queued_bytes()).sum();
            info!(
                vm = %vm.container_id,
                sessions = sessions.len(),
                bytes_from_agent = vm.bytes_from_agent.load(Ordering::Relaxed),
                bytes_to_agent = vm.bytes_to_agent.load(Ordering::Relaxed),
                queued,
                "vm stats"
            );
        }
    }

    /// Stop everything.
    pub fn stop(&self) {
        self.shutdown.send_replace(true);
    }
}

/// VM task events, routed back to the shared state.
#[derive(Debug)]
struct Events(std::sync::Weak<Shared>);

impl VmEvents for Events {
    fn vm_failed(&self, vm: VmId, reason: String) {
        if let Some(s) = self.0.upgrade() {
            s.teardown(vm, &reason);
        }
    }

    fn process_exited(&self, _vm: VmId, token: &str, code: u8) {
        if let Some(s) = self.0.upgrade() {
            debug!(token = %crate::redact::Token(token), code, "process exited");
            s.state().registry.process_exited(token);
        }
    }

    fn metrics(&self) -> Option<Arc<crate::metrics::Metrics>> {
        let s = self.0.upgrade()?;
        crate::metrics::enabled(&s).then(|| s.metrics.clone())
    }
}

/// A token as the reference makes them: 32 random bytes, base64url.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64url(&bytes)
}

fn base64url(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn spawn_console(path: String, vm: String, connector: Arc<dyn AgentConnector>) {
    tokio::spawn(
        async move {
            use tokio::io::AsyncBufReadExt;
            let dial = crate::agent::Dial {
                deadline: Instant::now() + Duration::from_secs(5),
                dial_timeout: Duration::from_secs(5),
                connector,
            };
            let (r, _w) = match dial.connect("console", &path).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "VM console not available");
                    return;
                }
            };
            let mut lines = tokio::io::BufReader::new(r).split(b'\n');
            while let Ok(Some(line)) = lines.next_segment().await {
                let line = String::from_utf8_lossy(&line);
                debug!(target: "cc_proxy::console", "{}", line.trim_end());
            }
        }
        .instrument(tracing::info_span!("console", vm = %vm)),
    );
}

/// Bind the listening socket: `LISTEN_FDS` socket activation, or a fresh
/// socket (mode 0660). Only the default socket's directory
/// (`/run/cc-proxy`) is created (mode 0750) when missing; for any other
/// path a missing directory is an error, as a mistyped path should be. A
/// stale socket file is replaced only when nothing listens on it.
pub fn bind(path: &Path) -> io::Result<(UnixListener, bool)> {
    if let Some(l) = activated_listener()? {
        return Ok((l, true));
    }
    let len = path.as_os_str().len();
    if len > 107 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is {len} bytes; unix socket paths are limited to 107",
                path.display()
            ),
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            if Some(dir) != Path::new(crate::config::DEFAULT_SOCKET_PATH).parent() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "the directory of the socket path {} does not exist: create {} first \
                         (only the default socket's directory is created)",
                        path.display(),
                        dir.display()
                    ),
                ));
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("creating {}: {e}", dir.display()))
                })?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("another proxy is listening on {}", path.display()),
                    ))
                }
                Err(_) => {
                    info!(path = %path.display(), "removing a stale socket");
                    std::fs::remove_file(path)?;
                }
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok((l, false))
}

fn activated_listener() -> io::Result<Option<UnixListener>> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !pid_ok || fds < 1 {
        return Ok(None);
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    // SAFETY: with LISTEN_PID naming this process, the service manager
    // passed us fd 3 (SD_LISTEN_FDS_START) as a listening socket that
    // nothing else in this process owns; we take ownership exactly once
    // (the variables are removed above).
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(3) };
    std_listener.set_nonblocking(true)?;
    info!("using the socket passed by the service manager (LISTEN_FDS)");
    Ok(Some(UnixListener::from_std(std_listener)?))
}

/// Run the daemon until SIGTERM/SIGINT (or, in pod mode, UnregisterVM).
pub async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let (path, pod_mode) = config.listen_path()?;
    let least = u64::from(config.max_frame_size)
        .saturating_add(12)
        .saturating_mul(2)
        .max(
            crate::vm::session_bound(0, crate::vm::agent_message_bound(config.max_frame_size))
                as u64,
        );
    if u64::from(config.memory_budget) < least {
        return Err(format!(
            "--memory-budget {} is too small for --max-frame-size {}: it must hold two frames of the largest size and the largest agent message ({least} bytes)",
            config.memory_budget, config.max_frame_size
        )
        .into());
    }
    // Handlers first: a SIGTERM that arrives while we start still means
    // "stop cleanly".
    let signals = Signals::install();
    raise_fd_limit();
    let (listener, activated) = bind(&path)?;
    // An activated socket is wherever the service manager bound it: hand
    // that path to shims, whatever -socket-path says.
    let path = match activated.then(|| listener.local_addr()) {
        Some(Ok(addr)) => addr.as_pathname().map_or(path, Path::to_path_buf),
        Some(Err(e)) => {
            warn!(error = %e, "cannot read the passed socket's address");
            path
        }
        None => path,
    };
    let ksm = Ksm::start(config.ksm, &config.ksm_sysfs);
    let shared = Shared::new(config, &path, pod_mode, ksm.clone());
    let metrics = match crate::metrics::start(&shared) {
        Ok(m) => m,
        Err(e) => {
            if let Some(k) = &ksm {
                k.restore();
            }
            if !activated {
                let _ = std::fs::remove_file(&path);
            }
            return Err(e.into());
        }
    };
    info!(socket = %path.display(), pod_mode, activated, "cc-proxy listening");
    crate::notify::ready(&path);
    serve(shared.clone(), listener, signals).await;
    drop(metrics);
    if let Some(k) = ksm {
        k.restore();
    }
    if !activated {
        let _ = std::fs::remove_file(&path);
    }
    info!("cc-proxy stopped");
    Ok(())
}

/// Every shim is a connection and every VM two or three: lift the soft
/// limit on open files to the hard one (as Go's runtime does for the
/// reference daemon), so a host with many containers is not held to the
/// usual 1024.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => debug!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => warn!(soft, hard, error = %e, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open files limit"),
    }
}

/// The signals the daemon handles.
#[derive(Debug)]
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    quit: Option<tokio::signal::unix::Signal>,
    usr1: Option<tokio::signal::unix::Signal>,
    /// Signals whose default action would kill the daemon but that mean
    /// nothing to it: received, logged, and otherwise ignored.
    ignored: Vec<(&'static str, tokio::signal::unix::Signal)>,
}

/// Signals that would end the process by default and that the daemon
/// ignores (SIGHUP: there is no configuration file to reload).
const IGNORED_SIGNALS: [(&str, libc::c_int); 10] = [
    ("SIGHUP", libc::SIGHUP),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGALRM", libc::SIGALRM),
    ("SIGVTALRM", libc::SIGVTALRM),
    ("SIGPROF", libc::SIGPROF),
    ("SIGIO", libc::SIGIO),
    ("SIGPWR", libc::SIGPWR),
    ("SIGSTKFLT", libc::SIGSTKFLT),
    ("SIGXCPU", libc::SIGXCPU),
    ("SIGXFSZ", libc::SIGXFSZ),
];

impl Signals {
    /// Install the handlers (SIGTERM, SIGINT, SIGQUIT: stop cleanly;
    /// SIGUSR1: log stats; `IGNORED_SIGNALS`: log and go on).
    pub fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let ignored = IGNORED_SIGNALS
            .iter()
            .filter_map(|&(name, n)| {
                signal(SignalKind::from_raw(n))
                    .map_err(|e| warn!(signal = name, error = %e, "cannot handle the signal"))
                    .ok()
                    .map(|s| (name, s))
            })
            .collect();
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            quit: signal(SignalKind::quit()).ok(),
            usr1: signal(SignalKind::user_defined1()).ok(),
            ignored,
        }
    }
}

/// Log the ignored signals as they come, at most one line a second each.
fn spawn_ignored_signals(ignored: Vec<(&'static str, tokio::signal::unix::Signal)>) {
    for (name, mut sig) in ignored {
        tokio::spawn(async move {
            let mut last: Option<Instant> = None;
            let mut unlogged = 0u64;
            while sig.recv().await.is_some() {
                if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                    unlogged = unlogged.saturating_add(1);
                    continue;
                }
                last = Some(Instant::now());
                if name == "SIGHUP" {
                    info!(
                        also_since_last = unlogged,
                        "SIGHUP: there is no configuration to reload; ignored"
                    );
                } else {
                    info!(signal = name, also_since_last = unlogged, "signal ignored");
                }
                unlogged = 0;
            }
        });
    }
}

/// Accept failures, logged when they start and summed up when they end,
/// not once per failed attempt (running out of file descriptors makes
/// every accept fail until some close). A daemon flapping at the limit
/// (one accept works, the next fails) logs at most one failure line and
/// one summary per [`REPORT_EVERY`].
#[derive(Debug, Default)]
struct AcceptFailures {
    /// Failing now: since when.
    since: Option<Instant>,
    /// Failures not yet summed up, and since when they count.
    count: u64,
    counting_since: Option<Instant>,
    last: String,
    /// When a failure line and a summary line were last logged.
    failure_logged: Option<Instant>,
    summary_logged: Option<Instant>,
}

/// How often accept failures are logged at most.
const REPORT_EVERY: Duration = Duration::from_secs(10);

impl AcceptFailures {
    /// An accept failed at `now`: returns whether to log it.
    fn failed(&mut self, e: &io::Error, now: Instant) -> bool {
        self.count = self.count.saturating_add(1);
        self.counting_since.get_or_insert(now);
        self.since.get_or_insert(now);
        self.last = e.to_string();
        let log = self
            .failure_logged
            .is_none_or(|t| now.saturating_duration_since(t) >= REPORT_EVERY);
        if log {
            self.failure_logged = Some(now);
        }
        log
    }

    /// An accept succeeded at `now`: the summary to log, if the failures
    /// just ended and no summary was logged lately (the failures are
    /// counted on into the next summary otherwise).
    fn recovered(&mut self, now: Instant) -> Option<(u64, Duration, String)> {
        self.since.take()?;
        if self
            .summary_logged
            .is_some_and(|t| now.saturating_duration_since(t) < REPORT_EVERY)
        {
            return None;
        }
        self.summary_logged = Some(now);
        let n = std::mem::take(&mut self.count);
        let over = self
            .counting_since
            .take()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        Some((n, over, self.last.clone()))
    }
}

/// Accept connections until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: UnixListener, signals: Signals) {
    let Signals {
        mut term,
        mut int,
        mut quit,
        mut usr1,
        ignored,
    } = signals;
    spawn_ignored_signals(ignored);
    let mut shutdown = shared.shutdown.subscribe();
    let mut stats = shared.config.stats_interval.map(tokio::time::interval);
    let tasks = tokio_util::task::TaskTracker::new();
    let mut failures = AcceptFailures::default();
    let mut refused = AcceptFailures::default();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => accepted(&shared, stream, &tasks, &mut failures, &mut refused),
                Err(e) => {
                    if failures.failed(&e, Instant::now()) {
                        error!(error = %e, "accept failed; retrying every 50ms, the failures are summed up when accepting works again");
                    } else {
                        debug!(error = %e, failed_accepts = failures.count, "accept still failing");
                    }
                    // Connections already open are served meanwhile.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = recv_sig(&mut term) => { info!("SIGTERM: shutting down"); break; }
            _ = recv_sig(&mut int) => { info!("SIGINT: shutting down"); break; }
            _ = recv_sig(&mut quit) => { info!("SIGQUIT: shutting down"); break; }
            _ = recv_sig(&mut usr1) => shared.log_stats(),
            _ = tick(&mut stats) => shared.log_stats(),
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    drop(listener);
    crate::notify::stopping();
    shared.stop();
    let vms: Vec<VmId> = shared
        .state()
        .registry
        .vm_handles()
        .map(|(id, _)| id)
        .collect();
    for vm in vms {
        shared.teardown(vm, "the proxy is shutting down");
    }
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(3), tasks.wait())
        .await
        .is_err()
    {
        warn!("some connections did not close within 3s");
    }
}

/// A connection was accepted: serve it, unless the connection limit is
/// reached (then it is closed at once, and that is logged when it starts
/// and summed up when it ends).
fn accepted(
    shared: &Arc<Shared>,
    stream: tokio::net::UnixStream,
    tasks: &tokio_util::task::TaskTracker,
    failures: &mut AcceptFailures,
    refused: &mut AcceptFailures,
) {
    if let Some((n, took, error)) = failures.recovered(Instant::now()) {
        info!(failed_accepts = n, over = ?took, last_error = %error, "accepting connections again");
    }
    let open = shared.connections.load(Ordering::Relaxed);
    if open >= shared.config.max_connections as usize {
        if refused.failed(
            &io::Error::other("the connection limit is reached"),
            Instant::now(),
        ) {
            warn!(
                open,
                limit = shared.config.max_connections,
                "connection limit reached; new connections are closed at once until some end"
            );
        }
        drop(stream);
        return;
    }
    if let Some((n, took, _)) = refused.recovered(Instant::now()) {
        info!(refused = n, over = ?took, "below the connection limit again");
    }
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let s = shared.clone();
    let conn = s.next_conn();
    tasks.spawn(crate::panics::CatchPanic::new(
        crate::conn::serve(s, stream, conn),
        move |msg| error!(conn = conn.0, panic = %msg, "a connection task panicked; the connection is closed"),
    ));
}

async fn recv_sig(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

async fn tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The socket path as the `unix://` URL (for tests).
pub fn socket_url(path: &Path) -> String {
    format!("unix://{}", path.display())
}

#[allow(dead_code)]
fn _assert_send(p: PathBuf) -> PathBuf {
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_base64url_of_32_bytes_and_unique() {
        let a = new_token();
        let b = new_token();
        assert_eq!(a.len(), 44);
        assert!(a.ends_with('='));
        assert_ne!(a, b);
        assert!(a
            .trim_end_matches('=')
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(b"fo"), "Zm8=");
    }

    #[test]
    fn accept_failures_are_logged_when_they_start_and_summed_up_when_they_end() {
        let emfile = || io::Error::from_raw_os_error(libc::EMFILE);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut f = AcceptFailures::default();
        assert!(f.recovered(at(0)).is_none(), "nothing to sum up");
        assert!(f.failed(&emfile(), at(0)), "the first failure is logged");
        for i in 1..100 {
            assert!(!f.failed(&emfile(), at(i * 50)), "later ones are not");
        }
        let (n, over, last) = f.recovered(at(5000)).unwrap();
        assert_eq!((n, over), (100, Duration::from_millis(5000)));
        assert!(last.contains("Too many open files"), "{last}");
        // Flapping at the limit: no more lines for REPORT_EVERY, counted on.
        for i in 0..20 {
            assert!(!f.failed(&emfile(), at(5100 + i * 100)));
            assert!(f.recovered(at(5150 + i * 100)).is_none());
        }
        // Ten seconds on, the next failure and the next summary are logged.
        assert!(f.failed(&emfile(), at(10_050)));
        let (n, _, _) = f.recovered(at(15_200)).unwrap();
        assert_eq!(n, 21, "the flapping failures were counted into it");
    }

    #[test]
    fn long_socket_paths_are_refused() {
        let p = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        let e = bind(&p).unwrap_err();
        assert!(e.to_string().contains("107"), "{e}");
    }
}
