//! The mock hyperstart agent: two listening unix sockets (ctl and io) that
//! the daemon dials on RegisterVM, as it dials QEMU's virtio-serial ports.
//!
//! A thread accepts ctl, sends READY, accepts io, then answers every ctl
//! command with ACK. It reports the stdio seqs the daemon relocated each
//! `newcontainer`/`execcmd` onto, and counts `ping`s. The io channel is
//! driven by the figures themselves.

use std::fs;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use proxy_proto::hyper::ctl::{Code, CtlHeader, CTL_HEADER_LEN};
use proxy_proto::hyper::MAX_MESSAGE_LEN;

use crate::conn::IO_TIMEOUT;
use crate::wire::{write_all, RecvBuf, BIG_BUF};

/// A process the daemon started: its container id and relocated seqs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// `id` of newcontainer data (empty for execcmd).
    pub id: String,
    /// `process.stdio`: the session's ioBase.
    pub stdio: u64,
    /// `process.stderr`.
    pub stderr: u64,
}

/// A mock agent.
#[derive(Debug)]
pub struct Agent {
    dir: PathBuf,
    /// RegisterVM's `ctlSerial`.
    pub ctl_path: PathBuf,
    /// RegisterVM's `ioSerial`.
    pub io_path: PathBuf,
    channels: Receiver<Result<(UnixStream, UnixStream), String>>,
    started: Receiver<Result<Started, String>>,
    pings: Arc<AtomicU64>,
    ctl: Option<UnixStream>,
    io: Option<UnixStream>,
    /// The io channel's receive buffer (the daemon's stdin arrives here).
    pub io_rb: RecvBuf,
    thread: Option<JoinHandle<()>>,
}

