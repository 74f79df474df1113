//! The metrics endpoint (docs/METRICS.md): exact figures after a known
//! workload, a torn-down VM's series going away, the HTTP responder's
//! limits, and the TCP listener.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{check_pattern, header, pattern, proxy_with};
use proxy_test_support::hyper::{Code, MAX_IO_DATA};
use proxy_test_support::proxy_proto::Command;
use proxy_test_support::scenario::Vm;
use proxy_test_support::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// A bounded wait: this many tries, `TRY_EVERY` apart.
const TRIES: usize = 500;
const TRY_EVERY: Duration = Duration::from_millis(10);

/// An HTTP response: status line, headers (lower-case names), body.
#[derive(Debug)]
struct Http {
    status: String,
    headers: HashMap<String, String>,
    body: String,
}

/// One request; `None` if the connection closed without an answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, request: &[u8]) -> Option<Http> {
    s.write_all(request).await.ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("the metrics endpoint answered within 10 s")
        .ok()?;
    if raw.is_empty() {
        return None;
    }
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Http {
        status,
        headers,
        body: body.to_owned(),
    })
}

async fn get_unix(sock: &Path, request: &[u8]) -> Http {
    // The endpoint is bound just after the proxy socket (wait for it), and
    // closes connections beyond its few scrapers at once (try again).
    for _ in 0..TRIES {
        if let Ok(mut s) = UnixStream::connect(sock).await {
            if let Some(r) = exchange(&mut s, request).await {
                return r;
            }
        }
        tokio::time::sleep(TRY_EVERY).await;
    }
    panic!("no answer on {}", sock.display());
}

/// A parsed exposition: series (name and labels, as written) → value.
#[derive(Debug)]
struct Scrape {
    series: HashMap<String, f64>,
    text: String,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("not a sample line: {l:?}"));
                let v = match v {
                    "+Inf" => f64::INFINITY,
                    v => v
                        .parse()
                        .unwrap_or_else(|_| panic!("not a number in {l:?}")),
                };
                (k.to_owned(), v)
            })
            .collect();
        Self { series, text }
    }

    /// A series' value; panics (with the exposition) if it is missing.
    fn get(&self, key: &str) -> f64 {
        *self
            .series
            .get(key)
            .unwrap_or_else(|| panic!("no series {key} in:\n{}", self.text))
    }

    fn try_get(&self, key: &str) -> Option<f64> {
        self.series.get(key).copied()
    }

    fn vm(&self, name: &str, id: &str) -> f64 {
        self.get(&format!("{name}{{container_id=\"{id}\"}}"))
    }

    fn error(&self, kind: &str) -> f64 {
        self.get(&format!("cc_proxy_errors_total{{kind=\"{kind}\"}}"))
    }
}

async fn scrape(sock: &Path) -> Scrape {
    let r = get_unix(sock, b"GET /metrics HTTP/1.1\r\nHost: cc-proxy\r\n\r\n").await;
    assert_eq!(r.status, "HTTP/1.1 200 OK", "{r:?}");
    Scrape::parse(r.body)
}

/// Scrape until `done` holds; panics, naming `what` and showing the last
/// exposition, if it does not within the bound.
async fn scrape_until(sock: &Path, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut last = scrape(sock).await;
    for _ in 0..TRIES {
        if done(&last) {
            return last;
        }
        tokio::time::sleep(TRY_EVERY).await;
        last = scrape(sock).await;
    }
    panic!("waited in vain for {what}; last scrape:\n{}", last.text);
}

const ERROR_KINDS: [&str; 9] = [
    "bad_frame",
    "invalid_payload",
    "refused",
    "vm_gone",
    "timeout",
    "agent_error",
    "agent_io",
    "shutting_down",
    "agent_garbage",
];

