//! A deterministic simulation of the cc-proxy core.
//!
//! Each seed is one schedule: simulated runtimes, shims and agents act on
//! the daemon's sans-IO state machines ([`proxy_server::rules`]) in a
//! random order with a simulated clock, and invariants are checked after
//! every step. A seed runs five scenarios:
//!
//! - [`registry_world`]: every client command against the registry, with an
//!   independent model of each token's claim and process;
//! - the ctl channel ([`proxy_server::rules::ctl::simulate`]): replies reach
//!   their callers, one transaction in flight, timeouts and late replies;
//! - a client connection's rules ([`proxy_server::rules::client::simulate`]):
//!   roles, stdin before the start, frame deadlines;
//! - the io demultiplexer and its corking
//!   ([`proxy_server::rules::demux::simulate`]);
//! - [`stream_world`]: one session's output through the demux, the queue,
//!   the budget, the replay window and the writer's accounting to shims that
//!   die and reconnect.
//!
//! The same seed gives the same schedule everywhere, so a failing seed
//! reproduces exactly with `cargo xtask sim --seed S` and becomes a
//! regression test (`tests/regressions.rs`).
//!
//! ```
//! let report = proxy_sim::run_seed(42, 200).expect("seed 42 is clean");
//! assert!(report.steps > 0);
//! ```

pub mod registry_world;
pub mod rng;
pub mod stream_world;

/// What one seed did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    /// Steps run, over every scenario.
    pub steps: u64,
    /// Client commands applied.
    pub commands: u64,
    /// Stream bytes delivered and checked.
    pub bytes: u64,
}

/// A seed that broke an invariant.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The scenario that failed.
    pub scenario: &'static str,
    /// What broke, and at which step.
    pub what: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed in {}: {}",
            self.seed, self.scenario, self.what
        )
    }
}

impl std::error::Error for Failure {}

/// Run every scenario for `seed`, `steps` steps each.
pub fn run_seed(seed: u64, steps: usize) -> Result<Report, Failure> {
    let fail = |scenario: &'static str| {
        move |what: String| Failure {
            seed,
            scenario,
            what,
        }
    };
    let mut report = Report::default();
    let s = registry_world::run(seed, steps).map_err(fail("registry"))?;
    report.steps += steps as u64;
    report.commands += s.commands;
    // The io demultiplexer and its corking against an agent writing
    // random interleavings, split at random points, with garbage.
    let d = proxy_server::rules::demux::simulate(seed, steps).map_err(fail("io demux"))?;
    report.steps += d.steps as u64;
    report.bytes += d.bytes_delivered;
    // A VM's ctl channel against an agent that answers late, never,
    // twice, with garbage or NEXT noise, or closes: every caller gets its
    // own reply, exactly once.
    let c = proxy_server::rules::ctl::simulate(seed, steps).map_err(fail("ctl"))?;
    report.steps += c.steps as u64;
    report.commands += c.submitted as u64;
    // A client connection's rules against random frames, valid and not,
    // stdin before and after the start, partial frames and time passing.
    let k = proxy_server::rules::client::simulate(seed, steps).map_err(fail("client"))?;
    report.steps += k.steps as u64;
    // One session's output through the demux, the queue and the writer's
    // accounting to shims that die and reconnect.
    let w = stream_world::run(seed, steps).map_err(fail("streams"))?;
    report.steps += steps as u64;
    report.bytes += w.bytes;
    Ok(report)
}