impl Agent {
    /// Bind `<dir>/ctl.sock` and `<dir>/io.sock` and start accepting.
    pub fn start(dir: &Path) -> Result<Self, String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ctl_path = dir.join("ctl.sock");
        let io_path = dir.join("io.sock");
        let ctl_l = UnixListener::bind(&ctl_path)
            .map_err(|e| format!("bind {}: {e}", ctl_path.display()))?;
        let io_l =
            UnixListener::bind(&io_path).map_err(|e| format!("bind {}: {e}", io_path.display()))?;
        let (ch_tx, channels) = mpsc::channel();
        let (st_tx, started) = mpsc::channel();
        let pings = Arc::new(AtomicU64::new(0));
        let p = pings.clone();
        let thread = std::thread::Builder::new()
            .name("agent-ctl".into())
            .spawn(move || serve(ctl_l, io_l, ch_tx, st_tx, p))
            .map_err(|e| format!("spawn the agent thread: {e}"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ctl_path,
            io_path,
            channels,
            started,
            pings,
            ctl: None,
            io: None,
            io_rb: RecvBuf::new(BIG_BUF),
            thread: Some(thread),
        })
    }

    /// The io channel, once the daemon has connected (waits for it).
    pub fn io(&mut self) -> Result<&UnixStream, String> {
        if self.io.is_none() {
            let (ctl, io) = match self.channels.recv_timeout(IO_TIMEOUT) {
                Ok(r) => r?,
                Err(_) => return Err("the daemon did not connect to the agent's channels".into()),
            };
            self.ctl = Some(ctl);
            self.io = Some(io);
        }
        self.io
            .as_ref()
            .ok_or_else(|| "the agent's io channel is gone".to_string())
    }

    /// The io channel and its receive buffer, for a reader.
    pub fn io_reader(&mut self) -> Result<(&UnixStream, &mut RecvBuf), String> {
        self.io()?;
        match &self.io {
            Some(io) => Ok((io, &mut self.io_rb)),
            None => Err("the agent's io channel is gone".into()),
        }
    }

    /// The next process the daemon started (newcontainer/execcmd).
    pub fn next_started(&self) -> Result<Started, String> {
        match self.started.recv_timeout(IO_TIMEOUT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err("no newcontainer reached the agent".into()),
            Err(RecvTimeoutError::Disconnected) => Err("the agent's ctl channel closed".into()),
        }
    }

    /// How many `ping`s with data `{}` the agent answered.
    pub fn pings(&self) -> u64 {
        self.pings.load(Ordering::Relaxed)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Closing both channels is how a VM goes away; the ctl thread then
        // sees EOF and ends.
        for s in [self.ctl.take(), self.io.take()].into_iter().flatten() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // The thread ends on that EOF (or stays blocked in accept if the
        // daemon never dialled; it is detached either way).
        drop(self.thread.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// ACK with an empty payload.
pub(crate) const ACK: [u8; CTL_HEADER_LEN] =
    [0, 0, 0, Code::Ack as u8, 0, 0, 0, CTL_HEADER_LEN as u8];

fn serve(
    ctl_l: UnixListener,
    io_l: UnixListener,
    channels: Sender<Result<(UnixStream, UnixStream), String>>,
    started: Sender<Result<Started, String>>,
    pings: Arc<AtomicU64>,
) {
    let accepted = (|| -> Result<(UnixStream, UnixStream, UnixStream), String> {
        let (ctl, _) = ctl_l.accept().map_err(|e| format!("accept ctl: {e}"))?;
        let ready = CtlHeader {
            code: Code::Ready as u32,
            len: CTL_HEADER_LEN as u32,
        }
        .to_bytes();
        write_all(&mut &ctl, &ready)?;
        let (io, _) = io_l.accept().map_err(|e| format!("accept io: {e}"))?;
        io.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| io.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("io timeouts: {e}"))?;
        let ctl2 = ctl.try_clone().map_err(|e| format!("clone ctl: {e}"))?;
        Ok((ctl, ctl2, io))
    })();
    let ctl = match accepted {
        Ok((ctl, ctl2, io)) => {
            let _ = channels.send(Ok((ctl2, io)));
            ctl
        }
        Err(e) => {
            let _ = channels.send(Err(e));
            return;
        }
    };
    if let Err(e) = answer(&ctl, &started, &pings) {
        let _ = started.send(Err(format!("agent ctl: {e}")));
    }
}

/// Answer ctl commands until the daemon closes ctl.
fn answer(
    ctl: &UnixStream,
    started: &Sender<Result<Started, String>>,
    pings: &AtomicU64,
) -> Result<(), String> {
    let mut rb = RecvBuf::new(64 << 10);
    loop {
        while let Some(h) = rb.data().get(..CTL_HEADER_LEN) {
            let mut b = [0u8; CTL_HEADER_LEN];
            b.copy_from_slice(h);
            let h = CtlHeader::parse(&b);
            let len = h.len as usize;
            if !(CTL_HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
                return Err(format!("a ctl message of length {len}"));
            }
            if rb.data().len() < len {
                break;
            }
            let payload = &rb.data()[CTL_HEADER_LEN..len];
            match Code::from_u32(h.code) {
                Some(Code::Ping) if payload == b"{}" => {
                    pings.fetch_add(1, Ordering::Relaxed);
                }
                Some(Code::NewContainer | Code::ExecCmd) => {
                    let _ = started.send(relocated(payload));
                }
                _ => {}
            }
            rb.consume(len);
            write_all(&mut &*ctl, &ACK)?;
        }
        match rb.read_from(&mut &*ctl) {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
    }
}

/// The seqs the daemon wrote into a process's data.
pub(crate) fn relocated(payload: &[u8]) -> Result<Started, String> {
    let v: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| format!("newcontainer/execcmd data is not JSON: {e}"))?;
    let p = &v["process"];
    let stdio = p["stdio"]
        .as_u64()
        .ok_or_else(|| format!("no process.stdio in {v}"))?;
    let stderr = p["stderr"].as_u64().unwrap_or(0);
    Ok(Started {
        id: v["id"].as_str().unwrap_or_default().to_string(),
        stdio,
        stderr,
    })
}
