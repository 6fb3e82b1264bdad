//! Matrix exponential and φ1 of a small square matrix by Padé scaling and squaring.
//!
//! ELRA needs `φ1(Z) = Σ_{n≥0} Zⁿ/(n+1)!` of the r×r matrix `Z = C A` (Prop. 1, eq. 4:
//! `exp(A C) = I + A φ1(C A) C`) and, for the merge/unmerge and the reverse mode, `e^Z` and the
//! Fréchet derivatives of both. This module implements the algorithm once, on a row-major
//! workspace without dynamic allocation, and every public entry point (single matrix, Fréchet,
//! batch) goes through the same code, so a batch result equals the single-matrix result bit for
//! bit.
//!
//! # The algorithm (Al-Mohy & Higham 2009, Alg. 3.1/5.1, plus φ1 and Fréchet extensions)
//!
//! Notation: `A` is the n×n input (n = r, or the 2r×2r block matrix of the Fréchet derivative, see
//! below), `‖·‖` is the exact matrix 1-norm (max column sum of absolute values), `u` is the unit
//! roundoff (`2⁻⁵³` for f64, `2⁻²⁴` for f32), all matrices are stored row-major.
//!
//! **Padé coefficients** `b_0..b_m` of the diagonal `[m/m]` approximant
//! `r_m(x) = p_m(x)/p_m(−x)`, `p_m(x) = Σ b_k x^k` (Higham 2005, eq. 2.2 scaled to integers):
//!
//! | m  | b_0, b_1, …, b_m |
//! |----|------------------|
//! | 3  | 120, 60, 12, 1 |
//! | 5  | 30240, 15120, 3360, 420, 30, 1 |
//! | 7  | 17297280, 8648640, 1995840, 277200, 25200, 1512, 56, 1 |
//! | 9  | 17643225600, 8821612800, 2075673600, 302702400, 30270240, 2162160, 110880, 3960, 90, 1 |
//! | 13 | 64764752532480000, 32382376266240000, 7771770303897600, 1187353796428800, 129060195264000, 10559470521600, 670442572800, 33522128640, 1323241920, 40840800, 960960, 16380, 182, 1 |
//!
//! **Thresholds** `θ_m` (Higham 2005 Table 2.3 = AMH 2009 Table 3.1, [`Real::PADE`]): f64
//! degrees {3, 5, 7, 9, 13}, θ = 1.495585217958292e-2, 2.539398330063230e-1,
//! 9.504178996162932e-1, 2.097847961257068, and for the top degree 13 the value **4.25** that
//! AMH 2009 Alg. 5.1 uses instead of 5.371920351148152. f32 degrees {3, 5, 7}, θ =
//! 4.258730016922831e-1, 1.880152677804762, 3.925724783138660 (top degree 7).
//!
//! **ℓ-correction** (AMH 2009 eq. 5.1, Alg. 5.1 `ell`). With `c = (m!)² / ((2m)! (2m+1)!)` (the
//! leading coefficient of the backward-error series `h_{2m+1}`; its reciprocal is 100800 for
//! m = 3):
//! `α = c·‖|A|^{2m+1}‖ / ‖A‖`, `ℓ(A, m) = max(⌈log2(α/u) / (2m)⌉, 0)` (0 when `‖A‖ = 0` or
//! `|A|^{2m+1} = 0`). `‖|A|^p‖` is computed exactly with a row vector: `v ← 1ᵀ`, then p times
//! `v ← v|A|`, normalising `v` by its largest entry `μ` after each step and summing `log2 μ`
//! (no overflow); `log2 ‖|A|^p‖ = Σ log2 μ`. For the scaled matrix `2⁻ˢA`,
//! `log2 α(2⁻ˢA) = log2 α(A) − 2ms`, so ℓ is computed once from the unscaled `A`.
//!
//! **Degree and scaling selection** (exact norms; r is small). `dₖ = ‖Aᵏ‖^{1/k}`.
//! 1. `A2 = A·A`, `A4 = A2·A2`, `A6 = A4·A2`; `η₁ = max(d₄, d₆)`.
//! 2. If `η₁ < θ₃` and `ℓ(A,3) = 0`: m = 3, s = 0. Else if `η₁ < θ₅` and `ℓ(A,5) = 0`: m = 5, s = 0.
//! 3. `A8 = A4·A4`; `η₃ = max(d₆, d₈)`.
//!    - f32 (top degree 7): if `η₃ < θ₇` and `ℓ(A,7) = 0`: m = 7, s = 0; otherwise m = 7 and
//!      `η = η₃` goes to step 4 (for m = 7 the theory, AMH 2009 Thm 4.2 applied to `A²` with
//!      `p(p−1) ≤ m`, admits `p ≤ 3`, i.e. `max(d₆, d₈)`, not the `d₁₀` term of m = 13).
//!    - f64: if `η₃ < θ₇` and `ℓ(A,7) = 0`: m = 7, s = 0; else if `η₃ < θ₉` and `ℓ(A,9) = 0`:
//!      m = 9, s = 0; otherwise m = 13 with `η = η₅ = min(η₃, max(d₈, d₁₀))`, where
//!      `d₁₀ = ‖A4·A6‖^{1/10}` is only formed when it can lower η₅ and matter, i.e. when
//!      `d₈ < d₆` and `η₃ > θ₁₃` (otherwise `η₅ = η₃` and s would be the same).
//! 4. `s = 0` if `η = 0`, else `s = max(⌈log2(η/θ_m)⌉, 0)`; then `s ← s + ℓ(2⁻ˢA, m)`.
//!
//! **Overflow guards.** The input is checked for NaN/Inf before anything else. If a power
//! `A2, A4, A6, A8, A10` or its norm is not finite (only for ‖A‖ beyond ~2¹⁰⁰ in f64, ~2¹⁵ in
//! f32), the input is pre-scaled by `2^{-s₀}`, `s₀ = ⌈log2(n·max|aᵢⱼ|) − (e_max − 4)/k_max⌉`
//! (`e_max` = 1023 / 127, `k_max` = 10 / 8), so that every power used stays finite, the
//! selection is redone on `2^{-s₀}A` and `s₀` is added to s. A total `s` above
//! `4·(e_max+1) + 64` is reported as overflow. Every squaring checks its result for
//! finiteness; a non-finite value is reported as [`ElraError::Overflow`], never returned.
//!
//! **Evaluation** with the powers scaled exactly by powers of two (`A ← 2⁻ˢA`, `A2 ← 2⁻²ˢA2`,
//! `A4 ← 2⁻⁴ˢA4`, `A6 ← 2⁻⁶ˢA6`; only when s > 0) and `I` the identity:
//! - m = 3: `W = b₃A2 + b₁I`, `V = b₂A2 + b₀I`
//! - m = 5: `W = b₅A4 + b₃A2 + b₁I`, `V = b₄A4 + b₂A2 + b₀I`
//! - m = 7: `W = b₇A6 + b₅A4 + b₃A2 + b₁I`, `V = b₆A6 + b₄A4 + b₂A2 + b₀I`
//! - m = 9: `W = b₉A8 + b₇A6 + … + b₁I`, `V = b₈A8 + b₆A6 + … + b₀I`
//! - m = 13: `W = A6·(b₁₃A6 + b₁₁A4 + b₉A2) + b₇A6 + b₅A4 + b₃A2 + b₁I`,
//!   `V = A6·(b₁₂A6 + b₁₀A4 + b₈A2) + b₆A6 + b₄A4 + b₂A2 + b₀I`
//!
//! then `U = A·W` (the odd part), `D = V − U`, `N = V + U`, LU with partial pivoting of `D`
//! (row swaps), and two solves with the same factors:
//! `R = D⁻¹N ≈ e^{2⁻ˢA}` and `P = D⁻¹(2W) ≈ φ1(2⁻ˢA)`. P is the exact rational function
//! `(r_m(x) − 1)/x = 2W/(V − U)`: no division by A, so singular A is fine; `(e^A − I)A⁻¹` is
//! never formed. Only the solves that are needed are done (R when e^A is wanted or s > 0; P when
//! φ1 is wanted).
//!
//! **Squaring phase**, s times, using `φ1(2X) = ½(e^X + I)φ1(X)` and that R, P commute:
//! `P ← ½(P + R·P)` (with the old R), then `R ← R·R`. After each step R and P are checked to be
//! finite.
//!
//! **Fréchet derivatives** (see [`crate::linalg::frechet`]). `L_f(A, E)` is the top-right block of
//! `f([[A, E], [0, A]])`. Every matrix the algorithm forms from the block matrix is a polynomial
//! or rational function of it and so has the same block structure `[[X, Y], [0, X]]`; it is
//! stored as the pair `(X, Y)` (buffer of 2n² values: X then Y) and the algorithm above is run
//! unchanged on pairs with: product `(X₁,Y₁)(X₂,Y₂) = (X₁X₂, X₁Y₂ + Y₁X₂)`; identity `(I, 0)`;
//! 1-norm `max_j (Σᵢ|Xᵢⱼ| + Σᵢ|Yᵢⱼ|)` (the exact 1-norm of the block matrix); `|M|` row-vector
//! product `[a, b]·|M| = [a|X|, a|Y| + b|X|]`; solve `(D_X, D_Y)(R_X, R_Y) = (N_X, N_Y)` as
//! `R_X = D_X⁻¹N_X`, `R_Y = D_X⁻¹(N_Y − D_Y R_X)` (one LU of `D_X`). Before the block trick E is
//! multiplied by `2ᵏ`, k the integer nearest `log2(‖A‖/‖E‖)` (`‖A‖` replaced by 1 when A = 0),
//! and the result is multiplied by `2⁻ᵏ` (linearity in E). The cost is three r×r products per
//! block product instead of eight.
//!
//! **Layout for a GPU port.** One workspace per matrix holds, each with n² (2n² for pairs)
//! entries: A, A2, A4, A6, A8, T (scratch), W, V, U/N, D (LU in place), R, P; plus n pivots and
//! two vectors of 2n entries. Nothing else is allocated.
#![allow(non_snake_case)]

