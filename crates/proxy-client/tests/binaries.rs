//! `cc-proxy-shim` and `cc-proxy-ctl` run as child processes against the
//! real `cc-proxy` and a mock agent.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{proxy, Relay, Vm};
use proxy_test_support::hyper::Code;
use proxy_test_support::MockAgent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const SHIM: &str = env!("CARGO_BIN_EXE_cc-proxy-shim");
const CTL: &str = env!("CARGO_BIN_EXE_cc-proxy-ctl");

fn shim(url: &str, token: &str) -> Child {
    Command::new(SHIM)
        .args(["-c", "c1", "-t", token, "-u", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn cc-proxy-shim")
}

/// Wait for the child and collect its output (bounded).
async fn finish(mut child: Child) -> (i32, Vec<u8>, Vec<u8>) {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        let (a, b, s) = tokio::join!(
            out.read_to_end(&mut o),
            err.read_to_end(&mut e),
            child.wait()
        );
        a.unwrap();
        b.unwrap();
        s.unwrap()
    })
    .await
    .expect("cc-proxy-shim exits");
    (status.code().unwrap_or(-1), o, e)
}

#[tokio::test]
async fn cc_proxy_shim_pipes_its_stdio_and_exits_with_the_process_code() {
    let p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let mut child = shim(&vm.url, token.as_str());
    // The proxy holds newcontainer until the token's shim is connected.
    let io_base = vm.newcontainer("c1", &token).await;

    let mut stdin = child.stdin.take().unwrap();
    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    stdin.write_all(&input).await.unwrap();
    drop(stdin); // EOF
    let got = vm.agent.read_io_until(io_base, input.len()).await;
    assert!(got[..] == input[..], "stdin arrives intact");
    vm.agent.expect_io_eof(io_base).await;

    vm.agent.send_io(io_base, b"to stdout\n").await;
    vm.agent.send_io(io_base + 1, b"to stderr\n").await;
    vm.agent.send_exit(io_base, 7).await;
    let (code, out, err) = finish(child).await;
    assert_eq!(out, b"to stdout\n");
    assert_eq!(err, b"to stderr\n");
    assert_eq!(code, 7);
}

#[tokio::test]
async fn cc_proxy_shim_forwards_the_signals_it_gets() {
    let p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let child = shim(&vm.url, token.as_str());
    let io_base = vm.newcontainer("c-sig", &token).await;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    for (sig, n) in [
        (nix::sys::signal::Signal::SIGUSR1, 10),
        (nix::sys::signal::Signal::SIGTERM, 15),
    ] {
        nix::sys::signal::kill(pid, sig).unwrap();
        let v = vm.agent.expect_ctl_json(Code::KillContainer).await;
        assert_eq!(v["container"], "c-sig");
        assert_eq!(v["signal"], n);
        vm.agent.reply_ack(b"").await;
    }
    vm.agent.send_exit(io_base, 143).await;
    let (code, _, _) = finish(child).await;
    assert_eq!(code, 143);
}

