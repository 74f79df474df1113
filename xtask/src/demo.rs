//! `cargo xtask demo`: the quickstart. Everything a runtime does for one
//! container, with the real programs and no VM:
//!
//! 1. start `cc-proxy` on a socket in a fresh temporary directory;
//! 2. start `proxy-agent` in host mode (it plays the VM's agent, listening
//!    on two unix sockets as QEMU's virtio-serial chardevs would);
//! 3. `cc-proxy-ctl register` the "VM" with one I/O token;
//! 4. `cc-proxy-ctl hyper startpod`, start `cc-proxy-shim` with the token,
//!    `cc-proxy-ctl hyper newcontainer` running `echo hello`;
//! 5. print what the shim printed and its exit code (the process's);
//! 6. `destroypod`, `unregister`, stop the daemon, and remove the
//!    directory, checking that no socket is left behind.
//!
//! `--bin-dir DIR` takes `cc-proxy`, `cc-proxy-ctl` and `cc-proxy-shim`
//! from DIR (e.g. `/usr/bin` after installing the .deb) instead of building
//! them; `--socket PATH` talks to a daemon that is already running there
//! (e.g. one started by systemd) instead of starting one; `--agent PATH`
//! names the `proxy-agent` binary (built otherwise).

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util;

/// What the demo saw: the shim's output and exit code.
#[derive(Debug)]
pub struct Outcome {
    /// The container process's stdout, as the shim printed it.
    pub stdout: String,
    /// The process's exit code, as the shim exited.
    pub code: i32,
}

#[derive(Debug, Default)]
struct Options {
    bin_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    agent: Option<PathBuf>,
}

/// `cargo xtask demo [--bin-dir DIR] [--socket PATH] [--agent PATH]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("demo: {name} needs a value"))
        };
        match a.as_str() {
            "--bin-dir" => o.bin_dir = Some(value("--bin-dir")?),
            "--socket" => o.socket = Some(value("--socket")?),
            "--agent" => o.agent = Some(value("--agent")?),
            other => return Err(format!("demo: unknown argument `{other}`")),
        }
    }
    let out = demo(&o)?;
    println!("---- output of `echo hello`, through cc-proxy-shim ----");
    print!("{}", out.stdout);
    println!("---- exit code: {} ----", out.code);
    if out.code != 0 || out.stdout != "hello\n" {
        return Err(format!(
            "expected \"hello\\n\" and exit code 0, got {:?} and {}",
            out.stdout, out.code
        ));
    }
    Ok(())
}