#[tokio::test]
async fn a_known_workload_gives_exact_figures() {
    let dir = TempDir::new();
    let msock = dir.socket("metrics.sock");
    let mut p = proxy_with(&[
        "--metrics-socket",
        msock.to_str().expect("a UTF-8 temp path"),
        "--ctl-timeout",
        "2s",
    ])
    .await;
    // The fixture's start-up probe is a connection too: count from here.
    let base = scrape_until(&msock, "no client connection open", |s| {
        s.try_get("cc_proxy_connections_open") == Some(0.0)
    })
    .await;
    let accepted = base.get("cc_proxy_connections_accepted_total");
    for (name, want) in [
        ("cc_proxy_vms", 0.0),
        ("cc_proxy_tokens", 0.0),
        ("cc_proxy_sessions", 0.0),
        ("cc_proxy_shims_connected", 0.0),
        ("cc_proxy_ctl_round_trip_seconds_count", 0.0),
        // --session-buffer (4 MiB), raised to one largest agent message
        // (--max-frame-size 4 MiB and its 12-byte header) and its item
        // cost (128).
        ("cc_proxy_session_buffer_bytes", 4194444.0),
        ("cc_proxy_memory_budget_bytes", 268435456.0),
        ("cc_proxy_memory_budget_used_bytes", 0.0),
    ] {
        assert_eq!(base.get(name), want, "{name} at start:\n{}", base.text);
    }
    for k in ERROR_KINDS {
        assert_eq!(base.error(k), 0.0, "errors{{kind={k}}} at start");
    }
    assert!(!base.text.contains("container_id"), "{}", base.text);

    // A VM with two tokens (connection 1: the runtime), a shim on the
    // first (connection 2) whose container the agent ACKs (ctl: ok).
    let mut vm = Vm::register(&p, 2).await;
    let t0 = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t0).await;
    let other = if c.io_base == 3 { 5 } else { 3 };

    // M messages of stdout, N bytes, all read by the shim.
    let sizes = [1, 100, 1000, 5000, MAX_IO_DATA];
    let (m, n): (usize, usize) = (sizes.len(), sizes.iter().sum());
    let mut off = 0;
    for len in sizes {
        vm.agent.send_io(c.io_base, pattern(off, len)).await;
        off += len;
    }
    check_pattern(0, &c.shim.expect_stdout(n).await).unwrap();
    // Q bytes to the session without a shim, in one message: they stay queued.
    let q = 777usize;
    // What it holds of the budget: its bytes and its item cost.
    let held = q + proxy_server::session::ITEM_COST as usize;
    vm.agent.send_io(other, vec![7u8; q]).await;
    // K bytes of stdin in one frame: split into three io messages.
    let k = 2 * MAX_IO_DATA + 5;
    c.shim.stdin(pattern(0, k)).await;
    check_pattern(0, &vm.agent.read_io_until(c.io_base, k).await).unwrap();

    // Errors: two refusals, one invalid payload (on the runtime's connection).
    assert!(vm.runtime.hyper("nosuchcommand", &[], None).await.is_err());
    assert!(vm.runtime.signal(9, 0, 0).await.is_err());
    vm.runtime
        .send_command(Command::AttachVm, &b"{not json"[..])
        .await;
    vm.runtime.expect_error(Command::AttachVm).await;
    // The agent says ERROR to one ping and nothing to another (ctl timeout).
    let (r, ()) = tokio::join!(vm.runtime.hyper("ping", &[], None), async {
        vm.agent.expect_ctl(Code::Ping).await;
        vm.agent.reply_error("not today").await;
    });
    assert!(r.unwrap_err().contains("not today"));
    let (r, _) = tokio::join!(
        vm.runtime.hyper("ping", &[], None),
        vm.agent.expect_ctl(Code::Ping)
    );
    assert!(r.unwrap_err().contains("timed out"));
    // A malformed frame on a third connection, which the proxy closes.
    let mut bad = p.client().await;
    bad.send_raw(&header(2, 3, 0, Command::Hyper as u8, 4 * 1024 * 1024 + 1))
        .await;
    bad.expect_closed().await;

    let id = vm.id.clone();
    let s = scrape_until(&msock, "the workload's counts", |s| {
        s.try_get(&format!(
            "cc_proxy_vm_io_from_agent_bytes_total{{container_id=\"{id}\"}}"
        )) == Some((n + q) as f64)
            && s.try_get(&format!(
                "cc_proxy_vm_io_to_agent_bytes_total{{container_id=\"{id}\"}}"
            )) == Some(k as f64)
            && s.try_get(&format!(
                "cc_proxy_vm_output_queued_bytes{{container_id=\"{id}\"}}"
            )) == Some(held as f64)
            && s.try_get("cc_proxy_connections_open") == Some(2.0)
            && s.try_get("cc_proxy_memory_budget_used_bytes") == Some(held as f64)
    })
    .await;
    let exact = [
        ("cc_proxy_vms", 1.0),
        ("cc_proxy_tokens", 2.0),
        ("cc_proxy_sessions", 2.0),
        ("cc_proxy_shims_connected", 1.0),
        ("cc_proxy_connections_accepted_total", accepted + 3.0),
        ("cc_proxy_connections_open", 2.0),
        // What is held: the output queued for the session without a shim.
        ("cc_proxy_memory_budget_used_bytes", held as f64),
        (
            "cc_proxy_ctl_transactions_total{result=\"ok\"}",
            1.0, // newcontainer
        ),
        (
            "cc_proxy_ctl_transactions_total{result=\"agent_error\"}",
            1.0,
        ),
        ("cc_proxy_ctl_transactions_total{result=\"timeout\"}", 1.0),
        ("cc_proxy_ctl_transactions_total{result=\"failed\"}", 0.0),
        ("cc_proxy_ctl_round_trip_seconds_count", 3.0),
        ("cc_proxy_ctl_round_trip_seconds_bucket{le=\"+Inf\"}", 3.0),
    ];
    for (key, want) in exact {
        assert_eq!(s.get(key), want, "{key}:\n{}", s.text);
    }
    // The timed-out ping alone took its 2 s timeout.
    assert!(
        s.get("cc_proxy_ctl_round_trip_seconds_sum") >= 2.0,
        "{}",
        s.text
    );
    for (name, want) in [
        ("cc_proxy_vm_sessions", 2),
        ("cc_proxy_vm_shims_connected", 1),
        ("cc_proxy_vm_io_from_agent_bytes_total", n + q),
        ("cc_proxy_vm_io_from_agent_messages_total", m + 1),
        ("cc_proxy_vm_io_to_agent_bytes_total", k),
        ("cc_proxy_vm_io_to_agent_messages_total", 3),
        ("cc_proxy_vm_output_queued_bytes", held),
        ("cc_proxy_vm_output_queued_max_session_bytes", held),
    ] {
        assert_eq!(s.vm(name, &id), want as f64, "{name}:\n{}", s.text);
    }
    for (kind, want) in [
        ("bad_frame", 1.0),
        ("invalid_payload", 1.0),
        ("refused", 2.0),
        ("vm_gone", 0.0),
        ("timeout", 1.0),
        ("agent_error", 1.0),
        ("agent_io", 0.0),
        ("shutting_down", 0.0),
        ("agent_garbage", 0.0),
    ] {
        assert_eq!(s.error(kind), want, "errors{{kind={kind}}}:\n{}", s.text);
    }
    p.assert_running();
}

