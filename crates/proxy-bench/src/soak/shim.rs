//! A shim slot: one process after another on its VM, every byte checked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxy_proto::{Command, FrameKind, Notification, Stream};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::check::{fill, RecvCheck, Which};
use crate::wire::{self, Reader, Rt, REPLY_TIMEOUT};
use crate::{Rng, Sess, Soak, VmState};

/// What a shim connection's reader hands to the shim.
#[derive(Debug)]
enum Ev {
    Response(Command, wire::Reply),
    Exited(u8),
    /// The connection ended (EOF or an error, with why).
    End(Option<String>),
}

/// What the reader checks, across the shim's connections.
#[derive(Debug)]
struct Recv {
    out: RecvCheck,
    err: RecvCheck,
}

/// Run slot `slot` of `vm` until the soak stops.
pub async fn slot(soak: Arc<Soak>, vm: Arc<VmState>, slot: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut rx = vm.epoch.subscribe();
    while !soak.stopping() {
        let epoch = *rx.borrow_and_update();
        if epoch == 0 || vm.dying.load(Ordering::SeqCst) {
            let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
            continue;
        }
        let first = vm.tokens.lock().expect("tokens")[slot].take();
        session(&soak, &vm, epoch, first, &mut rng).await;
        // Between sessions, a breath.
        tokio::time::sleep(Duration::from_millis(rng.below(50))).await;
    }
}

/// A shim connection: our write half and the reader task.
struct Conn {
    wr: OwnedWriteHalf,
    reader: tokio::task::JoinHandle<()>,
}

impl Conn {
    async fn open(
        soak: &Arc<Soak>,
        recv: &Arc<Mutex<Recv>>,
        pause: &Arc<AtomicU64>,
        ev: mpsc::UnboundedSender<Ev>,
    ) -> Result<Self, String> {
        let s = UnixStream::connect(&soak.socket)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (rd, wr) = s.into_split();
        let reader = tokio::spawn(read_loop(
            Reader::new(rd),
            recv.clone(),
            pause.clone(),
            ev,
            soak.clone(),
        ));
        Ok(Self { wr, reader })
    }

    /// Drop the connection at once (no DisconnectShim).
    async fn cut(self) {
        drop(self.wr);
        self.reader.abort();
        let _ = self.reader.await;
    }
}

async fn read_loop(
    mut rd: Reader,
    recv: Arc<Mutex<Recv>>,
    pause: Arc<AtomicU64>,
    ev: mpsc::UnboundedSender<Ev>,
    soak: Arc<Soak>,
) {
    loop {
        let ms = pause.swap(0, Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let f = match rd.next().await {
            Ok(Some(f)) => f,
            Ok(None) => {
                let _ = ev.send(Ev::End(None));
                return;
            }
            Err(e) => {
                let _ = ev.send(Ev::End(Some(e)));
                return;
            }
        };
        match f.kind {
            FrameKind::Stream(Stream::Stdout) => {
                soak.stats.output_received.add(f.payload.len() as u64);
                recv.lock().expect("recv").out.feed(&f.payload);
            }
            FrameKind::Stream(Stream::Stderr) => {
                soak.stats.output_received.add(f.payload.len() as u64);
                recv.lock().expect("recv").err.feed(&f.payload);
            }
            FrameKind::Notification(Notification::ProcessExited) if f.payload.len() == 1 => {
                let _ = ev.send(Ev::Exited(f.payload[0]));
            }
            FrameKind::Response { command, error } => {
                let r = if error {
                    Err(wire::error_msg(&f.payload))
                } else {
                    Ok(f.payload.to_vec())
                };
                let _ = ev.send(Ev::Response(command, r));
            }
            other => {
                let _ = ev.send(Ev::End(Some(format!("{other:?} on a shim connection"))));
                return;
            }
        }
    }
}

/// The session's shim side.
struct Shim<'a> {
    soak: &'a Arc<Soak>,
    vm: &'a Arc<VmState>,
    epoch: u64,
    token: String,
    conn: Option<Conn>,
    ev_tx: mpsc::UnboundedSender<Ev>,
    ev: mpsc::UnboundedReceiver<Ev>,
    recv: Arc<Mutex<Recv>>,
    pause: Arc<AtomicU64>,
    exited: Option<u8>,
    ended: bool,
}