/// Children killed (and waited for) on every way out.
#[derive(Debug, Default)]
struct Children(Vec<(&'static str, Child)>);

impl Children {
    fn get(&mut self, name: &str) -> Option<&mut Child> {
        self.0.iter_mut().find(|(n, _)| *n == name).map(|(_, c)| c)
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// A temporary directory, removed on every way out.
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn demo(o: &Options) -> Result<Outcome, String> {
    // One debug build of what is missing.
    let mut packages: Vec<&str> = Vec::new();
    if o.bin_dir.is_none() {
        packages.extend(["-p", "proxy-server", "-p", "proxy-client"]);
    }
    if o.agent.is_none() {
        packages.extend(["-p", "proxy-agent"]);
    }
    if !packages.is_empty() {
        util::run(
            Command::new(util::cargo())
                .arg("build")
                .args(&packages)
                .arg("--bins"),
        )?;
    }
    let debug = util::target_dir().join("debug");
    let bin_dir = o.bin_dir.clone().unwrap_or_else(|| debug.clone());
    let (proxy_bin, ctl_bin, shim_bin) = (
        bin_dir.join("cc-proxy"),
        bin_dir.join("cc-proxy-ctl"),
        bin_dir.join("cc-proxy-shim"),
    );
    let agent_bin = o.agent.clone().unwrap_or_else(|| debug.join("proxy-agent"));
    let dir = TempDir(std::env::temp_dir().join(format!("cc-proxy-demo-{}", std::process::id())));
    let _ = fs::remove_dir_all(&dir.0);
    fs::create_dir_all(&dir.0).map_err(|e| format!("mkdir {}: {e}", dir.0.display()))?;
    eprintln!("demo: working in {}", dir.0.display());
    let mut children = Children::default();

    // 1. The daemon (unless one runs already).
    let socket = match &o.socket {
        Some(s) => s.clone(),
        None => {
            let socket = dir.0.join("proxy.sock");
            let log = fs::File::create(dir.0.join("cc-proxy.log")).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(&proxy_bin);
            cmd.arg("-socket-path")
                .arg(&socket)
                .args(["-ksm", "initial", "-log", "info"])
                .stdin(Stdio::null())
                .stderr(log);
            eprintln!("$ {} &", util::describe(&cmd));
            let child = cmd
                .spawn()
                .map_err(|e| format!("{}: {e}", proxy_bin.display()))?;
            children.0.push(("cc-proxy", child));
            socket
        }
    };
    let r = scenario(
        &dir.0,
        &socket,
        &ctl_bin,
        &shim_bin,
        &agent_bin,
        &mut children,
    );
    if r.is_err() {
        if let Ok(log) = fs::read_to_string(dir.0.join("cc-proxy.log")) {
            eprintln!("---- cc-proxy log ----\n{log}----");
        }
    }
    let outcome = r?;

    // 6. Stop the daemon we started: SIGTERM, as systemd does.
    if let Some(c) = children.get("cc-proxy") {
        let pid = c.id().to_string();
        eprintln!("$ kill -TERM {pid}");
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = wait_child(c, Duration::from_secs(10), "cc-proxy")?;
        if !status.success() {
            return Err(format!("cc-proxy exited with {status} after SIGTERM"));
        }
    }
    let left = sockets_in(&dir.0);
    if !left.is_empty() {
        return Err(format!("sockets left behind: {left:?}"));
    }
    drop(children);
    let path = dir.0.clone();
    drop(dir);
    if path.exists() {
        return Err(format!("{} could not be removed", path.display()));
    }
    eprintln!("demo: stopped everything, removed {}", path.display());
    Ok(outcome)
}

fn scenario(
    dir: &Path,
    socket: &Path,
    ctl_bin: &Path,
    shim_bin: &Path,
    agent_bin: &Path,
    children: &mut Children,
) -> Result<Outcome, String> {
    wait_listening(socket, children)?;

    // 2. The "VM": the agent in host mode.
    let (ctl_sock, io_sock) = (dir.join("agent-ctl.sock"), dir.join("agent-io.sock"));
    let mut cmd = Command::new(agent_bin);
    cmd.arg("--ctl-sock")
        .arg(&ctl_sock)
        .arg("--io-sock")
        .arg(&io_sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    eprintln!("$ {} &", util::describe(&cmd));
    let agent = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", agent_bin.display()))?;
    children.0.push(("proxy-agent", agent));

    // 3. RegisterVM: the proxy dials the agent and waits for its READY.
    let s = socket.display().to_string();
    let (ctl_s, io_s) = (
        ctl_sock.display().to_string(),
        io_sock.display().to_string(),
    );
    let out = ctl(
        ctl_bin,
        &[
            "-s", &s, "--json", "register", "demo", "--ctl", &ctl_s, "--io", &io_s, "--tokens", "1",
        ],
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("register's answer {out:?}: {e}"))?;
    let url = v["io"]["URL"]
        .as_str()
        .ok_or_else(|| format!("no io.URL in {out}"))?
        .to_string();
    let token = v["io"]["tokens"][0]
        .as_str()
        .ok_or_else(|| format!("no token in {out}"))?
        .to_string();

    // 4. The pod, then the container with the token; its shim first (the
    // proxy holds newcontainer until the token's shim is connected).
    ctl(
        ctl_bin,
        &[
            "-s",
            &s,
            "hyper",
            "--vm",
            "demo",
            "startpod",
            r#"{"hostname":"demo"}"#,
        ],
    )?;
    let mut cmd = Command::new(shim_bin);
    cmd.args(["-c", "hello", "-t", &token, "-u", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("$ {} &", util::describe(&cmd));
    let mut shim = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", shim_bin.display()))?;
    let mut shim_out = shim.stdout.take().ok_or("cc-proxy-shim stdout")?;
    children.0.push(("cc-proxy-shim", shim));
    let container = serde_json::json!({
        "id": "hello",
        "rootfs": "rootfs",
        "image": "busybox",
        "process": {
            "terminal": false,
            "stdio": 0,
            "stderr": 0,
            "args": ["echo", "hello"],
            "envs": [{"env": "PATH", "value": "/bin:/usr/bin"}],
            "workdir": "/"
        }
    })
    .to_string();
    ctl(
        ctl_bin,
        &[
            "-s",
            &s,
            "hyper",
            "--vm",
            "demo",
            "--token",
            &token,
            "newcontainer",
            &container,
        ],
    )?;

    // 5. The shim prints the process's output and exits with its code.
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        shim_out.read_to_end(&mut v).map(|_| v)
    });
    let shim = children.get("cc-proxy-shim").ok_or("shim")?;
    let status = wait_child(shim, Duration::from_secs(30), "cc-proxy-shim")?;
    let stdout = reader
        .join()
        .map_err(|_| "stdout reader panicked".to_string())?
        .map_err(|e| format!("cc-proxy-shim stdout: {e}"))?;
    let code = status
        .code()
        .ok_or_else(|| format!("cc-proxy-shim killed: {status}"))?;

    // 6. As a runtime ends a pod: destroypod (the agent exits), then
    // UnregisterVM.
    ctl(ctl_bin, &["-s", &s, "hyper", "--vm", "demo", "destroypod"])?;
    ctl(ctl_bin, &["-s", &s, "unregister", "demo"])?;
    if let Some(a) = children.get("proxy-agent") {
        wait_child(a, Duration::from_secs(10), "proxy-agent")?;
    }
    // The agent's listening sockets stand for the VM's (QEMU's chardev
    // sockets): the runtime removes those, not the proxy.
    for p in [&ctl_sock, &io_sock] {
        let _ = fs::remove_file(p);
    }
    Ok(Outcome {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        code,
    })
}

/// Run `cc-proxy-ctl args…`, echoing it and its answer; its stdout.
fn ctl(bin: &Path, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    eprintln!("$ {}", util::describe(&cmd));
    let out = cmd
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{stdout}");
    if !out.status.success() {
        return Err(format!(
            "`{}` failed ({}): {}",
            util::describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ));
    }
    Ok(stdout)
}

/// Wait until `socket` accepts connections (the daemon we started may
/// also die first).
fn wait_listening(socket: &Path, children: &mut Children) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(socket).is_err() {
        if let Some(c) = children.get("cc-proxy") {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!("cc-proxy exited at start: {st}"));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "nothing listens on {} after 20 s",
                socket.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn wait_child(
    c: &mut Child,
    timeout: Duration,
    name: &str,
) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = c.try_wait().map_err(|e| format!("{name}: {e}"))? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return Err(format!("{name} still running after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sockets under `dir`.
fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.path())
        .collect()
}
