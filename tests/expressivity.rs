//! Property tests for the constructions of Zeng & Lee, "The Expressive Power of Low-Rank
//! Adaptation" (src/expressivity/), and for the models' reverse mode. The App. G machinery built
//! on them (adapters, Adam, the experiment runner) is tested in `lab/tests/app_g.rs`.
//!
//! Tolerances. The constructions are exact in exact arithmetic; in f64 they are exact up to
//! rounding errors that grow with the size of the quantities combined and with the conditioning
//! of the inverses taken in eq. (8). Each test states the scale its tolerance is relative to.
#![allow(non_snake_case, clippy::needless_range_loop)]

#[path = "common/seeded.rs"]
mod seeded;
use elra::adapter::xavier_uniform;
use elra::expressivity::fnn::{self, Fnn};
use elra::expressivity::linear::{self, lemma_10, lemma_9, LinearModel};
use elra::expressivity::network::{mse_loss_and_grads, Network};
use elra::expressivity::tfn::{self, Tfn};
use elra::expressivity::{
    input_radius, product, spectral_norm, standard_normal, uniform_partition, SortedSvd,
};
use elra::reference::condition_number;
use elra::ElraError;
use nalgebra::{DMatrix, DVector};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `∏_l ‖M_l‖₂`: the magnitude of the rounding error committed when the product of the `M_l`
/// is formed in floating point (each product's error is `O(ε ‖A‖‖B‖)`).
fn factor_scale(ms: &[DMatrix<f64>]) -> f64 {
    ms.iter().map(|m| spectral_norm("m", m).unwrap()).product()
}

fn max_abs(m: &DMatrix<f64>) -> f64 {
    m.iter().fold(0.0, |a, x| a.max(x.abs()))
}

fn cases(n: u32) -> ProptestConfig {
    seeded::config(n)
}

// ---------------------------------------------------------------------------------------------
// The SVD every construction rests on (`LR_r`, `σ_k`).

proptest! {
    #![proptest_config(cases(64))]

    /// `SortedSvd` is a valid SVD: `U diag(σ) Vᵀ = M` to 1e-13·‖M‖₂ (backward stable Jacobi),
    /// `U`, `V` orthonormal to 1e-13, σ decreasing and ≥ 0, for full-rank and rank-deficient,
    /// square and rectangular matrices.
    #[test]
    fn svd_reconstructs_and_is_orthonormal(
        rows in 1usize..=9, cols in 1usize..=9, rank_frac in 0.0f64..=1.0, seed in any::<u64>()
    ) {
        let mut r = rng(seed);
        let k = ((rows.min(cols) as f64) * rank_frac) as usize;
        let m = standard_normal(rows, k, &mut r) * standard_normal(k, cols, &mut r);
        let s = SortedSvd::new("m", &m).unwrap();
        let n = rows.min(cols);
        let scale = s.sigma_1based(1).max(f64::MIN_POSITIVE);
        let rec = &s.U * DMatrix::from_diagonal(&s.sigma) * s.V.transpose();
        prop_assert!((rec - &m).amax() <= 1e-13 * scale);
        prop_assert!((s.U.transpose() * &s.U - DMatrix::<f64>::identity(n, n)).amax() <= 1e-13);
        prop_assert!((s.V.transpose() * &s.V - DMatrix::<f64>::identity(n, n)).amax() <= 1e-13);
        for i in 1..n {
            prop_assert!(s.sigma[i] <= s.sigma[i - 1] && s.sigma[i] >= 0.0);
        }
        prop_assert!(s.numerical_rank() == k);
    }
}

/// A 9×9 rank-8 matrix (found by the proptest above) whose null vector has no entry above 0.5:
/// the completion of `U` must still give an orthonormal column for the zero singular value
/// (it once left that column zero, `UᵀU` then had a 0 on the diagonal). Orthonormal to 1e-13 as
/// above.
#[test]
fn svd_completes_the_null_space_when_no_unit_vector_is_close_to_it() {
    let mut r = rng(4415932023432290328);
    let m = standard_normal(9, 8, &mut r) * standard_normal(8, 9, &mut r);
    let s = SortedSvd::new("m", &m).unwrap();
    assert_eq!(s.numerical_rank(), 8);
    let null = s.U.column(8);
    assert!(
        null.iter().all(|x| x.abs() <= 0.5),
        "case no longer exercises the fallback"
    );
    assert!((s.U.transpose() * &s.U - DMatrix::<f64>::identity(9, 9)).amax() <= 1e-13);
    let rec = &s.U * DMatrix::from_diagonal(&s.sigma) * s.V.transpose();
    assert!((rec - &m).amax() <= 1e-13 * s.sigma[0]);
}

