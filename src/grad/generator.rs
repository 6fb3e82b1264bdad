//! Reverse mode of the generator's right factor `C`: spectral clip, variant, step size, energy.
//!
//! The effective generator of an ELRA layer is `G = A C` with (eq. 2, §4.2.1, eq. 19, App. H)
//!
//! ```text
//! C_raw = η_eff (α Aᵀ + (1−α) B),   η_eff = η · m(t),
//! C     = s · C_raw,                s = min(1, τ / ‖A C_raw‖₂)   (spectral clip, App. H),
//! ```
//!
//! general ELRA is α = 0, ELRA-PSD α = 1 without `B`, ELRA-Hyb any α ∈ [0, 1]; `m(t)` is the η
//! multiplier (App. H cosine in [0.5, 1]). Given `Ā`, `C̄` of the effective factors (from
//! [`super::rows::exp_rows_backward`] and [`energy_backward`]), [`FactorChain::backward`]
//! returns `∂L/∂A`, `∂L/∂B`, `∂L/∂η`.
//!
//! **Spectral clip: exact derivative.** When the clip is active (`σ = ‖A C_raw‖₂ > τ`),
//! `C = (τ/σ) C_raw` is differentiated *through* σ, like automatic differentiation of
//! `G ← (τ/‖G‖₂) G` would: with the top singular triplet `(σ, u, v)` of `G_raw = A C_raw`,
//! `dσ = uᵀ dG_raw v`, so
//!
//! ```text
//! C̄_raw = s C̄ + σ̄ (Aᵀu) vᵀ,   Ā += σ̄ u (C_raw v)ᵀ,   σ̄ = −(s/σ) ⟨C̄, C_raw⟩.
//! ```
//!
//! The triplet comes from r×r work only: thin QR `A = Q_A R_A`, `C_rawᵀ = Q_C R_C`, SVD of
//! `R_A R_Cᵀ = Ũ Σ Ṽᵀ`, then `u = Q_A ũ₁`, `v = Q_C ṽ₁`, `Aᵀu = R_Aᵀ ũ₁`, `C_raw v = R_Cᵀ ṽ₁`.
//! Consequences worth knowing: while clipped, `G` lies on the sphere `‖G‖₂ = τ`, the gradient
//! has no component that would grow `‖G‖₂`, and `∂L/∂η = 0` (the clipped generator does not
//! depend on the scale of `C_raw`). The derivative is undefined where `σ = τ` exactly or the top
//! singular value is repeated (measure-zero sets). This is the derivative of the forward map
//! actually computed, so finite differences check it (tests/gradients.rs).
//!
//! **Variant and step size.** `Ā += η_eff α C̄_rawᵀ`, `B̄ = η_eff (1−α) C̄_raw`,
//! `∂L/∂η_eff = ⟨C̄_raw, α Aᵀ + (1−α) B⟩ = ⟨C̄_raw, C_raw⟩ / η_eff`, `∂L/∂η = m(t) ∂L/∂η_eff`.
//!
//! **Energy (eq. 20–21).** `E = λ‖G‖²_F = λ tr((AᵀA)(CCᵀ))`, so `Ā = 2λ A (CCᵀ)` and
//! `C̄ = 2λ (AᵀA) C` — from the r×r Grams only; `C̄` then flows through the chain above like
//! any other contribution (the penalty is taken on the effective, clipped generator).
#![allow(non_snake_case)]

use nalgebra::{DMatrix, DVector, QR, SVD};

use super::ops::{gemm, matmul, Op};
use crate::linalg::expm::scale_pow2;
use crate::linalg::{check_finite, pow2_balanced, Real};
use crate::{ElraError, Result};

/// The top singular triplet of `G = A C` (A n×r, C r×n) computed without forming `G`.
#[derive(Debug, Clone, PartialEq)]
pub struct TopSingular<T: Real> {
    /// `σ₁ = ‖G‖₂`.
    pub sigma: T,
    /// Left singular vector `u` (length n).
    pub u: DVector<T>,
    /// Right singular vector `v` (length n).
    pub v: DVector<T>,
    /// `Aᵀu` (length r).
    pub atu: DVector<T>,
    /// `C v` (length r).
    pub cv: DVector<T>,
}