use super::Real;
use crate::{ElraError, Result};
use nalgebra::DMatrix;

/// Padé coefficients `b_0..b_m` for the degrees used (Higham 2005, eq. 2.2 / Alg. 2.3).
const B3: [f64; 4] = [120.0, 60.0, 12.0, 1.0];
const B5: [f64; 6] = [30240.0, 15120.0, 3360.0, 420.0, 30.0, 1.0];
const B7: [f64; 8] = [
    17297280.0, 8648640.0, 1995840.0, 277200.0, 25200.0, 1512.0, 56.0, 1.0,
];
const B9: [f64; 10] = [
    17643225600.0,
    8821612800.0,
    2075673600.0,
    302702400.0,
    30270240.0,
    2162160.0,
    110880.0,
    3960.0,
    90.0,
    1.0,
];
const B13: [f64; 14] = [
    64764752532480000.0,
    32382376266240000.0,
    7771770303897600.0,
    1187353796428800.0,
    129060195264000.0,
    10559470521600.0,
    670442572800.0,
    33522128640.0,
    1323241920.0,
    40840800.0,
    960960.0,
    16380.0,
    182.0,
    1.0,
];

/// θ₁₃ of AMH 2009, Alg. 5.1 (used instead of Higham 2005's 5.37 for the top f64 degree).
const THETA_13_AMH2009: f64 = 4.25;

