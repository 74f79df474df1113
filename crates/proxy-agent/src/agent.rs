//! The agent proper: READY, then one ctl command at a time, each answered
//! by ACK or ERROR; stdin from the io channel routed to processes by seq.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use proxy_proto::hyper::ctl::{Code, CtlHeader, CTL_HEADER_LEN};
use proxy_proto::hyper::io::{IoHeader, IO_HEADER_LEN};
use proxy_proto::hyper::types::{
    Container, ExecCommand, KillCommand, Process, RemoveContainer, WindowSize,
};
use proxy_proto::hyper::MAX_MESSAGE_LEN;

use crate::channel::{Channels, Reader, Writer};
use crate::process::{self, IoWriter, Running};
use crate::{log, Mode};

/// hyperstart's API version, the `version` reply (4 bytes, big endian).
pub const API_VERSION: u32 = 4242;

/// A process the agent started.
#[derive(Debug)]
struct Proc {
    running: Running,
    stdio: u64,
    exited: bool,
}

/// Everything the ctl and io threads share.
#[derive(Debug, Default)]
struct State {
    /// Container id → its init process.
    containers: HashMap<String, u64>,
    /// Process id → process.
    procs: HashMap<u64, Proc>,
    /// stdio seq → the latest live process using it (stdin, winsize).
    by_seq: HashMap<u64, u64>,
}

#[derive(Debug)]
struct Agent {
    state: Arc<Mutex<State>>,
    io: IoWriter,
    next_id: AtomicU64,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// What a command asks the loop to do after its reply.
enum After {
    Continue,
    Destroy,
}

/// Serve `ch` until destroypod or until ctl goes away.
pub fn run(ch: Channels, mode: Mode) -> io::Result<()> {
    let Channels {
        mut ctl_r,
        mut ctl_w,
        io_r,
        io_w,
    } = ch;
    let agent = Arc::new(Agent {
        state: Arc::default(),
        io: IoWriter::new(io_w),
        next_id: AtomicU64::new(1),
    });
    {
        let agent = agent.clone();
        thread::spawn(move || agent.read_io(io_r));
    }
    write_ctl(&mut ctl_w, Code::Ready, &[])?;
    log!("READY");
    loop {
        let (code, payload) = match read_ctl(&mut ctl_r, &mut ctl_w)? {
            Some(m) => m,
            None => {
                log!("ctl closed");
                agent.kill_all();
                return Ok(());
            }
        };
        let (reply, after) = agent.handle(code, &payload);
        match reply {
            Ok(ack) => write_ctl(&mut ctl_w, Code::Ack, &ack)?,
            Err(msg) => {
                log!("error: {msg}");
                write_ctl(&mut ctl_w, Code::Error, msg.as_bytes())?;
            }
        }
        if let After::Destroy = after {
            agent.kill_all();
            if mode == Mode::Host {
                log!("pod destroyed");
            }
            return Ok(());
        }
    }
}

fn write_ctl(w: &mut Writer, code: Code, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(CTL_HEADER_LEN + payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ctl reply too large"))?;
    let mut msg = Vec::with_capacity(CTL_HEADER_LEN + payload.len());
    msg.extend_from_slice(
        &CtlHeader {
            code: code as u32,
            len,
        }
        .to_bytes(),
    );
    msg.extend_from_slice(payload);
    w.write_all(&msg)?;
    w.flush()
}

/// One ctl message, or `None` at a clean end of the channel. A message over
/// the agent's buffer is skipped and answered with ERROR here.
fn read_ctl(r: &mut Reader, w: &mut Writer) -> io::Result<Option<(u32, Vec<u8>)>> {
    loop {
        let mut h = [0u8; CTL_HEADER_LEN];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let h = CtlHeader::parse(&h);
        let len = h.len as usize;
        if len < CTL_HEADER_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ctl message length {len} is shorter than its header"),
            ));
        }
        let body = len - CTL_HEADER_LEN;
        if len > MAX_MESSAGE_LEN {
            io::copy(&mut r.by_ref().take(body as u64), &mut io::sink())?;
            let msg = format!("ctl message of {len} bytes exceeds {MAX_MESSAGE_LEN}");
            log!("{msg}");
            write_ctl(w, Code::Error, msg.as_bytes())?;
            continue;
        }
        let mut payload = vec![0u8; body];
        r.read_exact(&mut payload)?;
        return Ok(Some((h.code, payload)));
    }
}

fn parse<'a, T: serde::Deserialize<'a>>(what: &str, payload: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| format!("{what}: bad payload: {e}"))
}

impl Agent {
    fn handle(&self, code: u32, payload: &[u8]) -> (Result<Vec<u8>, String>, After) {
        let Some(c) = Code::from_u32(code) else {
            return (Err(format!("unknown command code {code}")), After::Continue);
        };
        let r = match c {
            Code::Version => Ok(API_VERSION.to_be_bytes().to_vec()),
            Code::StartPod | Code::Ping => Ok(Vec::new()),
            Code::DestroyPod => return (Ok(Vec::new()), After::Destroy),
            Code::NewContainer => {
                parse::<Container>("newcontainer", payload).and_then(|c| self.new_container(c))
            }
            Code::ExecCmd => parse::<ExecCommand>("execcmd", payload).and_then(|e| self.exec(e)),
            Code::KillContainer => {
                parse::<KillCommand>("killcontainer", payload).and_then(|k| self.kill(k))
            }
            Code::WinSize => parse::<WindowSize>("winsize", payload).and_then(|w| self.winsize(w)),
            Code::RemoveContainer => {
                parse::<RemoveContainer>("removecontainer", payload).and_then(|r| self.remove(r))
            }
            other => Err(format!("unsupported command {}", other.name())),
        };
        (r, After::Continue)
    }

