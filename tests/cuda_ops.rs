//! The functional GPU calls `elra_gpu_op_*` (src/capi/gpu_ops.rs over `elra::cuda::ops`) on a
//! GPU (each test skips, printing why, without a device; the host-side argument checks are in
//! tests/cuda_ops_args.rs):
//!
//! * **Parity** with the CPU functional ABI `elra_op_*_f64` at the same inputs — activations
//!   rounded to the call's dtype, f32 parameters widened — in f32, bf16 and f16: the fused layer
//!   with the base and a bias, with the base alone and the increment alone, the output-side form,
//!   gradients written and accumulated, merge/unmerge on both sides and their round trip, the
//!   energy and its gradient.
//! * **Bad device arguments**: host pointers, short workspaces, overlaps, misalignment and a
//!   non-finite η are statuses, with the output untouched.
//! * **The overflow rule on request**: `elra_gpu_check_finite` sets its flag exactly when a CPU
//!   scan of the same values finds NaN or ±Inf, and never reads a strided matrix's padding.
//!
//! Tolerances (Frobenius-relative against the f64 CPU calls), as in tests/cuda_layer.rs: f32
//! ≤ 1e-5 (sums of at most max(N, d, k) ≤ 40 f32 products and the f32 φ1); f16/bf16 ≤ 2e-2 (one
//! rounding of each stored output and of the N×d inputs' products, at most three in sequence on
//! the longest path). `∂η` is measured against the Cauchy–Schwarz size of its terms
//! (tests/cuda_layer.rs `eta_err`: it is one inner product whose terms cancel); the energy, an
//! f32 sum of r² products of r×r Grams with signed off-diagonal terms, to 1e-4 relative.
#![allow(clippy::too_many_arguments)]
/// Only the device helpers of `tests/common/`.
#[macro_use]
mod common {
    #[macro_use]
    pub mod device;
}

use std::ffi::{c_char, c_void};
use std::ptr::{null, null_mut};

use elra::capi::*;
use elra::cuda::layer::{download_matrix, upload_matrix};
use elra::cuda::{Activation, CudaDevice, DeviceMatrices};
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use ElraStatus::*;

fn message() -> String {
    let mut buf = vec![0 as c_char; 512];
    // SAFETY: a live local buffer of 512 bytes.
    unsafe { elra_last_error_message(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: NUL-terminated within the buffer by the call.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn desc(variant: u32, d: usize, k: usize, r: usize) -> ElraOpDesc {
    ElraOpDesc { variant, d, k, r }
}

/// A step with α, the η multiplier and λ exact in f32 (the GPU takes them as f32), no clip.
fn step() -> ElraOpStep {
    ElraOpStep {
        alpha: 0.375,
        eta_mult: 0.875,
        tau: 0.0,
        lambda: 0.125,
    }
}

// ---------------------------------------------------------------------------------------------
// GPU parity against the CPU functional ABI
// ---------------------------------------------------------------------------------------------

fn rand_mat(rows: usize, cols: usize, scale: f64, g: &mut ChaCha8Rng) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |_, _| g.random_range(-1.0..1.0) * scale)
}

fn round_to<T: Activation>(m: &DMatrix<f64>) -> DMatrix<f64> {
    m.map(|x| T::from_f64(x).to_f64())
}

fn f32_exact(m: &DMatrix<f64>) -> DMatrix<f64> {
    m.map(|x| x as f32 as f64)
}

fn flat(m: &DMatrix<f64>) -> Vec<f64> {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect()
}

fn mat(v: &[f64], rows: usize, cols: usize) -> DMatrix<f64> {
    DMatrix::from_row_slice(rows, cols, &v[..rows * cols])
}

fn rel(g: &DMatrix<f64>, c: &DMatrix<f64>, what: &str) -> f64 {
    assert_eq!(g.shape(), c.shape(), "{what}: shape");
    assert!(
        g.iter().all(|x| x.is_finite()),
        "{what}: non-finite GPU output (unwritten poison or overflow)"
    );
    (g - c).norm() / c.norm().max(1e-300)
}

fn tol<T: Activation>() -> f64 {
    if T::DTYPE == "f32" {
        1e-5
    } else {
        2e-2
    }
}

/// `|gpu − ref|` over the Cauchy–Schwarz size of the terms of `∂η = ⟨C̄, C⟩/η`
/// (tests/cuda_layer.rs `eta_err`).
fn eta_err(gpu: f64, reference: f64, p: &Prob, da: &DMatrix<f64>, db: &DMatrix<f64>) -> f64 {
    let terms = da.norm() * p.a.norm()
        + if p.has_b() {
            db.norm() * p.b.norm()
        } else {
            0.0
        };
    let scale = reference.abs().max(terms / p.eta as f64);
    (gpu - reference).abs() / scale.max(1e-300)
}

/// One problem: activations rounded to the dtype, f32-exact parameters and starting gradients.
struct Prob {
    desc: ElraOpDesc,
    n: usize,
    x: DMatrix<f64>,
    w0: DMatrix<f64>,
    dy: DMatrix<f64>,
    u: DMatrix<f64>,
    bias: DMatrix<f64>,
    a: DMatrix<f64>,
    b: DMatrix<f64>,
    eta: f32,
    da0: DMatrix<f64>,
    db0: DMatrix<f64>,
    deta0: f64,
}

impl Prob {
    fn new<T: Activation>(
        variant: u32,
        (n, d, k, r): (usize, usize, usize, usize),
        seed: u64,
    ) -> Self {
        let mut g = ChaCha8Rng::seed_from_u64(seed);
        let act = |m: DMatrix<f64>| round_to::<T>(&m);
        Prob {
            desc: desc(variant, d, k, r),
            n,
            x: act(rand_mat(n, k, 1.0, &mut g)),
            w0: act(rand_mat(d, k, 1.0 / (k as f64).sqrt(), &mut g)),
            dy: act(rand_mat(n, d, 1.0, &mut g)),
            u: act(rand_mat(n, d, 1.0, &mut g)),
            bias: act(rand_mat(1, d, 1.0, &mut g)),
            a: f32_exact(&rand_mat(d, r, 1.0 / (d as f64).sqrt(), &mut g)),
            b: f32_exact(&rand_mat(r, d, 1.0 / (r as f64).sqrt(), &mut g)),
            eta: 0.7,
            da0: f32_exact(&rand_mat(d, r, 1.0, &mut g)),
            db0: f32_exact(&rand_mat(r, d, 1.0, &mut g)),
            deta0: 0.25,
        }
    }
    fn dims(&self) -> (usize, usize, usize, usize) {
        (self.n, self.desc.d, self.desc.k, self.desc.r)
    }
    fn has_b(&self) -> bool {
        self.desc.variant != 1
    }
}

/// CPU gradients (`∂A`, `∂B`, `∂η`) starting from zero or from the problem's `da0`, `db0`,
/// `deta0` (accumulate).
type Grads = (DMatrix<f64>, DMatrix<f64>, f64);

fn start_grads(p: &Prob, acc: bool) -> (Vec<f64>, Vec<f64>, f64) {
    if acc {
        (flat(&p.da0), flat(&p.db0), p.deta0)
    } else {
        (vec![0.0; p.a.len()], vec![0.0; p.b.len()], 0.0)
    }
}

fn ok(s: ElraStatus, what: &str) {
    assert_eq!(s, ELRA_OK, "{what}: {}", message());
}

/// The GPU side of a problem: its inputs uploaded, NaN-poisoned outputs, a workspace.
struct Gpu<'d, T: Activation> {
    dev: &'d CudaDevice,
    x: DeviceMatrices<T>,
    w0: DeviceMatrices<T>,
    dy: DeviceMatrices<T>,
    u: DeviceMatrices<T>,
    bias: DeviceMatrices<T>,
    a: DeviceMatrices<f32>,
    b: DeviceMatrices<f32>,
    /// η, a device scalar.
    eta: DeviceMatrices<f32>,
    saved: DeviceMatrices<f32>,
    ws: DeviceMatrices<f32>,
    ws_len: usize,
}

