//! KSM throttling (docs/PROTOCOL.md §9): while VMs boot, same-page merging is
//! worth scanning hard; afterwards it should cost little.
//!
//! The knobs are `run`, `pages_to_scan` and `sleep_millisecs` under
//! `/sys/kernel/mm/ksm`. A setting scans one page per N anonymous pages of
//! the host (`AnonPages` of `/proc/meminfo`). The settings found at start
//! are restored on exit. A host without KSM, or without permission to write
//! it, only logs a warning.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::config::KsmMode;

/// One throttling level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// `run`.
    pub run: u8,
    /// One page scanned per this many anonymous pages.
    pub pages_per_scan: u64,
    /// `sleep_millisecs`.
    pub sleep_ms: u64,
}

/// Scan hard (right after a VM registered).
pub const AGGRESSIVE: Setting = Setting {
    run: 1,
    pages_per_scan: 10,
    sleep_ms: 1,
};
/// The middle level.
pub const STANDARD: Setting = Setting {
    run: 1,
    pages_per_scan: 100,
    sleep_ms: 10,
};
/// Where KSM settles.
pub const SLOW: Setting = Setting {
    run: 1,
    pages_per_scan: 500,
    sleep_ms: 100,
};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Saved {
    run: String,
    pages_to_scan: String,
    sleep_millisecs: String,
}

/// The KSM controller.
#[derive(Debug)]
pub struct Ksm {
    dir: PathBuf,
    meminfo: PathBuf,
    mode: KsmMode,
    saved: Saved,
    kicked: Notify,
    /// How long each level lasts after a kick (aggressive, standard).
    pub timeline: (Duration, Duration),
    current: Mutex<Option<Setting>>,
}

impl Ksm {
    /// Read the host's settings and apply `mode`; `None` (with a warning)
    /// if the host has no KSM or `mode` is `initial`.
    pub fn start(mode: KsmMode, dir: &Path) -> Option<Arc<Ksm>> {
        Self::start_with(
            mode,
            dir,
            Path::new("/proc/meminfo"),
            (Duration::from_secs(30), Duration::from_secs(120)),
        )
    }

