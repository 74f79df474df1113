//! `cargo xtask e2e`: boot real guests under QEMU (TCG) with `proxy-agent`
//! as `/init` and drive them, once over virtio-serial and once over hybrid
//! vsock. Provisions what it needs under `target/e2e/` and says so.
//!
//! The raw scenario speaks hyperstart ctl/io to the agent directly; it
//! checks the guest side (agent, kernel, transports) on its own.

use std::path::Path;
use std::time::{Duration, Instant};

mod cpio;
mod hyper;
mod provision;
mod vm;

use hyper::{code, process, Hyper};
use vm::{Flavour, Vm};

/// Entry point of the verb.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut flavours = vec![Flavour::VirtioSerial, Flavour::HybridVsock];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--only" => match it.next().map(String::as_str) {
                Some("virtio-serial") => flavours = vec![Flavour::VirtioSerial],
                Some("hybrid-vsock") => flavours = vec![Flavour::HybridVsock],
                other => return Err(format!("--only virtio-serial|hybrid-vsock, not {other:?}")),
            },
            other => return Err(format!("e2e: unknown argument `{other}`")),
        }
    }
    let dir = crate::root().join("target/e2e");
    let t0 = Instant::now();
    let assets = provision::assets(&dir)?;
    eprintln!("e2e: provisioned in {:.1?}", t0.elapsed());
    for f in flavours {
        let mut steps = Steps::new(f.name());
        let result = raw_scenario(&assets, f, &dir.join("logs"), &mut steps);
        steps.summary();
        result?;
    }
    eprintln!("e2e: all passed in {:.1?}", t0.elapsed());
    Ok(())
}

/// A step log with timings.
#[derive(Debug)]
struct Steps {
    flavour: &'static str,
    start: Instant,
    done: Vec<(String, Duration)>,
}

impl Steps {
    fn new(flavour: &'static str) -> Self {
        Self {
            flavour,
            start: Instant::now(),
            done: Vec::new(),
        }
    }

    fn step<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        let t = Instant::now();
        let r = f();
        let d = t.elapsed();
        let status = if r.is_ok() { "ok" } else { "FAILED" };
        eprintln!(
            "e2e [{}] {:>7.2}s  {name}: {status} ({:.2}s)",
            self.flavour,
            self.start.elapsed().as_secs_f64(),
            d.as_secs_f64()
        );
        self.done.push((name.to_string(), d));
        r.map_err(|e| format!("[{}] {name}: {e}", self.flavour))
    }

    fn summary(&self) {
        eprintln!(
            "e2e [{}] {} steps in {:.2}s",
            self.flavour,
            self.done.len(),
            self.start.elapsed().as_secs_f64()
        );
    }
}

fn expect(what: &str, ok: bool, detail: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: {}", detail()))
    }
}

/// Boot one guest and drive its agent directly over ctl/io.
fn raw_scenario(
    assets: &provision::Assets,
    flavour: Flavour,
    log_dir: &Path,
    steps: &mut Steps,
) -> Result<(), String> {
    let mut vm = steps.step("boot QEMU", || Vm::boot(assets, flavour, log_dir))?;
    let r = drive_raw(&mut vm, steps);
    if r.is_err() {
        eprintln!(
            "---- guest console ({}), last lines ----\n{}\n----",
            vm.console.display(),
            vm.console_tail(40)
        );
    }
    r
}

