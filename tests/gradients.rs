//! The hand-written reverse mode (`elra::grad`) against central differences and the dense oracle.
//!
//! For every adapter (general ELRA, ELRA-PSD, ELRA-Hyb at a random α, double-sided ELRA, LoRA),
//! proptest draws shapes, a generator scale (the spectral norm of the raw generator, log-uniform
//! in [1e-3, 4], so the App. H clip at τ = 2 is active in part of the cases), the η multiplier,
//! dropout masks and energy weights, and checks two things in f64:
//!
//! 1. **Dense oracle, every coordinate.** The loss `L = ⟨Ȳ, Y⟩ + λ‖G‖²_F` is evaluated on the
//!    dense `W_new = exp(G) W0` with nalgebra's `exp` (`elra::reference::dense_exp`, no
//!    Woodbury, no φ1) and the clip from a dense SVD; its gradient is taken by central
//!    differences coordinate by coordinate, and `‖g_hand − g_fd‖ ≤ 1e-6 ‖g_fd‖`.
//! 2. **The adapter's own forward, random directions.** Central differences of the adapter's
//!    forward (the layer's forward + its energy) along three random directions `D`, compared with
//!    `⟨g_hand, D⟩`; the error is taken relative to `Σ_blocks ‖g_block‖‖D_block‖` (the
//!    Cauchy–Schwarz bound of the directional derivative), tolerance 1e-6.
//!
//! **Step and tolerance.** Derivatives are five-point central differences
//! `[8(f(h)−f(−h)) − (f(2h)−f(−2h))]/12h`, truncation error O(h⁴). Each coordinate (or each
//! block of a direction) moves by `h = h_rel × its block's RMS` (η by `h_rel η`), with
//! `h_rel = 1e-3 / max(1, Σρ)` where ρ is, per generator, the larger of its (effective)
//! spectral norm and the magnitude of its terms `‖A‖ η m (α‖A‖ + (1−α)‖B‖)` (they differ when
//! a Hyb generator's terms cancel; `factor_scale`): the k-th
//! derivative along a relative move of the factors grows like `(Σρ)^k`, so the truncation
//! stays near `(h_rel Σρ · c)⁴ ≈ (6e-3)⁴ ≈ 1e-9` (c ≈ 6 covers the degree of the factors and
//! the few standard normal draws of a direction). Rounding: the loss carries an absolute error
//! of a few `u|L|` (`u = 1.1e-16`; nalgebra's `exp` is accurate to a few u), so a difference
//! quotient errs by `~u|L|/h`; the gradient of a generator block is at least `~ρ|L|/scale`
//! for a generator of spectral norm ρ ≥ 1e-3, so the relative rounding error is
//! `≲ u/(h_rel ρ) ≈ 1e-10`. Both sit far below the 1e-6 tolerance, which any real mistake
//! exceeds by orders of magnitude (a wrong transpose or a missing term is an O(1) relative
//! error). Near the clip's kinks the loss is not smooth, so the step also shrinks with the
//! relative distance `m` to the threshold, `h_rel ≤ m/100`, so that no stencil point crosses it
//! (cases with `m < 1e-4` are skipped; rounding then stays below `u/(1e-6 · 2) ≈ 1e-10`);
//! while clipped the n-th derivative of σ₁ scales like `1/gapⁿ⁻¹`, so cases with a top gap
//! below 5 % are skipped and `h_rel ≤ 1e-4` (truncation `(h/gap)⁴ ≲ 1e-9`).
//!
//! The proptest generator is seeded (`RngSeed::Fixed`) so that CI sees the same cases on
//! every run; `ELRA_PROPTEST_SEED=<u64>` explores new ones.
#![allow(non_snake_case)]

#[path = "common/seeded.rs"]
mod seeded;
use elra::adapter::{
    AlphaSchedule, DoubleSidedConfig, DoubleSidedLayer, ElraConfig, ElraLayer, EtaMultiplier,
    GeneratorSpec, LoraConfig, LoraLayer, Variant,
};
use elra::grad::{
    double_backward_parts, double_forward_parts, elra_backward, elra_backward_parts, elra_forward,
    elra_forward_parts, energy_backward, exp_rows_backward, exp_rows_forward, lora_backward,
    lora_forward, Route, SideParams,
};
use elra::reference::dense_exp;
use nalgebra::DMatrix;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

const TOL: f64 = 1e-6;
const TAU: f64 = 2.0;
const TOTAL_STEPS: usize = 100;

fn randn(rng: &mut ChaCha8Rng, r: usize, c: usize) -> DMatrix<f64> {
    DMatrix::from_fn(r, c, |_, _| rng.sample::<f64, _>(StandardNormal))
}

fn rms(m: &DMatrix<f64>) -> f64 {
    (m.norm_squared() / m.len().max(1) as f64)
        .sqrt()
        .max(1e-300)
}

fn sigma_max(m: &DMatrix<f64>) -> f64 {
    m.clone().singular_values().max()
}

fn sorted_singular(m: &DMatrix<f64>) -> Vec<f64> {
    let mut s: Vec<f64> = m.clone().singular_values().iter().copied().collect();
    s.sort_by(|a, b| b.partial_cmp(a).unwrap());
    s
}