#[tokio::test]
async fn a_torn_down_vms_series_disappear() {
    let dir = TempDir::new();
    let msock = dir.socket("metrics.sock");
    let mut p = proxy_with(&["--metrics-socket", msock.to_str().expect("UTF-8")]).await;
    let mut a = Vm::register(&p, 1).await;
    let mut b = Vm::register(&p, 2).await;
    let s = scrape(&msock).await;
    assert_eq!(s.vm("cc_proxy_vm_sessions", &a.id), 1.0, "{}", s.text);
    assert_eq!(s.vm("cc_proxy_vm_sessions", &b.id), 2.0, "{}", s.text);
    assert_eq!(s.get("cc_proxy_vms"), 2.0);

    // a's agent sends garbage on io: a is torn down (it stays registered
    // until UnregisterVM), b is untouched.
    a.agent
        .send_garbage_io(&[0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 5])
        .await;
    let a_id = a.id.clone();
    let s = scrape_until(&msock, "VM a's series to go", |s| !s.text.contains(&a_id)).await;
    assert_eq!(s.error("agent_garbage"), 1.0, "{}", s.text);
    assert_eq!(s.get("cc_proxy_vms"), 2.0, "a awaits UnregisterVM");
    assert_eq!(s.get("cc_proxy_tokens"), 2.0, "a's token is gone");
    assert_eq!(s.get("cc_proxy_sessions"), 2.0);
    assert_eq!(s.vm("cc_proxy_vm_sessions", &b.id), 2.0, "{}", s.text);
    a.runtime.unregister_vm(&a.id).await.unwrap();
    let s = scrape_until(&msock, "a to be forgotten", |s| {
        s.try_get("cc_proxy_vms") == Some(1.0)
    })
    .await;
    assert!(!s.text.contains(&a_id), "{}", s.text);

    // b: UnregisterVM. Its series go at once, though its agent still runs
    // (the VM is still served until its agent closes its channels).
    b.runtime.unregister_vm(&b.id).await.unwrap();
    let b_id = b.id.clone();
    let s = scrape(&msock).await;
    assert!(!s.text.contains(&b_id), "{}", s.text);
    assert_eq!(s.get("cc_proxy_vms"), 1.0, "{}", s.text);
    assert_eq!(s.get("cc_proxy_sessions"), 2.0, "{}", s.text);
    // The id registered again meanwhile: one VM's series under it, the new one's.
    let again = proxy_test_support::MockAgent::start().await;
    let mut c = p.client().await;
    c.register_agent(&b_id, &again, 1).await.unwrap();
    let s = scrape(&msock).await;
    let key = format!("cc_proxy_vm_sessions{{container_id=\"{b_id}\"}}");
    assert_eq!(s.text.matches(&key).count(), 1, "{}", s.text);
    assert_eq!(s.get(&key), 1.0, "{}", s.text);
    assert_eq!(s.get("cc_proxy_vms"), 2.0, "{}", s.text);
    // The old b's agent closes its channels (the runtime's destroypod).
    b.agent.close().await;
    let s = scrape_until(&msock, "the old VM b to go", |s| {
        s.try_get("cc_proxy_vms") == Some(1.0)
    })
    .await;
    assert_eq!(s.get(&key), 1.0, "{}", s.text);
    assert_eq!(s.get("cc_proxy_tokens"), 1.0);
    assert_eq!(s.get("cc_proxy_sessions"), 1.0);
    // And the new one's agent too: nothing per VM is left.
    c.unregister_vm(&b_id).await.unwrap();
    again.close().await;
    let s = scrape_until(&msock, "every VM to go", |s| {
        s.try_get("cc_proxy_vms") == Some(0.0)
    })
    .await;
    assert!(!s.text.contains("container_id="), "{}", s.text);
    assert_eq!(s.get("cc_proxy_tokens"), 0.0);
    assert_eq!(s.get("cc_proxy_sessions"), 0.0);
    p.assert_running();
}

