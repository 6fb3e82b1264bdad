//! The functional ELRA operations of [`crate::ops`] on the GPU: stateless calls on memory the
//! caller owns — parameters, activations, gradients, saved values and workspace — that enqueue
//! kernels on the device's stream and return without waiting (what an engine links to train with
//! ELRA while it owns every buffer). Nothing is allocated and nothing is kept between calls.
//!
//! | call | computes (module docs of [`crate::ops`]) |
//! |---|---|
//! | [`forward`] | the fused layer `Y = X W0ᵀ + 1 biasᵀ + ((X Pᵀ) Mᵀ) Aᵀ` (eq. 5 with `P = C W0`, Prop. 1), or only the increment ([`GpuBase::Excluded`]); saves `V = X Pᵀ`, `Z = C A`, `M = φ1(Z)` |
//! | [`backward`] | its reverse mode: `∂X = ∂Y W0 + V̄ P` (or `V̄ P`), `∂A`, `∂B`, `∂η` from `T̄ = Ȳ A`, `V̄ = T̄ M`, `Ā = Ȳᵀ T`, `M̄ = T̄ᵀ V`, `C̄ = (V̄ᵀ X) W0ᵀ`, `Z̄ = L_φ1(Zᵀ, M̄)` and the chain through eq. (19) |
//! | [`forward_out`], [`backward_out`] | the output-side form `y = u + ((u Cᵀ) Mᵀ) Aᵀ` on a base layer's output `u`, and `∂u = ∂Y + V̄ C` with the parameter gradients (`C̄ = V̄ᵀ u`) |
//! | [`merge`] | `exp(±G) W = W ± A (φ1(±Z) (C W))` (eq. 30; Prop. 3 for the inverse) or `W exp(±G)` (App. B eq. 22) |
//! | [`energy`] | `λ‖G‖²_F = λ tr((AᵀA)(CCᵀ))` (eq. 20–21) into a device scalar, with its gradient |
//! | [`check_finite`] | the overflow rule on request: ORs 1 into a device flag when a buffer holds NaN or ±Inf |
//! | [`multi_forward`] | many adapters of one layer in one batch ([`crate::ops::multi_forward`]): the frozen GEMM once, the rows grouped by adapter on the device (`multi.rs`) |
//!
//! # Types and memory
//! Activations, `W0`, the bias and merged weights have the activation type `T` ([`Activation`]:
//! f32, f16, bf16; f16/bf16 GEMMs and passes accumulate in f32); `A` (d×r), `B` (r×d), the
//! gradients, `saved` and `workspace` are f32 device buffers; η, α, the η multiplier and λ are
//! host values of the step (η as the CPU calls take it, `GeneratorSpec` from
//! [`crate::adapter::GeneratorConfig::spec_at`]); `∂η` and the energy are written to device
//! scalars. Every buffer is a [`DeviceMatrices`] of one row-major matrix on the call's device; the
//! C ABI (`elra_gpu_op_*`) lends caller pointers as such without copying. [`sizes`] gives the
//! `saved` (N·r + 2r², as [`crate::ops::saved_len`]) and `workspace` lengths of a batch; a
//! workspace sized for N rows also serves [`merge`] and [`energy`].
//!
//! Gradients are written (`accumulate = false`) or added (`true`); `∂B` exists for the variants
//! with `B`. The energy penalty is only in [`energy`], never in [`backward`].
//!
//! # What is not here (typed errors)
//! The spectral clip τ (App. H; `spec.tau` must be `None`), dropout masks, ranks above
//! [`MAX_RANK`](crate::cuda::MAX_RANK), f64 activations.
//!
//! # Errors on the device
//! Inputs are not scanned for NaN/±Inf (that would cost a pass and a host wait), and no result
//! is read back: a failure of φ1 or its adjoint (Prop. 1, Al-Mohy & Higham 2009) makes the kernel
//! write NaN into that r×r result, which then reaches the outputs of the call (`y`, `∂x`, the
//! gradients) — the engine's usual non-finite check sees it. The kernels' status words (i32,
//! 0 = success; φ1 of the call in word 0, its adjoint in word 1) stay in the workspace (f32
//! values 4 and 5: after η, which is value 0), for debugging.
//!
//! **The overflow rule on the GPU.** The CPU calls check every output and return
//! [`ElraError::Overflow`] when finite inputs give a non-finite result. Here that check is on
//! request, because a full scan costs one more read of each output and a host wait to act on it:
//! [`check_finite`] ORs 1 into a caller's device flag when a buffer holds NaN or ±Inf, without
//! synchronising; the engine zeroes the flag, scans the outputs it cares about, and reads the flag
//! whenever it synchronises anyway (a set flag is its `ELRA_OVERFLOW`).
//!
//! # How a call runs
//! Each call builds a plan (`plan.rs`: the workspace layout and the list of launches, plain host
//! arithmetic) and runs it (`exec.rs`) with the kernels of the stateful layer ([`super::layer`]):
//! `factor_c`, the column reductions, the fused row pass, the rank-r weight update, the small
//! GEMM, the batched φ1 and adjoint kernels, `factor_backward` and cuBLAS for `X W0ᵀ` and
//! `∂Y W0`. The unit tests run every plan on the CPU against [`crate::ops`].

