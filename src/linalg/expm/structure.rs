//! Exact structure for the Padé kernel of [`super`]: the scalar functions and divided
//! differences that give the diagonal and first superdiagonal of `e^T` and `φ1(T)` for triangular
//! T exactly (AMH 2009 Code Fragment 2.1, Higham 2008 eq. 10.42), finding triangular input, and
//! Parlett–Reinsch balancing (f32). `docs/numerics.md` has the measurements.

use super::{ldexp_steps, norm1, Workspace};
use crate::linalg::Real;

/// `φ1(x) = (eˣ − 1)/x` of a scalar (`φ1(0) = 1`), as `expm1(x)/x` in f64: no cancellation, a
/// relative error of at most 1.96 u (u = 2⁻⁵³) measured over 6·10⁴ points
/// (`tests/data/measure_numerics.py divdiff`, `docs/numerics.md`).
pub(crate) fn phi1_scalar(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        x.exp_m1() / x
    }
}

/// The divided difference `exp[x, y] = (eˣ − eʸ)/(x − y)` (`= eˣ` at `x = y`): the first
/// superdiagonal entry of `exp([[x, 1], [0, y]])` (Higham 2008, *Functions of Matrices*,
/// eq. 10.42; AMH 2009, Code Fragment 2.1).
///
/// Evaluated as `e^M · φ1(−δ)` with `M = max(x, y)` and `δ = |x − y|`:
/// `(eˣ − eʸ)/(x − y) = e^M (1 − e^{−δ})/δ`. `φ1(−δ) = expm1(−δ)/(−δ)` has no cancellation for
/// any δ ≥ 0 (the `(a − b)/2` sinh form of SciPy's `_exp_sinch` is the same function, but
/// `e^{(x+y)/2}·sinh((x−y)/2)` overflows in the sinh for far-apart x, y where the quotient is
/// finite). Relative error ≤ 3.3 u measured over 6·10⁴ points where the result is a normal
/// number (`docs/numerics.md`).
pub(crate) fn exp_divdiff(x: f64, y: f64) -> f64 {
    let (m, d) = if x >= y { (x, x - y) } else { (y, y - x) };
    m.exp() * phi1_scalar(-d)
}

/// Terms of the series branch of [`phi1_divdiff`].
const PHI1_DD_TERMS: usize = 30;

/// The divided difference `φ1[x, y] = (φ1(x) − φ1(y))/(x − y)` (`= φ1'(x)` at `x = y`): the
/// first superdiagonal entry of `φ1([[x, 1], [0, y]])`, i.e. `φ1(T)_{i,i+1} = t_{i,i+1}·φ1[t_ii,
/// t_{i+1,i+1}]` for triangular T (Higham 2008, Thm 4.11 / eq. 10.42 applied to φ1).
///
/// **Derivation.** `φ1(z) = (e^z − e⁰)/(z − 0) = exp[z, 0]`, the first divided difference of exp
/// at z and 0. Divided differences are symmetric and satisfy
/// `f[x, y, w] = (f[x, w] − f[y, w])/(x − y)`, so
/// `φ1[x, y] = (exp[x, 0] − exp[y, 0])/(x − y) = exp[x, y, 0]`, the second divided difference of
/// exp at `x, y, 0` (confluent points included: `φ1'(x) = exp[x, x, 0]`). Two expansions of it:
/// - recursion with 0 as the last node: `exp[x, y, 0] = (exp[x, y] − exp[y, 0])/(x − 0)
///   = (exp[x, y] − φ1(y))/x`, and by symmetry also `(exp[x, y] − φ1(x))/y`;
/// - the power series: `exp[x, y, 0] = Σ_{k≥0} h_k(x, y)/(k+2)!` with the complete homogeneous
///   polynomials `h_k(x, y) = Σ_{i=0}^{k} xⁱy^{k−i}` (divided differences of `z^{k+2}/(k+2)!` at
///   `x, y, 0`), where `h_0 = 1`, `h_k = x·h_{k−1} + y^k`.
///
/// **Evaluation** (with `|x| ≥ |y|` after a swap): the series when `|x| < 1`, or when
/// `0 ≤ y ≤ x < 2` (all terms positive); 30 terms, summed smallest first, leave a tail below
/// 10⁻²⁰ of the sum there (`exp[x, y, 0] = e^ξ/2 ≥ e⁻¹/2` for some ξ in the hull of the nodes).
/// Otherwise the recursion, dividing by the node of modulus ≥ 1: by y when `x < 0 < 1 ≤ y`
/// (there `φ1(x) < φ1(y)`, the smaller subtraction), else by x. Every branch keeps the
/// cancellation ratio `(|exp[x,y]| + |φ1(·)|)/|numerator|` below ≈ 5; the measured relative
/// error is ≤ 6.4 u over 6·10⁴ points, confluent and nearly confluent pairs included
/// (`docs/numerics.md`).
pub(crate) fn phi1_divdiff(x: f64, y: f64) -> f64 {
    let (x, y) = if x.abs() >= y.abs() { (x, y) } else { (y, x) };
    if x.abs() < 1.0 || (x >= 0.0 && y >= 0.0 && x < 2.0) {
        let mut terms = [0.0f64; PHI1_DD_TERMS];
        let (mut h, mut yk, mut fact) = (1.0f64, 1.0f64, 1.0f64);
        for (k, term) in terms.iter_mut().enumerate() {
            if k > 0 {
                yk *= y;
                h = x * h + yk;
            }
            fact *= (k + 2) as f64;
            *term = h / fact;
        }
        terms.iter().rev().fold(0.0, |acc, &t| acc + t)
    } else if x < 0.0 && y >= 1.0 {
        (exp_divdiff(x, y) - phi1_scalar(x)) / y
    } else {
        (exp_divdiff(x, y) - phi1_scalar(y)) / x
    }
}