/// The degree and number of squarings chosen for one matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PadePlan {
    /// Padé degree m.
    pub m: usize,
    /// Number of squarings s (including any overflow pre-scaling).
    pub s: u32,
}

/// `θ_m` for degree `m` (AMH 2009 Table 3.1; θ₁₃ = 4.25 per Alg. 5.1).
fn theta<T: Real>(m: usize) -> f64 {
    if m == 13 {
        return THETA_13_AMH2009;
    }
    T::PADE
        .iter()
        .find(|(d, _)| *d == m)
        .map(|(_, t)| *t)
        .unwrap_or(0.0)
}

/// Largest Padé degree available for `T` (13 for f64, 7 for f32).
fn top_degree<T: Real>() -> usize {
    T::PADE.last().map(|(m, _)| *m).unwrap_or(3)
}

/// `⌊log2(max finite value)⌋`: 1023 for f64, 127 for f32.
fn emax<T: Real>() -> f64 {
    T::max_value()
        .map(|m| m.f64().log2().floor())
        .unwrap_or(127.0)
}

/// `log2 |c_{2m+1}| = log2((m!)² / ((2m)!(2m+1)!))`.
fn log2_c(m: usize) -> f64 {
    let lf = |k: usize| (1..=k).map(|i| (i as f64).log2()).sum::<f64>();
    2.0 * lf(m) - lf(2 * m) - lf(2 * m + 1)
}

/// Multiplies every entry by `2^e` in exact power-of-two steps (no intermediate over/underflow
/// of the factor itself).
pub(crate) fn scale_pow2<T: Real>(x: &mut [T], mut e: i64) {
    while e != 0 {
        let step = e.clamp(-60, 60);
        let f = T::of(2f64.powi(step as i32));
        for v in x.iter_mut() {
            *v *= f;
        }
        e -= step;
    }
}

/// `c = a·b` (or `c += a·b` when `acc`), all n×n row-major.
#[inline]
fn gemm<T: Real>(n: usize, a: &[T], b: &[T], c: &mut [T], acc: bool) {
    let nn = n * n;
    let (a, b, c) = (&a[..nn], &b[..nn], &mut c[..nn]);
    if !acc {
        c.fill(T::zero());
    }
    for (crow, arow) in c.chunks_exact_mut(n).zip(a.chunks_exact(n)) {
        for (&aik, brow) in arow.iter().zip(b.chunks_exact(n)) {
            for (cj, &bkj) in crow.iter_mut().zip(brow) {
                *cj += aik * bkj;
            }
        }
    }
}

/// Pair-aware product `c = a·b`: plain when the slices hold n² entries, block `(X, Y)` pairs
/// when they hold 2n²: `(X₁X₂, X₁Y₂ + Y₁X₂)`.
fn mul<T: Real>(n: usize, a: &[T], b: &[T], c: &mut [T]) {
    let nn = n * n;
    gemm(n, &a[..nn], &b[..nn], &mut c[..nn], false);
    if c.len() == 2 * nn {
        gemm(n, &a[..nn], &b[nn..], &mut c[nn..], false);
        gemm(n, &a[nn..], &b[..nn], &mut c[nn..], true);
    }
}

/// Adds `v` to the diagonal of the main block.
fn add_diag<T: Real>(n: usize, x: &mut [T], v: T) {
    for i in 0..n {
        x[i * n + i] += v;
    }
}

