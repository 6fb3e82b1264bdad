//! The GPU layers ([`elra::cuda::layer`]) against the CPU f64 reference ([`elra::grad`]):
//! forward, backward and merge/unmerge of ELRA general/PSD/Hyb on both routes, double-sided ELRA
//! and LoRA, in f32, f16 and bf16, all through the [`Adapter`] trait; typed errors and the tape
//! key; device memory flat over 10⁴ steps.
//!
//! Every GPU test first calls `cuda_available()` and returns early printing `skipping: <reason>`
//! without a GPU. Outputs (`y`, `∂x`, merged weights, gradients) are poisoned with NaN before each
//! launch, so an entry the kernels fail to write shows up as a non-finite value.
//!
//! Reference and tolerances. The CPU reference runs in f64 on exactly the inputs the GPU sees (x,
//! W0 and ∂y rounded to the activation type; A, B, η in f32 widened to f64) at exactly the
//! layer's [`GeneratorSpec`] (`config.generator.spec_at(step)`), so the difference is only the
//! GPU's own arithmetic. Errors are Frobenius-relative, `‖gpu − cpu‖_F / ‖cpu‖_F`:
//! * f32: ≤ 1e-5. Every quantity is a sum of at most max(N, d, k) ≤ 100 products accumulated in
//!   f32 (u = 6e-8) plus the f32 φ1 (≈ 1e-7 relative): the γ_n bound n·u ≈ 6e-6 on the dot products,
//!   well under 1e-5 in the Frobenius norm, where errors average out.
//! * f16/bf16: ≤ 2e-2. Outputs and the N×d intermediates (`u`, `ū`, `W_eff`) are stored in the
//!   activation type: one rounding each (bf16 u = 3.9e-3, f16 4.9e-4), at most three in sequence on
//!   the longest path (u → y, ū → ∂x through a GEMM), ≈ 1.2e-2 for bf16 in the worst case.
#![allow(non_snake_case)]
#[macro_use]
mod common;

use std::sync::Arc;

use elra::adapter::{
    Adapter, AlphaSchedule, DoubleSidedConfig, ElraConfig, EtaMultiplier, GeneratorConfig,
    GeneratorSpec, LoraConfig, LoraInit, Variant,
};
use elra::cuda::layer::{download_matrix, upload_matrix};
use elra::cuda::{
    Activation, CudaDevice, DeviceMatrices, GpuDoubleSidedLayer, GpuElraLayer, GpuLoraLayer,
};
use elra::grad::{
    double_backward_parts, double_forward_parts, elra_backward_parts, elra_forward_parts,
    lora_backward_parts, lora_forward_parts, GeneratorTape, Route, SideParams,
};
use elra::ElraError;
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn rand_mat(rows: usize, cols: usize, scale: f64, rng: &mut ChaCha8Rng) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |_, _| rng.random_range(-1.0..1.0) * scale)
}

/// Rounds every entry to `T` and back (what the GPU sees).
fn round_to<T: Activation>(m: &DMatrix<f64>) -> DMatrix<f64> {
    m.map(|x| T::from_f64(x).to_f64())
}

fn f32_of(m: &DMatrix<f64>) -> DMatrix<f32> {
    m.map(|x| x as f32)
}

fn f64_of(m: &DMatrix<f32>) -> DMatrix<f64> {
    m.map(|x| x as f64)
}

/// ‖g − c‖_F / ‖c‖_F; panics on a non-finite GPU entry (a poisoned output left unwritten).
fn rel(g: &DMatrix<f64>, c: &DMatrix<f64>, what: &str) -> f64 {
    assert_eq!(g.shape(), c.shape(), "{what}: shape");
    assert!(
        g.iter().all(|x| x.is_finite()),
        "{what}: non-finite GPU output (unwritten poison or overflow)"
    );
    let den = c.norm();
    let num = (g - c).norm();
    if den > 0.0 {
        num / den
    } else {
        num
    }
}

fn tol<T: Activation>() -> f64 {
    if T::DTYPE == "f32" {
        1e-5
    } else {
        2e-2
    }
}

/// Error of a GPU `∂L/∂η` against the f64 reference, measured against the size of its terms.
///
/// `∂L/∂η = ⟨C̄_raw, C_raw⟩ / η` (src/grad/generator.rs) is one inner product over r×d entries
/// whose terms cancel: f32 summation commits an absolute error up to γ_n Σ|c̄ᵢ cᵢ| ≤
/// γ_n ‖C̄_raw‖_F ‖C_raw‖_F, which can be any multiple of |∂L/∂η| itself, so a plain relative error
/// is no test of the code (measured on the H100, 2026-11-22: 2.1e-5 on a case with cancellation,
/// everything else ≤ 3e-7). The scale is the Cauchy–Schwarz size of the terms, expressed through
/// the reference gradients (`∂B = η_eff(1−α) C̄_raw`, `∂A ∋ η_eff α C̄_rawᵀ`):
/// `max(|∂η|, (‖∂A‖_F ‖A‖_F + ‖∂B‖_F ‖B‖_F) / η)`.
fn eta_err(
    gpu: f32,
    reference: f64,
    (da, a): (&DMatrix<f64>, &DMatrix<f64>),
    db_b: Option<(&DMatrix<f64>, &DMatrix<f64>)>,
    eta: f64,
) -> f64 {
    let terms = da.norm() * a.norm() + db_b.map_or(0.0, |(db, b)| db.norm() * b.norm());
    let scale = reference.abs().max(terms / eta);
    ((gpu as f64) - reference).abs() / scale.max(1e-300)
}

fn nan_mat<T: Activation>(dev: &CudaDevice, rows: usize, cols: usize) -> DeviceMatrices<T> {
    DeviceMatrices::filled(dev, 1, rows, cols, T::from_f64(f64::NAN)).unwrap()
}

/// The gradient of parameter `name` of the last backward, widened to f64 (`None` when the
/// adapter has no such parameter).
fn grad_of<A: Adapter<Scalar = f32> + ?Sized>(layer: &A, name: &str) -> Option<DMatrix<f64>> {
    layer
        .param_index(name)
        .map(|i| f64_of(&layer.grad(i).unwrap()))
}

/// Sets the 1×1 parameter `name` (a step size η).
fn set_scalar<A: Adapter<Scalar = f32> + ?Sized>(layer: &mut A, name: &str, v: f32) {
    let i = layer.param_index(name).unwrap();
    layer.set_param(i, &DMatrix::from_element(1, 1, v)).unwrap();
}

/// One ELRA problem: rounded activations and f32 parameters, all also as f64.
struct Problem {
    x: DMatrix<f64>,
    w0: DMatrix<f64>,
    dy: DMatrix<f64>,
    a: DMatrix<f32>,
    b: DMatrix<f32>,
    eta: f32,
}

