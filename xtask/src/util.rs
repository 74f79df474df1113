//! Small helpers for running commands with an echo, as a CI log wants.

use std::path::PathBuf;
use std::process::Command;

/// Where cargo puts build outputs: `$CARGO_TARGET_DIR` (relative to the
/// repository root if relative) or `<root>/target`.
pub fn target_dir() -> PathBuf {
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

/// The cargo that invoked us, or `cargo`.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Run a command in the repository root, echoing it; fail if it fails.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    cmd.current_dir(crate::root());
    eprintln!("$ {}", describe(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start `{}`: {e}", describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed: {status}", describe(cmd)))
    }
}

/// A command line as a human would type it.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The target of static builds (the only one installed here).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Build `bin` of `package` as the project ships its programs: a static
/// (static-pie) release binary, with its own `--target` so that the host
/// build of the workspace is untouched. Returns its path. The e2e run and
/// the bench build the daemon with exactly this command, so the second
/// build is a no-op.
pub fn build_static(package: &str, bin: &str) -> Result<PathBuf, String> {
    run(Command::new(cargo())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--release",
            "-p",
            package,
            "--bin",
            bin,
            "--target",
            STATIC_TARGET,
        ]))?;
    Ok(target_dir().join(STATIC_TARGET).join("release").join(bin))
}

/// The static release `cc-proxy` (as e2e builds it) and the release
/// `proxy-bench` binary `bin` (`proxy-bench` or `proxy-soak`): what the
/// bench and the soak run. Returns their paths.
pub fn build_daemon_and_bench_bin(bin: &str) -> Result<(PathBuf, PathBuf), String> {
    // The daemon as it is best shipped: a static (static-pie) release
    // binary, which needs no libc on the host and maps less memory (no
    // shared libc, libm, ld.so pages in its RSS); in `ci` it is already
    // built by then.
    let cc_proxy = build_static("proxy-server", "cc-proxy")?;
    run(Command::new(cargo()).args(["build", "--release", "-p", "proxy-bench", "--bin", bin]))?;
    Ok((cc_proxy, target_dir().join("release").join(bin)))
}