mod exec;
#[cfg(test)]
mod interp;
mod multi;
pub(crate) mod plan;

pub use multi::{multi_forward, multi_sizes, GpuMultiAdapter, MAX_GPU_ADAPTERS};

use cudarc::driver::CudaSlice;

use crate::adapter::GeneratorSpec;
use crate::cuda::buffer::BorrowedSlice;
use crate::cuda::caller::CallerSpan;
use crate::cuda::skinny::{self, check_rank, View};
use crate::cuda::{Activation, CudaDevice, DeviceMatrices};
use crate::ops::{ElraOp, Side};
use crate::{ElraError, Result};

use exec::{execute, Bound};
use plan::{plan, GenParams, Kind, Layout, Loc};

/// The trained parameters of a generator on the device: `A` (d×r), `B` (r×d; `None` for PSD)
/// and the step size η (host value, before the multiplier; eq. 2, eq. 19).
#[derive(Clone, Copy)]
pub struct GpuGenerator<'a> {
    /// `A` (d×r).
    pub a: &'a DeviceMatrices<f32>,
    /// `B` (r×d); `None` for ELRA-PSD.
    pub b: Option<&'a DeviceMatrices<f32>>,
    /// η (1×1, f32) on the device, read by the kernels: the call never copies it to the host,
    /// so an engine's trained η (e.g. `exp(log η)`) stays where it is. Not checked: a
    /// non-positive or non-finite η gives NaN or ±Inf in the outputs.
    pub eta: &'a DeviceMatrices<f32>,
}

/// Where parameter gradients go on the device: `∂A` (d×r), `∂B` (r×d, when the variant has
/// `B`), `∂η` (1×1).
pub struct GpuGrads<'a> {
    /// `∂L/∂A`.
    pub a: &'a mut DeviceMatrices<f32>,
    /// `∂L/∂B`; required when the variant has `B`.
    pub b: Option<&'a mut DeviceMatrices<f32>>,
    /// `∂L/∂η`.
    pub eta: &'a mut DeviceMatrices<f32>,
    /// Add to the buffers (`true`) or overwrite them.
    pub accumulate: bool,
}

/// Whether the fused forward includes the frozen layer (as [`crate::ops::Base`]): `Included`
/// computes `Y = X W0ᵀ + 1 biasᵀ + increment`, `Excluded` only the increment.
#[derive(Clone, Copy)]
pub enum GpuBase<'a, T: Activation> {
    /// The frozen layer `X W0ᵀ` plus an optional bias (a 1×d matrix) is part of the output.
    Included {
        /// The bias, or `None`.
        bias: Option<&'a DeviceMatrices<T>>,
    },
    /// Only the adapter's increment.
    Excluded,
}

/// The buffer lengths of a batch, in f32 values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuOpSizes {
    /// What a forward saves for its backward: `V` (N×r), `Z`, `M` (r×r) = N·r + 2r².
    pub saved: usize,
    /// The workspace any call of the batch needs (also enough for [`merge`] and [`energy`]).
    pub workspace: usize,
}

