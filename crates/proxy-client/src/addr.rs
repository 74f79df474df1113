//! Where the proxy listens.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::Error;

/// The longest unix socket path the kernel takes (`sun_path` is 108 bytes
/// with its terminating NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// The proxy's socket: a path, given as `/path` or `unix:///path` (the form
/// in RegisterVM's `io.URL` and in `cc-shim -u`).
///
/// ```
/// use proxy_client::ProxyAddr;
///
/// let a: ProxyAddr = "unix:///run/cc-proxy/proxy.sock".parse().unwrap();
/// assert_eq!(a.path().to_str(), Some("/run/cc-proxy/proxy.sock"));
/// assert_eq!(a.to_string(), "unix:///run/cc-proxy/proxy.sock");
/// assert!("tcp://1.2.3.4:5".parse::<ProxyAddr>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyAddr {
    path: PathBuf,
}

impl ProxyAddr {
    /// An address from a socket path, checked like a parsed one.
    pub fn from_path(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let shown = path.display().to_string();
        check_path(&shown, &path)?;
        Ok(Self { path })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn check_path(addr: &str, path: &Path) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidAddress {
        addr: addr.to_owned(),
        reason,
    };
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(invalid("the socket path is empty"));
    }
    if len > MAX_SOCKET_PATH_LEN {
        return Err(invalid(
            "the socket path is longer than 107 bytes, the unix socket limit",
        ));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(invalid("the socket path contains a NUL byte"));
    }
    Ok(())
}

impl FromStr for ProxyAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let path = if let Some(rest) = s.strip_prefix("unix://") {
            rest
        } else if s.contains("://") {
            return Err(Error::InvalidAddress {
                addr: s.to_owned(),
                reason: "only unix:// URLs and plain socket paths are supported",
            });
        } else {
            s
        };
        let path = PathBuf::from(path);
        check_path(s, &path)?;
        Ok(Self { path })
    }
}

impl TryFrom<&str> for ProxyAddr {
    type Error = Error;

    fn try_from(s: &str) -> Result<Self, Error> {
        s.parse()
    }
}

impl TryFrom<String> for ProxyAddr {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl TryFrom<&Path> for ProxyAddr {
    type Error = Error;

    fn try_from(p: &Path) -> Result<Self, Error> {
        Self::from_path(p)
    }
}

impl TryFrom<PathBuf> for ProxyAddr {
    type Error = Error;

    fn try_from(p: PathBuf) -> Result<Self, Error> {
        Self::from_path(p)
    }
}

impl TryFrom<&PathBuf> for ProxyAddr {
    type Error = Error;

    fn try_from(p: &PathBuf) -> Result<Self, Error> {
        Self::from_path(p.clone())
    }
}

impl TryFrom<&ProxyAddr> for ProxyAddr {
    type Error = Error;

    fn try_from(a: &ProxyAddr) -> Result<Self, Error> {
        Ok(a.clone())
    }
}

impl fmt::Display for ProxyAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unix://{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_urls() {
        let a: ProxyAddr = "/tmp/p.sock".parse().unwrap();
        assert_eq!(a.path(), Path::new("/tmp/p.sock"));
        assert_eq!(a.to_string(), "unix:///tmp/p.sock");
        let b: ProxyAddr = a.to_string().parse().unwrap();
        assert_eq!(a, b);
        let rel: ProxyAddr = "unix://rel.sock".parse().unwrap();
        assert_eq!(rel.path(), Path::new("rel.sock"));
    }

    #[test]
    fn refuses_bad_addresses_saying_why() {
        let e = "vsock://3:1024".parse::<ProxyAddr>().unwrap_err();
        assert!(e.to_string().contains("only unix://"), "{e}");
        let e = "unix://".parse::<ProxyAddr>().unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let long = format!("/{}", "x".repeat(107));
        let e = long.parse::<ProxyAddr>().unwrap_err();
        assert!(e.to_string().contains("107 bytes"), "{e}");
        let ok = format!("/{}", "x".repeat(106));
        assert!(ok.parse::<ProxyAddr>().is_ok());
    }
}