/// The top singular triplet of `G = A C` from thin QR factors and an r×r SVD (module docs);
/// `σ` equals `‖G‖₂` as the adapter's spectral norm computes it (same factorisation).
///
/// Errors: `a` not n×r with n, r ≥ 1, `c` not r×n, non-finite entries, an SVD failure, a σ
/// beyond the floating-point range ([`ElraError::Overflow`]).
pub fn top_singular<T: Real>(a: &DMatrix<T>, c: &DMatrix<T>) -> Result<TopSingular<T>> {
    let (n, r) = a.shape();
    if n == 0 || r == 0 {
        return Err(ElraError::invalid(
            "a",
            "the factor A must be n×r with n, r ≥ 1",
        ));
    }
    if c.shape() != (r, n) {
        return Err(ElraError::shape("c", (r, n), c.shape()));
    }
    check_finite("a", a)?;
    check_finite("c", c)?;
    // Factors with huge or tiny entries run scaled by powers of two (σ scales back; u, v do not
    // move), so a finite generator never reaches the SVD as Inf/NaN.
    let (a_s, ea) = pow2_balanced(a);
    let (c_s, ec) = pow2_balanced(c);
    let qa = QR::new(a_s);
    let qc = QR::new(c_s.transpose());
    let (q_a, r_a) = (qa.q(), qa.r());
    let (q_c, r_c) = (qc.q(), qc.r());
    let k = matmul(&r_a, Op::N, &r_c, Op::T);
    if !k.iter().all(|v| v.is_finite()) {
        return Err(overflow("the r×r core R_A R_Cᵀ of ‖G‖₂"));
    }
    let svd = SVD::try_new(k, true, true, T::default_epsilon(), 0).ok_or_else(|| {
        ElraError::Numerical("SVD of the r×r core R_A R_Cᵀ did not converge".into())
    })?;
    let (uk, vt) = match (&svd.u, &svd.v_t) {
        (Some(u), Some(vt)) => (u, vt),
        _ => {
            return Err(ElraError::Numerical(
                "SVD returned no singular vectors".into(),
            ))
        }
    };
    let mut best = 0;
    for (i, s) in svd.singular_values.iter().enumerate() {
        if *s > svd.singular_values[best] {
            best = i;
        }
    }
    let ut = uk.column(best).into_owned();
    let vtil = vt.row(best).transpose();
    let mut sigma = [svd.singular_values[best]];
    scale_pow2(&mut sigma, ea + ec);
    let mut atu = r_a.tr_mul(&ut);
    scale_pow2(atu.as_mut_slice(), ea);
    let mut cv = r_c.tr_mul(&vtil);
    scale_pow2(cv.as_mut_slice(), ec);
    if !sigma[0].is_finite() || !atu.iter().chain(cv.iter()).all(|v| v.is_finite()) {
        return Err(overflow("‖G‖₂ of the spectral clip"));
    }
    Ok(TopSingular {
        sigma: sigma[0],
        u: &q_a * &ut,
        v: &q_c * &vtil,
        atu,
        cv,
    })
}

fn overflow(what: &str) -> ElraError {
    ElraError::Overflow {
        what: format!("{what} leaves the floating-point range (every input is finite)"),
    }
}

/// What the spectral clip did in the forward pass (App. H), kept for its exact derivative.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTape<T: Real> {
    /// `s = τ/σ < 1`.
    pub scale: T,
    /// `σ = ‖A C_raw‖₂ > τ`.
    pub sigma: T,
    /// The top singular triplet of `A C_raw`.
    pub top: TopSingular<T>,
}

/// How the effective right factor `C` was built from `(A, B, η)` in the forward pass
/// (module docs), with everything its reverse mode needs.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorChain<T: Real> {
    /// α, the weight of `Aᵀ` (0 general, 1 PSD, the schedule's value for Hyb).
    pub alpha: f64,
    /// Whether the variant has the factor `B`.
    pub has_b: bool,
    /// `η_eff = η · m(t)`.
    pub eta_eff: T,
    /// `m(t) = ∂η_eff/∂η`.
    pub eta_mult: T,
    /// `C_raw = η_eff (αAᵀ + (1−α)B)` (r×n).
    pub c_raw: DMatrix<T>,
    /// `‖A C_raw‖²_F` from the r×r Grams (eq. 21).
    pub frob_sq_raw: T,
    /// The active spectral clip, if any.
    pub clip: Option<ClipTape<T>>,
}

/// Gradients with respect to a generator's trainable parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorGrad<T: Real> {
    /// `∂L/∂A` (n×r).
    pub a: DMatrix<T>,
    /// `∂L/∂B` (r×n); `None` for ELRA-PSD.
    pub b: Option<DMatrix<T>>,
    /// `∂L/∂η` (with respect to η itself, before the multiplier).
    pub eta: T,
}

/// `αAᵀ + (1−α)B` (r×n; `Aᵀ` alone without `B`), entry by entry as `a·α + b·(1−α)` — the one
/// evaluation of eq. (19)'s mixture that every generator factor uses (the CPU layers, the
/// reverse mode and the App. G lab), so that they agree bit for bit.
pub(crate) fn mix_factor<T: Real>(
    a: &DMatrix<T>,
    b: Option<&DMatrix<T>>,
    alpha: f64,
) -> DMatrix<T> {
    let (n, r) = a.shape();
    let (al, w) = (T::of(alpha), T::of(1.0 - alpha));
    DMatrix::from_fn(r, n, |i, j| {
        let from_b = b.map_or(T::zero(), |b| b[(i, j)] * w);
        if alpha > 0.0 {
            a[(j, i)] * al + from_b
        } else {
            from_b
        }
    })
}

