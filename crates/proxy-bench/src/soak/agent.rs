//! A lean hyperstart agent per VM: two listening unix sockets the daemon
//! dials on each RegisterVM. Per registration ("epoch") it sends READY,
//! answers ctl, runs the processes the runtime starts (each writes
//! self-describing stdout and stderr, checks its stdin, and exits with the
//! code its session chose once stdin is closed), and takes faults.

use std::collections::HashMap;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proxy_proto::hyper::ctl::{Code, CtlDecoder, CtlMessage};
use proxy_proto::hyper::io::{IoDecoder, IoHeader};
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::check::{fill, Which};
use crate::{Rng, Sess, Soak, VmState};

/// Largest data of an io message the agent writes (a multiple of 8).
const MAX_DATA: usize = 10224;

/// What a fault acts on, for the current epoch.
#[derive(Debug)]
pub struct AgentCtl {
    ctl: StdUnixStream,
    io: StdUnixStream,
    io_tx: mpsc::Sender<Bytes>,
}

impl AgentCtl {
    /// Close the ctl channel (both directions).
    pub fn close_ctl(&self) {
        let _ = self.ctl.shutdown(std::net::Shutdown::Both);
    }

    /// Close the io channel.
    pub fn close_io(&self) {
        let _ = self.io.shutdown(std::net::Shutdown::Both);
    }

    /// A ctl header claiming a 4 GiB message: unframeable.
    pub fn garbage_ctl(&self) {
        use std::io::Write;
        let mut g = Vec::new();
        g.extend_from_slice(&(Code::Ack as u32).to_be_bytes());
        g.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
        g.extend_from_slice(b"garbage!");
        let _ = (&self.ctl).write_all(&g);
    }

    /// An io header claiming a 4 GiB message, between two messages.
    pub async fn garbage_io(&self) {
        let mut g = Vec::new();
        g.extend_from_slice(&3u64.to_be_bytes());
        g.extend_from_slice(&0xffff_ffffu32.to_be_bytes());
        g.extend_from_slice(b"garbage!");
        let _ = self.io_tx.send(Bytes::from(g)).await;
    }

    /// Power off: both channels closed.
    pub fn power_off(&self) {
        self.close_ctl();
        self.close_io();
    }
}

/// The agent's side of one VM, across epochs.
#[derive(Debug)]
pub struct Listeners {
    pub ctl: UnixListener,
    pub io: UnixListener,
}

/// Split a std-convertible tokio stream into a tokio stream and a std
/// handle on the same socket (for shutdown from outside its tasks).
fn with_handle(s: UnixStream) -> std::io::Result<(UnixStream, StdUnixStream)> {
    let std = s.into_std()?;
    let handle = std.try_clone()?;
    Ok((UnixStream::from_std(std)?, handle))
}

/// Accept one registration's channels, send READY and run the agent.
pub async fn accept(
    l: &Listeners,
    soak: Arc<Soak>,
    vm: Arc<VmState>,
    epoch: u64,
) -> Result<AgentCtl, String> {
    let (ctl, _) = l
        .ctl
        .accept()
        .await
        .map_err(|e| format!("accept ctl: {e}"))?;
    let (io, _) = l.io.accept().await.map_err(|e| format!("accept io: {e}"))?;
    let (mut ctl, ctl_h) = with_handle(ctl).map_err(|e| format!("ctl: {e}"))?;
    let (io, io_h) = with_handle(io).map_err(|e| format!("io: {e}"))?;
    let mut ready = BytesMut::new();
    CtlMessage::new(Code::Ready, Bytes::new())
        .encode(&mut ready, MAX_MESSAGE_LEN)
        .map_err(|e| e.to_string())?;
    ctl.write_all(&ready)
        .await
        .map_err(|e| format!("write READY: {e}"))?;
    let (io_r, io_w) = io.into_split();
    let (io_tx, io_rx) = mpsc::channel::<Bytes>(64);
    let seqs: Arc<Mutex<HashMap<u64, Arc<Sess>>>> = Arc::default();
    tokio::spawn(io_writer(io_w, io_rx));
    tokio::spawn(io_reader(
        io_r,
        seqs.clone(),
        soak.clone(),
        vm.clone(),
        epoch,
    ));
    tokio::spawn(ctl_loop(ctl, io_tx.clone(), seqs, soak, vm, epoch));
    Ok(AgentCtl {
        ctl: ctl_h,
        io: io_h,
        io_tx,
    })
}

