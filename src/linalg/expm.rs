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
//! `|A|^{2m+1} = 0`). For the scaled matrix `2⁻ˢA`, `log2 α(2⁻ˢA) = log2 α(A) − 2ms`, so ℓ is
//! computed from the unscaled `A`. Equivalently `ℓ = 0` iff `log2 ‖|A|^p‖ ≤ thr` with p = 2m+1
//! and `thr = log2 u − log2 c + log2 ‖A‖ + 2ms`, else `ℓ = ⌈(log2 ‖|A|^p‖ − thr)/(2m)⌉`.
//! `‖|A|^p‖` is computed exactly with a row vector: `v ← 1ᵀ`, then `v ← v|A|` (so
//! `max_j v_j = ‖|A|^j‖` after j steps), rescaling v by an exact power of two whenever its
//! maximum leaves [2⁻⁶⁰, 2⁶⁰] (no overflow). The vector is kept across the ℓ calls of one
//! selection (p = 7, 11, 15, 19, 27 come in increasing order: at most 27 steps per matrix), and
//! before each step the bound `‖|A|^p‖ ≤ ‖|A|^j‖·‖A‖^{p−j}` (with `⌊log2 max v⌋ + 1` for
//! `log2 max v`) is tried: if it is already `≤ thr`, ℓ = 0 without more steps. This gives exactly
//! the ℓ of the exact value and skips most of the iteration for well-scaled matrices.
//!
//! **Degree and scaling selection** (exact norms; r is small). `dₖ = ‖Aᵏ‖^{1/k}`.
//! 1. `A2 = A·A`, `A4 = A2·A2`, `A6 = A4·A2`; `η₁ = max(d₄, d₆)`.
//! 2. If `η₁ < θ₃` and `ℓ(A,3) = 0`: m = 3, s = 0. Else if `η₁ < θ₅` and `ℓ(A,5) = 0`: m = 5, s = 0.
//! 3. `η₃ = max(d₆, d₈)`, `d₈ = ‖A4·A4‖^{1/8}`. The product A8 = A4·A4 is only formed when the
//!    upper bound `d₈ ≤ min(‖A4‖², ‖A2‖‖A6‖)^{1/8}` cannot decide a comparison of η₃ with a θ
//!    below (so every decision equals the one with the exact d₈), and always for m = 9.
//!    - f32 (top degree 7): if `η₃ < θ₇` and `ℓ(A,7) = 0`: m = 7, s = 0; otherwise m = 7 and
//!      `η = η₃` goes to step 4 (for m = 7 the theory, AMH 2009 Thm 4.2 applied to `A²` with
//!      `p(p−1) ≤ m`, admits `p ≤ 3`, i.e. `max(d₆, d₈)`, not the `d₁₀` term of m = 13).
//!    - f64: if `η₃ < θ₇` and `ℓ(A,7) = 0`: m = 7, s = 0; else if `η₃ < θ₉` and `ℓ(A,9) = 0`:
//!      m = 9, s = 0; otherwise m = 13 with `η = η₅ = min(η₃, max(d₈, d₁₀))`.
//! 4. If `η₃ ≤ θ_m` (top degree): the first term of s is 0 (η₅ ≤ η₃), no d₁₀ needed. Otherwise
//!    `s = max(⌈log2(η/θ_m)⌉, 0)` where for m = 13 `d₁₀ = ‖A4·A6‖^{1/10}` is only formed when
//!    `d₈ < d₆` (else `max(d₈, d₁₀) ≥ η₃` and `η₅ = η₃`). Then `s ← s + ℓ(2⁻ˢA, m)`.
//!
//! **Overflow guards.** The input is checked for NaN/Inf before anything else. If a power
//! `A2, A4, A6, A8, A10` or its norm is not finite (only for ‖A‖ beyond ~2¹⁰⁰ in f64, ~2¹⁵ in
//! f32), the input is pre-scaled by `2^{-s₀}`, `s₀ = ⌈log2(n·max|aᵢⱼ|) − (e_max − 4)/k_max⌉`
//! (`e_max` = 1023 / 127, `k_max` = 10 / 8), so that every power used stays finite, the
//! selection is redone on `2^{-s₀}A` and `s₀` is added to s. A total `s` above
//! `4·(e_max+1) + 64` is reported as overflow. Every squaring checks its result for
//! finiteness; a non-finite value is reported as [`ElraError::Overflow`], never returned.
//!
//! **Structure of a plain input** (before the selection; the Fréchet block pairs skip it):
//! - *Balancing* (f32 only, [`Real::BALANCE`]): an exact power-of-two diagonal similarity
//!   `B = D⁻¹ZD` (Parlett & Reinsch 1969, EISPACK `balanc`, radix 2, off-diagonal 1-norms,
//!   `|log2 d_i| ≤ 60`), kept only when `‖B‖₁ < ‖Z‖₁`; the run computes `f(B)` and returns
//!   `D f(B) D⁻¹` (each entry times `2^{e_i−e_j}`, exact in f64, rounded once). The f32 error on
//!   badly scaled inputs came from the Padé solve (LU with partial pivoting is not invariant under
//!   diagonal scaling), amplified by the squarings: measured in `docs/numerics.md`.
//! - *Triangular inputs* (n ≥ 2): exactly upper triangular (every strictly lower entry is 0), or
//!   lower (then the run takes `Zᵀ` and transposes the results: `f(Zᵀ) = f(Z)ᵀ`, and the Padé
//!   solve needs no row swaps). The diagonal `z_ii` and first superdiagonal `t_i = z_{i,i+1}` are
//!   kept, and after the Padé solves and after every squaring, when R ≈ e^X and P ≈ φ1(X) for
//!   `X = 2⁻ʲZ` (j = s, s−1, …, 0), their diagonals and first superdiagonals are overwritten with
//!   `e^{x_i}`, `t_i·exp[x_i, x_{i+1}]`, `φ1(x_i)`, `t_i·φ1[x_i, x_{i+1}]` (`x_i = 2⁻ʲz_ii`, in
//!   f64, rounded once; AMH 2009 Code Fragment 2.1 and Higham 2008 eq. 10.42 for e^X, the same
//!   for φ1 with `φ1[x, y] = exp[x, y, 0]`: `exp_divdiff`, `phi1_divdiff` in the submodule `structure`).
//!   The final diagonal is `exp(z_ii)` / `φ1(z_ii)` to within the f64 libm's accuracy, where the squarings
//!   alone accumulate `2ˢ` roundings (up to 2019 u measured before). 1×1 inputs stay on the
//!   general path (their bits are what committed experiment tables reproduce).
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
//! `P ← ½(P + R·P)` (with the old R), then `R ← R·R` (then, for triangular inputs, the exact
//! diagonal and superdiagonal above). After each step R and P are checked to be finite. Last,
//! a lower triangular run transposes R and P back and a balanced run undoes the balancing.
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
//! three vectors of 2n entries (column sums, the ℓ iteration vector and its scratch), the 2n
//! kept diagonal/superdiagonal entries of a triangular input and n balancing exponents. Nothing
//! else is allocated. On the CPU the products use 4×4 register tiles with the natural k order;
//! the batch (`MatFnBatch`) runs the very same code per matrix, so its results equal the
//! single-matrix functions bit for bit.
#![allow(non_snake_case)]

