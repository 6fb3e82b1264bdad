//! Dense linear algebra on small matrices: the r×r matrix functions at the heart of ELRA.
//!
//! ELRA never exponentiates a d×d matrix. Proposition 1 (eq. 4, App. C eq. 28–30) reduces
//! `exp(A C)` to `I + A φ1(C A) C`, so only the r×r matrix `Z = C A` goes through a matrix
//! function. This module provides those functions for `f32` and `f64`.

use nalgebra::{DMatrix, RealField};

/// A floating-point type the matrix functions support (`f32`, `f64`).
///
/// It carries the precision-dependent constants of the Padé scaling-and-squaring algorithm
/// (Higham 2005, Table 2.3 / Al-Mohy & Higham 2009, Table 3.1): the Padé degrees `m` that may be
/// used and the 1-norm bound `θ_m` up to which the `[m/m]` approximant of `exp` has backward
/// error below the unit roundoff.
pub trait Real:
    RealField + Copy + Default + std::fmt::Debug + std::fmt::Display + Send + Sync + 'static
{
    /// `"f32"` or `"f64"`.
    const NAME: &'static str;
    /// Unit roundoff `u = 2^-p` (2⁻²⁴ for f32, 2⁻⁵³ for f64).
    const UNIT_ROUNDOFF: f64;
    /// Pairs `(m, θ_m)` in increasing order of `m`.
    const PADE: &'static [(usize, f64)];
    /// Whether a plain (non-Fréchet) run balances its input first: an exact power-of-two
    /// diagonal similarity `B = D⁻¹ZD` (Parlett & Reinsch 1969, EISPACK `balanc` with radix 2),
    /// kept only when it lowers `‖·‖₁`, and `f(Z) = D f(B) D⁻¹` (module docs of
    /// [`linalg::expm`](mod@crate::linalg::expm), `docs/numerics.md`). `true` for f32 only: it is
    /// the step that removes most of the f32 error on badly scaled matrices; f64 keeps its
    /// results bit for bit.
    const BALANCE: bool = false;
    /// Converts from `f64` (rounding).
    fn of(x: f64) -> Self;
    /// Converts to `f64` (exact).
    fn f64(self) -> f64;
}

impl Real for f64 {
    const NAME: &'static str = "f64";
    const UNIT_ROUNDOFF: f64 = 1.1102230246251565e-16;
    const PADE: &'static [(usize, f64)] = &[
        (3, 1.495585217958292e-2),
        (5, 2.53939833006323e-1),
        (7, 9.504178996162932e-1),
        (9, 2.097847961257068),
        (13, 5.371920351148152),
    ];
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
}

impl Real for f32 {
    const NAME: &'static str = "f32";
    const UNIT_ROUNDOFF: f64 = 5.960464477539063e-8;
    const PADE: &'static [(usize, f64)] = &[
        (3, 4.258730016922831e-1),
        (5, 1.880152677804762),
        (7, 3.92572478313866),
    ];
    const BALANCE: bool = true;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
}

/// Whether every value of `s` is finite: `v·0` is 0 for a finite `v` and NaN for NaN or ±∞, so
/// the sum of `v·0` over `s` is 0 exactly when all are finite. Eight independent partial sums
/// let the compiler use SIMD registers (a branch per value would not); one pass, no early exit.
pub fn all_finite<T: Real>(s: &[T]) -> bool {
    let z = T::zero();
    let mut acc = [z; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += c[l] * z;
        }
    }
    let tail = chunks.remainder().iter().fold(z, |a, &v| a + v * z);
    acc.iter().fold(tail, |a, &v| a + v) == z
}

/// Returns an error naming `arg` if any entry of `m` is NaN or infinite.
pub fn check_finite<T: Real>(arg: &'static str, m: &DMatrix<T>) -> crate::Result<()> {
    if all_finite(m.as_slice()) {
        Ok(())
    } else {
        Err(crate::ElraError::NonFinite { arg })
    }
}

/// `m·2^(−e)` and `e`: the power of two that brings the largest `|m_ij|` of a finite `m` near 1
/// when it lies outside `2^(±emax/4)` (`emax` = 127 for f32, 1023 for f64), else `m` itself
/// and `e = 0`. Scaling by a power of two is exact for entries that stay in the normal range
/// (entries far below the largest may become subnormal and lose low bits — negligible against
/// σ), and QR, SVD and eigensolvers are scale-equivariant, so a caller undoes it on its result
/// (`σ(2^e M) = 2^e σ(M)`, singular vectors unchanged) — the unscaled run, whose sums of squares
/// would overflow or underflow on such entries, never happens.
pub(crate) fn pow2_balanced<T: Real>(m: &DMatrix<T>) -> (DMatrix<T>, i64) {
    let big = m.iter().fold(0.0f64, |acc, v| acc.max(v.f64().abs()));
    let emax: i64 = if T::of(1e300).is_finite() { 1023 } else { 127 };
    if big == 0.0 || !big.is_finite() {
        return (m.clone(), 0);
    }
    let e = big.log2().floor() as i64;
    if e.abs() <= emax / 4 {
        return (m.clone(), 0);
    }
    let mut s = m.clone();
    expm::scale_pow2(s.as_mut_slice(), -e);
    (s, e)
}

pub mod expm;
pub use expm::{expm, expm_phi1, pade_plan, phi1, PadePlan};
pub mod frechet;
pub use frechet::{expm_frechet, expm_frechet_adjoint, phi1_frechet, phi1_frechet_adjoint};
pub mod batch;
pub(crate) mod jacobi;
pub use batch::MatFnBatch;
