//! Everything the end-to-end run needs, fetched once and cached under
//! `target/e2e/`: QEMU, a Debian kernel and its modules, busybox,
//! vhost-device-vsock, the static agent and the initramfs.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::cpio::Cpio;
use crate::util;

/// The modules the agent loads, in load order (see `docs/E2E.md`).
pub const MODULES: [&str; 10] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    // CID 1: the guest's own AF_VSOCK round trip (after vsock and
    // vmw_vsock_virtio_transport_common, which it depends on).
    "vsock_loopback",
];

/// Applets linked in the initramfs (the agent also runs
/// `busybox --install -s` at start).
const APPLETS: [&str; 16] = [
    "sh",
    "cat",
    "echo",
    "sleep",
    "stty",
    "sha256sum",
    "head",
    "dd",
    "ls",
    "true",
    "false",
    "uname",
    "wc",
    "tr",
    "yes",
    "env",
];

/// What a boot needs.
#[derive(Debug)]
pub struct Assets {
    /// QEMU.
    pub qemu: PathBuf,
    /// The uncompressed kernel ELF (PVH entry).
    pub vmlinux: PathBuf,
    /// The initramfs with the agent as `/init`.
    pub initrd: PathBuf,
    /// The vhost-user vsock backend.
    pub vhost_vsock: PathBuf,
}

#[derive(Debug, Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn update(&mut self) -> Result<(), String> {
        if !self.updated {
            util::run(Command::new("apt-get").args(["update", "-qq"]))?;
            self.updated = true;
        }
        Ok(())
    }

    fn install(&mut self, pkg: &str) -> Result<(), String> {
        self.update()?;
        eprintln!("e2e: installing {pkg} (apt)");
        util::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "--no-install-recommends", pkg]),
        )
    }

    /// `apt-get download pkg` into `dir`; returns the .deb.
    fn download(&mut self, pkg: &str, dir: &Path) -> Result<PathBuf, String> {
        fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        eprintln!("e2e: downloading {pkg} (apt)");
        // apt-get download writes into its working directory.
        let try_download = || {
            util::run(
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("cd '{}' && apt-get download {pkg}", dir.display())),
            )
        };
        if try_download().is_err() {
            self.update()?;
            try_download()?;
        }
        let deb = fs::read_dir(dir)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
            .ok_or_else(|| format!("apt-get download {pkg} left no .deb in {}", dir.display()))?;
        Ok(deb)
    }
}

fn on_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Provision and build everything; `dir` is `target/e2e`.
pub fn assets(dir: &Path) -> Result<Assets, String> {
    let mut apt = Apt::default();
    let qemu = match on_path("qemu-system-x86_64") {
        Some(q) => q,
        None => {
            apt.install("qemu-system-x86")?;
            on_path("qemu-system-x86_64").ok_or("qemu-system-x86_64 still missing")?
        }
    };
    if on_path("xz").is_none() {
        apt.install("xz-utils")?;
    }
    let (vmlinux, modules) = kernel(&mut apt, dir)?;
    let busybox = busybox(&mut apt, dir)?;
    let vhost_vsock = vhost_device_vsock(dir)?;
    let agent = build_agent(dir)?;
    let initrd = dir.join("initrd.cpio");
    write_initrd(&initrd, &agent, &busybox, &modules)?;
    Ok(Assets {
        qemu,
        vmlinux,
        initrd,
        vhost_vsock,
    })
}

/// The Debian kernel: `(vmlinux, [module files in load order])`.
fn kernel(apt: &mut Apt, dir: &Path) -> Result<(PathBuf, Vec<PathBuf>), String> {
    let pkg = match kernel_package() {
        Some(p) => p,
        None => {
            apt.update()?;
            kernel_package().ok_or("apt-cache depends linux-image-amd64 names no kernel")?
        }
    };
    let kv = pkg.trim_start_matches("linux-image-").to_string();
    let kdir = dir.join("kernel").join(&kv);
    let vmlinux = kdir.join("vmlinux");
    let find_modules = || -> Option<Vec<PathBuf>> {
        let mut all = Vec::new();
        collect_files(&kdir.join("root"), &mut all);
        MODULES
            .iter()
            .map(|m| {
                let f = format!("{m}.ko");
                all.iter()
                    .find(|p| p.file_name().is_some_and(|n| n == f.as_str()))
                    .cloned()
            })
            .collect()
    };
    if vmlinux.is_file() {
        if let Some(mods) = find_modules() {
            return Ok((vmlinux, mods));
        }
    }
    let deb = apt.download(&pkg, &dir.join("dl"))?;
    let root = kdir.join("root");
    fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    eprintln!("e2e: extracting kernel {kv} and its virtio/vsock modules");
    util::run(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards './boot/vmlinuz-{kv}' '*/kernel/drivers/virtio/*' '*/kernel/drivers/char/virtio_console.ko' '*/kernel/net/vmw_vsock/*'",
        deb.display(),
        root.display()
    )))?;
    let bz = fs::read(root.join(format!("boot/vmlinuz-{kv}"))).map_err(|e| e.to_string())?;
    let elf = extract_vmlinux(&bz)?;
    fs::write(&vmlinux, elf).map_err(|e| e.to_string())?;
    let _ = fs::remove_file(&deb);
    let mods = find_modules().ok_or("the kernel package lacks a virtio/vsock module")?;
    Ok((vmlinux, mods))
}

