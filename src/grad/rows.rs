//! The generic primitive of every ELRA variant: `exp(A C)` applied to rows, and its reverse mode.
//!
//! For a batch `X` (N×n, samples as rows) and a generator `G = A C` (`A` n×r, `C` r×n), eq. (5)
//! with samples as rows reads (Prop. 1, `exp(AC) = I + A φ1(CA) C`):
//!
//! ```text
//! V = X Cᵀ (N×r),  T = V Mᵀ (N×r),  Y = X exp(G)ᵀ = X + D ∘ (T Aᵀ),   M = φ1(Z), Z = C A,
//! ```
//!
//! where `D` is an optional dropout mask on the adapter output (App. H: "dropout p = 0.05 on
//! adapter outputs"; entries 0 or 1/(1−p)), `D = 1` without dropout. The left factor of ELRA
//! (`U = X W0ᵀ`, then rows of `exp(L)`) and both factors of the double-sided variant (App. B:
//! rows of `X exp(R)ᵀ W0ᵀ exp(L)ᵀ`) are this primitive.
//!
//! **Reverse mode.** Given `Ȳ = ∂L/∂Y`, with `Δ̄ = D ∘ Ȳ`:
//!
//! ```text
//! T̄ = Δ̄ A,  Ā = Δ̄ᵀ T,  V̄ = T̄ M,  M̄ = T̄ᵀ V,  C̄ = V̄ᵀ X,  X̄ = Ȳ + V̄ C,
//! Z̄ = L_φ1(Z)*(M̄) = L_φ1(Zᵀ, M̄),  C̄ += Z̄ Aᵀ,  Ā += Cᵀ Z̄.
//! ```
//!
//! Derivation: `dY = dX + D∘(dT Aᵀ + T dAᵀ)`, so `⟨Ȳ, D∘(T dAᵀ)⟩ = ⟨Δ̄ᵀT, dA⟩` and
//! `T̄ = Δ̄A`; `dT = dV Mᵀ + V dMᵀ` gives `V̄ = T̄M`, `M̄ = T̄ᵀV`; `dV = dX Cᵀ + X dCᵀ` gives
//! `X̄ += V̄C`, `C̄ = V̄ᵀX`; `dM = L_φ1(Z, dZ)` with the adjoint `L_φ1(Zᵀ, ·)` (real power
//! series); `dZ = dC A + C dA` gives the last two terms. Only N×r, r×n and r×r matrices are
//! formed besides `Y` and `X̄`; no n×n matrix appears.
#![allow(non_snake_case)]

use nalgebra::DMatrix;

use super::ops::{add_rank_r, gemm, matmul, Op};
use super::phi1_adjoint;
use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// The intermediates of [`exp_rows_forward`] that [`exp_rows_backward`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpRowsTape<T: Real> {
    /// `V = X Cᵀ` (N×r).
    pub v: DMatrix<T>,
    /// `T = V Mᵀ` (N×r).
    pub t: DMatrix<T>,
    /// The dropout mask `D` (N×n) applied to the increment, if any.
    pub mask: Option<DMatrix<T>>,
}

/// Gradients of [`exp_rows_backward`]: with respect to the input rows and the two factors of
/// the generator `G = A C`, taken as independent matrices.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpRowsGrad<T: Real> {
    /// `∂L/∂X` (N×n).
    pub x: DMatrix<T>,
    /// `∂L/∂A` (n×r).
    pub a: DMatrix<T>,
    /// `∂L/∂C` (r×n).
    pub c: DMatrix<T>,
}

/// Checks `A` (n×r), `C` (r×n), `Z`, `M` (r×r) and returns `(n, r)`.
pub(crate) fn check_factors<T: Real>(
    a: &DMatrix<T>,
    c: &DMatrix<T>,
    z: Option<&DMatrix<T>>,
    m: &DMatrix<T>,
) -> Result<(usize, usize)> {
    let (n, r) = a.shape();
    if r == 0 || n == 0 {
        return Err(ElraError::invalid(
            "a",
            "the factor A must be n×r with n, r ≥ 1",
        ));
    }
    if c.shape() != (r, n) {
        return Err(ElraError::shape("c", (r, n), c.shape()));
    }
    if m.shape() != (r, r) {
        return Err(ElraError::shape("m", (r, r), m.shape()));
    }
    if let Some(z) = z {
        if z.shape() != (r, r) {
            return Err(ElraError::shape("z", (r, r), z.shape()));
        }
    }
    Ok((n, r))
}

/// Checks a dropout mask against the output shape.
pub(crate) fn check_mask<T: Real>(mask: Option<&DMatrix<T>>, shape: (usize, usize)) -> Result<()> {
    if let Some(d) = mask {
        if d.shape() != shape {
            return Err(ElraError::shape("mask", shape, d.shape()));
        }
        check_finite("mask", d)?;
    }
    Ok(())
}