fn ptr<E: elra::cuda::DeviceScalar>(m: &DeviceMatrices<E>) -> *mut c_void {
    m.device_addr() as *mut c_void
}

fn fptr(m: &DeviceMatrices<f32>) -> *mut f32 {
    m.device_addr() as *mut f32
}

fn nan<E: Activation>(dev: &CudaDevice, rows: usize, cols: usize) -> DeviceMatrices<E> {
    DeviceMatrices::filled(dev, 1, rows, cols, E::from_f64(f64::NAN)).unwrap()
}

fn down<E: Activation>(dev: &CudaDevice, m: &DeviceMatrices<E>) -> DMatrix<f64> {
    download_matrix(dev, m).unwrap()
}

impl<'d, T: Activation> Gpu<'d, T> {
    fn new(dev: &'d CudaDevice, p: &Prob) -> Self {
        let (n, _, _, r) = p.dims();
        let (mut sl, mut wl) = (0, 0);
        // SAFETY: live locals.
        ok(
            unsafe { elra_gpu_op_sizes(&p.desc, n, &mut sl, &mut wl) },
            "sizes",
        );
        assert_eq!(sl, n * r + 2 * r * r);
        Gpu {
            dev,
            x: upload_matrix(dev, &p.x).unwrap(),
            w0: upload_matrix(dev, &p.w0).unwrap(),
            dy: upload_matrix(dev, &p.dy).unwrap(),
            u: upload_matrix(dev, &p.u).unwrap(),
            bias: upload_matrix(dev, &p.bias).unwrap(),
            a: upload_matrix(dev, &p.a).unwrap(),
            b: upload_matrix(dev, &p.b).unwrap(),
            eta: upload_matrix(dev, &DMatrix::from_element(1, 1, p.eta as f64)).unwrap(),
            saved: nan(dev, 1, sl),
            ws: nan(dev, 1, wl),
            ws_len: wl,
        }
    }

    fn dtype() -> u32 {
        match T::DTYPE {
            "f32" => 0,
            "f16" => 2,
            _ => 3,
        }
    }

    /// Gradient buffers: NaN (overwrite) or the problem's starting values (accumulate).
    fn grads(&self, p: &Prob, acc: bool) -> [DeviceMatrices<f32>; 3] {
        let (d, r) = (p.desc.d, p.desc.r);
        if acc {
            [
                upload_matrix(self.dev, &p.da0).unwrap(),
                upload_matrix(self.dev, &p.db0).unwrap(),
                upload_matrix(self.dev, &DMatrix::from_element(1, 1, p.deta0)).unwrap(),
            ]
        } else {
            [
                nan(self.dev, d, r),
                nan(self.dev, r, d),
                nan(self.dev, 1, 1),
            ]
        }
    }

