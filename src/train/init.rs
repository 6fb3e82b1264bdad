//! Initialisation of the trainable factors: Xavier (App. H) and the gradient-SVD seeding of
//! ELRA-Hyb_GA (§5, App. H, after LoRA-GA, Wang et al. 2024).
//!
//! **Xavier.** The layers of [`crate::adapter`] draw `A` and `B` Xavier-uniform
//! (`crate::adapter::xavier_uniform`, App. H "Xavier initialization for trainable low-rank
//! factors"); the harness passes a distinct seed per layer.
//!
//! **GA seeding (DESIGN.md errata).** App. H computes "a running SVD of the preconditioned
//! gradient for the first K steps" and sets "columns of A to the top r left singular vectors,
//! and rows of B to the top r right singular vectors scaled by singular values". For ELRA the
//! matrix to decompose is the gradient of the generator at `G = 0`:
//! `∂L/∂G = (∂L/∂W_new) W0ᵀ = Ȳᵀ X W0ᵀ = Ȳᵀ U` (d×d), since `dW_new = dG W0` there. Here:
//!
//! * it is accumulated over the first K batches of the data stream (default 200) through the
//!   frozen network, as the running mean `Ḡ = (1/K) Σ Ȳᵀ U`, in a **d×d accumulator per layer**
//!   — acceptable for the harness' small widths (64 by default: 4096 entries); at transformer
//!   widths one would accumulate skinny factors or a randomised sketch instead;
//! * with the SVD `Ḡ = Σ σᵢ uᵢ vᵢᵀ` (σ sorted decreasing): `A = [u₁ … u_r]` and the rows of `B`
//!   are `−(σᵢ/σ₁) vᵢᵀ`. Two choices are ours and documented: the singular values are
//!   normalised by σ₁ (the absolute scale of a loss gradient is arbitrary; normalised, `B` has
//!   rows of norm ≤ 1 like a Xavier draw), and the sign is negative so that the general part
//!   of the initial generator, `ηAB = −(η/σ₁) Σ σᵢ uᵢ vᵢᵀ`, points downhill (`−∂L/∂G`
//!   truncated to rank r). η keeps its initial value η₀. With an exactly zero gradient the
//!   Xavier draw is kept. The "preconditioning" of App. H (Adam's second moments in LoRA-GA) is
//!   not applied: the accumulated plain gradient is decomposed.
#![allow(non_snake_case)]

use nalgebra::{DMatrix, SVD};

use super::model::{loss_and_grad, AdaptedNetwork, FrozenNetwork, LossKind, Targets};
use crate::grad::ops::{matmul, Op};
use crate::linalg::{check_finite, Real};
use crate::{ElraError, Result};

/// Default number of seeding batches K (App. H: K ∈ {100, 200, 400}, default 200).
pub const DEFAULT_GA_STEPS: usize = 200;

/// `∂L/∂G_ℓ = Ȳ_ℓᵀ U_ℓ` (d×d) of every layer of the frozen network at `G = 0`, for one batch.
///
/// Errors: shapes, targets of the wrong kind, non-finite values.
pub fn frozen_generator_grads<T: Real>(
    net: &FrozenNetwork<T>,
    loss: LossKind,
    x: &DMatrix<T>,
    targets: &Targets<T>,
) -> Result<Vec<DMatrix<T>>> {
    let outs = net.forward_all(x)?;
    let out = outs
        .last()
        .ok_or_else(|| ElraError::invalid("net", "the network has no layers"))?;
    let (_, mut g) = loss_and_grad(loss, out, targets)?;
    let mut grads = vec![DMatrix::zeros(0, 0); net.layers.len()];
    for i in (0..net.layers.len()).rev() {
        let l = &net.layers[i];
        l.activation.backward(&outs[i], &mut g);
        let h = if i == 0 { x } else { &outs[i - 1] };
        let u = matmul(h, Op::N, &l.w0, Op::T);
        grads[i] = matmul(&g, Op::T, &u, Op::N);
        g = matmul(&g, Op::N, &l.w0, Op::N);
    }
    for gm in &grads {
        check_finite("gradient", gm)?;
    }
    Ok(grads)
}

/// `(A, B)` of rank r from a d×d generator gradient (module docs): `A = U_r`,
/// `B = −diag(σ/σ₁) V_rᵀ`; `None` if the gradient is exactly zero.
///
/// Errors: `grad` not square or non-finite, `r` = 0 or > d, SVD failure.
pub fn ga_factors(grad: &DMatrix<f64>, r: usize) -> Result<Option<(DMatrix<f64>, DMatrix<f64>)>> {
    let d = grad.nrows();
    if !grad.is_square() || d == 0 {
        return Err(ElraError::invalid(
            "grad",
            "must be a non-empty square d×d matrix",
        ));
    }
    if r == 0 || r > d {
        return Err(ElraError::invalid(
            "r",
            format!("must lie in 1..={d}, got {r}"),
        ));
    }
    check_finite("grad", grad)?;
    // Only σ_i/σ_1 and the singular vectors are used: both survive a power-of-two scaling,
    // which keeps a gradient with huge or tiny entries out of the SVD's overflow.
    let (grad, _) = crate::linalg::pow2_balanced(grad);
    let svd = SVD::try_new(grad, true, true, f64::EPSILON, 0).ok_or_else(|| {
        ElraError::Numerical("SVD of the accumulated generator gradient did not converge".into())
    })?;
    let (u, vt) = match (&svd.u, &svd.v_t) {
        (Some(u), Some(vt)) => (u, vt),
        _ => {
            return Err(ElraError::Numerical(
                "SVD returned no singular vectors".into(),
            ))
        }
    };
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| {
        svd.singular_values[j]
            .total_cmp(&svd.singular_values[i])
            .then(i.cmp(&j))
    });
    let s1 = svd.singular_values[order[0]];
    if s1 == 0.0 {
        return Ok(None);
    }
    let mut a = DMatrix::zeros(d, r);
    let mut b = DMatrix::zeros(r, d);
    for (c, &i) in order.iter().take(r).enumerate() {
        a.set_column(c, &u.column(i));
        let w = -svd.singular_values[i] / s1;
        b.set_row(c, &(vt.row(i) * w));
    }
    Ok(Some((a, b)))
}