/// The `saved` and `workspace` lengths (f32 values) for `n ≥ 1` rows of `op` (rank at most
/// [`MAX_RANK`](crate::cuda::MAX_RANK)): `saved` = N·r + 2r² ([`crate::ops::saved_len`], eq. 5's
/// N×r activation plus two r×r matrices); the workspace holds the N×r intermediates `T`, `T̄`,
/// `V̄`, the d×r and k×r factors `Cᵀ`, `Pᵀ`, `∂Pᵀ`, `C̄ᵀ`, the r×r matrices, reduction partials
/// and the φ1 kernels' work matrices.
pub fn sizes(op: &ElraOp, n: usize) -> Result<GpuOpSizes> {
    op.validate()?;
    check_rank(op.r)?;
    if n == 0 {
        return Err(ElraError::invalid("n", "the batch is empty"));
    }
    let too_big = || ElraError::invalid("n", "the buffers' sizes overflow");
    Ok(GpuOpSizes {
        saved: plan::saved_len(n, op.r).ok_or_else(too_big)?,
        workspace: Layout::new(op, n).ok_or_else(too_big)?.len,
    })
}

/// The workspace (f32 values) [`merge`] (eq. 30, Prop. 3) and [`energy`] (eq. 20–21) need,
/// which have no batch: `Cᵀ`, the r×r `±Z`, `φ1(±Z)` and Grams (Prop. 1, eq. 21), the d×r and
/// k×r products of the weight pass, reduction partials and φ1 work matrices — at most
/// [`sizes`]`(op, n).workspace` for every `n ≥ 1`.
pub fn unbatched_workspace(op: &ElraOp) -> Result<usize> {
    op.validate()?;
    check_rank(op.r)?;
    Ok(layout(op, 0)?.len)
}

/// Checks the layer and the step (no clip on the GPU); the settings of the call.
fn params(op: &ElraOp, spec: &GeneratorSpec) -> Result<GenParams> {
    op.validate()?;
    check_rank(op.r)?;
    spec.validate()?;
    spec.require_no_clip()?;
    Ok(GenParams::new(op, spec))
}

/// Checks that `m` is one `rows × cols` matrix on `dev`.
fn check_mat<T: crate::cuda::DeviceScalar>(
    dev: &CudaDevice,
    arg: &'static str,
    m: &DeviceMatrices<T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    m.check_device(dev, arg)?;
    m.check_shape(arg, 1, rows, cols)
}

/// Checks that an f32 buffer holds at least `len` values on `dev`.
fn check_len(
    dev: &CudaDevice,
    arg: &'static str,
    m: &DeviceMatrices<f32>,
    len: usize,
    what: &str,
) -> Result<()> {
    m.check_device(dev, arg)?;
    if m.len() < len {
        return Err(ElraError::invalid(
            arg,
            format!("{} values given, {len} needed ({what})", m.len()),
        ));
    }
    Ok(())
}

/// The layout of a call on `n` rows (0 for merge and energy).
fn layout(op: &ElraOp, n: usize) -> Result<Layout> {
    Layout::new(op, n).ok_or_else(|| ElraError::invalid("n", "the buffers' sizes overflow"))
}

/// Binds and checks the generator: `A` d×r, `B` r×d exactly when the variant has it.
fn bind_gen<'a, T: Activation>(
    dev: &CudaDevice,
    op: &ElraOp,
    g: &GpuGenerator<'a>,
    b: &mut Bound<'a, T>,
) -> Result<()> {
    check_mat(dev, "a", g.a, op.d, op.r)?;
    check_mat(dev, "eta", g.eta, 1, 1)?;
    b.f32s.push((Loc::A, g.a));
    b.f32s.push((Loc::Eta, g.eta));
    match (op.variant.uses_b(), g.b) {
        (true, Some(m)) => {
            check_mat(dev, "b", m, op.r, op.d)?;
            b.f32s.push((Loc::B, m));
        }
        (true, None) => {
            return Err(ElraError::invalid(
                "b",
                format!("variant {} needs the factor B (r×d)", op.variant),
            ))
        }
        (false, Some(_)) => return Err(ElraError::invalid("b", "ELRA-PSD has no factor B")),
        (false, None) => {}
    }
    Ok(())
}

