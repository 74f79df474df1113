//! The daemon's command line and lifecycle, run as a real process:
//! flags, the socket's modes, stale sockets, socket activation, SIGTERM.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_cc-proxy");

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ccp-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Wait until the daemon logs that it listens (connectability alone can
/// mislead: a socket bound by the test can be held open by a child another
/// test forked at that moment).
fn wait_for_socket(p: &Path, child: &mut Child) -> String {
    use std::io::BufRead;
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr piped"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap_or(0) == 0 {
            panic!(
                "cc-proxy exited before listening on {}:\n{seen}",
                p.display()
            );
        }
        seen.push_str(&line);
        if line.contains("cc-proxy listening") {
            break;
        }
    }
    UnixStream::connect(p).expect("the daemon accepts connections");
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    // The "cc-proxy listening" line.
    seen.lines().last().unwrap_or_default().to_owned()
}

fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn term_and_wait(child: &mut Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Up to 500 polls 20 ms apart: a hang fails, a slow machine does not.
    for _ in 0..500 {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no exit after SIGTERM");
}

#[test]
fn version_and_help() {
    for flag in ["-version", "--version"] {
        let out = Command::new(BIN).arg(flag).output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("cc-proxy"));
    }
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--socket-path",
        "--uri",
        "--log",
        "--ksm",
        "--max-frame-size",
        "--session-buffer",
        "--ready-timeout",
        "--ctl-timeout",
        "--shim-timeout",
        "--process-timeout",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}");
    }
    let out = Command::new(BIN).arg("-no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).args(["-log", "loud"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid log level"));
}

#[test]
fn socket_modes_sigterm_and_cleanup() {
    let d = tempdir("modes");
    let sock = d.join("run/proxy.sock");
    std::fs::create_dir(d.join("run")).unwrap();
    let mut child = spawn(&["-socket-path", sock.to_str().unwrap(), "-ksm", "initial"]);
    wait_for_socket(&sock, &mut child);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o660);
    // A second daemon on the same live socket refuses to start.
    let out = Command::new(BIN)
        .args(["-socket-path", sock.to_str().unwrap(), "-ksm", "initial"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another proxy is listening"));
    let st = term_and_wait(&mut child);
    assert!(st.success(), "{st}");
    assert!(!sock.exists(), "socket file removed on exit");
}

#[test]
fn a_stale_socket_is_replaced() {
    let d = tempdir("stale");
    let sock = d.join("proxy.sock");
    // A socket file nobody listens on, as a crashed run leaves it.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket());
    let mut child = spawn(&["--socket-path", sock.to_str().unwrap(), "--ksm", "initial"]);
    wait_for_socket(&sock, &mut child);
    let st = term_and_wait(&mut child);
    assert!(st.success(), "{st}");
}

#[test]
fn a_regular_file_in_the_way_is_not_removed() {
    let d = tempdir("file");
    let sock = d.join("proxy.sock");
    std::fs::write(&sock, b"precious").unwrap();
    let out = Command::new(BIN)
        .args(["-socket-path", sock.to_str().unwrap(), "-ksm", "initial"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
}

#[test]
fn long_socket_paths_are_refused_clearly() {
    let long = format!("/tmp/{}/p.sock", "d".repeat(110));
    let out = Command::new(BIN)
        .args(["-socket-path", &long, "-ksm", "initial"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("107"));
}

#[test]
fn socket_activation_uses_fd_3() {
    use std::os::unix::io::AsRawFd;
    use std::os::unix::process::CommandExt;
    let d = tempdir("activation");
    let sock = d.join("activated.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    // LISTEN_PID must be the daemon's own pid: a shell sets it to `$$`
    // and then execs the daemon in place.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 exec {BIN} -ksm initial -socket-path {}",
            d.join("unused.sock").display()
        ))
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe, the only call made between fork
    // and exec; `fd` stays open in the parent until after spawn.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // Already in place: only clear close-on-exec.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let listening = wait_for_socket(&sock, &mut child);
    assert!(!d.join("unused.sock").exists(), "the passed socket is used");
    // ... and its path, not -socket-path's, is the one handed to shims.
    assert!(
        listening.contains(&format!("socket={}", sock.display()))
            && listening.contains("activated=true"),
        "{listening}"
    );
    assert!(term_and_wait(&mut child).success());
    // The activated socket belongs to the service manager: not removed.
    assert!(sock.exists());
}

#[test]
fn a_missing_socket_directory_is_refused_not_created() {
    let d = tempdir("nodir");
    let sock = d.join("no/such/dir/proxy.sock");
    let out = Command::new(BIN)
        .args(["-socket-path", sock.to_str().unwrap(), "-ksm", "initial"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist")
            && err.contains(&d.join("no/such/dir").display().to_string()),
        "{err}"
    );
    assert!(!d.join("no").exists(), "nothing created");
    // The same in pod mode.
    let out = Command::new(BIN)
        .args([
            "-uri",
            &format!("unix://{}", sock.display()),
            "-ksm",
            "initial",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!d.join("no").exists(), "nothing created");
}

#[test]
fn socket_path_and_uri_together_are_refused() {
    let out = Command::new(BIN)
        .args(["-socket-path", "/tmp/a.sock", "-uri", "unix:///tmp/b.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn help_names_the_default_socket_and_the_go_spellings() {
    let out = Command::new(BIN).arg("-help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("/run/cc-proxy/proxy.sock"), "{help}");
    assert!(help.contains("-socket-path PATH"), "{help}");
}

/// Under systemd (`Type=notify`): READY=1 once the socket accepts
/// connections, STOPPING=1 on SIGTERM, through `$NOTIFY_SOCKET`.
#[test]
fn readiness_and_stopping_are_notified() {
    use std::os::unix::net::UnixDatagram;
    let d = tempdir("notify");
    let notify = d.join("notify.sock");
    let sock = d.join("proxy.sock");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut child = Command::new(BIN)
        .args(["-socket-path", sock.to_str().unwrap(), "-ksm", "initial"])
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = rx.recv(&mut buf).expect("a READY notification");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(
        msg.contains(&sock.display().to_string()),
        "STATUS names the socket: {msg:?}"
    );
    // Ready means connectable, with no retry.
    UnixStream::connect(&sock).expect("connectable once READY=1 is sent");
    std::thread::spawn({
        let mut err = child.stderr.take().unwrap();
        move || std::io::copy(&mut err, &mut std::io::sink())
    });
    assert!(term_and_wait(&mut child).success());
    let n = rx.recv(&mut buf).expect("a STOPPING notification");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
}