impl Shim<'_> {
    fn excused(&self) -> bool {
        self.vm.excused(self.epoch)
    }

    async fn connect(&mut self) -> Result<(), String> {
        let c = Conn::open(self.soak, &self.recv, &self.pause, self.ev_tx.clone()).await?;
        self.conn = Some(c);
        self.ended = false;
        self.send(&wire::command(
            Command::ConnectShim,
            &json!({ "token": self.token }),
        ))
        .await?;
        let r = self.response(Command::ConnectShim).await;
        let excused = self.excused();
        self.soak
            .reply(&format!("{}: ConnectShim", self.vm.cid), &r, true, excused);
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(m)) => Err(m),
            Err(e) => Err(e),
        }
    }

    async fn send(&mut self, b: &[u8]) -> Result<(), String> {
        let Some(c) = self.conn.as_mut() else {
            return Err("not connected".into());
        };
        c.wr.write_all(b).await.map_err(|e| format!("write: {e}"))
    }

    /// The next event that is not output (output is checked by the reader).
    async fn event(&mut self, step: &str) -> Result<Ev, String> {
        match tokio::time::timeout(REPLY_TIMEOUT * 2, self.ev.recv()).await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err("the reader is gone".into()),
            Err(_) => Err(format!(
                "nothing from the daemon within {:?} while waiting for {step}",
                REPLY_TIMEOUT * 2
            )),
        }
    }

    /// Wait for the response to `cmd`; an exit code on the way is kept.
    async fn response(&mut self, cmd: Command) -> Result<wire::Reply, String> {
        loop {
            match self.event(cmd.name()).await? {
                Ev::Response(c, r) if c == cmd => return Ok(r),
                Ev::Response(c, _) => {
                    return Err(format!(
                        "a {} response while waiting for {}",
                        c.name(),
                        cmd.name()
                    ))
                }
                Ev::Exited(code) => self.exited = Some(code),
                Ev::End(why) => {
                    self.ended = true;
                    return Err(format!(
                        "the connection ended while waiting for {}{}",
                        cmd.name(),
                        why.map(|w| format!(": {w}")).unwrap_or_default()
                    ));
                }
            }
        }
    }

    async fn reconnect(&mut self) -> Result<(), String> {
        if let Some(c) = self.conn.take() {
            c.cut().await;
        }
        // Whatever the old connection's reader had not reported is moot.
        while let Ok(ev) = self.ev.try_recv() {
            if let Ev::Exited(code) = ev {
                self.exited = Some(code);
            }
        }
        {
            let mut r = self.recv.lock().expect("recv");
            r.out.gap_allowed = true;
            r.err.gap_allowed = true;
        }
        self.soak.stats.reconnects.add(1);
        self.connect().await
    }
}

/// One process: token, ConnectShim, Hyper, stdin/signals/pauses/
/// reconnects, EOF, the exit code, the checks, DisconnectShim.
async fn session(
    soak: &Arc<Soak>,
    vm: &Arc<VmState>,
    epoch: u64,
    first: Option<String>,
    rng: &mut Rng,
) {
    let sid = soak.new_sid();
    let out_len = 8 * pick_len(rng, 64 * 1024);
    let err_len = 8 * pick_len(rng, 4 * 1024);
    let in_len = 8 * pick_len(rng, 16 * 1024);
    let code = rng.below(256) as u8;
    let sess = Arc::new(Sess::new(sid, out_len, err_len, code));
    soak.sessions
        .lock()
        .expect("sessions")
        .insert(sid, sess.clone());
    let ok = session_inner(soak, vm, epoch, first, rng, &sess, in_len).await;
    soak.sessions.lock().expect("sessions").remove(&sid);
    if ok {
        soak.stats.sessions_done.add(1);
    } else {
        soak.stats.sessions_aborted.add(1);
    }
}

/// A length in words: often small, sometimes up to `max_words`.
fn pick_len(rng: &mut Rng, max_words: u64) -> u64 {
    match rng.below(10) {
        0 => 0,
        1..=6 => rng.below(max_words / 16 + 1),
        _ => rng.below(max_words + 1),
    }
}

