//! `proxy-agent`: a hyperstart-compatible guest agent for the end-to-end
//! tests of cc-proxy (docs/PROTOCOL.md §6–§8).
//!
//! Two ways to run it:
//!
//! - as `/init` of a VM (no arguments): it sets up the guest (devtmpfs,
//!   console, proc, sysfs, tmp, devpts, the virtio and vsock modules), then
//!   finds its channels — the virtio-serial ports `sh.hyper.channel.0` (ctl)
//!   and `sh.hyper.channel.1` (io), or, when the kernel command line carries
//!   `agent.ctl_port=P agent.io_port=Q`, AF_VSOCK listeners on those ports;
//!   with `agent.vsock_loopback=PORT` it first runs an AF_VSOCK round trip
//!   over the loopback transport (CID 1) and prints the result on the
//!   console (see `loopback`);
//! - on the host, for tests without a VM:
//!   `proxy-agent --ctl-sock PATH --io-sock PATH` listens on two unix sockets
//!   (as QEMU's `chardev server=on` does) and serves one connection on each.
//!
//! Either way it sends READY on ctl, serves the commands, and runs real
//! processes whose stdio it multiplexes on io.

use std::path::PathBuf;
use std::process::ExitCode;

mod agent;
mod channel;
mod guest;
mod loopback;
mod process;

/// Print a line on stderr (the console in a guest), prefixed with our name.
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("proxy-agent: {}", format_args!($($arg)*))
    };
}
pub(crate) use log;

/// Where the agent runs, which decides what "the end" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/init` of a VM: destroypod powers the VM off.
    Guest,
    /// A host process serving unix sockets: destroypod exits.
    Host,
}

const USAGE: &str = "usage: proxy-agent                                  (as /init of a VM)
       proxy-agent --ctl-sock PATH --io-sock PATH    (host mode, listens on two unix sockets)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut ctl_sock: Option<PathBuf> = None;
    let mut io_sock: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ctl-sock" => ctl_sock = it.next().map(PathBuf::from),
            "--io-sock" => io_sock = it.next().map(PathBuf::from),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("proxy-agent: unknown argument `{other}`\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let result = match (ctl_sock, io_sock) {
        (Some(ctl), Some(io)) => channel::host(&ctl, &io).and_then(|ch| agent::run(ch, Mode::Host)),
        (None, None) => guest_main(),
        _ => {
            eprintln!("proxy-agent: --ctl-sock and --io-sock go together\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("fatal: {e}");
            ExitCode::FAILURE
        }
    }
}

/// As `/init`: never return to the kernel (that would panic it) — power off.
fn guest_main() -> Result<(), std::io::Error> {
    guest::setup();
    if let Some(v) = guest::kernel_param("agent.vsock_loopback") {
        match v.parse::<u32>() {
            Ok(port) => loopback::run_and_report(port),
            Err(_) => log!(
                "{} FAILED: agent.vsock_loopback={v:?} is not a port number",
                loopback::MARKER
            ),
        }
    }
    let result = channel::guest().and_then(|ch| agent::run(ch, Mode::Guest));
    if let Err(e) = &result {
        log!("fatal: {e}");
    }
    guest::power_off()
}