impl<T: Real> FactorChain<T> {
    /// Builds `C_raw = η m (αAᵀ + (1−α)B)` and the spectral clip of App. H (`τ = None`: no
    /// clip) and returns the effective `C` with its chain (eq. 2, §4.2.1, eq. 19).
    ///
    /// Errors: `a` (n×r, r ≥ 1, finite), `b` (r×n, finite; required when α < 1, ignored when
    /// α = 1 and `None`), `eta` (finite, > 0), `eta_mult` (finite, > 0), `alpha` in [0, 1],
    /// `tau` (finite, > 0).
    pub fn new(
        a: &DMatrix<T>,
        b: Option<&DMatrix<T>>,
        eta: T,
        eta_mult: f64,
        alpha: f64,
        tau: Option<f64>,
    ) -> Result<(DMatrix<T>, Self)> {
        let (n, r) = a.shape();
        if n == 0 || r == 0 {
            return Err(ElraError::invalid(
                "a",
                "the factor A must be n×r with n, r ≥ 1",
            ));
        }
        check_finite("a", a)?;
        if !eta.f64().is_finite() || eta.f64() <= 0.0 {
            return Err(ElraError::invalid(
                "eta",
                format!("must be finite and > 0, got {eta}"),
            ));
        }
        if !eta_mult.is_finite() || eta_mult <= 0.0 {
            return Err(ElraError::invalid(
                "eta_mult",
                format!("must be finite and > 0, got {eta_mult}"),
            ));
        }
        if !alpha.is_finite() || !(0.0..=1.0).contains(&alpha) {
            return Err(ElraError::invalid(
                "alpha",
                format!("must lie in [0, 1], got {alpha}"),
            ));
        }
        if let Some(b) = b {
            if b.shape() != (r, n) {
                return Err(ElraError::shape("b", (r, n), b.shape()));
            }
            check_finite("b", b)?;
        } else if alpha < 1.0 {
            return Err(ElraError::invalid("b", "α < 1 needs the factor B (r×n)"));
        }
        let m = T::of(eta_mult);
        let eta_eff = eta * m;
        let c_raw = mix_factor(a, b, alpha) * eta_eff;
        // ‖A C_raw‖²_F = tr((AᵀA)(C_raw C_rawᵀ)) from r×r Grams (eq. 21).
        let gram_a = matmul(a, Op::T, a, Op::N);
        let gram_c = matmul(&c_raw, Op::N, &c_raw, Op::T);
        let frob_sq_raw = gram_a.dot(&gram_c).max(T::zero());
        let mut chain = FactorChain {
            alpha,
            has_b: b.is_some(),
            eta_eff,
            eta_mult: m,
            c_raw,
            frob_sq_raw,
            clip: None,
        };
        if let Some(tau) = tau {
            if !tau.is_finite() || tau <= 0.0 {
                return Err(ElraError::invalid(
                    "tau",
                    format!("must be finite and > 0, got {tau}"),
                ));
            }
            // ‖G‖₂ ≤ ‖G‖_F: well inside the threshold the thin QRs of the exact test are skipped.
            if frob_sq_raw.f64() <= tau * tau * (1.0 - 1e-6) {
                return Ok((chain.effective_c(), chain));
            }
            let top = top_singular(a, &chain.c_raw)?;
            if top.sigma.f64() > tau {
                let sigma = top.sigma;
                chain.clip = Some(ClipTape {
                    scale: T::of(tau) / sigma,
                    sigma,
                    top,
                });
            }
        }
        Ok((chain.effective_c(), chain))
    }

    /// `‖G‖²_F = s² ‖A C_raw‖²_F` of the effective generator (eq. 21).
    pub fn frob_sq(&self) -> T {
        match &self.clip {
            Some(cl) => self.frob_sq_raw * cl.scale * cl.scale,
            None => self.frob_sq_raw,
        }
    }

    /// The effective factor `C = s · C_raw`.
    pub fn effective_c(&self) -> DMatrix<T> {
        match &self.clip {
            Some(cl) => &self.c_raw * cl.scale,
            None => self.c_raw.clone(),
        }
    }

