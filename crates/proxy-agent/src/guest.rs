//! Guest setup as `/init`: file systems, console, kernel modules, power off.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

use crate::log;

/// The modules the virtio-serial ports and vsock need, in load order
/// (the same list as the xtask's `provision::MODULES`; a module missing
/// from the initramfs is skipped). `vsock_loopback` (CID 1) serves the
/// AF_VSOCK round trip of [`crate::loopback`].
const MODULES: [&str; 10] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "vsock_loopback",
];

/// Make the guest usable: every step logs and carries on when it fails, so
/// that a half-working guest still says what went wrong on the console.
pub fn setup() {
    mount_fs("devtmpfs", "/dev", "devtmpfs", "mode=0755");
    reopen_console();
    mount_fs("proc", "/proc", "proc", "");
    mount_fs("sysfs", "/sys", "sysfs", "");
    mount_fs("tmpfs", "/tmp", "tmpfs", "mode=1777");
    mount_fs("devpts", "/dev/pts", "devpts", "mode=0620,ptmxmode=0666");
    install_busybox();
    load_modules(Path::new("/lib/modules"));
}

/// A `name=value` setting of the kernel command line: from init's
/// environment, or from `/proc/cmdline` (a `a.b=c` setting is a module
/// parameter to the kernel and does not reach init's environment).
pub fn kernel_param(name: &str) -> Option<String> {
    if let Ok(v) = std::env::var(name) {
        return Some(v);
    }
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .map(str::to_string)
}

fn mount_fs(source: &str, target: &str, fstype: &str, data: &str) {
    if let Err(e) = fs::create_dir_all(target) {
        log!("mkdir {target}: {e}");
    }
    let data = (!data.is_empty()).then_some(data);
    if let Err(e) = mount(Some(source), target, Some(fstype), MsFlags::empty(), data) {
        log!("mount {fstype} on {target}: {e}");
    }
}

/// The kernel may have started us without a console on fds 0–2 (no
/// `/dev/console` in the initramfs); give every later process one.
fn reopen_console() {
    let console = match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        Ok(f) => f,
        Err(_) => return,
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which this process owns
        // and which nothing else holds as an OwnedFd; `console` stays valid
        // for the call.
        unsafe {
            libc::dup2(console.as_raw_fd(), fd);
        }
    }
}

/// busybox's applets as symlinks, if busybox is there.
fn install_busybox() {
    let bb = Path::new("/bin/busybox");
    if !bb.exists() {
        return;
    }
    for d in ["/bin", "/sbin", "/usr/bin", "/usr/sbin"] {
        let _ = fs::create_dir_all(d);
    }
    match std::process::Command::new(bb)
        .args(["--install", "-s"])
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => log!("busybox --install: {s}"),
        Err(e) => log!("busybox --install: {e}"),
    }
}

/// Load `MODULES` from `dir` (flat `name.ko`, or anywhere below `dir`).
fn load_modules(dir: &Path) {
    let mut found = Vec::new();
    collect_ko(dir, &mut found, 0);
    for name in MODULES {
        let file = format!("{name}.ko");
        let Some(path) = found
            .iter()
            .find(|p| p.file_name().is_some_and(|f| f == file.as_str()))
        else {
            continue;
        };
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                log!("open {}: {e}", path.display());
                continue;
            }
        };
        let params = CString::default();
        match finit_module(&f, &params, ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => log!("finit_module {name}: {e}"),
        }
    }
}

fn collect_ko(dir: &Path, out: &mut Vec<std::path::PathBuf>, depth: usize) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() && depth < 8 {
            collect_ko(&p, out, depth + 1);
        } else if p.extension().is_some_and(|x| x == "ko") {
            out.push(p);
        }
    }
}

/// sync, then power off; with `-no-reboot` QEMU exits.
pub fn power_off() -> ! {
    nix::unistd::sync();
    // Let the virtqueues hand the last replies to the host.
    std::thread::sleep(Duration::from_millis(200));
    let e = reboot(RebootMode::RB_POWER_OFF);
    log!("power off failed: {e:?}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