/// The first case behind [`KAPPA_MAX`]: a random 4-layer frozen FNN whose last weight has
/// `κ₂ = 8·10⁵` (D = 8, rank 3; found by `lemma_11_adapted_fnn_is_one_layer_relu_with_LR_RL_weight`
/// with a random seed). The construction must answer with the typed error naming the adapted
/// weight that became singular to working precision — not a panic, not a wrong model.
#[test]
fn fnn_construction_reports_numerical_singularity_from_an_ill_conditioned_frozen_weight() {
    let mut r = rng(3693664998820782824);
    let frozen = Fnn::random(8, 4, &mut r).unwrap();
    let target = Fnn::random(8, 1, &mut r).unwrap();
    let x = inputs(64, 8, &mut r);
    assert!(max_condition(&frozen.weights) > 1e5);
    match fnn::construct(&frozen, &target, 3, input_radius(&x)) {
        Err(ElraError::Numerical(msg)) => assert!(msg.contains("W_2 + ΔW_2"), "{msg}"),
        other => panic!("expected a numerical-singularity error, got {other:?}"),
    }
}

/// nalgebra 0.34's `svd(true, true)` returns σ₁ = 0.690 for this rank-one matrix (its Frobenius
/// norm, hence its σ₁, is 0.6200): dimforge/nalgebra#1172. `SortedSvd` must not.
#[test]
fn svd_is_correct_where_nalgebra_svd_is_not() {
    let m = DMatrix::from_row_slice(
        2,
        2,
        &[
            0.15991008761705994,
            -0.5227608036616935,
            -0.08556204204535756,
            0.2797101954548299,
        ],
    );
    let s = SortedSvd::new("m", &m).unwrap();
    assert!((s.sigma_1based(1) - m.norm()).abs() <= 1e-15);
    assert!(s.sigma_1based(2) <= 1e-15);
}

// ---------------------------------------------------------------------------------------------
// Lemma 8 / Lemma 13: random matrices satisfy the non-singularity assumptions.

proptest! {
    #![proptest_config(cases(32))]

    /// Lemma 8: matrices with i.i.d. continuous entries (Gaussian, Xavier-uniform) are
    /// non-singular. Numerically: σ_min/σ_max > 1e-10 (for D ≤ 16, P(κ > 1e10) ≈ D·1e-10).
    #[test]
    fn lemma_8_random_matrices_nonsingular(d in 1usize..=16, seed in any::<u64>()) {
        let mut r = rng(seed);
        for m in [standard_normal(d, d, &mut r), xavier_uniform(&mut r, d, d)] {
            let s = SortedSvd::new("m", &m).unwrap();
            prop_assert!(s.sigma_1based(d) / s.sigma_1based(1) > 1e-10);
        }
    }

    /// Lemma 13: for random frozen/target models, Assumption 1 holds — every
    /// `∏_{l∈P_i} W_l + LR_r(W̄_i − ∏W_l)` with `r ≤ R(M−1)` is non-singular (σ_min/σ_max >
    /// 1e-10, as above) — so Lemma 9 never reports a singular matrix for them.
    #[test]
    fn lemma_13_assumption_1_holds_for_random_models(
        d in 2usize..=8, lbar in 1usize..=2, m in 1usize..=3, seed in any::<u64>()
    ) {
        let mut r = rng(seed);
        let frozen = LinearModel::random(d, lbar * m, &mut r).unwrap();
        let target = LinearModel::random(d, lbar, &mut r).unwrap();
        for (i, p) in uniform_partition(lbar * m, lbar).unwrap().iter().enumerate() {
            let prod = product(&frozen.weights[p.clone()], d).unwrap();
            let e = SortedSvd::new("E", &(&target.weights[i] - &prod)).unwrap();
            for rr in 0..=d * (m - 1) {
                let s = SortedSvd::new("M", &(&prod + e.low_rank(rr))).unwrap();
                prop_assert!(s.sigma_1based(d) / s.sigma_1based(1) > 1e-10, "r = {}", rr);
            }
        }
        for R in 1..=d {
            prop_assert!(linear::construct(&frozen, &target, R).is_ok());
        }
    }
}

/// Largest 2-norm condition number among `ws` (`elra::reference::condition_number`; ∞ for a
/// singular one).
fn max_condition<'a>(ws: impl IntoIterator<Item = &'a DMatrix<f64>>) -> f64 {
    ws.into_iter()
        .map(|w| condition_number(w).unwrap())
        .fold(0.0, f64::max)
}

