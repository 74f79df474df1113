//! `cargo xtask dist`: what a host installs. Release binaries (static-pie,
//! as the e2e run and the bench build them, so the builds are shared), man
//! pages (clap_mangen) and shell completions (clap_complete) from the
//! programs' own command lines, and a `.deb` (cargo-deb, installed with
//! `cargo install` if missing) with those, the systemd units and the docs.
//!
//! The checks `cargo xtask ci` runs on them live here too:
//! [`systemd_check`] (the units pass `systemd-analyze verify`; the daemon
//! serves a socket passed by `systemd-socket-activate`) and
//! [`deb_install_check`] (install the .deb, run the quickstart against the
//! installed programs under socket activation, purge, nothing left).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::CommandFactory;

use crate::util;

// The client programs' command lines are private to their binaries; their
// sources are compiled in here (unused but for `Args`) so that the man
// pages and completions are made from exactly what the programs parse.
#[allow(dead_code, unused_imports, clippy::all)]
#[path = "../../crates/proxy-client/src/bin/cc-proxy-ctl.rs"]
mod ctl_cli;
#[allow(dead_code, unused_imports, clippy::all)]
#[path = "../../crates/proxy-client/src/bin/cc-proxy-shim.rs"]
mod shim_cli;

/// The cargo-deb release `cargo xtask dist` installs when it is missing.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// The three programs and their command lines.
fn commands() -> Vec<clap::Command> {
    vec![
        proxy_server::config::Config::command(),
        ctl_cli::Args::command(),
        shim_cli::Args::command(),
    ]
}

/// Where the built binaries are (cargo-deb's `target/release/`).
fn release_dir() -> PathBuf {
    util::target_dir().join(util::STATIC_TARGET).join("release")
}

/// `cargo xtask dist [--no-deb] [--check]`: returns the .deb's path (if
/// built). `--check` then runs what CI runs on it: [`systemd_check`] and
/// [`deb_install_check`] (which installs the package for a moment).
pub fn run(args: &[String]) -> Result<Option<PathBuf>, String> {
    let mut deb = true;
    let mut check = false;
    for a in args {
        match a.as_str() {
            "--no-deb" => deb = false,
            "--check" => check = true,
            other => return Err(format!("dist: unknown argument `{other}`")),
        }
    }
    let made = build(deb)?;
    if check {
        systemd_check()?;
        let deb = made.as_deref().ok_or("dist --check needs the .deb")?;
        deb_install_check(deb)?;
    }
    Ok(made)
}

fn build(deb: bool) -> Result<Option<PathBuf>, String> {
    for (package, bin) in [
        ("proxy-server", "cc-proxy"),
        ("proxy-client", "cc-proxy-ctl"),
        ("proxy-client", "cc-proxy-shim"),
    ] {
        util::build_static(package, bin)?;
    }
    let out = release_dir().join("dist");
    write_man_and_completions(&out)?;
    if !deb {
        return Ok(None);
    }
    ensure_cargo_deb()?;
    let deb_dir = util::target_dir().join("debian");
    let _ = fs::remove_dir_all(&deb_dir);
    util::run(
        Command::new(util::cargo())
            .args(["deb", "-p", "proxy-server", "--no-build", "--target"])
            .arg(util::STATIC_TARGET)
            .arg("--output")
            .arg(&deb_dir),
    )?;
    let deb = fs::read_dir(&deb_dir)
        .map_err(|e| format!("{}: {e}", deb_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("cargo deb left no .deb in {}", deb_dir.display()))?;
    util::run(Command::new("dpkg-deb").arg("--info").arg(&deb))?;
    util::run(Command::new("dpkg-deb").arg("--contents").arg(&deb))?;
    eprintln!("dist: {}", deb.display());
    Ok(Some(deb))
}

/// `<out>/man/<prog>.1` and `<out>/completions/{bash,zsh,fish}/…`, named
/// as each shell looks them up.
fn write_man_and_completions(out: &Path) -> Result<(), String> {
    use clap_complete::Shell;
    let _ = fs::remove_dir_all(out);
    let mkdir = |d: &Path| fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()));
    let man = out.join("man");
    mkdir(&man)?;
    for cmd in commands() {
        let name = cmd.get_name().to_string();
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .render(&mut page)
            .map_err(|e| format!("man page of {name}: {e}"))?;
        let path = man.join(format!("{name}.1"));
        fs::write(&path, page).map_err(|e| format!("{}: {e}", path.display()))?;
        // Debian ships man pages gzipped; -n: no name or time stamp, so the
        // package is reproducible. -k keeps the page for `man -l`.
        util::run(
            Command::new("gzip")
                .args(["-9", "-n", "-k", "-f"])
                .arg(&path),
        )?;
        for (shell, file) in [
            (Shell::Bash, name.clone()),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let dir = out.join("completions").join(shell.to_string());
            mkdir(&dir)?;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut script);
            let path = dir.join(file);
            fs::write(&path, script).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    eprintln!("dist: man pages and completions in {}", out.display());
    Ok(())
}

