//! `cargo xtask fuzz [--seconds N] [target…]`: run the cargo-fuzz targets in
//! `fuzz/`, each for a bounded time.
//!
//! Installs cargo-fuzz (`cargo install cargo-fuzz --locked`) when it is
//! missing. libFuzzer needs a nightly compiler: `cargo +nightly` when a
//! nightly toolchain is installed, else the stable one with
//! `RUSTC_BOOTSTRAP=1`. A crash leaves its input in
//! `fuzz/artifacts/<target>/`; turn it into a `regression_<what>` test in
//! proxy-proto (decoders), proxy-server's tests (`daemon`: the whole daemon
//! in process, fed by several clients and a fake agent) or proxy-client's
//! (`client_reader`: the client's connection reader).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util;

/// Every target in `fuzz/fuzz_targets/`, in the order they run.
pub const TARGETS: [&str; 7] = [
    "frame_decoder",
    "ctl_decoder",
    "io_decoder",
    "relocate",
    "payloads",
    "daemon",
    "client_reader",
];

const DEFAULT_SECONDS: u64 = 30;

pub fn run(args: &[String]) -> Result<(), String> {
    let mut seconds = DEFAULT_SECONDS;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" | "-s" => {
                let v = it.next().ok_or("--seconds needs a number")?;
                seconds = parse_seconds(v)?;
            }
            s if s.starts_with("--seconds=") => {
                seconds = parse_seconds(&s["--seconds=".len()..])?;
            }
            t if TARGETS.contains(&t) => targets.push(t),
            other => {
                return Err(format!(
                    "fuzz: unknown argument `{other}` (targets: {})",
                    TARGETS.join(", ")
                ))
            }
        }
    }
    if targets.is_empty() {
        targets.extend(TARGETS);
    }

    ensure_cargo_fuzz()?;
    let nightly = has_nightly();
    let dir = fuzz_dir();
    for t in targets {
        let mut cmd = Command::new("cargo");
        if nightly {
            cmd.arg("+nightly");
        } else {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        cmd.args([
            "fuzz",
            "run",
            t,
            "--",
            &format!("-max_total_time={seconds}"),
        ]);
        // The outer cargo's path would pin the stable toolchain.
        cmd.env_remove("CARGO");
        if !nightly {
            eprintln!("(no nightly toolchain: RUSTC_BOOTSTRAP=1)");
        }
        run_in(&mut cmd, &dir)
            .map_err(|e| format!("{e}\nfuzz target `{t}` failed: see fuzz/artifacts/{t}/"))?;
    }
    Ok(())
}

/// Like [`util::run`], in `dir` instead of the repository root.
fn run_in(cmd: &mut Command, dir: &Path) -> Result<(), String> {
    cmd.current_dir(dir);
    eprintln!("$ (cd {}) {}", dir.display(), util::describe(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start `{}`: {e}", util::describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed: {status}", util::describe(cmd)))
    }
}

fn parse_seconds(v: &str) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("--seconds takes a positive number, not `{v}`")),
    }
}

fn fuzz_dir() -> PathBuf {
    crate::root().join("fuzz")
}

/// Whether `cargo fuzz` answers; install it if not.
fn ensure_cargo_fuzz() -> Result<(), String> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("cargo-fuzz is not installed; installing it");
    util::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// Whether `rustup` knows a nightly toolchain.
fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.starts_with("nightly"))
        })
}