    fn read_grads(&self, g: &[DeviceMatrices<f32>; 3]) -> Grads {
        (
            down(self.dev, &g[0]),
            down(self.dev, &g[1]),
            down(self.dev, &g[2])[(0, 0)],
        )
    }
}

/// Checks GPU gradients against the CPU's; `label` names the case.
fn check_grads<T: Activation>(p: &Prob, gpu: &Grads, cpu: &Grads, label: &str) {
    let e = rel(&gpu.0, &cpu.0, label);
    assert!(e <= tol::<T>(), "{label}: ∂A {e:.2e}");
    if p.has_b() {
        let e = rel(&gpu.1, &cpu.1, label);
        assert!(e <= tol::<T>(), "{label}: ∂B {e:.2e}");
    }
    let e = eta_err(gpu.2, cpu.2, p, &cpu.0, &cpu.1);
    assert!(
        e <= tol::<T>(),
        "{label}: ∂η {e:.2e} ({} vs {})",
        gpu.2,
        cpu.2
    );
}

/// The fused layer (base + bias, base, increment) forward and backward, gradients written and
/// accumulated, on a caller stream of its own.
fn fused_case<T: Activation>(dev: &CudaDevice, p: &Prob, label: &str) {
    let (n, d, k, r) = p.dims();
    let st = step();
    let caller = dev.context().new_stream().unwrap();
    let stream = caller.cu_stream() as *mut c_void;
    for (base, with_bias) in [(1u32, true), (1, false), (0, false)] {
        // CPU (f64 ABI).
        let (w0, x, a, b, dy, bias) = (
            flat(&p.w0),
            flat(&p.x),
            flat(&p.a),
            flat(&p.b),
            flat(&p.dy),
            flat(&p.bias),
        );
        let (mut sl, mut wl) = (0, 0);
        // SAFETY: live locals.
        ok(
            unsafe { elra_op_sizes(&p.desc, n, &mut sl, &mut wl) },
            "cpu sizes",
        );
        let (mut y, mut saved, mut ws) = (vec![0.0; n * d], vec![0.0; sl], vec![0.0; wl]);
        let bias_p = if with_bias { bias.as_ptr() } else { null() };
        // SAFETY: every buffer is a live local of the described size.
        ok(
            unsafe {
                elra_op_forward_f64(
                    &p.desc,
                    &st,
                    n,
                    w0.as_ptr(),
                    k,
                    base,
                    bias_p,
                    a.as_ptr(),
                    r,
                    b.as_ptr(),
                    d,
                    p.eta as f64,
                    x.as_ptr(),
                    k,
                    null(),
                    y.as_mut_ptr(),
                    d,
                    saved.as_mut_ptr(),
                    ws.as_mut_ptr(),
                    wl,
                )
            },
            "cpu forward",
        );
        // GPU.
        let g = Gpu::<T>::new(dev, p);
        let gy = nan::<T>(dev, n, d);
        let gbias = if with_bias { ptr(&g.bias) } else { null_mut() };
        // SAFETY: device buffers of the described shapes, alive until the stream is synchronised.
        ok(
            unsafe {
                elra_gpu_op_forward(
                    &p.desc,
                    &st,
                    Gpu::<T>::dtype(),
                    n,
                    ptr(&g.w0),
                    k,
                    base,
                    gbias,
                    fptr(&g.a),
                    r,
                    fptr(&g.b),
                    d,
                    fptr(&g.eta),
                    ptr(&g.x),
                    k,
                    ptr(&gy),
                    d,
                    fptr(&g.saved),
                    fptr(&g.ws),
                    g.ws_len,
                    stream,
                )
            },
            label,
        );
        let lab = format!("{label} base={base} bias={with_bias}");
        let e = rel(&down(dev, &gy), &mat(&y, n, d), &lab);
        assert!(e <= tol::<T>(), "{lab}: y {e:.2e}");
        // The saved V = X Pᵀ (f32 from the same rounded inputs in every dtype).
        let gs = down(dev, &g.saved);
        let e = rel(&mat(&flat(&gs), n, r), &mat(&saved, n, r), &lab);
        assert!(e <= 1e-4, "{lab}: saved V {e:.2e}");
        for acc in [0u32, 1] {
            let (mut da, mut db, mut deta) = start_grads(p, acc == 1);
            let mut dx = vec![0.0; n * k];
            // SAFETY: as above.
            ok(
                unsafe {
                    elra_op_backward_f64(
                        &p.desc,
                        &st,
                        n,
                        w0.as_ptr(),
                        k,
                        base,
                        a.as_ptr(),
                        r,
                        b.as_ptr(),
                        d,
                        p.eta as f64,
                        x.as_ptr(),
                        k,
                        null(),
                        saved.as_ptr(),
                        dy.as_ptr(),
                        d,
                        dx.as_mut_ptr(),
                        k,
                        da.as_mut_ptr(),
                        r,
                        db.as_mut_ptr(),
                        d,
                        &mut deta,
                        acc,
                        ws.as_mut_ptr(),
                        wl,
                    )
                },
                "cpu backward",
            );
            let cpu: Grads = (mat(&da, d, r), mat(&db, r, d), deta);
            let gdx = nan::<T>(dev, n, k);
            let gg = g.grads(p, acc == 1);
            // SAFETY: as above.
            ok(
                unsafe {
                    elra_gpu_op_backward(
                        &p.desc,
                        &st,
                        Gpu::<T>::dtype(),
                        n,
                        ptr(&g.w0),
                        k,
                        base,
                        fptr(&g.a),
                        r,
                        fptr(&g.b),
                        d,
                        fptr(&g.eta),
                        ptr(&g.x),
                        k,
                        fptr(&g.saved),
                        ptr(&g.dy),
                        d,
                        ptr(&gdx),
                        k,
                        fptr(&gg[0]),
                        r,
                        fptr(&gg[1]),
                        d,
                        fptr(&gg[2]),
                        acc,
                        fptr(&g.ws),
                        g.ws_len,
                        stream,
                    )
                },
                &lab,
            );
            let lab = format!("{lab} acc={acc}");
            let e = rel(&down(dev, &gdx), &mat(&dx, n, k), &lab);
            assert!(e <= tol::<T>(), "{lab}: dx {e:.2e}");
            check_grads::<T>(p, &g.read_grads(&gg), &cpu, &lab);
        }
    }
}

