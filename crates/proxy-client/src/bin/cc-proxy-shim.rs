//! `cc-proxy-shim`: a drop-in replacement of Clear Containers' `cc-shim`.
//!
//! The runtime starts one per container process, in place of the process,
//! with the process's I/O token:
//!
//! ```text
//! cc-proxy-shim -c <container id> -t <token> -u unix:///run/cc-proxy/proxy.sock
//! ```
//!
//! It claims the token, copies its own stdin to the process (EOF included)
//! and the process's stdout and stderr to its own, forwards the signals it
//! gets (SIGWINCH as the terminal's size when stdin is a terminal, which it
//! puts in raw mode meanwhile), reconnects when the proxy connection drops
//! (every 100 ms for up to 10 s), and exits with the process's exit code.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{ArgAction, Parser};
use nix::sys::signal::Signal as Sig;
use nix::sys::termios::{self, SetArg, Termios};
use proxy_client::{Error, ProxyAddr, ReconnectPolicy, Shim, ShimEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Signals forwarded to the process, as cc-shim does (SIGWINCH is handled
/// apart; SIGKILL and SIGSTOP cannot be caught).
const FORWARDED: [Sig; 11] = [
    Sig::SIGHUP,
    Sig::SIGINT,
    Sig::SIGQUIT,
    Sig::SIGUSR1,
    Sig::SIGUSR2,
    Sig::SIGALRM,
    Sig::SIGTERM,
    Sig::SIGCONT,
    Sig::SIGTSTP,
    Sig::SIGTTIN,
    Sig::SIGTTOU,
];

/// How long to keep retrying while the proxy is unreachable.
const RECONNECT: ReconnectPolicy = ReconnectPolicy {
    interval: Duration::from_millis(100),
    total: Duration::from_secs(10),
};

#[derive(Debug, Parser)]
#[command(
    name = "cc-proxy-shim",
    version,
    disable_version_flag = true,
    about = "Stand in for a container process on the host: pipe its stdio, signals and exit code through cc-proxy",
    long_about = "Stand in for a container process on the host: claim the process's I/O token \
                  from cc-proxy, copy this program's stdin to the process and its stdout and \
                  stderr back, forward signals (and the terminal size when stdin is a terminal), \
                  and exit with the process's exit code. A drop-in replacement of Clear \
                  Containers' cc-shim; the flags are the same."
)]
pub(crate) struct Args {
    // Values may start with '-' (as getopt allows for cc-shim): a token is
    // base64url, and one in 64 begins with '-'.
    /// The container the process belongs to (for log messages).
    #[arg(
        short = 'c',
        long = "container-id",
        value_name = "ID",
        allow_hyphen_values = true
    )]
    container_id: String,
    /// The process's I/O token, as the proxy handed it to the runtime.
    #[arg(short = 't', long, value_name = "TOKEN", allow_hyphen_values = true)]
    token: String,
    /// The proxy's socket: unix:///path (or a plain path).
    #[arg(short = 'u', long, value_name = "URI", allow_hyphen_values = true)]
    uri: String,
    /// Print what happens on stderr.
    #[arg(short = 'd', long)]
    debug: bool,
    /// Print the version.
    #[arg(short = 'v', long, action = ArgAction::Version)]
    version: Option<bool>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cc-proxy-shim: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(&args));
    // Whatever happened, the terminal is given back (Raw's drop) before
    // exiting; the stdin reader thread may still block, so do not wait for
    // the runtime.
    match result {
        Ok(code) => std::process::exit(code.into()),
        Err(e) => {
            eprintln!("cc-proxy-shim [{}]: {e}", args.container_id);
            std::process::exit(1)
        }
    }
}

macro_rules! debug {
    ($args:expr, $($t:tt)*) => {
        if $args.debug {
            eprintln!("cc-proxy-shim [{}]: {}", $args.container_id, format_args!($($t)*));
        }
    };
}

