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
