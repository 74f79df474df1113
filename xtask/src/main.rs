//! `cargo xtask <verb>`: the project's verbs, as in rust-analyzer.
//!
//! - `ci`    — what `.ci/run` and the GitHub workflow run: fmt check, clippy
//!   with `-D warnings`, every test and doc test, rustdoc with `-D warnings`,
//!   the `no_std` builds of `proxy-proto`, then `e2e` (real QEMU guests),
//!   `bench --quick` and a 45 s `soak` (`--no-e2e`, `--no-bench`,
//!   `--no-soak` skip those).
//! - `e2e`   — boot QEMU guests with `proxy-agent` as `/init` and drive the
//!   release `cc-proxy` through `proxy-client` and `cc-proxy-shim`.
//! - `bench` — the release `cc-proxy` against direct sockets.
//! - `soak`  — the release `cc-proxy` for N minutes under a random mix of
//!   every command, reconnects, slow readers and agent faults; every reply
//!   and byte checked, RSS and fds sampled (`ci` runs 45 s of it).
//! - `fuzz`  — each cargo-fuzz target in `fuzz/` for a bounded time
//!   (`--seconds N`, default 30); installs cargo-fuzz if it is missing.
//!
//! Every command that is run is echoed first, so a CI log reads as a script.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod bench;
mod e2e;
mod fuzz;
mod soak;
mod util;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (verb, rest) = match args.split_first() {
        Some((v, rest)) => (v.as_str(), rest),
        None => {
            eprintln!("{}", USAGE);
            return ExitCode::from(2);
        }
    };
    let result = match verb {
        "bench" => bench::run(rest),
        "ci" => ci(rest),
        "e2e" => e2e::run(rest),
        "fuzz" => fuzz::run(rest),
        "soak" => soak::run(rest),
        "-h" | "--help" | "help" => {
            println!("{}", USAGE);
            Ok(())
        }
        other => Err(format!("unknown verb `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <verb>

verbs:
  bench [--quick] [--repeat N] [--report] [--only FIGURE,...]
                     the release cc-proxy vs direct sockets; target/bench/report.json
  ci [--no-e2e] [--no-bench] [--no-soak]
                     fmt check, clippy -D warnings, all tests, no_std build,
                     then e2e, bench --quick and soak --seconds 45
  fuzz [--seconds N] [TARGET...]
                     run each fuzz target (or those named) for N s, default 30
  soak [--minutes N | --seconds N] [--report] [--vms N] [--shims-per-vm N] [--seed N]
       [--reconnect-percent N]
                     the release cc-proxy under random commands, reconnects and
                     agent faults, every byte checked; target/soak/summary.json
                     (--report: docs/soak.svg)
  e2e [--only virtio-serial|hybrid-vsock]
                     boot real guests (QEMU, TCG) with proxy-agent as /init and
                     drive them; provisions what it needs under target/e2e/";

/// The repository root, found from this crate's manifest directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the repository root")
        .to_path_buf()
}

fn ci(args: &[String]) -> Result<(), String> {
    let mut e2e = true;
    let mut bench = true;
    let mut soak = true;
    for a in args {
        match a.as_str() {
            "--no-e2e" => e2e = false,
            "--no-bench" => bench = false,
            "--no-soak" => soak = false,
            other => return Err(format!("ci: unknown argument `{other}`")),
        }
    }
    let cargo = util::cargo();
    util::run(Command::new(&cargo).args(["fmt", "--all", "--", "--check"]))?;
    util::run(Command::new(&cargo).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    util::run(Command::new(&cargo).args(["test", "--workspace", "--all-targets"]))?;
    util::run(Command::new(&cargo).args(["test", "--workspace", "--doc"]))?;
    util::run(
        Command::new(&cargo)
            .env("RUSTDOCFLAGS", "-D warnings")
            .args(["doc", "--workspace", "--no-deps"]),
    )?;
    util::run(Command::new(&cargo).args(["build", "-p", "proxy-proto", "--no-default-features"]))?;
    util::run(Command::new(&cargo).args([
        "build",
        "-p",
        "proxy-proto",
        "--no-default-features",
        "--features",
        "alloc,serde",
    ]))?;
    if e2e {
        e2e::run(&[])?;
    }
    if bench {
        // Figures are not judged here (a shared CI machine is noisy); a
        // wrong byte fails, and the bench must keep building and running.
        bench::run(&["--quick".to_string()])?;
    }
    if soak {
        // 45 s of every command and fault: a wrong reply or byte, a crash
        // or a leak fails CI; the long runs are `cargo xtask soak --minutes 30`.
        soak::run(&["--seconds".to_string(), "45".to_string()])?;
    }
    Ok(())
}