/// Triangular structure of a plain input, found exactly (every strictly lower, or every
/// strictly upper, entry is zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tri {
    /// Neither: the general algorithm.
    None,
    /// Upper triangular (diagonal and 1×1 matrices included).
    Upper,
    /// Lower triangular, not upper: run on the transpose (`f(Zᵀ) = f(Z)ᵀ`), transposed back.
    Lower,
}

/// Most sweeps of [`Workspace::balance`] (it stops earlier once no scaling is accepted).
const BAL_MAX_SWEEPS: usize = 32;
/// Largest `|e_i|` of a balancing scale `2^{e_i}`.
const BAL_MAX_EXP: i32 = 60;

/// Transposes the n×n row-major matrix in `x[..n²]` in place.
pub(super) fn transpose_in_place<T: Real>(n: usize, x: &mut [T]) {
    for i in 0..n {
        for j in i + 1..n {
            x.swap(i * n + j, j * n + i);
        }
    }
}

/// `X ← D X D⁻¹` with `D = diag(2^{e_i})` (undoes [`Workspace::balance`]): `x_ij·2^{e_i − e_j}`,
/// the product formed exactly in f64 (`|e_i − e_j| ≤ 120`) and rounded once to T.
pub(super) fn unbalance<T: Real>(n: usize, e: &[i32], x: &mut [T]) {
    for (i, row) in x[..n * n].chunks_exact_mut(n).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let k = e[i] - e[j];
            if k != 0 {
                *v = T::of(v.f64() * 2f64.powi(k));
            }
        }
    }
}