/// The output-side form forward and backward, gradients written and accumulated.
fn out_case<T: Activation>(dev: &CudaDevice, p: &Prob, label: &str) {
    let (n, d, _, r) = p.dims();
    let st = step();
    let (a, b, dy, u) = (flat(&p.a), flat(&p.b), flat(&p.dy), flat(&p.u));
    let (mut sl, mut wl) = (0, 0);
    // SAFETY: live locals.
    ok(
        unsafe { elra_op_sizes(&p.desc, n, &mut sl, &mut wl) },
        "cpu sizes",
    );
    let (mut y, mut saved, mut ws) = (vec![0.0; n * d], vec![0.0; sl], vec![0.0; wl]);
    // SAFETY: live locals of the described sizes.
    ok(
        unsafe {
            elra_op_forward_out_f64(
                &p.desc,
                &st,
                n,
                a.as_ptr(),
                r,
                b.as_ptr(),
                d,
                p.eta as f64,
                u.as_ptr(),
                d,
                null(),
                y.as_mut_ptr(),
                d,
                saved.as_mut_ptr(),
                ws.as_mut_ptr(),
                wl,
            )
        },
        "cpu forward_out",
    );
    let g = Gpu::<T>::new(dev, p);
    let gy = nan::<T>(dev, n, d);
    // SAFETY: device buffers of the described shapes; NULL stream.
    ok(
        unsafe {
            elra_gpu_op_forward_out(
                &p.desc,
                &st,
                Gpu::<T>::dtype(),
                n,
                fptr(&g.a),
                r,
                fptr(&g.b),
                d,
                fptr(&g.eta),
                ptr(&g.u),
                d,
                ptr(&gy),
                d,
                fptr(&g.saved),
                fptr(&g.ws),
                g.ws_len,
                null_mut(),
            )
        },
        label,
    );
    let e = rel(&down(dev, &gy), &mat(&y, n, d), label);
    assert!(e <= tol::<T>(), "{label}: y {e:.2e}");
    for acc in [0u32, 1] {
        let (mut da, mut db, mut deta) = start_grads(p, acc == 1);
        let mut du = vec![0.0; n * d];
        // SAFETY: live locals.
        ok(
            unsafe {
                elra_op_backward_out_f64(
                    &p.desc,
                    &st,
                    n,
                    a.as_ptr(),
                    r,
                    b.as_ptr(),
                    d,
                    p.eta as f64,
                    u.as_ptr(),
                    d,
                    null(),
                    saved.as_ptr(),
                    dy.as_ptr(),
                    d,
                    du.as_mut_ptr(),
                    d,
                    da.as_mut_ptr(),
                    r,
                    db.as_mut_ptr(),
                    d,
                    &mut deta,
                    acc,
                    ws.as_mut_ptr(),
                    wl,
                )
            },
            "cpu backward_out",
        );
        let cpu: Grads = (mat(&da, d, r), mat(&db, r, d), deta);
        let gdu = nan::<T>(dev, n, d);
        let gg = g.grads(p, acc == 1);
        // SAFETY: device buffers of the described shapes.
        ok(
            unsafe {
                elra_gpu_op_backward_out(
                    &p.desc,
                    &st,
                    Gpu::<T>::dtype(),
                    n,
                    fptr(&g.a),
                    r,
                    fptr(&g.b),
                    d,
                    fptr(&g.eta),
                    ptr(&g.u),
                    d,
                    fptr(&g.saved),
                    ptr(&g.dy),
                    d,
                    ptr(&gdu),
                    d,
                    fptr(&gg[0]),
                    r,
                    fptr(&gg[1]),
                    d,
                    fptr(&gg[2]),
                    acc,
                    fptr(&g.ws),
                    g.ws_len,
                    null_mut(),
                )
            },
            label,
        );
        let lab = format!("{label} out-form acc={acc}");
        let e = rel(&down(dev, &gdu), &mat(&du, n, d), &lab);
        assert!(e <= tol::<T>(), "{lab}: du {e:.2e}");
        check_grads::<T>(p, &g.read_grads(&gg), &cpu, &lab);
    }
}

