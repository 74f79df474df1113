//! `proxy-sim`: run seeded schedules of the cc-proxy core
//! (`cargo xtask sim --seeds N [--seed S]`).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const USAGE: &str = "usage: proxy-sim [--seeds N] [--seed S] [--first F] [--steps K] [--threads T]
  --seeds N    run N seeds (default 1000), from --first (default 0)
  --seed S     run seed S alone, and say where it failed
  --steps K    steps per scenario (default 400)
  --threads T  worker threads (default: the CPUs)";

fn main() -> ExitCode {
    let mut seeds = 1000u64;
    let mut first = 0u64;
    let mut one: Option<u64> = None;
    let mut steps = 400usize;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Option<u64> {
            let v = args.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("proxy-sim: {name} needs a number\n{USAGE}");
            }
            v
        };
        match a.as_str() {
            "--seeds" => match value("--seeds") {
                Some(v) => seeds = v,
                None => return ExitCode::from(2),
            },
            "--first" => match value("--first") {
                Some(v) => first = v,
                None => return ExitCode::from(2),
            },
            "--seed" => match value("--seed") {
                Some(v) => one = Some(v),
                None => return ExitCode::from(2),
            },
            "--steps" => match value("--steps") {
                Some(v) => steps = v as usize,
                None => return ExitCode::from(2),
            },
            "--threads" => match value("--threads") {
                Some(v) => threads = (v as usize).max(1),
                None => return ExitCode::from(2),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("proxy-sim: unknown argument {other}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(seed) = one {
        return match proxy_sim::run_seed(seed, steps) {
            Ok(r) => {
                println!(
                    "sim: seed {seed} passed ({} steps, {} commands)",
                    r.steps, r.commands
                );
                ExitCode::SUCCESS
            }
            Err(f) => {
                println!("sim: {f}");
                ExitCode::FAILURE
            }
        };
    }
    let started = std::time::Instant::now();
    let next = Arc::new(AtomicU64::new(first));
    let done = Arc::new(AtomicU64::new(0));
    let total_steps = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failures: Arc<Mutex<Vec<proxy_sim::Failure>>> = Arc::default();
    let end = first.saturating_add(seeds);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (next, done, total_steps, stop, failures) = (
                next.clone(),
                done.clone(),
                total_steps.clone(),
                stop.clone(),
                failures.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    match proxy_sim::run_seed(seed, steps) {
                        Ok(r) => {
                            total_steps.fetch_add(r.steps, Ordering::Relaxed);
                        }
                        Err(f) => {
                            if let Ok(mut v) = failures.lock() {
                                v.push(f);
                                if v.len() >= 10 {
                                    stop.store(true, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if n % 100_000 == 0 {
                        eprintln!("sim: {n} seeds, {:.0?}", started.elapsed());
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let n = done.load(Ordering::Relaxed);
    let failures = failures.lock().map(|v| v.clone()).unwrap_or_default();
    println!(
        "sim: {n} seeds (from {first}), {} steps, {} failed, in {:.1?}",
        total_steps.load(Ordering::Relaxed),
        failures.len(),
        started.elapsed()
    );
    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    for f in &failures {
        println!(
            "sim: {f}\nsim:   reproduce with: cargo xtask sim --seed {}",
            f.seed
        );
    }
    ExitCode::FAILURE
}