fn kernel_package() -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
}

/// The ELF inside a bzImage: the xz stream after the `FD 37 7A 58 5A 00`
/// magic, decompressed (PVH boots it directly, ~3 s faster under TCG).
fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, String> {
    const MAGIC: [u8; 6] = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
    let at = bz
        .windows(MAGIC.len())
        .position(|w| w == MAGIC)
        .ok_or("no xz stream in the bzImage")?;
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("xz: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("xz stdin")?;
    let data = bz[at..].to_vec();
    let writer = std::thread::spawn(move || {
        // xz stops reading after the stream; a broken pipe then is fine.
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().map_err(|e| format!("xz: {e}"))?;
    let _ = writer.join();
    if !out.stdout.starts_with(b"\x7fELF") {
        return Err("the bzImage's xz stream is not an ELF kernel".into());
    }
    Ok(out.stdout)
}

fn busybox(apt: &mut Apt, dir: &Path) -> Result<PathBuf, String> {
    let bb = dir.join("busybox");
    if bb.is_file() {
        return Ok(bb);
    }
    let deb = apt.download("busybox-static", &dir.join("dl"))?;
    let tmp = dir.join("busybox-root");
    fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    util::run(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' ./bin/busybox",
        deb.display(),
        tmp.display()
    )))?;
    fs::rename(tmp.join("bin/busybox"), &bb).map_err(|e| e.to_string())?;
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_file(&deb);
    Ok(bb)
}

fn vhost_device_vsock(dir: &Path) -> Result<PathBuf, String> {
    if let Some(p) = on_path("vhost-device-vsock") {
        return Ok(p);
    }
    let tools = dir.join("tools");
    let bin = tools.join("bin/vhost-device-vsock");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!("e2e: installing vhost-device-vsock (cargo install, ~1 min)");
    util::run(
        Command::new(util::cargo())
            .args(["install", "--locked", "vhost-device-vsock", "--root"])
            .arg(&tools),
    )?;
    Ok(bin)
}

/// The agent as a static binary, in its own target dir so that the host
/// build of the workspace is untouched.
fn build_agent(dir: &Path) -> Result<PathBuf, String> {
    let target_dir = dir.join("build");
    util::run(
        Command::new(util::cargo())
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env("CARGO_TARGET_DIR", &target_dir)
            .args([
                "build",
                "--release",
                "--target",
                "x86_64-unknown-linux-gnu",
                "-p",
                "proxy-agent",
            ]),
    )?;
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/proxy-agent"))
}

/// The real daemon and shim as shipped (static release builds): the paths
/// of `cc-proxy` and `cc-proxy-shim`.
pub fn build_proxy() -> Result<(PathBuf, PathBuf), String> {
    Ok((
        util::build_static("proxy-server", "cc-proxy")?,
        util::build_static("proxy-client", "cc-proxy-shim")?,
    ))
}

fn write_initrd(
    path: &Path,
    agent: &Path,
    busybox: &Path,
    modules: &[PathBuf],
) -> Result<(), String> {
    let read = |p: &Path| fs::read(p).map_err(|e| format!("read {}: {e}", p.display()));
    let mut c = Cpio::default();
    for d in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "lib",
        "lib/modules",
        "root",
    ] {
        c.dir(d);
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.file("init", 0o755, &read(agent)?);
    c.file("bin/busybox", 0o755, &read(busybox)?);
    for a in APPLETS {
        c.symlink(&format!("bin/{a}"), "busybox");
    }
    for m in modules {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("module name")?;
        c.file(&format!("lib/modules/{name}"), 0o644, &read(m)?);
    }
    fs::write(path, c.finish()).map_err(|e| format!("write {}: {e}", path.display()))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}