/// Merge and unmerge on both sides against the CPU, the round trip, and the energy with and
/// without its gradient.
fn merge_energy_case<T: Activation>(dev: &CudaDevice, p: &Prob, label: &str) {
    let (_, d, k, r) = p.dims();
    let st = step();
    let (a, b) = (flat(&p.a), flat(&p.b));
    let g = Gpu::<T>::new(dev, p);
    for right in [0u32, 1] {
        let w = if right == 1 {
            p.w0.transpose()
        } else {
            p.w0.clone()
        };
        let (rows, cols) = w.shape();
        let gw = upload_matrix::<T>(dev, &w).unwrap();
        let mut outs = Vec::new();
        for inverse in [0u32, 1] {
            let wf = flat(&w);
            let mut out = vec![0.0; rows * cols];
            // SAFETY: live locals.
            ok(
                unsafe {
                    elra_op_merge_f64(
                        &p.desc,
                        &st,
                        a.as_ptr(),
                        r,
                        b.as_ptr(),
                        d,
                        p.eta as f64,
                        wf.as_ptr(),
                        cols,
                        inverse,
                        right,
                        out.as_mut_ptr(),
                        cols,
                    )
                },
                "cpu merge",
            );
            let gout = nan::<T>(dev, rows, cols);
            // SAFETY: device buffers of the described shapes.
            ok(
                unsafe {
                    elra_gpu_op_merge(
                        &p.desc,
                        &st,
                        Gpu::<T>::dtype(),
                        fptr(&g.a),
                        r,
                        fptr(&g.b),
                        d,
                        fptr(&g.eta),
                        ptr(&gw),
                        cols,
                        inverse,
                        right,
                        ptr(&gout),
                        cols,
                        fptr(&g.ws),
                        g.ws_len,
                        null_mut(),
                    )
                },
                label,
            );
            let lab = format!("{label} merge right={right} inverse={inverse}");
            let e = rel(&down(dev, &gout), &mat(&out, rows, cols), &lab);
            assert!(e <= tol::<T>(), "{lab}: {e:.2e}");
            outs.push(gout);
        }
        // Round trip: unmerge(merge(W)) = W (Prop. 3).
        let back = nan::<T>(dev, rows, cols);
        // SAFETY: device buffers of the described shapes.
        ok(
            unsafe {
                elra_gpu_op_merge(
                    &p.desc,
                    &st,
                    Gpu::<T>::dtype(),
                    fptr(&g.a),
                    r,
                    fptr(&g.b),
                    d,
                    fptr(&g.eta),
                    ptr(&outs[0]),
                    cols,
                    1,
                    right,
                    ptr(&back),
                    cols,
                    fptr(&g.ws),
                    g.ws_len,
                    null_mut(),
                )
            },
            label,
        );
        let e = rel(&down(dev, &back), &w, label);
        assert!(
            e <= 2.0 * tol::<T>(),
            "{label} right={right}: round trip {e:.2e}"
        );
    }
    for grads in [None, Some(0u32), Some(1)] {
        let acc = grads.unwrap_or(0);
        let (mut da, mut db, mut deta) = start_grads(p, acc == 1);
        let mut e_cpu = 0.0;
        let (dap, dbp, dep) = match grads {
            Some(_) => (da.as_mut_ptr(), db.as_mut_ptr(), &mut deta as *mut f64),
            None => (null_mut(), null_mut(), null_mut()),
        };
        // SAFETY: live locals (or NULL gradients).
        ok(
            unsafe {
                elra_op_energy_f64(
                    &p.desc,
                    &st,
                    a.as_ptr(),
                    r,
                    b.as_ptr(),
                    d,
                    p.eta as f64,
                    &mut e_cpu,
                    dap,
                    r,
                    dbp,
                    d,
                    dep,
                    acc,
                )
            },
            "cpu energy",
        );
        let ge = nan::<f32>(dev, 1, 1);
        let gg = g.grads(p, acc == 1);
        let (gda, gdb, gde) = match grads {
            Some(_) => (fptr(&gg[0]), fptr(&gg[1]), fptr(&gg[2])),
            None => (null_mut(), null_mut(), null_mut()),
        };
        // SAFETY: device buffers of the described shapes.
        ok(
            unsafe {
                elra_gpu_op_energy(
                    &p.desc,
                    &st,
                    fptr(&g.a),
                    r,
                    fptr(&g.b),
                    d,
                    fptr(&g.eta),
                    fptr(&ge),
                    gda,
                    r,
                    gdb,
                    d,
                    gde,
                    acc,
                    fptr(&g.ws),
                    g.ws_len,
                    null_mut(),
                )
            },
            label,
        );
        let lab = format!("{label} energy grads={grads:?}");
        let e_gpu = down(dev, &ge)[(0, 0)];
        assert!(
            (e_gpu - e_cpu).abs() <= 1e-4 * e_cpu.abs(),
            "{lab}: {e_gpu} vs {e_cpu}"
        );
        if grads.is_some() {
            let cpu: Grads = (mat(&da, d, r), mat(&db, r, d), deta);
            check_grads::<f32>(p, &g.read_grads(&gg), &cpu, &lab);
        }
    }
    let _ = k;
}

/// (n, d, k, r): a ragged batch, d ≠ k (the right merge's k×d weight), and r = 16 (a genuine
/// φ1 of a 16×16 core).
const SHAPES: [(usize, usize, usize, usize); 2] = [(37, 24, 20, 4), (9, 32, 40, 16)];

