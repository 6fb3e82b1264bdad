//! Forward with tape and reverse mode of an ELRA layer, `Y = X W_newᵀ`, `W_new = exp(G) W0`
//! (eq. 3), `G = A C` with `C` from [`FactorChain`] (eq. 2, §4.2.1, eq. 19, App. H clip), plus
//! the energy penalty `λ‖G‖²_F` (eq. 20–21).
//!
//! Two forward routes give the same function and the same gradients (tests/gradients.rs):
//!
//! * [`Route::Woodbury`] (eq. 5 / Algorithm 1): `U = X W0ᵀ`, then rows of `exp(G)` on `U`
//!   ([`super::rows`]); backward `X̄ = Ū W0` after the primitive's reverse mode.
//! * [`Route::Merged`] (eq. 30): `P = C W0` (r×k), `K = M P`, `W_new = W0 + A K`,
//!   `Y = X W_newᵀ`. Its reverse mode never forms the dense `∂L/∂W_new = Ȳᵀ X`:
//!
//!   ```text
//!   X̄ = Ȳ W_new,  Ā = Ȳᵀ (X Kᵀ),  K̄ = (Ȳ A)ᵀ X,  M̄ = K̄ Pᵀ,  P̄ = Mᵀ K̄,  C̄ = P̄ W0ᵀ,
//!   Z̄ = L_φ1(Zᵀ, M̄),  C̄ += Z̄ Aᵀ,  Ā += Cᵀ Z̄.
//!   ```
//!
//!   (`dY = X dKᵀ Aᵀ + X Kᵀ dAᵀ`; `K = M P`; `P = C W0`; `M = φ1(CA)`.)
//!
//! In both routes the energy gradient `(2λ A(CCᵀ), 2λ(AᵀA)C)` is added to `(Ā, C̄)` before the
//! chain through the clip, the variant and η ([`FactorChain::backward`]). No d×d matrix is
//! formed anywhere.
#![allow(non_snake_case)]

use nalgebra::DMatrix;

use super::generator::{energy_backward, FactorChain};
use super::ops::{gemm, matmul, Op};
use super::phi1_adjoint;
use super::rows::{exp_rows_backward, exp_rows_forward_impl, ExpRowsTape};
use crate::adapter::config::check_lambda;
use crate::adapter::{ElraLayer, GeneratorSpec};
use crate::linalg::{check_finite, phi1, Real};
use crate::{ElraError, Result};

/// How the layer output is computed (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// `U = X W0ᵀ`, then `Y = U + ((U Cᵀ) Mᵀ) Aᵀ` (eq. 5, Algorithm 1).
    #[default]
    Woodbury,
    /// `W_new = W0 + A (M (C W0))` (eq. 30), then `Y = X W_newᵀ`; no dropout on this route.
    Merged,
}

/// A generator evaluated for one step: effective factors, `Z = CA`, `M = φ1(Z)`, the chain
/// back to `(A, B, η)` and the energy `λ‖G‖²_F`.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorTape<T: Real> {
    /// The left factor `A` (n×r).
    pub a: DMatrix<T>,
    /// The effective right factor `C` (r×n), after the clip.
    pub c: DMatrix<T>,
    /// `Z = C A` (r×r).
    pub z: DMatrix<T>,
    /// `M = φ1(Z)` (r×r).
    pub m: DMatrix<T>,
    /// How `C` was built.
    pub chain: FactorChain<T>,
    /// λ of the energy penalty.
    pub lambda: f64,
    /// `λ‖G‖²_F` (eq. 20–21).
    pub energy: T,
}

impl<T: Real> GeneratorTape<T> {
    /// Algorithm 1 lines 4–5 plus App. H: `C` of the variant and the clip ([`FactorChain::new`]),
    /// `Z = CA`, `M = φ1(Z)` (Prop. 1), and the energy (eq. 21 Grams).
    ///
    /// Errors: as [`FactorChain::new`]; `lambda` negative or non-finite; φ1 failures.
    pub fn new(
        a: &DMatrix<T>,
        b: Option<&DMatrix<T>>,
        eta: T,
        spec: &GeneratorSpec,
    ) -> Result<Self> {
        let (c, chain) = FactorChain::new(a, b, eta, spec.eta_mult, spec.alpha, spec.tau)?;
        check_lambda(spec.lambda)?;
        let z = matmul(&c, Op::N, a, Op::N);
        let m = phi1(&z)?;
        check_finite("phi1(Z)", &m)?;
        let energy = chain.frob_sq() * T::of(spec.lambda);
        Ok(GeneratorTape {
            a: a.clone(),
            c,
            z,
            m,
            chain,
            lambda: spec.lambda,
            energy,
        })
    }