/// Binds and checks the gradient buffers; returns the accumulate flag.
fn bind_grads<'a, T: Activation>(
    dev: &CudaDevice,
    op: &ElraOp,
    g: &'a GpuGrads<'a>,
    b: &mut Bound<'a, T>,
) -> Result<bool> {
    check_mat(dev, "da", g.a, op.d, op.r)?;
    check_mat(dev, "deta", g.eta, 1, 1)?;
    b.f32s.push((Loc::Da, &*g.a));
    b.f32s.push((Loc::Deta, &*g.eta));
    match (op.variant.uses_b(), g.b.as_deref()) {
        (true, Some(m)) => {
            check_mat(dev, "db", m, op.r, op.d)?;
            b.f32s.push((Loc::Db, m));
        }
        (true, None) => return Err(ElraError::invalid("db", "the variant has B: db is needed")),
        (false, _) => {}
    }
    Ok(g.accumulate)
}

fn bound<'a, T: Activation>() -> Bound<'a, T> {
    Bound {
        act: Vec::new(),
        f32s: Vec::new(),
    }
}

/// The fused forward on the device ([`crate::ops::forward`]; eq. 5 with `V = X Pᵀ`, `P = C W0`,
/// `M = φ1(C A)` of Prop. 1): `y = x W0ᵀ + 1 biasᵀ + ((x Pᵀ) Mᵀ) Aᵀ` into `y` (N×d) with
/// [`GpuBase::Included`], only the increment with [`GpuBase::Excluded`]; saves `V`, `Z`, `M`
/// into `saved` ([`sizes`]). `x` is N×k, `w0` d×k. Asynchronous on `dev`'s stream.
///
/// Errors (before anything is enqueued): shapes, devices, buffer sizes, rank, η, the clip.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Activation>(
    dev: &CudaDevice,
    op: &ElraOp,
    spec: &GeneratorSpec,
    w0: &DeviceMatrices<T>,
    base: GpuBase<'_, T>,
    g: &GpuGenerator<'_>,
    x: &DeviceMatrices<T>,
    y: &mut DeviceMatrices<T>,
    saved: &mut DeviceMatrices<f32>,
    workspace: &mut DeviceMatrices<f32>,
) -> Result<()> {
    let gp = params(op, spec)?;
    let (d, k) = (op.d, op.k);
    let n = x.rows();
    let sz = sizes(op, n)?;
    let lay = layout(op, n)?;
    let mut b = bound::<T>();
    check_mat(dev, "w0", w0, d, k)?;
    check_mat(dev, "x", x, n, k)?;
    check_mat(dev, "y", y, n, d)?;
    check_len(dev, "saved", saved, sz.saved, "elra_gpu_op_sizes")?;
    check_len(dev, "workspace", workspace, lay.len, "elra_gpu_op_sizes")?;
    bind_gen(dev, op, g, &mut b)?;
    let (with_base, bias) = match base {
        GpuBase::Included { bias } => (true, bias),
        GpuBase::Excluded => (false, None),
    };
    if let Some(bias) = bias {
        check_mat(dev, "bias", bias, 1, d)?;
        b.act.push((Loc::Bias, bias));
    }
    b.act.extend([(Loc::W0, w0), (Loc::X, x), (Loc::Y, &*y)]);
    b.f32s
        .extend([(Loc::Saved, &*saved), (Loc::Ws, &*workspace)]);
    let kind = Kind::Forward {
        base: with_base,
        bias: bias.is_some(),
    };
    execute(dev, &plan(op, n, &gp, kind, &lay), &b, &lay, n)
}