/// η of [`Problem`] and of the layers' configs.
const ETA: f64 = 0.7;

fn problem<T: Activation>(n: usize, d: usize, k: usize, r: usize, seed: u64) -> Problem {
    let mut g = rng(seed);
    // Scales keep ‖Z‖ = ‖η C A‖ of order 1 (a genuine φ1, not ≈ I) and outputs of order 1.
    let x = round_to::<T>(&rand_mat(n, k, 1.0, &mut g));
    let w0 = round_to::<T>(&rand_mat(d, k, 1.0 / (k as f64).sqrt(), &mut g));
    let dy = round_to::<T>(&rand_mat(n, d, 1.0, &mut g));
    let a = f32_of(&rand_mat(d, r, 1.0 / (d as f64).sqrt(), &mut g));
    let b = f32_of(&rand_mat(r, d, 1.0 / (r as f64).sqrt(), &mut g));
    Problem {
        x,
        w0,
        dy,
        a,
        b,
        eta: ETA as f32,
    }
}

/// A generator setting of the GPU layers: the config and the step it is run at, whose spec
/// `generator.spec_at(step)` (α of eq. 19, the η multiplier of App. H, λ of eq. 20) the CPU
/// reference takes.
#[derive(Clone, Copy, Debug)]
struct Setting {
    generator: GeneratorConfig,
    step: usize,
}

impl Setting {
    /// `variant` with a constant α (used by Hyb), λ, no clip, and — when `step` is `Some` — the
    /// cosine η multiplier over 1000 steps at that step (`m(t) = 0.75 + 0.25 cos(πt/1000)`).
    fn new(variant: Variant, alpha: f64, step: Option<usize>, lambda: f64) -> Self {
        Setting {
            generator: GeneratorConfig {
                variant,
                eta: ETA,
                lambda,
                tau: None,
                schedule: AlphaSchedule::Constant { alpha },
                eta_multiplier: match step {
                    Some(_) => EtaMultiplier::Cosine { total_steps: 1000 },
                    None => EtaMultiplier::None,
                },
            },
            step: step.unwrap_or(0),
        }
    }

    fn spec(&self) -> GeneratorSpec {
        self.generator.spec_at(self.step)
    }
}

/// Forward, backward and merge/unmerge of one ELRA layer on one route; returns the worst error.
fn elra_case<T: Activation>(
    dev: &Arc<CudaDevice>,
    (n, d, k, r): (usize, usize, usize, usize),
    setting: Setting,
    route: Route,
    seed: u64,
) -> f64 {
    let p = problem::<T>(n, d, k, r, seed);
    let spec = setting.spec();
    let psd = setting.generator.variant == Variant::Psd;
    let b = if psd { None } else { Some(&p.b) };
    let label = format!(
        "{} {route:?} N={n} d={d} k={k} r={r} α={} m={:.3} λ={}",
        T::DTYPE,
        spec.alpha,
        spec.eta_mult,
        spec.lambda
    );
    // CPU f64 reference.
    let (a64, b64) = (f64_of(&p.a), f64_of(&p.b));
    let (y_c, tape) = elra_forward_parts(
        &p.x,
        &p.w0,
        &a64,
        b.map(|_| &b64),
        p.eta as f64,
        &spec,
        Route::Woodbury,
        None,
    )
    .unwrap();
    let g_c = elra_backward_parts(&p.x, &p.w0, &tape, p.dy.clone()).unwrap();
    // GPU.
    let config = ElraConfig {
        generator: setting.generator,
        d,
        k,
        r,
        seed: 0,
    };
    let w0 = upload_matrix::<T>(dev, &p.w0).unwrap();
    let mut layer = GpuElraLayer::from_factors(dev.clone(), config, w0, &p.a, b).unwrap();
    layer.set_step(setting.step).unwrap();
    assert_eq!(layer.spec(), spec.require_no_clip().unwrap());
    layer.set_route(Some(route));
    let x = upload_matrix::<T>(dev, &p.x).unwrap();
    let dy = upload_matrix::<T>(dev, &p.dy).unwrap();
    let mut y = nan_mat::<T>(dev, n, d);
    let mut dx = nan_mat::<T>(dev, n, k);
    layer.fill_grads(f32::NAN).unwrap();
    layer.forward(&x, None, &mut y).unwrap();
    layer.backward(&x, &dy, &mut dx).unwrap();
    layer.check_status().unwrap();
    let mut worst = 0.0f64;
    let mut check = |what: &str, e: f64| {
        eprintln!("{label}: {what} rel err {e:.2e}");
        assert!(
            e <= tol::<T>(),
            "{label}: {what} rel err {e:.3e} > {}",
            tol::<T>()
        );
        worst = worst.max(e);
    };
    check("y", rel(&download_matrix(dev, &y).unwrap(), &y_c, "y"));
    check("dx", rel(&download_matrix(dev, &dx).unwrap(), &g_c.x, "dx"));
    check("dA", rel(&grad_of(&layer, "a").unwrap(), &g_c.a, "dA"));
    match (&grad_of(&layer, "b"), &g_c.b) {
        (Some(gb), Some(cb)) => check("dB", rel(gb, cb, "dB")),
        (None, None) => {}
        _ => panic!("{label}: ∂B presence differs"),
    }
    let deta = eta_err(
        grad_of(&layer, "eta").unwrap()[(0, 0)] as f32,
        g_c.eta,
        (&g_c.a, &a64),
        g_c.b.as_ref().map(|db| (db, &b64)),
        p.eta as f64,
    );
    check("deta", deta);
    // Merge: W_new = W0 + A M C W0 from the CPU tape.
    let gt: &GeneratorTape<f64> = &tape.generator;
    let w_new_c = &p.w0 + &gt.a * (&gt.m * (&gt.c * &p.w0));
    let mut merged = nan_mat::<T>(dev, d, k);
    layer.merge(&mut merged).unwrap();
    check(
        "merge",
        rel(&download_matrix(dev, &merged).unwrap(), &w_new_c, "merge"),
    );
    let mut back = nan_mat::<T>(dev, d, k);
    layer.unmerge(&merged, &mut back).unwrap();
    layer.check_status().unwrap();
    check(
        "unmerge(merge)",
        rel(&download_matrix(dev, &back).unwrap(), &p.w0, "unmerge"),
    );
    worst
}

/// Odd shapes (not multiples of 8 or of the 256-thread block; d, k > 256 so that rows span
/// several passes of a block) with r = 1 and r = 64.
const SHAPES: [(usize, usize, usize, usize); 3] =
    [(37, 29, 43, 1), (70, 291, 263, 64), (5, 67, 300, 7)];