fn suite<T: Activation>(dev: &CudaDevice, seed: u64) {
    for (si, &shape) in SHAPES.iter().enumerate() {
        for variant in [0u32, 1, 2] {
            let p = Prob::new::<T>(variant, shape, seed + 10 * si as u64 + variant as u64);
            let label = format!("{} variant={variant} {shape:?}", T::DTYPE);
            fused_case::<T>(dev, &p, &label);
            out_case::<T>(dev, &p, &label);
            merge_energy_case::<T>(dev, &p, &label);
        }
    }
}

#[test]
fn gpu_ops_f32_match_the_cpu_functional_abi() {
    let dev = device_or_skip!();
    suite::<f32>(&dev, 100);
}

#[test]
fn gpu_ops_bf16_match_the_cpu_functional_abi() {
    let dev = device_or_skip!();
    suite::<half::bf16>(&dev, 200);
}

#[test]
fn gpu_ops_f16_match_the_cpu_functional_abi() {
    let dev = device_or_skip!();
    suite::<half::f16>(&dev, 300);
}

/// Bad device arguments on a GPU: host memory, a short workspace, overlapping and misaligned
/// buffers are statuses, and the output stays untouched (NaN poison).
#[test]
fn gpu_ops_bad_device_arguments_are_statuses() {
    let dev = device_or_skip!();
    let p = Prob::new::<f32>(0, (5, 8, 6, 2), 900);
    let (n, d, k, r) = p.dims();
    let st = step();
    let g = Gpu::<f32>::new(&dev, &p);
    let gy = nan::<f32>(&dev, n, d);
    let host_a = vec![0.5f32; d * r];
    let host_x = vec![0.5f32; n * k];
    let fwd = |a: *const f32, x: *const c_void, y: *mut c_void, wsl: usize, eta: *const f32| {
        // SAFETY: device buffers of the described shapes (or host memory, the checked case).
        unsafe {
            elra_gpu_op_forward(
                &p.desc,
                &st,
                0,
                n,
                ptr(&g.w0),
                k,
                1,
                null(),
                a,
                r,
                fptr(&g.b),
                d,
                eta,
                x,
                k,
                y,
                d,
                fptr(&g.saved),
                fptr(&g.ws),
                wsl,
                null_mut(),
            )
        }
    };
    let (ga, gx, y) = (fptr(&g.a).cast_const(), ptr(&g.x).cast_const(), ptr(&gy));
    let hx: *const c_void = host_x.as_ptr().cast();
    let host_eta = [0.7f32];
    let ge = fptr(&g.eta).cast_const();
    type Case<'a> = (Box<dyn Fn() -> ElraStatus + 'a>, &'static str);
    let cases: Vec<Case> = vec![
        (
            Box::new(|| fwd(host_a.as_ptr(), gx, y, g.ws_len, ge)),
            "device memory",
        ),
        (Box::new(|| fwd(ga, hx, y, g.ws_len, ge)), "device memory"),
        (
            Box::new(|| fwd(ga, gx, y, g.ws_len - 1, ge)),
            "workspace_len",
        ),
        (
            Box::new(|| fwd(ga, gx, gx.cast_mut(), g.ws_len, ge)),
            "overlaps",
        ),
        (
            Box::new(|| fwd(ga, gx.wrapping_byte_add(2), y, g.ws_len, ge)),
            "aligned",
        ),
        (
            Box::new(|| fwd(ga, gx, y, g.ws_len, host_eta.as_ptr())),
            "device memory",
        ),
        (
            Box::new(|| fwd(ga, gx, y, g.ws_len, ge.wrapping_byte_add(2))),
            "aligned",
        ),
    ];
    for (i, (call, needle)) in cases.iter().enumerate() {
        assert_eq!(call(), ELRA_INVALID_ARGUMENT, "case {i}: {}", message());
        assert!(
            message().contains(needle),
            "case {i}: `{}` should mention `{needle}`",
            message()
        );
    }
    assert!(
        down(&dev, &gy).iter().all(|v| v.is_nan()),
        "y written by a failed call"
    );
    // A valid call succeeds on the same buffers.
    ok(fwd(ga, gx, y, g.ws_len, ge), "valid forward");
    assert!(down(&dev, &gy).iter().all(|v| v.is_finite()));
}

// ---------------------------------------------------------------------------------------------
// The overflow rule on the GPU: elra_gpu_check_finite against a CPU scan
// ---------------------------------------------------------------------------------------------

/// `(smallest subnormal, largest finite)` of `T`: finite values the scan must accept.
fn extremes<T: Activation>() -> (f64, f64) {
    match T::DTYPE {
        "f32" => (f32::from_bits(1) as f64, f32::MAX as f64),
        "f16" => (half::f16::from_bits(1).to_f64(), half::f16::MAX.to_f64()),
        _ => (half::bf16::from_bits(1).to_f64(), half::bf16::MAX.to_f64()),
    }
}

