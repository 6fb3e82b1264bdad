//! Dense products with transposes taken through strides, never through copies.
//!
//! nalgebra's `a.transpose() * b` materialises the transpose and its `tr_mul` runs one `gemv`
//! per output column. Every product of the reverse mode instead goes through [`gemm`], which
//! hands column-major views with swapped strides (`Aᵀ` of a d×k matrix is the k×d view with row
//! stride d and column stride 1) to nalgebra's `gemm`, so that the packed, cache-blocked
//! `matrixmultiply` kernel does the work whatever the transposition (nalgebra takes that path for
//! dynamically sized operands whose dimensions all exceed 5; smaller products run [`gemm_strided`]'s
//! own loops, nalgebra's small-size `gemv` path mishandling such views).
//!
//! The functions here panic on mismatched shapes (they are internal building blocks whose
//! callers check shapes first) and are exposed for the benches and the training harness.
#![allow(non_snake_case)]

use nalgebra::{DMatrix, Dyn, MatrixView, MatrixViewMut};

use crate::linalg::{all_finite, Real};

/// Whether an operand enters a product as is (`N`) or transposed (`T`), as in BLAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The matrix itself.
    N,
    /// Its transpose.
    T,
}

/// A matrix over a slice with explicit strides: entry `(i, j)` is `s[i·rs + j·cs]`. A
/// column-major `DMatrix` is `(rs, cs) = (1, rows)`, a row-major caller matrix with leading
/// dimension `ld` is `(ld, 1)`, and a transpose swaps both the shape and the strides.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a, T> {
    s: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// The mutable counterpart of [`Strided`].
#[derive(Debug)]
pub struct StridedMut<'a, T> {
    s: &'a mut [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// The slice length a `rows × cols` matrix with strides `(rs, cs)` needs (`None` on overflow).
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?
        .checked_add(1)
}