/// Dense `C_raw = η m (αAᵀ + (1−α)B)` straight from eq. (19).
fn dense_c_raw(
    a: &DMatrix<f64>,
    b: Option<&DMatrix<f64>>,
    eta_eff: f64,
    alpha: f64,
) -> DMatrix<f64> {
    let mut c = a.transpose() * alpha;
    if let Some(b) = b {
        c += b * (1.0 - alpha);
    }
    c * eta_eff
}

/// Dense effective generator: `G_raw = A C_raw`, clipped by a dense SVD (App. H).
fn dense_generator(a: &DMatrix<f64>, c_raw: &DMatrix<f64>, tau: Option<f64>) -> DMatrix<f64> {
    let g = a * c_raw;
    match tau {
        Some(t) => {
            let s = sigma_max(&g);
            if s > t {
                g * (t / s)
            } else {
                g
            }
        }
        None => g,
    }
}

/// The finite-difference step for a generator (module docs) and its effective spectral norm
/// ρ (σ₁, or τ while clipped). With `m = |σ₁ − τ|/τ` the relative distance to the clip
/// threshold: `None` (skip) when `m < 1e-4` or, while clipped, when the top gap is below 5 %;
/// otherwise `h_rel = min(1e-3, m/100)` so that no stencil point crosses the threshold (a
/// relative move of the parameters by `2·h_rel` times a few standard normal draws moves σ₁ by
/// far less than `m`), and at most `1e-4` while clipped (the O(h⁴/gap⁴) truncation of σ₁'s
/// expansion stays below 1e-9). The caller divides by `max(1, Σρ)` (see [`curvature_step`]).
fn clip_step(g_raw: &DMatrix<f64>, tau: Option<f64>) -> Option<(f64, f64)> {
    let s = sorted_singular(g_raw);
    let Some(t) = tau else {
        return Some((1e-3, s[0]));
    };
    let m = (s[0] - t).abs() / t;
    if m < 1e-4 {
        return None;
    }
    let h = (m / 100.0).min(1e-3);
    if s[0] > t {
        if s.len() > 1 && s[0] - s[1] < 0.05 * s[0] {
            return None;
        }
        return Some((h.min(1e-4), t));
    }
    Some((h, s[0]))
}

/// How far the generator moves along a relative move of its factors: `G = A C_raw` with
/// `C_raw = η m (αAᵀ + (1−α)B)` (eq. 19), so moving A, B and η by a relative `t` moves G by up
/// to `t` times a small constant times `‖A‖₂ η m (α‖A‖₂ + (1−α)‖B‖₂)` — the sum of the
/// magnitudes of the generator's terms, not its norm ρ. The two differ when the PSD and the
/// general term of a Hyb generator nearly cancel: a random seed found η = 728 for ρ = 1
/// (terms ≈ 215 each, D = 1), where a step sized by ρ left a five-point truncation error of
/// 2.8e-6, scaling as h⁴. `clip` is the clip factor `ρ_eff/ρ_raw` (1 when not clipped).
fn factor_scale(
    a: &DMatrix<f64>,
    b: Option<&DMatrix<f64>>,
    eta_eff: f64,
    alpha: f64,
    clip: f64,
) -> f64 {
    let na = sigma_max(a);
    let terms = alpha * na + (1.0 - alpha) * b.map_or(0.0, sigma_max);
    na * eta_eff.abs() * terms * clip
}

/// `h / max(1, Σρ)`: the k-th derivative of the loss along a relative move of the factors grows
/// like `(Σρ)^k` (`exp` of generators of total norm Σρ), so the O(h⁴) truncation of the
/// five-point stencil stays at `(h_rel·c)⁴` with the step scaled this way.
fn curvature_step(h: f64, rhos: &[f64]) -> f64 {
    h / rhos.iter().sum::<f64>().max(1.0)
}

/// A flat list of named parameter blocks with their gradients.
#[derive(Clone, Debug)]
struct Blocks(Vec<DMatrix<f64>>);

impl Blocks {
    fn dot(&self, other: &Blocks) -> f64 {
        self.0.iter().zip(&other.0).map(|(a, b)| a.dot(b)).sum()
    }
    fn cs_bound(&self, other: &Blocks) -> f64 {
        self.0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| a.norm() * b.norm())
            .sum()
    }
    fn axpy(&self, h: f64, dir: &Blocks) -> Blocks {
        Blocks(self.0.iter().zip(&dir.0).map(|(a, d)| a + d * h).collect())
    }
    /// A random direction scaled per block by the block's RMS.
    fn random_dir(&self, rng: &mut ChaCha8Rng) -> Blocks {
        Blocks(
            self.0
                .iter()
                .map(|m| randn(rng, m.nrows(), m.ncols()) * rms(m))
                .collect(),
        )
    }
}

/// Five-point central difference `[8(f(h) − f(−h)) − (f(2h) − f(−2h))] / 12h` (error O(h⁴)).
fn five_point(f: &dyn Fn(f64) -> f64, h: f64) -> f64 {
    (8.0 * (f(h) - f(-h)) - (f(2.0 * h) - f(-2.0 * h))) / (12.0 * h)
}

