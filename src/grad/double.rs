//! Reverse mode of double-sided ELRA (App. B, eq. 22): `W_new = exp(L) W0 exp(R)`.
//!
//! With samples as rows, `Y = X W_newᵀ = ((X exp(R)ᵀ) W0ᵀ) exp(L)ᵀ`: the rows primitive of
//! [`super::rows`] with the right generator `R = A_R C_R` (k×k) on `X`, the frozen product, then
//! the primitive with the left generator `L = A_L C_L` (d×d):
//!
//! ```text
//! X_R = X + ((X C_Rᵀ) M_Rᵀ) A_Rᵀ,   U = X_R W0ᵀ,   Y = U + D∘(((U C_Lᵀ) M_Lᵀ) A_Lᵀ).
//! ```
//!
//! Backward: the left primitive's reverse mode gives `Ū`, `Ā_L`, `C̄_L`; `X̄_R = Ū W0`; the right
//! primitive's reverse mode gives `X̄`, `Ā_R`, `C̄_R`; each side then adds its energy gradient and
//! runs its own chain through clip, variant and η ([`super::generator`]). The dropout mask, if
//! any, acts on the left (output-side) increment. No d×d or k×k matrix is formed.
#![allow(non_snake_case)]

use nalgebra::DMatrix;

use super::elra::GeneratorTape;
use super::generator::FactorGrad;
use super::ops::{matmul, Op};
use super::rows::{exp_rows_backward, exp_rows_forward, ExpRowsTape};
use crate::adapter::{DoubleSidedLayer, GeneratorSpec};
use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// The trainable parameters of one side: `A` (n×r), `B` (r×n, `None` for PSD), η.
#[derive(Debug, Clone, Copy)]
pub struct SideParams<'a, T: Real> {
    /// `A` (n×r).
    pub a: &'a DMatrix<T>,
    /// `B` (r×n); `None` for ELRA-PSD.
    pub b: Option<&'a DMatrix<T>>,
    /// η of this side.
    pub eta: T,
}

/// Everything a double-sided forward pass keeps for its reverse mode.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleTape<T: Real> {
    /// The left generator `L` (d×d) of the step.
    pub left: GeneratorTape<T>,
    /// The right generator `R` (k×k) of the step.
    pub right: GeneratorTape<T>,
    /// The right primitive's tape (on `X`).
    pub right_rows: ExpRowsTape<T>,
    /// `U = X exp(R)ᵀ W0ᵀ` (N×d).
    pub u: DMatrix<T>,
    /// The left primitive's tape (on `U`).
    pub left_rows: ExpRowsTape<T>,
}

/// Gradients of a double-sided layer.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleGrad<T: Real> {
    /// `∂L/∂X` (N×k).
    pub x: DMatrix<T>,
    /// `∂L/∂(A_L, B_L, η_L)`.
    pub left: FactorGrad<T>,
    /// `∂L/∂(A_R, B_R, η_R)`.
    pub right: FactorGrad<T>,
}

/// Double-sided forward (App. B eq. 22, module docs) on explicit matrices: `W0` (d×k), the left
/// side (`A_L` d×r_L), the right side (`A_R` k×r_R), one [`GeneratorSpec`] shared by both sides
/// (α, η multiplier, τ and λ applied to each generator), an optional dropout mask (N×d).
///
/// Errors: shapes, non-finite inputs, and those of [`GeneratorTape::new`].
pub fn double_forward_parts<T: Real>(
    x: &DMatrix<T>,
    w0: &DMatrix<T>,
    left: SideParams<'_, T>,
    right: SideParams<'_, T>,
    spec: &GeneratorSpec,
    mask: Option<&DMatrix<T>>,
) -> Result<(DMatrix<T>, DoubleTape<T>)> {
    let (d, k) = w0.shape();
    if left.a.nrows() != d {
        return Err(ElraError::shape(
            "a_left",
            (d, left.a.ncols()),
            left.a.shape(),
        ));
    }
    if right.a.nrows() != k {
        return Err(ElraError::shape(
            "a_right",
            (k, right.a.ncols()),
            right.a.shape(),
        ));
    }
    if x.ncols() != k {
        return Err(ElraError::shape("x", (x.nrows(), k), x.shape()));
    }
    check_finite("x", x)?;
    let lt = GeneratorTape::new(left.a, left.b, left.eta, spec)?;
    let rt = GeneratorTape::new(right.a, right.b, right.eta, spec)?;
    let (xr, right_rows) = exp_rows_forward(x, &rt.a, &rt.c, &rt.m, None)?;
    let u = matmul(&xr, Op::N, w0, Op::T);
    let (y, left_rows) = exp_rows_forward(&u, &lt.a, &lt.c, &lt.m, mask)?;
    Ok((
        y,
        DoubleTape {
            left: lt,
            right: rt,
            right_rows,
            u,
            left_rows,
        },
    ))
}

/// Reverse mode of [`double_forward_parts`] (module docs), including both energy penalties.
///
/// Errors: shapes of `x`, `w0`, `ybar`; non-finite `ybar`; Fréchet-adjoint failures.
pub fn double_backward_parts<T: Real>(
    x: &DMatrix<T>,
    w0: &DMatrix<T>,
    tape: &DoubleTape<T>,
    ybar: DMatrix<T>,
) -> Result<DoubleGrad<T>> {
    let (d, k) = w0.shape();
    if tape.u.shape() != (x.nrows(), d) || x.ncols() != k {
        return Err(ElraError::shape("x", (tape.u.nrows(), k), x.shape()));
    }
    let (l, r) = (&tape.left, &tape.right);
    let gl = exp_rows_backward(&tape.u, &l.a, &l.c, &l.z, &l.m, &tape.left_rows, ybar)?;
    let gxr = matmul(&gl.x, Op::N, w0, Op::N);
    let gr = exp_rows_backward(x, &r.a, &r.c, &r.z, &r.m, &tape.right_rows, gxr)?;
    Ok(DoubleGrad {
        x: gr.x,
        left: l.finish(gl.a, gl.c)?,
        right: r.finish(gr.a, gr.c)?,
    })
}

/// [`double_forward_parts`] for a [`DoubleSidedLayer`] at its current step (App. B eq. 22): its
/// `W0`, `(A_L, B_L, η_L)`, `(A_R, B_R, η_R)` and [`DoubleSidedLayer::spec`], with an optional dropout
/// mask (N×d) on the left (output-side) increment.
///
/// Errors: as [`double_forward_parts`].
pub fn double_forward<T: Real>(
    layer: &DoubleSidedLayer<T>,
    x: &DMatrix<T>,
    mask: Option<&DMatrix<T>>,
) -> Result<(DMatrix<T>, DoubleTape<T>)> {
    let left = SideParams {
        a: layer.a_left(),
        b: layer.b_left(),
        eta: layer.eta_left(),
    };
    let right = SideParams {
        a: layer.a_right(),
        b: layer.b_right(),
        eta: layer.eta_right(),
    };
    double_forward_parts(x, layer.w0(), left, right, &layer.spec(), mask)
}

/// [`double_backward_parts`] for a [`DoubleSidedLayer`] (App. B eq. 22, module docs); the tape
/// must come from [`double_forward`] on the same layer and `x`.
///
/// Errors: as [`double_backward_parts`].
pub fn double_backward<T: Real>(
    layer: &DoubleSidedLayer<T>,
    x: &DMatrix<T>,
    tape: &DoubleTape<T>,
    ybar: DMatrix<T>,
) -> Result<DoubleGrad<T>> {
    double_backward_parts(x, layer.w0(), tape, ybar)
}