    /// Adds the energy gradient to `(Ā, C̄)` and runs the chain to `(∂A, ∂B, ∂η)`.
    pub(crate) fn finish(
        &self,
        mut abar: DMatrix<T>,
        mut cbar: DMatrix<T>,
    ) -> Result<super::generator::FactorGrad<T>> {
        if self.lambda > 0.0 {
            let (_, ea, ec) = energy_backward(&self.a, &self.c, self.lambda)?;
            abar += ea;
            cbar += ec;
        }
        self.chain.backward(&self.a, abar, cbar)
    }
}

/// The route-specific intermediates of an ELRA forward pass.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteTape<T: Real> {
    /// Woodbury: `U = X W0ᵀ` and the primitive's tape.
    Woodbury {
        /// `U = X W0ᵀ` (N×d).
        u: DMatrix<T>,
        /// `V`, `T` (and the dropout mask).
        rows: ExpRowsTape<T>,
    },
    /// Merged: `P = C W0`, `K = M P`, `W_new`, `X Kᵀ`.
    Merged {
        /// `P = C W0` (r×k).
        p: DMatrix<T>,
        /// `K = M P` (r×k).
        k: DMatrix<T>,
        /// `W_new = W0 + A K` (d×k).
        w_new: DMatrix<T>,
        /// `X Kᵀ` (N×r).
        xk: DMatrix<T>,
    },
}

/// Everything an ELRA forward pass keeps for its reverse mode.
#[derive(Debug, Clone, PartialEq)]
pub struct ElraTape<T: Real> {
    /// The step's generator.
    pub generator: GeneratorTape<T>,
    /// The route's intermediates.
    pub route: RouteTape<T>,
}

/// Gradients of an ELRA layer (task loss through `Ȳ` plus `λ‖G‖²_F`).
#[derive(Debug, Clone, PartialEq)]
pub struct ElraGrad<T: Real> {
    /// `∂L/∂X` (N×k).
    pub x: DMatrix<T>,
    /// `∂L/∂A` (d×r).
    pub a: DMatrix<T>,
    /// `∂L/∂B` (r×d); `None` for ELRA-PSD.
    pub b: Option<DMatrix<T>>,
    /// `∂L/∂η` (η itself, before the multiplier).
    pub eta: T,
}

/// ELRA forward on explicit matrices: `W0` (d×k), `A` (d×r), `B` (r×d, `None` for PSD), η,
/// the step's [`GeneratorSpec`], a route and an optional dropout mask on the adapter output
/// (Woodbury only). Returns `Y = X W_newᵀ` and the tape.
///
/// Errors: shapes (`x` N×k, factors), non-finite inputs, a mask with [`Route::Merged`], and the
/// errors of [`GeneratorTape::new`].
#[allow(clippy::too_many_arguments)]
pub fn elra_forward_parts<T: Real>(
    x: &DMatrix<T>,
    w0: &DMatrix<T>,
    a: &DMatrix<T>,
    b: Option<&DMatrix<T>>,
    eta: T,
    spec: &GeneratorSpec,
    route: Route,
    mask: Option<&DMatrix<T>>,
) -> Result<(DMatrix<T>, ElraTape<T>)> {
    let (d, k) = w0.shape();
    if a.nrows() != d {
        return Err(ElraError::shape("a", (d, a.ncols()), a.shape()));
    }
    if x.ncols() != k {
        return Err(ElraError::shape("x", (x.nrows(), k), x.shape()));
    }
    check_finite("x", x)?;
    let g = GeneratorTape::new(a, b, eta, spec)?;
    let (y, route) = match route {
        Route::Woodbury => {
            let u = matmul(x, Op::N, w0, Op::T);
            let (y, rows) = exp_rows_forward_impl(&u, &g.a, &g.c, &g.m, mask, false)?;
            (y, RouteTape::Woodbury { u, rows })
        }
        Route::Merged => {
            if mask.is_some() {
                return Err(ElraError::invalid(
                    "mask",
                    "the merged route has no separate adapter output to drop out; use Route::Woodbury",
                ));
            }
            let p = matmul(&g.c, Op::N, w0, Op::N);
            let kk = matmul(&g.m, Op::N, &p, Op::N);
            let mut w_new = w0.clone();
            gemm(&mut w_new, T::one(), &g.a, Op::N, &kk, Op::N, T::one());
            let y = matmul(x, Op::N, &w_new, Op::T);
            let xk = matmul(x, Op::N, &kk, Op::T);
            (
                y,
                RouteTape::Merged {
                    p,
                    k: kk,
                    w_new,
                    xk,
                },
            )
        }
    };
    Ok((
        y,
        ElraTape {
            generator: g,
            route,
        },
    ))
}