/// Five-point central-difference gradient of `f` at `p`, coordinate by coordinate, with
/// `h = h_rel × RMS(block)`.
fn fd_gradient(p: &Blocks, f: &dyn Fn(&Blocks) -> f64, h_rel: f64) -> Blocks {
    let mut out = Vec::new();
    for (bi, m) in p.0.iter().enumerate() {
        let h = h_rel * rms(m);
        let mut g = DMatrix::zeros(m.nrows(), m.ncols());
        for idx in 0..m.len() {
            let along = |t: f64| {
                let mut q = p.clone();
                q.0[bi][idx] += t;
                f(&q)
            };
            g[idx] = five_point(&along, h);
        }
        out.push(g);
    }
    Blocks(out)
}

fn rel_gap(got: &Blocks, want: &Blocks) -> f64 {
    let num: f64 = got
        .0
        .iter()
        .zip(&want.0)
        .map(|(a, b)| (a - b).norm_squared())
        .sum();
    let den: f64 = want.0.iter().map(|b| b.norm_squared()).sum();
    num.sqrt() / den.sqrt().max(1e-300)
}

/// Worst relative error of directional five-point differences of `f` along three random
/// directions (each block scaled by its RMS, step `h_rel`), relative to the Cauchy–Schwarz
/// bound (module docs).
fn directional_error(
    p: &Blocks,
    g: &Blocks,
    f: &dyn Fn(&Blocks) -> f64,
    rng: &mut ChaCha8Rng,
    h_rel: f64,
) -> f64 {
    let mut worst: f64 = 0.0;
    for _ in 0..3 {
        let dir = p.random_dir(rng);
        let fd = five_point(&|t| f(&p.axpy(t, &dir)), h_rel);
        let an = g.dot(&dir);
        worst = worst.max((fd - an).abs() / g.cs_bound(&dir).max(1e-300));
    }
    worst
}

fn random_mask(rng: &mut ChaCha8Rng, n: usize, d: usize) -> DMatrix<f64> {
    let p = 0.3;
    DMatrix::from_fn(n, d, |_, _| {
        if rng.random::<f64>() < p {
            0.0
        } else {
            1.0 / (1.0 - p)
        }
    })
}

/// One random single-sided ELRA case.
struct ElraCase {
    variant: Variant,
    w0: DMatrix<f64>,
    x: DMatrix<f64>,
    a: DMatrix<f64>,
    b: Option<DMatrix<f64>>,
    eta: f64,
    spec: GeneratorSpec,
    step: usize,
    ybar: DMatrix<f64>,
    mask: Option<DMatrix<f64>>,
}

#[allow(clippy::too_many_arguments)]
fn elra_case(
    variant: Variant,
    d: usize,
    k: usize,
    r: usize,
    n: usize,
    log_rho: f64,
    with_mask: bool,
    seed: u64,
) -> ElraCase {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let r = r.min(d);
    let w0 = randn(&mut rng, d, k);
    let x = randn(&mut rng, n, k);
    let a = randn(&mut rng, d, r);
    let b = variant.uses_b().then(|| randn(&mut rng, r, d));
    let alpha = match variant {
        Variant::General => 0.0,
        Variant::Psd => 1.0,
        Variant::Hyb => rng.random_range(0.0..1.0),
    };
    let step = rng.random_range(0..=TOTAL_STEPS);
    let eta_mult = EtaMultiplier::Cosine {
        total_steps: TOTAL_STEPS,
    }
    .at(step);
    // η so that ‖G_raw‖₂ = ρ.
    let unit = sigma_max(&(&a * dense_c_raw(&a, b.as_ref(), eta_mult, alpha)));
    let eta = 10f64.powf(log_rho) / unit;
    let tau = if rng.random::<f64>() < 0.8 {
        Some(TAU)
    } else {
        None
    };
    let lambda = [0.0, 1e-5, 0.05][rng.random_range(0..3)];
    let ybar = randn(&mut rng, n, d);
    let mask = with_mask.then(|| random_mask(&mut rng, n, d));
    ElraCase {
        variant,
        w0,
        x,
        a,
        b,
        eta,
        spec: GeneratorSpec {
            alpha,
            eta_mult,
            tau,
            lambda,
        },
        step,
        ybar,
        mask,
    }
}