#[tokio::test]
async fn container_ids_are_escaped_in_labels() {
    let dir = TempDir::new();
    let msock = dir.socket("metrics.sock");
    let p = proxy_with(&["--metrics-socket", msock.to_str().expect("UTF-8")]).await;
    let agent = proxy_test_support::MockAgent::start().await;
    let mut c = p.client().await;
    let id = "pod \"x\"\\\n} 1";
    c.register_agent(id, &agent, 0).await.unwrap();
    let s = scrape(&msock).await;
    assert_eq!(
        s.get("cc_proxy_vm_sessions{container_id=\"pod \\\"x\\\"\\\\\\n} 1\"}"),
        0.0,
        "{}",
        s.text
    );
    // Each sample is one line: the newline did not break out.
    assert!(
        s.text
            .lines()
            .all(|l| l.starts_with('#') || l.starts_with("cc_proxy_")),
        "{}",
        s.text
    );
}

#[tokio::test]
async fn the_responder_answers_only_get_of_metrics_and_bounds_requests() {
    let dir = TempDir::new();
    let msock = dir.socket("metrics.sock");
    let mut p = proxy_with(&[
        "--metrics-socket",
        msock.to_str().expect("UTF-8"),
        "--session-buffer",
        "4096",
        "--max-frame-size",
        "8192",
    ])
    .await;
    // The bound as sessions apply it: room for one agent message at least
    // (8192 + 12, but never below hyperstart's 10240) and its item cost.
    assert_eq!(
        scrape(&msock).await.get("cc_proxy_session_buffer_bytes"),
        10368.0
    );
    let r = get_unix(&msock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, "HTTP/1.1 200 OK");
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(r.headers["content-length"], r.body.len().to_string());
    assert!(r.body.contains("# TYPE cc_proxy_vms gauge\n"), "{}", r.body);
    let r = get_unix(
        &msock,
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, "HTTP/1.1 200 OK");
    assert!(r.headers["content-type"].starts_with("application/openmetrics-text"));
    assert!(r.body.ends_with("# EOF\n"), "{}", r.body);
    let r = get_unix(&msock, b"HEAD /metrics HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, "HTTP/1.1 200 OK");
    assert!(r.body.is_empty());
    let r = get_unix(&msock, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(r.status, "HTTP/1.1 404 Not Found");
    let r = get_unix(&msock, b"POST /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(r.status, "HTTP/1.1 405 Method Not Allowed");
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 9000));
    let r = get_unix(&msock, &huge).await;
    assert_eq!(r.status, "HTTP/1.1 431 Request Header Fields Too Large");
    // Four connections at once at most: a fifth is closed unanswered
    // (connections are accepted in order, each takes its slot at once).
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(UnixStream::connect(&msock).await.unwrap());
    }
    let mut fifth = UnixStream::connect(&msock).await.unwrap();
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), fifth.read_to_end(&mut got))
        .await
        .expect("the fifth connection is closed at once");
    assert!(r.is_err() || got.is_empty(), "{got:?}");
    // Their slots come back when they go.
    drop(idle);
    let s = scrape(&msock).await;
    assert_eq!(s.get("cc_proxy_vms"), 0.0);
    p.assert_running();
}