    fn new_container(&self, c: Container) -> Result<Vec<u8>, String> {
        if c.id.is_empty() {
            return Err("newcontainer: empty container id".into());
        }
        if lock(&self.state).containers.contains_key(&c.id) {
            return Err(format!("newcontainer: container {} exists", c.id));
        }
        let id = self.start(&c.process, &format!("newcontainer {}", c.id))?;
        lock(&self.state).containers.insert(c.id, id);
        Ok(Vec::new())
    }

    fn exec(&self, e: ExecCommand) -> Result<Vec<u8>, String> {
        if !lock(&self.state).containers.contains_key(&e.container) {
            return Err(format!("execcmd: no container {}", e.container));
        }
        self.start(&e.process, &format!("execcmd in {}", e.container))?;
        Ok(Vec::new())
    }

    /// Spawn `p` and register it; its exit unregisters its stdin route.
    fn start(&self, p: &Process, what: &str) -> Result<u64, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = self.state.clone();
        // Hold the lock over the spawn so that a process exiting at once
        // finds itself registered.
        let mut st = lock(&self.state);
        let running = process::spawn(p, self.io.clone(), move |_code| {
            let mut st = lock(&state);
            let seq = st.procs.get_mut(&id).map(|p| {
                p.exited = true;
                p.stdio
            });
            if let Some(seq) = seq {
                if st.by_seq.get(&seq) == Some(&id) {
                    st.by_seq.remove(&seq);
                }
            }
            // Exec'd processes are forgotten; a container's init stays
            // until removecontainer.
            if !st.containers.values().any(|v| *v == id) {
                st.procs.remove(&id);
            }
        })
        .map_err(|e| format!("{what}: cannot start {:?}: {e}", p.args))?;
        log!("{what}: pid {} {:?}", running.pid, p.args);
        st.by_seq.insert(p.stdio, id);
        st.procs.insert(
            id,
            Proc {
                running,
                stdio: p.stdio,
                exited: false,
            },
        );
        Ok(id)
    }

    fn kill(&self, k: KillCommand) -> Result<Vec<u8>, String> {
        let st = lock(&self.state);
        let proc = st
            .containers
            .get(&k.container)
            .and_then(|id| st.procs.get(id))
            .ok_or_else(|| format!("killcontainer: no container {}", k.container))?;
        if proc.exited {
            return Ok(Vec::new());
        }
        let sig = if k.signal == 0 {
            None
        } else {
            Some(
                Signal::try_from(k.signal)
                    .map_err(|e| format!("killcontainer: signal {}: {e}", k.signal))?,
            )
        };
        let pid = Pid::from_raw(proc.running.pid);
        let r = if k.all_processes {
            killpg(pid, sig)
        } else {
            kill(pid, sig)
        };
        match r {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(Vec::new()),
            Err(e) => Err(format!("killcontainer {}: {e}", k.container)),
        }
    }

    fn winsize(&self, w: WindowSize) -> Result<Vec<u8>, String> {
        let st = lock(&self.state);
        let pty = st
            .by_seq
            .get(&w.seq)
            .and_then(|id| st.procs.get(id))
            .and_then(|p| p.running.pty.clone())
            .ok_or_else(|| format!("winsize: no terminal process on seq {}", w.seq))?;
        drop(st);
        process::set_winsize(&pty, w.row, w.column).map_err(|e| format!("winsize: {e}"))?;
        Ok(Vec::new())
    }

    fn remove(&self, r: RemoveContainer) -> Result<Vec<u8>, String> {
        let mut st = lock(&self.state);
        let id = st
            .containers
            .remove(&r.container)
            .ok_or_else(|| format!("removecontainer: no container {}", r.container))?;
        if let Some(p) = st.procs.get(&id) {
            if p.exited {
                st.procs.remove(&id);
            } else {
                let _ = killpg(Pid::from_raw(p.running.pid), Signal::SIGKILL);
            }
        }
        Ok(Vec::new())
    }

    /// SIGKILL every live process group, then give their exit reports a
    /// moment to reach the io channel.
    fn kill_all(&self) {
        {
            let st = lock(&self.state);
            for p in st.procs.values().filter(|p| !p.exited) {
                let _ = killpg(Pid::from_raw(p.running.pid), Signal::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && lock(&self.state).procs.values().any(|p| !p.exited) {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Route stdin: data for a stdio seq goes to its process; an empty
    /// message closes that process's stdin.
    fn read_io(&self, mut r: Reader) {
        loop {
            let mut h = [0u8; IO_HEADER_LEN];
            if let Err(e) = r.read_exact(&mut h) {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    log!("io read: {e}");
                }
                return;
            }
            let h = IoHeader::parse(&h);
            let len = h.len as usize;
            if !(IO_HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
                log!("io message of {len} bytes (seq {}): giving up on io", h.seq);
                return;
            }
            let mut data = vec![0u8; len - IO_HEADER_LEN];
            if let Err(e) = r.read_exact(&mut data) {
                log!("io read: {e}");
                return;
            }
            let st = lock(&self.state);
            let Some(p) = st.by_seq.get(&h.seq).and_then(|id| st.procs.get(id)) else {
                continue;
            };
            debug_assert_eq!(p.stdio, h.seq);
            let _ = p.running.stdin.send(data);
        }
    }
}