/// Exact 1-norm of the (block) matrix: `max_j Σ_i |X_ij| (+ |Y_ij|)`. `col` has ≥ n entries.
fn norm1<T: Real>(n: usize, x: &[T], col: &mut [T]) -> f64 {
    let col = &mut col[..n];
    col.fill(T::zero());
    for row in x.chunks_exact(n) {
        for (c, &v) in col.iter_mut().zip(row) {
            *c += v.abs();
        }
    }
    col.iter().fold(0.0f64, |m, &c| {
        let c = c.f64();
        if c.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(c)
        }
    })
}

/// `log2 ‖|X|^p‖₁` by normalised row-vector iteration (pair-aware); `-∞` when it is zero.
fn log2_abs_pow_norm1<T: Real>(n: usize, x: &[T], p: usize, v: &mut [T], w: &mut [T]) -> f64 {
    let nn = n * n;
    let pair = x.len() == 2 * nn;
    let len = if pair { 2 * n } else { n };
    let (v, w) = (&mut v[..len], &mut w[..len]);
    v.fill(T::one());
    let mut acc = 0.0f64;
    for _ in 0..p {
        w.fill(T::zero());
        // w[..n] = v[..n]|X|;  pair: w[n..] = v[..n]|Y| + v[n..]|X|
        for i in 0..n {
            let xi = &x[i * n..(i + 1) * n];
            let vi = v[i];
            for (wj, &xij) in w[..n].iter_mut().zip(xi) {
                *wj += vi * xij.abs();
            }
            if pair {
                let yi = &x[nn + i * n..nn + (i + 1) * n];
                let vbi = v[n + i];
                for ((wj, &yij), &xij) in w[n..].iter_mut().zip(yi).zip(xi) {
                    *wj += vi * yij.abs() + vbi * xij.abs();
                }
            }
        }
        let mu = w.iter().fold(T::zero(), |m, &c| if c > m { c } else { m });
        if mu == T::zero() {
            return f64::NEG_INFINITY;
        }
        acc += mu.f64().log2();
        let inv = T::one() / mu;
        for (vj, &wj) in v.iter_mut().zip(w.iter()) {
            *vj = wj * inv;
        }
    }
    acc
}

/// In-place LU with partial pivoting of the n×n row-major `d`; `false` if a pivot is zero.
fn lu_factor<T: Real>(n: usize, d: &mut [T], piv: &mut [usize]) -> bool {
    for k in 0..n {
        let mut p = k;
        let mut best = d[k * n + k].abs();
        for i in k + 1..n {
            let v = d[i * n + k].abs();
            if v > best {
                best = v;
                p = i;
            }
        }
        piv[k] = p;
        if best == T::zero() || !best.is_finite() {
            return false;
        }
        if p != k {
            for j in 0..n {
                d.swap(k * n + j, p * n + j);
            }
        }
        let (top, bot) = d.split_at_mut((k + 1) * n);
        let rowk = &top[k * n..];
        let inv = T::one() / rowk[k];
        for rowi in bot.chunks_exact_mut(n) {
            let l = rowi[k] * inv;
            rowi[k] = l;
            if l != T::zero() {
                for (dij, &dkj) in rowi[k + 1..].iter_mut().zip(&rowk[k + 1..]) {
                    *dij -= l * dkj;
                }
            }
        }
    }
    true
}

/// Solves `D X = B` in place on the n×n row-major `b` (n right-hand sides) with the factors of
/// [`lu_factor`].
fn lu_solve<T: Real>(n: usize, lu: &[T], piv: &[usize], b: &mut [T]) {
    let b = &mut b[..n * n];
    for (k, &p) in piv.iter().enumerate().take(n) {
        if p != k {
            for j in 0..n {
                b.swap(k * n + j, p * n + j);
            }
        }
    }
    // forward: unit lower triangular
    for i in 1..n {
        let (top, rest) = b.split_at_mut(i * n);
        let bi = &mut rest[..n];
        for k in 0..i {
            let l = lu[i * n + k];
            if l != T::zero() {
                for (x, &y) in bi.iter_mut().zip(&top[k * n..(k + 1) * n]) {
                    *x -= l * y;
                }
            }
        }
    }
    // backward: upper triangular
    for i in (0..n).rev() {
        let (head, tail) = b.split_at_mut((i + 1) * n);
        let bi = &mut head[i * n..];
        for k in i + 1..n {
            let u = lu[i * n + k];
            if u != T::zero() {
                let bk = &tail[(k - i - 1) * n..(k - i) * n];
                for (x, &y) in bi.iter_mut().zip(bk) {
                    *x -= u * y;
                }
            }
        }
        let inv = T::one() / lu[i * n + i];
        for x in bi.iter_mut() {
            *x *= inv;
        }
    }
}

pub(crate) fn all_finite<T: Real>(x: &[T]) -> bool {
    x.iter().all(|v| v.is_finite())
}