impl ElraCase {
    fn blocks(&self) -> Blocks {
        let mut v = vec![self.a.clone()];
        if let Some(b) = &self.b {
            v.push(b.clone());
        }
        v.push(DMatrix::from_element(1, 1, self.eta));
        v.push(self.x.clone());
        Blocks(v)
    }
    fn unpack<'a>(
        &self,
        p: &'a Blocks,
    ) -> (
        &'a DMatrix<f64>,
        Option<&'a DMatrix<f64>>,
        f64,
        &'a DMatrix<f64>,
    ) {
        let has_b = self.b.is_some();
        let a = &p.0[0];
        let b = has_b.then(|| &p.0[1]);
        let i = if has_b { 2 } else { 1 };
        (a, b, p.0[i][0], &p.0[i + 1])
    }
    fn step(&self) -> Option<f64> {
        let c = dense_c_raw(
            &self.a,
            self.b.as_ref(),
            self.eta * self.spec.eta_mult,
            self.spec.alpha,
        );
        let g_raw = &self.a * c;
        let (h, rho) = clip_step(&g_raw, self.spec.tau)?;
        let f = factor_scale(
            &self.a,
            self.b.as_ref(),
            self.eta * self.spec.eta_mult,
            self.spec.alpha,
            rho / sigma_max(&g_raw),
        );
        Some(curvature_step(h, &[rho.max(f)]))
    }
    /// The dense oracle loss (module docs).
    fn dense_loss(&self, p: &Blocks) -> f64 {
        let (a, b, eta, x) = self.unpack(p);
        let c = dense_c_raw(a, b, eta * self.spec.eta_mult, self.spec.alpha);
        let g = dense_generator(a, &c, self.spec.tau);
        let e = dense_exp(&g).unwrap();
        let u = x * self.w0.transpose();
        let delta = x * ((&e * &self.w0) - &self.w0).transpose();
        let y = match &self.mask {
            None => u + delta,
            Some(m) => u + delta.component_mul(m),
        };
        self.ybar.dot(&y) + self.spec.lambda * g.norm_squared()
    }
    fn hand(&self, route: Route) -> Blocks {
        let (y, tape) = elra_forward_parts(
            &self.x,
            &self.w0,
            &self.a,
            self.b.as_ref(),
            self.eta,
            &self.spec,
            route,
            self.mask.as_ref(),
        )
        .unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        let g = elra_backward_parts(&self.x, &self.w0, &tape, self.ybar.clone()).unwrap();
        let mut v = vec![g.a];
        if let Some(b) = g.b {
            v.push(b);
        }
        v.push(DMatrix::from_element(1, 1, g.eta));
        v.push(g.x);
        Blocks(v)
    }
    fn layer(&self, p: &Blocks) -> ElraLayer<f64> {
        let (a, b, eta, _) = self.unpack(p);
        let (d, k) = self.w0.shape();
        let mut cfg = ElraConfig::new(self.variant, d, k, a.ncols(), TOTAL_STEPS);
        cfg.generator.eta = eta;
        cfg.generator.tau = self.spec.tau;
        cfg.generator.lambda = self.spec.lambda;
        cfg.generator.schedule = AlphaSchedule::Constant {
            alpha: self.spec.alpha,
        };
        cfg.generator.eta_multiplier = EtaMultiplier::Cosine {
            total_steps: TOTAL_STEPS,
        };
        let mut l = ElraLayer::from_factors(cfg, self.w0.clone(), a.clone(), b.cloned()).unwrap();
        l.set_step(self.step);
        l
    }
    /// The loss through the adapter's own forward and energy (no mask).
    fn adapter_loss(&self, p: &Blocks) -> f64 {
        let layer = self.layer(p);
        let (.., x) = self.unpack(p);
        let y = layer.forward(x).unwrap();
        self.ybar.dot(&y) + layer.energy_penalty().unwrap()
    }
}

