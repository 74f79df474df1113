//! `proxy-bench`: how fast and how small the real `cc-proxy` is, next to
//! direct unix sockets carrying the same frames, in the same run.
//!
//! Run by `cargo xtask bench`, which builds the release daemon and this
//! binary. Each run starts a fresh daemon as a child process
//! (`cc-proxy -socket-path <tmp>/proxy.sock -log warn -ksm off`), plays
//! the agent (two listening unix sockets the daemon dials on RegisterVM)
//! and the runtime and shims itself, and measures:
//!
//! 1. stdout throughput (agent → shim) for 512, 1024, 4096 and 10228-byte
//!    io messages;
//! 2. stdin throughput (shim → agent), 4 KiB frames;
//! 3. Hyper `ping` round trips: p50, p99, calls/s;
//! 4. fan-out: 64 sessions of one VM read by 64 shims at once, the shims
//!    each its own OS thread (with the single-thread tokio readers and a
//!    minimal relaying thread as further rows);
//! 5. a connect storm of 1000 ConnectShim;
//! 6. the daemon's RSS (idle, one VM, 1000 shims) and CPU time, and its
//!    CPU per GiB of stdout at 4096 bytes next to that of a minimal relay
//!    thread doing the same job (read the io stream in 64 KiB reads, parse
//!    it, `writev` each read's worth as stdout frames) and of the direct
//!    pair's writer and reader;
//! 7. how cost grows (`scaling`): RSS and CPU with 1 to 1000 VMs,
//!    aggregate stdout with 1 to 64 VMs streaming, Hyper calls/s with 1 to
//!    64 runtimes.
//!
//! Each figure has its baseline measured in the same run (a socket pair,
//! a relay thread, fewer VMs). Every run reports its own values; the
//! report gives min / median / max and judges targets on the median.
//! Every byte stream is hashed on both ends; a mismatch fails the bench.

use std::path::PathBuf;
use std::process::ExitCode;

mod agent;
mod conn;
mod daemon;
mod figures;
mod hash;
mod report;
mod scaling;
mod series;
mod wire;

use figures::{Bench, Volumes};
use report::{DaemonOut, Machine, Report, VolumesOut};

const USAGE: &str = "usage: proxy-bench --cc-proxy PATH [--quick] [--repeat N] [--report]
                   [--out DIR] [--docs DIR] [--proxy-arg ARG]...
                   [--only FIGURE,...] [--note TEXT]
                   [--stream-mib N] [--sizes SIZE,...]

  --cc-proxy PATH   the daemon binary to measure (release build)
  --quick           small volumes, a smoke run; fails only on wrong bytes
  --repeat N        run everything N times; report min / median / max and
                    judge targets on the median (they count with N >= 5)
  --report          also write DOCS/PERFORMANCE.md and DOCS/perf-*.svg
  --note TEXT       a note for the top of PERFORMANCE.md (with --report)
  --out DIR         where report.json goes (default target/bench)
  --docs DIR        where --report writes (default docs)
  --proxy-arg ARG   one more argument for the daemon (repeatable)
  --only LIST       only these figures (stdout, stdin, hyper, fanout, storm,
                    scaling; comma-separated); RSS and CPU are always measured.
                    Targets are not judged and --report is refused
  --stream-mib N    MiB per throughput figure (default 256, --quick 16);
                    small values suit a run under valgrind
  --sizes LIST      only these stdout message sizes (of 512, 1024, 4096,
                    10228; comma-separated)";

