//! The command line: the reference's Go-style flags (`-socket-path PATH`,
//! `-log=debug`) and double-dash ones, plus this daemon's own options.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// The default listening socket in system mode.
pub const DEFAULT_SOCKET_PATH: &str = "/run/cc-proxy/proxy.sock";

/// Printed after the options in `--help`.
const AFTER_HELP: &str = "\
Every long option may also be spelled with one dash, as the Go cc-proxy's
flags are: -socket-path PATH, -uri URI, -log LEVEL, -ksm MODE, -version
(and -log=debug, -ksm=off).

Socket activation: started by systemd (or systemd-socket-activate) with a
listening socket in LISTEN_FDS, cc-proxy serves that socket instead of
binding one. See docs/CONFIGURATION.md and docs/OPERATIONS.md.";

/// KSM throttling mode (docs/PROTOCOL.md §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KsmMode {
    /// Turn KSM off.
    Off,
    /// Leave the host's settings alone.
    Initial,
    /// Kick KSM on each RegisterVM, then slow it down.
    Auto,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Plain text, one event per line (journald-friendly).
    Plain,
    /// One JSON object per line.
    Json,
}

/// cc-proxy: routes VM agent control and container I/O between runtimes,
/// shims and hyperstart agents.
#[derive(Debug, Clone, Parser)]
#[command(name = "cc-proxy", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Config {
    /// Path of the listening unix socket (system mode); its directory must
    /// exist (only the default's is created) [default: /run/cc-proxy/proxy.sock]
    #[arg(long = "socket-path", value_name = "PATH", conflicts_with = "uri")]
    pub socket_path: Option<PathBuf>,

    /// Pod mode: listen on this `unix:///path` URI, serve one VM and exit
    /// after its UnregisterVM.
    #[arg(long, value_name = "URI")]
    pub uri: Option<String>,

    /// Log level: trace, debug, info, warn, error, fatal, panic.
    #[arg(
        long,
        value_name = "LEVEL",
        env = "CC_PROXY_LOG_LEVEL",
        default_value = "info"
    )]
    pub log: String,

    /// Log format.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// KSM throttling.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = KsmMode::Auto)]
    pub ksm: KsmMode,

    /// Where the host's KSM knobs live.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/sys/kernel/mm/ksm",
        hide = true
    )]
    pub ksm_sysfs: PathBuf,

    /// Largest client frame payload accepted (bytes; suffixes k, KiB, M, MiB).
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_size)]
    pub max_frame_size: u32,

    /// Output buffered per session before back-pressure reaches the VM.
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_size)]
    pub session_buffer: u32,

    /// How long RegisterVM waits for the agent's channels and its READY.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub ready_timeout: Duration,

    /// How long dialling one agent channel may keep retrying while the
    /// guest is not listening yet (the hybrid vsock `CONNECT` handshake,
    /// an AF_VSOCK port). A unix socket that is missing or refuses is an
    /// error at once. Never longer than `--ready-timeout`.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub dial_timeout: Duration,

    /// Memory that client frames being read, session output queues and
    /// stdin waiting for its process may take together. When it is spent
    /// the proxy stops reading from the peers that would need more
    /// (back-pressure) until some is given back.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub memory_budget: u32,

    /// Tokens (sessions) alive at once in the whole daemon.
    #[arg(long, value_name = "N", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,

    /// Tokens (sessions) alive at once per VM.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens_per_vm: u32,

    /// Client connections open at once; more are accepted and closed at
    /// once (logged once per run of refusals).
    #[arg(long, value_name = "N", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// A client frame must be complete this long after its first byte
    /// came; a connection that leaves one half-sent is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub frame_timeout: Duration,

    /// How long a command waits for the agent's reply on ctl.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub ctl_timeout: Duration,

    /// How long a Hyper with a token waits for the token's shim.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub shim_timeout: Duration,

    /// How long stdin and signals wait for their process to be started.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub process_timeout: Duration,

    /// Worker threads. 1 (the default) runs the daemon on one thread: the
    /// lowest latency and memory, and the fastest on small hosts; raise it
    /// for many busy VMs on a large host.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,

    /// Log a stats line (VMs, sessions, bytes, queue depths) at this
    /// interval; SIGUSR1 logs one at any time.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stats_interval: Option<Duration>,

    /// Serve Prometheus metrics over HTTP on this TCP address
    /// (GET /metrics), e.g. 127.0.0.1:9101; see docs/METRICS.md.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Serve the same metrics over HTTP on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,
}