/// General (α = 0), PSD (α = 1, η multiplier m ≈ 0.8), Hyb (α = 0.35, m ≈ 0.9) and general with
/// the energy penalty (λ = 0.05).
fn settings() -> [Setting; 4] {
    [
        Setting::new(Variant::General, 0.0, None, 0.0),
        Setting::new(Variant::Psd, 1.0, Some(436), 0.0),
        Setting::new(Variant::Hyb, 0.35, Some(295), 0.0),
        Setting::new(Variant::General, 0.0, None, 0.05),
    ]
}

fn elra_suite<T: Activation>(dev: &Arc<CudaDevice>, seed: u64) {
    let mut worst = 0.0f64;
    for (i, &shape) in SHAPES.iter().enumerate() {
        for (j, setting) in settings().into_iter().enumerate() {
            for route in [Route::Woodbury, Route::Merged] {
                worst = worst.max(elra_case::<T>(
                    dev,
                    shape,
                    setting,
                    route,
                    seed + (10 * i + j) as u64,
                ));
            }
        }
    }
    eprintln!("{}: worst relative error {worst:.2e}", T::DTYPE);
}

#[test]
fn cuda_layer_elra_f32_matches_cpu_both_routes() {
    let dev = Arc::new(device_or_skip!());
    elra_suite::<f32>(&dev, 100);
}

#[test]
fn cuda_layer_elra_bf16_matches_cpu_both_routes() {
    let dev = Arc::new(device_or_skip!());
    elra_suite::<half::bf16>(&dev, 200);
}

#[test]
fn cuda_layer_elra_f16_matches_cpu_both_routes() {
    let dev = Arc::new(device_or_skip!());
    elra_suite::<half::f16>(&dev, 300);
}

fn lora_case<T: Activation>(
    dev: &Arc<CudaDevice>,
    (n, d, k, r): (usize, usize, usize, usize),
    seed: u64,
) {
    let p = problem::<T>(n, d, k, r, seed);
    let mut g = rng(seed + 1);
    let la = f32_of(&rand_mat(r, k, 1.0 / (k as f64).sqrt(), &mut g));
    let lb = f32_of(&rand_mat(d, r, 1.0, &mut g));
    let config = LoraConfig {
        d,
        k,
        r,
        lora_alpha: 16.0,
        init: LoraInit::KaimingUniform,
        seed: 0,
    };
    // The layer's scaling: lora_alpha / r rounded to f32.
    let s = config.scaling() as f32;
    let (y_c, tape) =
        lora_forward_parts(&p.x, &p.w0, &f64_of(&la), &f64_of(&lb), s as f64, None).unwrap();
    let g_c = lora_backward_parts(
        &p.x,
        &p.w0,
        &f64_of(&la),
        &f64_of(&lb),
        s as f64,
        &tape,
        p.dy.clone(),
    )
    .unwrap();
    let w0 = upload_matrix::<T>(dev, &p.w0).unwrap();
    let mut layer = GpuLoraLayer::from_factors(dev.clone(), config, w0, &la, &lb).unwrap();
    let x = upload_matrix::<T>(dev, &p.x).unwrap();
    let dy = upload_matrix::<T>(dev, &p.dy).unwrap();
    let mut y = nan_mat::<T>(dev, n, d);
    let mut dx = nan_mat::<T>(dev, n, k);
    layer.forward(&x, None, &mut y).unwrap();
    layer.backward(&x, &dy, &mut dx).unwrap();
    let label = format!("lora {} N={n} d={d} k={k} r={r}", T::DTYPE);
    for (what, e) in [
        ("y", rel(&download_matrix(dev, &y).unwrap(), &y_c, "y")),
        ("dx", rel(&download_matrix(dev, &dx).unwrap(), &g_c.x, "dx")),
        (
            "dA'",
            rel(&grad_of(&layer, "lora_a").unwrap(), &g_c.lora_a, "dA'"),
        ),
        (
            "dB'",
            rel(&grad_of(&layer, "lora_b").unwrap(), &g_c.lora_b, "dB'"),
        ),
    ] {
        eprintln!("{label}: {what} rel err {e:.2e}");
        assert!(e <= tol::<T>(), "{label}: {what} {e:.3e}");
    }
    let w_new_c = &p.w0 + (f64_of(&lb) * f64_of(&la)) * s as f64;
    let mut merged = nan_mat::<T>(dev, d, k);
    layer.merge(&mut merged).unwrap();
    let e = rel(&download_matrix(dev, &merged).unwrap(), &w_new_c, "merge");
    assert!(e <= tol::<T>(), "{label}: merge {e:.3e}");
    let mut back = nan_mat::<T>(dev, d, k);
    layer.unmerge(&merged, &mut back).unwrap();
    let e = rel(&download_matrix(dev, &back).unwrap(), &p.w0, "unmerge");
    assert!(e <= tol::<T>(), "{label}: unmerge {e:.3e}");
}

#[test]
fn cuda_layer_lora_matches_cpu_all_dtypes() {
    let dev = Arc::new(device_or_skip!());
    for (i, &shape) in SHAPES.iter().enumerate() {
        lora_case::<f32>(&dev, shape, 400 + i as u64);
        lora_case::<half::bf16>(&dev, shape, 410 + i as u64);
        lora_case::<half::f16>(&dev, shape, 420 + i as u64);
    }
}

