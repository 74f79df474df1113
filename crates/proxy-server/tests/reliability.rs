//! What hostile tests found (docs/RELIABILITY.md): signals that killed the
//! daemon, forged log lines, a log flood. Each `regression_` test failed on
//! the daemon before its fix.

mod common;

use std::time::Duration;

use common::{assert_vm_answers, proxy};
use nix::sys::signal::Signal;
use proxy_test_support::assert_serves_fresh_vm;
use proxy_test_support::scenario::Vm;

#[tokio::test]
async fn regression_sighup_and_other_signals_do_not_kill_the_daemon() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    for sig in [
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGPIPE,
        Signal::SIGHUP,
    ] {
        p.signal(sig);
    }
    p.wait_for_log(
        "SIGHUP: there is no configuration to reload",
        Duration::from_secs(10),
    )
    .await;
    p.wait_for_log("SIGALRM", Duration::from_secs(10)).await;
    p.assert_running();
    // The VM and its session are untouched.
    vm.agent.send_io(c.io_base, b"still here").await;
    assert_eq!(&c.shim.expect_stdout(10).await[..], b"still here");
    assert_vm_answers(&mut vm).await;
    assert_serves_fresh_vm(&p).await;
}

#[tokio::test]
async fn regression_sigquit_shuts_down_cleanly_and_removes_the_socket() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    let t = vm.tokens[0].clone();
    let mut c = vm.start_container(&p, &t).await;
    p.signal(Signal::SIGQUIT);
    let status = p.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    assert!(!p.socket_path().exists(), "the socket is removed on exit");
    c.shim.expect_closed().await;
    vm.runtime.expect_closed().await;
    assert!(
        p.log().contains("SIGQUIT: shutting down"),
        "{}",
        p.log_tail()
    );
}

/// No line of the log may start with what a client smuggled after a
/// newline.
fn assert_no_forged_line(log: &str, forged: &str) {
    for line in log.lines() {
        assert!(
            !line.trim_start().starts_with(forged),
            "a forged log line: {line:?}"
        );
    }
}

#[tokio::test]
async fn regression_newlines_from_clients_do_not_forge_log_lines() {
    let mut p = proxy().await;
    let mut vm = Vm::register(&p, 1).await;
    // A containerId with a line of its own.
    let mut c = p.client().await;
    let evil_id = "pod\nFORGED-1 INFO cc-proxy: all is well";
    let _ = c.attach_vm(evil_id, 0).await;
    let _ = c.unregister_vm(evil_id).await;
    // A log stream message, and one with other control characters.
    c.log(r#"{"level":"warn","containerId":"c\nFORGED-2","source":"shim","msg":"one\nFORGED-3 ERROR x\r\u001b[2J"}"#)
        .await;
    // An agent error message.
    let (r, ()) = tokio::join!(vm.runtime.hyper("ping", &[], None), async {
        vm.agent
            .expect_ctl(proxy_test_support::hyper::Code::Ping)
            .await;
        vm.agent.reply_error("no\nFORGED-4 agent").await;
    });
    assert!(r.is_err());
    // Wait until the last of them was logged (escaped).
    p.wait_for_log("FORGED-4", Duration::from_secs(10)).await;
    p.wait_for_log("FORGED-3", Duration::from_secs(10)).await;
    let log = p.log();
    for n in 1..=4 {
        assert_no_forged_line(&log, &format!("FORGED-{n}"));
    }
    assert!(log.contains(r"\nFORGED-3"), "escaped, not dropped: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "no raw escape sequence reaches the log"
    );
    p.assert_running();
}

#[tokio::test]
async fn regression_running_out_of_descriptors_logs_once_and_a_summary_and_serves_existing_clients()
{
    let mut p = proxy_test_support::ProxyProcess::builder(common::BIN)
        .nofile_limit(48)
        .start()
        .await;
    let mut vm = Vm::register(&p, 0).await;
    // Connect until the daemon cannot accept any more: the kernel takes
    // the connections (backlog), the daemon's accept fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(
            tokio::net::UnixStream::connect(p.socket_path())
                .await
                .unwrap(),
        );
        if p.log().contains("accept failed") {
            break;
        }
        tokio::task::yield_now().await;
    }
    p.wait_for_log("accept failed", Duration::from_secs(10))
        .await;
    // While descriptors are short, existing clients are served.
    assert_vm_answers(&mut vm).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(held);
    // A new client is accepted once descriptors are free again.
    let mut fresh = p.client().await;
    assert!(fresh.attach_vm("nobody", 0).await.is_err());
    p.wait_for_log("accepting connections again", Duration::from_secs(10))
        .await;
    let log = p.log();
    let summary = log
        .lines()
        .find(|l| l.contains("accepting connections again"))
        .unwrap();
    let n: u64 = summary
        .split("failed_accepts=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the summary counts the failures: {summary}"));
    assert!(n >= 2, "the daemon retried while exhausted: {summary}");
    assert_eq!(
        log.matches("accept failed").count(),
        1,
        "one line for {n} failed accepts, not one each:\n{log}"
    );
    p.assert_running();
    assert_serves_fresh_vm(&p).await;
}