/// `Y = X exp(AC)ᵀ = X + D∘(((X Cᵀ) Mᵀ) Aᵀ)` (Prop. 1 / eq. 5 with samples as rows), keeping
/// `V` and `T` for the reverse mode.
///
/// `m` must be `φ1(C A)`; it is passed in so that one evaluation per optimiser step serves
/// every minibatch (Algorithm 1 line 5). `mask` is an optional dropout mask on the increment.
///
/// Errors: `a` (n×r, n, r ≥ 1), `c` (r×n), `m` (r×r), `x` (N×n, finite), `mask` (N×n).
pub fn exp_rows_forward<T: Real>(
    x: &DMatrix<T>,
    a: &DMatrix<T>,
    c: &DMatrix<T>,
    m: &DMatrix<T>,
    mask: Option<&DMatrix<T>>,
) -> Result<(DMatrix<T>, ExpRowsTape<T>)> {
    exp_rows_forward_impl(x, a, c, m, mask, true)
}

/// [`exp_rows_forward`]; `check_x = false` skips the finiteness pass over `x` for callers that
/// produced `x` from checked inputs (the layer's `U = X W0ᵀ`).
pub(crate) fn exp_rows_forward_impl<T: Real>(
    x: &DMatrix<T>,
    a: &DMatrix<T>,
    c: &DMatrix<T>,
    m: &DMatrix<T>,
    mask: Option<&DMatrix<T>>,
    check_x: bool,
) -> Result<(DMatrix<T>, ExpRowsTape<T>)> {
    let (n, _) = check_factors(a, c, None, m)?;
    if x.ncols() != n {
        return Err(ElraError::shape("x", (x.nrows(), n), x.shape()));
    }
    if check_x {
        check_finite("x", x)?;
    }
    check_mask(mask, x.shape())?;
    let v = matmul(x, Op::N, c, Op::T);
    let t = matmul(&v, Op::N, m, Op::T);
    let y = match mask {
        None => add_rank_r(x, &t, a),
        Some(d) => {
            let mut delta = matmul(&t, Op::N, a, Op::T);
            delta.component_mul_assign(d);
            delta += x;
            delta
        }
    };
    Ok((
        y,
        ExpRowsTape {
            v,
            t,
            mask: mask.cloned(),
        },
    ))
}

/// Reverse mode of [`exp_rows_forward`] (module docs): from `Ȳ` (taken by value and reused
/// as the buffer of `X̄`) returns `∂L/∂X`, `∂L/∂A` and `∂L/∂C`, including the path through
/// `M = φ1(Z)`, `Z = C A` (Fréchet adjoint `L_φ1(Zᵀ, M̄)`).
///
/// Errors: shapes of `a`, `c`, `z`, `m`, `x`, `tape`, `ybar`; a non-finite `ybar`; failures of
/// the Fréchet adjoint.
pub fn exp_rows_backward<T: Real>(
    x: &DMatrix<T>,
    a: &DMatrix<T>,
    c: &DMatrix<T>,
    z: &DMatrix<T>,
    m: &DMatrix<T>,
    tape: &ExpRowsTape<T>,
    ybar: DMatrix<T>,
) -> Result<ExpRowsGrad<T>> {
    let (n, r) = check_factors(a, c, Some(z), m)?;
    let nb = x.nrows();
    if x.ncols() != n {
        return Err(ElraError::shape("x", (nb, n), x.shape()));
    }
    if ybar.shape() != (nb, n) {
        return Err(ElraError::shape("ybar", (nb, n), ybar.shape()));
    }
    if tape.v.shape() != (nb, r) || tape.t.shape() != (nb, r) {
        return Err(ElraError::shape("tape", (nb, r), tape.v.shape()));
    }
    check_mask(tape.mask.as_ref(), (nb, n))?;
    check_finite("ybar", &ybar)?;
    let (tbar, mut abar) = match &tape.mask {
        None => (
            matmul(&ybar, Op::N, a, Op::N),
            matmul(&ybar, Op::T, &tape.t, Op::N),
        ),
        Some(d) => {
            let dbar = ybar.component_mul(d);
            (
                matmul(&dbar, Op::N, a, Op::N),
                matmul(&dbar, Op::T, &tape.t, Op::N),
            )
        }
    };
    let vbar = matmul(&tbar, Op::N, m, Op::N);
    let mbar = matmul(&tbar, Op::T, &tape.v, Op::N);
    let mut cbar = matmul(&vbar, Op::T, x, Op::N);
    let mut xbar = ybar;
    gemm(&mut xbar, T::one(), &vbar, Op::N, c, Op::N, T::one());
    let zbar = phi1_adjoint(z, &mbar)?;
    gemm(&mut cbar, T::one(), &zbar, Op::N, a, Op::T, T::one());
    gemm(&mut abar, T::one(), c, Op::T, &zbar, Op::N, T::one());
    Ok(ExpRowsGrad {
        x: xbar,
        a: abar,
        c: cbar,
    })
}
