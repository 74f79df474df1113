//! One guest under QEMU (TCG), with its agent channels on virtio-serial
//! ports or on hybrid vsock through vhost-device-vsock.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::provision::Assets;

/// Guest memory; the vhost-user memfd must be the same size.
const MEM_MB: u32 = 512;
/// Guest vsock ports of the agent's channels (kernel command line).
pub const CTL_PORT: u32 = 1024;
/// See [`CTL_PORT`].
pub const IO_PORT: u32 = 1025;
/// Guest vsock port of the agent's AF_VSOCK loopback round trip (kernel
/// command line `agent.vsock_loopback=`), run in every guest before the
/// agent opens its channels.
pub const LOOPBACK_PORT: u32 = 1040;
/// The agent's console line with the round trip's result.
pub const LOOPBACK_MARKER: &str = "vsock-loopback:";

/// How the agent's channels reach the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// Two virtio-serial ports, QEMU serving unix sockets.
    VirtioSerial,
    /// AF_VSOCK in the guest, hybrid vsock (`CONNECT <port>`) on the host.
    HybridVsock,
}

impl Flavour {
    /// A short name for logs and paths.
    pub fn name(self) -> &'static str {
        match self {
            Self::VirtioSerial => "virtio-serial",
            Self::HybridVsock => "hybrid-vsock",
        }
    }
}

/// A running guest. Dropping it kills QEMU and the vsock backend.
#[derive(Debug)]
pub struct Vm {
    flavour: Flavour,
    qemu: Child,
    backend: Option<Child>,
    /// Short-path directory for the sockets.
    pub sock_dir: PathBuf,
    /// The guest's serial console.
    pub console: PathBuf,
}

