//! GPU kernels against the CPU core: batched `e^Z`/`φ1(Z)` (Prop. 1, eq. 4) and the adjoint
//! Fréchet derivative `L_φ1(Zᵀ, G)` vs `elra::linalg` (the same Al-Mohy & Higham 2009 Padé
//! algorithm), the eq. (21) Gram kernel and the row-major cuBLAS GEMM vs CPU products, and the
//! per-matrix status codes.
//!
//! Every test that needs a GPU first calls `cuda_available()` and returns early, printing
//! `skipping: <reason>`, when there is none. Outputs are poisoned with NaN before each launch
//! and every element is checked.
//!
//! Tolerances. The matrix-function kernels port the CPU core operation by operation (same
//! summation orders, no FMA contraction), so the results are expected to be bit-identical; the
//! asserted bound is the normwise relative difference `max|gpu − cpu| / max|cpu|` ≤ 1e-12 (f64)
//! and ≤ 1e-6 (f32) — a few thousand / about 17 unit roundoffs, which still allows a different
//! degree/scaling choice where the device's pow/log2 differ from the host's in the last bit.
//! GEMM and Gram products are checked entrywise against the rigorous forward-error bound
//! `|ĉ − c| ≤ γ_k Σ|a||b|`, `γ_k = k·u/(1 − k·u)` (Higham, *Accuracy and Stability*, §3.5),
//! doubled to cover the f64 reference's own rounding.
#![allow(non_snake_case)]
#[macro_use]
mod common;

use elra::cuda::{
    cuda_available, gemm, kernels, spectral_norm_sq, AdapterGrams, CudaDevice, DeviceGrams,
    DeviceMatrices, DeviceScalar, FloatKernel, MatrixStatus, MatrixTeam, Transpose, Workspace,
};
use elra::linalg::Real;
use elra::ElraError;
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform(−1, 1) entries scaled to the given 1-norm (0 gives the zero matrix).
fn random_f64(n: usize, norm1: f64, rng: &mut ChaCha8Rng) -> DMatrix<f64> {
    let m = DMatrix::from_fn(n, n, |_, _| rng.random_range(-1.0..1.0));
    let s = m.column_iter().map(|c| c.abs().sum()).fold(0.0, f64::max);
    m * (norm1 / s)
}

/// Block-diagonal `diag(B, R)` with R random of 1-norm 1.
fn with_block(n: usize, b: &[f64], bn: usize, rng: &mut ChaCha8Rng) -> DMatrix<f64> {
    let mut z = DMatrix::zeros(n, n);
    for i in 0..bn {
        for j in 0..bn {
            z[(i, j)] = b[i * bn + j];
        }
    }
    if n > bn {
        let r = random_f64(n - bn, 1.0, rng);
        z.view_mut((bn, bn), (n - bn, n - bn)).copy_from(&r);
    }
    z
}

/// Badly scaled inputs (DESIGN "Numerics"): AMH 2009's `[[1, 1e8], [0, −1]]`, Moler's 3×3 and a
/// diagonal similarity `D⁻¹MD` with D = diag(1, 1e3, 1e-3, 1, 1e3, …); `None` when n is too small.
fn badly_scaled(kind: usize, n: usize, rng: &mut ChaCha8Rng) -> Option<DMatrix<f64>> {
    match kind {
        0 if n >= 2 => Some(with_block(n, &[1.0, 1e8, 0.0, -1.0], 2, rng)),
        1 if n >= 3 => {
            let moler = [
                0.0,
                1e-8,
                0.0,
                -(2e10 + 4e8 / 6.0),
                -3.0,
                2e10,
                200.0 / 3.0,
                0.0,
                -200.0 / 3.0,
            ];
            Some(with_block(n, &moler, 3, rng))
        }
        2 if n >= 3 => {
            let m = random_f64(n, 2.0, rng);
            let d = |i: usize| [1.0, 1e3, 1e-3][i % 3];
            Some(DMatrix::from_fn(n, n, |i, j| m[(i, j)] * d(j) / d(i)))
        }
        _ => None,
    }
}

/// Exactly structured inputs (issue 28): upper triangular with repeated and close diagonal
/// entries, its transpose (lower), an upper Markov generator with integer rates, a constant
/// diagonal with a large off-diagonal scale, a diagonal matrix, a strictly upper (nilpotent) one,
/// and badly scaled dense ones `D⁻¹MD` (D = diag(10^±3)) that f32 balances. n ≥ 2.
fn structured<T: Real>(n: usize, rng: &mut ChaCha8Rng) -> Vec<DMatrix<T>> {
    // (e^Z of the constant-diagonal case has entries up to ≈ big^{n−1}/(n−1)!: kept in range)
    let big = match (T::NAME, n) {
        ("f64", _) => 1e4,
        (_, 0..=8) => 1e3,
        _ => 10.0,
    };
    let upper = |rng: &mut ChaCha8Rng, scale: f64, diag: &dyn Fn(usize) -> f64| {
        DMatrix::from_fn(n, n, |i, j| match i.cmp(&j) {
            std::cmp::Ordering::Less => rng.random_range(-1.0..1.0) * scale,
            std::cmp::Ordering::Equal => diag(i),
            std::cmp::Ordering::Greater => 0.0,
        })
    };
    let close = |i: usize| [-3.0, -3.0, -3.0 + 1e-7, 0.5, 0.5 + 1e-12, 2.0][i % 6];
    let tri = upper(rng, 20.0, &close);
    let markov = {
        let mut q = DMatrix::from_fn(n, n, |i, j| {
            if j > i {
                rng.random_range(0..10) as f64 * 10.0
            } else {
                0.0
            }
        });
        for i in 0..n {
            q[(i, i)] = -q.row(i).sum();
        }
        q
    };
    let mut out = vec![
        tri.clone(),
        tri.transpose(),
        markov.clone(),
        markov.transpose(),
        upper(rng, big, &|_| -1.0),
        DMatrix::from_fn(n, n, |i, j| if i == j { 0.7 - i as f64 } else { 0.0 }),
        upper(rng, 50.0, &|_| 0.0),
    ];
    for e in [2.0, 3.0] {
        let m = random_f64(n, 2.0, rng);
        let d: Vec<f64> = (0..n)
            .map(|_| 10f64.powf(rng.random_range(-e..e)))
            .collect();
        out.push(DMatrix::from_fn(n, n, |i, j| m[(i, j)] * d[j] / d[i]));
    }
    out.into_iter().map(|z| z.map(T::of)).collect()
}

/// 1-norms spanning tiny to large for each precision (e^Z stays finite).
fn scales<T: Real>() -> &'static [f64] {
    if T::NAME == "f64" {
        &[0.0, 1e-10, 1e-3, 0.2, 1.0, 4.0, 20.0, 60.0]
    } else {
        &[0.0, 1e-7, 1e-3, 0.3, 1.0, 3.0, 10.0, 25.0]
    }
}

/// `count` test matrices of size n cycling through all scales and badly scaled kinds.
fn matrices<T: Real>(n: usize, count: usize, rng: &mut ChaCha8Rng) -> Vec<DMatrix<T>> {
    let sc = scales::<T>();
    let mut out = Vec::with_capacity(count);
    let mut i = 0usize;
    while out.len() < count {
        let k = i % (sc.len() + 3);
        i += 1;
        let z = if k < sc.len() {
            random_f64(n, sc[k], rng)
        } else {
            match badly_scaled(k - sc.len(), n, rng) {
                Some(z) => z,
                None => continue,
            }
        };
        out.push(z.map(T::of));
    }
    out
}