#[tokio::test]
async fn the_tcp_listener_serves_the_same() {
    let mut p = proxy_with(&["--metrics-addr", "127.0.0.1:0"]).await;
    let needle = "metrics on http://";
    p.wait_for_log(needle, Duration::from_secs(10)).await;
    let log = p.log();
    let addr = log
        .split(needle)
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("the address in the log")
        .to_owned();
    let s = TcpStream::connect(&addr).await.expect("connect to metrics");
    let r = exchange(s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("an answer");
    assert_eq!(r.status, "HTTP/1.1 200 OK", "{r:?}");
    let s = Scrape::parse(r.body);
    assert_eq!(s.get("cc_proxy_vms"), 0.0);
    p.assert_running();
}

#[test]
fn the_flags_are_documented_and_a_bad_endpoint_stops_the_start() {
    let out = std::process::Command::new(common::BIN)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in ["--metrics-addr", "--metrics-socket"] {
        assert!(help.contains(opt), "--help lacks {opt}:\n{help}");
    }
    let dir = TempDir::new();
    let sock = dir.socket("proxy.sock");
    let not_a_socket = dir.socket("metrics.sock");
    std::fs::write(&not_a_socket, b"a file").unwrap();
    let out = std::process::Command::new(common::BIN)
        .arg("-socket-path")
        .arg(&sock)
        .args(["-ksm", "initial", "--metrics-socket"])
        .arg(&not_a_socket)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--metrics-socket") && err.contains("not a socket"),
        "{err}"
    );
    assert!(!sock.exists(), "the proxy socket is removed again");
    assert_eq!(std::fs::read(&not_a_socket).unwrap(), b"a file");
    let out = std::process::Command::new(common::BIN)
        .args(["--metrics-addr", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
