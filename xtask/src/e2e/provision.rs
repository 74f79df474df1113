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

    /// Install `pkg` and what it needs, and nothing else: apt is never
    /// allowed to remove a package to make room (`--no-remove`), and a
    /// dry run first names what it would remove, so that the refusal says
    /// why.
    fn install(&mut self, pkg: &str) -> Result<(), String> {
        self.install_from(None, pkg)
    }

    /// `install`, from `suite` (`-t`) if given: refused, naming them, if
    /// apt would remove a package or replace the installed version of one.
    fn install_from(&mut self, suite: Option<&str>, pkg: &str) -> Result<(), String> {
        self.update()?;
        let mut args = vec!["install", "--no-install-recommends"];
        if let Some(s) = suite {
            args.extend(["-t", s]);
        }
        let sim = self.simulate(&args, pkg)?;
        let removed = removals(&sim);
        if !removed.is_empty() {
            return Err(format!(
                "installing {pkg} would remove {}: not doing that to this host; install {pkg} yourself if that is fine",
                removed.join(", ")
            ));
        }
        let replaced = replacements(&sim);
        if !replaced.is_empty() {
            return Err(format!(
                "installing {pkg} would replace the installed {}: not doing that to this host; install {pkg} yourself if that is fine",
                replaced.join(", ")
            ));
        }
        eprintln!(
            "e2e: installing {pkg} (apt {}, --no-remove)",
            args.join(" ")
        );
        util::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(&args)
                .args(["-y", "--no-remove", pkg]),
        )
    }

    /// What `apt-get <args> -s pkg` would do (its transcript).
    fn simulate(&mut self, args: &[&str], pkg: &str) -> Result<String, String> {
        let sim = Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args)
            .args(["-s", pkg])
            .output()
            .map_err(|e| format!("apt-get {} -s {pkg}: {e}", args.join(" ")))?;
        Ok(String::from_utf8_lossy(&sim.stdout).into_owned())
    }

    /// Make sure apt's sources list `suite` (main): when none does, add a
    /// file of ours for it (said so), and read the lists again.
    fn ensure_suite(&mut self, suite: &str) -> Result<(), String> {
        let listed = ["/etc/apt/sources.list", "/etc/apt/sources.list.d"]
            .iter()
            .flat_map(|p| sources_texts(Path::new(p)))
            .any(|text| text.split_whitespace().any(|w| w == suite));
        if listed {
            return Ok(());
        }
        let file = format!("/etc/apt/sources.list.d/cc-proxy-e2e-{suite}.list");
        eprintln!(
            "e2e: adding {suite} to apt's sources ({file}); no installed package changes by it"
        );
        fs::write(
            &file,
            format!("deb http://deb.debian.org/debian {suite} main\n"),
        )
        .map_err(|e| format!("write {file}: {e}"))?;
        self.updated = false;
        self.update()
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

/// The texts of an apt sources file, or of the files of a sources
/// directory.
fn sources_texts(p: &Path) -> Vec<String> {
    if p.is_dir() {
        fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        fs::read_to_string(p).into_iter().collect()
    }
}

/// The installed packages an `apt-get install -s` transcript gives another
/// version (`Inst name [installed] (new …)` lines).
fn replacements(simulation: &str) -> Vec<String> {
    simulation
        .lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter(|rest| {
            rest.split_whitespace()
                .nth(1)
                .is_some_and(|w| w.starts_with('['))
        })
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The installed version of `pkg`, if it is installed.
fn installed_version(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", pkg])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.strip_prefix("install ok installed ")?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// The backports suite a version of a Debian backport comes from
/// (`…~bpo12+1` is bookworm-backports), by this host's release name.
fn backports_suite(version: &str) -> Option<String> {
    if !version.contains("~bpo") {
        return None;
    }
    let os = fs::read_to_string("/etc/os-release").ok()?;
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))?
        .trim_matches('"');
    (!codename.is_empty()).then(|| format!("{codename}-backports"))
}

/// QEMU from apt. A host that carries QEMU's own tools from its release's
/// backports (qemu-utils `…~bpo12+1`) cannot take the release's QEMU,
/// which would remove them: it gets the same version of qemu-system-x86
/// from those backports instead (that suite added to apt's sources if it
/// is missing), as new packages only, nothing installed replaced.
fn install_qemu(apt: &mut Apt) -> Result<(), String> {
    apt.update()?;
    let sim = apt.simulate(&["install", "--no-install-recommends"], "qemu-system-x86")?;
    let removed = removals(&sim);
    let bpo =
        installed_version("qemu-utils").and_then(|v| backports_suite(&v).map(|suite| (v, suite)));
    match bpo {
        Some((v, suite)) if removed.iter().any(|p| p == "qemu-utils") => {
            eprintln!(
                "e2e: Debian's qemu-system-x86 would remove this host's qemu-utils {v} (from {suite}); installing the same version from {suite}"
            );
            apt.ensure_suite(&suite)?;
            apt.install_from(Some(&suite), &format!("qemu-system-x86={v}"))
        }
        _ => apt.install("qemu-system-x86"),
    }
}

/// The packages an `apt-get install -s` transcript removes (`Remv` lines).
fn removals(simulation: &str) -> Vec<String> {
    simulation
        .lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
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
            install_qemu(&mut apt)?;
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
    eprintln!("e2e: guest kernel package: {pkg} (what linux-image-amd64 depends on)");
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

/// The vhost-device-vsock release the e2e run installs (pinned: a new
/// release must not change what the tests run against).
pub const VHOST_DEVICE_VSOCK_VERSION: &str = "0.3.0";

fn vhost_device_vsock(dir: &Path) -> Result<PathBuf, String> {
    if let Some(p) = on_path("vhost-device-vsock") {
        eprintln!("e2e: using {} (on PATH)", p.display());
        return Ok(p);
    }
    let tools = dir.join("tools");
    let bin = tools.join("bin/vhost-device-vsock");
    // cargo install --root records what it installed; a cached binary of
    // another version is replaced.
    let recorded = fs::read_to_string(tools.join(".crates.toml")).unwrap_or_default();
    let pinned = format!("vhost-device-vsock {VHOST_DEVICE_VSOCK_VERSION} ");
    if bin.is_file() && recorded.contains(&pinned) {
        return Ok(bin);
    }
    eprintln!(
        "e2e: installing vhost-device-vsock {VHOST_DEVICE_VSOCK_VERSION} (cargo install into {}, ~1 min)",
        tools.display()
    );
    util::run(
        Command::new(util::cargo())
            .args([
                "install",
                "--locked",
                "--force",
                "vhost-device-vsock",
                "--version",
                &format!("={VHOST_DEVICE_VSOCK_VERSION}"),
                "--root",
            ])
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

#[cfg(test)]
mod tests {
    #[test]
    fn apt_removals_are_read_from_a_simulation() {
        let sim = "NOTE: This is only a simulation!\n\
                   Remv libfoo1 [1.0-1]\n\
                   Inst qemu-system-x86 (1:7.2+dfsg-7 Debian:12/stable [amd64])\n\
                   Remv bar [2]\n\
                   Conf qemu-system-x86 (1:7.2+dfsg-7 Debian:12/stable [amd64])\n";
        assert_eq!(super::removals(sim), ["libfoo1", "bar"]);
        assert!(super::removals("Inst x (1)\nConf x (1)\n").is_empty());
    }

    #[test]
    fn apt_replacements_are_read_from_a_simulation() {
        let sim = "Inst libnew1 (2.0-1 Debian:12/stable [amd64])\n\
                   Inst libold2 [1.0-1] (1.1-1 Debian Backports [amd64])\n\
                   Conf libold2 (1.1-1 Debian Backports [amd64])\n";
        assert_eq!(super::replacements(sim), ["libold2"]);
        assert!(super::replacements("Inst x (1 D [all])\n").is_empty());
    }
}