async fn io_writer(mut w: tokio::net::unix::OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, 64).await > 0 {
        let mut all = BytesMut::new();
        for b in batch.drain(..) {
            all.extend_from_slice(&b);
        }
        if w.write_all(&all).await.is_err() {
            return;
        }
    }
}

async fn io_reader(
    mut r: tokio::net::unix::OwnedReadHalf,
    seqs: Arc<Mutex<HashMap<u64, Arc<Sess>>>>,
    soak: Arc<Soak>,
    vm: Arc<VmState>,
    epoch: u64,
) {
    let mut buf = BytesMut::with_capacity(128 * 1024);
    let mut dec = IoDecoder::new(MAX_MESSAGE_LEN);
    loop {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(m)) => {
                    let sess = seqs.lock().expect("seqs").get(&m.seq).cloned();
                    match sess {
                        Some(s) if m.data.is_empty() => {
                            s.stdin_eof.send_replace(true);
                        }
                        Some(s) => {
                            soak.stats.stdin_received.add(m.data.len() as u64);
                            s.stdin_recv.lock().expect("stdin").feed(&m.data);
                        }
                        None => soak.check(vm.excused(epoch), || {
                            format!(
                                "{}: io message for seq {} that no process has",
                                vm.cid, m.seq
                            )
                        }),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    soak.check(false, || {
                        format!("{}: the daemon's io framing: {e}", vm.cid)
                    });
                    return;
                }
            }
        }
        buf.reserve(64 * 1024);
        match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn write_ctl(w: &mut UnixStream, code: Code, payload: Bytes) -> bool {
    let mut b = BytesMut::new();
    if CtlMessage::new(code, payload)
        .encode(&mut b, MAX_MESSAGE_LEN)
        .is_err()
    {
        return false;
    }
    w.write_all(&b).await.is_ok()
}

async fn ctl_loop(
    mut s: UnixStream,
    io_tx: mpsc::Sender<Bytes>,
    seqs: Arc<Mutex<HashMap<u64, Arc<Sess>>>>,
    soak: Arc<Soak>,
    vm: Arc<VmState>,
    epoch: u64,
) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut dec = CtlDecoder::new(MAX_MESSAGE_LEN);
    loop {
        let m = match dec.decode(&mut buf) {
            Ok(Some(m)) => m,
            Ok(None) => {
                match s.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                continue;
            }
            Err(e) => {
                soak.check(false, || {
                    format!("{}: the daemon's ctl framing: {e}", vm.cid)
                });
                return;
            }
        };
        soak.stats.agent_ctl.add(1);
        let json: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        let ok = match m.code() {
            Some(Code::ExecCmd | Code::NewContainer) => {
                start_process(&json, &mut s, &io_tx, &seqs, &soak, &vm, epoch).await
            }
            Some(Code::KillContainer | Code::WinSize) => {
                soak.stats.signals_delivered.add(1);
                write_ctl(&mut s, Code::Ack, Bytes::new()).await
            }
            Some(Code::Ping) => write_ctl(&mut s, Code::Ack, Bytes::new()).await,
            _ => {
                let marker = json["container"].as_str().unwrap_or("");
                if marker.starts_with("late-") {
                    tokio::time::sleep(soak.late).await;
                    write_ctl(&mut s, Code::Ack, m.payload.clone()).await
                } else if let Some(n) = marker.strip_prefix("err-") {
                    let msg = format!("soak-agent-error {n}");
                    write_ctl(&mut s, Code::Error, Bytes::from(msg)).await
                } else {
                    // Anything else is echoed: the runtime checks its reply
                    // is its own.
                    write_ctl(&mut s, Code::Ack, m.payload.clone()).await
                }
            }
        };
        if !ok {
            return;
        }
    }
}