impl<T: Real> Workspace<T> {
    /// Balances the plain n×n input in `a` (Parlett & Reinsch 1969; EISPACK `balanc` with radix
    /// 2): sweeps over i, with `c`, `r` the 1-norms of column and row i without the diagonal
    /// (summed in f64 in index order), pick the power of two `f = 2^k` that brings `c·f` within a
    /// factor 2 of `r/f` (`|e_i| ≤ 60`), and apply it (row i times `1/f`, column i times `f`,
    /// exact barring under/overflow) when it lowers `c + r` below `0.95·(c + r)`; stop after a
    /// sweep without change (at most 32 sweeps). Afterwards `a = D⁻¹ZD`,
    /// `D = diag(2^{bal[i]})`. The result is kept only when `‖D⁻¹ZD‖₁ < ‖Z‖₁`; otherwise `a` is
    /// restored from a copy and the run is unbalanced. Returns whether it is kept.
    pub(super) fn balance(&mut self) -> bool {
        let n = self.n;
        let nn = n * n;
        self.bal[..n].fill(0);
        if n < 2 {
            return false;
        }
        self.r[..nn].copy_from_slice(&self.a[..nn]);
        let a = &mut self.a[..nn];
        let mut changed = false;
        for _ in 0..BAL_MAX_SWEEPS {
            let mut noconv = false;
            for i in 0..n {
                let (mut c, mut r) = (0.0f64, 0.0f64);
                for j in 0..n {
                    if j != i {
                        c += a[j * n + i].abs().f64();
                        r += a[i * n + j].abs().f64();
                    }
                }
                if c == 0.0 || r == 0.0 {
                    continue;
                }
                let s = c + r;
                let e = self.bal[i];
                let mut k = 0i32;
                while c < r * 0.5 && e + k < BAL_MAX_EXP {
                    k += 1;
                    c *= 4.0;
                }
                while c >= r * 2.0 && e + k > -BAL_MAX_EXP {
                    k -= 1;
                    c *= 0.25;
                }
                // (c + r)/f: the new sums c₀f + r/f, c having been multiplied by f².
                if k == 0 || (c + r) * 2f64.powi(-k) >= 0.95 * s {
                    continue;
                }
                self.bal[i] = e + k;
                noconv = true;
                changed = true;
                let (g, f) = (T::of(2f64.powi(-k)), T::of(2f64.powi(k)));
                for v in a[i * n..(i + 1) * n].iter_mut() {
                    *v *= g;
                }
                for row in a.chunks_exact_mut(n) {
                    row[i] *= f;
                }
            }
            if !noconv {
                break;
            }
        }
        if changed {
            let before = norm1(n, &self.r[..nn], &mut self.vec1);
            let after = norm1(n, &self.a[..nn], &mut self.vec1);
            if after < before {
                return true;
            }
            self.a[..nn].copy_from_slice(&self.r[..nn]);
            self.bal[..n].fill(0);
        }
        false
    }

    /// Finds exact triangular structure of the plain n×n input in `a` (all strictly lower entries
    /// zero: upper; else all strictly upper entries zero: lower, and `a` is transposed in place
    /// so that the run sees an upper triangular matrix). For either, stores the diagonal and the
    /// first superdiagonal in `tri`.
    ///
    /// 1×1 inputs are left to the general path (`Tri::None`): their results stay bit for bit
    /// what they were before the triangular path existed, which committed experiment tables
    /// reproduce to the last printed digit (`tests/expressivity_elra.rs`,
    /// `prop3_committed_table_is_reproduced`, rank 1); `docs/numerics.md` gives their error.
    pub(super) fn detect_triangular(&mut self) -> Tri {
        let n = self.n;
        if n < 2 {
            return Tri::None;
        }
        let a = &self.a[..n * n];
        let zero = T::zero();
        let lower_zero = (1..n).all(|i| a[i * n..i * n + i].iter().all(|&v| v == zero));
        let kind = if lower_zero {
            Tri::Upper
        } else if (0..n).all(|i| a[i * n + i + 1..(i + 1) * n].iter().all(|&v| v == zero)) {
            transpose_in_place(n, &mut self.a);
            Tri::Lower
        } else {
            return Tri::None;
        };
        for i in 0..n {
            self.tri[i] = self.a[i * n + i];
            if i + 1 < n {
                self.tri[n + i] = self.a[i * n + i + 1];
            }
        }
        kind
    }