/// Reusable workspace of the Padé scaling-and-squaring kernel for n×n matrices (optionally
/// block pairs for Fréchet derivatives). Holds every buffer the algorithm needs; a run allocates
/// nothing.
#[derive(Clone, Debug)]
pub(crate) struct Workspace<T: Real> {
    n: usize,
    pairs: bool,
    pub(crate) a: Vec<T>,
    a2: Vec<T>,
    a4: Vec<T>,
    a6: Vec<T>,
    a8: Vec<T>,
    t: Vec<T>,
    w: Vec<T>,
    v: Vec<T>,
    u: Vec<T>,
    d: Vec<T>,
    pub(crate) r: Vec<T>,
    pub(crate) p: Vec<T>,
    piv: Vec<usize>,
    vec1: Vec<T>,
    vec2: Vec<T>,
}

impl<T: Real> Workspace<T> {
    /// Workspace for n×n matrices; with `pairs` it can also run the Fréchet (block) variant.
    pub(crate) fn new(n: usize, pairs: bool) -> Self {
        let len = if pairs { 2 * n * n } else { n * n };
        let buf = || vec![T::zero(); len];
        Workspace {
            n,
            pairs,
            a: buf(),
            a2: buf(),
            a4: buf(),
            a6: buf(),
            a8: buf(),
            t: buf(),
            w: buf(),
            v: buf(),
            u: buf(),
            d: buf(),
            r: buf(),
            p: buf(),
            piv: vec![0; n],
            vec1: vec![T::zero(); 2 * n],
            vec2: vec![T::zero(); 2 * n],
        }
    }

    /// n.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Number of stored entries per matrix in a run: n² (plain) or 2n² (pair).
    pub(crate) fn len(&self, pair: bool) -> usize {
        if pair {
            2 * self.n * self.n
        } else {
            self.n * self.n
        }
    }

    /// Loads the n×n row-major input into `a` (plain run).
    pub(crate) fn load(&mut self, z: &[T]) {
        let nn = self.n * self.n;
        self.a[..nn].copy_from_slice(&z[..nn]);
    }

    /// Loads `Zᵀ` from the n×n row-major `z` into `a` (plain or main part of a pair).
    pub(crate) fn load_transposed(&mut self, z: &[T]) {
        let n = self.n;
        for i in 0..n {
            for j in 0..n {
                self.a[i * n + j] = z[j * n + i];
            }
        }
    }

    /// Loads the E part of a pair from the row-major `e`, scaled by `2^k` with k the integer
    /// nearest `log2(‖A‖/‖E‖)` (‖A‖ → 1 when A = 0). Returns `Some(k)`, or `None` when E = 0.
    /// The main part must already be loaded.
    pub(crate) fn load_direction(&mut self, e: &[T]) -> Option<i64> {
        let n = self.n;
        let nn = n * n;
        debug_assert!(self.pairs);
        self.a[nn..2 * nn].copy_from_slice(&e[..nn]);
        let ne = norm1(n, &self.a[nn..2 * nn], &mut self.vec1);
        if ne == 0.0 {
            return None;
        }
        let na = norm1(n, &self.a[..nn], &mut self.vec1);
        let target = if na > 0.0 { na } else { 1.0 };
        // log2 of each separately: the ratio itself may overflow.
        let k = (target.log2() - ne.log2()).round() as i64;
        scale_pow2(&mut self.a[nn..2 * nn], k);
        Some(k)
    }

    /// `d_k` style power norm check helper.
    fn pow_norm(&mut self, which: usize, pair: bool) -> f64 {
        let len = self.len(pair);
        let n = self.n;
        let x = match which {
            2 => &self.a2[..len],
            4 => &self.a4[..len],
            6 => &self.a6[..len],
            8 => &self.a8[..len],
            _ => &self.t[..len],
        };
        norm1(n, x, &mut self.vec1)
    }

    /// ℓ(2⁻ˢA, m) of AMH 2009 (eq. 5.1), from the unscaled A in `a`.
    fn ell(&mut self, pair: bool, norm_a: f64, m: usize, s: i64) -> i64 {
        if norm_a == 0.0 {
            return 0;
        }
        let len = self.len(pair);
        let lp = log2_abs_pow_norm1(
            self.n,
            &self.a[..len],
            2 * m + 1,
            &mut self.vec1,
            &mut self.vec2,
        );
        if lp == f64::NEG_INFINITY {
            return 0;
        }
        let log2_alpha = log2_c(m) + lp - norm_a.log2() - (2 * m) as f64 * s as f64;
        let v = ((log2_alpha - T::UNIT_ROUNDOFF.log2()) / (2 * m) as f64).ceil();
        if v.is_nan() || v <= 0.0 {
            0
        } else {
            v.min(1.0e6) as i64
        }
    }

    /// Computes A2, A4, A6 (and A8 when `with8`); returns their norms, or `None` on overflow.
    fn powers(&mut self, pair: bool) -> Option<[f64; 3]> {
        let len = self.len(pair);
        let n = self.n;
        mul(n, &self.a[..len], &self.a[..len], &mut self.a2[..len]);
        mul(n, &self.a2[..len], &self.a2[..len], &mut self.a4[..len]);
        mul(n, &self.a4[..len], &self.a2[..len], &mut self.a6[..len]);
        let n2 = self.pow_norm(2, pair);
        let n4 = self.pow_norm(4, pair);
        let n6 = self.pow_norm(6, pair);
        if n2.is_finite() && n4.is_finite() && n6.is_finite() {
            Some([n2, n4, n6])
        } else {
            None
        }
    }