use super::{all_finite, Real};
use crate::{ElraError, Result};
use nalgebra::DMatrix;

mod dense;
use dense::{abs_vecmat_step, add_diag, gemm, lu_factor, lu_solve, mul, norm1};
mod structure;
use structure::{transpose_in_place, unbalance, Tri};

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

/// `log2 |c_{2m+1}| = −log2((2m)!(2m+1)! / (m!)²)` (the quotient is < 2¹²⁰ for m ≤ 13;
/// 1/c = 100800 for m = 3, AMH 2009 §5).
pub(crate) fn log2_c(m: usize) -> f64 {
    // (2m)!(2m+1)!/(m!)² = (2m+1)! · (Π_{i=m+1}^{2m} i) / m!
    let mut q = 1.0f64;
    for i in 2..=2 * m + 1 {
        q *= i as f64;
    }
    for i in m + 1..=2 * m {
        q *= i as f64;
    }
    for i in 2..=m {
        q /= i as f64;
    }
    -q.log2()
}

/// `⌊log2 x⌋ + 1 > log2 x` for finite x > 0, from the exponent bits (normal x) or `log2` (subnormal).
fn log2_upper(x: f64) -> f64 {
    let e = ((x.to_bits() >> 52) & 0x7ff) as i64;
    if e == 0 {
        x.log2()
    } else {
        (e - 1023 + 1) as f64
    }
}

