//! Dense products with transposes taken through strides, never through copies.
//!
//! nalgebra's `a.transpose() * b` materialises the transpose and its `tr_mul` runs one `gemv`
//! per output column. Every product of the reverse mode instead goes through [`gemm`], which
//! hands column-major views with swapped strides (`Aᵀ` of a d×k matrix is the k×d view with row
//! stride d and column stride 1) to nalgebra's `gemm`, so that the packed, cache-blocked
//! `matrixmultiply` kernel does the work whatever the transposition (nalgebra takes that path for
//! dynamically sized operands whose dimensions all exceed 5; smaller products use its `gemv`
//! loop on the same views, which is still exact).
//!
//! The functions here panic on mismatched shapes (they are internal building blocks whose
//! callers check shapes first) and are exposed for the benches and the training harness.
#![allow(non_snake_case)]

use nalgebra::{DMatrix, Dyn, MatrixView};

use crate::linalg::Real;

/// Whether an operand enters a product as is (`N`) or transposed (`T`), as in BLAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The matrix itself.
    N,
    /// Its transpose.
    T,
}

/// A strided view of `m` (`Op::N`) or of `mᵀ` (`Op::T`) without copying.
pub fn view<T: Real>(m: &DMatrix<T>, op: Op) -> MatrixView<'_, T, Dyn, Dyn, Dyn, Dyn> {
    let (r, c) = m.shape();
    match op {
        Op::N => MatrixView::from_slice_with_strides_generic(
            m.as_slice(),
            Dyn(r),
            Dyn(c),
            Dyn(1),
            Dyn(r),
        ),
        Op::T => MatrixView::from_slice_with_strides_generic(
            m.as_slice(),
            Dyn(c),
            Dyn(r),
            Dyn(r),
            Dyn(1),
        ),
    }
}

fn dims<T: Real>(m: &DMatrix<T>, op: Op) -> (usize, usize) {
    match op {
        Op::N => m.shape(),
        Op::T => (m.ncols(), m.nrows()),
    }
}

/// `C ← α·op(A)·op(B) + β·C` (BLAS `gemm`). When `β = 0`, `C` is not read.
///
/// Panics if the shapes do not agree (internal building block; callers check shapes).
/// Products whose dimensions all exceed 5 go to nalgebra's `gemm` (matrixmultiply) on strided
/// views; smaller ones to a plain loop (see the comment inside).
pub fn gemm<T: Real>(
    c: &mut DMatrix<T>,
    alpha: T,
    a: &DMatrix<T>,
    ta: Op,
    b: &DMatrix<T>,
    tb: Op,
    beta: T,
) {
    let (m, ka) = dims(a, ta);
    let (kb, n) = dims(b, tb);
    assert_eq!(ka, kb, "gemm: inner dimensions differ");
    assert_eq!(c.shape(), (m, n), "gemm: output shape");
    if ka == 0 {
        // nalgebra's gemm is correct here too, but make the β semantics explicit.
        if beta == T::zero() {
            c.fill(T::zero());
        } else {
            *c *= beta;
        }
        return;
    }
    if m > SMALL && n > SMALL && ka > SMALL {
        // nalgebra hands these to matrixmultiply with the views' strides.
        c.gemm(alpha, &view(a, ta), &view(b, tb), beta);
    } else {
        // nalgebra's gemv fallback for small dimensions mishandles views whose row stride is
        // not 1 (it iterates over the view's backing slice length), so small products run
        // this plain loop instead.
        small_gemm(c, alpha, a, ta, b, tb, beta);
    }
}

/// nalgebra routes a product to matrixmultiply only when all of m, n, k exceed this.
const SMALL: usize = 5;

