//! `cargo xtask <verb>`: the project's verbs, as in rust-analyzer.
//!
//! - `ci`    — what `.ci/run` and the GitHub workflow run: fmt check, clippy
//!   with `-D warnings`, every test and doc test, rustdoc with `-D warnings`,
//!   the `no_std` builds of `proxy-proto`, the quickstart (`demo`), the
//!   systemd units (`systemd-analyze verify`, socket activation), `dist`
//!   (with `CI=true` or `--install-deb`: install the .deb, run the demo
//!   with it, purge it), then `e2e` (real QEMU guests), `bench --quick`,
//!   a 60 s `soak` and 30 s of each fuzz target (`--no-e2e`, `--no-bench`,
//!   `--no-dist`, `--no-soak`, `--no-fuzz` skip those).
//! - `demo`  — the quickstart: daemon, host-mode agent, `echo hello` through
//!   `cc-proxy-shim`, teardown.
//! - `dist`  — static release binaries, man pages, completions, the .deb.
//! - `e2e`   — boot QEMU guests with `proxy-agent` as `/init` and drive the
//!   release `cc-proxy` through `proxy-client` and `cc-proxy-shim`.
//! - `bench` — the release `cc-proxy` against direct sockets.
//! - `soak`  — the release `cc-proxy` for N minutes under a random mix of
//!   every command, reconnects, slow readers and agent faults; every reply
//!   and byte checked, RSS and fds sampled (`ci` runs 60 s of it).
//! - `sim`   — the deterministic simulation: seeded schedules of runtimes,
//!   shims and agents against the sans-IO core, invariants after every step
//!   (`ci` runs a fixed set of seeds).
//! - `fuzz`  — each cargo-fuzz target in `fuzz/` for a bounded time
//!   (`--seconds N`, default 30); installs cargo-fuzz if it is missing.
//!
//! Every command that is run is echoed first, so a CI log reads as a script.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod bench;
mod demo;
mod dist;
mod e2e;
mod fuzz;
mod sim;
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
        "demo" => demo::run(rest),
        "dist" => dist::run(rest).map(drop),
        "e2e" => e2e::run(rest),
        "fuzz" => fuzz::run(rest),
        "sim" => sim::run(rest),
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
  demo [--bin-dir DIR] [--socket PATH] [--agent PATH]
                     the quickstart: daemon, host-mode agent, cc-proxy-ctl
                     register, `echo hello` through cc-proxy-shim, teardown
  dist [--no-deb] [--check]
                     release binaries (static-pie), man pages, shell
                     completions and target/debian/cc-proxy_*.deb (cargo-deb);
                     --check: then what CI checks (units, socket activation,
                     install the .deb, demo with it, purge it)
  ci [--no-e2e] [--no-bench] [--no-dist] [--no-soak] [--no-fuzz] [--install-deb]
                     fmt check, clippy -D warnings, all tests, no_std build,
                     the demo, the systemd units (verify, socket activation),
                     dist (and, with CI=true or --install-deb, install the
                     .deb, run the demo with it, purge it), then e2e,
                     bench --quick, soak --seconds 60 and fuzz --seconds 30
  fuzz [--seconds N] [TARGET...]
                     run each fuzz target (or those named) for N s, default 30
  sim [--seeds N] [--first F] [--seed S] [--steps K] [--threads T] [--dev]
                     the deterministic simulation of the core: N seeded
                     schedules (default 1000), or seed S alone; a failing
                     seed prints how to reproduce it
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
    let mut dist = true;
    let mut install_deb = std::env::var("CI").as_deref() == Ok("true");
    let mut soak = true;
    let mut fuzz = true;
    for a in args {
        match a.as_str() {
            "--no-e2e" => e2e = false,
            "--no-bench" => bench = false,
            "--no-dist" => dist = false,
            "--install-deb" => install_deb = true,
            "--no-soak" => soak = false,
            "--no-fuzz" => fuzz = false,
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
    demo_check(&[])?;
    dist::systemd_check()?;
    if dist {
        let deb = dist::run(&[])?.ok_or("dist made no .deb")?;
        if install_deb {
            dist::deb_install_check(&deb)?;
        } else {
            eprintln!(
                "deb: not installing {} (it installs system-wide): CI=true or --install-deb does",
                deb.display()
            );
        }
    }
    // The simulation: a fixed set of seeds (under a minute); the long runs
    // are `cargo xtask sim --seeds 1000000`.
    sim::run(&[
        "--dev".to_string(),
        "--seeds".to_string(),
        "1000".to_string(),
    ])?;
    if e2e {
        e2e::run(&[])?;
    }
    if bench {
        // Figures are not judged here (a shared CI machine is noisy); a
        // wrong byte fails, and the bench must keep building and running.
        bench::run(&["--quick".to_string()])?;
    }
    if soak {
        // 60 s of every command and fault: a wrong reply or byte, a crash
        // or a leak fails CI; the long runs are `cargo xtask soak --minutes 30`.
        soak::run(&["--seconds".to_string(), "60".to_string()])?;
    }
    if fuzz {
        // Every target, 30 s each: the decoders, the whole daemon and the
        // client's reader; the long runs are `cargo xtask fuzz --seconds 600`.
        fuzz::run(&["--seconds".to_string(), "30".to_string()])?;
    }
    Ok(())
}

/// Run `cargo xtask demo ARGS` as a user would and check what it printed:
/// `echo hello`'s output and exit code 0.
pub fn demo_check(args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new(util::cargo());
    cmd.args(["xtask", "demo"]).args(args).current_dir(root());
    eprintln!("$ {}", util::describe(&cmd));
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start `{}`: {e}", util::describe(&cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    let ok = out.status.success()
        && stdout.lines().any(|l| l == "hello")
        && stdout.contains("exit code: 0");
    if ok {
        eprintln!("demo: ok (printed hello, exit code 0)");
        Ok(())
    } else {
        Err(format!(
            "`{}` ({}) did not print hello and exit code 0",
            util::describe(&cmd),
            out.status
        ))
    }
}
