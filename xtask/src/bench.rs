//! `cargo xtask bench`: build the release `cc-proxy` and `proxy-bench`,
//! then run the bench against the daemon (see `crates/proxy-bench`).
//!
//! Arguments are passed to `proxy-bench`: `--quick` (a few seconds, fails
//! only on wrong bytes), `--repeat N` (medians of N runs), `--report`
//! (also write `docs/PERFORMANCE.md` and `docs/perf-throughput.svg`).
//! The JSON report goes to `target/bench/report.json`.

use std::path::PathBuf;
use std::process::Command;

use crate::util;

/// Where cargo puts build outputs: `$CARGO_TARGET_DIR` or `<root>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                crate::root().join(d)
            }
        }
        None => crate::root().join("target"),
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let cargo = util::cargo();
    util::run(Command::new(&cargo).args([
        "build",
        "--release",
        "-p",
        "proxy-server",
        "--bin",
        "cc-proxy",
    ]))?;
    util::run(Command::new(&cargo).args([
        "build",
        "--release",
        "-p",
        "proxy-bench",
        "--bin",
        "proxy-bench",
    ]))?;
    let release = target_dir().join("release");
    let root = crate::root();
    util::run(
        Command::new(release.join("proxy-bench"))
            .arg("--cc-proxy")
            .arg(release.join("cc-proxy"))
            .arg("--out")
            .arg(target_dir().join("bench"))
            .arg("--docs")
            .arg(root.join("docs"))
            .args(args),
    )
}