impl<'a, T: Real> Strided<'a, T> {
    /// `rows × cols` at `s` with strides `(rs, cs)`; `None` if `s` is too short.
    pub fn new(s: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Option<Self> {
        (span(rows, cols, rs, cs)? <= s.len()).then_some(Strided {
            s,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A row-major matrix with leading dimension `ld` (entry `(i, j)` at `s[i·ld + j]`).
    pub fn row_major(s: &'a [T], rows: usize, cols: usize, ld: usize) -> Option<Self> {
        Self::new(s, rows, cols, ld, 1)
    }

    /// `m` itself (`Op::N`) or `mᵀ` (`Op::T`), without copying.
    pub fn of(m: &'a DMatrix<T>, op: Op) -> Self {
        let (r, c) = m.shape();
        let s = Strided {
            s: m.as_slice(),
            rows: r,
            cols: c,
            rs: 1,
            cs: r,
        };
        match op {
            Op::N => s,
            Op::T => s.t(),
        }
    }

    /// The transpose (a view).
    pub fn t(self) -> Self {
        Strided {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Entry `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> T {
        self.s[i * self.rs + j * self.cs]
    }

    /// Whether every entry is finite (no NaN, no ±∞). Rows (or columns) of unit stride are
    /// scanned as slices ([`all_finite`]); other layouts entry by entry.
    pub fn all_finite(&self) -> bool {
        let (r, c) = (self.rows, self.cols);
        if r == 0 || c == 0 {
            return true;
        }
        if self.cs == 1 {
            (0..r).all(|i| all_finite(&self.s[i * self.rs..i * self.rs + c]))
        } else if self.rs == 1 {
            (0..c).all(|j| all_finite(&self.s[j * self.cs..j * self.cs + r]))
        } else {
            (0..r).all(|i| (0..c).all(|j| self.at(i, j).is_finite()))
        }
    }

    /// Row `i` as a slice, when the columns have unit stride (row-major memory).
    pub fn row(&self, i: usize) -> Option<&'a [T]> {
        (self.cs == 1 && i < self.rows).then(|| &self.s[i * self.rs..i * self.rs + self.cols])
    }

    /// An owned copy.
    pub fn to_matrix(&self) -> DMatrix<T> {
        DMatrix::from_fn(self.rows, self.cols, |i, j| self.at(i, j))
    }

    fn view(&self) -> MatrixView<'a, T, Dyn, Dyn, Dyn, Dyn> {
        MatrixView::from_slice_with_strides_generic(
            &self.s[..span(self.rows, self.cols, self.rs, self.cs).unwrap_or(0)],
            Dyn(self.rows),
            Dyn(self.cols),
            Dyn(self.rs),
            Dyn(self.cs),
        )
    }
}

impl<'a, T: Real> StridedMut<'a, T> {
    /// `rows × cols` at `s` with strides `(rs, cs)`; `None` if `s` is too short.
    pub fn new(s: &'a mut [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Option<Self> {
        (span(rows, cols, rs, cs)? <= s.len()).then_some(StridedMut {
            s,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A row-major matrix with leading dimension `ld`.
    pub fn row_major(s: &'a mut [T], rows: usize, cols: usize, ld: usize) -> Option<Self> {
        Self::new(s, rows, cols, ld, 1)
    }

    /// A column-major `DMatrix`, mutably.
    pub fn of(m: &'a mut DMatrix<T>) -> Self {
        let (r, c) = m.shape();
        StridedMut {
            s: m.as_mut_slice(),
            rows: r,
            cols: c,
            rs: 1,
            cs: r,
        }
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Entry `(i, j)`, mutably.
    pub fn at_mut(&mut self, i: usize, j: usize) -> &mut T {
        &mut self.s[i * self.rs + j * self.cs]
    }

    /// Row `i` as a mutable slice, when the columns have unit stride (row-major memory).
    pub fn row_mut(&mut self, i: usize) -> Option<&mut [T]> {
        (self.cs == 1 && i < self.rows).then(|| &mut self.s[i * self.rs..i * self.rs + self.cols])
    }

    /// The same memory, read-only.
    pub fn as_ref(&self) -> Strided<'_, T> {
        Strided {
            s: self.s,
            rows: self.rows,
            cols: self.cols,
            rs: self.rs,
            cs: self.cs,
        }
    }
}

/// `C ← α·op(A)·op(B) + β·C` (BLAS `gemm`) on column-major matrices; see [`gemm_strided`].
///
/// Panics if the shapes do not agree (internal building block; callers check shapes).
pub fn gemm<T: Real>(
    c: &mut DMatrix<T>,
    alpha: T,
    a: &DMatrix<T>,
    ta: Op,
    b: &DMatrix<T>,
    tb: Op,
    beta: T,
) {
    gemm_strided(
        &mut StridedMut::of(c),
        alpha,
        Strided::of(a, ta),
        Strided::of(b, tb),
        beta,
    );
}

/// `C ← α·A·B + β·C` on strided matrices (transposes are views: [`Strided::t`]). When `β = 0`,
/// `C` is not read. Products whose dimensions all exceed 5 go to nalgebra's `gemm`
/// (matrixmultiply with the views' strides); smaller ones to a plain loop (see the comment
/// inside).
///
/// Panics if the shapes do not agree (internal building block; callers check shapes).
pub fn gemm_strided<T: Real>(
    c: &mut StridedMut<'_, T>,
    alpha: T,
    a: Strided<'_, T>,
    b: Strided<'_, T>,
    beta: T,
) {
    let (m, ka) = a.shape();
    let (kb, n) = b.shape();
    assert_eq!(ka, kb, "gemm: inner dimensions differ");
    assert_eq!(c.shape(), (m, n), "gemm: output shape");
    if m > SMALL && n > SMALL && ka > SMALL {
        // nalgebra hands these to matrixmultiply with the views' strides.
        let len = span(m, n, c.rs, c.cs).unwrap_or(0);
        let mut cv = MatrixViewMut::from_slice_with_strides_generic(
            &mut c.s[..len],
            Dyn(m),
            Dyn(n),
            Dyn(c.rs),
            Dyn(c.cs),
        );
        cv.gemm(alpha, &a.view(), &b.view(), beta);
    } else {
        // nalgebra's gemv fallback for small dimensions mishandles views whose row stride is
        // not 1 (it iterates over the view's backing slice length), so small products (and
        // k = 0, where only the β scaling remains) run these loops instead. Every entry is
        // `β·c` (or 0) plus `a(i, l)·(α·b(l, j))` for l = 0, 1, …, k−1 in that order, whichever
        // loop runs, so they give the same bits; the first three keep the innermost loop on
        // unit-stride memory: rows of C and B, a row of A against a column of B (a dot
        // product), or columns of C and A.
        if m == 0 || n == 0 {
            return;
        }
        for j in 0..n {
            for i in 0..m {
                let v = c.at_mut(i, j);
                if beta == T::zero() {
                    *v = T::zero();
                } else if beta != T::one() {
                    *v *= beta;
                }
            }
        }
        if c.cs == 1 && b.cs == 1 {
            for i in 0..m {
                let row = &mut c.s[i * c.rs..i * c.rs + n];
                for l in 0..ka {
                    let av = a.at(i, l);
                    let brow = &b.s[l * b.rs..l * b.rs + n];
                    for (cv, &bv) in row.iter_mut().zip(brow) {
                        *cv += av * (alpha * bv);
                    }
                }
            }
        } else if a.cs == 1 && b.rs == 1 {
            for i in 0..m {
                let arow = &a.s[i * a.rs..i * a.rs + ka];
                for j in 0..n {
                    let bcol = &b.s[j * b.cs..j * b.cs + ka];
                    let v = c.at_mut(i, j);
                    let mut acc = *v;
                    for (&av, &bv) in arow.iter().zip(bcol) {
                        acc += av * (alpha * bv);
                    }
                    *v = acc;
                }
            }
        } else if c.rs == 1 && a.rs == 1 {
            for j in 0..n {
                let col = &mut c.s[j * c.cs..j * c.cs + m];
                for l in 0..ka {
                    let w = alpha * b.at(l, j);
                    let acol = &a.s[l * a.cs..l * a.cs + m];
                    for (cv, &av) in col.iter_mut().zip(acol) {
                        *cv += av * w;
                    }
                }
            }
        } else {
            for j in 0..n {
                for l in 0..ka {
                    let w = alpha * b.at(l, j);
                    for i in 0..m {
                        *c.at_mut(i, j) += a.at(i, l) * w;
                    }
                }
            }
        }
    }
}

/// Threads a functional op ([`crate::ops`]) may use for one product: `ELRA_NUM_THREADS` when
/// set to a positive integer, else 1; read once per process (at the first op). One by default
/// because the caller usually runs its own threads: inside PyTorch, whose OpenMP workers spin
/// after each parallel region, two elra threads made a training step slower, not faster
/// (BENCHMARKS.md, "elra.torch training step").
pub fn op_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("ELRA_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n >= 1)
            .unwrap_or(1)
    })
}

/// Bands of [`gemm_strided_par`] start at multiples of this (a multiple of every register-tile
/// size of matrixmultiply's kernels).
const BAND_ALIGN: usize = 64;

/// Multiply-adds below which a product of [`gemm_strided_par`] stays on one thread (a scoped
/// thread costs tens of µs; 2²⁰ multiply-adds take ≈ 50 µs on one core).
const PAR_MIN_WORK: usize = 1 << 20;

/// [`gemm_strided`] split over up to [`op_threads`] scoped threads along `C`'s slower-stride
/// dimension (the rows of a row-major `C`, the columns of a column-major one), so the parts write
/// disjoint memory; each part is the same product on a band of rows of `A` (or columns of `B`),
/// and every entry gets the arithmetic one call gives it (the sum over k is not split). Products
/// under 2²⁰ multiply-adds per thread, and a `C` whose bands would overlap in
/// memory, run as one call.
///
/// Panics if the shapes do not agree (internal building block; callers check shapes).
pub fn gemm_strided_par<T: Real>(
    c: &mut StridedMut<'_, T>,
    alpha: T,
    a: Strided<'_, T>,
    b: Strided<'_, T>,
    beta: T,
) {
    gemm_par_with(op_threads(), PAR_MIN_WORK, c, alpha, a, b, beta)
}

/// [`gemm_strided_par`] with at most `threads` parts of at least `min_work` multiply-adds.
fn gemm_par_with<T: Real>(
    threads: usize,
    min_work: usize,
    c: &mut StridedMut<'_, T>,
    alpha: T,
    a: Strided<'_, T>,
    b: Strided<'_, T>,
    beta: T,
) {
    let (m, k) = a.shape();
    let n = b.shape().1;
    assert_eq!(c.shape(), (m, n), "gemm: output shape");
    let by_rows = c.rs >= c.cs;
    let (len, slow, fast, fast_len) = if by_rows {
        (m, c.rs, c.cs, n)
    } else {
        (n, c.cs, c.rs, m)
    };
    let work = m.saturating_mul(n).saturating_mul(k);
    // Bands start at multiples of BAND_ALIGN, so matrixmultiply puts every entry in the same
    // kind of register tile (full or masked) as one call would, and none is SMALL or less (the
    // loops' path): every entry gets the single call's bits.
    let parts = threads.min(len / BAND_ALIGN).min(work / min_work.max(1));
    // Bands are disjoint slices only when one band's entries end before the next begins.
    let disjoint = fast_len == 0 || (fast_len - 1).checked_mul(fast).is_some_and(|e| e < slow);
    if parts <= 1 || !disjoint {
        return gemm_strided(c, alpha, a, b, beta);
    }
    let band = len.div_ceil(parts).div_ceil(BAND_ALIGN) * BAND_ALIGN;
    let mut parts = len.div_ceil(band);
    if len - band * (parts - 1) <= SMALL {
        parts -= 1; // the short tail joins the band before it
    }

    let (rows, cols, rs, cs) = (c.rows, c.cols, c.rs, c.cs);
    std::thread::scope(|scope| {
        let mut rest: &mut [T] = &mut *c.s;
        let mut start = 0;
        for part in 0..parts {
            let last = part + 1 == parts;
            let cnt = if last { len - start } else { band };
            let piece: &mut [T] = if last {
                std::mem::take(&mut rest)
            } else {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(cnt * slow);
                rest = tail;
                head
            };
            let (mut cp, ap, bp) = if by_rows {
                let cp = StridedMut {
                    s: piece,
                    rows: cnt,
                    cols,
                    rs,
                    cs,
                };
                let ap = Strided {
                    s: &a.s[start * a.rs..],
                    rows: cnt,
                    ..a
                };
                (cp, ap, b)
            } else {
                let cp = StridedMut {
                    s: piece,
                    rows,
                    cols: cnt,
                    rs,
                    cs,
                };
                let bp = Strided {
                    s: &b.s[start * b.cs..],
                    cols: cnt,
                    ..b
                };
                (cp, a, bp)
            };
            if last {
                gemm_strided(&mut cp, alpha, ap, bp, beta);
            } else {
                scope.spawn(move || gemm_strided(&mut cp, alpha, ap, bp, beta));
            }
            start += cnt;
        }
    });
}

/// nalgebra routes a product to matrixmultiply only when all of m, n, k exceed this.
const SMALL: usize = 5;

/// `op(A)·op(B)` as a new matrix (see [`gemm`]).
pub fn matmul<T: Real>(a: &DMatrix<T>, ta: Op, b: &DMatrix<T>, tb: Op) -> DMatrix<T> {
    let m = Strided::of(a, ta).shape().0;
    let n = Strided::of(b, tb).shape().1;
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

    /// Every length around the eight lanes, every position of one bad value, both precisions;
    /// the extremes of the finite range (`MAX·0`, subnormals, −0) stay finite.
    #[test]
    fn all_finite_finds_every_bad_value() {
        fn check<T: Real>(bad: T, edge: &[T]) {
            for len in 0..27 {
                let mut v: Vec<T> = (0..len).map(|i| edge[i % edge.len()]).collect();
                assert!(all_finite(&v), "len {len}");
                for i in 0..len {
                    let keep = v[i];
                    v[i] = bad;
                    assert!(!all_finite(&v), "len {len}, at {i}");
                    v[i] = keep;
                }
            }
        }
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            check(
                bad,
                &[1.5, f64::MAX, -f64::MAX, f64::MIN_POSITIVE / 4.0, -0.0, 0.0],
            );
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            check(
                bad,
                &[1.5, f32::MAX, -f32::MAX, f32::MIN_POSITIVE / 4.0, -0.0, 0.0],
            );
        }
        // Strided views: row-contiguous, column-contiguous and neither.
        let mut s = vec![1.0f64; 60];
        s[32] = f64::NAN; // (3, 2), (2, 3) and (3, 1) of the three views below
        for (rows, cols, rs, cs) in [(6, 5, 10, 1), (5, 6, 1, 10), (6, 5, 10, 2)] {
            let m = Strided::new(&s, rows, cols, rs, cs).unwrap();
            let naive = (0..rows).all(|i| (0..cols).all(|j| m.at(i, j).is_finite()));
            assert!(!naive && !m.all_finite(), "{rows}×{cols} ({rs}, {cs})");
        }
    }

    /// The threaded product gives the single call's bits: row- and column-major outputs with
    /// gaps, every transposition, β = 0 and β ≠ 0, 2, 3 and 5 parts (bands of 64, a longer or a
    /// short tail joined to the band before it), and a self-overlapping output that stays one
    /// call.
    #[test]
    fn threaded_products_equal_the_single_call_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let rand = |rng: &mut ChaCha8Rng, len: usize| -> Vec<f64> {
            (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
        };
        for &(m, k, n) in &[(150, 8, 29), (8, 40, 197), (300, 23, 6), (64 * 3 + 3, 7, 9)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let sa = rand(&mut rng, m * k);
                let sb = rand(&mut rng, k * n);
                let a = if ta {
                    Strided::new(&sa, m, k, 1, m).unwrap()
                } else {
                    Strided::new(&sa, m, k, k, 1).unwrap()
                };
                let b = if tb {
                    Strided::new(&sb, k, n, 1, k).unwrap()
                } else {
                    Strided::new(&sb, k, n, n, 1).unwrap()
                };
                // Row-major with a gap of 3 per row, and column-major with a gap of 2.
                for (rs, cs, len) in [(n + 3, 1, m * (n + 3)), (1, m + 2, n * (m + 2))] {
                    for beta in [0.0, 0.75] {
                        let init = rand(&mut rng, len);
                        let mut one = init.clone();
                        gemm_strided(
                            &mut StridedMut::new(&mut one, m, n, rs, cs).unwrap(),
                            1.25,
                            a,
                            b,
                            beta,
                        );
                        for parts in [2, 3, 5] {
                            let mut par = init.clone();
                            gemm_par_with(
                                parts,
                                1,
                                &mut StridedMut::new(&mut par, m, n, rs, cs).unwrap(),
                                1.25,
                                a,
                                b,
                                beta,
                            );
                            assert!(
                                one.iter().zip(&par).all(|(x, y)| x.to_bits() == y.to_bits()),
                                "{m}×{k}×{n} ({ta}, {tb}) strides ({rs}, {cs}) β {beta}, {parts} parts"
                            );
                        }
                    }
                }
            }
        }
        // Rows that overlap in memory (rs < cols): one call, same result.
        let sa = rand(&mut rng, 6 * 4);
        let sb = rand(&mut rng, 4 * 5);
        let a = Strided::new(&sa, 6, 4, 4, 1).unwrap();
        let b = Strided::new(&sb, 4, 5, 5, 1).unwrap();
        let (mut one, mut par) = (vec![0.0; 40], vec![0.0; 40]);
        gemm_strided(
            &mut StridedMut::new(&mut one, 6, 5, 3, 1).unwrap(),
            1.0,
            a,
            b,
            0.0,
        );
        gemm_par_with(
            3,
            1,
            &mut StridedMut::new(&mut par, 6, 5, 3, 1).unwrap(),
            1.0,
            a,
            b,
            0.0,
        );
        assert_eq!(one, par);
    }

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
