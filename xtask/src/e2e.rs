//! `cargo xtask e2e`: boot real guests under QEMU (TCG) with `proxy-agent`
//! as `/init` and drive them, once over virtio-serial and once over hybrid
//! vsock. Provisions what it needs under `target/e2e/` and says so.
//!
//! The default scenario runs the real release `cc-proxy` and drives it as a
//! runtime and as shims would, through the proxy protocol; `--raw` instead
//! speaks hyperstart ctl/io to the agent directly, which checks the guest
//! side (agent, kernel, transports) on its own.
//!
//! Either way each guest's agent first runs an AF_VSOCK round trip over the
//! loopback transport with `proxy-vsock` (`agent.vsock_loopback=PORT`), and
//! the step "AF_VSOCK loopback round trip" fails unless its console line
//! says it passed. docs/E2E.md describes the whole setup.

use std::path::Path;
use std::time::{Duration, Instant};

mod cpio;
mod hyper;
mod provision;
mod proxy;
mod vm;

use hyper::{code, process, Hyper};
use proxy_client::blocking::{Client, Shim, ShimEvents};
use proxy_client::{Token, VmSpec};
use vm::{Flavour, Vm};

/// Entry point of the verb.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut flavours = vec![Flavour::VirtioSerial, Flavour::HybridVsock];
    let mut raw = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--raw" => raw = true,
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
    let cc_proxy = if raw {
        None
    } else {
        Some(provision::build_proxy()?)
    };
    eprintln!("e2e: provisioned in {:.1?}", t0.elapsed());
    for f in flavours {
        let mut steps = Steps::new(f.name());
        let logs = dir.join("logs");
        let result = match &cc_proxy {
            Some((bin, shim)) => proxy_scenario(&assets, bin, shim, f, &logs, &mut steps),
            None => raw_scenario(&assets, f, &logs, &mut steps),
        };
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
    steps.step("AF_VSOCK loopback round trip", || vsock_loopback(vm))?;
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

/// Boot one guest, register it with a real `cc-proxy` and drive it as a
/// runtime and its shims would.
fn proxy_scenario(
    assets: &provision::Assets,
    cc_proxy: &Path,
    shim_bin: &Path,
    flavour: Flavour,
    log_dir: &Path,
    steps: &mut Steps,
) -> Result<(), String> {
    let run_dir = std::env::temp_dir().join(format!(
        "cc-e2e-{}-{}-proxy",
        std::process::id(),
        flavour.name()
    ));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(log_dir).map_err(|e| e.to_string())?;
    let proxy_log = log_dir.join(format!("{}-cc-proxy.log", flavour.name()));
    let r = (|| {
        let mut proxy = steps.step("start cc-proxy", || {
            proxy::Proxy::start(cc_proxy, &run_dir, &proxy_log)
        })?;
        let mut vm = steps.step("boot QEMU", || Vm::boot(assets, flavour, log_dir))?;
        let r = drive_proxy(&mut proxy, shim_bin, &mut vm, flavour, steps);
        if r.is_err() {
            let qemu = vm.qemu_state();
            eprintln!(
                "---- guest console ({}), last lines ----\n{}\n---- {qemu}",
                vm.console.display(),
                vm.console_tail(40),
            );
        }
        r
    })();
    if r.is_err() {
        eprintln!(
            "---- cc-proxy log ({}), last lines ----\n{}\n----",
            proxy_log.display(),
            vm::tail(&proxy_log, 40)
        );
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    r
}

/// Connect a shim (the library's) for `token`, then start the process
/// with the token.
fn start_with_shim(
    rt: &Client,
    token: &Token,
    hyper_name: &str,
    data: &str,
) -> Result<(Shim, ShimEvents), String> {
    let shim = rt.connect_shim(token).map_err(|e| e.to_string())?;
    rt.hyper(hyper_name, std::slice::from_ref(token), Some(data))
        .map_err(|e| e.to_string())?;
    Ok(shim)
}

/// Send `data` then EOF on `shim` from a thread while collecting its output.
fn pipe_through(shim: (Shim, ShimEvents), data: Vec<u8>) -> Result<hyper::Output, String> {
    let (shim, mut events) = shim;
    let writer = std::thread::spawn(move || -> Result<(), proxy_client::Error> {
        shim.send_stdin(data)?;
        shim.close_stdin()
    });
    let out = events.collect().map_err(|e| e.to_string());
    writer
        .join()
        .map_err(|_| "stdin writer panicked".to_string())?
        .map_err(|e| e.to_string())?;
    out
}

fn drive_proxy(
    proxy: &mut proxy::Proxy,
    shim_bin: &Path,
    vm: &mut Vm,
    flavour: Flavour,
    steps: &mut Steps,
) -> Result<(), String> {
    let t = Duration::from_secs(60);
    let id = format!("e2e-{}", flavour.name());
    let (ctl, io) = vm.agent_addrs();
    let rt = Client::connect(proxy.socket.as_path()).map_err(|e| e.to_string())?;
    steps.step("agent sockets created", || {
        vm.wait_for_sockets(Duration::from_secs(30))
    })?;
    let vm_io = steps.step("RegisterVM (waits for the agent's READY)", || {
        rt.register_vm(VmSpec::new(&id, ctl, io).tokens(8))
            .map_err(|e| e.to_string())
    })?;
    let token = |i: usize| -> Result<Token, String> {
        vm_io
            .tokens
            .get(i)
            .cloned()
            .ok_or_else(|| format!("RegisterVM gave {} tokens, not 8", vm_io.tokens.len()))
    };
    let err = |e: proxy_client::Error| e.to_string();
    steps.step("AF_VSOCK loopback round trip", || vsock_loopback(vm))?;
    steps.step("Hyper startpod", || {
        rt.hyper(
            "startpod",
            &[],
            Some(r#"{"hostname":"e2e","shareDir":"rootfs"}"#),
        )
        .map(drop)
        .map_err(err)
    })?;

    steps.step("cc-proxy-shim: stdin→stdout, stderr, exit 3", || {
        let data = format!(
            r#"{{"id":"c1","rootfs":"rootfs","image":"busybox","process":{}}}"#,
            process(&["sh", "-c", "cat; echo err >&2; exit 3"], 0, 0, false)
        );
        let tok = token(0)?;
        // The runtime starts the shim, then the process; the proxy holds
        // newcontainer until the token's shim is connected.
        let (shim_bin, url) = (shim_bin.to_owned(), vm_io.url.clone());
        let shim_tok = tok.to_string();
        let shim = std::thread::spawn(move || {
            proxy::run_shim(
                &shim_bin,
                "c1",
                &shim_tok,
                &url,
                b"hello through cc-proxy\n".to_vec(),
                t,
            )
        });
        rt.hyper("newcontainer", std::slice::from_ref(&tok), Some(&data))
            .map_err(err)?;
        let out = shim
            .join()
            .map_err(|_| "cc-proxy-shim runner panicked".to_string())??;
        expect("stdout", out.stdout == b"hello through cc-proxy\n", || {
            format!("{:?}", String::from_utf8_lossy(&out.stdout))
        })?;
        expect("stderr", out.stderr == b"err\n", || {
            format!("{:?}", String::from_utf8_lossy(&out.stderr))
        })?;
        expect("exit code", out.code == 3, || out.code.to_string())
    })?;

    steps.step("execcmd in the same VM", || {
        let data = format!(
            r#"{{"container":"c1","process":{}}}"#,
            process(&["sh", "-c", "echo exec-ok; uname -s"], 0, 0, false)
        );
        let (_shim, mut events) = start_with_shim(&rt, &token(1)?, "execcmd", &data)?;
        let out = events.collect().map_err(err)?;
        expect("stdout", out.stdout == b"exec-ok\nLinux\n", || {
            format!("{:?}", String::from_utf8_lossy(&out.stdout))
        })?;
        expect("exit code", out.code == 0, || out.code.to_string())
    })?;

    steps.step("SIGTERM to a sleeping process → 143", || {
        let data = format!(
            r#"{{"id":"c2","process":{}}}"#,
            process(&["sleep", "100"], 0, 0, false)
        );
        let (shim, mut events) = start_with_shim(&rt, &token(2)?, "newcontainer", &data)?;
        shim.signal(15).map_err(err)?;
        let out = events.collect().map_err(err)?;
        expect("exit code", out.code == 143, || out.code.to_string())
    })?;

    steps.step("terminal + resize → stty size", || {
        let data = format!(
            r#"{{"id":"c3","process":{}}}"#,
            process(&["sh", "-c", "read x; stty size"], 0, 0, true)
        );
        let (shim, mut events) = start_with_shim(&rt, &token(3)?, "newcontainer", &data)?;
        shim.resize(33, 101).map_err(err)?;
        shim.send_stdin(&b"go\n"[..]).map_err(err)?;
        let out = events.collect().map_err(err)?;
        let s = String::from_utf8_lossy(&out.stdout);
        expect("stty size", s.contains("33 101"), || format!("{s:?}"))?;
        expect("exit code", out.code == 0, || out.code.to_string())
    })?;

    steps.step("10 MiB through stdin and back, sha256 checked", || {
        let data = format!(
            r#"{{"id":"c4","process":{}}}"#,
            process(
                &[
                    "sh",
                    "-c",
                    "tee /tmp/blob; sha256sum /tmp/blob >&2; rm /tmp/blob"
                ],
                0,
                0,
                false
            )
        );
        let shim = start_with_shim(&rt, &token(4)?, "newcontainer", &data)?;
        let blob = pattern(10 * 1024 * 1024, 7);
        let want = sha256_hex(&blob)?;
        let out = pipe_through(shim, blob)?;
        let back = sha256_hex(&out.stdout)?;
        expect("stdout sha256", back == want, || {
            format!("{back} ({} bytes) != {want}", out.stdout.len())
        })?;
        let guest = String::from_utf8_lossy(&out.stderr);
        expect("guest sha256", guest.starts_with(&want), || {
            guest.to_string()
        })?;
        expect("exit code", out.code == 0, || out.code.to_string())
    })?;

    steps.step("two containers at once", || {
        let mut shims = Vec::new();
        for (i, name) in [(5, "c5"), (6, "c6")] {
            let data = format!(
                r#"{{"id":"{name}","process":{}}}"#,
                process(
                    &["sh", "-c", &format!("cat; echo {name}-done >&2")],
                    0,
                    0,
                    false
                )
            );
            let shim = start_with_shim(&rt, &token(i)?, "newcontainer", &data)?;
            shims.push((name, shim, pattern(1024 * 1024, i as u32)));
        }
        let handles: Vec<_> = shims
            .into_iter()
            .map(|(name, shim, data)| {
                std::thread::spawn(move || -> Result<(), String> {
                    let out = pipe_through(shim, data.clone())?;
                    expect(name, out.stdout == data, || {
                        format!("{} bytes back of {}", out.stdout.len(), data.len())
                    })?;
                    expect(
                        name,
                        out.stderr == format!("{name}-done\n").as_bytes(),
                        || String::from_utf8_lossy(&out.stderr).into_owned(),
                    )?;
                    expect(name, out.code == 0, || out.code.to_string())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a container thread panicked")??;
        }
        Ok(())
    })?;

    steps.step("Hyper destroypod", || {
        rt.hyper("destroypod", &[], Some("{}"))
            .map(drop)
            .map_err(err)
    })?;
    steps.step("UnregisterVM", || rt.unregister_vm(&id).map_err(err))?;
    steps.step("QEMU exits", || {
        let s = vm.wait_exit(Duration::from_secs(60))?;
        expect("QEMU exit status", s.success(), || s.to_string())
    })?;
    steps.step("cc-proxy exits cleanly on SIGTERM", || {
        drop(rt);
        let s = proxy.shutdown(Duration::from_secs(20))?;
        expect("cc-proxy exit status", s.success(), || s.to_string())
    })
}

/// The guest's AF_VSOCK round trip over the loopback transport (CID 1),
/// run by the agent with `proxy-vsock` before it opens its channels; its
/// result is a console line. Fails if it failed or did not run.
fn vsock_loopback(vm: &mut Vm) -> Result<(), String> {
    let line = vm.vsock_loopback_result(Duration::from_secs(30))?;
    eprintln!("e2e:   guest says: {line}");
    Ok(())
}

/// Bytes that are not all alike, from a seed.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> Result<String, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("sha256sum: {e}"))?;
    let mut stdin = c.stdin.take().ok_or("sha256sum stdin")?;
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let out = c.wait_with_output().map_err(|e| e.to_string())?;
    w.join()
        .map_err(|_| "sha256sum writer panicked".to_string())?
        .map_err(|e| e.to_string())?;
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.split_whitespace().next().unwrap_or_default().to_string())
}
