//! The GPU layers ([`elra::cuda::layer`]) against the CPU f64 reference ([`elra::grad`]):
//! forward, backward and merge/unmerge of ELRA general/PSD/Hyb on both routes, double-sided ELRA
//! and LoRA, in f32, f16 and bf16, all through the [`Adapter`] trait; typed errors and the tape
//! key; the opt-in overflow rule (`GpuAdapter::set_check_finite`) on every layer kind; device
//! memory flat over 10⁴ steps.
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
/// Only the device helpers of `tests/common/` (the emulation tests are in
/// `tests/cuda_skinny_emu.rs`).
#[macro_use]
mod common {
    #[macro_use]
    pub mod device;
}

use std::sync::Arc;

use elra::adapter::{
    Adapter, AlphaSchedule, DoubleSidedConfig, ElraConfig, EtaMultiplier, GeneratorConfig,
    GeneratorSpec, LoraConfig, LoraInit, Variant,
};
use elra::cuda::layer::{download_matrix, upload_matrix};
use elra::cuda::{
    Activation, CudaDevice, DeviceMatrices, GpuAdapter, GpuDoubleSidedLayer, GpuElraLayer,
    GpuLoraLayer,
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

/// `err` is the overflow rule's error naming `output`.
fn assert_overflow(r: elra::Result<()>, output: &str, label: &str) {
    match r {
        Err(ElraError::Overflow { what }) => {
            assert!(what.contains(&format!("`{output}`")), "{label}: {what}")
        }
        other => panic!("{label}: expected an overflow of `{output}`, got {other:?}"),
    }
}

/// The opt-in overflow rule ([`GpuAdapter::set_check_finite`]) on one layer: off by default; a
/// clean step gives the same values with the check on as off; on, each output is caught and
/// named — `y` from an Inf in `x`, the first gradient (`grad`) from a NaN in the forward's `x`
/// while `∂x` stays finite, `dx` from a NaN in `∂y`, `w0` from an unmerge of a `w_new` with an
/// Inf, `w_new` from a merge of a `W0` with an Inf — and a failed forward or backward leaves no
/// tape and no gradients; off again, the same calls succeed.
fn overflow_case(dev: &Arc<CudaDevice>, l: &mut dyn GpuAdapter<f32>, p: &Problem, grad: &str) {
    let label = l.name();
    let (n, d, k) = (p.x.nrows(), p.w0.nrows(), p.w0.ncols());
    let up = |m: &DMatrix<f64>| upload_matrix::<f32>(dev, m).unwrap();
    let down = |m: &DeviceMatrices<f32>| download_matrix(dev, m).unwrap();
    let with = |m: &DMatrix<f64>, v: f64| {
        let mut m = m.clone();
        let at = (m.nrows() / 2, m.ncols() - 1);
        m[at] = v;
        up(&m)
    };
    let (x, dy) = (up(&p.x), up(&p.dy));
    let (mut y, mut dx, mut w) = (
        nan_mat::<f32>(dev, n, d),
        nan_mat::<f32>(dev, n, k),
        nan_mat::<f32>(dev, d, k),
    );
    assert!(!l.checks_finite(), "{label}: off by default");
    let mut step = |l: &mut dyn GpuAdapter<f32>| {
        l.forward(&x, None, &mut y).unwrap();
        l.backward(&x, &dy, &mut dx).unwrap();
        l.merge(&mut w).unwrap();
        (down(&y), down(&dx), down(&w), l.grad(0).unwrap())
    };
    let off = step(l);
    l.set_check_finite(true);
    assert!(l.checks_finite());
    assert_eq!(step(l), off, "{label}: the check changes no output");
    let x_inf = with(&p.x, f64::INFINITY);
    assert_overflow(l.forward(&x_inf, None, &mut y), "y", label);
    assert!(
        l.backward(&x_inf, &dy, &mut dx).is_err(),
        "{label}: a tape kept"
    );
    let x_nan = with(&p.x, f64::NAN);
    l.set_check_finite(false);
    l.forward(&x_nan, None, &mut y).unwrap();
    l.set_check_finite(true);
    assert_overflow(l.backward(&x_nan, &dy, &mut dx), grad, label);
    assert!(down(&dx).iter().all(|v| v.is_finite()), "{label}: ∂x");
    assert!(l.grad(0).is_err(), "{label}: gradients kept");
    l.forward(&x, None, &mut y).unwrap();
    assert_overflow(l.backward(&x, &with(&p.dy, f64::NAN), &mut dx), "dx", label);
    let w_inf = with(&p.w0, f64::INFINITY);
    assert_overflow(l.unmerge(&w_inf, &mut w), "w0", label);
    l.set_w0(&w_inf).unwrap();
    assert_overflow(l.merge(&mut w), "w_new", label);
    l.set_check_finite(false);
    l.merge(&mut w).unwrap();
    l.unmerge(&w_inf, &mut w).unwrap();
}

#[test]
fn cuda_layer_opt_in_overflow_rule() {
    let dev = Arc::new(device_or_skip!());
    let (n, d, k, r) = (6, 12, 10, 3);
    let p = problem::<f32>(n, d, k, r, 700);
    let w0 = || upload_matrix::<f32>(&dev, &p.w0).unwrap();
    let general = Setting::new(Variant::General, 0.0, None, 0.1).generator;
    for route in [Route::Woodbury, Route::Merged] {
        let config = ElraConfig {
            generator: general,
            d,
            k,
            r,
            seed: 0,
        };
        let mut l =
            GpuElraLayer::from_factors(dev.clone(), config, w0(), &p.a, Some(&p.b)).unwrap();
        l.set_route(Some(route));
        overflow_case(&dev, &mut l, &p, "a gradient");
    }
    let config = DoubleSidedConfig {
        generator: general,
        d,
        k,
        r_left: r,
        r_right: 2,
        seed: 0,
    };
    let mut l = GpuDoubleSidedLayer::new(dev.clone(), config, w0()).unwrap();
    overflow_case(&dev, &mut l, &p, "a_left gradient");
    let config = LoraConfig {
        d,
        k,
        r,
        lora_alpha: 16.0,
        init: LoraInit::KaimingUniform,
        seed: 0,
    };
    let mut g = rng(701);
    let la = f32_of(&rand_mat(r, k, 0.3, &mut g));
    let lb = f32_of(&rand_mat(d, r, 1.0, &mut g));
    let mut l = GpuLoraLayer::from_factors(dev.clone(), config, w0(), &la, &lb).unwrap();
    overflow_case(&dev, &mut l, &p, "lora_a gradient");
}

/// The overflow rule through the C ABI (`elra_gpu_adapter_set_check_finite`): off by default, a
/// forward whose `y` is not finite returns `ELRA_OK`; on, `ELRA_OVERFLOW` with a message naming
/// `y`, and a clean forward still `ELRA_OK`.
#[test]
fn cuda_layer_overflow_rule_through_the_c_abi() {
    use elra::capi::*;
    use std::ffi::c_void;
    use std::ptr::null_mut;
    let dev = device_or_skip!();
    let (n, d, k, r) = (5, 8, 6, 2);
    let p = problem::<f32>(n, d, k, r, 710);
    let up = |m: &DMatrix<f64>| upload_matrix::<f32>(&dev, m).unwrap();
    let ptr = |m: &DeviceMatrices<f32>| m.device_addr() as *mut c_void;
    let w0 = up(&p.w0);
    let mut x_inf = p.x.clone();
    x_inf[(2, 3)] = f64::INFINITY;
    let (x, x_inf, y) = (up(&p.x), up(&x_inf), nan_mat::<f32>(&dev, n, d));
    let mut c = std::mem::MaybeUninit::<ElraAdapterConfig>::uninit();
    // SAFETY: `c` is a writable local config.
    let s = unsafe { elra_adapter_config_default(0, 0, d, k, r, 100, c.as_mut_ptr()) };
    assert_eq!(s, ElraStatus::ELRA_OK);
    // SAFETY: initialised by the successful call.
    let mut c = unsafe { c.assume_init() };
    c.tau = 0.0;
    let mut h: *mut ElraGpuAdapter = null_mut();
    // SAFETY: `w0` is d×k device memory of device 0, alive for the whole test; NULL stream.
    let s = unsafe { elra_gpu_adapter_create(&c, 0, ptr(&w0), k, null_mut(), &mut h) };
    assert_eq!(s, ElraStatus::ELRA_OK);
    let message = || {
        let mut buf = vec![0 as std::ffi::c_char; 512];
        // SAFETY: a live local buffer of 512 bytes, NUL-terminated by the call.
        unsafe {
            elra_last_error_message(buf.as_mut_ptr(), buf.len());
            std::ffi::CStr::from_ptr(buf.as_ptr())
        }
        .to_string_lossy()
        .into_owned()
    };
    // SAFETY: `h` is a live handle; x and y are device matrices of the described shapes, alive
    // until the handle's stream is synchronised (every call below synchronises or is followed by
    // elra_gpu_adapter_synchronize before the buffers drop).
    unsafe {
        let fwd = |x: &DeviceMatrices<f32>| {
            elra_gpu_adapter_forward(h, n, ptr(x), k, ptr(&y), d, null_mut())
        };
        assert_eq!(fwd(&x_inf), ElraStatus::ELRA_OK, "off by default");
        assert_eq!(elra_gpu_adapter_set_check_finite(h, 1), ElraStatus::ELRA_OK);
        assert_eq!(fwd(&x_inf), ElraStatus::ELRA_OVERFLOW);
        assert!(message().contains("`y`"), "{}", message());
        assert_eq!(fwd(&x), ElraStatus::ELRA_OK, "{}", message());
        assert_eq!(
            elra_gpu_adapter_set_check_finite(h, 7),
            ElraStatus::ELRA_INVALID_ARGUMENT
        );
        assert_eq!(elra_gpu_adapter_set_check_finite(h, 0), ElraStatus::ELRA_OK);
        assert_eq!(fwd(&x_inf), ElraStatus::ELRA_OK);
        assert_eq!(elra_gpu_adapter_synchronize(h), ElraStatus::ELRA_OK);
        elra_gpu_adapter_destroy(h);
    }
}