    /// Degree and scaling selection (AMH 2009 Alg. 5.1 with exact norms); leaves A2, A4, A6
    /// (and A8 where formed) of the current `a` in the workspace. Returns `(m, s)` for the
    /// current `a`, or `None` when a power overflowed.
    fn select(&mut self, pair: bool) -> Option<(usize, i64)> {
        let len = self.len(pair);
        let n = self.n;
        let top = top_degree::<T>();
        let norm_a = norm1(n, &self.a[..len], &mut self.vec1);
        if !norm_a.is_finite() {
            return None;
        }
        let [_n2, n4, n6] = self.powers(pair)?;
        let d4 = n4.powf(0.25);
        let d6 = n6.powf(1.0 / 6.0);
        let eta1 = d4.max(d6);
        if eta1 < theta::<T>(3) && self.ell(pair, norm_a, 3, 0) == 0 {
            return Some((3, 0));
        }
        if eta1 < theta::<T>(5) && self.ell(pair, norm_a, 5, 0) == 0 {
            return Some((5, 0));
        }
        mul(n, &self.a4[..len], &self.a4[..len], &mut self.a8[..len]);
        let n8 = self.pow_norm(8, pair);
        if !n8.is_finite() {
            return None;
        }
        let d8 = n8.powf(0.125);
        let eta3 = d6.max(d8);
        if eta3 < theta::<T>(7) && self.ell(pair, norm_a, 7, 0) == 0 {
            return Some((7, 0));
        }
        let eta = if top == 13 {
            if eta3 < theta::<T>(9) && self.ell(pair, norm_a, 9, 0) == 0 {
                return Some((9, 0));
            }
            if d8 < d6 && eta3 > theta::<T>(13) {
                mul(n, &self.a4[..len], &self.a6[..len], &mut self.t[..len]);
                let n10 = self.pow_norm(10, pair);
                if !n10.is_finite() {
                    return None;
                }
                let d10 = n10.powf(0.1);
                eta3.min(d8.max(d10))
            } else {
                eta3
            }
        } else {
            eta3
        };
        let m = top;
        let mut s = if eta == 0.0 {
            0
        } else {
            let v = (eta / theta::<T>(m)).log2().ceil();
            if v > 0.0 {
                v.min(1.0e6) as i64
            } else {
                0
            }
        };
        s += self.ell(pair, norm_a, m, s);
        Some((m, s))
    }

