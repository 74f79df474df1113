//! `cargo xtask <verb>`: the project's verbs, as in rust-analyzer.
//!
//! - `ci`    — what `.ci/run` and the GitHub workflow run: fmt check, clippy
//!   with `-D warnings`, every test and doc test, the `no_std` build of
//!   `proxy-proto`.
//! - `fuzz`  — each cargo-fuzz target in `fuzz/` for a bounded time
//!   (`--seconds N`, default 30); installs cargo-fuzz if it is missing.
//!
//! Every command that is run is echoed first, so a CI log reads as a script.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod bench;
mod e2e;
mod fuzz;
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
  bench [--quick] [--repeat N] [--report]
                     the release cc-proxy vs direct sockets; target/bench/report.json
  ci                 fmt check, clippy -D warnings, all tests, no_std build
  fuzz [--seconds N] [TARGET...]
                     run each fuzz target (or those named) for N s, default 30
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
    let skip_e2e = args.iter().any(|a| a == "--no-e2e");
    let _ = skip_e2e;
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
    util::run(Command::new(&cargo).args(["build", "-p", "proxy-proto", "--no-default-features"]))?;
    util::run(Command::new(&cargo).args([
        "build",
        "-p",
        "proxy-proto",
        "--no-default-features",
        "--features",
        "alloc,serde",
    ]))?;
    Ok(())
}
