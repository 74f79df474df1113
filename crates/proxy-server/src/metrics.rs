//! Opt-in Prometheus metrics (docs/METRICS.md): counters the daemon keeps
//! anyway, a scrape-time view of the live state, and a small HTTP/1.1
//! responder on TCP (`--metrics-addr`) and/or a unix socket
//! (`--metrics-socket`).
//!
//! Nothing here costs the hot path more than relaxed atomic increments:
//! per-VM byte and message counts are atomics in [`Vm`](crate::vm::Vm),
//! daemon-wide counts are atomics in [`Metrics`]. Everything else (VMs,
//! sessions, shims, queue depths) is read from the shared state when
//! scraped, so a torn-down VM's series disappear with it. The ctl
//! round-trip histogram is kept (lock-free) only while an endpoint is
//! configured.
//!
//! Encoding is `prometheus-client`'s (label values escaped as the
//! exposition formats require: container ids come from clients).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

use crate::registry::ProxyError;
use crate::server::Shared;

/// Scrapes served at once; more connections are closed at once.
const MAX_SCRAPERS: usize = 4;
/// Largest request head (request line and headers) read.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper may take to send its request, and to read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Content type of the Prometheus text format 0.0.4 (the default).
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// Content type of OpenMetrics text (served when the scraper accepts it).
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What went wrong, for `cc_proxy_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum ErrorKind {
    /// A malformed frame, or a frame of a kind clients may not send (the
    /// connection is closed).
    BadFrame,
    /// A command's JSON payload is invalid or lacks a required field (or
    /// names an agent address that does not parse).
    InvalidPayload,
    /// A command the rules refuse (unknown or foreign token, wrong role,
    /// duplicate container, bad signal, …).
    Refused,
    /// The client's VM is gone (torn down, or its agent closed).
    VmGone,
    /// A wait timed out (agent reply, READY, shim, process start).
    Timeout,
    /// The agent answered ERROR.
    AgentError,
    /// Reaching the agent failed (dialling it, channel closed, write or
    /// read failed).
    AgentIo,
    /// The daemon is shutting down.
    ShuttingDown,
    /// The agent sent bytes that are not its framing (on ctl or io); the
    /// VM is torn down. Counted where it is detected, not per response.
    AgentGarbage,
}

impl ErrorKind {
    /// Every kind, in export order.
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::BadFrame,
        ErrorKind::InvalidPayload,
        ErrorKind::Refused,
        ErrorKind::VmGone,
        ErrorKind::Timeout,
        ErrorKind::AgentError,
        ErrorKind::AgentIo,
        ErrorKind::ShuttingDown,
        ErrorKind::AgentGarbage,
    ];

    /// The `kind` label.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::BadFrame => "bad_frame",
            ErrorKind::InvalidPayload => "invalid_payload",
            ErrorKind::Refused => "refused",
            ErrorKind::VmGone => "vm_gone",
            ErrorKind::Timeout => "timeout",
            ErrorKind::AgentError => "agent_error",
            ErrorKind::AgentIo => "agent_io",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::AgentGarbage => "agent_garbage",
        }
    }

    /// The kind of an error response.
    pub fn of(e: &ProxyError) -> Self {
        match e {
            ProxyError::MissingField(_)
            | ProxyError::InvalidPayload { .. }
            | ProxyError::AgentAddr { .. } => ErrorKind::InvalidPayload,
            ProxyError::VmGone | ProxyError::AgentGone { .. } | ProxyError::VmTornDown { .. } => {
                ErrorKind::VmGone
            }
            ProxyError::Timeout { .. } => ErrorKind::Timeout,
            ProxyError::Agent { .. } => ErrorKind::AgentError,
            ProxyError::AgentClosed { .. }
            | ProxyError::AgentRead { .. }
            | ProxyError::AgentWrite { .. }
            | ProxyError::AgentGarbage { .. }
            | ProxyError::AgentDial { .. } => ErrorKind::AgentIo,
            ProxyError::ShuttingDown => ErrorKind::ShuttingDown,
            // Every other variant is a rule saying no.
            _ => ErrorKind::Refused,
        }
    }
}

/// How a ctl transaction ended, for `cc_proxy_ctl_transactions_total{result}`.
const CTL_RESULTS: [&str; 4] = ["ok", "agent_error", "timeout", "failed"];

/// Upper bounds (seconds) of the ctl round-trip histogram's buckets; one
/// more bucket, +Inf, holds the rest.
pub const CTL_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// A histogram of durations in fixed buckets, lock-free (one relaxed
/// increment per bucket and sum).
#[derive(Debug, Default)]
pub struct DurationHistogram {
    buckets: [AtomicU64; CTL_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = CTL_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(CTL_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// (per-bucket counts with their upper bounds, not cumulative; count; sum in seconds).
    fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let buckets: Vec<(f64, u64)> = CTL_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (buckets, count, sum)
    }
}

/// The daemon-wide counters. Per-VM counters live in the VM.
#[derive(Debug, Default)]
pub struct Metrics {
    conns_accepted: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    ctl_results: [AtomicU64; CTL_RESULTS.len()],
    ctl_round_trip: DurationHistogram,
}

impl Metrics {
    /// A client connection was accepted (and is served).
    pub fn conn_accepted(&self) {
        self.conns_accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one error.
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Count an error response.
    pub fn error_response(&self, e: &ProxyError) {
        self.error(ErrorKind::of(e));
    }

    /// A ctl transaction ended after `took` with `result`.
    pub fn ctl_done<T>(&self, took: Duration, result: &Result<T, ProxyError>) {
        let i = match result {
            Ok(_) => 0,
            Err(ProxyError::Agent { .. }) => 1,
            Err(ProxyError::Timeout { .. }) => 2,
            Err(_) => 3,
        };
        self.ctl_results[i].fetch_add(1, Ordering::Relaxed);
        self.ctl_round_trip.observe(took);
    }
}

/// Whether the configuration asks for a metrics endpoint.
pub fn enabled(shared: &Shared) -> bool {
    shared.config.metrics_addr.is_some() || shared.config.metrics_socket.is_some()
}

/// One VM's figures at scrape time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFigures {
    /// The container id it was registered with.
    pub container_id: String,
    /// Its sessions (tokens with a session).
    pub sessions: u64,
    /// Sessions whose token a shim holds.
    pub shims: u64,
    /// io payload bytes from the agent.
    pub bytes_from_agent: u64,
    /// io payload bytes to the agent.
    pub bytes_to_agent: u64,
    /// io messages from the agent.
    pub msgs_from_agent: u64,
    /// io messages to the agent.
    pub msgs_to_agent: u64,
    /// Output bytes queued for shims, all sessions.
    pub queued: u64,
    /// Output bytes queued in its fullest session.
    pub queued_max: u64,
}

/// Everything a scrape shows, read at once.
#[derive(Debug, Clone)]
pub struct Snapshot {
    vms: u64,
    tokens: u64,
    sessions: u64,
    shims: u64,
    session_buffer: u64,
    conns_accepted: u64,
    conns_open: u64,
    memory_budget: u64,
    memory_used: u64,
    errors: Vec<(&'static str, u64)>,
    ctl_results: Vec<(&'static str, u64)>,
    ctl_buckets: Vec<(f64, u64)>,
    ctl_count: u64,
    ctl_sum: f64,
    per_vm: Vec<VmFigures>,
}

impl Snapshot {
    /// Read the daemon's figures (the state's lock is held only to copy
    /// the VM list).
    pub fn take(shared: &Shared) -> Self {
        let (vms, tokens, list) = {
            let st = shared.state();
            (
                st.registry.vm_count() as u64,
                st.registry.token_count() as u64,
                st.registry
                    .vm_handles()
                    .map(|(id, vm)| (vm.clone(), st.registry.vm_registered(id)))
                    .collect::<Vec<_>>(),
            )
        };
        // Sessions and shims of every running VM, also one unregistered
        // whose agent still runs.
        let (mut all_sessions, mut all_shims) = (0, 0);
        let mut per_vm: Vec<VmFigures> = list
            .iter()
            .filter(|(vm, _)| !vm.is_gone())
            .filter_map(|(vm, registered)| {
                let sessions = vm.sessions();
                let queued: Vec<u64> = sessions.iter().map(|s| s.queued_bytes() as u64).collect();
                let f = VmFigures {
                    container_id: vm.container_id.clone(),
                    sessions: sessions.len() as u64,
                    shims: sessions.iter().filter(|s| s.shim.get()).count() as u64,
                    bytes_from_agent: vm.bytes_from_agent.load(Ordering::Relaxed),
                    bytes_to_agent: vm.bytes_to_agent.load(Ordering::Relaxed),
                    msgs_from_agent: vm.msgs_from_agent.load(Ordering::Relaxed),
                    msgs_to_agent: vm.msgs_to_agent.load(Ordering::Relaxed),
                    queued: queued.iter().sum(),
                    queued_max: queued.iter().copied().max().unwrap_or(0),
                };
                all_sessions += f.sessions;
                all_shims += f.shims;
                // An unregistered VM is not listed: its container id may
                // be registered again, and series must be unique.
                registered.then_some(f)
            })
            .collect();
        per_vm.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        let m = &shared.metrics;
        let accepted = m.conns_accepted.load(Ordering::Relaxed);
        let budget = (shared.config.memory_budget as usize).min(Semaphore::MAX_PERMITS);
        let (ctl_buckets, ctl_count, ctl_sum) = m.ctl_round_trip.snapshot();
        Self {
            vms,
            tokens,
            sessions: all_sessions,
            shims: all_shims,
            // As the sessions apply it (room for one agent message at least).
            session_buffer: crate::vm::session_bound(
                shared.config.session_buffer,
                crate::vm::agent_message_bound(shared.config.max_frame_size),
            ) as u64,
            conns_accepted: accepted,
            conns_open: shared.connections.load(Ordering::Relaxed) as u64,
            memory_budget: budget as u64,
            memory_used: budget.saturating_sub(shared.budget.available_permits()) as u64,
            errors: ErrorKind::ALL
                .iter()
                .map(|k| (k.name(), m.errors[*k as usize].load(Ordering::Relaxed)))
                .collect(),
            ctl_results: CTL_RESULTS
                .iter()
                .zip(&m.ctl_results)
                .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
                .collect(),
            ctl_buckets,
            ctl_count,
            ctl_sum,
            per_vm,
        }
    }

    /// The figures of the live VMs.
    pub fn vms(&self) -> &[VmFigures] {
        &self.per_vm
    }

    /// The exposition: OpenMetrics text if `openmetrics`, else the
    /// Prometheus text format 0.0.4.
    pub fn render(self, openmetrics: bool) -> Result<String, fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        }
        Ok(out)
    }
}

type Labels<'a> = [(&'static str, &'a str); 1];

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> fmt::Result {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, unit, c.metric_type())?)
}

/// A family with one label; `kind` is Counter or Gauge.
fn family<'v>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    label: &'static str,
    series: impl IntoIterator<Item = (&'v str, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    for (value, v) in series {
        let labels: Labels<'_> = [(label, value)];
        let e = m.encode_family(&labels)?;
        if kind == MetricType::Counter {
            ConstCounter::new(v).encode(e)?;
        } else {
            ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(e)?;
        }
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let e = &mut enc;
        let bytes = Some(&Unit::Bytes);
        gauge(
            e,
            "cc_proxy_vms",
            "VMs known to the proxy: registered, awaiting UnregisterVM after their agent went, or unregistered while their agent still runs.",
            None,
            self.vms,
        )?;
        gauge(
            e,
            "cc_proxy_tokens",
            "I/O tokens allocated and not yet freed.",
            None,
            self.tokens,
        )?;
        gauge(
            e,
            "cc_proxy_sessions",
            "Sessions (tokens with an output queue) of running VMs.",
            None,
            self.sessions,
        )?;
        gauge(
            e,
            "cc_proxy_shims_connected",
            "Sessions whose token a connected shim holds.",
            None,
            self.shims,
        )?;
        counter(
            e,
            "cc_proxy_connections_accepted",
            "Client connections accepted on the proxy socket.",
            None,
            self.conns_accepted,
        )?;
        gauge(
            e,
            "cc_proxy_connections_open",
            "Client connections open now.",
            None,
            self.conns_open,
        )?;
        family(
            e,
            "cc_proxy_errors",
            "Errors by kind: error responses, malformed frames, agent garbage.",
            None,
            MetricType::Counter,
            "kind",
            self.errors.iter().map(|(k, n)| (*k, *n)),
        )?;
        family(
            e,
            "cc_proxy_ctl_transactions",
            "Agent ctl transactions by how they ended.",
            None,
            MetricType::Counter,
            "result",
            self.ctl_results.iter().map(|(k, n)| (*k, *n)),
        )?;
        {
            let mut m = e.encode_descriptor(
                "cc_proxy_ctl_round_trip",
                "Time from writing a ctl request to the agent until its outcome (reply, timeout or failure).",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                self.ctl_sum,
                self.ctl_count,
                &self.ctl_buckets,
                None,
            )?;
        }
        gauge(
            e,
            "cc_proxy_memory_budget",
            "The daemon-wide memory budget for queued output, frames being read and stdin waiting for its process (--memory-budget).",
            bytes,
            self.memory_budget,
        )?;
        gauge(
            e,
            "cc_proxy_memory_budget_used",
            "Of the memory budget, bytes in use now.",
            bytes,
            self.memory_used,
        )?;
        gauge(
            e,
            "cc_proxy_session_buffer",
            "Output bytes one session may queue before back-pressure reaches its VM (--session-buffer).",
            bytes,
            self.session_buffer,
        )?;
        let vms = &self.per_vm;
        let per_vm =
            |f: fn(&VmFigures) -> u64| vms.iter().map(move |v| (v.container_id.as_str(), f(v)));
        let cid = "container_id";
        family(
            e,
            "cc_proxy_vm_sessions",
            "Sessions of the VM.",
            None,
            MetricType::Gauge,
            cid,
            per_vm(|v| v.sessions),
        )?;
        family(
            e,
            "cc_proxy_vm_shims_connected",
            "Sessions of the VM whose token a connected shim holds.",
            None,
            MetricType::Gauge,
            cid,
            per_vm(|v| v.shims),
        )?;
        family(
            e,
            "cc_proxy_vm_io_from_agent",
            "io payload bytes received from the VM's agent.",
            bytes,
            MetricType::Counter,
            cid,
            per_vm(|v| v.bytes_from_agent),
        )?;
        family(
            e,
            "cc_proxy_vm_io_to_agent",
            "io payload bytes sent to the VM's agent (stdin).",
            bytes,
            MetricType::Counter,
            cid,
            per_vm(|v| v.bytes_to_agent),
        )?;
        family(
            e,
            "cc_proxy_vm_io_from_agent_messages",
            "io messages received from the VM's agent.",
            None,
            MetricType::Counter,
            cid,
            per_vm(|v| v.msgs_from_agent),
        )?;
        family(
            e,
            "cc_proxy_vm_io_to_agent_messages",
            "io messages sent to the VM's agent.",
            None,
            MetricType::Counter,
            cid,
            per_vm(|v| v.msgs_to_agent),
        )?;
        family(
            e,
            "cc_proxy_vm_output_queued",
            "Output bytes queued for the VM's shims and not yet written to them.",
            bytes,
            MetricType::Gauge,
            cid,
            per_vm(|v| v.queued),
        )?;
        family(
            e,
            "cc_proxy_vm_output_queued_max_session",
            "Output bytes queued in the VM's fullest session (back-pressure at --session-buffer).",
            bytes,
            MetricType::Gauge,
            cid,
            per_vm(|v| v.queued_max),
        )?;
        Ok(())
    }
}

/// The metrics endpoint's listeners; a unix socket file is removed on drop.
#[derive(Debug)]
pub struct Endpoint {
    socket: Option<PathBuf>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Bind the configured metrics listeners and serve them until shutdown.
/// `None` if none is configured.
pub fn start(shared: &Arc<Shared>) -> io::Result<Option<Endpoint>> {
    if !enabled(shared) {
        return Ok(None);
    }
    let limit = Arc::new(Semaphore::new(MAX_SCRAPERS));
    let mut ep = Endpoint {
        socket: None,
        tasks: Vec::new(),
    };
    if let Some(addr) = shared.config.metrics_addr {
        let l = bind_tcp(addr)?;
        let local = l.local_addr()?;
        if !local.ip().is_loopback() {
            warn!(addr = %local, "the metrics endpoint is reachable from other hosts (it names containers); prefer 127.0.0.1");
        }
        info!(addr = %local, "metrics on http://{local}/metrics");
        let (w, stop) = (Arc::downgrade(shared), shared.shutdown.subscribe());
        ep.tasks
            .push(tokio::spawn(accept_loop(l, w, limit.clone(), stop)));
    }
    if let Some(path) = &shared.config.metrics_socket {
        let l = bind_unix(path)?;
        ep.socket = Some(path.clone());
        info!(socket = %path.display(), "metrics on http over the unix socket");
        let (w, stop) = (Arc::downgrade(shared), shared.shutdown.subscribe());
        ep.tasks.push(tokio::spawn(accept_loop(l, w, limit, stop)));
    }
    Ok(Some(ep))
}

/// A listener of the endpoint.
trait Acceptor: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl std::future::Future<Output = io::Result<Self::Stream>> + Send;
}

impl Acceptor for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Acceptor for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Accept scrapers until shutdown. A run of failed accepts (out of
/// descriptors) is logged once, and summed up when accepting works again.
async fn accept_loop<A: Acceptor>(
    l: A,
    shared: Weak<Shared>,
    limit: Arc<Semaphore>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failed = 0u64;
    loop {
        let r = tokio::select! {
            r = l.accept_one() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match r {
            Ok(s) => {
                if failed > 0 {
                    info!(
                        failed_accepts = failed,
                        "metrics: accepting connections again"
                    );
                    failed = 0;
                }
                spawn_scrape(&shared, &limit, s);
            }
            Err(e) => {
                if failed == 0 {
                    warn!(error = %e, "metrics: accept failed; retrying every 50ms");
                }
                failed = failed.saturating_add(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("binding --metrics-addr {addr}: {e}")))?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// A fresh unix socket (mode 0660); a stale socket file is replaced only
/// when nothing listens on it.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    let named = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("--metrics-socket {}: {e}", path.display()),
        )
    };
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(named(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "something listens on it already",
                )));
            }
            std::fs::remove_file(path).map_err(named)?;
        }
        Ok(_) => {
            return Err(named(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )))
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path).map_err(named)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(named)?;
    Ok(l)
}

fn spawn_scrape<S>(shared: &Weak<Shared>, limit: &Arc<Semaphore>, s: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        debug!("metrics: too many scrapers at once; closing a connection");
        return;
    };
    let shared = shared.clone();
    let task = async move {
        let _permit = permit;
        if let Err(e) = scrape(&shared, s).await {
            debug!(error = %e, "metrics: scrape failed");
        }
    };
    tokio::spawn(crate::panics::CatchPanic::new(
        task,
        |msg| error!(panic = %msg, "a metrics scrape panicked; its connection is closed"),
    ));
}

/// One request, one response, then the connection closes.
async fn scrape<S>(shared: &Weak<Shared>, mut s: S) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut s)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")),
    };
    let resp = match parse_request(&head) {
        Err(status) => Response::text(status, ""),
        Ok(req) => match shared.upgrade() {
            None => Response::text("503 Service Unavailable", "the proxy is stopping\n"),
            Some(shared) => {
                let openmetrics = req.openmetrics;
                match Snapshot::take(&shared).render(openmetrics) {
                    Ok(body) => Response {
                        status: "200 OK",
                        content_type: if openmetrics {
                            OPENMETRICS_TEXT
                        } else {
                            PROMETHEUS_TEXT
                        },
                        body,
                        head_only: req.head_only,
                    },
                    Err(_) => Response::text("500 Internal Server Error", "encoding failed\n"),
                }
            }
        },
    };
    tokio::time::timeout(IO_TIMEOUT, resp.write(&mut s))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "response timed out"))?
}

/// The request head up to its blank line; `None` if the peer closed first.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf) {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST {
            // parse_request refuses what has no end.
            return Ok(Some(buf));
        }
    }
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| b.windows(2).position(|w| w == b"\n\n"))
}

#[derive(Debug, PartialEq, Eq)]
struct Request {
    head_only: bool,
    openmetrics: bool,
}

/// A GET (or HEAD) of /metrics, or the status to refuse it with.
fn parse_request(head: &[u8]) -> Result<Request, &'static str> {
    if head.len() > MAX_REQUEST {
        return Err("431 Request Header Fields Too Large");
    }
    let text = std::str::from_utf8(head).map_err(|_| "400 Bad Request")?;
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, target, version) = (first.next(), first.next(), first.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err("400 Bad Request");
    };
    if !version.starts_with("HTTP/1.") || first.next().is_some() {
        return Err("400 Bad Request");
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return Err("404 Not Found");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err("405 Method Not Allowed"),
    };
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    Ok(Request {
        head_only,
        openmetrics,
    })
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    head_only: bool,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Self {
        let body = if body.is_empty() {
            format!("{status}\n")
        } else {
            body.to_owned()
        };
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
            head_only: false,
        }
    }

    async fn write<S: AsyncWrite + Unpin>(&self, s: &mut S) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if self.status.starts_with("405") {
            head.push_str("Allow: GET, HEAD\r\n");
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        if !self.head_only {
            s.write_all(self.body.as_bytes()).await?;
        }
        s.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_and_refused_as_http_says() {
        let ok = parse_request(b"GET /metrics HTTP/1.1\r\nHost: x").unwrap();
        assert_eq!(
            ok,
            Request {
                head_only: false,
                openmetrics: false
            }
        );
        let om = parse_request(
            b"GET /metrics?x=1 HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0",
        )
        .unwrap();
        assert!(om.openmetrics);
        assert!(parse_request(b"HEAD /metrics HTTP/1.0").unwrap().head_only);
        assert_eq!(parse_request(b"GET / HTTP/1.1"), Err("404 Not Found"));
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1"),
            Err("405 Method Not Allowed")
        );
        assert_eq!(parse_request(b"GET /metrics"), Err("400 Bad Request"));
        assert_eq!(parse_request(b"\xff\xfe"), Err("400 Bad Request"));
        assert_eq!(
            parse_request(&[b'a'; MAX_REQUEST + 1]),
            Err("431 Request Header Fields Too Large")
        );
    }

    #[test]
    fn the_histogram_puts_each_duration_in_its_bucket() {
        let h = DurationHistogram::default();
        h.observe(Duration::from_micros(100)); // ≤ 0.0001
        h.observe(Duration::from_micros(101)); // ≤ 0.00025
        h.observe(Duration::from_secs(31)); // +Inf
        let (b, count, sum) = h.snapshot();
        assert_eq!(count, 3);
        assert_eq!(b[0], (0.0001, 1));
        assert_eq!(b[1], (0.00025, 1));
        assert_eq!(b[CTL_BUCKETS.len()], (f64::INFINITY, 1));
        assert!((sum - 31.000201).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn no_flag_no_listener_and_no_ctl_timing() {
        let config = crate::config::Config::parse_args(["cc-proxy"]).unwrap();
        let shared = Shared::new(config, Path::new("/nonexistent/p.sock"), false, None);
        assert!(!enabled(&shared));
        assert!(start(&shared).unwrap().is_none());
    }

    #[test]
    fn every_error_kind_has_its_slot() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        assert_eq!(
            ErrorKind::of(&ProxyError::UnknownToken("t".into())),
            ErrorKind::Refused
        );
        assert_eq!(ErrorKind::of(&ProxyError::VmGone), ErrorKind::VmGone);
    }

    #[test]
    fn container_ids_are_escaped_in_labels() {
        let s = Snapshot {
            vms: 1,
            tokens: 0,
            sessions: 2,
            shims: 1,
            session_buffer: 4096,
            conns_accepted: 2,
            conns_open: 1,
            memory_budget: 1 << 20,
            memory_used: 0,
            errors: vec![("refused", 3)],
            ctl_results: vec![("ok", 1)],
            ctl_buckets: vec![(0.001, 1), (f64::INFINITY, 0)],
            ctl_count: 1,
            ctl_sum: 0.0005,
            per_vm: vec![VmFigures {
                container_id: "a\"b\\c\nd".into(),
                sessions: 2,
                shims: 1,
                bytes_from_agent: 10,
                bytes_to_agent: 5,
                msgs_from_agent: 2,
                msgs_to_agent: 1,
                queued: 0,
                queued_max: 0,
            }],
        };
        let text = s.clone().render(false).unwrap();
        assert!(
            text.contains("cc_proxy_vm_sessions{container_id=\"a\\\"b\\\\c\\nd\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("cc_proxy_errors_total{kind=\"refused\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("cc_proxy_vm_io_from_agent_bytes_total{container_id="),
            "{text}"
        );
        assert!(
            text.contains("cc_proxy_ctl_round_trip_seconds_bucket{le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE cc_proxy_session_buffer_bytes gauge\n"),
            "{text}"
        );
        let om = s.render(true).unwrap();
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
