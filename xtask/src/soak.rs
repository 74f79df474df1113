//! `cargo xtask soak (--minutes N | --seconds N) [--report]`: build the
//! release `cc-proxy` (static, exactly as e2e and the bench build it, so
//! that in `ci` it is already built) and `proxy-soak` (in
//! `crates/proxy-bench`), then run the soak against the daemon as a child
//! process.
//!
//! The soak is a binary of `proxy-bench` rather than code in xtask because
//! it is a load generator: it must be an optimised build (200 shims and 20
//! agents hashing and checking every byte would otherwise be what is
//! measured), it shares the bench's daemon fixture and XXH64, and xtask
//! itself stays a small debug build that only runs commands.
//!
//! Other arguments are passed to `proxy-soak` (`--vms N`, `--shims-per-vm
//! N`, `--seed N`, `--reconnect-percent N`). It writes `<target>/soak/samples.csv` and
//! `summary.json`; `--report` also writes `docs/soak.svg`. Its last line
//! is `soak: N passed, M failed`; any failure is a non-zero exit.

use std::process::Command;

use crate::util;

pub fn run(args: &[String]) -> Result<(), String> {
    let mut pass: Vec<String> = Vec::new();
    let mut timed = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--minutes" | "--seconds" => {
                let v = it.next().ok_or_else(|| format!("{a} needs a number"))?;
                match v.parse::<u64>() {
                    Ok(n) if n > 0 => {}
                    _ => return Err(format!("{a} takes a positive number, not `{v}`")),
                }
                timed = true;
                pass.push(a.clone());
                pass.push(v.clone());
            }
            "--report" => pass.push(a.clone()),
            "--vms" | "--shims-per-vm" | "--seed" | "--reconnect-percent" => {
                let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                pass.push(a.clone());
                pass.push(v.clone());
            }
            other => return Err(format!("soak: unknown argument `{other}`")),
        }
    }
    if !timed {
        pass.extend(["--minutes".to_string(), "1".to_string()]);
    }
    let (cc_proxy, soak) = util::build_daemon_and_bench_bin("proxy-soak")?;
    util::run(
        Command::new(soak)
            .arg("--cc-proxy")
            .arg(&cc_proxy)
            .arg("--out")
            .arg(util::target_dir().join("soak"))
            .arg("--docs")
            .arg(crate::root().join("docs"))
            .args(&pass),
    )
}