/// False when the session was cut by a fault of its VM.
async fn session_inner(
    soak: &Arc<Soak>,
    vm: &Arc<VmState>,
    epoch: u64,
    first: Option<String>,
    rng: &mut Rng,
    sess: &Arc<Sess>,
    in_len: u64,
) -> bool {
    let excused = || vm.excused(epoch);
    // The runtime's connection: AttachVM (for a token, unless the slot
    // has one from RegisterVM), then the Hyper that starts the process.
    let mut rt = match Rt::connect(&soak.socket).await {
        Ok(rt) => rt,
        Err(e) => {
            soak.check(false, || e);
            return false;
        }
    };
    let want = u32::from(first.is_none());
    let r = rt
        .call(
            Command::AttachVm,
            &json!({ "containerId": vm.cid, "numIOStreams": want }),
        )
        .await;
    soak.reply(&format!("{}: AttachVM", vm.cid), &r, true, excused());
    let Ok(Ok(p)) = r else { return false };
    let v: serde_json::Value = serde_json::from_slice(&p).unwrap_or_default();
    let got: Vec<String> = v["io"]["tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    soak.check(got.len() == want as usize || excused(), || {
        format!("{}: AttachVM for {want} tokens gave {v}", vm.cid)
    });
    let Some(token) = first.or_else(|| got.into_iter().next()) else {
        return false;
    };

    let (ev_tx, ev) = mpsc::unbounded_channel();
    let mut shim = Shim {
        soak,
        vm,
        epoch,
        token,
        conn: None,
        ev_tx,
        ev,
        recv: Arc::new(Mutex::new(Recv {
            out: RecvCheck::new(sess.sid, Which::Stdout),
            err: RecvCheck::new(sess.sid, Which::Stderr),
        })),
        pause: Arc::new(AtomicU64::new(0)),
        exited: None,
        ended: false,
    };
    if shim.connect().await.is_err() {
        return false;
    }

    // Stdin: pieces of whole words; the first maybe before the process
    // starts (the daemon keeps it until then).
    let mut in_off = 0u64;
    let mut in_hash = crate::hash::Xxh64::new(0);
    let next_piece = |rng: &mut Rng, in_off: &mut u64| -> Vec<u8> {
        let left = in_len - *in_off;
        let len = (8 * (1 + rng.below(4096))).min(left);
        let d = fill(sess.sid, Which::Stdin, *in_off, len as usize);
        *in_off += len;
        d
    };
    if in_len > 0 && rng.pct(20) {
        let d = next_piece(rng, &mut in_off);
        in_hash.update(&d);
        soak.stats.stdin_sent.add(d.len() as u64);
        if shim.send(&wire::stdin(&d)).await.is_err() {
            return aborted(soak, &shim, "early stdin");
        }
    }
    // newcontainer names its container (`id`): signals become
    // KILLCONTAINER. An execcmd process has no container id of its own:
    // only SIGWINCH reaches it, other signals are refused.
    let by_exec = rng.pct(50);
    {
        let _g = vm.gate.read().await;
        let process = json!({ "args": ["soak", sess.sid.to_string()], "terminal": false });
        let (name, data) = if by_exec {
            (
                "execcmd",
                json!({ "container": format!("ctr-{}", sess.sid), "process": process }),
            )
        } else {
            (
                "newcontainer",
                json!({ "id": format!("ctr-{}", sess.sid), "process": process }),
            )
        };
        let r = rt
            .call(
                Command::Hyper,
                &json!({ "hyperName": name, "tokens": [shim.token], "data": data }),
            )
            .await;
        soak.reply(&format!("{}: Hyper {name}", vm.cid), &r, true, excused());
        if !matches!(r, Ok(Ok(_))) {
            return aborted(soak, &shim, "Hyper");
        }
    }
    drop(rt);

    let reconnects = if rng.pct(soak.reconnect_pct) {
        1 + rng.below(2)
    } else {
        0
    };
    let mut reconnected = 0;
    let mut pieces = 0u64;
    while in_off < in_len || pieces == 0 {
        pieces += 1;
        if in_off < in_len {
            let d = next_piece(rng, &mut in_off);
            in_hash.update(&d);
            soak.stats.stdin_sent.add(d.len() as u64);
            if shim.send(&wire::stdin(&d)).await.is_err() {
                return aborted(soak, &shim, "stdin");
            }
        }
        if rng.pct(4) {
            shim.pause.store(100 + rng.below(500), Ordering::Relaxed);
            soak.stats.pauses.add(1);
        }
        if rng.pct(5) {
            let _g = vm.gate.read().await;
            let winch = rng.pct(50);
            let p = if winch {
                json!({ "signalNumber": 28, "rows": 1 + rng.below(200), "columns": 1 + rng.below(300) })
            } else {
                {
                    let sig = [1, 10, 12, 15][rng.below(4) as usize];
                    json!({ "signalNumber": sig })
                }
            };
            soak.stats.signals.add(1);
            if shim
                .send(&wire::command(Command::Signal, &p))
                .await
                .is_err()
            {
                return aborted(soak, &shim, "Signal");
            }
            let r = shim.response(Command::Signal).await;
            let want_ok = winch || !by_exec;
            let what = format!(
                "{}: Signal {p} to an {} process",
                vm.cid,
                if by_exec { "execcmd" } else { "newcontainer" }
            );
            soak.reply(&what, &r, want_ok, excused());
            if r.is_err() || (want_ok && !matches!(r, Ok(Ok(_)))) {
                return aborted(soak, &shim, "Signal");
            }
        }
        if reconnected < reconnects && rng.pct(30) {
            reconnected += 1;
            sess.stdin_recv.lock().expect("stdin").gap_allowed = true;
            if shim.reconnect().await.is_err() {
                return aborted(soak, &shim, "reconnect");
            }
        }
        if pieces % 8 == 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
        }
    }
    // EOF, then the exit code.
    if shim.send(&wire::stdin(&[])).await.is_err() {
        return aborted(soak, &shim, "EOF");
    }
    let early = shim.exited.take();
    let code = match early {
        Some(c) => c,
        None => match shim.event("the exit code").await {
            Ok(Ev::Exited(c)) => c,
            Ok(Ev::Response(c, r)) => {
                soak.check(false, || {
                    format!("{}: an unasked {} response {r:?}", vm.cid, c.name())
                });
                return false;
            }
            Ok(Ev::End(why)) => {
                soak.check(excused(), || {
                    format!(
                        "{}: session {} ended without its exit code{}",
                        vm.cid,
                        sess.sid,
                        why.map(|w| format!(": {w}")).unwrap_or_default()
                    )
                });
                return false;
            }
            Err(e) => {
                soak.check(excused(), || {
                    format!("{}: session {}: {e}", vm.cid, sess.sid)
                });
                return false;
            }
        },
    };
    soak.check(code == sess.code, || {
        format!(
            "{}: session {} exit code {code}, want {}",
            vm.cid, sess.sid, sess.code
        )
    });
    // The exit code comes after all output: the streams are complete.
    // Give the reader a moment to finish the frames before the exit.
    tokio::task::yield_now().await;
    let (out, err) = {
        let r = shim.recv.lock().expect("recv");
        (r.out.clone(), r.err.clone())
    };
    let stdin = sess.stdin_recv.lock().expect("stdin").clone();
    let (out_sent, err_sent) = {
        let s = sess.sent.lock().expect("sent");
        (s.0.finish(), s.1.finish())
    };
    let mut in_h = crate::hash::Xxh64::new(0);
    std::mem::swap(&mut in_h, &mut in_hash);
    let in_sent = in_h.finish();
    for (mut c, sent_digest) in [(out, out_sent), (err, err_sent), (stdin, in_sent)] {
        c.finish(sent_digest.len);
        soak.stats.duplicated_bytes.add(c.duplicated);
        soak.check(c.failure.is_none(), || {
            c.failure.clone().unwrap_or_default()
        });
        soak.check(c.next <= sent_digest.len, || {
            format!(
                "{}: session {}: stream at {} of {} bytes",
                vm.cid, sess.sid, c.next, sent_digest.len
            )
        });
        // Lost at a reconnect: a gap, or the tail (in the dead socket,
        // with nothing after it).
        let tail = sent_digest.len.saturating_sub(c.next);
        soak.stats
            .lost_bytes
            .add(c.lost + if reconnected > 0 { tail } else { 0 });
        if c.duplicated == 0 && (reconnected == 0 || (c.gaps == 0 && tail == 0)) {
            // Nothing lost: every byte arrived, and the hashes agree.
            soak.check(c.hash.finish() == sent_digest, || {
                format!(
                    "{}: session {}: received {} (want {sent_digest}){}",
                    vm.cid,
                    sess.sid,
                    c.hash.finish(),
                    if reconnected > 0 {
                        " after a reconnect"
                    } else {
                        ""
                    }
                )
            });
        }
    }
    // Done: usually DisconnectShim (the daemon closes, no response).
    if rng.pct(85)
        && shim
            .send(&wire::command(Command::DisconnectShim, &json!({})))
            .await
            .is_ok()
    {
        soak.stats.commands.add(1);
        let r = shim.event("the close after DisconnectShim").await;
        soak.check(matches!(r, Ok(Ev::End(None))) || excused(), || {
            format!(
                "{}: after DisconnectShim, {r:?} instead of the connection closing",
                vm.cid
            )
        });
    }
    if let Some(c) = shim.conn.take() {
        c.cut().await;
    }
    true
}

/// The session ended early: fine if its VM is being faulted.
fn aborted(soak: &Soak, shim: &Shim<'_>, at: &str) -> bool {
    soak.check(shim.excused(), || {
        format!(
            "{}: session cut at {at} with no fault of its VM",
            shim.vm.cid
        )
    });
    false
}