/// All scales and kinds once each (the batch-1 cases).
fn all_kinds<T: Real>(n: usize, rng: &mut ChaCha8Rng) -> Vec<DMatrix<T>> {
    let count = scales::<T>().len()
        + (0..3)
            .filter(|&k| badly_scaled(k, n, &mut rng.clone()).is_some())
            .count();
    matrices::<T>(n, count, rng)
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

/// `max|g − c| / max|c|` (`max|g − c|` when c = 0). Every entry of g must be finite.
fn rel_diff<T: Real>(g: &DMatrix<T>, c: &DMatrix<T>, what: &str) -> f64 {
    assert_eq!(g.shape(), c.shape(), "{what}: shape");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (x, y) in g.iter().zip(c.iter()) {
        assert!(
            x.f64().is_finite(),
            "{what}: GPU entry {x:?} is not finite (CPU {y:?})"
        );
        num = num.max((x.f64() - y.f64()).abs());
        den = den.max(y.f64().abs());
    }
    if den > 0.0 {
        num / den
    } else {
        num
    }
}

fn tol<T: Real>() -> f64 {
    if T::NAME == "f64" {
        1e-12
    } else {
        1e-6
    }
}

fn bits_equal<T: Real>(a: &DMatrix<T>, b: &DMatrix<T>) -> bool {
    a.iter()
        .zip(b.iter())
        .all(|(x, y)| x.f64().to_bits() == y.f64().to_bits())
}

/// Runs `expm_phi1` on the GPU for `zs` (NaN-poisoned outputs) and compares every matrix with
/// the CPU core. Returns (worst relative difference, number of bit-identical matrices).
fn check_expm_phi1<T: FloatKernel>(
    dev: &CudaDevice,
    zs: &[DMatrix<T>],
    label: &str,
) -> (f64, usize) {
    let n = zs[0].nrows();
    let z = DeviceMatrices::from_host(dev, zs).unwrap();
    let nan = T::of(f64::NAN);
    let mut e = DeviceMatrices::filled(dev, zs.len(), n, n, nan).unwrap();
    let mut p = DeviceMatrices::filled(dev, zs.len(), n, n, nan).unwrap();
    kernels::expm_phi1(dev, &z, &mut e, &mut p).unwrap_or_else(|err| panic!("{label}: {err}"));
    let (eg, pg) = (e.to_host(dev).unwrap(), p.to_host(dev).unwrap());
    let mut worst = 0.0f64;
    let mut identical = 0;
    for (b, zb) in zs.iter().enumerate() {
        let (ec, pc) =
            elra::linalg::expm_phi1(zb).unwrap_or_else(|err| panic!("{label}[{b}]: CPU {err}"));
        let de = rel_diff(&eg[b], &ec, &format!("{label}[{b}] exp"));
        let dp = rel_diff(&pg[b], &pc, &format!("{label}[{b}] phi1"));
        assert!(
            de <= tol::<T>() && dp <= tol::<T>(),
            "{label}[{b}] ({}, ‖Z‖₁ = {:.3e}): exp diff {de:.3e}, phi1 diff {dp:.3e} > {:.0e}",
            T::NAME,
            norm1(zb),
            tol::<T>()
        );
        worst = worst.max(de).max(dp);
        identical += usize::from(bits_equal(&eg[b], &ec) && bits_equal(&pg[b], &pc));
    }
    (worst, identical)
}

/// Same for `L_φ1(Zᵀ, G)` against `elra::linalg::phi1_frechet_adjoint`.
fn check_adjoint<T: FloatKernel>(
    dev: &CudaDevice,
    zs: &[DMatrix<T>],
    gs: &[DMatrix<T>],
    label: &str,
) -> (f64, usize) {
    let n = zs[0].nrows();
    let z = DeviceMatrices::from_host(dev, zs).unwrap();
    let g = DeviceMatrices::from_host(dev, gs).unwrap();
    let mut out = DeviceMatrices::filled(dev, zs.len(), n, n, T::of(f64::NAN)).unwrap();
    kernels::phi1_adjoint(dev, &z, &g, &mut out).unwrap_or_else(|err| panic!("{label}: {err}"));
    let og = out.to_host(dev).unwrap();
    let mut worst = 0.0f64;
    let mut identical = 0;
    for b in 0..zs.len() {
        let c = elra::linalg::phi1_frechet_adjoint(&zs[b], &gs[b])
            .unwrap_or_else(|err| panic!("{label}[{b}]: CPU {err}"));
        let d = rel_diff(&og[b], &c, &format!("{label}[{b}] adjoint"));
        assert!(
            d <= tol::<T>(),
            "{label}[{b}] ({}, ‖Z‖₁ = {:.3e}, ‖G‖₁ = {:.3e}): adjoint diff {d:.3e} > {:.0e}",
            T::NAME,
            norm1(&zs[b]),
            norm1(&gs[b]),
            tol::<T>()
        );
        worst = worst.max(d);
        identical += usize::from(bits_equal(&og[b], &c));
    }
    (worst, identical)
}

fn norm1<T: Real>(m: &DMatrix<T>) -> f64 {
    m.column_iter()
        .map(|c| c.iter().map(|x| x.f64().abs()).sum::<f64>())
        .fold(0.0, f64::max)
}

const SIZES: [usize; 4] = [1, 7, 16, 64];

fn expm_phi1_suite<T: FloatKernel>(dev: &CudaDevice, seed: u64) {
    let mut rng = rng(seed);
    for n in SIZES {
        // batch 1: every kind on its own launch
        let mut worst = 0.0f64;
        let (mut same, mut total) = (0, 0);
        for (i, z) in all_kinds::<T>(n, &mut rng).into_iter().enumerate() {
            let (w, s) =
                check_expm_phi1(dev, std::slice::from_ref(&z), &format!("n={n} single #{i}"));
            worst = worst.max(w);
            same += s;
            total += 1;
        }
        // triangular and badly scaled inputs (exact-structure path, f32 balancing), one batch
        if n >= 2 {
            let zs = structured::<T>(n, &mut rng);
            let (w, s) = check_expm_phi1(dev, &zs, &format!("n={n} structured"));
            worst = worst.max(w);
            same += s;
            total += zs.len();
        }
        // batch 224: all kinds mixed in one launch
        let zs = matrices::<T>(n, 224, &mut rng);
        let (w, s) = check_expm_phi1(dev, &zs, &format!("n={n} batch 224"));
        worst = worst.max(w);
        same += s;
        total += zs.len();
        eprintln!(
            "expm_phi1 {} n={n}: worst normwise relative GPU−CPU difference {worst:.3e}; bit-identical {same}/{total}",
            T::NAME
        );
    }
}

fn adjoint_suite<T: FloatKernel>(dev: &CudaDevice, seed: u64) {
    let mut rng = rng(seed);
    // ‖G‖₁ relative to ‖Z‖₁ from 1e-6 to 1e6 exercises the 2^k rescaling of the direction.
    let g_norms = [1e-6, 1.0, 1e6];
    for n in SIZES {
        let mut worst = 0.0f64;
        let (mut same, mut total) = (0, 0);
        let singles = all_kinds::<T>(n, &mut rng);
        for (i, z) in singles.iter().enumerate() {
            let g = random_f64(n, g_norms[i % 3], &mut rng).map(T::of);
            let (w, s) = check_adjoint(
                dev,
                std::slice::from_ref(z),
                &[g],
                &format!("n={n} single #{i}"),
            );
            worst = worst.max(w);
            same += s;
            total += 1;
        }
        let zs = matrices::<T>(n, 224, &mut rng);
        let mut gs: Vec<DMatrix<T>> = (0..224)
            .map(|i| random_f64(n, g_norms[i % 3], &mut rng).map(T::of))
            .collect();
        gs[5] = DMatrix::zeros(n, n); // L(Zᵀ, 0) = 0
        let (w, s) = check_adjoint(dev, &zs, &gs, &format!("n={n} batch 224"));
        worst = worst.max(w);
        same += s;
        total += zs.len();
        eprintln!(
            "phi1_adjoint {} n={n}: worst normwise relative GPU−CPU difference {worst:.3e}; bit-identical {same}/{total}",
            T::NAME
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests that run everywhere
// ---------------------------------------------------------------------------------------------

#[test]
fn cuda_device_new_never_panics_and_reports_no_device() {
    match cuda_available() {
        Err(reason) => {
            eprintln!("no GPU ({reason}): CudaDevice::new must return NoDevice");
            match CudaDevice::new(0) {
                Err(ElraError::NoDevice(_)) => {}
                other => panic!("expected NoDevice, got {other:?}"),
            }
            assert!(matches!(
                elra::cuda::device_count(),
                Err(ElraError::NoDevice(_))
            ));
        }
        Ok(()) => {
            let count = elra::cuda::device_count().unwrap();
            assert!(count >= 1);
            match CudaDevice::new(count) {
                Err(ElraError::NoDevice(_)) => {}
                other => {
                    panic!("ordinal {count} of {count} devices: expected NoDevice, got {other:?}")
                }
            }
            let dev = CudaDevice::new(0).unwrap();
            eprintln!(
                "device 0: {} (sm_{}{})",
                dev.name().unwrap(),
                dev.compute_capability().unwrap().0,
                dev.compute_capability().unwrap().1
            );
        }
    }
}

/// `spectral_norm_sq` (host math on the eq. (21) Grams) against the SVD of the dense generator.
#[test]
fn cuda_spectral_norm_sq_from_grams_matches_dense_svd() {
    let mut rng = rng(7);
    for (d, r) in [(40, 1), (50, 5), (60, 16)] {
        let a = DMatrix::<f64>::from_fn(d, r, |_, _| rng.random_range(-1.0..1.0));
        let b = DMatrix::<f64>::from_fn(r, d, |_, _| rng.random_range(-1.0..1.0));
        for (name, c) in [("general", b.clone()), ("psd", a.transpose() * 0.7)] {
            let g = &a * &c;
            let want = g.singular_values().max().powi(2);
            let got = spectral_norm_sq(&(a.transpose() * &a), &(&c * c.transpose())).unwrap();
            assert!(
                (got - want).abs() <= 1e-10 * want,
                "d={d} r={r} {name}: {got} vs {want}"
            );
        }
    }
    // rank-deficient A (two equal columns): S is singular, the formula still holds
    let mut a = DMatrix::<f64>::from_fn(30, 3, |_, _| rng.random_range(-1.0..1.0));
    let col = a.column(0).into_owned();
    a.set_column(1, &col);
    let c = DMatrix::<f64>::from_fn(3, 30, |_, _| rng.random_range(-1.0..1.0));
    let want = (&a * &c).singular_values().max().powi(2);
    let got = spectral_norm_sq(&(a.transpose() * &a), &(&c * c.transpose())).unwrap();
    assert!(
        (got - want).abs() <= 1e-10 * want,
        "rank-deficient: {got} vs {want}"
    );
    assert!(matches!(
        spectral_norm_sq(&DMatrix::<f64>::zeros(2, 3), &DMatrix::zeros(2, 2)),
        Err(ElraError::Shape { .. })
    ));
    let mut s = DMatrix::<f64>::identity(2, 2);
    s[(0, 0)] = f64::NAN;
    assert!(matches!(
        spectral_norm_sq(&s, &DMatrix::identity(2, 2)),
        Err(ElraError::NonFinite { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Matrix functions vs the CPU core
// ---------------------------------------------------------------------------------------------

#[test]
fn cuda_expm_phi1_f64_matches_cpu() {
    let dev = device_or_skip!();
    expm_phi1_suite::<f64>(&dev, 11);
}

#[test]
fn cuda_expm_phi1_f32_matches_cpu() {
    let dev = device_or_skip!();
    expm_phi1_suite::<f32>(&dev, 12);
}

#[test]
fn cuda_phi1_adjoint_f64_matches_cpu() {
    let dev = device_or_skip!();
    adjoint_suite::<f64>(&dev, 13);
}

#[test]
fn cuda_phi1_adjoint_f32_matches_cpu() {
    let dev = device_or_skip!();
    adjoint_suite::<f32>(&dev, 14);
}

/// The shared-memory and global-scratch workspaces and the block and warp thread teams run the
/// same arithmetic: bit-identical outputs.
#[test]
fn cuda_workspaces_and_thread_teams_agree_bitwise() {
    let mut dev = device_or_skip!();
    fn run<T: FloatKernel>(dev: &mut CudaDevice, n: usize, rng: &mut ChaCha8Rng) {
        let zs = matrices::<T>(n, 40, rng);
        let gs: Vec<DMatrix<T>> = (0..40)
            .map(|_| random_f64(n, 1.0, rng).map(T::of))
            .collect();
        let mut outs = Vec::new();
        for ws in [Workspace::Auto, Workspace::Global] {
            for team in [MatrixTeam::Block, MatrixTeam::Warp] {
                dev.set_workspace(ws);
                dev.set_team(team);
                let (e, p) = kernels::expm_phi1_host(dev, &zs).unwrap();
                let l = kernels::phi1_adjoint_host(dev, &zs, &gs).unwrap();
                outs.push((e, p, l));
            }
        }
        dev.set_workspace(Workspace::Auto);
        dev.set_team(MatrixTeam::Block);
        let a = &outs[0];
        for (b, i) in outs[1..]
            .iter()
            .flat_map(|b| (0..zs.len()).map(move |i| (b, i)))
        {
            assert!(bits_equal(&a.0[i], &b.0[i]), "{} n={n} exp #{i}", T::NAME);
            assert!(bits_equal(&a.1[i], &b.1[i]), "{} n={n} phi1 #{i}", T::NAME);
            assert!(
                bits_equal(&a.2[i], &b.2[i]),
                "{} n={n} adjoint #{i}",
                T::NAME
            );
        }
    }
    let mut rng = rng(21);
    for n in [1, 7, 16, 32, 33, 64] {
        run::<f32>(&mut dev, n, &mut rng);
        run::<f64>(&mut dev, n, &mut rng);
    }
}

/// NaN/Inf inputs and overflowing results give per-matrix statuses; the others are unaffected.
#[test]
fn cuda_status_reports_nonfinite_and_overflow_per_matrix() {
    let dev = device_or_skip!();
    fn run<T: FloatKernel>(dev: &CudaDevice) {
        let n = 7;
        let mut rng = rng(31);
        let mut zs: Vec<DMatrix<T>> = (0..8)
            .map(|_| random_f64(n, 1.0, &mut rng).map(T::of))
            .collect();
        zs[2][(3, 4)] = T::of(f64::NAN);
        zs[4][(0, 0)] = T::of(f64::INFINITY);
        // e^{λ} beyond the range: λ = 1000 (f64 max ≈ e^709.8), λ = 100 (f32 max ≈ e^88.7)
        let big = if T::NAME == "f64" { 1000.0 } else { 100.0 };
        zs[6] = DMatrix::identity(n, n) * T::of(big);
        // entries so large that the powers overflow: pre-scaling path, then too many squarings
        let huge = if T::NAME == "f64" { 1e300 } else { 1e30 };
        zs[7] = random_f64(n, 1.0, &mut rng).map(|x| T::of(x * huge));
        let expect = [
            MatrixStatus::Ok,
            MatrixStatus::Ok,
            MatrixStatus::NonFiniteInput,
            MatrixStatus::Ok,
            MatrixStatus::NonFiniteInput,
            MatrixStatus::Ok,
            MatrixStatus::Overflow,
            MatrixStatus::Overflow,
        ];
        let z = DeviceMatrices::from_host(dev, &zs).unwrap();
        let nan = T::of(f64::NAN);
        let mut e = DeviceMatrices::filled(dev, 8, n, n, nan).unwrap();
        let mut p = DeviceMatrices::filled(dev, 8, n, n, nan).unwrap();
        let mut status = dev.stream().alloc_zeros::<i32>(8).unwrap();
        kernels::launch_expm_phi1(dev, &z, &mut e, &mut p, &mut status).unwrap();
        let got = kernels::read_status(dev, &status, 8).unwrap();
        assert_eq!(got, expect, "{} expm_phi1 statuses", T::NAME);
        let (eg, pg) = (e.to_host(dev).unwrap(), p.to_host(dev).unwrap());
        for b in 0..8 {
            let cpu = elra::linalg::expm_phi1(&zs[b]);
            if expect[b] == MatrixStatus::Ok {
                let (ec, pc) = cpu.unwrap();
                assert!(rel_diff(&eg[b], &ec, "exp") <= tol::<T>());
                assert!(rel_diff(&pg[b], &pc, "phi1") <= tol::<T>());
            } else {
                assert!(
                    eg[b].iter().chain(pg[b].iter()).all(|x| x.f64().is_nan()),
                    "failed matrix {b} must be NaN"
                );
                match (expect[b], cpu) {
                    (MatrixStatus::NonFiniteInput, Err(ElraError::NonFinite { .. })) => {}
                    (MatrixStatus::Overflow, Err(ElraError::Overflow { .. })) => {}
                    (s, c) => panic!("matrix {b}: GPU {s:?} but CPU {c:?}"),
                }
            }
        }
        // the checked entry point names the first failing matrix
        let err = kernels::expm_phi1(dev, &z, &mut e, &mut p).unwrap_err();
        assert!(err.to_string().contains("matrix 2 "), "{err}");
        // adjoint: the same statuses (G finite everywhere)
        let gs: Vec<DMatrix<T>> = (0..8)
            .map(|_| random_f64(n, 1.0, &mut rng).map(T::of))
            .collect();
        let g = DeviceMatrices::from_host(dev, &gs).unwrap();
        let mut out = DeviceMatrices::filled(dev, 8, n, n, nan).unwrap();
        kernels::launch_phi1_adjoint(dev, &z, &g, &mut out, &mut status).unwrap();
        assert_eq!(
            kernels::read_status(dev, &status, 8).unwrap(),
            expect,
            "{} adjoint statuses",
            T::NAME
        );
        let og = out.to_host(dev).unwrap();
        for b in 0..8 {
            if expect[b] == MatrixStatus::Ok {
                let c = elra::linalg::phi1_frechet_adjoint(&zs[b], &gs[b]).unwrap();
                assert!(rel_diff(&og[b], &c, "adjoint") <= tol::<T>());
            } else {
                assert!(og[b].iter().all(|x| x.f64().is_nan()));
                assert!(elra::linalg::phi1_frechet_adjoint(&zs[b], &gs[b]).is_err());
            }
        }
        // NaN in the direction G alone
        let mut gs2 = gs.clone();
        gs2[1][(0, 1)] = T::of(f64::NAN);
        let zs_ok: Vec<DMatrix<T>> = (0..8)
            .map(|_| random_f64(n, 1.0, &mut rng).map(T::of))
            .collect();
        let err = kernels::phi1_adjoint_host(dev, &zs_ok, &gs2).unwrap_err();
        assert!(err.to_string().contains("matrix 1 "), "{err}");
    }
    run::<f64>(&dev);
    run::<f32>(&dev);
}

#[test]
fn cuda_bad_shapes_are_typed_errors() {
    let dev = device_or_skip!();
    let z65 = DeviceMatrices::<f64>::zeros(&dev, 1, 65, 65).unwrap();
    let mut o65 = DeviceMatrices::<f64>::zeros(&dev, 1, 65, 65).unwrap();
    let mut o65b = DeviceMatrices::<f64>::zeros(&dev, 1, 65, 65).unwrap();
    assert!(matches!(
        kernels::expm_phi1(&dev, &z65, &mut o65, &mut o65b),
        Err(ElraError::InvalidArgument { arg: "z", .. })
    ));
    let rect = DeviceMatrices::<f32>::zeros(&dev, 2, 3, 4).unwrap();
    let mut o = DeviceMatrices::<f32>::zeros(&dev, 2, 3, 3).unwrap();
    let mut o2 = DeviceMatrices::<f32>::zeros(&dev, 2, 3, 3).unwrap();
    assert!(matches!(
        kernels::expm_phi1(&dev, &rect, &mut o, &mut o2),
        Err(ElraError::Shape { arg: "z", .. })
    ));
    let z = DeviceMatrices::<f32>::zeros(&dev, 2, 3, 3).unwrap();
    let mut wrong = DeviceMatrices::<f32>::zeros(&dev, 3, 3, 3).unwrap();
    assert!(matches!(
        kernels::expm_phi1(&dev, &z, &mut wrong, &mut o2),
        Err(ElraError::Shape { arg: "exp_out", .. })
    ));
    let g = DeviceMatrices::<f32>::zeros(&dev, 2, 4, 4).unwrap();
    assert!(matches!(
        kernels::phi1_adjoint(&dev, &z, &g, &mut o),
        Err(ElraError::Shape { arg: "g", .. })
    ));
    assert!(matches!(
        DeviceMatrices::<f32>::zeros(&dev, 0, 3, 3),
        Err(ElraError::InvalidArgument { .. })
    ));
    assert!(matches!(
        DeviceMatrices::<f32>::from_row_major(&dev, 2, 3, 3, &[0.0; 5]),
        Err(ElraError::Shape { arg: "data", .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------------------------

trait TestScalar: DeviceScalar {
    const U: f64; // unit roundoff of the storage type
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}
impl TestScalar for f32 {
    const U: f64 = 5.960464477539063e-8;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl TestScalar for f64 {
    const U: f64 = 1.1102230246251565e-16;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}
impl TestScalar for half::f16 {
    const U: f64 = 4.8828125e-4; // 2^-11
    fn from_f64(x: f64) -> Self {
        half::f16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
}
impl TestScalar for half::bf16 {
    const U: f64 = 3.90625e-3; // 2^-8
    fn from_f64(x: f64) -> Self {
        half::bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
}

fn gamma(k: usize, u: f64) -> f64 {
    k as f64 * u / (1.0 - k as f64 * u)
}

/// Row-major `rows × cols` entry of stored matrix `x` of batch entry `b` (batch 1 broadcasts).
fn at(x: &[f64], batch: usize, rows: usize, cols: usize, b: usize, i: usize, j: usize) -> f64 {
    let b = if batch == 1 { 0 } else { b };
    x[b * rows * cols + i * cols + j]
}

/// One GEMM case checked entrywise: `|ĉ − c| ≤ u_out|c| + (1 + u_out)·2γ_{k+2}(|α|Σ|a||b| + |β||c₀|)`
/// with γ for the accumulation precision (f32 for f32/f16/bf16, f64 for f64).
#[allow(clippy::too_many_arguments)]
fn gemm_case<T: TestScalar>(
    dev: &CudaDevice,
    rng: &mut ChaCha8Rng,
    (m, n, k): (usize, usize, usize),
    (ta, tb): (Transpose, Transpose),
    (ba, bb, bc): (usize, usize, usize),
    alpha: f64,
    beta: f64,
) -> f64 {
    let (ar, ac) = if ta == Transpose::No { (m, k) } else { (k, m) };
    let (br, bcn) = if tb == Transpose::No { (k, n) } else { (n, k) };
    let gen = |len: usize, rng: &mut ChaCha8Rng| -> Vec<T> {
        (0..len)
            .map(|_| T::from_f64(rng.random_range(-1.0..1.0)))
            .collect()
    };
    let a_h = gen(ba * ar * ac, rng);
    let b_h = gen(bb * br * bcn, rng);
    let c0_h: Vec<T> = if beta == 0.0 {
        vec![T::from_f64(f64::NAN); bc * m * n] // β = 0: C must not be read
    } else {
        gen(bc * m * n, rng)
    };
    let a = DeviceMatrices::from_row_major(dev, ba, ar, ac, &a_h).unwrap();
    let b = DeviceMatrices::from_row_major(dev, bb, br, bcn, &b_h).unwrap();
    let mut c = DeviceMatrices::from_row_major(dev, bc, m, n, &c0_h).unwrap();
    gemm(dev, alpha, &a, ta, &b, tb, beta, &mut c).unwrap();
    let got = c.to_row_major(dev).unwrap();
    let a64: Vec<f64> = a_h.iter().map(|x| x.to_f64()).collect();
    let b64: Vec<f64> = b_h.iter().map(|x| x.to_f64()).collect();
    let c64: Vec<f64> = c0_h.iter().map(|x| x.to_f64()).collect();
    let acc_u = if T::DTYPE == "f64" {
        f64::EPSILON / 2.0
    } else {
        5.960464477539063e-8
    };
    let out_u = if T::DTYPE == "f16" || T::DTYPE == "bf16" {
        T::U
    } else {
        0.0
    };
    let mut worst = 0.0f64;
    for bi in 0..bc {
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut sabs) = (0.0f64, 0.0f64);
                for l in 0..k {
                    let x = if ta == Transpose::No {
                        at(&a64, ba, ar, ac, bi, i, l)
                    } else {
                        at(&a64, ba, ar, ac, bi, l, i)
                    };
                    let y = if tb == Transpose::No {
                        at(&b64, bb, br, bcn, bi, l, j)
                    } else {
                        at(&b64, bb, br, bcn, bi, j, l)
                    };
                    s += x * y;
                    sabs += (x * y).abs();
                }
                let c0 = if beta == 0.0 {
                    0.0
                } else {
                    c64[bi * m * n + i * n + j]
                };
                let want = alpha * s + beta * c0;
                let mag = alpha.abs() * sabs + beta.abs() * c0.abs();
                let bound =
                    out_u * want.abs() + (1.0 + out_u) * (2.0 * gamma(k + 2, acc_u) * mag) + 1e-300;
                let g = got[bi * m * n + i * n + j].to_f64();
                assert!(g.is_finite(), "{} C[{bi}][{i},{j}] = {g}", T::DTYPE);
                let err = (g - want).abs();
                assert!(
                    err <= bound,
                    "{} {m}×{n}×{k} {ta:?}/{tb:?} batch ({ba},{bb},{bc}): C[{bi}][{i},{j}] = {g}, want {want}, err {err:.3e} > bound {bound:.3e}",
                    T::DTYPE
                );
                worst = worst.max(err / mag.max(1e-300));
            }
        }
    }
    worst
}

fn gemm_suite<T: TestScalar>(dev: &CudaDevice, seed: u64) {
    let mut rng = rng(seed);
    let mut worst = 0.0f64;
    for ta in [Transpose::No, Transpose::Yes] {
        for tb in [Transpose::No, Transpose::Yes] {
            worst = worst.max(gemm_case::<T>(
                dev,
                &mut rng,
                (37, 53, 71),
                (ta, tb),
                (1, 1, 1),
                1.0,
                0.0,
            ));
            worst = worst.max(gemm_case::<T>(
                dev,
                &mut rng,
                (5, 3, 17),
                (ta, tb),
                (3, 3, 3),
                0.75,
                -0.5,
            ));
            worst = worst.max(gemm_case::<T>(
                dev,
                &mut rng,
                (16, 9, 33),
                (ta, tb),
                (1, 4, 4),
                -1.25,
                1.0,
            ));
            worst = worst.max(gemm_case::<T>(
                dev,
                &mut rng,
                (8, 16, 24),
                (ta, tb),
                (4, 1, 4),
                2.0,
                0.0,
            ));
        }
    }
    worst = worst.max(gemm_case::<T>(
        dev,
        &mut rng,
        (1, 1, 1),
        (Transpose::No, Transpose::No),
        (1, 1, 1),
        1.0,
        0.0,
    ));
    worst = worst.max(gemm_case::<T>(
        dev,
        &mut rng,
        (192, 256, 512),
        (Transpose::No, Transpose::Yes),
        (1, 1, 1),
        1.0,
        0.0,
    ));
    eprintln!(
        "gemm {}: worst |err| / (|α|Σ|a||b| + |β||c|) = {worst:.3e}",
        T::DTYPE
    );
}

#[test]
fn cuda_gemm_row_major_matches_cpu_all_dtypes() {
    let dev = device_or_skip!();
    gemm_suite::<f64>(&dev, 41);
    gemm_suite::<f32>(&dev, 42);
    gemm_suite::<half::f16>(&dev, 43);
    gemm_suite::<half::bf16>(&dev, 44);
}

/// TF32 only when asked: with A = 1 + 2⁻¹² (exact in f32, rounds to 1 in TF32's 10-bit
/// mantissa) and B = 1, every entry of A·B is exactly k(1 + 2⁻¹²) in f32 arithmetic up to
/// 2γ_{k+2}·k ≈ 1e-5, while TF32 inputs would give k — off by k·2⁻¹² ≈ 0.016 (k = 64).
#[test]
fn cuda_gemm_tf32_only_when_asked_and_shapes_checked() {
    let mut dev = device_or_skip!();
    let (m, n, k) = (256usize, 256usize, 64usize);
    let x = 1.0 + 2f64.powi(-12);
    let a = DeviceMatrices::<f32>::filled(&dev, 1, m, k, x as f32).unwrap();
    let b = DeviceMatrices::<f32>::filled(&dev, 1, k, n, 1.0).unwrap();
    let want = k as f64 * x;
    let f32_bound = 2.0 * gamma(k + 2, 5.960464477539063e-8) * want;
    let tf32_bound = f32_bound + 2.0 * 2f64.powi(-10) * want;
    let max_err = |dev: &CudaDevice| {
        let mut c = DeviceMatrices::<f32>::filled(dev, 1, m, n, f32::NAN).unwrap();
        gemm(dev, 1.0, &a, Transpose::No, &b, Transpose::No, 0.0, &mut c).unwrap();
        c.to_row_major(dev)
            .unwrap()
            .iter()
            .map(|&v| (v as f64 - want).abs())
            .fold(0.0, f64::max)
    };
    assert!(!dev.allow_tf32());
    let e = max_err(&dev);
    assert!(
        e <= f32_bound,
        "default mode: error {e:.3e} > f32 bound {f32_bound:.3e} (TF32 used?)"
    );
    dev.set_allow_tf32(true).unwrap();
    assert!(dev.allow_tf32());
    let e_tf32 = max_err(&dev);
    assert!(
        e_tf32 <= tf32_bound,
        "TF32 mode: error {e_tf32:.3e} > {tf32_bound:.3e}"
    );
    dev.set_allow_tf32(false).unwrap();
    let e = max_err(&dev);
    assert!(
        e <= f32_bound,
        "TF32 switched off again: error {e:.3e} > {f32_bound:.3e}"
    );
    eprintln!("gemm f32 1+2^-12 probe: default error {e:.3e}, TF32 allowed error {e_tf32:.3e}");

    let a = DeviceMatrices::<f32>::zeros(&dev, 1, 4, 5).unwrap();
    let b = DeviceMatrices::<f32>::zeros(&dev, 1, 6, 3).unwrap();
    let mut c = DeviceMatrices::<f32>::zeros(&dev, 1, 4, 3).unwrap();
    assert!(matches!(
        gemm(&dev, 1.0, &a, Transpose::No, &b, Transpose::No, 0.0, &mut c),
        Err(ElraError::Shape { arg: "b", .. })
    ));
    let b = DeviceMatrices::<f32>::zeros(&dev, 1, 5, 3).unwrap();
    let mut c_bad = DeviceMatrices::<f32>::zeros(&dev, 1, 3, 4).unwrap();
    assert!(matches!(
        gemm(
            &dev,
            1.0,
            &a,
            Transpose::No,
            &b,
            Transpose::No,
            0.0,
            &mut c_bad
        ),
        Err(ElraError::Shape { arg: "c", .. })
    ));
    let a2 = DeviceMatrices::<f32>::zeros(&dev, 2, 4, 5).unwrap();
    let mut c3 = DeviceMatrices::<f32>::zeros(&dev, 3, 4, 3).unwrap();
    assert!(matches!(
        gemm(
            &dev,
            1.0,
            &a2,
            Transpose::No,
            &b,
            Transpose::No,
            0.0,
            &mut c3
        ),
        Err(ElraError::InvalidArgument { arg: "a", .. })
    ));
    assert!(matches!(
        gemm(
            &dev,
            f64::NAN,
            &a,
            Transpose::No,
            &b,
            Transpose::No,
            0.0,
            &mut c
        ),
        Err(ElraError::InvalidArgument { arg: "alpha", .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Eq. (21) Grams
// ---------------------------------------------------------------------------------------------

/// Gram outputs and per-adapter statuses.
type GramsOut<T> = (Vec<AdapterGrams<T>>, Vec<MatrixStatus>);

/// Runs the Gram kernel for row-major A (batch×d×r) and C (batch×r×d): `(outputs, statuses)`.
type GramsRunner<'a, T> = dyn Fn(&[T], &[T], usize, usize, usize) -> GramsOut<T> + 'a;

fn grams_on_gpu<T: FloatKernel>(
    dev: &CudaDevice,
) -> impl Fn(&[T], &[T], usize, usize, usize) -> GramsOut<T> + '_ {
    move |a_h, c_h, batch, d, r| {
        let a = DeviceMatrices::from_row_major(dev, batch, d, r, a_h).unwrap();
        let c = DeviceMatrices::from_row_major(dev, batch, r, d, c_h).unwrap();
        let mut out = DeviceGrams::filled(dev, batch, r, T::of(f64::NAN)).unwrap();
        let mut status = dev.stream().alloc_zeros::<i32>(batch).unwrap();
        kernels::launch_adapter_grams(dev, &a, &c, &mut out, &mut status).unwrap();
        let st = kernels::read_status(dev, &status, batch).unwrap();
        (out.to_host(dev).unwrap(), st)
    }
}

/// Checks one batch of adapters entrywise; returns the worst |err|/bound ratio.
fn grams_case<T: FloatKernel>(
    run: &GramsRunner<'_, T>,
    rng: &mut ChaCha8Rng,
    batch: usize,
    d: usize,
    r: usize,
) -> f64 {
    let u = T::UNIT_ROUNDOFF;
    let a_h: Vec<T> = (0..batch * d * r)
        .map(|_| T::of(rng.random_range(-1.0..1.0)))
        .collect();
    let c_h: Vec<T> = (0..batch * r * d)
        .map(|_| T::of(rng.random_range(-1.0..1.0) * 0.3))
        .collect();
    let (got, st) = run(&a_h, &c_h, batch, d, r);
    assert!(st.iter().all(|&s| s == MatrixStatus::Ok), "{st:?}");
    let gd = 2.0 * gamma(d, u);
    let mut worst = 0.0f64;
    let mut check = |what: &str, g: f64, want: f64, bound: f64| {
        assert!(g.is_finite(), "{what}: {g}");
        let err = (g - want).abs();
        assert!(
            err <= bound + 1e-300,
            "{} {what}: {g} vs {want}, err {err:.3e} > {bound:.3e}",
            T::NAME
        );
        worst = worst.max(err / bound.max(1e-300));
    };
    for (b, gb) in got.iter().enumerate() {
        let A = |l: usize, j: usize| a_h[b * d * r + l * r + j].f64();
        let C = |i: usize, l: usize| c_h[b * r * d + i * d + l].f64();
        for i in 0..r {
            for j in 0..r {
                let (mut z, mut za, mut s, mut sa, mut k, mut ka) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
                for l in 0..d {
                    z += C(i, l) * A(l, j);
                    za += (C(i, l) * A(l, j)).abs();
                    s += A(l, i) * A(l, j);
                    sa += (A(l, i) * A(l, j)).abs();
                    k += C(i, l) * C(j, l);
                    ka += (C(i, l) * C(j, l)).abs();
                }
                check(&format!("[{b}] Z[{i},{j}]"), gb.z[(i, j)].f64(), z, gd * za);
                check(&format!("[{b}] S[{i},{j}]"), gb.s[(i, j)].f64(), s, gd * sa);
                check(&format!("[{b}] K[{i},{j}]"), gb.k[(i, j)].f64(), k, gd * ka);
                assert_eq!(gb.s[(i, j)], gb.s[(j, i)], "S symmetric");
                assert_eq!(gb.k[(i, j)], gb.k[(j, i)], "K symmetric");
                // SK against the product of the GPU's own S and K
                let (mut p, mut pa) = (0.0, 0.0);
                for l in 0..r {
                    p += gb.s[(i, l)].f64() * gb.k[(l, j)].f64();
                    pa += (gb.s[(i, l)].f64() * gb.k[(l, j)].f64()).abs();
                }
                check(
                    &format!("[{b}] SK[{i},{j}]"),
                    gb.sk[(i, j)].f64(),
                    p,
                    2.0 * gamma(r, u) * pa,
                );
            }
        }
        // energy = Σ S_ij K_ji of the GPU's own S, K: per-thread FMA partials then a 256-way sum.
        let (mut e, mut ea) = (0.0, 0.0);
        for i in 0..r {
            for j in 0..r {
                e += gb.s[(i, j)].f64() * gb.k[(j, i)].f64();
                ea += (gb.s[(i, j)].f64() * gb.k[(j, i)].f64()).abs();
            }
        }
        check(
            &format!("[{b}] energy"),
            gb.energy.f64(),
            e,
            2.0 * gamma(r * r + 256, u) * ea,
        );
    }
    worst
}

fn grams_suite<T: FloatKernel>(run: &GramsRunner<'_, T>, seed: u64, big: bool, label: &str) {
    let mut rng = rng(seed);
    let mut worst = 0.0f64;
    let (d_long, wide) = if big { (4096, 224) } else { (512, 9) };
    for r in SIZES {
        worst = worst.max(grams_case::<T>(run, &mut rng, 1, d_long, r));
        worst = worst.max(grams_case::<T>(run, &mut rng, wide, 96, r));
    }
    worst = worst.max(grams_case::<T>(run, &mut rng, 3, 1, 5));
    eprintln!(
        "adapter_grams {} ({label}): worst |err| / bound = {worst:.3e}",
        T::NAME
    );
}

#[test]
fn cuda_adapter_grams_f64_match_cpu() {
    let dev = device_or_skip!();
    grams_suite::<f64>(&grams_on_gpu::<f64>(&dev), 51, true, "GPU");
}

#[test]
fn cuda_adapter_grams_f32_match_cpu() {
    let dev = device_or_skip!();
    grams_suite::<f32>(&grams_on_gpu::<f32>(&dev), 52, true, "GPU");
}

/// Energy and spectral norm from the Grams equal ‖AC‖_F² and ‖AC‖₂² of the dense generator.
#[test]
fn cuda_adapter_grams_energy_and_spectral_norm_match_dense_generator() {
    let dev = device_or_skip!();
    let mut rng = rng(53);
    let (d, r) = (80, 6);
    let a = DMatrix::<f64>::from_fn(d, r, |_, _| rng.random_range(-1.0..1.0));
    let c = DMatrix::<f64>::from_fn(r, d, |_, _| rng.random_range(-1.0..1.0));
    let ad = DeviceMatrices::from_host(&dev, std::slice::from_ref(&a)).unwrap();
    let cd = DeviceMatrices::from_host(&dev, std::slice::from_ref(&c)).unwrap();
    let mut out = DeviceGrams::filled(&dev, 1, r, f64::NAN).unwrap();
    kernels::adapter_grams(&dev, &ad, &cd, &mut out).unwrap();
    let g = &out.to_host(&dev).unwrap()[0];
    let dense = &a * &c;
    let fro2 = dense.norm_squared();
    assert!(
        (g.energy - fro2).abs() <= 1e-12 * fro2,
        "{} vs {fro2}",
        g.energy
    );
    let spec2 = dense.singular_values().max().powi(2);
    let got = spectral_norm_sq(&g.s, &g.k).unwrap();
    assert!((got - spec2).abs() <= 1e-10 * spec2, "{got} vs {spec2}");
    // λmax of the SK output itself (non-symmetric; real eigenvalues ≥ 0)
    let lmax =
        g.sk.complex_eigenvalues()
            .iter()
            .map(|l| l.re)
            .fold(0.0, f64::max);
    assert!((lmax - spec2).abs() <= 1e-8 * spec2, "{lmax} vs {spec2}");
    assert!((g.z.clone() - &c * &a).abs().max() <= 1e-12 * (&c * &a).abs().max());
}

#[test]
fn cuda_adapter_grams_status_per_adapter() {
    let dev = device_or_skip!();
    fn run<T: FloatKernel>(dev: &CudaDevice) {
        let (batch, d, r) = (5, 33, 4);
        let mut rng = rng(54);
        let mut a_h: Vec<T> = (0..batch * d * r)
            .map(|_| T::of(rng.random_range(-1.0..1.0)))
            .collect();
        let mut c_h: Vec<T> = (0..batch * r * d)
            .map(|_| T::of(rng.random_range(-1.0..1.0)))
            .collect();
        a_h[d * r + 7] = T::of(f64::NAN); // adapter 1
        c_h[3 * r * d + 2] = T::of(f64::NEG_INFINITY); // adapter 3
        let huge = if T::NAME == "f64" { 1e200 } else { 1e25 };
        for x in &mut a_h[4 * d * r..5 * d * r] {
            *x = T::of(x.f64() * huge); // adapter 4: AᵀA overflows
        }
        let a = DeviceMatrices::from_row_major(dev, batch, d, r, &a_h).unwrap();
        let c = DeviceMatrices::from_row_major(dev, batch, r, d, &c_h).unwrap();
        let mut out = DeviceGrams::filled(dev, batch, r, T::of(f64::NAN)).unwrap();
        let mut status = dev.stream().alloc_zeros::<i32>(batch).unwrap();
        kernels::launch_adapter_grams(dev, &a, &c, &mut out, &mut status).unwrap();
        use MatrixStatus::*;
        assert_eq!(
            kernels::read_status(dev, &status, batch).unwrap(),
            [Ok, NonFiniteInput, Ok, NonFiniteInput, Overflow],
            "{}",
            T::NAME
        );
        let got = out.to_host(dev).unwrap();
        for b in [0, 2] {
            assert!(got[b]
                .z
                .iter()
                .chain(got[b].s.iter())
                .all(|x| x.f64().is_finite()));
        }
        for b in [1, 3] {
            assert!(got[b]
                .z
                .iter()
                .chain(got[b].sk.iter())
                .all(|x| x.f64().is_nan()));
            assert!(got[b].energy.f64().is_nan());
        }
        let err = kernels::adapter_grams(dev, &a, &c, &mut out).unwrap_err();
        assert!(err.to_string().contains("matrix 1 "), "{err}");
    }
    run::<f64>(&dev);
    run::<f32>(&dev);
}

// ---------------------------------------------------------------------------------------------
// The kernels emulated on the CPU (no GPU needed)
// ---------------------------------------------------------------------------------------------
//
// cuda/emu/ compiles cuda/phi1.cu and cuda/grams.cu with the host C++ compiler: one OS thread per
// CUDA thread (ELRA_BLOCK = 8), std::barrier for __syncthreads, static storage for __shared__,
// IEEE arithmetic without contraction and the host libm — the libm the Rust CPU core uses. The
// kernels' device code thus runs unchanged (same index arithmetic, barriers, reductions, status
// logic), and since it ports the CPU core operation by operation, its results must equal
// `elra::linalg` bit for bit: these tests assert exactly that. (If `src/linalg/expm.rs` changes
// its arithmetic, `cuda/phi1.cu` must change with it.) What they cannot check is what only a GPU
// has: the device libm (pow/log2 in the selection), memory visibility on real hardware, the
// 256-thread configuration, shared-memory limits and the launches. Skipped when no C++20 compiler
// (`$CXX`, `g++` or `c++`) is found.

mod emu {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// Kernel sources, embedded so the test binary does not depend on the build machine's paths.
    const SOURCES: [(&str, &str); 6] = [
        ("phi1.cu", include_str!("../cuda/phi1.cu")),
        ("grams.cu", include_str!("../cuda/grams.cu")),
        ("common.cuh", include_str!("../cuda/common.cuh")),
        (
            "emu/math_constants.h",
            include_str!("../cuda/emu/math_constants.h"),
        ),
        ("emu/cuda_emu.hpp", include_str!("../cuda/emu/cuda_emu.hpp")),
        ("emu/harness.cpp", include_str!("../cuda/emu/harness.cpp")),
    ];

    fn build() -> Result<PathBuf, String> {
        crate::common::emu::build_harness("cuda", &SOURCES, "emu/harness.cpp", "-O2")
    }

    /// The emulation binary, built once per test process; `Err(reason)` to skip.
    pub fn harness() -> Result<&'static PathBuf, String> {
        static EXE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        EXE.get_or_init(build).as_ref().map_err(|e| e.clone())
    }

    /// Runs one job; returns the output lines as (name, tokens).
    pub fn run(job: &str) -> Vec<(String, Vec<String>)> {
        let exe = harness().expect("harness built");
        crate::common::emu::run_job(exe, job)
            .lines()
            .map(|l| {
                let mut it = l.split_whitespace().map(str::to_string);
                let name = it.next().unwrap_or_default();
                (name, it.collect())
            })
            .collect()
    }
}

/// IEEE bit patterns for the emulation's text protocol.
trait EmuBits: FloatKernel {
    fn bits(self) -> u64;
    fn from_bits_u64(b: u64) -> Self;
}
impl EmuBits for f32 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
    fn from_bits_u64(b: u64) -> Self {
        f32::from_bits(b as u32)
    }
}
impl EmuBits for f64 {
    fn bits(self) -> u64 {
        self.to_bits()
    }
    fn from_bits_u64(b: u64) -> Self {
        f64::from_bits(b)
    }
}

macro_rules! emu_or_skip {
    () => {
        if let Err(reason) = emu::harness() {
            eprintln!("skipping: {reason}");
            return;
        }
    };
}

fn hex_row_major<T: EmuBits>(ms: &[DMatrix<T>], out: &mut String) {
    for m in ms {
        for i in 0..m.nrows() {
            for j in 0..m.ncols() {
                out.push_str(&format!(" {:x}", m[(i, j)].bits()));
            }
        }
    }
}

fn parse_matrices<T: EmuBits>(tokens: &[String], rows: usize, cols: usize) -> Vec<DMatrix<T>> {
    let v: Vec<T> = tokens
        .iter()
        .map(|t| T::from_bits_u64(u64::from_str_radix(t, 16).unwrap()))
        .collect();
    v.chunks_exact(rows * cols)
        .map(|c| DMatrix::from_row_slice(rows, cols, c))
        .collect()
}

fn parse_status(tokens: &[String]) -> Vec<MatrixStatus> {
    tokens
        .iter()
        .map(|t| MatrixStatus::from_code(t.parse().unwrap()))
        .collect()
}

/// Workspace placement × thread team of the emulated launches: `(use_shared, warp team)`.
const EMU_LAUNCHES: [(bool, bool); 4] =
    [(false, false), (true, false), (true, true), (false, true)];

/// `(statuses, e^Z, φ1(Z))` from the emulated `expm_phi1` kernel (block or warp team).
fn emu_expm_phi1<T: EmuBits>(
    zs: &[DMatrix<T>],
    use_shared: bool,
    warp: bool,
) -> (Vec<MatrixStatus>, Vec<DMatrix<T>>, Vec<DMatrix<T>>) {
    let n = zs[0].nrows();
    let mut job = format!(
        "expm_phi1 {} {n} {} {} {}",
        T::NAME,
        zs.len(),
        u8::from(use_shared),
        u8::from(warp)
    );
    hex_row_major(zs, &mut job);
    let out = emu::run(&job);
    assert_eq!(out[1].0, "exp");
    (
        parse_status(&out[0].1),
        parse_matrices(&out[1].1, n, n),
        parse_matrices(&out[2].1, n, n),
    )
}

/// `(statuses, L_φ1(Zᵀ, G))` from the emulated `phi1_adjoint` kernel.
fn emu_phi1_adjoint<T: EmuBits>(
    zs: &[DMatrix<T>],
    gs: &[DMatrix<T>],
    use_shared: bool,
    warp: bool,
) -> (Vec<MatrixStatus>, Vec<DMatrix<T>>) {
    let n = zs[0].nrows();
    let mut job = format!(
        "phi1_adjoint {} {n} {} {} {}",
        T::NAME,
        zs.len(),
        u8::from(use_shared),
        u8::from(warp)
    );
    hex_row_major(zs, &mut job);
    hex_row_major(gs, &mut job);
    let out = emu::run(&job);
    (parse_status(&out[0].1), parse_matrices(&out[1].1, n, n))
}

fn grams_emulated<T: EmuBits>(
    a_h: &[T],
    c_h: &[T],
    batch: usize,
    d: usize,
    r: usize,
) -> GramsOut<T> {
    let mut job = format!("adapter_grams {} {d} {r} {batch}", T::NAME);
    for x in a_h.iter().chain(c_h) {
        job.push_str(&format!(" {:x}", x.bits()));
    }
    let out = emu::run(&job);
    let st = parse_status(&out[0].1);
    let z = parse_matrices::<T>(&out[1].1, r, r);
    let s = parse_matrices::<T>(&out[2].1, r, r);
    let k = parse_matrices::<T>(&out[3].1, r, r);
    let sk = parse_matrices::<T>(&out[4].1, r, r);
    let e = parse_matrices::<T>(&out[5].1, 1, 1);
    let grams = (0..batch)
        .map(|b| AdapterGrams {
            z: z[b].clone(),
            s: s[b].clone(),
            k: k[b].clone(),
            sk: sk[b].clone(),
            energy: e[b][(0, 0)],
        })
        .collect();
    (grams, st)
}

/// Emulated kernel vs CPU core: every matrix bit-identical (see the section comment).
fn emu_expm_phi1_suite<T: EmuBits>(seed: u64) {
    let mut rng = rng(seed);
    for n in SIZES {
        let mut zs = all_kinds::<T>(n, &mut rng);
        zs.extend(matrices::<T>(n, if n == 64 { 6 } else { 24 }, &mut rng));
        for (use_shared, warp) in EMU_LAUNCHES {
            let (st, eg, pg) = emu_expm_phi1(&zs, use_shared, warp);
            for (b, z) in zs.iter().enumerate() {
                assert_eq!(st[b], MatrixStatus::Ok, "n={n} #{b}");
                let (ec, pc) = elra::linalg::expm_phi1(z).unwrap();
                let plan = elra::linalg::pade_plan(z).unwrap();
                assert!(
                    bits_equal(&eg[b], &ec) && bits_equal(&pg[b], &pc),
                    "{} n={n} #{b} (‖Z‖₁ = {:.3e}, CPU plan {plan:?}): emulated kernel differs from the CPU core: exp {:.3e}, phi1 {:.3e}",
                    T::NAME,
                    norm1(z),
                    rel_diff(&eg[b], &ec, "exp"),
                    rel_diff(&pg[b], &pc, "phi1"),
                );
            }
        }
        eprintln!(
            "emulated expm_phi1 {} n={n}: {} matrices bit-identical to the CPU core",
            T::NAME,
            zs.len()
        );
    }
}

fn emu_adjoint_suite<T: EmuBits>(seed: u64) {
    let mut rng = rng(seed);
    let g_norms = [1e-6, 1.0, 1e6];
    for n in SIZES {
        let mut zs = all_kinds::<T>(n, &mut rng);
        zs.extend(matrices::<T>(n, if n == 64 { 4 } else { 16 }, &mut rng));
        let mut gs: Vec<DMatrix<T>> = (0..zs.len())
            .map(|i| random_f64(n, g_norms[i % 3], &mut rng).map(T::of))
            .collect();
        gs[1] = DMatrix::zeros(n, n);
        for (use_shared, warp) in EMU_LAUNCHES {
            let (st, lg) = emu_phi1_adjoint(&zs, &gs, use_shared, warp);
            for b in 0..zs.len() {
                assert_eq!(st[b], MatrixStatus::Ok, "n={n} #{b}");
                let c = elra::linalg::phi1_frechet_adjoint(&zs[b], &gs[b]).unwrap();
                assert!(
                    bits_equal(&lg[b], &c),
                    "{} n={n} #{b} (‖Z‖₁ = {:.3e}, ‖G‖₁ = {:.3e}): emulated adjoint differs from the CPU core by {:.3e}",
                    T::NAME,
                    norm1(&zs[b]),
                    norm1(&gs[b]),
                    rel_diff(&lg[b], &c, "adjoint"),
                );
            }
        }
        eprintln!(
            "emulated phi1_adjoint {} n={n}: {} matrices bit-identical to the CPU core",
            T::NAME,
            zs.len()
        );
    }
}

/// Emulated kernel vs CPU core on the exactly structured inputs of [`structured`] (triangular
/// path, transposed lower inputs, f32 balancing): bit for bit, and the results keep the
/// structure (strictly lower, or upper, part exactly zero).
fn emu_structured_suite<T: EmuBits>(seed: u64) {
    let mut rng = rng(seed);
    for n in [2usize, 3, 5, 8, 16, 64] {
        let zs = structured::<T>(n, &mut rng);
        for (use_shared, warp) in EMU_LAUNCHES {
            let (st, eg, pg) = emu_expm_phi1(&zs, use_shared, warp);
            for (b, z) in zs.iter().enumerate() {
                assert_eq!(st[b], MatrixStatus::Ok, "{} n={n} #{b}", T::NAME);
                let (ec, pc) = elra::linalg::expm_phi1(z).unwrap();
                assert!(
                    bits_equal(&eg[b], &ec) && bits_equal(&pg[b], &pc),
                    "{} n={n} structured #{b}: emulated kernel differs from the CPU core: exp {:.3e}, phi1 {:.3e}",
                    T::NAME,
                    rel_diff(&eg[b], &ec, "exp"),
                    rel_diff(&pg[b], &pc, "phi1"),
                );
                let zero_below =
                    |m: &DMatrix<T>| (0..n).all(|i| (0..i).all(|j| m[(i, j)].f64() == 0.0));
                if zero_below(z) {
                    assert!(
                        zero_below(&ec) && zero_below(&pc),
                        "n={n} #{b}: upper structure lost"
                    );
                }
                let zt = z.transpose();
                if zero_below(&zt) {
                    assert!(
                        zero_below(&ec.transpose()) && zero_below(&pc.transpose()),
                        "n={n} #{b}: lower structure lost"
                    );
                }
            }
        }
        eprintln!(
            "emulated expm_phi1 {} n={n}: {} structured matrices bit-identical to the CPU core",
            T::NAME,
            zs.len()
        );
    }
}

#[test]
fn cuda_kernels_emulated_on_cpu_triangular_and_balanced_f64_bitwise_equal_cpu_core() {
    emu_or_skip!();
    emu_structured_suite::<f64>(66);
}

#[test]
fn cuda_kernels_emulated_on_cpu_triangular_and_balanced_f32_bitwise_equal_cpu_core() {
    emu_or_skip!();
    emu_structured_suite::<f32>(67);
}

#[test]
fn cuda_kernels_emulated_on_cpu_expm_phi1_f64_bitwise_equal_cpu_core() {
    emu_or_skip!();
    emu_expm_phi1_suite::<f64>(61);
}

#[test]
fn cuda_kernels_emulated_on_cpu_expm_phi1_f32_bitwise_equal_cpu_core() {
    emu_or_skip!();
    emu_expm_phi1_suite::<f32>(62);
}

#[test]
fn cuda_kernels_emulated_on_cpu_phi1_adjoint_f64_bitwise_equal_cpu_core() {
    emu_or_skip!();
    emu_adjoint_suite::<f64>(63);
}

#[test]
fn cuda_kernels_emulated_on_cpu_phi1_adjoint_f32_bitwise_equal_cpu_core() {
    emu_or_skip!();
    emu_adjoint_suite::<f32>(64);
}

/// The status paths: NaN/Inf input, overflow of e^Z, powers overflowing (pre-scaling, then too
/// many squarings); failed matrices are NaN, the others equal the CPU core.
#[test]
fn cuda_kernels_emulated_on_cpu_statuses_match_cpu_errors() {
    emu_or_skip!();
    fn run<T: EmuBits>() {
        let n = 7;
        let mut rng = rng(65);
        let mut zs: Vec<DMatrix<T>> = (0..8)
            .map(|_| random_f64(n, 1.0, &mut rng).map(T::of))
            .collect();
        zs[2][(3, 4)] = T::of(f64::NAN);
        zs[4][(0, 0)] = T::of(f64::INFINITY);
        let big = if T::NAME == "f64" { 1000.0 } else { 100.0 };
        zs[6] = DMatrix::identity(n, n) * T::of(big);
        let huge = if T::NAME == "f64" { 1e300 } else { 1e30 };
        zs[7] = random_f64(n, 1.0, &mut rng).map(|x| T::of(x * huge));
        use MatrixStatus::*;
        let expect = [
            Ok,
            Ok,
            NonFiniteInput,
            Ok,
            NonFiniteInput,
            Ok,
            Overflow,
            Overflow,
        ];
        let (st, eg, pg) = emu_expm_phi1(&zs, false, true);
        assert_eq!(st, expect, "{}", T::NAME);
        let gs: Vec<DMatrix<T>> = (0..8)
            .map(|_| random_f64(n, 1.0, &mut rng).map(T::of))
            .collect();
        let (st2, lg) = emu_phi1_adjoint(&zs, &gs, false, false);
        assert_eq!(st2, expect, "{} adjoint", T::NAME);
        for b in 0..8 {
            let cpu = elra::linalg::expm_phi1(&zs[b]);
            let cpu_adj = elra::linalg::phi1_frechet_adjoint(&zs[b], &gs[b]);
            match expect[b] {
                Ok => {
                    let (ec, pc) = cpu.unwrap();
                    assert!(bits_equal(&eg[b], &ec) && bits_equal(&pg[b], &pc), "#{b}");
                    assert!(bits_equal(&lg[b], &cpu_adj.unwrap()), "adjoint #{b}");
                }
                NonFiniteInput => {
                    assert!(
                        matches!(cpu, Err(ElraError::NonFinite { .. })),
                        "#{b}: {cpu:?}"
                    );
                    assert!(matches!(cpu_adj, Err(ElraError::NonFinite { .. })));
                }
                _ => {
                    assert!(
                        matches!(cpu, Err(ElraError::Overflow { .. })),
                        "#{b}: {cpu:?}"
                    );
                    assert!(
                        matches!(cpu_adj, Err(ElraError::Overflow { .. })),
                        "#{b}: {cpu_adj:?}"
                    );
                }
            }
            if expect[b] != Ok {
                assert!(eg[b]
                    .iter()
                    .chain(pg[b].iter())
                    .chain(lg[b].iter())
                    .all(|x| x.f64().is_nan()));
            }
        }
        // NaN only in the direction G
        let mut gs2 = gs.clone();
        gs2[3][(1, 1)] = T::of(f64::NAN);
        let (st3, _) = emu_phi1_adjoint(&zs, &gs2, true, true);
        assert_eq!(st3[3], NonFiniteInput);
    }
    run::<f64>();
    run::<f32>();
}

#[test]
fn cuda_kernels_emulated_on_cpu_adapter_grams_match_cpu() {
    emu_or_skip!();
    grams_suite::<f64>(&grams_emulated::<f64>, 71, false, "emulated");
    grams_suite::<f32>(&grams_emulated::<f32>, 72, false, "emulated");
    // statuses: NaN in A of adapter 1, −Inf in C of adapter 3, AᵀA overflowing in adapter 4
    let (batch, d, r) = (5, 33, 4);
    let mut rng = rng(73);
    let mut a_h: Vec<f32> = (0..batch * d * r)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut c_h: Vec<f32> = (0..batch * r * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    a_h[d * r + 7] = f32::NAN;
    c_h[3 * r * d + 2] = f32::NEG_INFINITY;
    for x in &mut a_h[4 * d * r..] {
        *x *= 1e25;
    }
    let (g, st) = grams_emulated(&a_h, &c_h, batch, d, r);
    use MatrixStatus::*;
    assert_eq!(st, [Ok, NonFiniteInput, Ok, NonFiniteInput, Overflow]);
    assert!(g[1].energy.is_nan() && g[3].z.iter().all(|x| x.is_nan()));
}