fn double_case<T: Activation>(
    dev: &Arc<CudaDevice>,
    (n, d, k, rl, rr): (usize, usize, usize, usize, usize),
    setting: Setting,
    seed: u64,
) {
    let mut g = rng(seed);
    let x = round_to::<T>(&rand_mat(n, k, 1.0, &mut g));
    let w0 = round_to::<T>(&rand_mat(d, k, 1.0 / (k as f64).sqrt(), &mut g));
    let dy = round_to::<T>(&rand_mat(n, d, 1.0, &mut g));
    let al = f32_of(&rand_mat(d, rl, 1.0 / (d as f64).sqrt(), &mut g));
    let bl = f32_of(&rand_mat(rl, d, 1.0 / (rl as f64).sqrt(), &mut g));
    let ar = f32_of(&rand_mat(k, rr, 1.0 / (k as f64).sqrt(), &mut g));
    let br = f32_of(&rand_mat(rr, k, 1.0 / (rr as f64).sqrt(), &mut g));
    let spec = setting.spec();
    let psd = setting.generator.variant == Variant::Psd;
    let (al64, bl64, ar64, br64) = (f64_of(&al), f64_of(&bl), f64_of(&ar), f64_of(&br));
    let (y_c, tape) = double_forward_parts(
        &x,
        &w0,
        SideParams {
            a: &al64,
            b: (!psd).then_some(&bl64),
            eta: 0.6,
        },
        SideParams {
            a: &ar64,
            b: (!psd).then_some(&br64),
            eta: 0.5,
        },
        &spec,
        None,
    )
    .unwrap();
    let g_c = double_backward_parts(&x, &w0, &tape, dy.clone()).unwrap();
    let config = DoubleSidedConfig {
        generator: GeneratorConfig {
            eta: 0.6,
            ..setting.generator
        },
        d,
        k,
        r_left: rl,
        r_right: rr,
        seed: 0,
    };
    let w0_d = upload_matrix::<T>(dev, &w0).unwrap();
    let mut layer = GpuDoubleSidedLayer::from_factors(
        dev.clone(),
        config,
        w0_d,
        (&al, (!psd).then_some(&bl)),
        (&ar, (!psd).then_some(&br)),
    )
    .unwrap();
    set_scalar(&mut layer, "eta_right", 0.5);
    layer.set_step(setting.step).unwrap();
    let xd = upload_matrix::<T>(dev, &x).unwrap();
    let dyd = upload_matrix::<T>(dev, &dy).unwrap();
    let mut y = nan_mat::<T>(dev, n, d);
    let mut dx = nan_mat::<T>(dev, n, k);
    layer.forward(&xd, None, &mut y).unwrap();
    layer.backward(&xd, &dyd, &mut dx).unwrap();
    layer.check_status().unwrap();
    let label = format!(
        "double {} N={n} d={d} k={k} rL={rl} rR={rr} α={}",
        T::DTYPE,
        spec.alpha
    );
    let grad = |name: &str| grad_of(&layer, name);
    let mut errs = vec![
        ("y", rel(&download_matrix(dev, &y).unwrap(), &y_c, "y")),
        ("dx", rel(&download_matrix(dev, &dx).unwrap(), &g_c.x, "dx")),
        ("dA_L", rel(&grad("a_left").unwrap(), &g_c.left.a, "dA_L")),
        ("dA_R", rel(&grad("a_right").unwrap(), &g_c.right.a, "dA_R")),
        (
            "deta_L",
            eta_err(
                grad("eta_left").unwrap()[(0, 0)] as f32,
                g_c.left.eta,
                (&g_c.left.a, &al64),
                g_c.left.b.as_ref().map(|db| (db, &bl64)),
                0.6,
            ),
        ),
        (
            "deta_R",
            eta_err(
                grad("eta_right").unwrap()[(0, 0)] as f32,
                g_c.right.eta,
                (&g_c.right.a, &ar64),
                g_c.right.b.as_ref().map(|db| (db, &br64)),
                0.5,
            ),
        ),
    ];
    if !psd {
        errs.push((
            "dB_L",
            rel(
                &grad("b_left").unwrap(),
                g_c.left.b.as_ref().unwrap(),
                "dB_L",
            ),
        ));
        errs.push((
            "dB_R",
            rel(
                &grad("b_right").unwrap(),
                g_c.right.b.as_ref().unwrap(),
                "dB_R",
            ),
        ));
    }
    // Merge: exp(L) W0 exp(R) with dense Woodbury factors from the CPU tapes.
    let (lt, rt) = (&tape.left, &tape.right);
    let el = DMatrix::identity(d, d) + &lt.a * &lt.m * &lt.c;
    let er = DMatrix::identity(k, k) + &rt.a * &rt.m * &rt.c;
    let w_new_c = el * &w0 * er;
    let mut merged = nan_mat::<T>(dev, d, k);
    layer.merge(&mut merged).unwrap();
    errs.push((
        "merge",
        rel(&download_matrix(dev, &merged).unwrap(), &w_new_c, "merge"),
    ));
    let mut back = nan_mat::<T>(dev, d, k);
    layer.unmerge(&merged, &mut back).unwrap();
    errs.push((
        "unmerge(merge)",
        rel(&download_matrix(dev, &back).unwrap(), &w0, "unmerge"),
    ));
    for (what, e) in errs {
        eprintln!("{label}: {what} rel err {e:.2e}");
        assert!(e <= tol::<T>(), "{label}: {what} {e:.3e}");
    }
}

#[test]
fn cuda_layer_double_sided_matches_cpu() {
    let dev = Arc::new(device_or_skip!());
    let general = Setting::new(Variant::General, 0.0, None, 0.01);
    let psd = Setting::new(Variant::Psd, 1.0, None, 0.0);
    // Hyb α = 0.5 with the η multiplier m ≈ 0.7 (step 564 of 1000).
    let hyb = Setting::new(Variant::Hyb, 0.5, Some(564), 0.0);
    // Equal ranks (one batched φ1 launch for both sides) and unequal ranks (two batches); the
    // configs need r_R ≤ k, so the rank-64 side acts on k = 67.
    for (i, shape) in [(37, 29, 43, 3, 3), (21, 70, 67, 1, 64)]
        .into_iter()
        .enumerate()
    {
        for (j, setting) in [general, psd, hyb].into_iter().enumerate() {
            let seed = 500 + 10 * i as u64 + j as u64;
            double_case::<f32>(&dev, shape, setting, seed);
            double_case::<half::bf16>(&dev, shape, setting, seed);
            double_case::<half::f16>(&dev, shape, setting, seed);
        }
    }
}