fn check_double_case(case: &DoubleCase, h: f64, seed: u64) -> Result<(), TestCaseError> {
    let p = case.blocks();
    let hand = case.hand();
    let fd = fd_gradient(&p, &|q| case.dense_loss(q), h);
    let e = rel_gap(&hand, &fd);
    prop_assert!(e <= TOL, "dense oracle: relative gradient error {e:e}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd0b1e);
    let e2 = directional_error(&p, &hand, &|q| case.adapter_loss(q), &mut rng, h);
    prop_assert!(e2 <= TOL, "adapter forward: directional error {e2:e}");
    Ok(())
}

/// The case a random seed found (double-sided Hyb, D = 1, k = 6, ranks 1 and 2): the left
/// generator's PSD and general terms nearly cancel (η = 728 for ρ = 1), and a difference step
/// sized by ρ alone left a truncation error of 2.8e-6 (it scaled as h⁴: the gradient was
/// right). With the step sized by [`factor_scale`] the case passes at `TOL`.
#[test]
fn gradient_double_sided_hyb_with_cancelling_generator_terms() {
    let seed = 37501998088545385;
    let case = double_case(Variant::Hyb, 1, 6, 1, 2, 2, 0.0, 0.0, seed);
    assert!(case.eta_l > 700.0, "case no longer has cancelling terms");
    check_double_case(&case, case.step().unwrap(), seed).unwrap();
}

fn check_elra_case(case: &ElraCase, h: f64, seed: u64) -> Result<(), TestCaseError> {
    let p = case.blocks();
    let hand = case.hand(Route::Woodbury);
    let fd = fd_gradient(&p, &|q| case.dense_loss(q), h);
    let e = rel_gap(&hand, &fd);
    prop_assert!(e <= TOL, "dense oracle: relative gradient error {e:e}");
    if case.mask.is_none() {
        // The layer wrapper gives the same gradient as the explicit parts.
        let layer = case.layer(&p);
        let (_, tape) = elra_forward(&layer, &case.x, Route::Woodbury, None).unwrap();
        let g = elra_backward(&layer, &case.x, &tape, case.ybar.clone()).unwrap();
        prop_assert!((&g.a - &hand.0[0]).norm() <= 1e-12 * hand.0[0].norm().max(1e-300));
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let e2 = directional_error(&p, &hand, &|q| case.adapter_loss(q), &mut rng, h);
        prop_assert!(e2 <= TOL, "adapter forward: directional error {e2:e}");
        // Merged route: same gradients up to rounding.
        let merged = case.hand(Route::Merged);
        let e3 = rel_gap(&merged, &hand);
        prop_assert!(e3 <= 1e-10, "routes differ by {e3:e}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        max_global_rejects: 4096,
        failure_persistence: None,
        ..seeded::config(64)
    })]

    #[test]
    fn gradient_elra_general_matches_dense_oracle_and_adapter(
        d in 1usize..=9, k in 1usize..=9, r in 1usize..=4, n in 1usize..=5,
        log_rho in -3.0f64..0.9, mask in proptest::bool::weighted(0.25), seed in any::<u64>(),
    ) {
        let case = elra_case(Variant::General, d, k, r, n, log_rho, mask, seed);
        let h = case.step();
        prop_assume!(h.is_some());
        check_elra_case(&case, h.unwrap(), seed)?;
    }

    #[test]
    fn gradient_elra_psd_matches_dense_oracle_and_adapter(
        d in 1usize..=9, k in 1usize..=9, r in 1usize..=4, n in 1usize..=5,
        log_rho in -3.0f64..0.9, mask in proptest::bool::weighted(0.25), seed in any::<u64>(),
    ) {
        let case = elra_case(Variant::Psd, d, k, r, n, log_rho, mask, seed);
        let h = case.step();
        prop_assume!(h.is_some());
        check_elra_case(&case, h.unwrap(), seed)?;
    }

    #[test]
    fn gradient_elra_hyb_matches_dense_oracle_and_adapter(
        d in 1usize..=9, k in 1usize..=9, r in 1usize..=4, n in 1usize..=5,
        log_rho in -3.0f64..0.9, mask in proptest::bool::weighted(0.25), seed in any::<u64>(),
    ) {
        let case = elra_case(Variant::Hyb, d, k, r, n, log_rho, mask, seed);
        let h = case.step();
        prop_assume!(h.is_some());
        check_elra_case(&case, h.unwrap(), seed)?;
    }

    #[test]
    fn gradient_double_sided_matches_dense_oracle_and_adapter(
        d in 1usize..=7, k in 1usize..=7, rl in 1usize..=3, rr in 1usize..=3, n in 1usize..=4,
        log_rho_l in -3.0f64..0.9, log_rho_r in -3.0f64..0.9, vsel in 0usize..3,
        seed in any::<u64>(),
    ) {
        let variant = [Variant::General, Variant::Psd, Variant::Hyb][vsel];
        let case = double_case(variant, d, k, rl, rr, n, log_rho_l, log_rho_r, seed);
        let h = case.step();
        prop_assume!(h.is_some());
        check_double_case(&case, h.unwrap(), seed)?;
    }

    #[test]
    fn gradient_lora_matches_dense_oracle_and_adapter(
        d in 1usize..=9, k in 1usize..=9, r in 1usize..=4, n in 1usize..=5,
        scale in -2.0f64..1.0, seed in any::<u64>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = r.min(d).min(k);
        let w0 = randn(&mut rng, d, k);
        let x = randn(&mut rng, n, k);
        let la = randn(&mut rng, r, k) * 10f64.powf(scale);
        let lb = randn(&mut rng, d, r);
        let ybar = randn(&mut rng, n, d);
        let mut cfg = LoraConfig::new(d, k, r);
        cfg.lora_alpha = rng.random_range(0.5..16.0);
        let s = cfg.scaling();
        let p = Blocks(vec![la.clone(), lb.clone(), x.clone()]);
        let layer_of = |q: &Blocks| LoraLayer::from_factors(cfg.clone(), w0.clone(), q.0[0].clone(), q.0[1].clone()).unwrap();
        let layer = layer_of(&p);
        let (_, tape) = lora_forward(&layer, &x, None).unwrap();
        let g = lora_backward(&layer, &x, &tape, ybar.clone()).unwrap();
        let hand = Blocks(vec![g.lora_a, g.lora_b, g.x]);
        let dense = |q: &Blocks| {
            let w_new = &w0 + (&q.0[1] * &q.0[0]) * s;
            ybar.dot(&(&q.0[2] * w_new.transpose()))
        };
        let fd = fd_gradient(&p, &dense, 1e-3);
        let e = rel_gap(&hand, &fd);
        prop_assert!(e <= TOL, "dense oracle: relative gradient error {e:e}");
        let adapter = |q: &Blocks| ybar.dot(&layer_of(q).forward(&q.0[2]).unwrap());
        let e2 = directional_error(&p, &hand, &adapter, &mut rng, 1e-3);
        prop_assert!(e2 <= TOL, "adapter forward: directional error {e2:e}");
    }

    #[test]
    fn gradient_energy_penalty_matches_dense_oracle(
        d in 1usize..=9, r in 1usize..=4, vsel in 0usize..3, log_rho in -3.0f64..0.9,
        seed in any::<u64>(),
    ) {
        // Only the energy: Ȳ = 0 and λ = 1, L = ‖G‖²_F of the clipped generator (eq. 20–21).
        let variant = [Variant::General, Variant::Psd, Variant::Hyb][vsel];
        let mut case = elra_case(variant, d, 3, r, 2, log_rho, false, seed);
        case.spec.lambda = 1.0;
        case.ybar.fill(0.0);
        let h = case.step();
        prop_assume!(h.is_some());
        let h = h.unwrap();
        let p = case.blocks();
        let hand = case.hand(Route::Woodbury);
        prop_assert!(hand.0.last().unwrap().norm() == 0.0, "∂x must vanish with Ȳ = 0");
        let fd = fd_gradient(&p, &|q| case.dense_loss(q), h);
        // Relative to the natural size E/‖A‖ of the gradient as well (Euler: ⟨∇E, θ⟩ = deg·E):
        // a clipped rank-1 generator has ‖G‖_F = ‖G‖₂ = τ fixed, so its gradient is exactly 0.
        let energy = case.dense_loss(&p);
        let num: f64 = hand.0.iter().zip(&fd.0).map(|(a, b)| (a - b).norm_squared()).sum();
        let den: f64 = fd.0.iter().map(|b| b.norm_squared()).sum::<f64>().sqrt();
        let e = num.sqrt() / den.max(energy / case.a.norm());
        prop_assert!(e <= TOL, "energy gradient error {e:e}");
        // The energy value agrees with the adapter's (eq. 21 from Grams).
        let layer = case.layer(&p);
        let mine = elra_forward(&layer, &case.x, Route::Woodbury, None).unwrap().1.generator.energy;
        let theirs = layer.energy_penalty().unwrap();
        prop_assert!((mine - theirs).abs() <= 1e-12 * theirs.abs().max(1e-300));
    }
}