/// ELRA-Hyb_GA seeding (App. H, module docs): accumulates the mean generator gradient of every
/// layer of `base` over `batches` and sets `A`, `B` of every ELRA layer of `net` with a factor
/// `B` from [`ga_factors`]. Layers without `B` (ELRA-PSD) only get `A`; LoRA and frozen layers
/// are left alone.
///
/// Errors: `net` and `base` of different depth or shapes, no batches, and the errors of
/// [`frozen_generator_grads`] and [`ga_factors`].
pub fn ga_initialise<T: Real>(
    net: &mut AdaptedNetwork<T>,
    base: &FrozenNetwork<T>,
    batches: impl IntoIterator<Item = (DMatrix<T>, Targets<T>)>,
) -> Result<usize> {
    if net.layers.len() != base.layers.len() {
        return Err(ElraError::invalid(
            "base",
            "the frozen network and the adapted one differ in depth",
        ));
    }
    let mut sums: Vec<DMatrix<f64>> = base
        .layers
        .iter()
        .map(|l| DMatrix::zeros(l.w0.nrows(), l.w0.nrows()))
        .collect();
    let mut k = 0usize;
    for (x, t) in batches {
        let gs = frozen_generator_grads(base, net.loss, &x, &t)?;
        for (s, g) in sums.iter_mut().zip(&gs) {
            *s += g.map(|v| v.f64());
        }
        k += 1;
    }
    if k == 0 {
        return Err(ElraError::invalid(
            "batches",
            "GA seeding needs at least one batch",
        ));
    }
    for (l, s) in net.layers.iter_mut().zip(&sums) {
        // The single-sided ELRA layers: the adapters with a generator factor named `a`.
        let e = &mut l.adapter;
        let Some(ia) = e.param_index("a") else {
            continue;
        };
        let (d, k0) = e.dims();
        if d != s.nrows() {
            return Err(ElraError::shape("base", (d, k0), (s.nrows(), s.nrows())));
        }
        let mean = s / k as f64;
        if let Some((a, b)) = ga_factors(&mean, e.params()[ia].cols)? {
            e.set_param(ia, &a.map(T::of))?;
            if let Some(ib) = e.param_index("b") {
                e.set_param(ib, &b.map(T::of))?;
            }
        }
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::Activation;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn ga_factors_reconstruct_the_truncated_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let g = DMatrix::<f64>::from_fn(8, 8, |_, _| rng.random_range(-1.0..1.0));
        let (a, b) = ga_factors(&g, 3).unwrap().unwrap();
        // A orthonormal; −σ₁ A B is the best rank-3 approximation of g.
        assert!((a.tr_mul(&a) - DMatrix::identity(3, 3)).norm() < 1e-12);
        let mut sv: Vec<f64> = g.clone().singular_values().iter().copied().collect();
        sv.sort_by(|x, y| y.total_cmp(x));
        let approx = -(&a * &b) * sv[0];
        let resid = (&g - &approx).norm_squared();
        let want: f64 = sv[3..].iter().map(|s| s * s).sum();
        assert!((resid - want).abs() < 1e-10, "{resid} vs {want}");
        assert!(ga_factors(&DMatrix::zeros(4, 4), 2).unwrap().is_none());
        assert!(ga_factors(&g, 0).is_err());
    }

    #[test]
    fn frozen_generator_gradient_matches_finite_differences() {
        // ∂L/∂G at G = 0 equals the derivative of L(exp(εE) W0) in ε for any direction E.
        let net =
            FrozenNetwork::<f64>::random(&[4, 5, 3], Activation::Tanh, Activation::Identity, 1)
                .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let x = DMatrix::from_fn(6, 4, |_, _| rng.random_range(-1.0..1.0));
        let t = Targets::Values(DMatrix::from_fn(6, 3, |_, _| rng.random_range(-1.0..1.0)));
        let gs = frozen_generator_grads(&net, LossKind::Mse, &x, &t).unwrap();
        for (layer, gl) in gs.iter().enumerate() {
            let d = net.layers[layer].w0.nrows();
            let e = DMatrix::from_fn(d, d, |_, _| rng.random_range(-1.0..1.0));
            let f = |eps: f64| {
                let mut n2 = net.clone();
                n2.layers[layer].w0 = (&e * eps).exp() * &net.layers[layer].w0;
                let y = n2.forward(&x).unwrap();
                loss_and_grad(LossKind::Mse, &y, &t).unwrap().0
            };
            let h = 1e-5;
            let fd = (f(h) - f(-h)) / (2.0 * h);
            let an = gl.dot(&e);
            assert!(
                (fd - an).abs() <= 1e-8 * gl.norm() * e.norm(),
                "{fd} vs {an}"
            );
        }
    }
}