/// Multiplies every entry by `2^e` in exact power-of-two steps (no intermediate over/underflow
/// of the factor itself).
/// `|e|` is clamped to 4400 first: every finite non-zero f32/f64 value times `2^±4400` is
/// already 0 or ±∞, so the result is the same and the loop always ends (≤ 74 passes).
pub(crate) fn scale_pow2<T: Real>(x: &mut [T], e: i64) {
    let mut e = e.clamp(-4400, 4400);
    while e != 0 {
        let step = e.clamp(-60, 60);
        let f = T::of(2f64.powi(step as i32));
        for v in x.iter_mut() {
            *v *= f;
        }
        e -= step;
    }
}

/// `x·2^e` in exact power-of-two steps of at most `2^±60` (each step exact unless the result
/// under- or overflows), `|e|` clamped to 4400 as in [`scale_pow2`]. The GPU port multiplies by
/// the same factors in the same order, so both round alike where a step is inexact.
pub(crate) fn ldexp_steps(x: f64, e: i64) -> f64 {
    let mut e = e.clamp(-4400, 4400);
    let mut x = x;
    while e != 0 {
        let step = e.clamp(-60, 60);
        x *= 2f64.powi(step as i32);
        e -= step;
    }
    x
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
    /// Row vector of the `‖|A|^p‖₁` iteration (`1ᵀ|A|^p · 2^{-ell_exp}`) and its scratch.
    ell_v: Vec<T>,
    ell_w: Vec<T>,
    /// Power p reached by `ell_v` (0 = not started), power-of-two exponent taken out of it, and
    /// whether `|A|^p` became zero.
    ell_steps: usize,
    ell_exp: i64,
    ell_zero: bool,
    /// Whether the `ell_v` iteration has been initialised for the current `a`.
    ell_started: bool,
    /// Whether `a8` holds A4·A4 of the current `a`.
    a8_formed: bool,
    /// Diagonal (`tri[..n]`) and first superdiagonal (`tri[n..2n−1]`) of a triangular plain
    /// input, as loaded (after balancing and transposition, before any scaling).
    tri: Vec<T>,
    /// Balancing exponents: the run works on `D⁻¹ZD`, `D = diag(2^{bal[i]})`.
    bal: Vec<i32>,
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
            ell_v: vec![T::zero(); 2 * n],
            ell_w: vec![T::zero(); 2 * n],
            ell_steps: 0,
            ell_exp: 0,
            ell_zero: false,
            a8_formed: false,
            ell_started: false,
            tri: vec![T::zero(); 2 * n],
            bal: vec![0; n],
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
        let mut pre = 0i64;
        let mut ne = norm1(n, &self.a[nn..2 * nn], &mut self.vec1);
        if ne.is_infinite() {
            // finite entries whose 1-norm overflows: scale down exactly before measuring
            pre = -64;
            scale_pow2(&mut self.a[nn..2 * nn], pre);
            ne = norm1(n, &self.a[nn..2 * nn], &mut self.vec1);
        }
        if ne == 0.0 {
            return None;
        }
        let na = norm1(n, &self.a[..nn], &mut self.vec1);
        let target = if na > 0.0 && na.is_finite() { na } else { 1.0 };
        // log2 of each separately: the ratio itself may overflow; both logs are finite here.
        let k = (target.log2() - ne.log2()).round() as i64;
        scale_pow2(&mut self.a[nn..2 * nn], k);
        Some(pre + k)
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

    /// Decides `ℓ(2⁻ˢA, m)` (AMH 2009 eq. 5.1) for the A in `a`, whose 1-norm is `norm_a`.
    ///
    /// `ℓ = 0` iff `log2 ‖|A|^p‖₁ ≤ thr := log2 u − log2|c| + log2‖A‖₁ + 2ms` (p = 2m + 1).
    /// `‖|A|^p‖₁` is computed exactly by the row-vector iteration `v ← v|A|` from `v = 1ᵀ`
    /// (`max_j v_j = ‖|A|^j‖₁`), cached across calls (p = 7, 11, 15, 19, 27 are asked in
    /// increasing order, so at most 27 steps per matrix), with exact power-of-two rescaling of v
    /// when its maximum leaves [2⁻⁶⁰, 2⁶⁰]. After j steps the bound
    /// `‖|A|^p‖₁ ≤ ‖|A|^j‖₁·‖A‖₁^{p−j}` is tried first: when it already gives `≤ thr` the answer is
    /// 0 without further steps (the same answer the exact value gives).
    fn ell(&mut self, pair: bool, norm_a: f64, m: usize, s: i64) -> i64 {
        if norm_a == 0.0 {
            return 0;
        }
        let p = 2 * m + 1;
        let log2_norm_a = norm_a.log2();
        let thr = T::UNIT_ROUNDOFF.log2() - log2_c(m) + log2_norm_a + (2 * m) as f64 * s as f64;
        let len = self.len(pair);
        let vlen = if pair { 2 * self.n } else { self.n };
        if self.ell_steps > p {
            // (only reachable if asked out of order) restart the iteration
            self.ell_steps = 0;
            self.ell_started = false;
        }
        if self.ell_steps == 0 && !self.ell_started {
            self.ell_v[..vlen].fill(T::one());
            self.ell_exp = 0;
            self.ell_zero = false;
            self.ell_started = true;
        }
        let vmax = |v: &[T]| v.iter().fold(T::zero(), |m, &c| if c > m { c } else { m });
        let mut mu = vmax(&self.ell_v[..vlen]).f64();
        loop {
            if self.ell_zero {
                return 0;
            }
            let j = self.ell_steps.min(p);
            let upper = log2_upper(mu) + self.ell_exp as f64 + (p - j) as f64 * log2_norm_a;
            if upper <= thr {
                return 0;
            }
            if self.ell_steps >= p {
                break;
            }
            let mx = abs_vecmat_step(self.n, &self.a[..len], &self.ell_v, &mut self.ell_w);
            std::mem::swap(&mut self.ell_v, &mut self.ell_w);
            self.ell_steps += 1;
            mu = mx.f64();
            if mu == 0.0 {
                self.ell_zero = true;
            } else if !(2f64.powi(-60)..=2f64.powi(60)).contains(&mu) {
                let k = mu.log2().floor() as i64;
                scale_pow2(&mut self.ell_v[..vlen], -k);
                self.ell_exp += k;
                mu = vmax(&self.ell_v[..vlen]).f64();
            }
        }
        // exact: ℓ = max(⌈(log2 α − log2 u)/(2m)⌉, 0), log2 α = log2|c| + log2‖|A|^p‖ − log2‖A‖ − 2ms
        let lp = mu.log2() + self.ell_exp as f64;
        let v = ((lp - thr) / (2 * m) as f64).ceil();
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

    /// Forms A8 = A4·A4 and returns d₈ = ‖A8‖^{1/8}, or `None` on overflow.
    fn form_a8(&mut self, pair: bool) -> Option<f64> {
        let len = self.len(pair);
        mul(
            self.n,
            &self.a4[..len],
            &self.a4[..len],
            &mut self.a8[..len],
        );
        self.a8_formed = true;
        let n8 = self.pow_norm(8, pair);
        n8.is_finite().then(|| n8.powf(0.125))
    }

    /// Degree and scaling selection (AMH 2009 Alg. 5.1 with exact norms); leaves A2, A4, A6
    /// (and A8 where formed) of the current `a` in the workspace. Returns `(m, s)` for the
    /// current `a`, or `None` when a power overflowed.
    fn select(&mut self, pair: bool) -> Option<(usize, i64)> {
        let len = self.len(pair);
        let n = self.n;
        let top = top_degree::<T>();
        self.ell_steps = 0;
        self.ell_started = false;
        self.a8_formed = false;
        let norm_a = norm1(n, &self.a[..len], &mut self.vec1);
        if !norm_a.is_finite() {
            return None;
        }
        let [n2, n4, n6] = self.powers(pair)?;
        let d4 = n4.powf(0.25);
        let d6 = n6.powf(1.0 / 6.0);
        let eta1 = d4.max(d6);
        if eta1 < theta::<T>(3) && self.ell(pair, norm_a, 3, 0) == 0 {
            return Some((3, 0));
        }
        if eta1 < theta::<T>(5) && self.ell(pair, norm_a, 5, 0) == 0 {
            return Some((5, 0));
        }
        // η₃ = max(d₆, d₈). A8 = A4·A4 is formed only when the upper bound
        // d₈ ≤ min(‖A4‖², ‖A2‖‖A6‖)^{1/8} cannot settle a comparison (identical decisions).
        let d8_up = (n4 * n4).min(n2 * n6).powf(0.125);
        let mut d8_exact: Option<f64> = None;
        // `η₃ < θ` (strict = true) or `η₃ ≤ θ` (strict = false), exactly as with the exact d₈.
        let mut eta3_below = |ws: &mut Self, th: f64, strict: bool| -> Option<bool> {
            let below = |x: f64| if strict { x < th } else { x <= th };
            if !below(d6) {
                return Some(false);
            }
            if below(d8_up) && d8_exact.is_none() {
                return Some(true);
            }
            let d8 = match d8_exact {
                Some(d) => d,
                None => {
                    let d = ws.form_a8(pair)?;
                    d8_exact = Some(d);
                    d
                }
            };
            Some(below(d8))
        };
        if eta3_below(self, theta::<T>(7), true)? && self.ell(pair, norm_a, 7, 0) == 0 {
            return Some((7, 0));
        }
        if top == 13 && eta3_below(self, theta::<T>(9), true)? && self.ell(pair, norm_a, 9, 0) == 0
        {
            return Some((9, 0));
        }
        // Top degree: s from η (η₃ for f32/m = 7; η₅ = min(η₃, max(d₈, d₁₀)) for m = 13).
        let eta = if eta3_below(self, theta::<T>(top), false)? {
            // η ≤ η₃ ≤ θ: the first term of s is 0 whatever the exact values.
            0.0
        } else {
            let d8 = match d8_exact {
                Some(d) => d,
                None => self.form_a8(pair)?,
            };
            let eta3 = d6.max(d8);
            if top == 13 && d8 < d6 {
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
        // Structure of a plain input: balancing (T::BALANCE), then exact triangularity. Pairs
        // (Fréchet) are block triangular, not triangular, and run unchanged.
        let balanced = !pair && T::BALANCE && self.balance();
        let tri = if pair {
            Tri::None
        } else {
            self.detect_triangular()
        };
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
        if m == 9 && !self.a8_formed {
            let len = self.len(pair);
            mul(n, &self.a4[..len], &self.a4[..len], &mut self.a8[..len]);
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
        // Triangular input: exact diagonal and first superdiagonal of e^{2⁻ˢZ} and φ1(2⁻ˢZ).
        if tri != Tri::None {
            self.tri_stage(s_total, need_r, want_phi);
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
            if tri != Tri::None {
                // now R ≈ e^{2^{-j}Z}, P ≈ φ1(2^{-j}Z)
                self.tri_stage(s_total - step - 1, true, want_phi);
            }
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
        if tri == Tri::Lower {
            if need_r {
                transpose_in_place(n, &mut self.r);
            }
            if want_phi {
                transpose_in_place(n, &mut self.p);
            }
        }
        if balanced {
            if need_r {
                unbalance(n, &self.bal, &mut self.r);
            }
            if want_phi {
                unbalance(n, &self.bal, &mut self.p);
            }
            let ok = (!want_exp || all_finite(&self.r[..nn]))
                && (!want_phi || all_finite(&self.p[..nn]));
            if !ok {
                return Err(ElraError::Overflow {
                    what: "undoing the balancing left the floating-point range".into(),
                });
            }
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
/// Triangular Z gets its diagonal and first superdiagonal recomputed exactly after every squaring
/// (AMH 2009 Code Fragment 2.1, Higham 2008 eq. 10.42); f32 inputs are balanced first
/// (Parlett & Reinsch 1969) when that lowers the 1-norm.
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
/// Alg. 5.1 for the degree and scaling). Never divides by Z, so singular Z is fine. Triangular Z:
/// exact diagonal `φ1(z_ii)` and first superdiagonal `z_{i,i+1}·φ1[z_ii, z_{i+1,i+1}]` at every
/// squaring (the φ1 analogue of AMH 2009 Code Fragment 2.1; `phi1_divdiff` in the submodule
/// `structure`); f32 balancing as in [`expm`].
///
/// Errors as [`expm`].
pub fn phi1<T: Real>(z: &DMatrix<T>) -> Result<DMatrix<T>> {
    let ws = run_single(z, false, true)?;
    let n = ws.n();
    Ok(DMatrix::from_row_slice(n, n, &ws.p[..n * n]))
}

/// `(e^Z, φ1(Z))` from one Padé factorisation and one squaring phase (AMH 2009 Alg. 5.1 plus the
/// φ1 recurrence of the module docs; the Woodbury form of Prop. 1 needs φ1, the merge needs both),
/// with the exact triangular structure and f32 balancing of [`expm`] and [`phi1`].
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
/// matrices are not overscaled. For f32 it is the plan of the balanced matrix when balancing is
/// kept (module docs).
pub fn pade_plan<T: Real>(z: &DMatrix<T>) -> Result<PadePlan> {
    let n = check_square("z", z)?;
    super::check_finite("z", z)?;
    let mut ws = Workspace::new(n, false);
    to_row_major(z, &mut ws.a);
    ws.run(false, true, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;

    /// AMH 2009 §5: 1/|c_{2m+1}| = (2m)!(2m+1)!/(m!)², i.e. 100800 for m = 3 and 1/c_27 for m = 13.
    #[test]
    fn log2_c_is_the_backward_error_series_coefficient() {
        assert_eq!(log2_c(3), -(100800f64.log2()));
        // m = 5: 10!·11!/(5!)² = 10059033600
        assert!((log2_c(5) + 10059033600f64.log2()).abs() < 1e-12);
        // m = 13: exact big-integer value 26!·27!/(13!)² ≈ 1.1364e35
        let q = (2..=27).map(|i| i as f64).product::<f64>()
            * (14..=26).map(|i| i as f64).product::<f64>()
            / (2..=13).map(|i| i as f64).product::<f64>();
        assert!((log2_c(13) + q.log2()).abs() < 1e-12);
    }

    /// Multiplying by 2^e for absurd e must end (it once looped ~10¹⁷ times) and saturate.
    #[test]
    fn scale_pow2_terminates_and_saturates() {
        let mut x = [1.5f64, -3.0, 0.0];
        scale_pow2(&mut x, i64::MAX);
        assert_eq!(x, [f64::INFINITY, f64::NEG_INFINITY, 0.0]);
        let mut y = [1.5f64, -3.0];
        scale_pow2(&mut y, i64::MIN);
        assert!(y.iter().all(|v| *v == 0.0));
    }

    /// A direction whose 1-norm overflows f64 (finite entries near 1e308) used to hang the
    /// Fréchet adjoint; it must now return promptly: a finite result or a typed error.
    #[test]
    fn frechet_adjoint_with_overflowing_norms_returns() {
        let z = DMatrix::<f64>::from_row_slice(2, 2, &[0.1, 0.2, -0.3, 0.05]);
        let g = DMatrix::<f64>::from_row_slice(2, 2, &[1e308, 1e308, 1e308, -1e308]);
        match crate::linalg::phi1_frechet_adjoint(&z, &g) {
            Ok(l) => assert!(l.iter().all(|v| v.is_finite())),
            Err(e) => assert!(matches!(e, crate::ElraError::Overflow { .. }), "{e}"),
        }
        let zb = DMatrix::<f64>::from_row_slice(2, 2, &[1e308, 1e308, 1e308, 1e308]);
        let r = crate::linalg::expm_frechet_adjoint(&zb, &g);
        assert!(r.is_err(), "exp of a matrix of norm 2e308 must overflow");
    }
}