fn drive_raw(vm: &mut Vm, steps: &mut Steps) -> Result<(), String> {
    let boot = Duration::from_secs(90);
    let t = Duration::from_secs(60);
    let mut h = steps.step("connect ctl+io", || {
        let (ctl, io) = vm.connect(Instant::now() + boot)?;
        Ok(Hyper::new(ctl, io))
    })?;
    steps.step("READY", || match h.read_ctl(boot)? {
        (code::READY, _) => Ok(()),
        (c, _) => Err(format!("first ctl message has code {c}, not READY")),
    })?;
    steps.step("version", || {
        let v = h.ack(code::VERSION, "{}")?;
        expect("version", v == 4242u32.to_be_bytes(), || format!("{v:?}"))
    })?;
    steps.step("ping", || h.ack(code::PING, "{}").map(drop))?;
    steps.step("startpod", || {
        h.ack(code::STARTPOD, r#"{"hostname":"e2e","shareDir":"rootfs"}"#)
            .map(drop)
    })?;

    steps.step(
        "newcontainer: stdin→stdout (1 MiB), stderr, exit 3",
        || {
            h.ack(
                code::NEWCONTAINER,
                &format!(
                    r#"{{"id":"c1","rootfs":"rootfs","image":"busybox","process":{}}}"#,
                    process(&["sh", "-c", "cat; echo err >&2; exit 3"], 3, 4, false)
                ),
            )?;
            let data: Vec<u8> = (0..1024 * 1024u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
                .collect();
            let mut w = h.stdin_writer()?;
            let sent = data.clone();
            let writer = std::thread::spawn(move || {
                w.send(3, &sent)?;
                w.send(3, &[])
            });
            let out = h.collect(3, 4, t)?;
            writer
                .join()
                .map_err(|_| "stdin writer panicked".to_string())??;
            expect("stdout", out.stdout == data, || {
                format!("{} bytes back of {}", out.stdout.len(), data.len())
            })?;
            expect("stderr", out.stderr == b"err\n", || {
                format!("{:?}", String::from_utf8_lossy(&out.stderr))
            })?;
            expect("exit code", out.code == 3, || out.code.to_string())
        },
    )?;

    steps.step("execcmd in c1", || {
        h.ack(
            code::EXECCMD,
            &format!(
                r#"{{"container":"c1","process":{}}}"#,
                process(&["sh", "-c", "echo exec-ok; uname -s"], 5, 6, false)
            ),
        )?;
        let out = h.collect(5, 6, t)?;
        expect("stdout", out.stdout == b"exec-ok\nLinux\n", || {
            format!("{:?}", String::from_utf8_lossy(&out.stdout))
        })?;
        expect("exit code", out.code == 0, || out.code.to_string())
    })?;

    steps.step("killcontainer SIGTERM → 143", || {
        h.ack(
            code::NEWCONTAINER,
            &format!(
                r#"{{"id":"c2","process":{}}}"#,
                process(&["sleep", "100"], 7, 8, false)
            ),
        )?;
        h.ack(
            code::KILLCONTAINER,
            r#"{"container":"c2","signal":15,"allProcesses":false}"#,
        )?;
        let out = h.collect(7, 8, t)?;
        expect("exit code", out.code == 143, || out.code.to_string())
    })?;

    steps.step("terminal + winsize → stty size", || {
        h.ack(
            code::NEWCONTAINER,
            &format!(
                r#"{{"id":"c3","process":{}}}"#,
                process(&["sh", "-c", "read x; stty size"], 9, 0, true)
            ),
        )?;
        h.ack(code::WINSIZE, r#"{"seq":9,"row":33,"column":101}"#)?;
        h.stdin_writer()?.send(9, b"go\n")?;
        let out = h.collect(9, 0, t)?;
        let s = String::from_utf8_lossy(&out.stdout);
        expect("stty size", s.contains("33 101"), || format!("{s:?}"))?;
        expect("exit code", out.code == 0, || out.code.to_string())
    })?;

    steps.step("unsupported command → ERROR", || {
        match h.cmd(code::READFILE, "{}") {
            Err(e) if e.contains("readfile") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })?;

    steps.step("destroypod", || h.ack(code::DESTROYPOD, "{}").map(drop))?;
    steps.step("QEMU exits", || {
        let s = vm.wait_exit(Duration::from_secs(60))?;
        expect("QEMU exit status", s.success(), || s.to_string())
    })
}