/// The raw energy gradient formulas `(2λA(CCᵀ), 2λ(AᵀA)C)` on free factors, without the chain.
#[test]
fn gradient_energy_free_factors() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for &(d, r) in &[(1, 1), (5, 2), (9, 4), (12, 12)] {
        let a = randn(&mut rng, d, r);
        let c = randn(&mut rng, r, d);
        let (e, ga, gc) = energy_backward(&a, &c, 0.7).unwrap();
        let dense = |q: &Blocks| 0.7 * (&q.0[0] * &q.0[1]).norm_squared();
        let p = Blocks(vec![a.clone(), c.clone()]);
        assert!((e - dense(&p)).abs() <= 1e-13 * e);
        let fd = fd_gradient(&p, &dense, 1e-3);
        let err = rel_gap(&Blocks(vec![ga, gc]), &fd);
        assert!(err <= TOL, "{d}x{r}: {err:e}");
    }
}

/// The rows primitive alone, with a dropout mask, against the dense `X + D∘(X (exp(AC) − I)ᵀ)`.
#[test]
fn gradient_exp_rows_primitive_with_mask() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for &(nb, n, r) in &[(3, 6, 2), (1, 1, 1), (5, 8, 8), (4, 9, 3)] {
        let x = randn(&mut rng, nb, n);
        let a = randn(&mut rng, n, r) * 0.5;
        let c = randn(&mut rng, r, n) * 0.5;
        let mask = random_mask(&mut rng, nb, n);
        let ybar = randn(&mut rng, nb, n);
        let z = &c * &a;
        let m = elra::linalg::phi1(&z).unwrap();
        let (y, tape) = exp_rows_forward(&x, &a, &c, &m, Some(&mask)).unwrap();
        let dense = |q: &Blocks| {
            let e = dense_exp(&(&q.0[1] * &q.0[2])).unwrap() - DMatrix::identity(n, n);
            let yy = &q.0[0] + (&q.0[0] * e.transpose()).component_mul(&mask);
            ybar.dot(&yy)
        };
        let p = Blocks(vec![x.clone(), a.clone(), c.clone()]);
        assert!((ybar.dot(&y) - dense(&p)).abs() <= 1e-12 * y.norm() * ybar.norm());
        let g = exp_rows_backward(&x, &a, &c, &z, &m, &tape, ybar.clone()).unwrap();
        let fd = fd_gradient(&p, &dense, 1e-3);
        let err = rel_gap(&Blocks(vec![g.x, g.a, g.c]), &fd);
        assert!(err <= TOL, "{nb}x{n}x{r}: {err:e}");
    }
}

