//! Row-major caller buffers with gaps between rows for the functional-op tests (`tests/ops.rs`,
//! `tests/ops_threads.rs`): random matrices, the buffer of a matrix, and its read-back, which
//! checks that no gap was written.

use nalgebra::DMatrix;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub const GAP: f64 = -12345.0;

pub fn rand(rng: &mut ChaCha8Rng, r: usize, c: usize, s: f64) -> DMatrix<f64> {
    DMatrix::from_fn(r, c, |_, _| rng.random_range(-s..s))
}

/// A row-major buffer of `m` with leading dimension `ld > cols` (gaps filled with `GAP`).
pub fn rows(m: &DMatrix<f64>, ld: usize) -> Vec<f64> {
    let mut v = vec![GAP; m.nrows() * ld];
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            v[i * ld + j] = m[(i, j)];
        }
    }
    v
}

/// The matrix in a row-major buffer; checks that the gaps are untouched.
pub fn read(v: &[f64], r: usize, c: usize, ld: usize) -> DMatrix<f64> {
    for i in 0..r {
        for j in c..ld {
            assert_eq!(v[i * ld + j], GAP, "gap ({i}, {j}) written");
        }
    }
    DMatrix::from_fn(r, c, |i, j| v[i * ld + j])
}

pub fn rel(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    (a - b).norm() / b.norm().max(1e-300)
}