#[tokio::test]
async fn cc_proxy_shim_reconnects_when_its_connection_drops() {
    let p = proxy().await;
    let relay = Relay::start(p.socket_path()).await;
    let mut vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let mut child = shim(&relay.url(), token.as_str());
    let io_base = vm.newcontainer("c-re", &token).await;
    let mut stdout = child.stdout.take().unwrap();

    vm.agent.send_io(io_base, b"one ").await;
    let mut buf = [0u8; 4];
    stdout.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"one ");
    relay.cut().await;
    vm.agent.send_io(io_base, b"two").await;
    vm.agent.send_exit(io_base, 0).await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stdout.read_to_end(&mut rest))
        .await
        .expect("output after the reconnect")
        .unwrap();
    assert_eq!(rest, b"two");
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn cc_proxy_shim_says_what_is_wrong() {
    let out = Command::new(SHIM).arg("--help").output().await.unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--container-id", "--token", "--uri", "-c", "-t", "-u"] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    let out = Command::new(SHIM)
        .args(["-c", "c", "-t", "tok", "-u", "vsock://3:1"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unix://"));
    // A token the proxy does not know.
    let p = proxy().await;
    let out = Command::new(SHIM)
        .args(["-c", "c", "-t", "bogus", "-u", &p.url()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ConnectShim failed") && err.contains("bogus"),
        "{err}"
    );
    // A token may start with '-' (base64url): it is a value, not a flag.
    let out = Command::new(SHIM)
        .args(["-c", "-c1", "-t", "-0tok", "-u", &p.url()])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown token \"-0tok\""), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
}

async fn ctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(CTL).args(args).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cc_proxy_ctl_registers_sends_hyper_and_unregisters() {
    let p = proxy().await;
    let sock = p.socket_path().display().to_string();
    let agent = MockAgent::start().await;
    let (ctl_path, io_path) = (
        agent.ctl_path().display().to_string(),
        agent.io_path().display().to_string(),
    );
    let (code, out, err) = ctl(&[
        "-s", &sock, "register", "pod-ctl", "--ctl", &ctl_path, "--io", &io_path, "--tokens", "2",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("registered pod-ctl\n"), "{out}");
    assert!(out.contains(&p.url()), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("  ")).count(),
        2,
        "{out}"
    );

    let (code, out, err) =
        ctl(&["-s", &sock, "--json", "attach", "pod-ctl", "--tokens", "1"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["io"]["URL"], p.url());
    assert_eq!(v["io"]["tokens"].as_array().unwrap().len(), 1);

    // The agent answers one ping with a JSON payload.
    let mut agent = agent;
    let answer = tokio::spawn(async move {
        agent.expect_ctl(Code::Ping).await;
        agent.reply_ack(br#"{"pong":true}"#).await;
        agent
    });
    let (code, out, err) = ctl(&["-s", &sock, "hyper", "--vm", "pod-ctl", "ping"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("ping: ok\n") && out.contains("\"pong\": true"),
        "{out}"
    );
    let _agent = answer.await.unwrap();

    let (code, _, err) = ctl(&["-s", &sock, "unregister", "pod-ctl"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ctl(&["-s", &sock, "unregister", "pod-ctl"]).await;
    assert_eq!(code, 1);
    assert!(
        err.starts_with("cc-proxy-ctl: unregister pod-ctl failed: unknown container pod-ctl"),
        "{err}"
    );
    let (code, _, err) = ctl(&["-s", "/nonexistent/proxy.sock", "unregister", "x"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot connect to the proxy at /nonexistent/proxy.sock"),
        "{err}"
    );
    let (code, _, err) = ctl(&["-s", &sock, "hyper", "--vm", "nope", "ping", "{bad"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("unknown container nope"), "{err}");
}

#[tokio::test]
async fn regression_cc_proxy_ctl_errors_name_the_command_asked_for_and_json_errors_are_json() {
    let p = proxy().await;
    let sock = p.socket_path().display().to_string();
    let (code, out, err) = ctl(&["-s", &sock, "hyper", "--vm", "nope", "ping"]).await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        err.trim_end(),
        "cc-proxy-ctl: hyper ping on VM nope failed: unknown container nope"
    );
    assert!(!err.contains("AttachVM"), "{err}");

    let (code, out, err) = ctl(&["-s", &sock, "--json", "hyper", "--vm", "nope", "ping"]).await;
    assert_eq!(code, 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim_end())
        .unwrap_or_else(|e| panic!("--json errors are JSON: {e}: {out:?}"));
    assert_eq!(
        v,
        serde_json::json!({
            "error": { "command": "hyper ping on VM nope", "message": "unknown container nope" }
        })
    );
    // A connection error, too.
    let (code, out, _) = ctl(&["-s", "/nonexistent/p.sock", "--json", "unregister", "x"]).await;
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
    assert_eq!(v["error"]["command"], "unregister x");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot connect to the proxy at /nonexistent/p.sock")),
        "{v}"
    );
}

/// On a terminal: the shim sends the terminal's size when it starts and on
/// SIGWINCH, and keeps the terminal in raw mode while it runs.
#[tokio::test]
async fn cc_proxy_shim_on_a_terminal_sends_its_size_and_uses_raw_mode() {
    use nix::pty::{openpty, Winsize};
    use nix::sys::termios::{tcgetattr, LocalFlags};

    let p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let token = vm.tokens[0].clone();
    let size = |rows, cols| Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size(24, 80)), None).unwrap();
    assert!(tcgetattr(&pty.slave)
        .unwrap()
        .local_flags
        .contains(LocalFlags::ICANON));
    let child = Command::new(SHIM)
        .args(["-c", "c-tty", "-t", token.as_str(), "-u", &vm.url])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let io_base = vm.newcontainer("c-tty", &token).await;

    // The size at start…
    let v = vm.agent.expect_ctl_json(Code::WinSize).await;
    assert_eq!(
        (v["seq"].as_u64(), v["row"].as_u64(), v["column"].as_u64()),
        (Some(io_base), Some(24), Some(80))
    );
    vm.agent.reply_ack(b"").await;
    // …raw mode meanwhile…
    assert!(!tcgetattr(&pty.slave)
        .unwrap()
        .local_flags
        .contains(LocalFlags::ICANON));
    // …and the new size on SIGWINCH.
    let ws = size(50, 132);
    // SAFETY: TIOCSWINSZ reads one `struct winsize` through the pointer,
    // which points to a live `Winsize`; the fd is the pty's master, open.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&pty.master),
            libc::TIOCSWINSZ,
            &ws,
        )
    };
    assert_eq!(r, 0);
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGWINCH).unwrap();
    let v = vm.agent.expect_ctl_json(Code::WinSize).await;
    assert_eq!(
        (v["row"].as_u64(), v["column"].as_u64()),
        (Some(50), Some(132))
    );
    vm.agent.reply_ack(b"").await;

    vm.agent.send_exit(io_base, 0).await;
    let (code, _, _) = finish(child).await;
    assert_eq!(code, 0);
    // The terminal is given back as it was.
    assert!(tcgetattr(&pty.slave)
        .unwrap()
        .local_flags
        .contains(LocalFlags::ICANON));
}

/// `cc-proxy-ctl stats` reads the daemon's metrics endpoint and shows
/// its figures as a table, or as JSON with `--json`.
#[tokio::test]
async fn cc_proxy_ctl_stats_shows_the_metrics_endpoints_figures() {
    let dir = proxy_test_support::TempDir::new();
    let msock = dir.socket("metrics.sock").display().to_string();
    let p = proxy_test_support::ProxyProcess::builder(common::cc_proxy())
        .args(["--metrics-socket", &msock, "--metrics-addr", "127.0.0.1:0"])
        .start()
        .await;
    let mut vm = Vm::register(&p, 2).await;
    // One ctl transaction, answered.
    let (r, ()) = tokio::join!(vm.client.hyper("ping", &[], None), async {
        vm.agent.expect_ctl(Code::Ping).await;
        vm.agent.reply_ack(b"").await;
    });
    r.unwrap();
    // Output for the first session, which no shim reads: it stays queued.
    vm.agent.send_io(3, vec![1u8; 300]).await;
    vm.agent.send_io(4, vec![2u8; 20]).await;

    // What the two messages hold of the budgets: their 320 bytes and 128
    // each besides (a queued message's item cost).
    const HELD: u64 = 320 + 2 * 128;
    let stats = ["stats", "--metrics-socket", msock.as_str()];
    let json_stats = ["--json", "stats", "--metrics-socket", msock.as_str()];
    let mut v = serde_json::Value::Null;
    for _ in 0..500 {
        let (code, out, err) = ctl(&json_stats).await;
        assert_eq!(code, 0, "{err}");
        v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        if v["vm"][0]["output_queued_bytes"] == HELD {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (key, want) in [
        ("vms", 1),
        ("tokens", 2),
        ("sessions", 2),
        ("shims_connected", 0),
        ("connections_open", 1),
        // 4 MiB, raised to one largest agent message (4 MiB + header)
        // and its item cost.
        ("session_buffer_bytes", (4 << 20) + 12 + 128),
        ("memory_budget_bytes", 256 << 20),
        ("memory_budget_used_bytes", HELD),
    ] {
        assert_eq!(v[key], want, "{key} in {v}");
    }
    assert_eq!(v["ctl"]["transactions"]["ok"], 1, "{v}");
    assert_eq!(v["ctl"]["round_trips"], 1, "{v}");
    assert!(
        v["errors"].as_object().unwrap().values().all(|n| n == 0),
        "{v}"
    );
    assert_eq!(v["vm"].as_array().map(Vec::len), Some(1), "{v}");
    let want = serde_json::json!({
        "container_id": vm.id,
        "sessions": 2,
        "shims_connected": 0,
        "io_from_agent_bytes": 320,
        "io_from_agent_messages": 2,
        "io_to_agent_bytes": 0,
        "io_to_agent_messages": 0,
        "output_queued_bytes": HELD,
        "output_queued_max_session_bytes": HELD,
    });
    assert_eq!(v["vm"][0], want, "{v}");

    // The same as a table.
    let (code, out, err) = ctl(&stats).await;
    assert_eq!(code, 0, "{err}");
    let line = |label: &str| {
        out.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
            .to_owned()
    };
    assert_eq!(line("VMs "), format!("{:<24}1", "VMs"), "{out}");
    assert_eq!(line("tokens "), format!("{:<24}2", "tokens"), "{out}");
    assert_eq!(line("errors "), format!("{:<24}none", "errors"), "{out}");
    assert!(
        line("ctl transactions ").contains("(ok 1, agent_error 0, timeout 0, failed 0)"),
        "{out}"
    );
    let header_line = line("CONTAINER");
    let header: Vec<&str> = header_line
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "CONTAINER",
            "SESSIONS",
            "SHIMS",
            "BYTES FROM AGENT",
            "MSGS FROM AGENT",
            "BYTES TO AGENT",
            "MSGS TO AGENT",
            "QUEUED",
            "FULLEST SESSION"
        ],
        "{out}"
    );
    let row: Vec<String> = line(&vm.id).split_whitespace().map(str::to_owned).collect();
    assert_eq!(
        row,
        [vm.id.as_str(), "2", "0", "320", "2", "0", "0", "576", "576"],
        "{out}"
    );

    // Over TCP: the same figures.
    let needle = "metrics on http://";
    p.wait_for_log(needle, Duration::from_secs(10)).await;
    let log = p.log();
    let addr = log
        .split(needle)
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("the metrics address in the log")
        .to_owned();
    let (code, out, err) = ctl(&["--json", "stats", "--metrics-addr", &addr]).await;
    assert_eq!(code, 0, "{err}");
    let over_tcp: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(over_tcp, v, "over TCP and over the unix socket");

    // Where the endpoint is must be said, and must be reachable.
    let (code, _, err) = ctl(&["stats"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("--metrics-addr") && err.contains("--metrics-socket"),
        "{err}"
    );
    let (code, _, err) = ctl(&["stats", "--metrics-socket", "/nonexistent/m.sock"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot connect to the metrics endpoint at /nonexistent/m.sock"),
        "{err}"
    );
}