/// Bad input is reported, not panicked on.
#[test]
fn gradient_rejects_bad_input() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let case = elra_case(Variant::Hyb, 5, 4, 2, 3, -1.0, false, 13);
    let (_, tape) = elra_forward_parts(
        &case.x,
        &case.w0,
        &case.a,
        case.b.as_ref(),
        case.eta,
        &case.spec,
        Route::Woodbury,
        None,
    )
    .unwrap();
    let bad = randn(&mut rng, 3, 4);
    assert!(matches!(
        elra_backward_parts(&case.x, &case.w0, &tape, bad),
        Err(elra::ElraError::Shape { arg: "ybar", .. })
    ));
    let mut nan = case.ybar.clone();
    nan[0] = f64::NAN;
    assert!(matches!(
        elra_backward_parts(&case.x, &case.w0, &tape, nan),
        Err(elra::ElraError::NonFinite { arg: "ybar" })
    ));
    let wrong_x = randn(&mut rng, 3, 5);
    assert!(elra_forward_parts(
        &wrong_x,
        &case.w0,
        &case.a,
        case.b.as_ref(),
        case.eta,
        &case.spec,
        Route::Woodbury,
        None
    )
    .is_err());
    assert!(elra_forward_parts(
        &case.x,
        &case.w0,
        &case.a,
        case.b.as_ref(),
        -1.0,
        &case.spec,
        Route::Woodbury,
        None
    )
    .is_err());
    let mask = random_mask(&mut rng, 3, 5);
    assert!(matches!(
        elra_forward_parts(
            &case.x,
            &case.w0,
            &case.a,
            case.b.as_ref(),
            case.eta,
            &case.spec,
            Route::Merged,
            Some(&mask)
        ),
        Err(elra::ElraError::InvalidArgument { arg: "mask", .. })
    ));
}

/// f32 gradients (the precision of the benchmarks) agree with f64 to f32 accuracy.
#[test]
fn gradient_f32_close_to_f64() {
    let case = elra_case(Variant::Hyb, 24, 20, 4, 16, 0.5, false, 14);
    let f = |m: &DMatrix<f64>| m.map(|v| v as f32);
    let (_, t64) = elra_forward_parts(
        &case.x,
        &case.w0,
        &case.a,
        case.b.as_ref(),
        case.eta,
        &case.spec,
        Route::Woodbury,
        None,
    )
    .unwrap();
    let g64 = elra_backward_parts(&case.x, &case.w0, &t64, case.ybar.clone()).unwrap();
    let b32 = case.b.as_ref().map(f);
    let (_, t32) = elra_forward_parts(
        &f(&case.x),
        &f(&case.w0),
        &f(&case.a),
        b32.as_ref(),
        case.eta as f32,
        &case.spec,
        Route::Woodbury,
        None,
    )
    .unwrap();
    let g32 = elra_backward_parts(&f(&case.x), &f(&case.w0), &t32, f(&case.ybar)).unwrap();
    let back = |m: &DMatrix<f32>| m.map(|v| v as f64);
    // f32 rounding (u = 6e-8) amplified by the O(10) conditioning of these small products.
    for (name, a, b) in [
        ("a", back(&g32.a), g64.a.clone()),
        ("x", back(&g32.x), g64.x.clone()),
    ] {
        let e = (&a - &b).norm() / b.norm();
        assert!(e <= 1e-4, "{name}: {e:e}");
    }
    let eb = (back(g32.b.as_ref().unwrap()) - g64.b.as_ref().unwrap()).norm()
        / g64.b.as_ref().unwrap().norm();
    assert!(eb <= 1e-4, "b: {eb:e}");
}

struct DoubleCase {
    variant: Variant,
    w0: DMatrix<f64>,
    x: DMatrix<f64>,
    al: DMatrix<f64>,
    bl: Option<DMatrix<f64>>,
    eta_l: f64,
    ar: DMatrix<f64>,
    br: Option<DMatrix<f64>>,
    eta_r: f64,
    spec: GeneratorSpec,
    step: usize,
    ybar: DMatrix<f64>,
}

#[allow(clippy::too_many_arguments)]
fn double_case(
    variant: Variant,
    d: usize,
    k: usize,
    rl: usize,
    rr: usize,
    n: usize,
    log_rho_l: f64,
    log_rho_r: f64,
    seed: u64,
) -> DoubleCase {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (rl, rr) = (rl.min(d), rr.min(k));
    let w0 = randn(&mut rng, d, k);
    let x = randn(&mut rng, n, k);
    let al = randn(&mut rng, d, rl);
    let bl = variant.uses_b().then(|| randn(&mut rng, rl, d));
    let ar = randn(&mut rng, k, rr);
    let br = variant.uses_b().then(|| randn(&mut rng, rr, k));
    let alpha = match variant {
        Variant::General => 0.0,
        Variant::Psd => 1.0,
        Variant::Hyb => rng.random_range(0.0..1.0),
    };
    let step = rng.random_range(0..=TOTAL_STEPS);
    let eta_mult = EtaMultiplier::Cosine {
        total_steps: TOTAL_STEPS,
    }
    .at(step);
    let eta_l =
        10f64.powf(log_rho_l) / sigma_max(&(&al * dense_c_raw(&al, bl.as_ref(), eta_mult, alpha)));
    let eta_r =
        10f64.powf(log_rho_r) / sigma_max(&(&ar * dense_c_raw(&ar, br.as_ref(), eta_mult, alpha)));
    let tau = if rng.random::<f64>() < 0.8 {
        Some(TAU)
    } else {
        None
    };
    let lambda = [0.0, 0.05][rng.random_range(0..2)];
    let ybar = randn(&mut rng, n, d);
    DoubleCase {
        variant,
        w0,
        x,
        al,
        bl,
        eta_l,
        ar,
        br,
        eta_r,
        spec: GeneratorSpec {
            alpha,
            eta_mult,
            tau,
            lambda,
        },
        step,
        ybar,
    }
}