/// Reverse mode of [`forward`] on the device ([`crate::ops::backward`]): from `dy` (N×d),
/// `∂x = ∂y W0 + V̄ P` into `dx` (N×k; `V̄ P` alone unless `with_base`, as the forward's
/// [`GpuBase`]), and the gradients of `(A, B, η)` through `Z̄ = L_φ1(Zᵀ, M̄)` (Prop. 1) and
/// eq. (19) into `grads` — without the energy term ([`energy`]). `x`, the parameters, `spec` and
/// `saved` must be the forward's. Asynchronous on `dev`'s stream.
///
/// Errors (before anything is enqueued): shapes, devices, buffer sizes, rank, η, the clip.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Activation>(
    dev: &CudaDevice,
    op: &ElraOp,
    spec: &GeneratorSpec,
    w0: &DeviceMatrices<T>,
    with_base: bool,
    g: &GpuGenerator<'_>,
    x: &DeviceMatrices<T>,
    saved: &DeviceMatrices<f32>,
    dy: &DeviceMatrices<T>,
    dx: &mut DeviceMatrices<T>,
    grads: GpuGrads<'_>,
    workspace: &mut DeviceMatrices<f32>,
) -> Result<()> {
    let gp = params(op, spec)?;
    let (d, k) = (op.d, op.k);
    let n = x.rows();
    let sz = sizes(op, n)?;
    let lay = layout(op, n)?;
    let mut b = bound::<T>();
    check_mat(dev, "w0", w0, d, k)?;
    check_mat(dev, "x", x, n, k)?;
    check_mat(dev, "dy", dy, n, d)?;
    check_mat(dev, "dx", dx, n, k)?;
    check_len(dev, "saved", saved, sz.saved, "elra_gpu_op_sizes")?;
    check_len(dev, "workspace", workspace, lay.len, "elra_gpu_op_sizes")?;
    bind_gen(dev, op, g, &mut b)?;
    let accumulate = bind_grads(dev, op, &grads, &mut b)?;
    b.act
        .extend([(Loc::W0, w0), (Loc::X, x), (Loc::Dy, dy), (Loc::Dx, &*dx)]);
    b.f32s.extend([(Loc::Saved, saved), (Loc::Ws, &*workspace)]);
    let kind = Kind::Backward {
        base: with_base,
        accumulate,
    };
    execute(dev, &plan(op, n, &gp, kind, &lay), &b, &lay, n)
}

/// The output-side forward on the device ([`crate::ops::forward_out`]; eq. 5 on the base layer's
/// output, Prop. 1): `y = u + ((u Cᵀ) Mᵀ) Aᵀ` for `u` (N×d, without bias) into `y` (N×d; not
/// `u`'s memory: the backward needs `u`), saving `V`, `Z`, `M`. Asynchronous on `dev`'s stream.
///
/// Errors (before anything is enqueued): shapes, devices, buffer sizes, rank, η, the clip.
#[allow(clippy::too_many_arguments)]
pub fn forward_out<T: Activation>(
    dev: &CudaDevice,
    op: &ElraOp,
    spec: &GeneratorSpec,
    g: &GpuGenerator<'_>,
    u: &DeviceMatrices<T>,
    y: &mut DeviceMatrices<T>,
    saved: &mut DeviceMatrices<f32>,
    workspace: &mut DeviceMatrices<f32>,
) -> Result<()> {
    let gp = params(op, spec)?;
    let n = u.rows();
    let sz = sizes(op, n)?;
    let lay = layout(op, n)?;
    let mut b = bound::<T>();
    check_mat(dev, "u", u, n, op.d)?;
    check_mat(dev, "y", y, n, op.d)?;
    check_len(dev, "saved", saved, sz.saved, "elra_gpu_op_sizes")?;
    check_len(dev, "workspace", workspace, lay.len, "elra_gpu_op_sizes")?;
    bind_gen(dev, op, g, &mut b)?;
    b.act.extend([(Loc::U, u), (Loc::Y, &*y)]);
    b.f32s
        .extend([(Loc::Saved, &*saved), (Loc::Ws, &*workspace)]);
    execute(dev, &plan(op, n, &gp, Kind::ForwardOut, &lay), &b, &lay, n)
}

