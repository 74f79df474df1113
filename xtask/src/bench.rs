//! `cargo xtask bench`: build the release `cc-proxy` (static) and `proxy-bench`,
//! then run the bench against the daemon (see `crates/proxy-bench`).
//!
//! Arguments are passed to `proxy-bench`: `--quick` (a smoke run, well
//! under a minute; fails only on wrong bytes, never on a target),
//! `--repeat N` (min / median / max of N runs; targets are judged on the
//! median and count with N >= 5), `--report` (also write
//! `docs/PERFORMANCE.md`, `docs/perf-throughput.svg` and the scaling
//! series' `docs/perf-*.svg`), `--note TEXT` (a note for the top of that
//! page), `--only FIGURE,...` (part of the figures, for profiling).
//! The JSON report goes to `target/bench/report.json`.

use std::process::Command;

use crate::util;

pub fn run(args: &[String]) -> Result<(), String> {
    let (cc_proxy, bench) = util::build_daemon_and_bench_bin("proxy-bench")?;
    let root = crate::root();
    util::run(
        Command::new(&bench)
            .arg("--cc-proxy")
            .arg(&cc_proxy)
            .arg("--out")
            .arg(util::target_dir().join("bench"))
            .arg("--docs")
            .arg(root.join("docs"))
            .args(args),
    )
}
