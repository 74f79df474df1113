//! Short, unique temporary directories for unix sockets.
//!
//! A unix socket path must fit in `sun_path` (107 bytes plus NUL), so the
//! directories are kept short: `<tmp>/ccpt-<pid>-<n>`, falling back to
//! `/tmp` when `std::env::temp_dir()` is itself long.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest base directory we accept before falling back to `/tmp`: leaves
/// room for `ccpt-<pid>-<n>/<name>.sock` under the 107-byte limit.
const MAX_BASE_LEN: usize = 48;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A unique directory removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Create a fresh directory.
    ///
    /// # Panics
    ///
    /// If the directory cannot be created.
    pub fn new() -> Self {
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > MAX_BASE_LEN {
            base = PathBuf::from("/tmp");
        }
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("ccpt-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Self { path },
                // Left behind by an earlier process with the same pid.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create a temp dir {}: {e}", path.display()),
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `dir/name`, checked against the unix socket path limit.
    ///
    /// # Panics
    ///
    /// If the path would be longer than 107 bytes.
    pub fn socket(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        assert!(
            p.as_os_str().len() <= 107,
            "socket path {} is longer than 107 bytes",
            p.display()
        );
        p
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_short_and_removed() {
        let a = TempDir::new();
        let b = TempDir::new();
        assert_ne!(a.path(), b.path());
        assert!(a.path().is_dir());
        assert!(a.socket("proxy.sock").as_os_str().len() < 80);
        let p = a.path().to_owned();
        std::fs::write(p.join("f"), b"x").unwrap();
        drop(a);
        assert!(!p.exists());
    }
}
