//! `cargo xtask sim [--seeds N] [--seed S] [--first F] [--steps K] [--dev]`: the
//! deterministic simulation (`crates/proxy-sim`). Each seed is one random
//! schedule of runtimes, shims and agents against the daemon's sans-IO core,
//! with invariants checked after every step; a failing seed is printed with
//! the command that reproduces it exactly. Built with the `sim` profile
//! (optimised, without the release profile's slow whole-program LTO), or
//! with `--dev` the debug build.

use std::process::Command;

use crate::util;

pub fn run(args: &[String]) -> Result<(), String> {
    let mut pass: Vec<String> = Vec::new();
    let mut profile = "sim";
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seeds" | "--seed" | "--first" | "--steps" | "--threads" => {
                let v = it.next().ok_or_else(|| format!("{a} needs a number"))?;
                if v.parse::<u64>().is_err() {
                    return Err(format!("{a} takes a number, not `{v}`"));
                }
                pass.push(a.clone());
                pass.push(v.clone());
            }
            // The debug build `cargo test` made already (CI): no second
            // optimised build of the daemon's crates for a minute of seeds.
            "--dev" => profile = "dev",
            other => return Err(format!("sim: unknown argument `{other}`")),
        }
    }
    util::run(
        Command::new(util::cargo())
            .args(["run", "--profile", profile, "-p", "proxy-sim", "--"])
            .args(&pass)
            .current_dir(crate::root()),
    )
}
