//! `cargo xtask bench`: build the release `cc-proxy` (static) and `proxy-bench`,
//! then run the bench against the daemon (see `crates/proxy-bench`).
//!
//! Arguments are passed to `proxy-bench`: `--quick` (a few seconds, fails
//! only on wrong bytes), `--repeat N` (medians of N runs), `--report`
//! (also write `docs/PERFORMANCE.md` and `docs/perf-throughput.svg`),
//! `--only FIGURE,...` (part of the figures, for profiling).
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