#[derive(Debug)]
struct Args {
    bin: PathBuf,
    quick: bool,
    repeat: usize,
    report: bool,
    out: PathBuf,
    docs: PathBuf,
    proxy_args: Vec<String>,
    only: Option<Vec<String>>,
    note: Option<String>,
    stream_mib: Option<u64>,
    sizes: Option<Vec<usize>>,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        bin: PathBuf::new(),
        quick: false,
        repeat: 1,
        report: false,
        out: PathBuf::from("target/bench"),
        docs: PathBuf::from("docs"),
        proxy_args: Vec::new(),
        only: None,
        note: None,
        stream_mib: None,
        sizes: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag {
            "--cc-proxy" => a.bin = PathBuf::from(value(flag)?),
            "--quick" => a.quick = true,
            "--report" => a.report = true,
            "--repeat" => {
                let v = value(flag)?;
                a.repeat = v
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| format!("--repeat {v}: expected a number >= 1"))?;
            }
            "--out" => a.out = PathBuf::from(value(flag)?),
            "--docs" => a.docs = PathBuf::from(value(flag)?),
            "--proxy-arg" => a.proxy_args.push(value(flag)?),
            "--note" => a.note = Some(value(flag)?),
            "--only" => {
                let v = value(flag)?;
                let list: Vec<String> = v.split(',').map(|f| f.trim().to_string()).collect();
                if let Some(bad) = list
                    .iter()
                    .find(|f| !figures::FIGURES.contains(&f.as_str()))
                {
                    return Err(format!(
                        "--only: unknown figure `{bad}` (known: {})",
                        figures::FIGURES.join(", ")
                    ));
                }
                a.only = Some(list);
            }
            "--stream-mib" => {
                let v = value(flag)?;
                a.stream_mib = Some(
                    v.parse()
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| format!("--stream-mib {v}: expected a number >= 1"))?,
                );
            }
            "--sizes" => {
                let v = value(flag)?;
                let list = v
                    .split(',')
                    .map(|f| {
                        f.trim()
                            .parse()
                            .ok()
                            .filter(|n| figures::STDOUT_SIZES.contains(n))
                            .ok_or_else(|| format!("--sizes: unknown size `{f}`"))
                    })
                    .collect::<Result<Vec<usize>, String>>()?;
                a.sizes = Some(list);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if a.bin.as_os_str().is_empty() {
        return Err("--cc-proxy PATH is required".into());
    }
    if (a.only.is_some() || a.sizes.is_some() || a.stream_mib.is_some()) && a.report {
        return Err("--only measures part of the figures; it cannot --report".into());
    }
    if !a.bin.is_file() {
        return Err(format!("{}: no such daemon binary", a.bin.display()));
    }
    Ok(a)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("proxy-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(e) => {
            eprintln!("proxy-bench: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything; `Ok(false)` when a target was missed (not with `--quick`).
fn run(a: &Args) -> Result<bool, String> {
    daemon::raise_nofile();
    let mut vol = if a.quick {
        Volumes::quick()
    } else {
        Volumes::full()
    };
    if let Some(m) = a.stream_mib {
        vol.stream = m << 20;
    }
    let pattern = wire::Pattern::new();
    let bench = Bench {
        bin: &a.bin,
        extra: &a.proxy_args,
        pattern: &pattern,
        vol: &vol,
        only: a.only.as_deref(),
        sizes: a.sizes.as_deref(),
    };
    let machine = Machine::probe();
    eprintln!(
        "proxy-bench: {} on {} x {} ({}), {} run(s){}",
        a.bin.display(),
        machine.nproc,
        machine.cpu_model,
        machine.kernel,
        a.repeat,
        if a.quick { ", quick" } else { "" }
    );
    let mut runs = Vec::with_capacity(a.repeat);
    for i in 0..a.repeat {
        eprintln!("run {}/{}", i + 1, a.repeat);
        runs.push(figures::run_once(&bench)?);
    }
    let judge = !a.quick && a.only.is_none() && a.sizes.is_none() && a.stream_mib.is_none();
    let rows = report::rows(&runs, &vol, judge);
    let series = series::all(&runs);
    let misses: Vec<String> = rows
        .iter()
        .filter(|r| r.pass == Some(false))
        .map(|r| r.id.clone())
        .collect();
    println!();
    println!(
        "cc-proxy, {} run(s), median [min–max]; ratios within each run{}:",
        a.repeat,
        if judge {
            if a.repeat < report::RUNS_FOR_VERDICT {
                " (verdicts marked * are provisional: fewer than 5 runs)"
            } else {
                ""
            }
        } else if a.quick {
            " (--quick volumes; targets not judged)"
        } else {
            " (--only; targets not judged)"
        }
    );
    print!("{}", report::terminal_table(&rows, a.repeat));
    for s in &series {
        println!();
        print!("{}", series::terminal(s));
    }
    println!();
    println!("every byte stream matched end to end (XXH64).");
    let other = report::other_load(&runs);
    println!("other processes kept {other:.2} CPUs busy during the runs (median).");

    let rep = Report {
        format: 2,
        quick: a.quick,
        repeat: a.repeat,
        volumes: VolumesOut::from(&vol),
        machine,
        daemon: DaemonOut {
            binary: a.bin.display().to_string(),
            args: {
                let mut v = vec![
                    "-socket-path".to_string(),
                    "<tmp>/proxy.sock".into(),
                    "-log".into(),
                    "warn".into(),
                    "-ksm".into(),
                    "off".into(),
                ];
                v.extend(a.proxy_args.iter().cloned());
                v
            },
        },
        note: a.note.clone(),
        figures: rows,
        series,
        runs,
        all_targets_met: misses.is_empty(),
        misses,
        bytes_ok: true,
    };
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let json_path = a.out.join("report.json");
    let json = serde_json::to_string_pretty(&rep).map_err(|e| format!("report JSON: {e}"))?;
    std::fs::write(&json_path, json + "\n").map_err(|e| format!("{}: {e}", json_path.display()))?;
    println!("wrote {}", json_path.display());
    if a.report {
        std::fs::create_dir_all(&a.docs).map_err(|e| format!("{}: {e}", a.docs.display()))?;
        let write = |name: &str, text: String| {
            let p = a.docs.join(name);
            std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
            println!("wrote {}", p.display());
            Ok::<_, String>(())
        };
        write(
            "PERFORMANCE.md",
            report::performance_md(&rep, &git_commit()),
        )?;
        write(
            "perf-throughput.svg",
            report::throughput_svg(&rep.figures, rep.repeat),
        )?;
        for s in rep.series.iter().filter(|s| s.chart) {
            write(&format!("perf-{}.svg", s.id), series::svg(s, rep.repeat))?;
        }
    }
    if !rep.misses.is_empty() {
        println!("targets not met: {}", rep.misses.join(", "));
    }
    Ok(a.quick || a.only.is_some() || rep.misses.is_empty())
}

/// The short commit hash, if git knows it, marked `(modified)` when the
/// daemon's sources differ from it.
fn git_commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return String::new();
    };
    let daemon_sources = [
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "crates/proxy-server",
        "crates/proxy-proto",
        "crates/proxy-vsock",
        "Cargo.toml",
        "Cargo.lock",
    ];
    match git(&daemon_sources) {
        Some(s) if !s.is_empty() => format!("{head} (daemon sources modified)"),
        _ => head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Args, String> {
        // An existing file stands in for the daemon binary.
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut v = vec!["--cc-proxy".to_string(), exe.display().to_string()];
        v.extend(a.iter().map(|s| s.to_string()));
        parse_args(&v)
    }

    #[test]
    fn only_takes_known_figures_and_no_report() {
        let a = args(&["--only", "hyper,fanout"]).unwrap();
        assert_eq!(
            a.only,
            Some(vec!["hyper".to_string(), "fanout".to_string()])
        );
        let e = args(&["--only", "hyper,latency"]).unwrap_err();
        assert!(e.contains("unknown figure `latency`"), "{e}");
        let e = args(&["--only=stdout", "--report"]).unwrap_err();
        assert!(e.contains("cannot --report"), "{e}");
        assert!(args(&[]).unwrap().only.is_none());
    }

    #[test]
    fn repeat_must_be_a_positive_number() {
        assert_eq!(args(&["--repeat", "3"]).unwrap().repeat, 3);
        assert!(args(&["--repeat", "0"]).is_err());
        assert!(args(&["--repeat", "x"]).is_err());
    }
}