#[test]
fn cuda_layer_bad_input_is_typed_error() {
    let dev = Arc::new(device_or_skip!());
    let p = problem::<f32>(4, 9, 7, 2, 600);
    let w0 = || upload_matrix::<f32>(&dev, &p.w0).unwrap();
    let general = Setting::new(Variant::General, 0.0, None, 0.0).generator;
    let config = |generator: GeneratorConfig| ElraConfig {
        generator,
        d: 9,
        k: 7,
        r: 2,
        seed: 0,
    };
    let layer = |generator, a: &DMatrix<f32>, b: Option<&DMatrix<f32>>| {
        GpuElraLayer::from_factors(dev.clone(), config(generator), w0(), a, b)
    };
    // No B with α < 1.
    assert!(matches!(
        layer(general, &p.a, None),
        Err(ElraError::InvalidArgument { .. })
    ));
    // Clip requested: refused by the spec and by the layer.
    let clip = GeneratorSpec {
        alpha: 0.0,
        eta_mult: 1.0,
        tau: Some(1.0),
        lambda: 0.0,
    };
    assert!(clip.require_no_clip().is_err());
    let clipped = GeneratorConfig {
        tau: Some(1.0),
        ..general
    };
    assert!(layer(clipped, &p.a, Some(&p.b)).is_err());
    // Rank above MAX_RANK (on a weight with d ≥ 65, so that the config itself is valid).
    let big = DMatrix::<f32>::zeros(70, 65);
    let psd = Setting::new(Variant::Psd, 1.0, None, 0.0).generator;
    let w0_big = upload_matrix::<f32>(&dev, &DMatrix::zeros(70, 7)).unwrap();
    let cfg_big = ElraConfig {
        r: 65,
        d: 70,
        ..config(psd)
    };
    assert!(matches!(
        GpuElraLayer::from_factors(dev.clone(), cfg_big, w0_big, &big, None),
        Err(ElraError::InvalidArgument { .. })
    ));
    // η ≤ 0, NaN factor, α out of range.
    let zero_eta = GeneratorConfig {
        eta: 0.0,
        ..general
    };
    assert!(layer(zero_eta, &p.a, Some(&p.b)).is_err());
    let mut bad = p.a.clone();
    bad[(0, 0)] = f32::NAN;
    assert!(layer(general, &bad, Some(&p.b)).is_err());
    let alpha_bad = Setting::new(Variant::Hyb, 1.5, None, 0.0).generator;
    assert!(layer(alpha_bad, &p.a, Some(&p.b)).is_err());
    // Wrong x/y shapes, backward before forward, a dropout mask.
    let mut l = layer(general, &p.a, Some(&p.b)).unwrap();
    l.set_route(Some(Route::Woodbury));
    let x_bad = nan_mat::<f32>(&dev, 4, 8);
    let mut y = nan_mat::<f32>(&dev, 4, 9);
    assert!(matches!(
        l.forward(&x_bad, None, &mut y),
        Err(ElraError::Shape { .. })
    ));
    let x = upload_matrix::<f32>(&dev, &p.x).unwrap();
    let dy = upload_matrix::<f32>(&dev, &p.dy).unwrap();
    let mut dx = nan_mat::<f32>(&dev, 4, 7);
    assert!(l.backward(&x, &dy, &mut dx).is_err());
    assert!(l.forward(&x, Some(&y), &mut dx).is_err());
    l.set_route(Some(Route::Merged));
    let mut y_bad = nan_mat::<f32>(&dev, 5, 9);
    assert!(l.forward(&x, None, &mut y_bad).is_err());
    // Gradients before any backward; η ≤ 0 through set_param.
    assert!(l.grad(0).is_err());
    let eta = l.param_index("eta").unwrap();
    assert!(l.set_param(eta, &DMatrix::from_element(1, 1, 0.0)).is_err());
    // The tape key: backward needs the forward's x, and no parameter or step change since.
    l.forward(&x, None, &mut y).unwrap();
    let x2 = upload_matrix::<f32>(&dev, &p.x).unwrap();
    assert!(l.backward(&x2, &dy, &mut dx).is_err());
    l.backward(&x, &dy, &mut dx).unwrap();
    l.backward(&x, &dy, &mut dx).unwrap();
    l.set_step(3).unwrap();
    assert!(l.backward(&x, &dy, &mut dx).is_err());
    l.recompute(&x).unwrap();
    l.backward(&x, &dy, &mut dx).unwrap();
    l.set_param(eta, &DMatrix::from_element(1, 1, 0.3)).unwrap();
    assert!(l.backward(&x, &dy, &mut dx).is_err());
    assert!(l.grad(0).is_ok(), "gradients stay after a parameter change");
}

/// 10⁴ forward+backward steps (both routes alternating, parameters rewritten on the device every
/// step so the r×r work reruns) leave the free device memory unchanged after the first steps.
#[test]
fn cuda_layer_memory_flat_over_10k_steps() {
    let dev = Arc::new(device_or_skip!());
    let (n, d, k, r) = (33, 40, 24, 4);
    let p = problem::<half::bf16>(n, d, k, r, 700);
    let w0 = upload_matrix::<half::bf16>(&dev, &p.w0).unwrap();
    let config = ElraConfig {
        generator: Setting::new(Variant::Hyb, 0.5, None, 0.01).generator,
        d,
        k,
        r,
        seed: 0,
    };
    let mut layer = GpuElraLayer::from_factors(dev.clone(), config, w0, &p.a, Some(&p.b)).unwrap();
    let x = upload_matrix::<half::bf16>(&dev, &p.x).unwrap();
    let dy = upload_matrix::<half::bf16>(&dev, &p.dy).unwrap();
    let mut y = nan_mat::<half::bf16>(&dev, n, d);
    let mut dx = nan_mat::<half::bf16>(&dev, n, k);
    let mut step = |layer: &mut GpuElraLayer<half::bf16>, i: usize| {
        let route = if i % 2 == 0 {
            Route::Woodbury
        } else {
            Route::Merged
        };
        layer.set_route(Some(route));
        layer.forward(&x, None, &mut y).unwrap();
        layer.backward(&x, &dy, &mut dx).unwrap();
        // A device-side "update": the η buffer is rewritten (marks the r×r work stale).
        let (_, _, eta) = layer.params_mut();
        let _ = eta;
    };
    for i in 0..20 {
        step(&mut layer, i);
    }
    dev.synchronize().unwrap();
    let (free0, _) = dev.context().mem_get_info().unwrap();
    for i in 0..10_000 {
        step(&mut layer, i);
    }
    dev.synchronize().unwrap();
    layer.check_status().unwrap();
    let (free1, _) = dev.context().mem_get_info().unwrap();
    eprintln!("free device memory before {free0} after {free1}");
    // The stream-ordered allocator may keep a pool; 2 MiB of slack still catches a leak of more
    // than about 200 bytes per step over 10⁴ steps (every tape buffer here is larger).
    assert!(
        free1 + (2 << 20) >= free0,
        "device memory shrank by {} bytes over 10⁴ steps",
        free0 - free1
    );
}

// ---------------------------------------------------------------------------------------------
// The skinny kernels emulated on the CPU (no GPU needed)
// ---------------------------------------------------------------------------------------------
//
// cuda/emu/skinny_harness.cpp compiles cuda/skinny.cu with the host C++ compiler (cuda/emu/
// cuda_emu.hpp: one OS thread per CUDA thread, ELRA_BLOCK = 8 = one warp, std::barrier for
// __syncthreads and the warp shuffles; f16 via _Float16, bf16 rounded to nearest even by hand).
// The device code runs unchanged — index arithmetic, strides, the vector (aligned, ld a multiple
// of the chunk) and scalar (odd ld, misaligned, ragged ends) paths, shared-memory staging, rank
// groups, warp butterflies, rows per warp, grid-stride loops, chunked reductions, null operands
// and in-place aliasing — and is checked against f64 references of each kernel's stated formula,
// with the gaps of strided outputs checked untouched. What only a GPU exercises: the 256-thread,
// 32-lane configuration, the launches and their argument marshalling (src/cuda/skinny.rs),
// cuBLAS, the device conversions and the composition of the kernels into the layer (the GPU
// tests above). Tolerances are stated per test: f32 results differ from f64 only by f32
// accumulation; outputs stored as bf16/f16 add one rounding (u = 3.9e-3 / 4.9e-4).