/// One dtype: strided matrices (rows × cols inside rows × ld storage whose padding holds NaN,
/// which must not be read), clean ones with ±0, subnormals and the largest finite values, and one
/// NaN, +Inf or −Inf at the first, the last or a middle entry. Shapes cover one entry, contiguous
/// (scanned as one row), ragged strided rows and rows longer than one block's chunk (2048
/// columns of f16/bf16). The flag starts at 2: the call ORs 1 in and never clears a bit. The
/// Rust form `elra::cuda::ops::check_finite` agrees on the contiguous matrices.
fn check_finite_suite<T: Activation>(dev: &CudaDevice) {
    use cudarc::driver::DevicePtr;
    let mut g = ChaCha8Rng::seed_from_u64(950);
    let (tiny, huge) = extremes::<T>();
    let shapes = [
        (1, 1, 1),
        (37, 24, 24),
        (9, 40, 43),
        (300, 2050, 2056),
        (3, 5000, 5000),
    ];
    for (rows, cols, ld) in shapes {
        let len = rows * cols;
        for (at, bad) in [
            (None, 0.0),
            (Some(0), f64::INFINITY),
            (Some(len - 1), f64::NAN),
            (Some(len / 2), f64::NEG_INFINITY),
        ] {
            let mut host = round_to::<T>(&rand_mat(rows, ld, 1.0, &mut g));
            for (i, s) in [0.0, -0.0, tiny, -tiny, huge, -huge]
                .into_iter()
                .enumerate()
            {
                let j = (i * 7 + 3) % len;
                host[(j / cols, j % cols)] = s;
            }
            if let Some(j) = at {
                host[(j / cols, j % cols)] = bad;
            }
            for i in 0..rows {
                for j in cols..ld {
                    host[(i, j)] = f64::NAN;
                }
            }
            let cpu = (0..rows).any(|i| (0..cols).any(|j| !host[(i, j)].is_finite()));
            assert_eq!(cpu, at.is_some());
            let label = format!("{} {rows}×{cols} ld={ld} bad at {at:?}", T::DTYPE);
            let m = upload_matrix::<T>(dev, &host).unwrap();
            let flag = dev.stream().clone_htod(&[2u32]).unwrap();
            let (fp, guard) = flag.device_ptr(dev.stream());
            // SAFETY: `m` holds rows × ld entries of T and `flag` one u32 on the device, both
            // alive until the stream is synchronised below.
            let s = unsafe {
                elra_gpu_check_finite(
                    Gpu::<T>::dtype(),
                    ptr(&m),
                    rows,
                    cols,
                    ld,
                    fp as *mut u32,
                    null_mut(),
                )
            };
            drop(guard);
            ok(s, &label);
            dev.synchronize().unwrap();
            let got = dev.stream().clone_dtoh(&flag).unwrap();
            dev.synchronize().unwrap();
            assert_eq!(got, vec![2 | u32::from(cpu)], "{label}");
            if ld == cols {
                let mut flag = dev.stream().alloc_zeros::<u32>(1).unwrap();
                elra::cuda::ops::check_finite(dev, &m, &mut flag).unwrap();
                let got = dev.stream().clone_dtoh(&flag).unwrap();
                dev.synchronize().unwrap();
                assert_eq!(got, vec![u32::from(cpu)], "{label} (Rust API)");
            }
        }
    }
}

#[test]
fn gpu_check_finite_matches_a_cpu_scan() {
    let dev = device_or_skip!();
    check_finite_suite::<f32>(&dev);
    check_finite_suite::<half::bf16>(&dev);
    check_finite_suite::<half::f16>(&dev);
}