/// Reverse mode of [`forward_out`] on the device ([`crate::ops::backward_out`]):
/// `∂u = ∂y + V̄ C` into `du` (N×d) and the gradients of `(A, B, η)` (`C̄ = V̄ᵀ u`, Prop. 1,
/// eq. 19; no energy term) into `grads`, from the forward's `u`, `saved`, parameters and spec.
/// Asynchronous on `dev`'s stream.
///
/// Errors (before anything is enqueued): shapes, devices, buffer sizes, rank, η, the clip.
#[allow(clippy::too_many_arguments)]
pub fn backward_out<T: Activation>(
    dev: &CudaDevice,
    op: &ElraOp,
    spec: &GeneratorSpec,
    g: &GpuGenerator<'_>,
    u: &DeviceMatrices<T>,
    saved: &DeviceMatrices<f32>,
    dy: &DeviceMatrices<T>,
    du: &mut DeviceMatrices<T>,
    grads: GpuGrads<'_>,
    workspace: &mut DeviceMatrices<f32>,
) -> Result<()> {
    let gp = params(op, spec)?;
    let n = u.rows();
    let sz = sizes(op, n)?;
    let lay = layout(op, n)?;
    let mut b = bound::<T>();
    check_mat(dev, "u", u, n, op.d)?;
    check_mat(dev, "dy", dy, n, op.d)?;
    check_mat(dev, "du", du, n, op.d)?;
    check_len(dev, "saved", saved, sz.saved, "elra_gpu_op_sizes")?;
    check_len(dev, "workspace", workspace, lay.len, "elra_gpu_op_sizes")?;
    bind_gen(dev, op, g, &mut b)?;
    let accumulate = bind_grads(dev, op, &grads, &mut b)?;
    b.act.extend([(Loc::U, u), (Loc::Dy, dy), (Loc::Du, &*du)]);
    b.f32s.extend([(Loc::Saved, saved), (Loc::Ws, &*workspace)]);
    let kind = Kind::BackwardOut { accumulate };
    execute(dev, &plan(op, n, &gp, kind, &lay), &b, &lay, n)
}

/// The merged weight on the device ([`crate::ops::merge`]): `out = exp(G) w = w + A (φ1(Z) (C w))`
/// (eq. 30; pass `W0`), with `inverse` the unmerge `exp(−G) w = w − A (φ1(−Z) (C w))` (Prop. 3
/// with Prop. 1), with [`Side::Right`] `w exp(±G) = w ± ((w A) φ1(±Z)) C` (App. B eq. 22).
/// `w` and `out` are d×k (left) or k×d (right) of the activation type, rounded once.
/// Asynchronous on `dev`'s stream.
///
/// Errors (before anything is enqueued): shapes, devices, workspace size, rank, η, the clip.
#[allow(clippy::too_many_arguments)]
pub fn merge<T: Activation>(
    dev: &CudaDevice,
    op: &ElraOp,
    spec: &GeneratorSpec,
    g: &GpuGenerator<'_>,
    w: &DeviceMatrices<T>,
    inverse: bool,
    side: Side,
    out: &mut DeviceMatrices<T>,
    workspace: &mut DeviceMatrices<f32>,
) -> Result<()> {
    let gp = params(op, spec)?;
    let lay = layout(op, 0)?;
    let (rows, cols) = match side {
        Side::Left => (op.d, op.k),
        Side::Right => (op.k, op.d),
    };
    let mut b = bound::<T>();
    check_mat(dev, "w", w, rows, cols)?;
    check_mat(dev, "out", out, rows, cols)?;
    check_len(dev, "workspace", workspace, lay.len, "elra_gpu_op_sizes")?;
    bind_gen(dev, op, g, &mut b)?;
    b.act.extend([(Loc::W, w), (Loc::Out, &*out)]);
    b.f32s.push((Loc::Ws, &*workspace));
    let kind = Kind::Merge { inverse, side };
    execute(dev, &plan(op, 0, &gp, kind, &lay), &b, &lay, 0)
}