mod skinny_emu {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    const SOURCES: [(&str, &str); 5] = [
        ("skinny.cu", include_str!("../cuda/skinny.cu")),
        ("common.cuh", include_str!("../cuda/common.cuh")),
        (
            "emu/math_constants.h",
            include_str!("../cuda/emu/math_constants.h"),
        ),
        ("emu/cuda_emu.hpp", include_str!("../cuda/emu/cuda_emu.hpp")),
        (
            "emu/skinny_harness.cpp",
            include_str!("../cuda/emu/skinny_harness.cpp"),
        ),
    ];

    fn build() -> Result<PathBuf, String> {
        crate::common::emu::build_harness("skinny", &SOURCES, "emu/skinny_harness.cpp", "-O1")
    }

    pub fn harness() -> Result<&'static PathBuf, String> {
        static EXE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        EXE.get_or_init(build).as_ref().map_err(|e| e.clone())
    }

    /// Runs one job; returns the output arrays by name (f32 values).
    pub fn run(job: &str) -> Vec<(String, Vec<f32>)> {
        let exe = harness().expect("harness built");
        crate::common::emu::run_job(exe, job)
            .lines()
            .map(|l| {
                let mut it = l.split_whitespace();
                let name = it.next().unwrap_or_default().to_string();
                let v = it
                    .map(|t| f32::from_bits(u32::from_str_radix(t, 16).unwrap()))
                    .collect();
                (name, v)
            })
            .collect()
    }
}

macro_rules! emu_or_skip {
    () => {
        if let Err(reason) = skinny_emu::harness() {
            eprintln!("skipping: {reason}");
            return;
        }
    };
}

fn hex(v: &[f32], job: &mut String) {
    for x in v {
        job.push_str(&format!(" {:x}", x.to_bits()));
    }
}

fn h1(x: f32) -> String {
    format!("{:x}", x.to_bits())
}

/// Random values exactly representable in `dt` (rounded through it).
fn rand_vals(len: usize, dt: &str, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let x: f64 = rng.random_range(-1.0..1.0);
            match dt {
                "bf16" => half::bf16::from_f64(x).to_f32(),
                "f16" => half::f16::from_f64(x).to_f32(),
                _ => x as f32,
            }
        })
        .collect()
}

