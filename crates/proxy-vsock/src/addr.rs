//! Agent channel addresses: `unix`, `vsock://` and `hvsock://`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The longest unix socket path that fits in `sockaddr_un.sun_path`
/// (108 bytes on Linux, one of which is the terminating NUL).
pub const MAX_UNIX_PATH_LEN: usize = 107;

/// Where an agent channel (control or I/O) can be reached.
///
/// Parsed from (and displayed as) one of:
///
/// | form | meaning |
/// | --- | --- |
/// | `/run/vm/ctl.sock` or `unix:///run/vm/ctl.sock` | a unix socket (virtio-serial chardev) |
/// | `vsock://<cid>:<port>` | AF_VSOCK |
/// | `hvsock://<unix path>:<port>` | hybrid vsock: a unix socket plus a `CONNECT <port>` handshake; the port follows the **last** colon |
///
/// `Display` and `FromStr` round-trip: `addr.to_string().parse() == Ok(addr)`
/// for every address whose path is valid UTF-8.
///
/// ```
/// use proxy_vsock::AgentAddr;
///
/// let addr: AgentAddr = "hvsock:///run/fc/v.sock:1024".parse().unwrap();
/// assert_eq!(
///     addr,
///     AgentAddr::HybridVsock { path: "/run/fc/v.sock".into(), port: 1024 }
/// );
/// assert_eq!(addr.to_string(), "hvsock:///run/fc/v.sock:1024");
///
/// let err = "vsock://x:1".parse::<AgentAddr>().unwrap_err();
/// assert!(err.to_string().contains("cid \"x\" is not a number"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AgentAddr {
    /// A unix stream socket at this path.
    Unix(PathBuf),
    /// An AF_VSOCK address.
    Vsock {
        /// Context id of the peer (e.g. the guest's cid).
        cid: u32,
        /// Port on the peer.
        port: u32,
    },
    /// Hybrid vsock: a unix socket served by the VMM, on which the first line
    /// written is `CONNECT <port>\n` and the first line read `OK <n>\n`.
    HybridVsock {
        /// The VMM's unix socket.
        path: PathBuf,
        /// The guest vsock port to connect to.
        port: u32,
    },
}

impl AgentAddr {
    /// A short name of the transport: `"unix"`, `"vsock"` or `"hvsock"`.
    pub fn scheme(&self) -> &'static str {
        match self {
            AgentAddr::Unix(_) => "unix",
            AgentAddr::Vsock { .. } => "vsock",
            AgentAddr::HybridVsock { .. } => "hvsock",
        }
    }

    /// The unix socket path, for `Unix` and `HybridVsock` addresses.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            AgentAddr::Unix(p) | AgentAddr::HybridVsock { path: p, .. } => Some(p),
            AgentAddr::Vsock { .. } => None,
        }
    }
}

/// Why an agent address was refused. Every message names the input and
/// says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrParseError {
    /// The input was empty.
    #[error("empty agent address (expected a unix socket path, unix://<path>, vsock://<cid>:<port> or hvsock://<path>:<port>)")]
    Empty,
    /// A scheme other than `unix`, `vsock` or `hvsock`.
    #[error("invalid agent address {input:?}: unknown scheme \"{scheme}://\" (expected unix://, vsock:// or hvsock://)")]
    UnknownScheme {
        /// The whole input.
        input: String,
        /// The scheme found.
        scheme: String,
    },
    /// The unix socket path is empty.
    #[error("invalid agent address {input:?}: empty unix socket path")]
    EmptyPath {
        /// The whole input.
        input: String,
    },
    /// The unix socket path does not fit in `sun_path`.
    #[error("invalid agent address {input:?}: unix socket path is {len} bytes long, more than the {max} bytes that fit in sun_path")]
    PathTooLong {
        /// The whole input.
        input: String,
        /// Length of the path in bytes.
        len: usize,
        /// The limit, [`MAX_UNIX_PATH_LEN`].
        max: usize,
    },
    /// No `:<port>` (or an empty one).
    #[error("invalid agent address {input:?}: missing port (expected {expected})")]
    MissingPort {
        /// The whole input.
        input: String,
        /// The expected form.
        expected: &'static str,
    },
    /// The vsock cid is not a decimal `u32`.
    #[error("invalid agent address {input:?}: cid {cid:?} is not a number (expected vsock://<cid>:<port>)")]
    InvalidCid {
        /// The whole input.
        input: String,
        /// The cid text found.
        cid: String,
    },
    /// The vsock cid is a number larger than `u32::MAX`.
    #[error("invalid agent address {input:?}: cid {cid} is larger than the maximum {max}", max = u32::MAX)]
    CidOutOfRange {
        /// The whole input.
        input: String,
        /// The cid text found.
        cid: String,
    },
    /// The port is not a decimal number.
    #[error("invalid agent address {input:?}: port {port:?} is not a number")]
    InvalidPort {
        /// The whole input.
        input: String,
        /// The port text found.
        port: String,
    },
    /// The port is a number larger than `u32::MAX`.
    #[error("invalid agent address {input:?}: port {port} is larger than the maximum {max}", max = u32::MAX)]
    PortOutOfRange {
        /// The whole input.
        input: String,
        /// The port text found.
        port: String,
    },
}