impl Vm {
    /// Start the backend (vsock) and QEMU; does not wait for the guest.
    pub fn boot(assets: &Assets, flavour: Flavour, log_dir: &Path) -> Result<Self, String> {
        // Unix socket paths are limited to 107 bytes: keep them in /tmp.
        let sock_dir =
            std::env::temp_dir().join(format!("cc-e2e-{}-{}", std::process::id(), flavour.name()));
        let _ = fs::remove_dir_all(&sock_dir);
        fs::create_dir_all(&sock_dir).map_err(|e| format!("mkdir {}: {e}", sock_dir.display()))?;
        fs::create_dir_all(log_dir).map_err(|e| e.to_string())?;
        let console = log_dir.join(format!("{}-console.log", flavour.name()));
        let log = |p: &Path| File::create(p).map_err(|e| format!("{}: {e}", p.display()));

        let mut append =
            format!("console=ttyS0 quiet panic=-1 agent.vsock_loopback={LOOPBACK_PORT}");
        let mut qemu = Command::new(&assets.qemu);
        qemu.args(["-accel", "tcg", "-M", "q35", "-m"])
            .arg(MEM_MB.to_string())
            .args([
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
            ])
            .args(["-serial", "stdio", "-no-reboot", "-kernel"])
            .arg(&assets.vmlinux)
            .arg("-initrd")
            .arg(&assets.initrd);
        let mut backend = None;
        match flavour {
            Flavour::VirtioSerial => {
                let ctl = sock_dir.join("ctl.sock");
                let io = sock_dir.join("io.sock");
                qemu.args(["-device", "virtio-serial-pci,id=vser0"])
                    .arg("-chardev")
                    .arg(format!(
                        "socket,id=ctl,path={},server=on,wait=off",
                        ctl.display()
                    ))
                    .args([
                        "-device",
                        "virtserialport,bus=vser0.0,chardev=ctl,name=sh.hyper.channel.0",
                    ])
                    .arg("-chardev")
                    .arg(format!(
                        "socket,id=io,path={},server=on,wait=off",
                        io.display()
                    ))
                    .args([
                        "-device",
                        "virtserialport,bus=vser0.0,chardev=io,name=sh.hyper.channel.1",
                    ]);
            }
            Flavour::HybridVsock => {
                let vhost = sock_dir.join("vhost.sock");
                let uds = sock_dir.join("vsock.sock");
                let blog = log_dir.join("vhost-device-vsock.log");
                let child = Command::new(&assets.vhost_vsock)
                    .arg("--vm")
                    .arg(format!(
                        "guest-cid=3,socket={},uds-path={}",
                        vhost.display(),
                        uds.display()
                    ))
                    .stdout(log(&blog)?)
                    .stderr(log(&blog)?)
                    .spawn()
                    .map_err(|e| format!("vhost-device-vsock: {e}"))?;
                backend = Some(child);
                let deadline = Instant::now() + Duration::from_secs(10);
                while !vhost.exists() {
                    if Instant::now() > deadline {
                        return Err("vhost-device-vsock did not create its socket".into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                append.push_str(&format!(
                    " agent.ctl_port={CTL_PORT} agent.io_port={IO_PORT}"
                ));
                qemu.arg("-object")
                    .arg(format!(
                        "memory-backend-memfd,id=mem,size={MEM_MB}M,share=on"
                    ))
                    .args(["-numa", "node,memdev=mem", "-chardev"])
                    .arg(format!("socket,id=vsk,path={}", vhost.display()))
                    .args(["-device", "vhost-user-vsock-pci,chardev=vsk"]);
            }
        }
        qemu.arg("-append")
            .arg(&append)
            .stdin(Stdio::null())
            .stdout(log(&console)?)
            .stderr(log(&console)?);
        eprintln!("$ {}", crate::util::describe(&qemu));
        let qemu = match qemu.spawn() {
            Ok(q) => q,
            Err(e) => {
                if let Some(mut b) = backend {
                    let _ = b.kill();
                    let _ = b.wait();
                }
                return Err(format!("qemu: {e}"));
            }
        };
        Ok(Self {
            flavour,
            qemu,
            backend,
            sock_dir,
            console,
        })
    }

    /// The ctl and io addresses as the proxy's RegisterVM takes them.
    pub fn agent_addrs(&self) -> (String, String) {
        match self.flavour {
            Flavour::VirtioSerial => (
                self.sock_dir.join("ctl.sock").display().to_string(),
                self.sock_dir.join("io.sock").display().to_string(),
            ),
            Flavour::HybridVsock => {
                let uds = self.sock_dir.join("vsock.sock");
                (
                    format!("hvsock://{}:{CTL_PORT}", uds.display()),
                    format!("hvsock://{}:{IO_PORT}", uds.display()),
                )
            }
        }
    }

    /// Wait until QEMU (or the vsock backend) has created the unix sockets
    /// the agent's channels are reached through, as a runtime waits for its
    /// hypervisor before RegisterVM: `cc-proxy` takes a missing socket as an
    /// error at once (docs/PROTOCOL.md §3). Only the files are awaited —
    /// connecting to probe would take the guest's end of a virtio-serial
    /// port for a moment, and what the agent wrote then would be lost.
    pub fn wait_for_sockets(&mut self, timeout: Duration) -> Result<(), String> {
        use std::os::unix::fs::FileTypeExt;
        let paths = match self.flavour {
            Flavour::VirtioSerial => vec![
                self.sock_dir.join("ctl.sock"),
                self.sock_dir.join("io.sock"),
            ],
            Flavour::HybridVsock => vec![self.sock_dir.join("vsock.sock")],
        };
        let deadline = Instant::now() + timeout;
        for p in &paths {
            loop {
                let is_socket = fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket());
                if is_socket {
                    break;
                }
                if let Ok(Some(s)) = self.qemu.try_wait() {
                    return Err(format!("QEMU exited ({s}) before creating {}", p.display()));
                }
                if Instant::now() > deadline {
                    return Err(format!("{} not created within {timeout:?}", p.display()));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Connect to the agent's ctl and io channels, retrying until `deadline`.
    pub fn connect(&mut self, deadline: Instant) -> Result<(UnixStream, UnixStream), String> {
        let qemu = &mut self.qemu;
        let mut alive = || -> Result<(), String> {
            match qemu.try_wait() {
                Ok(Some(s)) => Err(format!("QEMU exited ({s}) before the agent was reachable")),
                _ => Ok(()),
            }
        };
        match self.flavour {
            Flavour::VirtioSerial => Ok((
                connect_unix(&self.sock_dir.join("ctl.sock"), deadline, &mut alive)?,
                connect_unix(&self.sock_dir.join("io.sock"), deadline, &mut alive)?,
            )),
            Flavour::HybridVsock => {
                let uds = self.sock_dir.join("vsock.sock");
                Ok((
                    connect_hvsock(&uds, CTL_PORT, deadline, &mut alive)?,
                    connect_hvsock(&uds, IO_PORT, deadline, &mut alive)?,
                ))
            }
        }
    }

    /// Wait for QEMU to exit (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.qemu.try_wait().map_err(|e| e.to_string())? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!("QEMU still running after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's AF_VSOCK loopback result: waits up to `timeout` for its
    /// console line; `Ok` with the line if it says ok, `Err` if it says
    /// FAILED, if there is none (the round trip did not run) or if QEMU
    /// exited first.
    pub fn vsock_loopback_result(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let console = fs::read(&self.console)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if let Some(line) = console.lines().find(|l| l.contains(LOOPBACK_MARKER)) {
                let line = line.trim().to_string();
                let verdict = line
                    .split_once(LOOPBACK_MARKER)
                    .map_or("", |(_, rest)| rest.trim_start());
                return if verdict.starts_with("ok") {
                    Ok(line)
                } else {
                    Err(line)
                };
            }
            let exited = matches!(self.qemu.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                return Err(format!(
                    "the guest did not run the AF_VSOCK loopback round trip: no `{LOOPBACK_MARKER}` \
                     line on its console {} after {timeout:?}{}",
                    self.console.display(),
                    if exited { " (QEMU exited)" } else { "" }
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `n` lines of the guest console.
    pub fn console_tail(&self, n: usize) -> String {
        tail(&self.console, n)
    }

    /// Whether QEMU still runs, for failure reports.
    pub fn qemu_state(&mut self) -> String {
        match self.qemu.try_wait() {
            Ok(None) => "QEMU is still running".into(),
            Ok(Some(s)) => format!("QEMU has exited: {s}"),
            Err(e) => format!("QEMU: {e}"),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        if let Some(b) = &mut self.backend {
            let _ = b.kill();
            let _ = b.wait();
        }
        let _ = fs::remove_dir_all(&self.sock_dir);
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn connect_unix(
    path: &Path,
    deadline: Instant,
    alive: &mut dyn FnMut() -> Result<(), String>,
) -> Result<UnixStream, String> {
    loop {
        alive()?;
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("connect {}: {e}", path.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Hybrid vsock: `CONNECT <port>\n`, then `OK <n>\n` read one byte at a
/// time so that no byte of the raw stream is swallowed. Until the guest
/// listens the backend refuses (reset, EOF): retry.
pub fn connect_hvsock(
    uds: &Path,
    port: u32,
    deadline: Instant,
    alive: &mut dyn FnMut() -> Result<(), String>,
) -> Result<UnixStream, String> {
    let attempt = || -> Result<UnixStream, String> {
        let mut s = UnixStream::connect(uds).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.len() < 64 {
            let n = s.read(&mut b).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("EOF after CONNECT".into());
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        if !line.starts_with(b"OK ") {
            return Err(format!(
                "unexpected reply {:?}",
                String::from_utf8_lossy(&line)
            ));
        }
        s.set_read_timeout(None).map_err(|e| e.to_string())?;
        Ok(s)
    };
    loop {
        alive()?;
        match attempt() {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("hvsock {}:{port}: {e}", uds.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
