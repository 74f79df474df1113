//! Running one process: spawn it (in a pty or with pipes), pump its output
//! onto the io channel, feed it stdin, and report its end.
//!
//! The end of a process on the io channel is, in this order: every byte of
//! its output, an empty message on its stdio seq (and on its stderr seq),
//! then one byte on its stdio seq carrying the exit code.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use nix::pty::openpty;
use proxy_proto::hyper::io::{IoHeader, MAX_IO_DATA};
use proxy_proto::hyper::types::Process;

use crate::channel::Writer;
use crate::log;

/// The io channel's writing half, shared by every output pump. One message
/// is written under the lock, so messages never interleave.
#[derive(Clone)]
pub struct IoWriter(Arc<Mutex<Writer>>);

impl std::fmt::Debug for IoWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoWriter")
    }
}

impl IoWriter {
    /// Share `w`.
    pub fn new(w: Writer) -> Self {
        Self(Arc::new(Mutex::new(w)))
    }

    /// Send `data` (at most [`MAX_IO_DATA`] bytes; empty = EOF) on `seq`.
    /// Seq 0 is nobody's: nothing is sent.
    pub fn send(&self, seq: u64, data: &[u8]) {
        if seq == 0 {
            return;
        }
        debug_assert!(data.len() <= MAX_IO_DATA);
        let mut msg = Vec::with_capacity(12 + data.len());
        msg.extend_from_slice(&IoHeader::for_data(seq, data.len()).to_bytes());
        msg.extend_from_slice(data);
        let mut w = match self.0.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = w.write_all(&msg).and_then(|()| w.flush()) {
            log!("io write (seq {seq}): {e}");
        }
    }
}

/// What the agent keeps of a running process.
#[derive(Debug)]
pub struct Running {
    /// Its pid, also its process group and session id.
    pub pid: i32,
    /// Stdin: data to write, an empty vector closes it.
    pub stdin: Sender<Vec<u8>>,
    /// The pty master, when it has a terminal.
    pub pty: Option<Arc<OwnedFd>>,
}

/// Spawn `p`; `on_exit(exit_code)` runs once its output is flushed and its
/// end reported on io.
pub fn spawn(
    p: &Process,
    io: IoWriter,
    on_exit: impl FnOnce(u8) + Send + 'static,
) -> io::Result<Running> {
    let Some((prog, rest)) = p.args.split_first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "process.args is empty",
        ));
    };
    let mut cmd = Command::new(prog);
    cmd.args(rest).env_clear();
    let mut has_path = false;
    for e in &p.envs {
        if e.env.is_empty() || e.env.contains('=') {
            continue;
        }
        has_path |= e.env == "PATH";
        cmd.env(&e.env, &e.value);
    }
    if !has_path {
        cmd.env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin");
    }
    if !p.workdir.is_empty() {
        cmd.current_dir(&p.workdir);
    }

    let stdio_seq = p.stdio;
    // Without a terminal and without a stderr seq, stderr joins stdout.
    let stderr_seq = if p.stderr != 0 { p.stderr } else { p.stdio };
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>();

    let (child, pty) = if p.terminal {
        let pty = openpty(None, None).map_err(io::Error::from)?;
        let slave = pty.slave;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls (setsid, ioctl).
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                set_controlling_tty()
            });
        }
        let child = cmd.spawn()?;
        // The parent's copies of the slave are gone with `cmd`: the master
        // reads EIO once the process (and its children) closed theirs.
        drop(cmd);
        let master = Arc::new(pty.master);
        let reader = File::from(master.try_clone()?);
        let writer = File::from(master.try_clone()?);
        pumps.push(pump(reader, stdio_seq, io.clone()));
        thread::spawn(move || feed_stdin(writer, stdin_rx, true));
        (child, Some(master))
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setsid, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        drop(cmd);
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, stdio_seq, io.clone()));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, stderr_seq, io.clone()));
        }
        if let Some(stdin) = child.stdin.take() {
            thread::spawn(move || feed_stdin(stdin, stdin_rx, false));
        }
        (child, None)
    };
    let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
    thread::spawn(move || {
        let code = wait(child);
        for p in pumps {
            let _ = p.join();
        }
        io.send(stdio_seq, &[]);
        if stderr_seq != stdio_seq {
            io.send(stderr_seq, &[]);
        }
        io.send(stdio_seq, &[code]);
        on_exit(code);
    });
    Ok(Running {
        pid,
        stdin: stdin_tx,
        pty,
    })
}

/// Make stdin (the pty slave) the controlling terminal of the new session.
fn set_controlling_tty() -> io::Result<()> {
    // SAFETY: TIOCSCTTY on fd 0 takes an int argument, no pointer.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The exit code hyperstart reports: the status, or 128 + the signal.
fn wait(mut child: Child) -> u8 {
    match child.wait() {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => (c & 0xff) as u8,
            (None, Some(sig)) => (128 + sig) as u8,
            (None, None) => 255,
        },
        Err(e) => {
            log!("wait for pid {}: {e}", child.id());
            255
        }
    }
}

/// Read `r` until EOF (or EIO, a pty's end) into messages on `seq`.
fn pump(mut r: impl Read + Send + 'static, seq: u64, io: IoWriter) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; MAX_IO_DATA];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => io.send(seq, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO: the pty's slave side is closed everywhere.
                Err(_) => return,
            }
        }
    })
}

/// Write what arrives for stdin; an empty message is the end of input
/// (closes the pipe, or types the EOF character on a terminal).
fn feed_stdin(mut w: impl Write + AsFd, rx: Receiver<Vec<u8>>, terminal: bool) {
    for data in rx {
        let r = if !data.is_empty() {
            w.write_all(&data)
        } else if terminal {
            let eof = nix::sys::termios::tcgetattr(w.as_fd())
                .map(|t| t.control_chars[libc::VEOF])
                .unwrap_or(4);
            w.write_all(&[eof])
        } else {
            // Dropping the pipe is the process's EOF; later stdin for this
            // seq finds the channel closed and is dropped.
            return;
        };
        if r.is_err() {
            // The process closed its stdin or is gone.
            return;
        }
    }
}

/// Set the terminal size of a pty (TIOCSWINSZ).
pub fn set_winsize(master: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a `struct winsize` through the pointer, which
    // is valid for the call; the descriptor is open (borrowed).
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