impl Config {
    /// Parse `args` (with the program name first), accepting Go-style
    /// single-dash long flags.
    pub fn parse_args<I, S>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::try_parse_from(normalize_args(args.into_iter().map(Into::into)))
    }

    /// The socket path to listen on and whether this is pod mode.
    pub fn listen_path(&self) -> Result<(PathBuf, bool), String> {
        if let Some(uri) = &self.uri {
            let path = uri
                .strip_prefix("unix://")
                .ok_or_else(|| format!("-uri {uri:?}: only unix:// URIs are supported"))?;
            if path.is_empty() {
                return Err(format!("-uri {uri:?}: the path is empty"));
            }
            return Ok((PathBuf::from(path), true));
        }
        Ok((
            self.socket_path
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH)),
            false,
        ))
    }
}

/// Go's flag package accepts `-name` and `--name`; clap wants `--name` for
/// long options. Rewrite `-name…` (two or more letters) to `--name…`.
pub fn normalize_args(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest_are_operands = false;
    for (i, a) in args.enumerate() {
        if i == 0 || rest_are_operands {
            out.push(a);
            continue;
        }
        if a == "--" {
            rest_are_operands = true;
            out.push(a);
            continue;
        }
        let b = a.as_bytes();
        if b.len() > 2 && b[0] == b'-' && b[1] != b'-' && b[1].is_ascii_alphabetic() {
            out.push(format!("-{a}"));
        } else {
            out.push(a);
        }
    }
    out
}

/// `500ms`, `2s`, `1m`, `1h`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 500ms, 2s, 1m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `4096`, `64k`/`64KiB`, `4M`/`4MiB`.
pub fn parse_size(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (examples: 65536, 64KiB, 4MiB)"))?;
    let mul: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        _ => return Err(format!("invalid size unit in {s:?} (use KiB or MiB)")),
    };
    let v = n
        .checked_mul(mul)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("size {s:?} is too large (at most 4GiB-1)"))?;
    if v == 0 {
        return Err(format!("size {s:?} must not be zero"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut v = vec!["cc-proxy"];
        v.extend_from_slice(args);
        Config::parse_args(v.iter().copied()).unwrap()
    }

    #[test]
    fn go_style_single_dash_flags() {
        let c = parse(&[
            "-socket-path",
            "/tmp/p.sock",
            "-log",
            "debug",
            "-ksm",
            "off",
        ]);
        assert_eq!(
            c.socket_path.as_deref(),
            Some(std::path::Path::new("/tmp/p.sock"))
        );
        assert_eq!(c.log, "debug");
        assert_eq!(c.ksm, KsmMode::Off);
        let c = parse(&["-log=warn", "--socket-path=/x"]);
        assert_eq!(c.log, "warn");
        assert_eq!(c.listen_path().unwrap(), (PathBuf::from("/x"), false));
    }

    #[test]
    fn pod_mode_uri() {
        let c = parse(&["-uri", "unix:///run/pod/proxy.sock"]);
        assert_eq!(
            c.listen_path().unwrap(),
            (PathBuf::from("/run/pod/proxy.sock"), true)
        );
        assert!(parse(&["-uri", "tcp://x"]).listen_path().is_err());
    }

    #[test]
    fn defaults() {
        let c = parse(&[]);
        assert_eq!(
            c.listen_path().unwrap().0,
            PathBuf::from(DEFAULT_SOCKET_PATH)
        );
        assert_eq!(c.max_frame_size, 4 << 20);
        assert_eq!(c.session_buffer, 4 << 20);
        assert_eq!(c.ksm, KsmMode::Auto);
        assert_eq!(c.ctl_timeout, Duration::from_secs(30));
    }

    #[test]
    fn our_options() {
        let c = parse(&[
            "--max-frame-size",
            "64KiB",
            "--ready-timeout",
            "500ms",
            "--session-buffer=1M",
        ]);
        assert_eq!(c.max_frame_size, 65536);
        assert_eq!(c.ready_timeout, Duration::from_millis(500));
        assert_eq!(c.session_buffer, 1 << 20);
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("2 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert!(parse_size("8GiB").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn help_shows_the_default_socket_and_go_spellings() {
        let help = <Config as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        assert!(help.contains(DEFAULT_SOCKET_PATH), "{help}");
        for go in [
            "-socket-path PATH",
            "-uri URI",
            "-log LEVEL",
            "-ksm MODE",
            "-version",
        ] {
            assert!(help.contains(go), "{go} in {help}");
        }
        let short = <Config as clap::CommandFactory>::command()
            .render_help()
            .to_string();
        assert!(short.contains(DEFAULT_SOCKET_PATH), "{short}");
    }

    #[test]
    fn socket_path_and_uri_conflict() {
        let e = Config::parse_args([
            "cc-proxy",
            "-socket-path",
            "/tmp/a.sock",
            "-uri",
            "unix:///tmp/b.sock",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let msg = e.to_string();
        assert!(
            msg.contains("--socket-path") && msg.contains("--uri"),
            "{msg}"
        );
    }

    #[test]
    fn bad_flags_are_errors() {
        assert!(Config::parse_args(["cc-proxy", "-bogus"]).is_err());
        assert!(Config::parse_args(["cc-proxy", "-ksm", "sometimes"]).is_err());
    }
}