async fn run(args: &Args) -> Result<u8, Error> {
    let addr: ProxyAddr = args.uri.parse()?;
    if args.token.is_empty() {
        return Err(Error::InvalidArgument("the token (-t) is empty".into()));
    }
    // Catch the signals before anything else: one that comes while
    // connecting is forwarded once connected, not fatal to the shim.
    let mut caught = Vec::with_capacity(FORWARDED.len());
    for sig in FORWARDED {
        let stream = signal(SignalKind::from_raw(sig as i32))
            .map_err(|e| Error::InvalidArgument(format!("cannot catch {sig}: {e}")))?;
        caught.push((sig, stream));
    }
    let winch = signal(SignalKind::window_change())
        .map_err(|e| Error::InvalidArgument(format!("cannot catch SIGWINCH: {e}")))?;

    let (shim, mut events) = connect(&addr, &args.token).await?;
    debug!(args, "connected to {addr} with token {}", args.token);

    let tty = std::io::stdin().is_terminal();
    let _raw = if tty { Raw::enter() } else { None };
    if tty {
        if let Some((rows, cols)) = window_size() {
            let shim = shim.clone();
            tokio::spawn(async move { shim.resize(rows, cols).await });
        }
    }
    tokio::spawn(pump_stdin(shim.clone()));
    for (sig, stream) in caught {
        forward(&shim, sig, stream, args.debug);
    }
    if tty {
        resize_on_sigwinch(&shim, winch);
    }

    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        match events.recv().await {
            Ok(ShimEvent::Stdout(b)) => {
                // A closed stdout must not stop the process's other stream
                // or its exit code from arriving.
                if stdout.write_all(&b).await.is_ok() {
                    let _ = stdout.flush().await;
                }
            }
            Ok(ShimEvent::Stderr(b)) => {
                if stderr.write_all(&b).await.is_ok() {
                    let _ = stderr.flush().await;
                }
            }
            Ok(ShimEvent::Exited(code)) => {
                debug!(args, "the process exited with {code}");
                return Ok(code);
            }
            Err(e) if e.is_connection() && e != Error::Closed => {
                debug!(args, "{e}; reconnecting");
                shim.reconnect(RECONNECT).await?;
                debug!(args, "reconnected");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connect, retrying while the proxy is not there (it may be restarting).
async fn connect(addr: &ProxyAddr, token: &str) -> Result<(Shim, proxy_client::ShimEvents), Error> {
    let deadline = Instant::now() + RECONNECT.total;
    loop {
        match Shim::connect(addr, token).await {
            Ok(s) => return Ok(s),
            Err(e) if e.is_connection() && Instant::now() + RECONNECT.interval < deadline => {
                tokio::time::sleep(RECONNECT.interval).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Copy this program's stdin to the process; EOF becomes the zero-length
/// frame. While the connection is down, wait for the reconnect and resend.
async fn pump_stdin(shim: Shim) {
    let mut stdin = tokio::io::stdin();
    let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
    loop {
        buf.reserve(64 * 1024);
        let eof = match stdin.read_buf(&mut buf).await {
            Ok(0) | Err(_) => true,
            Ok(_) => false,
        };
        let chunk = buf.split().freeze();
        let deadline = Instant::now() + RECONNECT.total + Duration::from_secs(1);
        loop {
            let sent = if eof {
                shim.close_stdin().await
            } else {
                shim.send_stdin(chunk.clone()).await
            };
            match sent {
                Ok(()) => break,
                Err(e) if e.is_connection() && e != Error::Closed && Instant::now() < deadline => {
                    tokio::time::sleep(RECONNECT.interval).await
                }
                Err(_) => return,
            }
        }
        if eof {
            return;
        }
    }
}

fn forward(shim: &Shim, sig: Sig, mut stream: Signal, debug: bool) {
    let n = sig as i32;
    let shim = shim.clone();
    tokio::spawn(async move {
        while stream.recv().await.is_some() {
            let shim = shim.clone();
            // Each in its own task: the proxy may hold a signal until the
            // process has started.
            tokio::spawn(async move {
                if let Err(e) = shim.signal(n).await {
                    if debug {
                        eprintln!("cc-proxy-shim: forwarding {sig}: {e}");
                    }
                }
            });
        }
    });
}

fn resize_on_sigwinch(shim: &Shim, mut stream: Signal) {
    let shim = shim.clone();
    tokio::spawn(async move {
        while stream.recv().await.is_some() {
            if let Some((rows, cols)) = window_size() {
                let shim = shim.clone();
                tokio::spawn(async move { shim.resize(rows, cols).await });
            }
        }
    });
}

/// The terminal's (rows, columns), from stdin.
fn window_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` through the pointer,
    // which points to a live, properly aligned `libc::winsize`; fd 0 is
    // only read from.
    let r = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// stdin's terminal in raw mode, restored on drop.
struct Raw {
    saved: Termios,
}

impl Raw {
    fn enter() -> Option<Raw> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Raw { saved })
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}