impl DoubleCase {
    fn blocks(&self) -> Blocks {
        let mut v = vec![self.al.clone()];
        v.extend(self.bl.clone());
        v.push(DMatrix::from_element(1, 1, self.eta_l));
        v.push(self.ar.clone());
        v.extend(self.br.clone());
        v.push(DMatrix::from_element(1, 1, self.eta_r));
        v.push(self.x.clone());
        Blocks(v)
    }
    #[allow(clippy::type_complexity)]
    fn unpack<'a>(
        &self,
        p: &'a Blocks,
    ) -> (
        (&'a DMatrix<f64>, Option<&'a DMatrix<f64>>, f64),
        (&'a DMatrix<f64>, Option<&'a DMatrix<f64>>, f64),
        &'a DMatrix<f64>,
    ) {
        let hb = self.variant.uses_b();
        let mut i = 0;
        let al = &p.0[i];
        i += 1;
        let bl = hb.then(|| &p.0[i]);
        i += hb as usize;
        let el = p.0[i][0];
        i += 1;
        let ar = &p.0[i];
        i += 1;
        let br = hb.then(|| &p.0[i]);
        i += hb as usize;
        let er = p.0[i][0];
        i += 1;
        ((al, bl, el), (ar, br, er), &p.0[i])
    }
    fn step(&self) -> Option<f64> {
        let m = self.spec.eta_mult;
        let cl = dense_c_raw(&self.al, self.bl.as_ref(), self.eta_l * m, self.spec.alpha);
        let cr = dense_c_raw(&self.ar, self.br.as_ref(), self.eta_r * m, self.spec.alpha);
        let (gl, gr) = (&self.al * cl, &self.ar * cr);
        let (hl, rl) = clip_step(&gl, self.spec.tau)?;
        let (hr, rr) = clip_step(&gr, self.spec.tau)?;
        let alpha = self.spec.alpha;
        let fl = factor_scale(
            &self.al,
            self.bl.as_ref(),
            self.eta_l * m,
            alpha,
            rl / sigma_max(&gl),
        );
        let fr = factor_scale(
            &self.ar,
            self.br.as_ref(),
            self.eta_r * m,
            alpha,
            rr / sigma_max(&gr),
        );
        Some(curvature_step(hl.min(hr), &[rl.max(fl), rr.max(fr)]))
    }
    fn dense_loss(&self, p: &Blocks) -> f64 {
        let ((al, bl, el), (ar, br, er), x) = self.unpack(p);
        let m = self.spec.eta_mult;
        let gl = dense_generator(
            al,
            &dense_c_raw(al, bl, el * m, self.spec.alpha),
            self.spec.tau,
        );
        let gr = dense_generator(
            ar,
            &dense_c_raw(ar, br, er * m, self.spec.alpha),
            self.spec.tau,
        );
        let w_new = dense_exp(&gl).unwrap() * &self.w0 * dense_exp(&gr).unwrap();
        self.ybar.dot(&(x * w_new.transpose()))
            + self.spec.lambda * (gl.norm_squared() + gr.norm_squared())
    }
    fn hand(&self) -> Blocks {
        let (y, tape) = double_forward_parts(
            &self.x,
            &self.w0,
            SideParams {
                a: &self.al,
                b: self.bl.as_ref(),
                eta: self.eta_l,
            },
            SideParams {
                a: &self.ar,
                b: self.br.as_ref(),
                eta: self.eta_r,
            },
            &self.spec,
            None,
        )
        .unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        let g = double_backward_parts(&self.x, &self.w0, &tape, self.ybar.clone()).unwrap();
        let mut v = vec![g.left.a];
        v.extend(g.left.b);
        v.push(DMatrix::from_element(1, 1, g.left.eta));
        v.push(g.right.a);
        v.extend(g.right.b);
        v.push(DMatrix::from_element(1, 1, g.right.eta));
        v.push(g.x);
        Blocks(v)
    }
    fn adapter_loss(&self, p: &Blocks) -> f64 {
        let ((al, bl, el), (ar, br, er), x) = self.unpack(p);
        let (d, k) = self.w0.shape();
        let mut cfg = DoubleSidedConfig::new(self.variant, d, k, al.ncols(), TOTAL_STEPS);
        cfg.r_right = ar.ncols();
        cfg.generator.tau = self.spec.tau;
        cfg.generator.lambda = self.spec.lambda;
        cfg.generator.schedule = AlphaSchedule::Constant {
            alpha: self.spec.alpha,
        };
        cfg.generator.eta_multiplier = EtaMultiplier::Cosine {
            total_steps: TOTAL_STEPS,
        };
        let mut layer = DoubleSidedLayer::from_factors(
            cfg,
            self.w0.clone(),
            (al.clone(), bl.cloned()),
            (ar.clone(), br.cloned()),
        )
        .unwrap();
        layer.set_etas(el, er).unwrap();
        layer.set_step(self.step);
        let (el2, er2) = layer.energies().unwrap();
        self.ybar.dot(&layer.forward(x).unwrap()) + self.spec.lambda * (el2 + er2)
    }
}