    /// [`start`](Self::start) with explicit paths and timeline (tests).
    pub fn start_with(
        mode: KsmMode,
        dir: &Path,
        meminfo: &Path,
        timeline: (Duration, Duration),
    ) -> Option<Arc<Ksm>> {
        if mode == KsmMode::Initial {
            debug!("KSM: leaving the host's settings alone");
            return None;
        }
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).map(|s| s.trim().to_owned());
        let saved = match (read("run"), read("pages_to_scan"), read("sleep_millisecs")) {
            (Ok(run), Ok(pages_to_scan), Ok(sleep_millisecs)) => Saved {
                run,
                pages_to_scan,
                sleep_millisecs,
            },
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                warn!(dir = %dir.display(), error = %e, "KSM not available; throttling disabled");
                return None;
            }
        };
        let ksm = Arc::new(Ksm {
            dir: dir.to_owned(),
            meminfo: meminfo.to_owned(),
            mode,
            saved,
            kicked: Notify::new(),
            timeline,
            current: Mutex::new(None),
        });
        match mode {
            KsmMode::Off => ksm.write("run", "0"),
            KsmMode::Auto => {
                // Nothing changes until the first VM is registered: an idle
                // daemon does not turn the host's KSM on.
                if tokio::runtime::Handle::try_current().is_ok() {
                    tokio::spawn(ksm.clone().throttle());
                }
            }
            KsmMode::Initial => {}
        }
        info!(mode = ?mode, "KSM throttling on");
        Some(ksm)
    }

    /// A VM was registered: scan hard for a while.
    pub fn kick(&self) {
        if self.mode == KsmMode::Auto {
            self.kicked.notify_one();
        }
    }

    /// The level last applied.
    pub fn current(&self) -> Option<Setting> {
        self.current.lock().ok().and_then(|c| *c)
    }

    async fn throttle(self: Arc<Self>) {
        loop {
            self.kicked.notified().await;
            'kicked: loop {
                self.apply(AGGRESSIVE);
                for (next, after) in [(STANDARD, self.timeline.0), (SLOW, self.timeline.1)] {
                    tokio::select! {
                        _ = tokio::time::sleep(after) => self.apply(next),
                        _ = self.kicked.notified() => continue 'kicked,
                    }
                }
                break;
            }
        }
    }

    fn anon_pages(&self) -> u64 {
        let Ok(s) = std::fs::read_to_string(&self.meminfo) else {
            return 0;
        };
        s.lines()
            .find_map(|l| l.strip_prefix("AnonPages:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 4)
    }

    fn apply(&self, s: Setting) {
        let pages = (self.anon_pages() / s.pages_per_scan).max(1);
        self.write("pages_to_scan", &pages.to_string());
        self.write("sleep_millisecs", &s.sleep_ms.to_string());
        self.write("run", &s.run.to_string());
        if let Ok(mut c) = self.current.lock() {
            *c = Some(s);
        }
        debug!(?s, pages_to_scan = pages, "KSM setting applied");
    }

    fn write(&self, knob: &str, value: &str) {
        if let Err(e) = std::fs::write(self.dir.join(knob), value) {
            warn!(knob, value, error = %e, "cannot write KSM setting");
        }
    }

    /// Put back the settings found at start.
    pub fn restore(&self) {
        self.write("pages_to_scan", &self.saved.pages_to_scan);
        self.write("sleep_millisecs", &self.saved.sleep_millisecs);
        self.write("run", &self.saved.run);
        info!("KSM settings restored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ksm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("run"), "1\n").unwrap();
        std::fs::write(d.join("pages_to_scan"), "77\n").unwrap();
        std::fs::write(d.join("sleep_millisecs"), "33\n").unwrap();
        std::fs::write(
            d.join("meminfo"),
            "MemTotal: 1 kB\nAnonPages:     400000 kB\n",
        )
        .unwrap();
        d
    }

    fn knob(d: &Path, k: &str) -> String {
        std::fs::read_to_string(d.join(k))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn off_turns_ksm_off_and_restore_puts_it_back() {
        let d = fake_sysfs("off");
        let k = Ksm::start_with(
            KsmMode::Off,
            &d,
            &d.join("meminfo"),
            (Duration::ZERO, Duration::ZERO),
        )
        .unwrap();
        assert_eq!(knob(&d, "run"), "0");
        k.restore();
        assert_eq!(knob(&d, "run"), "1");
        assert_eq!(knob(&d, "pages_to_scan"), "77");
        assert_eq!(knob(&d, "sleep_millisecs"), "33");
    }

    #[test]
    fn initial_leaves_everything_alone() {
        let d = fake_sysfs("initial");
        assert!(Ksm::start_with(
            KsmMode::Initial,
            &d,
            &d.join("meminfo"),
            (Duration::ZERO, Duration::ZERO)
        )
        .is_none());
        assert_eq!(knob(&d, "run"), "1");
    }

    #[test]
    fn a_host_without_ksm_is_only_a_warning() {
        assert!(Ksm::start(KsmMode::Auto, Path::new("/nonexistent/ksm")).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn auto_kick_goes_aggressive_then_standard_then_slow() {
        let d = fake_sysfs("auto");
        let k = Ksm::start_with(
            KsmMode::Auto,
            &d,
            &d.join("meminfo"),
            (Duration::from_secs(30), Duration::from_secs(120)),
        )
        .unwrap();
        assert_eq!(k.current(), None);
        assert_eq!(knob(&d, "run"), "1");
        assert_eq!(knob(&d, "pages_to_scan"), "77");
        k.kick();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(k.current(), Some(AGGRESSIVE));
        assert_eq!(knob(&d, "pages_to_scan"), "10000");
        assert_eq!(knob(&d, "sleep_millisecs"), "1");
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(k.current(), Some(STANDARD));
        // A new kick restarts the timeline.
        k.kick();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(k.current(), Some(AGGRESSIVE));
        tokio::time::sleep(Duration::from_secs(31 + 121)).await;
        assert_eq!(k.current(), Some(SLOW));
        // 400000 kB = 100000 pages; slow scans one per 500.
        assert_eq!(knob(&d, "pages_to_scan"), "200");
        assert_eq!(knob(&d, "sleep_millisecs"), "100");
        k.restore();
        assert_eq!(knob(&d, "pages_to_scan"), "77");
    }
}
