//! Finding the ctl and io channels: unix sockets (host mode), virtio-serial
//! ports or AF_VSOCK listeners (guest).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use crate::log;

/// The virtio-serial port names of hyperstart.
pub const CTL_PORT_NAME: &str = "sh.hyper.channel.0";
/// See [`CTL_PORT_NAME`].
pub const IO_PORT_NAME: &str = "sh.hyper.channel.1";

/// A reading half of a channel.
pub type Reader = Box<dyn Read + Send>;
/// A writing half of a channel.
pub type Writer = Box<dyn Write + Send>;

/// Both channels, each split into its halves.
pub struct Channels {
    /// ctl, reading.
    pub ctl_r: Reader,
    /// ctl, writing.
    pub ctl_w: Writer,
    /// io, reading.
    pub io_r: Reader,
    /// io, writing.
    pub io_w: Writer,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channels")
    }
}

/// Host mode: listen on both paths, accept one connection on each.
pub fn host(ctl: &Path, io: &Path) -> io::Result<Channels> {
    let listen_at = |p: &Path| {
        let _ = fs::remove_file(p);
        UnixListener::bind(p)
            .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", p.display())))
    };
    let ctl_l = listen_at(ctl)?;
    let io_l = listen_at(io)?;
    // A connection waits in the backlog, so the order of accepts does not
    // matter to the peer.
    let (ctl_s, _) = ctl_l.accept()?;
    let (io_s, _) = io_l.accept()?;
    let split = |s: UnixStream| -> io::Result<(Reader, Writer)> {
        Ok((Box::new(s.try_clone()?), Box::new(s)))
    };
    let (ctl_r, ctl_w) = split(ctl_s)?;
    let (io_r, io_w) = split(io_s)?;
    Ok(Channels {
        ctl_r,
        ctl_w,
        io_r,
        io_w,
    })
}

/// In a guest: vsock when the kernel command line names the ports,
/// else the virtio-serial ports.
pub fn guest() -> io::Result<Channels> {
    let port = |name: &str| crate::guest::kernel_param(name).and_then(|v| v.parse::<u32>().ok());
    match (port("agent.ctl_port"), port("agent.io_port")) {
        (Some(ctl), Some(io)) => vsock(ctl, io),
        _ => virtio_serial(),
    }
}

/// A virtio-serial port reads 0 bytes while the host side is not
/// connected: that means "not yet", not the end.
struct PortReader(File);

impl Read for PortReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Ok(0) if !buf.is_empty() => std::thread::sleep(Duration::from_millis(20)),
                other => return other,
            }
        }
    }
}

fn virtio_serial() -> io::Result<Channels> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (ctl, io) = loop {
        let ctl = find_port(CTL_PORT_NAME);
        let io = find_port(IO_PORT_NAME);
        if let (Some(ctl), Some(io)) = (ctl, io) {
            break (ctl, io);
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial ports named {CTL_PORT_NAME} and {IO_PORT_NAME}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    log!("ctl on {}, io on {}", ctl.display(), io.display());
    let open = |p: &Path| -> io::Result<(Reader, Writer)> {
        let f = OpenOptions::new().read(true).write(true).open(p)?;
        Ok((Box::new(PortReader(f.try_clone()?)), Box::new(f)))
    };
    let (ctl_r, ctl_w) = open(&ctl)?;
    let (io_r, io_w) = open(&io)?;
    Ok(Channels {
        ctl_r,
        ctl_w,
        io_r,
        io_w,
    })
}

/// `/dev/vportNpM` whose `/sys/class/virtio-ports/vportNpM/name` is `name`.
fn find_port(name: &str) -> Option<PathBuf> {
    let rd = fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in rd.flatten() {
        let Ok(n) = fs::read_to_string(e.path().join("name")) else {
            continue;
        };
        if n.trim() == name {
            let dev = Path::new("/dev").join(e.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

fn vsock(ctl_port: u32, io_port: u32) -> io::Result<Channels> {
    let listen_on = |port: u32| -> io::Result<OwnedFd> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(4).map_err(io::Error::from)?)?;
        Ok(fd)
    };
    let ctl_l = listen_on(ctl_port)?;
    let io_l = listen_on(io_port)?;
    log!("listening on vsock ports {ctl_port} (ctl) and {io_port} (io)");
    let accept_on = |l: &OwnedFd| -> io::Result<UnixLikeStream> {
        let fd = accept(l.as_raw_fd())?;
        // SAFETY: accept returned a fresh descriptor that nothing else owns.
        Ok(UnixLikeStream(unsafe { File::from_raw_fd(fd) }))
    };
    let ctl = accept_on(&ctl_l)?;
    let io = accept_on(&io_l)?;
    let split = |s: UnixLikeStream| -> io::Result<(Reader, Writer)> {
        Ok((Box::new(s.0.try_clone()?), Box::new(s.0)))
    };
    let (ctl_r, ctl_w) = split(ctl)?;
    let (io_r, io_w) = split(io)?;
    Ok(Channels {
        ctl_r,
        ctl_w,
        io_r,
        io_w,
    })
}

/// A connected stream socket held as a `File` (read/write are the same
/// system calls).
struct UnixLikeStream(File);