    /// Overwrites the diagonal and the first superdiagonal of `r` (when `fix_r`) and `p` (when
    /// `fix_p`) with their exact values at stage j, i.e. for `X = 2⁻ʲT` (T the upper triangular
    /// input, `tri` its diagonal and superdiagonal; AMH 2009 Code Fragment 2.1, Higham 2008
    /// eq. 10.42):
    /// `e^X_ii = exp(x_i)`, `e^X_{i,i+1} = t_i·exp[x_i, x_{i+1}]`,
    /// `φ1(X)_ii = φ1(x_i)`, `φ1(X)_{i,i+1} = t_i·φ1[x_i, x_{i+1}]`
    /// (`x_i = 2⁻ʲT_ii`, `t_i = 2⁻ʲT_{i,i+1}`, all in f64, then rounded once to T; see
    /// [`exp_divdiff`], [`phi1_divdiff`]). A diagonal value that overflows T is written (the
    /// entry of the result overflows: the run then reports it); a superdiagonal value that is not
    /// finite (an intermediate overflow of the formula) leaves the computed entry in place, and so
    /// does `t_i = 0` (the computed entry is then an exact zero).
    pub(super) fn tri_stage(&mut self, j: i64, fix_r: bool, fix_p: bool) {
        let n = self.n;
        for i in 0..n {
            let x = ldexp_steps(self.tri[i].f64(), -j);
            if fix_r {
                self.r[i * n + i] = T::of(x.exp());
            }
            if fix_p {
                self.p[i * n + i] = T::of(phi1_scalar(x));
            }
            // t = 0: the computed entry is an exact zero already (every product and solve of
            // the run keeps it); it is left alone, sign of zero included.
            if i + 1 < n && self.tri[n + i] != T::zero() {
                let y = ldexp_steps(self.tri[i + 1].f64(), -j);
                let t = ldexp_steps(self.tri[n + i].f64(), -j);
                if fix_r {
                    let v = T::of(t * exp_divdiff(x, y));
                    if v.is_finite() {
                        self.r[i * n + i + 1] = v;
                    }
                }
                if fix_p {
                    let v = T::of(t * phi1_divdiff(x, y));
                    if v.is_finite() {
                        self.p[i * n + i + 1] = v;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp[x, y]` and `φ1[x, y]` against mpmath at 60 digits (values below, 20 digits), one or
    /// more points per branch of [`phi1_divdiff`] (series: |x| < 1 and 0 ≤ y ≤ x < 2; recursion
    /// dividing by y, and by x), confluent and nearly confluent pairs, far-apart and extreme
    /// nodes. Tolerances: 4 u for exp[x, y] (measured ≤ 3.3 u), 8 u for φ1[x, y] (measured
    /// ≤ 6.4 u), both over 6·10⁴ points (`docs/numerics.md`), u = 2⁻⁵³.
    #[test]
    #[allow(clippy::excessive_precision)] // mpmath's digits, as printed
    fn divided_differences_match_mpmath() {
        #[rustfmt::skip]
        let cases: [(f64, f64, f64, f64); 13] = [
            (0.3, -0.2, 1.0622561089960424788, 0.51969958128650594272),
            (1.5, 0.7, 3.0849204535844853168, 1.0911348667034887859),
            (-0.5, -0.5, 0.6065306597126334236, 0.36081604172419945838),
            (1.0, 1.0, std::f64::consts::E, 1.0),
            (-1.0, -1.0, 0.3678794411714423216, 0.26424111765711535681),
            (-3.0, 2.0, 1.4678538061125572569, 0.57555808111758928559),
            (5.0, 5.000000001, 148.41315917678318914, 23.786105466496352204),
            (-40.0, -39.999999999, 4.2483542574157587528e-18, 0.00062500000001562483692),
            (700.0, -700.0, 7.244514676678603639e300, 1.034930668096943377e298),
            (-2000.0, 100.0, 1.2800557818172073564e40, 1.2800557818172073564e38),
            (1e-300, 0.0, 1.0, 0.5),
            (0.0, 0.0, 1.0, 0.5),
            (-1.0146573669524792, 0.10534298570193812, 0.66836140687145519516, 0.38063032485299751761),
        ];
        let u = f64::EPSILON / 2.0;
        for (x, y, e_ref, p_ref) in cases {
            for (a, b) in [(x, y), (y, x)] {
                let (e, p) = (exp_divdiff(a, b), phi1_divdiff(a, b));
                assert!(
                    (e - e_ref).abs() <= 4.0 * u * e_ref.abs(),
                    "exp[{a}, {b}] = {e:e}, want {e_ref:e}"
                );
                assert!(
                    (p - p_ref).abs() <= 8.0 * u * p_ref.abs(),
                    "φ1[{a}, {b}] = {p:e}, want {p_ref:e}"
                );
            }
            // symmetric bit for bit (φ1 swaps to |x| ≥ |y| first; exp takes max/min)
            assert_eq!(phi1_divdiff(x, y).to_bits(), phi1_divdiff(y, x).to_bits());
            assert_eq!(exp_divdiff(x, y).to_bits(), exp_divdiff(y, x).to_bits());
        }
        // continuity across the branch boundaries |x| = 1 and x = 2: one ulp on either side of
        // the boundary node (the function itself moves by ≈ 2 u there)
        for (x, y) in [
            (1.0f64, -0.3),
            (1.0, 0.5),
            (-1.0, 0.2),
            (2.0, 1.5),
            (2.0, 0.0),
            (-1.0, 1.0),
        ] {
            let below = phi1_divdiff(f64::from_bits(x.to_bits() - 1), y);
            let above = phi1_divdiff(f64::from_bits(x.to_bits() + 1), y);
            assert!(
                (below - above).abs() <= 16.0 * u * below.abs(),
                "jump at ({x}, {y})"
            );
        }
    }
}