/// The property tests' claims are for frozen weights (for TFNs also the target's weights,
/// which Theorem 6's proof inverts and multiplies: a target `κ₂(W̄_2) = 4·10⁴` made
/// `Cᵀ W̄_Kᵀ W̄_Q C` singular to working precision at D = 3) of 2-norm condition number at most this:
/// the constructions multiply by inverses of frozen weights (eq. 8, Thm. 6's proof), so their
/// rounding errors grow with κ, and above it they may even report an adapted weight singular to
/// working precision although Lemma 8's non-singularity holds exactly. Random seeds found both:
/// `κ₂(W_4) = 8·10⁵` (FNN, D = 8, L = 4, R = 3) giving `σ_min/σ_max(W_2 + ΔW_2) = 4e-17`, and
/// `κ₂ = 1.5·10⁴` for one frozen TFN weight (D = 6, L = 2) giving adapted weights of norm 3.5e7
/// and logits off by 2.4e-7 relative. A Gaussian D×D weight exceeds κ₂ = 1e4 in 0.09 %, 0.13 %
/// and 0.18 % of draws for D = 6, 8, 10 (NumPy, 2·10⁵ draws each), so a case with up to 13
/// frozen weights is rejected in about 1–2 % of draws.
const KAPPA_MAX: f64 = 1e4;

