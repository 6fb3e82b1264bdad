//! The proptest configuration shared by the property-test files (`#[path]`-included, apart from
//! the CUDA helpers in `mod.rs`): a fixed case-generator seed, so that every run — CI's above
//! all — checks the same cases and a red run is reproducible rather than a draw.
//! `ELRA_PROPTEST_SEED=<u64>` explores other cases; a failure found that way is recorded in
//! `tests/<file>.proptest-regressions` (re-run first on every run) and kept as a named test.

use proptest::test_runner::{Config, RngSeed};

/// Seed of the case generator: `ELRA_PROPTEST_SEED`, or a fixed default.
pub fn proptest_seed() -> u64 {
    std::env::var("ELRA_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00e1_7a00)
}

/// `cases` cases from the seed of [`proptest_seed`], proptest's defaults otherwise.
pub fn config(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(proptest_seed()),
        ..Config::default()
    }
}
