//! Seeds that once failed, kept as regression tests, and a fixed sweep.

#[test]
fn a_fixed_sweep_of_seeds_is_clean() {
    for seed in 0..300 {
        if let Err(f) = proxy_sim::run_seed(seed, 300) {
            panic!("{f}\nreproduce with: cargo xtask sim --seed {seed}");
        }
    }
}

/// Seeds that found a defect, with what it was.
const FOUND: &[(u64, &str)] = &[
    (
        30,
        "a shim that resumed and died before its replay was written, then resumed again, got the replay twice",
    ),
    (
        26,
        "the same, on stream 0 after 112541 bytes",
    ),
];

#[test]
fn seeds_that_found_defects_stay_clean() {
    for (seed, what) in FOUND {
        if let Err(f) = proxy_sim::run_seed(*seed, 400) {
            panic!("{f}\n(this seed once found: {what})");
        }
    }
}
