//! Seeds that once failed, kept as regression tests, and a fixed sweep.

#[test]
fn a_fixed_sweep_of_seeds_is_clean() {
    for seed in 0..300 {
        if let Err(f) = proxy_sim::run_seed(seed, 300) {
            panic!("{f}\nreproduce with: cargo xtask sim --seed {seed}");
        }
    }
}
