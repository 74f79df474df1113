//! `cargo xtask bench`: build the release `cc-proxy` (static) and `proxy-bench`,
//! then run the bench against the daemon (see `crates/proxy-bench`).
//!
//! Arguments are passed to `proxy-bench`: `--quick` (a few seconds, fails
//! only on wrong bytes), `--repeat N` (medians of N runs), `--report`
//! (also write `docs/PERFORMANCE.md` and `docs/perf-throughput.svg`).
//! The JSON report goes to `target/bench/report.json`.

use std::process::Command;

use crate::util;

/// The target of the static build (the only one installed here).
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn run(args: &[String]) -> Result<(), String> {
    let cargo = util::cargo();
    // The daemon as it is best shipped: a static (static-pie) release
    // binary, which needs no libc on the host and maps less memory (no
    // shared libc, libm, ld.so pages in its RSS). Its own `--target` keeps
    // the host build of the workspace untouched, as for the guest agent.
    util::run(
        Command::new(&cargo)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args([
                "build",
                "--release",
                "-p",
                "proxy-server",
                "--bin",
                "cc-proxy",
                "--target",
                STATIC_TARGET,
            ]),
    )?;
    util::run(Command::new(&cargo).args([
        "build",
        "--release",
        "-p",
        "proxy-bench",
        "--bin",
        "proxy-bench",
    ]))?;
    let release = util::target_dir().join("release");
    let root = crate::root();
    util::run(
        Command::new(release.join("proxy-bench"))
            .arg("--cc-proxy")
            .arg(
                util::target_dir()
                    .join(STATIC_TARGET)
                    .join("release/cc-proxy"),
            )
            .arg("--out")
            .arg(util::target_dir().join("bench"))
            .arg("--docs")
            .arg(root.join("docs"))
            .args(args),
    )
}