/// The multi-adapter forward on the GPU (`elra_gpu_op_multi_forward`) against the CPU's
/// `elra::ops::multi_forward` in f64 at the same (rounded) inputs: 11 adapters (ELRA general,
/// PSD, Hyb at their own steps, LoRA; ranks 1–8; one without rows), rows in a random order with
/// −1 rows, a bias; a row with an index outside the set comes back as NaN. Tolerances as the
/// other parity tests.
fn multi_case<T: Activation>(dev: &CudaDevice, seed: u64, label: &str) {
    use elra::adapter::Variant;
    use elra::grad::ops::{Op, Strided, StridedMut};
    use elra::ops::{multi_forward, multi_workspace_len, Generator, MultiAdapter};
    let mut g = ChaCha8Rng::seed_from_u64(seed);
    let (n, d, k, count) = (150usize, 40usize, 36usize, 11usize);
    let w0 = round_to::<T>(&rand_mat(d, k, 0.3, &mut g));
    let x = round_to::<T>(&rand_mat(n, k, 1.0, &mut g));
    let bias = round_to::<T>(&rand_mat(1, d, 0.1, &mut g));
    let mut index: Vec<i32> = (0..n).map(|_| g.random_range(-1..count as i32)).collect();
    for v in index.iter_mut() {
        if *v == 6 {
            *v = 0; // adapter 6 gets no rows
        }
    }
    // (variant value, r, A, B, η, step); LoRA: (3, r, lora_A, lora_B, s, -)
    struct Ad {
        v: u32,
        r: usize,
        a: DMatrix<f64>,
        b: Option<DMatrix<f64>>,
        eta: f64,
        step: ElraOpStep,
    }
    let ads: Vec<Ad> = (0..count)
        .map(|i| {
            let v = (i % 4) as u32;
            let r = 1 + (i * 3) % 8;
            let st = ElraOpStep {
                alpha: [0.0, 1.0, 0.625, 0.0][i % 4],
                eta_mult: 0.875,
                tau: 0.0,
                lambda: 0.0,
            };
            if v == 3 {
                Ad {
                    v,
                    r,
                    a: f32_exact(&rand_mat(r, k, 0.3, &mut g)),
                    b: Some(f32_exact(&rand_mat(d, r, 0.3, &mut g))),
                    eta: 0.75,
                    step: st,
                }
            } else {
                Ad {
                    v,
                    r,
                    a: f32_exact(&rand_mat(d, r, 0.4, &mut g)),
                    b: (v != 1).then(|| f32_exact(&rand_mat(r, d, 0.4, &mut g))),
                    eta: 0.5,
                    step: st,
                }
            }
        })
        .collect();
    // CPU reference in f64.
    let variant = |v: u32| [Variant::General, Variant::Psd, Variant::Hyb][v as usize];
    let set: Vec<MultiAdapter<'_, f64>> = ads
        .iter()
        .map(|ad| {
            if ad.v == 3 {
                MultiAdapter::Lora {
                    a: Strided::of(&ad.a, Op::N),
                    b: Strided::of(ad.b.as_ref().unwrap(), Op::N),
                    scale: ad.eta,
                }
            } else {
                MultiAdapter::Elra {
                    variant: variant(ad.v),
                    generator: Generator {
                        a: Strided::of(&ad.a, Op::N),
                        b: ad.b.as_ref().map(|b| Strided::of(b, Op::N)),
                        eta: ad.eta,
                    },
                    spec: elra::adapter::GeneratorSpec {
                        alpha: ad.step.alpha,
                        eta_mult: ad.step.eta_mult,
                        tau: None,
                        lambda: 0.0,
                    },
                }
            }
        })
        .collect();
    let mut want = DMatrix::zeros(n, d);
    let mut ws = vec![0.0; multi_workspace_len(n, d, k, 8).unwrap()];
    let bias_v: Vec<f64> = bias.iter().copied().collect();
    multi_forward(
        Strided::of(&w0, Op::N),
        Some(&bias_v),
        &set,
        &index,
        Strided::of(&x, Op::N),
        &mut StridedMut::of(&mut want),
        &mut ws,
    )
    .unwrap();
    // GPU.
    let up = |m: &DMatrix<f64>| upload_matrix::<f32>(dev, m).unwrap();
    let dev_a: Vec<DeviceMatrices<f32>> = ads.iter().map(|ad| up(&ad.a)).collect();
    let dev_b: Vec<Option<DeviceMatrices<f32>>> =
        ads.iter().map(|ad| ad.b.as_ref().map(up)).collect();
    let dev_eta: Vec<DeviceMatrices<f32>> = ads
        .iter()
        .map(|ad| up(&DMatrix::from_element(1, 1, ad.eta)))
        .collect();
    let descs: Vec<ElraGpuMultiAdapter> = (0..count)
        .map(|i| ElraGpuMultiAdapter {
            variant: ads[i].v,
            r: ads[i].r,
            a: fptr(&dev_a[i]),
            ld_a: dev_a[i].cols(),
            b: dev_b[i].as_ref().map_or(null(), |b| fptr(b).cast_const()),
            ld_b: dev_b[i].as_ref().map_or(0, |b| b.cols()),
            eta: fptr(&dev_eta[i]),
            scale: ads[i].eta as f32,
            step: ads[i].step,
        })
        .collect();
    let (w0_d, x_d, bias_d) = (
        upload_matrix::<T>(dev, &w0).unwrap(),
        upload_matrix::<T>(dev, &x).unwrap(),
        upload_matrix::<T>(dev, &bias).unwrap(),
    );
    let y_d = nan::<T>(dev, n, d);
    let mut wl = 0;
    // SAFETY: live locals.
    ok(
        unsafe { elra_gpu_op_multi_sizes(descs.as_ptr(), count, n, d, &mut wl) },
        "multi sizes",
    );
    let ws_d = DeviceMatrices::<f32>::zeros(dev, 1, 1, wl).unwrap();
    let run = |index: &[i32]| {
        let bits: Vec<f32> = index.iter().map(|&i| f32::from_bits(i as u32)).collect();
        let idx_d = DeviceMatrices::<f32>::from_row_major(dev, 1, 1, n, &bits).unwrap();
        // SAFETY: device buffers of the described shapes, alive until the synchronise below.
        let s = unsafe {
            elra_gpu_op_multi_forward(
                Gpu::<T>::dtype(),
                descs.as_ptr(),
                count,
                fptr(&idx_d).cast::<i32>(),
                n,
                ptr(&w0_d),
                k,
                d,
                k,
                ptr(&bias_d),
                ptr(&x_d),
                k,
                ptr(&y_d),
                d,
                fptr(&ws_d),
                wl,
                null_mut(),
            )
        };
        ok(s, "multi forward");
        dev.synchronize().unwrap();
        down(dev, &y_d)
    };
    let got = run(&index);
    let e = rel(&got, &want, "multi y");
    assert!(e <= tol::<T>(), "{label}: multi forward {e:.2e}");
    let mut bad = index.clone();
    bad[7] = count as i32;
    let got = run(&bad);
    assert!(
        got.row(7).iter().all(|v| v.is_nan()),
        "{label}: bad index row"
    );
    assert!(got
        .iter()
        .enumerate()
        .all(|(e, v)| e % n == 7 || v.is_finite()));
}

#[test]
fn gpu_multi_forward_matches_the_cpu() {
    let dev = device_or_skip!();
    multi_case::<f32>(&dev, 91, "f32");
    multi_case::<half::bf16>(&dev, 92, "bf16");
}