fn ensure_cargo_deb() -> Result<(), String> {
    let have = Command::new(util::cargo())
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    eprintln!("dist: installing cargo-deb {CARGO_DEB_VERSION} (cargo install, ~2 min)");
    util::run(Command::new(util::cargo()).args([
        "install",
        "--locked",
        "cargo-deb",
        "--version",
        CARGO_DEB_VERSION,
    ]))
}

/// A program on `PATH`.
fn on_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// `systemd-analyze` and `systemd-socket-activate` (Debian's `systemd`
/// package), installed with apt when missing and we are root; `None` (with
/// a message) when they cannot be had.
fn systemd_tools() -> Option<(PathBuf, PathBuf)> {
    let find = || {
        Some((
            on_path("systemd-analyze")?,
            on_path("systemd-socket-activate")?,
        ))
    };
    if let Some(t) = find() {
        return Some(t);
    }
    if nix::unistd::geteuid().is_root() && on_path("apt-get").is_some() {
        eprintln!("systemd: installing the systemd package (apt) for systemd-analyze and systemd-socket-activate");
        let _ = util::run(Command::new("apt-get").args(["update", "-qq"]));
        let _ = util::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args([
                    "install",
                    "-y",
                    "--no-install-recommends",
                    "--no-remove",
                    "systemd",
                ]),
        );
    }
    let t = find();
    if t.is_none() {
        eprintln!("systemd: SKIPPED: systemd-analyze/systemd-socket-activate are not available");
    }
    t
}

/// `systemd-analyze verify` on `units`; any complaint fails.
fn verify_units(analyze: &Path, units: &[PathBuf], check_man: bool) -> Result<(), String> {
    let mut cmd = Command::new(analyze);
    cmd.arg("verify");
    if !check_man {
        cmd.arg("--man=no");
    }
    cmd.args(units);
    eprintln!("$ {}", util::describe(&cmd));
    let out = cmd
        .output()
        .map_err(|e| format!("{}: {e}", analyze.display()))?;
    let complaints =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // It checks the units against the running system; without systemd as
    // PID 1 it still parses and checks them, but may say so first.
    let complaints: Vec<&str> = complaints
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("System has not been booted with systemd"))
        .collect();
    if !out.status.success() || !complaints.is_empty() {
        return Err(format!(
            "systemd-analyze verify ({}):\n{}",
            out.status,
            complaints.join("\n")
        ));
    }
    eprintln!("systemd: the units verify cleanly");
    Ok(())
}