/// Reverse mode of [`elra_forward_parts`] (module docs): `Ȳ` (by value) to [`ElraGrad`],
/// including `λ‖G‖²_F`. `x` and `w0` must be those of the forward pass.
///
/// Errors: shapes of `x`, `w0`, `ybar`; non-finite `ybar`; Fréchet-adjoint failures.
pub fn elra_backward_parts<T: Real>(
    x: &DMatrix<T>,
    w0: &DMatrix<T>,
    tape: &ElraTape<T>,
    ybar: DMatrix<T>,
) -> Result<ElraGrad<T>> {
    let g = &tape.generator;
    let (d, k) = w0.shape();
    let n = x.nrows();
    if x.ncols() != k {
        return Err(ElraError::shape("x", (n, k), x.shape()));
    }
    if g.a.nrows() != d {
        return Err(ElraError::shape("w0", (g.a.nrows(), k), w0.shape()));
    }
    if ybar.shape() != (n, d) {
        return Err(ElraError::shape("ybar", (n, d), ybar.shape()));
    }
    check_finite("ybar", &ybar)?;
    let (gx, abar, cbar) = match &tape.route {
        RouteTape::Woodbury { u, rows } => {
            let gr = exp_rows_backward(u, &g.a, &g.c, &g.z, &g.m, rows, ybar)?;
            let gx = matmul(&gr.x, Op::N, w0, Op::N);
            (gx, gr.a, gr.c)
        }
        RouteTape::Merged { p, w_new, xk, .. } => {
            if xk.nrows() != n {
                return Err(ElraError::shape("x", (xk.nrows(), k), x.shape()));
            }
            let gx = matmul(&ybar, Op::N, w_new, Op::N);
            let mut abar = matmul(&ybar, Op::T, xk, Op::N);
            let s = matmul(&ybar, Op::N, &g.a, Op::N);
            let kbar = matmul(&s, Op::T, x, Op::N);
            let mbar = matmul(&kbar, Op::N, p, Op::T);
            let pbar = matmul(&g.m, Op::T, &kbar, Op::N);
            let mut cbar = matmul(&pbar, Op::N, w0, Op::T);
            let zbar = phi1_adjoint(&g.z, &mbar)?;
            gemm(&mut cbar, T::one(), &zbar, Op::N, &g.a, Op::T, T::one());
            gemm(&mut abar, T::one(), &g.c, Op::T, &zbar, Op::N, T::one());
            (gx, abar, cbar)
        }
    };
    let fg = g.finish(abar, cbar)?;
    Ok(ElraGrad {
        x: gx,
        a: fg.a,
        b: fg.b,
        eta: fg.eta,
    })
}

/// [`elra_forward_parts`] for an [`ElraLayer`] at its current step (its `W0`, `A`, `B`, η and
/// [`ElraLayer::spec`]).
pub fn elra_forward<T: Real>(
    layer: &ElraLayer<T>,
    x: &DMatrix<T>,
    route: Route,
    mask: Option<&DMatrix<T>>,
) -> Result<(DMatrix<T>, ElraTape<T>)> {
    elra_forward_parts(
        x,
        layer.w0(),
        layer.a(),
        layer.b(),
        layer.eta(),
        &layer.spec(),
        route,
        mask,
    )
}

/// [`elra_backward_parts`] for an [`ElraLayer`] (the tape must come from [`elra_forward`] on the
/// same layer and `x`).
pub fn elra_backward<T: Real>(
    layer: &ElraLayer<T>,
    x: &DMatrix<T>,
    tape: &ElraTape<T>,
    ybar: DMatrix<T>,
) -> Result<ElraGrad<T>> {
    elra_backward_parts(x, layer.w0(), tape, ybar)
}