fn small_gemm<T: Real>(
    c: &mut DMatrix<T>,
    alpha: T,
    a: &DMatrix<T>,
    ta: Op,
    b: &DMatrix<T>,
    tb: Op,
    beta: T,
) {
    let (m, n) = c.shape();
    let k = dims(a, ta).1;
    let (ar, br) = (a.nrows(), b.nrows());
    let (sa, sb) = (a.as_slice(), b.as_slice());
    let at = |i: usize, l: usize| match ta {
        Op::N => sa[i + l * ar],
        Op::T => sa[l + i * ar],
    };
    let bt = |l: usize, j: usize| match tb {
        Op::N => sb[l + j * br],
        Op::T => sb[j + l * br],
    };
    let sc = c.as_mut_slice();
    for j in 0..n {
        let col = &mut sc[j * m..(j + 1) * m];
        if beta == T::zero() {
            col.fill(T::zero());
        } else if beta != T::one() {
            col.iter_mut().for_each(|v| *v *= beta);
        }
        for l in 0..k {
            let w = alpha * bt(l, j);
            for (i, v) in col.iter_mut().enumerate() {
                *v += at(i, l) * w;
            }
        }
    }
}

/// `op(A)·op(B)` as a new matrix (see [`gemm`]).
pub fn matmul<T: Real>(a: &DMatrix<T>, ta: Op, b: &DMatrix<T>, tb: Op) -> DMatrix<T> {
    let (m, _) = dims(a, ta);
    let (_, n) = dims(b, tb);
    let mut c = DMatrix::zeros(m, n);
    gemm(&mut c, T::one(), a, ta, b, tb, T::zero());
    c
}

/// `U + T Aᵀ` (U N×n, T N×r, A n×r) in one pass over `U`: each output column is copied from
/// `U` and updated by r axpys while it sits in L1 (the rank-r update of eq. 5 without a
/// separate copy of `U`). Panics if the shapes do not agree.
pub fn add_rank_r<T: Real>(u: &DMatrix<T>, t: &DMatrix<T>, a: &DMatrix<T>) -> DMatrix<T> {
    let (nb, n) = u.shape();
    let r = t.ncols();
    assert_eq!(t.nrows(), nb, "add_rank_r: rows of T");
    assert_eq!(a.shape(), (n, r), "add_rank_r: shape of A");
    let (us, ts) = (u.as_slice(), t.as_slice());
    let mut data: Vec<T> = Vec::with_capacity(nb * n);
    for j in 0..n {
        let start = data.len();
        data.extend_from_slice(&us[j * nb..(j + 1) * nb]);
        let col = &mut data[start..];
        for q in 0..r {
            let w = a[(j, q)];
            for (y, tv) in col.iter_mut().zip(&ts[q * nb..(q + 1) * nb]) {
                *y += w * *tv;
            }
        }
    }
    DMatrix::from_vec(nb, n, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn all_transpositions_match_naive_products() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &(m, k, n) in &[
            (7, 9, 11),
            (3, 2, 4),
            (40, 8, 33),
            (1, 1, 1),
            (0, 5, 6),
            (6, 0, 7),
        ] {
            let a = DMatrix::<f64>::from_fn(m, k, |_, _| rng.random_range(-1.0..1.0));
            let b = DMatrix::<f64>::from_fn(k, n, |_, _| rng.random_range(-1.0..1.0));
            let want = &a * &b;
            let at = a.transpose();
            let bt = b.transpose();
            for (x, tx) in [(&a, Op::N), (&at, Op::T)] {
                for (y, ty) in [(&b, Op::N), (&bt, Op::T)] {
                    let got = matmul(x, tx, y, ty);
                    assert!((&got - &want).abs().max() <= 1e-13, "{m}x{k}x{n}");
                    let mut c = DMatrix::from_element(m, n, 1.0);
                    gemm(&mut c, 2.0, x, tx, y, ty, -1.0);
                    let w2 = &want * 2.0 - DMatrix::from_element(m, n, 1.0);
                    assert!((c - w2).abs().max() <= 1e-13);
                }
            }
        }
    }

    #[test]
    fn add_rank_r_matches_dense() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        for &(nb, n, r) in &[(5, 7, 3), (1, 1, 1), (30, 9, 8), (0, 4, 2)] {
            let u = DMatrix::<f64>::from_fn(nb, n, |_, _| rng.random_range(-1.0..1.0));
            let t = DMatrix::<f64>::from_fn(nb, r, |_, _| rng.random_range(-1.0..1.0));
            let a = DMatrix::<f64>::from_fn(n, r, |_, _| rng.random_range(-1.0..1.0));
            let want = &u + &t * a.transpose();
            assert!((add_rank_r(&u, &t, &a) - want).abs().max() <= 1e-14);
        }
    }
}