/// The daemon under `systemd-socket-activate` on a socket in a fresh
/// directory: stopped (SIGTERM) and its directory removed on drop.
#[derive(Debug)]
struct Activated {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

impl Activated {
    fn start(activate: &Path, daemon: &Path, tag: &str) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("cc-proxy-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let socket = dir.join("proxy.sock");
        let log = fs::File::create(dir.join("cc-proxy.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(activate);
        // -socket-path names another path on purpose: the daemon must serve
        // the socket it is passed, and hand out that one's path.
        cmd.arg("-l")
            .arg(&socket)
            .arg(daemon)
            .args(["-ksm", "initial", "-socket-path"])
            .arg(dir.join("not-this.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        eprintln!("$ {} &", util::describe(&cmd));
        let child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e}", activate.display()))?;
        let a = Self {
            child: Some(child),
            dir,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !a.socket.exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not bind {}",
                    activate.display(),
                    a.socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(a)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("cc-proxy.log")).unwrap_or_default()
    }

    /// SIGTERM (the daemon has replaced systemd-socket-activate by now),
    /// then check it exited 0 and served the passed socket.
    fn stop(mut self) -> Result<(), String> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let pid = c.id().to_string();
        eprintln!("$ kill -TERM {pid}");
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = c.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Err("the activated cc-proxy did not exit after SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log();
        eprintln!("---- activated cc-proxy log ----\n{log}----");
        if !status.success() {
            return Err(format!("the activated cc-proxy exited with {status}"));
        }
        if !log.contains("using the socket passed by the service manager") {
            return Err("the daemon did not say it used the passed socket".into());
        }
        if self.dir.join("not-this.sock").exists() {
            return Err("the daemon bound -socket-path instead of the passed socket".into());
        }
        Ok(())
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The repository's units verify (with `ExecStart` pointed at the debug
/// build), and the debug daemon serves the quickstart on a socket passed by
/// `systemd-socket-activate`.
pub fn systemd_check() -> Result<(), String> {
    let Some((analyze, activate)) = systemd_tools() else {
        return Ok(());
    };
    util::run(Command::new(util::cargo()).args([
        "build",
        "-p",
        "proxy-server",
        "--bin",
        "cc-proxy",
    ]))?;
    let daemon = util::target_dir().join("debug/cc-proxy");
    let units = std::env::temp_dir().join(format!("cc-proxy-units-{}", std::process::id()));
    let _ = fs::remove_dir_all(&units);
    fs::create_dir_all(&units).map_err(|e| e.to_string())?;
    let src = crate::root().join("dist/systemd");
    let mut paths = Vec::new();
    for name in ["cc-proxy.socket", "cc-proxy.service"] {
        let text = fs::read_to_string(src.join(name)).map_err(|e| format!("{name}: {e}"))?;
        let text = text.replace("/usr/bin/cc-proxy", &daemon.display().to_string());
        let p = units.join(name);
        fs::write(&p, text).map_err(|e| e.to_string())?;
        paths.push(p);
    }
    let r = verify_units(&analyze, &paths, false);
    let _ = fs::remove_dir_all(&units);
    r?;

    let a = Activated::start(&activate, &daemon, "activated")?;
    let socket = a.socket.display().to_string();
    let r = crate::demo_check(&["--socket", &socket]);
    if r.is_err() {
        eprintln!("---- activated cc-proxy log ----\n{}----", a.log());
    }
    r?;
    a.stop()
}

/// Install the .deb, check the installed units, run the quickstart with the
/// installed programs under socket activation, purge it and check that
/// nothing it installed is left. Changes the host while it runs: CI does
/// it (`CI=true`), or `cargo xtask ci --install-deb`.
pub fn deb_install_check(deb: &Path) -> Result<(), String> {
    const PKG: &str = "cc-proxy";
    let installed_before = Command::new("dpkg")
        .args(["-s", PKG])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed_before {
        if std::env::var("CI").as_deref() != Ok("true") {
            return Err(format!(
                "package {PKG} is installed already; not replacing it (dpkg --purge {PKG} first)"
            ));
        }
        // A CI machine that a killed run left it on.
        eprintln!("deb: {PKG} is installed (left by an earlier run?): purging it first");
        util::run(Command::new("dpkg").args(["--purge", PKG]))?;
    }
    util::run(Command::new("dpkg").arg("-i").arg(deb))?;
    let r = installed_checks();
    // Purge whatever happened, then judge.
    let files = dpkg_files(PKG);
    let purge = util::run(Command::new("dpkg").args(["--purge", PKG]));
    r?;
    purge?;
    let files = files?;
    let left: Vec<&PathBuf> = files
        .iter()
        // Shared directories (/usr/bin) stay; the package's own go.
        .filter(|p| {
            p.symlink_metadata().is_ok()
                && (!p.is_dir() || p.to_string_lossy().contains("cc-proxy"))
        })
        .collect();
    if !left.is_empty() {
        return Err(format!("files left after dpkg --purge: {left:?}"));
    }
    if Path::new("/run/cc-proxy").exists() {
        return Err("/run/cc-proxy exists after the test".into());
    }
    let still = Command::new("dpkg")
        .args(["-s", PKG])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if still {
        return Err(format!("dpkg still knows {PKG} after --purge"));
    }
    eprintln!(
        "deb: installed, served the quickstart, purged; {} files gone",
        files.len()
    );
    Ok(())
}

fn installed_checks() -> Result<(), String> {
    for bin in ["cc-proxy", "cc-proxy-ctl", "cc-proxy-shim"] {
        let p = Path::new("/usr/bin").join(bin);
        let out = Command::new(&p)
            .arg("--help")
            .output()
            .map_err(|e| format!("{}: {e}", p.display()))?;
        if !out.status.success() {
            return Err(format!("{} --help failed", p.display()));
        }
    }
    let Some((analyze, activate)) = systemd_tools() else {
        return Err("the installed-package test needs systemd-socket-activate".into());
    };
    let units: Vec<PathBuf> = ["cc-proxy.socket", "cc-proxy.service"]
        .iter()
        .map(|u| Path::new("/usr/lib/systemd/system").join(u))
        .collect();
    // The man pages named in Documentation= are installed now; `man` itself
    // may not be (a minimal image).
    verify_units(&analyze, &units, on_path("man").is_some())?;
    let a = Activated::start(&activate, Path::new("/usr/bin/cc-proxy"), "deb")?;
    let socket = a.socket.display().to_string();
    let r = crate::demo_check(&["--bin-dir", "/usr/bin", "--socket", &socket]);
    if r.is_err() {
        eprintln!("---- activated cc-proxy log ----\n{}----", a.log());
    }
    r?;
    a.stop()
}

/// The files a package installed (`dpkg -L`).
fn dpkg_files(pkg: &str) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("dpkg")
        .args(["-L", pkg])
        .output()
        .map_err(|e| format!("dpkg -L: {e}"))?;
    if !out.status.success() {
        return Err(format!("dpkg -L {pkg} failed"));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}