/// EXECCMD/NEWCONTAINER: check the relocation, ACK, run the process.
async fn start_process(
    json: &serde_json::Value,
    s: &mut UnixStream,
    io_tx: &mpsc::Sender<Bytes>,
    seqs: &Arc<Mutex<HashMap<u64, Arc<Sess>>>>,
    soak: &Arc<Soak>,
    vm: &Arc<VmState>,
    epoch: u64,
) -> bool {
    let p = &json["process"];
    let sid = p["args"][1]
        .as_str()
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(u32::MAX);
    let sess = soak.sessions.lock().expect("sessions").get(&sid).cloned();
    let (Some(sess), Some(stdio), Some(stderr)) = (sess, p["stdio"].as_u64(), p["stderr"].as_u64())
    else {
        soak.check(false, || {
            format!("{}: a process the soak did not start: {json}", vm.cid)
        });
        return write_ctl(s, Code::Error, Bytes::from_static(b"unknown process")).await;
    };
    soak.check(stdio >= 3 && stdio % 2 == 1 && stderr == stdio + 1, || {
        format!(
            "{}: process relocated to stdio {stdio}, stderr {stderr}",
            vm.cid
        )
    });
    seqs.lock().expect("seqs").insert(stdio, sess.clone());
    if !write_ctl(s, Code::Ack, Bytes::new()).await {
        return false;
    }
    tokio::spawn(run_process(
        sess,
        stdio,
        io_tx.clone(),
        soak.clone(),
        vm.clone(),
        epoch,
    ));
    true
}

fn io_message(seq: u64, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(12 + data.len());
    b.extend_from_slice(&IoHeader::for_data(seq, data.len()).to_bytes());
    b.extend_from_slice(data);
    b.freeze()
}

/// The process: its output, then (once stdin is closed) EOF and its exit
/// code.
async fn run_process(
    sess: Arc<Sess>,
    seq: u64,
    io_tx: mpsc::Sender<Bytes>,
    soak: Arc<Soak>,
    vm: Arc<VmState>,
    epoch: u64,
) {
    let mut rng = Rng::new(u64::from(sess.sid) ^ 0x9e37_79b9);
    let (mut out, mut err) = (0u64, 0u64);
    let mut n = 0u32;
    while out < sess.out_len || err < sess.err_len {
        let to_err = out >= sess.out_len || (err < sess.err_len && rng.below(4) == 0);
        let (which, off, total, s) = if to_err {
            (Which::Stderr, &mut err, sess.err_len, seq + 1)
        } else {
            (Which::Stdout, &mut out, sess.out_len, seq)
        };
        let max = (MAX_DATA as u64).min(total - *off);
        let len = (8 * (1 + rng.below(max / 8))).min(max) as usize;
        let data = fill(sess.sid, which, *off, len);
        {
            let mut h = sess.sent.lock().expect("sent");
            match which {
                Which::Stdout => h.0.update(&data),
                _ => h.1.update(&data),
            }
        }
        if io_tx.send(io_message(s, &data)).await.is_err() {
            return;
        }
        *off += len as u64;
        soak.stats.output_sent.add(len as u64);
        n += 1;
        if n % 16 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let mut eof = sess.stdin_eof.subscribe();
    let closed = matches!(
        tokio::time::timeout(Duration::from_secs(60), eof.wait_for(|c| *c)).await,
        Ok(Ok(_))
    );
    if !closed {
        soak.check(vm.excused(epoch) || soak.stopping(), || {
            format!("session {}: stdin EOF never reached the agent", sess.sid)
        });
        return;
    }
    let _ = io_tx.send(io_message(seq, &[])).await;
    let _ = io_tx.send(io_message(seq, &[sess.code])).await;
}