/// `res` when the weights given (frozen, and for TFNs also the target's) all have `κ₂ ≤`
/// [`KAPPA_MAX`] (any error fails the
/// test); a rejected case otherwise — there the library's typed error
/// (`ElraError::Numerical`) or a less accurate construction is the expected outcome, not a
/// claim the test checks.
fn built<'a, T>(
    res: elra::Result<T>,
    frozen: impl IntoIterator<Item = &'a DMatrix<f64>>,
) -> Result<T, TestCaseError> {
    let kappa = max_condition(frozen);
    if kappa > KAPPA_MAX {
        return Err(TestCaseError::reject(format!(
            "weight with κ₂ = {kappa:.1e} > {KAPPA_MAX:e}"
        )));
    }
    res.map_err(|e| TestCaseError::fail(format!("construction failed: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Lemma 9 / Lemma 10 (App. D).

/// Checks the conclusions of Lemma 10 for one instance and returns the worst relative
/// discrepancy seen (for the tests' messages).
fn check_product_lemma(
    frozen: &[DMatrix<f64>],
    target: &DMatrix<f64>,
    ranks: &[usize],
) -> Result<(), TestCaseError> {
    let d = target.nrows();
    let res = built(lemma_10(frozen, target, ranks), frozen)?;
    // Tolerance scale: the magnitudes whose rounding errors enter `‖∏(W+ΔW) − W̄‖₂`: the
    // factors of the computed product and the target itself.
    let scale = factor_scale(&res.adapted).max(spectral_norm("t", target).unwrap());
    let total: usize = ranks.iter().sum();
    let sigma = SortedSvd::new("E", &(target - product(frozen, d).unwrap())).unwrap();
    // Error equals σ_{ΣR_l+1}(E) (Lemma 10; Lemma 9 with R_l = R).
    prop_assert!(
        (res.error - sigma.sigma_1based(total + 1)).abs() <= 1e-9 * scale,
        "error {} vs σ_(ΣR+1) = {} (scale {})",
        res.error,
        sigma.sigma_1based(total + 1),
        scale
    );
    // The product equals ∏W_l + LR_{(ΣR_l)∧R_E}(E) (eq. 5).
    let dev = spectral_norm("dev", &(&res.product - &res.predicted_product)).unwrap();
    prop_assert!(
        dev <= 1e-9 * scale,
        "‖∏(W+ΔW) − (∏W + E')‖₂ = {} (scale {})",
        dev,
        scale
    );
    // rank(ΔW_l) ≤ R_l: the factors have R_l columns, and numerically σ_{R_l+1}(ΔW_l) ≈ 0
    // relative to the adapter's own size.
    for (a, &rl) in res.adapters.iter().zip(ranks) {
        prop_assert_eq!(a.B.ncols(), rl);
        prop_assert_eq!(a.A.nrows(), rl);
        let s = SortedSvd::new("dw", &a.dense().unwrap()).unwrap();
        prop_assert!(s.sigma_1based(rl + 1) <= 1e-12 * s.sigma_1based(1).max(1e-300));
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(128))]

    /// Lemma 9: with rank-R adapters on each of L layers, the spectral-norm error of the product
    /// is exactly σ_{RL+1}(E) and the product is ∏W_l + LR_{RL∧R_E}(E). Tolerance 1e-9 relative
    /// to max(∏_l‖W_l+ΔW_l‖₂, ‖W̄‖₂), the scale of the rounding errors in the computed product.
    #[test]
    fn lemma_9_error_equals_sigma_RL_plus_1(
        d in 2usize..=10, L in 1usize..=4, r_frac in 0.0f64..1.0, seed in any::<u64>()
    ) {
        let mut r = rng(seed);
        let R = 1 + ((d as f64 * r_frac) as usize).min(d - 1);
        let frozen: Vec<_> = (0..L).map(|_| standard_normal(d, d, &mut r)).collect();
        let target = standard_normal(d, d, &mut r);
        check_product_lemma(&frozen, &target, &vec![R; L])?;
        let res = built(lemma_9(&frozen, &target, R), &frozen)?;
        prop_assert_eq!(res.rank_e, d);
    }

    /// Lemma 9, exact case: when R ≥ ⌈R_E/L⌉ the adapted product equals W̄. Targets are
    /// `∏W_l + (rank-k matrix)` so that R_E = k ranges over 0..D (up to rounding noise). Tolerance: ‖∏(W+ΔW) − W̄‖₂ ≤
    /// 1e-9·max(∏‖W_l+ΔW_l‖₂, ‖W̄‖₂) (the rounding-error scale of the product).
    #[test]
    fn lemma_9_exact_when_rank_suffices(
        d in 2usize..=10, L in 1usize..=4, k_frac in 0.0f64..=1.0, extra in 0usize..3,
        seed in any::<u64>()
    ) {
        let mut r = rng(seed);
        let k = ((d as f64 * k_frac) as usize).min(d);
        let frozen: Vec<_> = (0..L).map(|_| standard_normal(d, d, &mut r)).collect();
        let low = standard_normal(d, k, &mut r) * standard_normal(k, d, &mut r);
        let target = product(&frozen, d).unwrap() + low;
        let R = (k.div_ceil(L) + extra).clamp(1, d);
        let res = built(lemma_9(&frozen, &target, R), &frozen)?;
        // R_E = k up to rounding: forming W̄ and E adds noise of order ε‖∏W‖.
        let scale = factor_scale(&res.adapted).max(spectral_norm("t", &target).unwrap());
        prop_assert!(res.error <= 1e-9 * scale, "error {} (scale {})", res.error, scale);
        prop_assert_eq!(res.predicted_error, SortedSvd::new("E", &(&target - product(&frozen, d).unwrap())).unwrap().sigma_1based(R * L + 1));
    }

    /// Lemma 10: per-layer ranks R_l (0 allowed) give error σ_{ΣR_l+1}(E), product
    /// ∏W_l + LR_{ΣR_l∧R_E}(E) and rank(ΔW_l) ≤ R_l; same tolerance as Lemma 9.
    #[test]
    fn lemma_10_per_layer_ranks(
        d in 2usize..=9, ranks_frac in prop::collection::vec(0.0f64..=1.0, 1..=4),
        seed in any::<u64>()
    ) {
        let mut r = rng(seed);
        let ranks: Vec<usize> = ranks_frac.iter().map(|f| ((d as f64 * f) as usize).min(d)).collect();
        let frozen: Vec<_> = ranks.iter().map(|_| standard_normal(d, d, &mut r)).collect();
        let target = standard_normal(d, d, &mut r);
        check_product_lemma(&frozen, &target, &ranks)?;
    }
}

/// Lemma 9's assumption: a singular frozen weight (here W_2 of rank D−1) makes an inverse of
/// eq. (8) impossible; the construction reports it as a typed error instead of returning garbage.
#[test]
fn lemma_9_singular_frozen_weight_is_reported() {
    let d = 5;
    let mut r = rng(7);
    let w1 = standard_normal(d, d, &mut r);
    let w2 = standard_normal(d, d - 1, &mut r) * standard_normal(d - 1, d, &mut r);
    let target = standard_normal(d, d, &mut r);
    match lemma_9(&[w1, w2], &target, 2) {
        Err(ElraError::Numerical(msg)) => assert!(msg.contains("W_2"), "{msg}"),
        other => panic!("expected a Numerical error, got {other:?}"),
    }
    // Bad arguments are typed errors too.
    assert!(matches!(
        lemma_9(std::slice::from_ref(&target), &target, 0),
        Err(ElraError::InvalidArgument { arg: "rank", .. })
    ));
    assert!(matches!(
        lemma_9(&[DMatrix::zeros(4, 4)], &target, 1),
        Err(ElraError::Shape { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Lemma 11, Theorems 3, 5 and 15 (App. E).

/// Gaussian inputs, rows are samples.
fn inputs(n: usize, d: usize, r: &mut ChaCha8Rng) -> DMatrix<f64> {
    standard_normal(n, d, r)
}

proptest! {
    #![proptest_config(cases(64))]

    /// Theorem 3 / Corollary 4: random frozen (L layers) and target (L̄ layers) FNNs,
    /// R ≥ ⌈D/M⌉ ⇒ f(x) = f̄(x) on the input domain (radius = largest input norm).
    /// Tolerance: max|f − f̄| ≤ 1e-8·S, S = the largest |pre-activation| in the adapted model on
    /// these inputs (the linearising biases make intermediate values larger than the outputs;
    /// rounding errors are relative to them).
    #[test]
    fn theorem_3_fnn_exact(
        d in 2usize..=8, lbar in 1usize..=3, m in 1usize..=3, extra_layers in 0usize..=2,
        extra_rank in 0usize..=1, seed in any::<u64>()
    ) {
        let mut r = rng(seed);
        let L = lbar * m + extra_layers.min(m - 1);
        let frozen = Fnn::random(d, L, &mut r).unwrap();
        let target = Fnn::random(d, lbar, &mut r).unwrap();
        let x = inputs(64, d, &mut r);
        let R = (d.div_ceil(m) + extra_rank).min(d);
        let c = built(fnn::construct(&frozen, &target, R, input_radius(&x)), &frozen.weights)?;
        let f = c.model.forward(&x).unwrap();
        let fbar = target.forward(&x).unwrap();
        let s = pre_activation_scale(&c.model, &x).max(max_abs(&fbar));
        let err = max_abs(&(&f - &fbar));
        prop_assert!(err <= 1e-8 * s, "max|f − f̄| = {} (scale {})", err, s);
        for a in &c.adapters {
            prop_assert!(a.B.ncols() <= R);
        }
    }

    /// Lemma 11 (proof, eq. 14): for any R, the adapted L-layer FNN *is* the one-layer ReLU
    /// network `ReLU((∏W_l + LR_{RL∧R_E}(E)) x + b̄_1)` on the domain. (The lemma's printed
    /// `f − f̄ = ReLU((LR(E) − E)x)` does not hold — ReLU is not additive — but this does.)
    /// Tolerance as in theorem_3_fnn_exact.
    #[test]
    fn lemma_11_adapted_fnn_is_one_layer_relu_with_LR_RL_weight(
        d in 2usize..=8, L in 1usize..=4, r_frac in 0.0f64..1.0, seed in any::<u64>()
    ) {
        let mut r = rng(seed);
        let R = 1 + ((d as f64 * r_frac) as usize).min(d - 1);
        let frozen = Fnn::random(d, L, &mut r).unwrap();
        let target = Fnn::random(d, 1, &mut r).unwrap();
        let x = inputs(64, d, &mut r);
        let c = built(fnn::construct(&frozen, &target, R, input_radius(&x)), &frozen.weights)?;
        let p = product(&frozen.weights, d).unwrap();
        let e = SortedSvd::new("E", &(&target.weights[0] - &p)).unwrap();
        let what = Fnn::new(vec![&p + e.low_rank(R * L)], vec![target.biases[0].clone()]).unwrap();
        let f = c.model.forward(&x).unwrap();
        let g = what.forward(&x).unwrap();
        let s = pre_activation_scale(&c.model, &x).max(max_abs(&g));
        let err = max_abs(&(&f - &g));
        prop_assert!(err <= 1e-8 * s, "max|f − ReLU(Ŵx + b̄)| = {} (scale {})", err, s);
    }

    /// Theorem 5: for R below the exactness threshold, the empirical mean error
    /// `Ê‖f(x) − f̄(x)‖₂` over the sample is at most `β Σ_i α^{L̄−i} E_i` with Σ the sample's
    /// second moment (so the bound applies to the empirical distribution exactly). The bound
    /// checked is the corrected one (√tr Σ instead of the printed √‖Σ‖_F, see
    /// `fnn::theorem_5_bound`). Slack: 1e-9·(bound + scale) for rounding.
    #[test]
    fn theorem_5_error_bound_holds(
        d in 2usize..=8, lbar in 1usize..=3, m in 1usize..=3, r_frac in 0.0f64..1.0,
        seed in any::<u64>()
    ) {
        let mut r = rng(seed);
        let R = 1 + ((d as f64 * r_frac) as usize).min(d - 1);
        let frozen = Fnn::random(d, lbar * m, &mut r).unwrap();
        let target = Fnn::random(d, lbar, &mut r).unwrap();
        let x = inputs(128, d, &mut r);
        let c = built(fnn::construct(&frozen, &target, R, input_radius(&x)), &frozen.weights)?;
        let diff = c.model.forward(&x).unwrap() - target.forward(&x).unwrap();
        let mean_err = diff.row_iter().map(|row| row.norm()).sum::<f64>() / x.nrows() as f64;
        let sigma = x.transpose() * &x / x.nrows() as f64;
        let b = fnn::theorem_5_bound(&frozen, &target, R, &sigma).unwrap();
        let s = pre_activation_scale(&c.model, &x);
        prop_assert!(
            mean_err <= b.bound + 1e-9 * (b.bound + s),
            "Ê‖f − f̄‖ = {} > bound {} (E = {:?})", mean_err, b.bound, b.E
        );
    }

    /// Theorem 15: a general partition with per-layer ranks R_l and Σ_{l∈P_i} R_l ≥ D for every
    /// block gives f = f̄ (random models have rank(W̄_i − ∏W_l) = D). Tolerance as in
    /// theorem_3_fnn_exact.
    #[test]
    fn theorem_15_general_partition_exact(
        d in 2usize..=6, sizes in prop::collection::vec(1usize..=3, 1..=3), seed in any::<u64>()
    ) {
        let mut r = rng(seed);
        let mut partition = Vec::new();
        let mut start = 0;
        for s in &sizes {
            partition.push(start..start + s);
            start += s;
        }
        let L = start;
        // Split D across each block's layers as evenly as possible (Lemma 10's Q_l split).
        let mut ranks = vec![0; L];
        for p in &partition {
            let n = p.len();
            for (k, l) in p.clone().enumerate() {
                ranks[l] = d / n + usize::from(k < d % n);
            }
        }
        let frozen = Fnn::random(d, L, &mut r).unwrap();
        let target = Fnn::random(d, sizes.len(), &mut r).unwrap();
        let x = inputs(64, d, &mut r);
        let c = built(fnn::construct_partition(&frozen, &target, &partition, &ranks, input_radius(&x)), &frozen.weights)?;
        let fbar = target.forward(&x).unwrap();
        let s = pre_activation_scale(&c.model, &x).max(max_abs(&fbar));
        let err = max_abs(&(c.model.forward(&x).unwrap() - &fbar));
        prop_assert!(err <= 1e-8 * s, "max|f − f̄| = {} (scale {})", err, s);
        for (a, rl) in c.adapters.iter().zip(&ranks) {
            prop_assert_eq!(a.B.ncols(), *rl);
        }
    }
}

/// The largest |pre-activation| (`W z + b`) over all layers of an FNN on a batch.
fn pre_activation_scale(net: &Fnn, x: &DMatrix<f64>) -> f64 {
    let mut z = x.clone();
    let mut s: f64 = max_abs(x);
    for (w, b) in net.weights.iter().zip(&net.biases) {
        let mut u = &z * w.transpose();
        for mut row in u.row_iter_mut() {
            row += b.transpose();
        }
        s = s.max(max_abs(&u));
        z = u.map(|v| v.max(0.0));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Theorem 6 / Corollary 20 (App. F).

proptest! {
    #![proptest_config(cases(64))]

    /// Theorem 6 / Corollary 20: random frozen and target TFNs (attention weights N(0,1),
    /// feed-forward/output weights Xavier-uniform), R ≥ ⌈D/2⌉ ⇒ f(X) = f̄(X) for every input.
    /// Tolerance: outputs are probabilities (scale 1), so max|f − f̄| ≤ 1e-6 absolute; the
    /// logits `W_o Z_L`, which the construction also matches, agree to 1e-7 relative to the
    /// largest logit magnitude (attention scores reach |⟨q,k⟩| ~ 10²–10³ with N(0,1) attention
    /// weights and their rounding errors pass through the softmax; measured worst 1.6e-9 over
    /// 300 models with D ≤ 16; frozen weights with κ₂ ≤ 1e4, see [`KAPPA_MAX`]).
    #[test]
    fn theorem_6_tfn_exact(
        d in 2usize..=6, L in 1usize..=2, H in 1usize..=2, n in 1usize..=5,
        extra_rank in 0usize..=1, seed in any::<u64>()
    ) {
        let mut r = rng(seed);
        let frozen = Tfn::random(d, L, H, n, &mut r).unwrap();
        let target = Tfn::random(d, L, H, n, &mut r).unwrap();
        let gaps = tfn::functionality_gaps(&frozen, &target).unwrap();
        prop_assert_eq!(*gaps.iter().max().unwrap(), d);
        let R = (d.div_ceil(2) + extra_rank).min(d);
        // Theorem 6's proof also inverts and multiplies target weights (C = W_2⁻¹W̄_2, then
        // Cᵀ W̄_Kᵀ W̄_Q C), so their conditioning bounds the claim as well.
        let c = built(
            tfn::construct(&frozen, &target, R),
            frozen.weights().into_iter().chain(target.weights()),
        )?;
        let x = standard_normal(8 * n, d, &mut r);
        let err = max_abs(&(c.model.forward(&x).unwrap() - target.forward(&x).unwrap()));
        prop_assert!(err <= 1e-6, "max|f − f̄| = {}", err);
        let lt = target.logits(&x).unwrap();
        let lerr = max_abs(&(c.model.logits(&x).unwrap() - &lt));
        prop_assert!(lerr <= 1e-7 * max_abs(&lt).max(1.0), "logits differ by {}", lerr);
        for (_, a) in &c.adapters {
            prop_assert!(a.B.ncols() == R && a.A.nrows() == R);
        }
        prop_assert_eq!(c.adapters.len(), 4 * H * L + 2);
    }
}

// ---------------------------------------------------------------------------------------------
// Reverse mode (App. G training): gradients against central differences.

/// Central-difference check of every weight and bias gradient of `net` for the MSE loss.
/// Step h = 1e-6·max(1, |θ|): truncation error O(h²) and cancellation O(ε/h) put the
/// finite-difference error near 1e-9 relative to the gradient scale; the tolerance is
/// 1e-6·max(1, max|∇|) (ReLU kinks within h of a sample are the only other source, and
/// Gaussian inputs avoid them with probability ≈ 1).
fn check_gradients<N: Network>(net: &N, x: &DMatrix<f64>, y: &DMatrix<f64>) {
    let (_, g) = mse_loss_and_grads(net, x, y).unwrap();
    let gscale = g
        .weights
        .iter()
        .map(max_abs)
        .chain(g.biases.iter().map(|b| b.amax()))
        .fold(1.0, f64::max);
    let loss_at = |n: &N| mse_loss_and_grads(n, x, y).unwrap().0;
    let nw = net.weights().len();
    for s in 0..nw {
        let (rows, cols) = net.weights()[s].shape();
        for i in 0..rows {
            for j in 0..cols {
                let w0 = net.weights()[s][(i, j)];
                let h = 1e-6 * w0.abs().max(1.0);
                let mut p = net.clone();
                p.weights_mut()[s][(i, j)] = w0 + h;
                let mut m = net.clone();
                m.weights_mut()[s][(i, j)] = w0 - h;
                let fd = (loss_at(&p) - loss_at(&m)) / (2.0 * h);
                let an = g.weights[s][(i, j)];
                assert!(
                    (fd - an).abs() <= 1e-6 * gscale,
                    "weight {} ({}, {}): analytic {an}, central difference {fd}",
                    net.weight_names()[s],
                    i,
                    j
                );
            }
        }
    }
    for s in 0..net.biases().len() {
        for i in 0..net.biases()[s].len() {
            let b0 = net.biases()[s][i];
            let h = 1e-6 * b0.abs().max(1.0);
            let mut p = net.clone();
            p.biases_mut()[s][i] = b0 + h;
            let mut m = net.clone();
            m.biases_mut()[s][i] = b0 - h;
            let fd = (loss_at(&p) - loss_at(&m)) / (2.0 * h);
            let an = g.biases[s][i];
            assert!(
                (fd - an).abs() <= 1e-6 * gscale,
                "bias {s}[{i}]: analytic {an}, central difference {fd}"
            );
        }
    }
}

#[test]
fn reverse_mode_linear_matches_central_differences() {
    let mut r = rng(1);
    let net = LinearModel::random(4, 3, &mut r).unwrap();
    let x = inputs(7, 4, &mut r);
    let y = inputs(7, 4, &mut r);
    check_gradients(&net, &x, &y);
}

#[test]
fn reverse_mode_fnn_matches_central_differences() {
    let mut r = rng(2);
    let net = Fnn::random(5, 3, &mut r).unwrap();
    let x = inputs(9, 5, &mut r);
    let y = inputs(9, 5, &mut r).map(|v| v.abs());
    check_gradients(&net, &x, &y);
}

#[test]
fn reverse_mode_tfn_matches_central_differences() {
    let mut r = rng(3);
    // Scaled-down attention weights keep the softmax away from saturation so that the
    // gradients are not all ≈ 0 (a check on zeros would prove little).
    let mut net = Tfn::random(4, 2, 2, 3, &mut r).unwrap();
    for b in &mut net.blocks {
        for h in &mut b.heads {
            h.Q *= 0.3;
            h.K *= 0.3;
        }
    }
    let x = inputs(3 * 3, 4, &mut r);
    let y = Tfn::random(4, 1, 1, 3, &mut r)
        .unwrap()
        .forward(&x)
        .unwrap();
    check_gradients(&net, &x, &y);
    // The adapted slots are the attention weights, W_2L and W_o (Thm. 6).
    let names = net.weight_names();
    let adapted: Vec<&str> = net
        .adapted_slots()
        .iter()
        .map(|&s| names[s].as_str())
        .collect();
    assert_eq!(adapted.len(), 4 * 2 * 2 + 2);
    assert!(adapted.contains(&"l2.W2") && adapted.contains(&"Wo") && !adapted.contains(&"l1.W2"));
    assert!(!adapted.iter().any(|n| n.ends_with("W1")));
}

/// The batched TFN evaluates its sequences in a position-major order internally (src/expressivity/
/// tfn.rs): a batch of `B` sequences must give, row for row, what each sequence gives alone, and
/// its gradient must be the sum of the per-sequence gradients (the loss is a sum over
/// sequences). Tolerances: the same arithmetic in another row order, so a few ulps of the
/// values' size (1e-13 relative for values, 1e-12 for gradients summed over 7 sequences).
/// Sizes: `B = 7`, `N = 4` so that neither divides the other and position-major ≠ sequence-major.
#[test]
fn tfn_batch_equals_its_sequences_one_by_one() {
    let mut r = rng(21);
    let (d, n, b) = (5, 4, 7);
    let mut net = Tfn::random(d, 2, 2, n, &mut r).unwrap();
    for blk in &mut net.blocks {
        for h in &mut blk.heads {
            h.Q *= 0.3; // keep the softmax unsaturated so every entry matters
            h.K *= 0.3;
        }
    }
    let x = inputs(b * n, d, &mut r);
    let dy = inputs(b * n, d, &mut r);
    let y = net.forward(&x).unwrap();
    let z = net.logits(&x).unwrap();
    let g = net.vjp(&x, &dy).unwrap();
    let mut gsum: Option<elra::expressivity::network::Grads> = None;
    for s in 0..b {
        let xs = x.rows(s * n, n).into_owned();
        let ys = net.forward(&xs).unwrap();
        let zs = net.logits(&xs).unwrap();
        assert!(
            (y.rows(s * n, n) - &ys).amax() <= 1e-13 * ys.amax().max(1.0),
            "seq {s}"
        );
        assert!(
            (z.rows(s * n, n) - &zs).amax() <= 1e-13 * zs.amax().max(1.0),
            "seq {s}"
        );
        let gs = net.vjp(&xs, &dy.rows(s * n, n).into_owned()).unwrap();
        gsum = Some(match gsum {
            None => gs,
            Some(mut acc) => {
                for (a, b) in acc.weights.iter_mut().zip(&gs.weights) {
                    *a += b;
                }
                for (a, b) in acc.biases.iter_mut().zip(&gs.biases) {
                    *a += b;
                }
                acc
            }
        });
    }
    let gsum = gsum.unwrap();
    for (k, (a, e)) in g.weights.iter().zip(&gsum.weights).enumerate() {
        assert!(
            (a - e).amax() <= 1e-12 * e.amax().max(1.0),
            "weight slot {k}"
        );
    }
    for (k, (a, e)) in g.biases.iter().zip(&gsum.biases).enumerate() {
        assert!((a - e).amax() <= 1e-12 * e.amax().max(1.0), "bias slot {k}");
    }
    // The TFN's one-forward-pass loss and gradient equal forward + vjp (the trait's default).
    let target = inputs(b * n, d, &mut r).map(|v| v.abs());
    let (loss, gl) = mse_loss_and_grads(&net, &x, &target).unwrap();
    let f = net.forward(&x).unwrap();
    let loss_ref = (&f - &target).norm_squared() / f.len() as f64;
    let g_ref = net
        .vjp(&x, &((&f - &target) * (2.0 / f.len() as f64)))
        .unwrap();
    assert!((loss - loss_ref).abs() <= 1e-13 * loss_ref);
    for (a, e) in gl.weights.iter().zip(&g_ref.weights) {
        assert!((a - e).amax() <= 1e-12 * e.amax().max(1e-300));
    }
    for (a, e) in gl.biases.iter().zip(&g_ref.biases) {
        assert!((a - e).amax() <= 1e-12 * e.amax().max(1e-300));
    }
}

/// Shapes and bad inputs of the model constructors are typed errors.
#[test]
fn models_reject_bad_input() {
    let mut r = rng(4);
    let f = Fnn::random(3, 2, &mut r).unwrap();
    assert!(matches!(
        f.forward(&DMatrix::zeros(2, 4)),
        Err(ElraError::Shape { .. })
    ));
    let t = Tfn::random(3, 1, 1, 4, &mut r).unwrap();
    assert!(matches!(
        t.forward(&DMatrix::zeros(6, 3)),
        Err(ElraError::Shape { .. })
    ));
    assert!(Fnn::new(vec![DMatrix::zeros(2, 2)], vec![DVector::zeros(3)]).is_err());
    assert!(fnn::construct(&f, &f, 1, f64::NAN).is_err());
    assert!(fnn::construct(&f, &Fnn::random(3, 3, &mut r).unwrap(), 1, 1.0).is_err());
    // Models built from (public) fields in an invalid state are errors, never panics.
    let empty = LinearModel { weights: vec![] };
    assert!(empty.forward(&DMatrix::zeros(1, 1)).is_err());
    assert!(linear::construct(&empty, &empty, 1).is_err());
    let mut bad = f.clone();
    bad.biases.pop();
    assert!(bad.forward(&DMatrix::zeros(1, 3)).is_err());
    assert!(fnn::construct(&bad, &f, 1, 1.0).is_err());
    let mut tb = t.clone();
    tb.blocks[0].heads.clear();
    assert!(tb.forward(&DMatrix::zeros(4, 3)).is_err());
    assert!(tfn::construct(&tb, &t, 1).is_err());
    let lr = elra::expressivity::LowRank {
        B: DMatrix::zeros(3, 2),
        A: DMatrix::zeros(1, 3),
    };
    assert!(lr.dense().is_err());
    assert!(f.adapted(&[lr.clone(), lr], &f.biases).is_err());
}