/// The penalty `λ‖G‖²_F = λ tr((AᵀA)(CCᵀ))` of the step's generator (eq. 20–21, from r×r Grams;
/// λ = `spec.lambda`) into the device scalar `energy` (1×1, overwritten) and, with `grads`, its
/// gradient written or added into them (through eq. 19, as [`crate::ops::energy`]).
/// Asynchronous on `dev`'s stream.
///
/// Errors (before anything is enqueued): shapes, devices, workspace size, rank, η, the clip.
pub fn energy(
    dev: &CudaDevice,
    op: &ElraOp,
    spec: &GeneratorSpec,
    g: &GpuGenerator<'_>,
    energy: &mut DeviceMatrices<f32>,
    grads: Option<GpuGrads<'_>>,
    workspace: &mut DeviceMatrices<f32>,
) -> Result<()> {
    let gp = params(op, spec)?;
    let lay = layout(op, 0)?;
    let mut b = bound::<f32>();
    check_mat(dev, "energy", energy, 1, 1)?;
    check_len(dev, "workspace", workspace, lay.len, "elra_gpu_op_sizes")?;
    bind_gen(dev, op, g, &mut b)?;
    let accumulate = match &grads {
        Some(gr) => Some(bind_grads(dev, op, gr, &mut b)?),
        None => None,
    };
    b.f32s
        .extend([(Loc::Energy, &*energy), (Loc::Ws, &*workspace)]);
    let kind = Kind::Energy { grads: accumulate };
    execute(dev, &plan(op, 0, &gp, kind, &lay), &b, &lay, 0)
}

/// The overflow rule on the GPU, on request (module docs, "Errors on the device"; the CPU calls
/// always apply it: a non-finite output of finite inputs is [`ElraError::Overflow`]): ORs 1 into
/// `flag[0]` (a device u32 the caller zeroes) when `x` holds NaN or ±Inf, at the cost of one
/// more read of `x` (`cuda/finite.cu`). The engine scans the outputs it wants checked and reads
/// the flag when it synchronises anyway. Asynchronous on `dev`'s stream; nothing is read back.
///
/// Errors (before anything is enqueued): `x` or `flag` not on `dev`, an empty `flag`.
pub fn check_finite<T: Activation>(
    dev: &CudaDevice,
    x: &DeviceMatrices<T>,
    flag: &mut CudaSlice<u32>,
) -> Result<()> {
    x.check_device(dev, "x")?;
    if flag.ordinal() != dev.ordinal() {
        return Err(ElraError::invalid(
            "flag",
            format!(
                "buffer is on device {} but the handle is device {}",
                flag.ordinal(),
                dev.ordinal()
            ),
        ));
    }
    if flag.is_empty() {
        return Err(ElraError::invalid(
            "flag",
            "an empty buffer (one u32 needed)",
        ));
    }
    let rows = x.batch() * x.rows();
    let view = View::mat(x.slice(), rows, x.cols());
    skinny::check_finite(dev, view, View::mat(flag, 1, 1))
}

/// [`check_finite`] on caller memory (the C ABI's `elra_gpu_check_finite`): `x` a strided
/// `rows × cols` matrix of `T` with row stride `ld` (its padding is not read) and `flag` one
/// u32, both validated against `dev` ([`CallerSpan::check`] with `Some(dev)`). Asynchronous on
/// `dev`'s stream.
///
/// # Safety
/// Both spans must stay allocated until the work enqueued on `dev`'s stream has run, and no other
/// work may write `flag` concurrently (the C ABI orders the caller's stream around the call).
pub(crate) unsafe fn check_finite_span<T: Activation>(
    dev: &CudaDevice,
    x: &CallerSpan<T>,
    flag: &CallerSpan<u32>,
) -> Result<()> {
    // SAFETY: forwarded contract; `x` covers `x.len` elements of T and `flag` one u32 on `dev`
    // (validated), and the wrappers never free the memory.
    let (xb, fb) = unsafe {
        (
            BorrowedSlice::<T>::new(dev, x.ptr, x.len),
            BorrowedSlice::<u32>::new(dev, flag.ptr, 1),
        )
    };
    let view = View::strided(xb.get(), 0, (x.rows, x.cols), (x.ld, 1));
    skinny::check_finite(dev, view, View::mat(fb.get(), 1, 1))
}