/// ‖g − c‖₂ / ‖c‖₂ over flat arrays.
fn rel_flat(g: &[f32], c: &[f64], what: &str) -> f64 {
    assert_eq!(g.len(), c.len(), "{what}: length");
    assert!(g.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    let num: f64 = g.iter().zip(c).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    let den: f64 = c.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

fn out_tol(dt: &str) -> f64 {
    match dt {
        "bf16" => 8e-3,
        "f16" => 1e-3,
        _ => 1e-5,
    }
}

/// Row stride and offset (elements) of an activation matrix with `cols` columns in the
/// emulation: 0 = dense (ld = cols), 1 = aligned (ld a multiple of 8 with slack, offset 0: the
/// vector paths with a ragged end), 2 = aligned with offset 8 (still 16-byte aligned), 3 = offset 1
/// (misaligned: the scalar paths).
fn layout(kind: usize, cols: usize) -> (usize, usize) {
    let up = cols.div_ceil(8) * 8;
    match kind {
        0 => (cols, 0),
        1 => (up + 8, 0),
        2 => (up, 8),
        _ => (up, 1),
    }
}

/// Checks the harness's `pad` output: no entry outside the output matrix changed.
fn assert_pad(out: &[(String, Vec<f32>)], label: &str) {
    let pad = out.iter().find(|(n, _)| n == "pad").expect("pad output");
    assert_eq!(
        pad.1,
        vec![0.0],
        "{label}: entries outside the output written"
    );
}

// rows_fused in the emulation (ELRA_BLOCK = 8 = one warp; column tiles of 64 columns): n_in = 150
// spans 3 tiles with a ragged end (not a multiple of 4 or 8), n_out = 77 (phase-2 tiles of
// 64 / ⌈r/8⌉ columns), 11 rows (not a multiple of the 1, 2 or 4 rows per warp) over 2 blocks (the
// grid-stride loop takes the rest). Tolerances: v and t are dot products of ≤ 150 (≤ 64) f32
// products; γ_n-type error n·u ≈ 9e-6 in the worst case, ≈ √n·u ≈ 1e-6 typically: 1e-5 on the
// Frobenius-relative error. `out` in f32 adds ≤ 64 more products (1e-5); stored in bf16/f16 one
// rounding (u = 3.9e-3 / 4.9e-4): 8e-3 / 1e-3.
#[test]
fn cuda_layer_kernels_emulated_on_cpu_rows_fused() {
    emu_or_skip!();
    let mut rng = rng(800);
    let n_rows = 11usize;
    for dt in ["f32", "bf16", "f16"] {
        for r in [1usize, 9, 64] {
            // (has_base, alias, has_out, has_mm, transposed factors, rows per warp, layout)
            // alias 1: out = base; alias 2: in = base = out (in place, n_out = n_in).
            let cases = [
                (1, 1, 1, 1, false, 4, 1),
                (1, 0, 1, 0, true, 2, 0),
                (0, 0, 1, 1, false, 1, 3),
                (0, 0, 0, 1, true, 4, 1),
                (1, 2, 1, 1, true, 4, 2),
                (1, 2, 1, 0, false, 2, 0),
                (1, 0, 1, 1, false, 1, 2),
            ];
            for (case, &(has_base, alias, has_out, has_mm, tr, rpw, lay)) in
                cases.iter().enumerate()
            {
                let n_in = 150usize;
                let n_out = if alias == 2 { n_in } else { 77 };
                let (ld_in, off) = layout(lay, n_in);
                let ld_out = if alias == 2 {
                    ld_in
                } else {
                    layout(lay, n_out).0
                };
                let gx = 2;
                // Transposed storage of Cm and Am when `tr`, Mᵀ otherwise.
                let (cs0, cs1) = if tr { (1, r) } else { (n_in, 1) };
                let (ms0, ms1) = if tr { (r, 1) } else { (1, r) };
                let (as0, as1) = if tr { (1, n_out) } else { (r, 1) };
                let input = rand_vals(n_rows * n_in, dt, &mut rng);
                let base = if alias == 2 {
                    input.clone()
                } else {
                    rand_vals(n_rows * n_out, dt, &mut rng)
                };
                let cm = rand_vals(r * n_in, "f32", &mut rng);
                let mm = rand_vals(r * r, "f32", &mut rng);
                let am = rand_vals(n_out * r, "f32", &mut rng);
                let m_scale = 0.75f32;
                let mut job = format!(
                    "rows_fused {dt} {n_rows} {n_in} {n_out} {r} {rpw} {gx} {ld_in} {ld_out} {off} {has_base} {alias} {has_out} {has_mm} {} {cs0} {cs1} {ms0} {ms1} {as0} {as1} {} {} {}",
                    h1(m_scale),
                    cm.len(),
                    mm.len(),
                    am.len()
                );
                hex(&input, &mut job);
                if has_base == 1 {
                    hex(&base, &mut job);
                }
                hex(&cm, &mut job);
                hex(&mm, &mut job);
                hex(&am, &mut job);
                let out = skinny_emu::run(&job);
                // Reference.
                let (mut v, mut t, mut o) = (vec![], vec![], vec![]);
                for i in 0..n_rows {
                    let vi: Vec<f64> = (0..r)
                        .map(|q| {
                            (0..n_in)
                                .map(|l| cm[q * cs0 + l * cs1] as f64 * input[i * n_in + l] as f64)
                                .sum()
                        })
                        .collect();
                    let ti: Vec<f64> = (0..r)
                        .map(|q| {
                            if has_mm == 1 {
                                (0..r).map(|p| mm[q * ms0 + p * ms1] as f64 * vi[p]).sum()
                            } else {
                                m_scale as f64 * vi[q]
                            }
                        })
                        .collect();
                    for j in 0..n_out {
                        let b = if has_base == 1 {
                            base[i * n_out + j] as f64
                        } else {
                            0.0
                        };
                        o.push(
                            b + (0..r)
                                .map(|q| am[j * as0 + q * as1] as f64 * ti[q])
                                .sum::<f64>(),
                        );
                    }
                    v.extend(vi);
                    t.extend(ti);
                }
                let label = format!("rows_fused {dt} r={r} case {case}");
                let ev = rel_flat(&out[0].1, &v, &label);
                let et = rel_flat(&out[1].1, &t, &label);
                assert!(ev <= 1e-5 && et <= 1e-5, "{label}: v {ev:.2e} t {et:.2e}");
                assert_pad(&out, &label);
                if has_out == 1 {
                    let eo = rel_flat(&out[2].1, &o, &label);
                    assert!(eo <= out_tol(dt), "{label}: out {eo:.2e}");
                } else {
                    // Nothing written: the -7 sentinels of the separate output remain.
                    assert!(
                        out[2].1.iter().all(|&x| x == -7.0),
                        "{label}: output written without out"
                    );
                }
            }
        }
    }
}

// col_reduce in the emulation (blocks of 2 row lanes × 4 column threads × 4 columns = 16
// columns; S staged 32 rows at a time): 70 rows (several pieces per chunk when rows_per_chunk
// ≥ 33), 37 columns (3 column blocks, ragged), r = 1, 10 (two rank groups) and 64, the dense
// (scalar, odd ld), aligned (vector) and offset (scalar) layouts. Tolerance: sums of ≤ 70 f32
// products, γ_n ≈ 4e-6 worst case: 1e-5.
#[test]
fn cuda_layer_kernels_emulated_on_cpu_col_reduce() {
    emu_or_skip!();
    let mut rng = rng(801);
    let (n_rows, n) = (70usize, 37usize);
    for dt in ["f32", "bf16", "f16"] {
        for (r, lay) in [(1usize, 1usize), (10, 0), (64, 3), (10, 2)] {
            for rpc in [1usize, 17, 70] {
                for beta in [0.0f32, 0.5] {
                    let (ldy, off) = layout(lay, n);
                    // S stored transposed (ss0 = 1, ss1 = n_rows) or row-major; out transposed.
                    let (ss0, ss1) = if rpc == 17 { (r, 1) } else { (1, n_rows) };
                    let (os0, os1) = (1usize, n);
                    let y = rand_vals(n_rows * n, dt, &mut rng);
                    let s = rand_vals(n_rows * r, "f32", &mut rng);
                    let mut out0 = rand_vals(n * r, "f32", &mut rng);
                    if beta == 0.0 {
                        out0.iter_mut().for_each(|x| *x = f32::NAN); // β = 0 must not read out
                    }
                    let alpha = -1.25f32;
                    let mut job = format!(
                        "col_reduce {dt} {n_rows} {n} {r} {rpc} {ldy} {off} {ss0} {ss1} {os0} {os1} {} {} {} {}",
                        h1(alpha),
                        h1(beta),
                        s.len(),
                        out0.len()
                    );
                    hex(&y, &mut job);
                    hex(&s, &mut job);
                    hex(&out0, &mut job);
                    let out = skinny_emu::run(&job);
                    let mut want = vec![0.0f64; n * r];
                    for j in 0..n {
                        for q in 0..r {
                            let sum: f64 = (0..n_rows)
                                .map(|i| y[i * n + j] as f64 * s[i * ss0 + q * ss1] as f64)
                                .sum();
                            let old = if beta != 0.0 {
                                beta as f64 * out0[j * os0 + q * os1] as f64
                            } else {
                                0.0
                            };
                            want[j * os0 + q * os1] = alpha as f64 * sum + old;
                        }
                    }
                    let e = rel_flat(&out[0].1, &want, "col_reduce");
                    assert!(
                        e <= 1e-5,
                        "col_reduce {dt} r={r} rpc={rpc} layout {lay} β={beta}: {e:.2e}"
                    );
                }
            }
        }
    }
}

// merge_apply in the emulation (blocks of 32 columns, steps of 4 rows): d = 13 rows over 2 row
// blocks (grid-stride), k = 45 columns (2 column blocks, ragged), r = 1, 5, 64, L stored
// transposed, R row-major or transposed, in place and not, the four layouts. Tolerance: ≤ 64
// f32 products then one rounding to the output type: out_tol.
#[test]
fn cuda_layer_kernels_emulated_on_cpu_merge_gemm_factor() {
    emu_or_skip!();
    let mut rng = rng(802);
    // merge_apply: W_out = W_in + scale L R, L stored transposed, in place and not.
    let (d, k) = (13usize, 45usize);
    for dt in ["f32", "bf16", "f16"] {
        for (r, lay) in [(1usize, 1usize), (5, 0), (64, 2), (5, 3)] {
            for alias in [0, 1] {
                let (ld, off) = layout(lay, k);
                let w = rand_vals(d * k, dt, &mut rng);
                let l = rand_vals(d * r, "f32", &mut rng);
                let rr = rand_vals(r * k, "f32", &mut rng);
                let (ls0, ls1) = (1usize, d);
                let (rs0, rs1) = if alias == 0 { (k, 1usize) } else { (1, r) };
                let scale = -0.5f32;
                let mut job = format!(
                    "merge_apply {dt} {d} {k} {r} {alias} {ld} {off} 2 {} {ls0} {ls1} {rs0} {rs1} {} {}",
                    h1(scale),
                    l.len(),
                    rr.len()
                );
                hex(&w, &mut job);
                hex(&l, &mut job);
                hex(&rr, &mut job);
                let out = skinny_emu::run(&job);
                let want: Vec<f64> = (0..d * k)
                    .map(|idx| {
                        let (i, j) = (idx / k, idx % k);
                        w[idx] as f64
                            + scale as f64
                                * (0..r)
                                    .map(|q| {
                                        l[i * ls0 + q * ls1] as f64 * rr[q * rs0 + j * rs1] as f64
                                    })
                                    .sum::<f64>()
                    })
                    .collect();
                let label = format!("merge_apply {dt} r={r} layout {lay} alias={alias}");
                let e = rel_flat(&out[0].1, &want, &label);
                assert!(e <= out_tol(dt), "{label}: {e:.2e}");
                assert_pad(&out, &label);
            }
        }
    }
    // small_gemm with transposed A and strided C, β = 0 (C poisoned) and β ≠ 0.
    let (m, n, kk) = (6usize, 5usize, 9usize);
    for beta in [0.0f32, 0.5] {
        let a = rand_vals(m * kk, "f32", &mut rng);
        let b = rand_vals(kk * n, "f32", &mut rng);
        let mut c0 = rand_vals(m * n, "f32", &mut rng);
        if beta == 0.0 {
            c0.iter_mut().for_each(|x| *x = f32::NAN);
        }
        let (as0, as1, bs0, bs1, cs0, cs1) = (1usize, m, n, 1usize, 1usize, m);
        let alpha = 1.5f32;
        let mut job = format!(
            "small_gemm {m} {n} {kk} {} {} {as0} {as1} {bs0} {bs1} {cs0} {cs1} {} {} {}",
            h1(alpha),
            h1(beta),
            a.len(),
            b.len(),
            c0.len()
        );
        hex(&a, &mut job);
        hex(&b, &mut job);
        hex(&c0, &mut job);
        let out = skinny_emu::run(&job);
        let mut want = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..kk)
                    .map(|p| a[i * as0 + p * as1] as f64 * b[p * bs0 + j * bs1] as f64)
                    .sum();
                let old = if beta != 0.0 {
                    beta as f64 * c0[i * cs0 + j * cs1] as f64
                } else {
                    0.0
                };
                want[i * cs0 + j * cs1] = alpha as f64 * s + old;
            }
        }
        let e = rel_flat(&out[0].1, &want, "small_gemm");
        assert!(e <= 1e-5, "small_gemm β={beta}: {e:.2e}");
    }
    // factor_c and factor_backward against src/grad/generator.rs (FactorChain, energy_backward).
    let (d, r) = (11usize, 3usize);
    let a = rand_vals(d * r, "f32", &mut rng);
    let b = rand_vals(r * d, "f32", &mut rng);
    let eta = 0.8f32;
    for (has_b, alpha) in [(1, 0.3f32), (1, 0.0), (0, 1.0)] {
        let mult = 0.9f32;
        let mut job = format!("factor_c {d} {r} {has_b} {} {}", h1(mult), h1(alpha));
        hex(&a, &mut job);
        if has_b == 1 {
            hex(&b, &mut job);
        }
        hex(&[eta], &mut job);
        let ct = skinny_emu::run(&job)[0].1.clone();
        let am = DMatrix::from_row_slice(d, r, &a).map(|x| x as f64);
        let bm = DMatrix::from_row_slice(r, d, &b).map(|x| x as f64);
        let spec = GeneratorSpec {
            alpha: alpha as f64,
            eta_mult: mult as f64,
            tau: None,
            lambda: 0.1,
        };
        let bopt = (has_b == 1).then_some(&bm);
        let gt = GeneratorTape::new(&am, bopt, eta as f64, &spec).unwrap();
        let ct_want: Vec<f64> = (0..d * r).map(|idx| gt.c[(idx % r, idx / r)]).collect();
        let e = rel_flat(&ct, &ct_want, "factor_c");
        assert!(e <= 1e-6, "factor_c has_b={has_b} α={alpha}: {e:.2e}");
        // factor_backward with random Ā, C̄ of the effective factors; Grams from the same Cᵀ.
        let abar = rand_vals(d * r, "f32", &mut rng);
        let cbar_t = rand_vals(d * r, "f32", &mut rng);
        let ctm = DMatrix::from_row_slice(d, r, &ct).map(|x| x as f64);
        let s = am.transpose() * &am;
        let kg = ctm.transpose() * &ctm;
        let f32s = |m: &DMatrix<f64>| -> Vec<f32> {
            (0..m.nrows())
                .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
                .map(|(i, j)| m[(i, j)] as f32)
                .collect()
        };
        let mut job = format!(
            "factor_backward {d} {r} {has_b} {} {} {}",
            h1(0.1),
            h1(alpha),
            h1(mult)
        );
        hex(&a, &mut job);
        hex(&ct, &mut job);
        hex(&f32s(&s), &mut job);
        hex(&f32s(&kg), &mut job);
        hex(&[eta], &mut job);
        hex(&abar, &mut job);
        hex(&cbar_t, &mut job);
        let out = skinny_emu::run(&job);
        // CPU: GeneratorTape::finish adds the energy gradient and runs FactorChain::backward.
        let abar_m = DMatrix::from_row_slice(d, r, &abar).map(|x| x as f64);
        let cbar_m = DMatrix::from_row_slice(d, r, &cbar_t)
            .map(|x| x as f64)
            .transpose();
        let (_, ea, ec) = elra::grad::energy_backward(&am, &gt.c, 0.1).unwrap();
        let fg = gt.chain.backward(&am, abar_m + ea, cbar_m + ec).unwrap();
        let label = format!("factor_backward has_b={has_b} α={alpha}");
        let flat = |m: &DMatrix<f64>| -> Vec<f64> {
            (0..m.nrows())
                .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
                .map(|(i, j)| m[(i, j)])
                .collect()
        };
        let e = rel_flat(&out[0].1, &flat(&fg.a), &label);
        assert!(e <= 1e-5, "{label}: ∂A {e:.2e}");
        if let Some(gb) = &fg.b {
            let e = rel_flat(&out[2].1, &flat(gb), &label);
            assert!(e <= 1e-5, "{label}: ∂B {e:.2e}");
        }
        let e = ((out[3].1[0] as f64) - fg.eta).abs() / fg.eta.abs();
        assert!(
            e <= 1e-5,
            "{label}: ∂η {e:.2e} ({} vs {})",
            out[3].1[0],
            fg.eta
        );
    }
}