    /// Reverse mode (module docs): from `Ā`, `C̄` of the effective factors to `∂L/∂A`,
    /// `∂L/∂B`, `∂L/∂η`. `a` is the left factor used in the forward pass.
    ///
    /// Errors: shapes of `a`, `abar` (n×r), `cbar` (r×n).
    pub fn backward(
        &self,
        a: &DMatrix<T>,
        mut abar: DMatrix<T>,
        cbar: DMatrix<T>,
    ) -> Result<FactorGrad<T>> {
        let (n, r) = a.shape();
        if abar.shape() != (n, r) {
            return Err(ElraError::shape("abar", (n, r), abar.shape()));
        }
        if cbar.shape() != (r, n) || self.c_raw.shape() != (r, n) {
            return Err(ElraError::shape("cbar", (r, n), cbar.shape()));
        }
        let c_raw_bar = match &self.clip {
            None => cbar,
            Some(cl) => {
                let sbar = cbar.dot(&self.c_raw);
                let sigma_bar = -(cl.scale / cl.sigma) * sbar;
                let mut crb = cbar * cl.scale;
                // C̄_raw += σ̄ (Aᵀu) vᵀ ;  Ā += σ̄ u (C_raw v)ᵀ
                crb.ger(sigma_bar, &cl.top.atu, &cl.top.v, T::one());
                abar.ger(sigma_bar, &cl.top.u, &cl.top.cv, T::one());
                crb
            }
        };
        let eta_eff_bar = c_raw_bar.dot(&self.c_raw) / self.eta_eff;
        if self.alpha > 0.0 {
            let w = self.eta_eff * T::of(self.alpha);
            for i in 0..n {
                for j in 0..r {
                    abar[(i, j)] += w * c_raw_bar[(j, i)];
                }
            }
        }
        let b = if self.has_b {
            Some(c_raw_bar * (self.eta_eff * T::of(1.0 - self.alpha)))
        } else {
            None
        };
        Ok(FactorGrad {
            a: abar,
            b,
            eta: eta_eff_bar * self.eta_mult,
        })
    }
}

/// The energy penalty `E = λ‖AC‖²_F = λ tr((AᵀA)(CCᵀ))` (eq. 20–21) and its gradients
/// `(E, ∂E/∂A, ∂E/∂C) = (E, 2λ A(CCᵀ), 2λ (AᵀA) C)`, from the r×r Grams only.
///
/// Errors: `a` not n×r with r ≥ 1, `c` not r×n, `lambda` negative or non-finite.
pub fn energy_backward<T: Real>(
    a: &DMatrix<T>,
    c: &DMatrix<T>,
    lambda: f64,
) -> Result<(T, DMatrix<T>, DMatrix<T>)> {
    let (n, r) = a.shape();
    if r == 0 {
        return Err(ElraError::invalid("a", "the rank r must be at least 1"));
    }
    if c.shape() != (r, n) {
        return Err(ElraError::shape("c", (r, n), c.shape()));
    }
    if !lambda.is_finite() || lambda < 0.0 {
        return Err(ElraError::invalid(
            "lambda",
            format!("must be finite and ≥ 0, got {lambda}"),
        ));
    }
    let s = matmul(a, Op::T, a, Op::N);
    let p = matmul(c, Op::N, c, Op::T);
    let l = T::of(lambda);
    let e = l * s.dot(&p);
    let two_l = l + l;
    let mut abar = DMatrix::zeros(n, r);
    gemm(&mut abar, two_l, a, Op::N, &p, Op::N, T::zero());
    let mut cbar = DMatrix::zeros(r, n);
    gemm(&mut cbar, two_l, &s, Op::N, c, Op::N, T::zero());
    Ok((e, abar, cbar))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
        let mut s = seed;
        DMatrix::from_fn(rows, cols, |_, _| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
    }

    /// Factors scaled by 2^600 and 2^400 (or 2^−600, 2^−400) give σ scaled by 2^±1000 exactly
    /// and the same singular vectors; 2^700 · 2^700 is an overflow error, not a panic.
    #[test]
    fn top_singular_of_huge_and_tiny_factors_is_exact_or_an_overflow_error() {
        let (a, c) = (seeded(7, 3, 1), seeded(3, 7, 2));
        let base = top_singular(&a, &c).unwrap();
        for (ea, ec) in [(600, 400), (-600, -400)] {
            let sa = a.map(|v| v * 2f64.powi(ea));
            let sc = c.map(|v| v * 2f64.powi(ec));
            let t = top_singular(&sa, &sc).unwrap();
            assert_eq!(t.sigma, base.sigma * 2f64.powi(ea + ec));
            assert_eq!(t.u, base.u);
            assert_eq!(t.v, base.v);
            assert_eq!(t.atu, base.atu.map(|v| v * 2f64.powi(ea)));
            assert_eq!(t.cv, base.cv.map(|v| v * 2f64.powi(ec)));
        }
        let big = 2f64.powi(700);
        let err = top_singular(&a.map(|v| v * big), &c.map(|v| v * big)).unwrap_err();
        assert!(matches!(err, ElraError::Overflow { .. }), "{err:?}");
    }
}