    /// Runs the kernel on the input in `a` (n² entries, or 2n² for a pair when `pair`):
    /// afterwards `r` holds e^A (when `want_exp`) and `p` holds φ1(A) (when `want_phi`).
    pub(crate) fn run(&mut self, pair: bool, want_exp: bool, want_phi: bool) -> Result<PadePlan> {
        debug_assert!(!pair || self.pairs);
        let len = self.len(pair);
        let n = self.n;
        let nn = n * n;
        if !all_finite(&self.a[..len]) {
            return Err(ElraError::NonFinite { arg: "z" });
        }
        // Selection, with one pre-scaling retry if a power overflows.
        let (m, s_sel, s0) = match self.select(pair) {
            Some((m, s)) => (m, s, 0i64),
            None => {
                let kmax = if top_degree::<T>() == 13 { 10.0 } else { 8.0 };
                let maxabs = self.a[..len]
                    .iter()
                    .fold(0.0f64, |m, v| m.max(v.abs().f64()));
                let cols = if pair { 2 * n } else { n };
                let lg = maxabs.log2() + (cols as f64).log2();
                let s0 = (lg - (emax::<T>() - 4.0) / kmax).ceil().max(1.0) as i64;
                scale_pow2(&mut self.a[..len], -s0);
                match self.select(pair) {
                    Some((m, s)) => (m, s, s0),
                    None => {
                        return Err(ElraError::Overflow {
                            what: "powers of the scaled matrix overflow".into(),
                        })
                    }
                }
            }
        };
        let s_total = s_sel + s0;
        let s_max = 4 * (emax::<T>() as i64 + 1) + 64;
        if s_total > s_max {
            return Err(ElraError::Overflow {
                what: format!(
                    "scaling and squaring needs {s_total} squarings (more than {s_max}): \
                     the result is outside the {} range",
                    T::NAME
                ),
            });
        }
        // Scale the powers for the chosen s (exact powers of two).
        if s_sel > 0 {
            scale_pow2(&mut self.a[..len], -s_sel);
            scale_pow2(&mut self.a2[..len], -2 * s_sel);
            scale_pow2(&mut self.a4[..len], -4 * s_sel);
            scale_pow2(&mut self.a6[..len], -6 * s_sel);
            if m == 9 {
                scale_pow2(&mut self.a8[..len], -8 * s_sel);
            }
        }
        // W (odd part / A) and V (even part).
        let bs: &[f64] = match m {
            3 => &B3,
            5 => &B5,
            7 => &B7,
            9 => &B9,
            _ => &B13,
        };
        let b = |k: usize| T::of(bs[k]);
        {
            let (w, v) = (&mut self.w[..len], &mut self.v[..len]);
            let (a2, a4, a6, a8) = (
                &self.a2[..len],
                &self.a4[..len],
                &self.a6[..len],
                &self.a8[..len],
            );
            match m {
                3 => {
                    for ((wi, vi), &x2) in w.iter_mut().zip(v.iter_mut()).zip(a2) {
                        *wi = b(3) * x2;
                        *vi = b(2) * x2;
                    }
                }
                5 => {
                    for (((wi, vi), &x2), &x4) in w.iter_mut().zip(v.iter_mut()).zip(a2).zip(a4) {
                        *wi = b(5) * x4 + b(3) * x2;
                        *vi = b(4) * x4 + b(2) * x2;
                    }
                }
                7 => {
                    for ((((wi, vi), &x2), &x4), &x6) in
                        w.iter_mut().zip(v.iter_mut()).zip(a2).zip(a4).zip(a6)
                    {
                        *wi = b(7) * x6 + b(5) * x4 + b(3) * x2;
                        *vi = b(6) * x6 + b(4) * x4 + b(2) * x2;
                    }
                }
                9 => {
                    for (((((wi, vi), &x2), &x4), &x6), &x8) in w
                        .iter_mut()
                        .zip(v.iter_mut())
                        .zip(a2)
                        .zip(a4)
                        .zip(a6)
                        .zip(a8)
                    {
                        *wi = b(9) * x8 + b(7) * x6 + b(5) * x4 + b(3) * x2;
                        *vi = b(8) * x8 + b(6) * x6 + b(4) * x4 + b(2) * x2;
                    }
                }
                _ => {
                    // m = 13: W = A6·(b13 A6 + b11 A4 + b9 A2) + b7 A6 + b5 A4 + b3 A2 + b1 I
                    let t = &mut self.t[..len];
                    for (((ti, &x2), &x4), &x6) in t.iter_mut().zip(a2).zip(a4).zip(a6) {
                        *ti = b(13) * x6 + b(11) * x4 + b(9) * x2;
                    }
                    mul(n, a6, t, w);
                    for (((ti, &x2), &x4), &x6) in t.iter_mut().zip(a2).zip(a4).zip(a6) {
                        *ti = b(12) * x6 + b(10) * x4 + b(8) * x2;
                    }
                    mul(n, a6, t, v);
                    for ((((wi, vi), &x2), &x4), &x6) in
                        w.iter_mut().zip(v.iter_mut()).zip(a2).zip(a4).zip(a6)
                    {
                        *wi += b(7) * x6 + b(5) * x4 + b(3) * x2;
                        *vi += b(6) * x6 + b(4) * x4 + b(2) * x2;
                    }
                }
            }
            add_diag(n, w, b(1));
            add_diag(n, v, b(0));
        }
        // U = A·W; D = V − U; N = V + U (in u).
        mul(n, &self.a[..len], &self.w[..len], &mut self.u[..len]);
        for ((di, ui), &vi) in self.d[..len]
            .iter_mut()
            .zip(self.u[..len].iter_mut())
            .zip(&self.v[..len])
        {
            *di = vi - *ui;
            *ui += vi;
        }
        if !lu_factor(n, &mut self.d[..nn], &mut self.piv) {
            return Err(ElraError::Numerical(format!(
                "Padé denominator q_{m}(2^-{s_total}·A) is singular"
            )));
        }
        let need_r = want_exp || s_total > 0;
        if need_r {
            self.r[..len].copy_from_slice(&self.u[..len]);
            self.solve_pair(pair, true);
        }
        if want_phi {
            let two = T::one() + T::one();
            for (pi, &wi) in self.p[..len].iter_mut().zip(&self.w[..len]) {
                *pi = two * wi;
            }
            self.solve_pair(pair, false);
        }
        // Squaring phase.
        let half = T::of(0.5);
        for step in 0..s_total {
            if want_phi {
                mul(n, &self.r[..len], &self.p[..len], &mut self.t[..len]);
                for (pi, &ti) in self.p[..len].iter_mut().zip(&self.t[..len]) {
                    *pi = half * (*pi + ti);
                }
            }
            mul(n, &self.r[..len], &self.r[..len], &mut self.a8[..len]);
            std::mem::swap(&mut self.r, &mut self.a8);
            let ok = all_finite(&self.r[..len]) && (!want_phi || all_finite(&self.p[..len]));
            if !ok {
                return Err(ElraError::Overflow {
                    what: format!(
                        "squaring {} of {s_total} (Padé degree {m}) left the {} range",
                        step + 1,
                        T::NAME
                    ),
                });
            }
        }
        let ok =
            (!want_exp || all_finite(&self.r[..len])) && (!want_phi || all_finite(&self.p[..len]));
        if !ok {
            return Err(ElraError::Overflow {
                what: format!("Padé approximant (degree {m}) is not finite"),
            });
        }
        Ok(PadePlan {
            m,
            s: s_total as u32,
        })
    }