const VSOCK_FORM: &str = "vsock://<cid>:<port>";
const HVSOCK_FORM: &str = "hvsock://<unix path>:<port>";

enum NumError {
    NotANumber,
    OutOfRange,
}

fn parse_u32(s: &str) -> Result<u32, NumError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumError::NotANumber);
    }
    s.parse::<u32>().map_err(|_| NumError::OutOfRange)
}

fn parse_port(input: &str, port: &str, expected: &'static str) -> Result<u32, AddrParseError> {
    if port.is_empty() {
        return Err(AddrParseError::MissingPort {
            input: input.to_owned(),
            expected,
        });
    }
    parse_u32(port).map_err(|e| match e {
        NumError::NotANumber => AddrParseError::InvalidPort {
            input: input.to_owned(),
            port: port.to_owned(),
        },
        NumError::OutOfRange => AddrParseError::PortOutOfRange {
            input: input.to_owned(),
            port: port.to_owned(),
        },
    })
}

/// Whether `s` looks like a URI scheme (so `/tmp/a://b` stays a path).
fn is_scheme(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

fn check_unix_path(input: &str, path: &str) -> Result<PathBuf, AddrParseError> {
    if path.is_empty() {
        return Err(AddrParseError::EmptyPath {
            input: input.to_owned(),
        });
    }
    if path.len() > MAX_UNIX_PATH_LEN {
        return Err(AddrParseError::PathTooLong {
            input: input.to_owned(),
            len: path.len(),
            max: MAX_UNIX_PATH_LEN,
        });
    }
    Ok(PathBuf::from(path))
}

impl FromStr for AgentAddr {
    type Err = AddrParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(AddrParseError::Empty);
        }
        let split = input
            .split_once("://")
            .filter(|(scheme, _)| is_scheme(scheme));
        let Some((scheme, rest)) = split else {
            // A plain path (also `unix:<path>` without the slashes).
            let path = input.strip_prefix("unix:").unwrap_or(input);
            return check_unix_path(input, path).map(AgentAddr::Unix);
        };
        match scheme {
            "unix" => check_unix_path(input, rest).map(AgentAddr::Unix),
            "vsock" => {
                let Some((cid, port)) = rest.split_once(':') else {
                    return Err(AddrParseError::MissingPort {
                        input: input.to_owned(),
                        expected: VSOCK_FORM,
                    });
                };
                let cid = parse_u32(cid).map_err(|e| match e {
                    NumError::NotANumber => AddrParseError::InvalidCid {
                        input: input.to_owned(),
                        cid: cid.to_owned(),
                    },
                    NumError::OutOfRange => AddrParseError::CidOutOfRange {
                        input: input.to_owned(),
                        cid: cid.to_owned(),
                    },
                })?;
                let port = parse_port(input, port, VSOCK_FORM)?;
                Ok(AgentAddr::Vsock { cid, port })
            }
            "hvsock" => {
                let Some((path, port)) = rest.rsplit_once(':') else {
                    if rest.is_empty() {
                        return Err(AddrParseError::EmptyPath {
                            input: input.to_owned(),
                        });
                    }
                    return Err(AddrParseError::MissingPort {
                        input: input.to_owned(),
                        expected: HVSOCK_FORM,
                    });
                };
                let port = parse_port(input, port, HVSOCK_FORM)?;
                let path = check_unix_path(input, path)?;
                Ok(AgentAddr::HybridVsock { path, port })
            }
            other => Err(AddrParseError::UnknownScheme {
                input: input.to_owned(),
                scheme: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentAddr::Unix(path) => {
                let s = path.to_string_lossy();
                // A plain path reads back as itself unless it could be taken
                // for a scheme; then spell the scheme out.
                if s.starts_with('/') || !s.contains(':') {
                    write!(f, "{s}")
                } else {
                    write!(f, "unix://{s}")
                }
            }
            AgentAddr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            AgentAddr::HybridVsock { path, port } => {
                write!(f, "hvsock://{}:{port}", path.to_string_lossy())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> AgentAddr {
        match s.parse::<AgentAddr>() {
            Ok(a) => a,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn err(s: &str) -> AddrParseError {
        match s.parse::<AgentAddr>() {
            Ok(a) => panic!("{s:?} should be refused, got {a:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            ok("/run/vm/ctl.sock"),
            AgentAddr::Unix("/run/vm/ctl.sock".into())
        );
        assert_eq!(
            ok("unix:///run/vm/ctl.sock"),
            AgentAddr::Unix("/run/vm/ctl.sock".into())
        );
        assert_eq!(ok("unix:/run/x"), AgentAddr::Unix("/run/x".into()));
        assert_eq!(ok("rel.sock"), AgentAddr::Unix("rel.sock".into()));
        assert_eq!(
            ok("vsock://3:1024"),
            AgentAddr::Vsock { cid: 3, port: 1024 }
        );
        assert_eq!(
            ok("vsock://4294967295:4294967295"),
            AgentAddr::Vsock {
                cid: u32::MAX,
                port: u32::MAX
            }
        );
        assert_eq!(
            ok("hvsock:///run/fc/v.sock:1024"),
            AgentAddr::HybridVsock {
                path: "/run/fc/v.sock".into(),
                port: 1024
            }
        );
        // The port follows the last colon; the path may hold colons.
        assert_eq!(
            ok("hvsock:///run/a:b/v.sock:7"),
            AgentAddr::HybridVsock {
                path: "/run/a:b/v.sock".into(),
                port: 7
            }
        );
    }

    #[test]
    fn display_round_trips() {
        let long_ok = format!("/{}", "a".repeat(MAX_UNIX_PATH_LEN - 1));
        let addrs = [
            AgentAddr::Unix("/run/vm/ctl.sock".into()),
            AgentAddr::Unix("rel.sock".into()),
            AgentAddr::Unix("weird:name".into()),
            AgentAddr::Unix("vsock://1:2".into()),
            AgentAddr::Unix("/a:b".into()),
            AgentAddr::Unix("/tmp/x://y".into()),
            AgentAddr::Unix("ab://c".into()),
            AgentAddr::Unix(long_ok.clone().into()),
            AgentAddr::Vsock { cid: 0, port: 0 },
            AgentAddr::Vsock {
                cid: u32::MAX,
                port: 52,
            },
            AgentAddr::HybridVsock {
                path: "/run/fc/v.sock".into(),
                port: 1024,
            },
            AgentAddr::HybridVsock {
                path: "/x:1".into(),
                port: u32::MAX,
            },
            AgentAddr::HybridVsock {
                path: long_ok.into(),
                port: 1,
            },
        ];
        for a in addrs {
            let s = a.to_string();
            assert_eq!(ok(&s), a, "round trip of {s:?}");
        }
        for s in [
            "/run/vm/ctl.sock",
            "vsock://3:1024",
            "hvsock:///run/fc/v.sock:1024",
        ] {
            assert_eq!(ok(s).to_string(), s);
        }
        assert_eq!(ok("unix:///run/x").to_string(), "/run/x");
    }

    #[test]
    fn rejects_with_reasons() {
        let cases: &[(&str, &str)] = &[
            ("", "empty agent address"),
            ("vsock://x:1", "cid \"x\" is not a number"),
            ("vsock://:1", "cid \"\" is not a number"),
            (
                "vsock://4294967296:1",
                "cid 4294967296 is larger than the maximum 4294967295",
            ),
            ("vsock://3", "missing port (expected vsock://<cid>:<port>)"),
            ("vsock://3:", "missing port"),
            ("vsock://3:abc", "port \"abc\" is not a number"),
            ("vsock://3:-1", "port \"-1\" is not a number"),
            (
                "vsock://3:4294967296",
                "port 4294967296 is larger than the maximum 4294967295",
            ),
            (
                "hvsock:///run/v.sock",
                "missing port (expected hvsock://<unix path>:<port>)",
            ),
            ("hvsock:///run/v.sock:", "missing port"),
            (
                "hvsock:///run/v.sock:99999999999",
                "port 99999999999 is larger than the maximum",
            ),
            ("hvsock:///run/v.sock:x", "port \"x\" is not a number"),
            ("hvsock://:5", "empty unix socket path"),
            ("hvsock://", "empty unix socket path"),
            ("unix://", "empty unix socket path"),
            ("unix:", "empty unix socket path"),
            ("tcp://1.2.3.4:5", "unknown scheme \"tcp://\""),
        ];
        for (input, why) in cases {
            let msg = err(input).to_string();
            assert!(msg.contains(why), "{input:?}: {msg:?} should say {why:?}");
            if !input.is_empty() {
                assert!(
                    msg.contains(&format!("{input:?}")),
                    "{msg:?} names the input"
                );
            }
        }
    }

    #[test]
    fn rejects_paths_longer_than_sun_path() {
        let long = format!("/{}", "p".repeat(MAX_UNIX_PATH_LEN)); // 108 bytes
        let fits = &long[..MAX_UNIX_PATH_LEN];
        for input in [
            long.clone(),
            format!("unix://{long}"),
            format!("hvsock://{long}:3"),
        ] {
            let e = err(&input);
            assert_eq!(
                e,
                AddrParseError::PathTooLong {
                    input: input.clone(),
                    len: 108,
                    max: 107
                }
            );
            assert!(e
                .to_string()
                .contains("108 bytes long, more than the 107 bytes that fit in sun_path"));
        }
        assert_eq!(ok(fits), AgentAddr::Unix(fits.into()));
        assert_eq!(
            ok(&format!("hvsock://{fits}:3")),
            AgentAddr::HybridVsock {
                path: fits.into(),
                port: 3
            }
        );
    }

    #[test]
    fn accessors() {
        assert_eq!(ok("/a").scheme(), "unix");
        assert_eq!(ok("vsock://1:2").scheme(), "vsock");
        assert_eq!(ok("hvsock:///a:2").scheme(), "hvsock");
        assert_eq!(ok("hvsock:///a:2").unix_path(), Some(Path::new("/a")));
        assert_eq!(ok("vsock://1:2").unix_path(), None);
    }
}