    /// Solves `D X = B` with the factored D in `d` for `B` in `r` (`to_r`) or `p`, pair-aware:
    /// `X_Y = D_X⁻¹(B_Y − D_Y X_X)`.
    fn solve_pair(&mut self, pair: bool, to_r: bool) {
        let n = self.n;
        let nn = n * n;
        let x = if to_r { &mut self.r } else { &mut self.p };
        lu_solve(n, &self.d[..nn], &self.piv, &mut x[..nn]);
        if pair {
            gemm(n, &self.d[nn..2 * nn], &x[..nn], &mut self.t[..nn], false);
            for (xi, &ti) in x[nn..2 * nn].iter_mut().zip(&self.t[..nn]) {
                *xi -= ti;
            }
            lu_solve(n, &self.d[..nn], &self.piv, &mut x[nn..2 * nn]);
        }
    }
}

/// Checks that `z` is square and non-empty; returns n.
pub(crate) fn check_square<T: Real>(arg: &'static str, z: &DMatrix<T>) -> Result<usize> {
    let (r, c) = z.shape();
    if r != c {
        return Err(ElraError::shape(arg, (r, r), (r, c)));
    }
    if r == 0 {
        return Err(ElraError::invalid(
            arg,
            "r = 0: the matrix must be at least 1×1",
        ));
    }
    Ok(r)
}

/// Row-major copy of a DMatrix.
pub(crate) fn to_row_major<T: Real>(z: &DMatrix<T>, out: &mut [T]) {
    let n = z.ncols();
    for i in 0..z.nrows() {
        for j in 0..n {
            out[i * n + j] = z[(i, j)];
        }
    }
}

fn run_single<T: Real>(z: &DMatrix<T>, want_exp: bool, want_phi: bool) -> Result<Workspace<T>> {
    let n = check_square("z", z)?;
    super::check_finite("z", z)?;
    let mut ws = Workspace::new(n, false);
    to_row_major(z, &mut ws.a);
    ws.run(false, want_exp, want_phi)?;
    Ok(ws)
}

/// Matrix exponential `e^Z` of a square matrix by Padé scaling and squaring with the
/// Al-Mohy & Higham 2009 refinements (Alg. 3.1/5.1; see the module docs for the exact steps).
///
/// Errors: non-square → [`ElraError::Shape`]; 0×0 → [`ElraError::InvalidArgument`]; NaN/Inf
/// entries → [`ElraError::NonFinite`]; a result outside the floating-point range →
/// [`ElraError::Overflow`].
pub fn expm<T: Real>(z: &DMatrix<T>) -> Result<DMatrix<T>> {
    let ws = run_single(z, true, false)?;
    let n = ws.n();
    Ok(DMatrix::from_row_slice(n, n, &ws.r[..n * n]))
}

/// `φ1(Z) = Σ_{n≥0} Zⁿ/(n+1)!`, the matrix function of the Woodbury form (Prop. 1, eq. 4:
/// `exp(A C) = I + A φ1(C A) C`), from the Padé factorisation `P = 2(V−U)⁻¹W` of the
/// exponential and the squaring recurrence `φ1(2X) = ½(e^X + I)φ1(X)` (module docs; AMH 2009
/// Alg. 5.1 for the degree and scaling). Never divides by Z, so singular Z is fine.
///
/// Errors as [`expm`].
pub fn phi1<T: Real>(z: &DMatrix<T>) -> Result<DMatrix<T>> {
    let ws = run_single(z, false, true)?;
    let n = ws.n();
    Ok(DMatrix::from_row_slice(n, n, &ws.p[..n * n]))
}

/// `(e^Z, φ1(Z))` from one Padé factorisation and one squaring phase (AMH 2009 Alg. 5.1 plus the
/// φ1 recurrence of the module docs; the Woodbury form of Prop. 1 needs φ1, the merge needs both).
///
/// Errors as [`expm`].
pub fn expm_phi1<T: Real>(z: &DMatrix<T>) -> Result<(DMatrix<T>, DMatrix<T>)> {
    let ws = run_single(z, true, true)?;
    let n = ws.n();
    Ok((
        DMatrix::from_row_slice(n, n, &ws.r[..n * n]),
        DMatrix::from_row_slice(n, n, &ws.p[..n * n]),
    ))
}

/// The Padé degree m and the number of squarings s the algorithm chooses for `z` (AMH 2009
/// Alg. 5.1 as described in the module docs). Exposed so tests can check that badly scaled
/// matrices are not overscaled.
pub fn pade_plan<T: Real>(z: &DMatrix<T>) -> Result<PadePlan> {
    let n = check_square("z", z)?;
    super::check_finite("z", z)?;
    let mut ws = Workspace::new(n, false);
    to_row_major(z, &mut ws.a);
    ws.run(false, true, false)
}
