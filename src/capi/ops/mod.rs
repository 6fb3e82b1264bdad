//! The functional ELRA operations ([`crate::ops`]) on caller memory: the engine owns the
//! parameters, activations, gradients, saved values and workspace; nothing is kept between
//! calls. An [`ElraOpDesc`] describes the layer, an [`ElraOpStep`] the settings of the step
//! ([`elra_schedule_at`] computes them from an [`super::ElraAdapterConfig`]), and
//! [`elra_op_sizes`] the saved values and workspace a batch needs.
//!
//! Matrices are row-major with leading dimensions (module conventions of [`super`]); `saved`
//! and `workspace` are dense arrays of the call's element type. Outputs may not overlap any
//! other buffer of the call (`ELRA_INVALID_ARGUMENT`). Parameter gradients are written
//! (`accumulate = 0`) or added (`accumulate = 1`). The energy penalty is its own call
//! ([`elra_op_energy_f64`]); forward and backward never include it.

use super::config::variant_of;
use super::layout::check_scalar_out;
use super::{guard, CError, CResult, ElraAdapterConfig, ElraStatus};
use crate::adapter::GeneratorSpec;
use crate::ops::ElraOp;
use crate::ElraError;

mod buffers;
mod calls;
mod multi;
#[cfg_attr(not(feature = "cuda"), allow(unused_imports))]
pub(crate) use multi::about_adapter;

pub use multi::{
    elra_op_multi_forward_f32, elra_op_multi_forward_f64, elra_op_multi_workspace, ElraMultiAdapter,
};

#[cfg_attr(not(feature = "cuda"), allow(unused_imports))]
pub(super) use buffers::flag;
use buffers::sizes;
use calls::*;

/// The shape of an ELRA layer for the functional calls: `variant` is an ELRA value of
/// [`super::ElraVariant`] (general, PSD or Hyb), `W0` is d×k, `A` d×r, `B` r×d.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElraOpDesc {
    /// An [`super::ElraVariant`] other than LoRA.
    pub variant: u32,
    /// Output dimension d.
    pub d: usize,
    /// Input dimension k.
    pub k: usize,
    /// Rank r, 1 ≤ r ≤ d.
    pub r: usize,
}

/// The settings of one optimiser step (Algorithm 1 line 4, App. H): α of eq. (19) (used by
/// Hyb), the η multiplier, the spectral-clip threshold τ (0: none) and the energy weight λ
/// (eq. 20, used by [`elra_op_energy_f64`] only).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElraOpStep {
    /// α ∈ [0, 1].
    pub alpha: f64,
    /// η multiplier m(t) > 0.
    pub eta_mult: f64,
    /// τ > 0, or 0 for no clip.
    pub tau: f64,
    /// λ ≥ 0.
    pub lambda: f64,
}

pub(super) fn desc_of(p: *const ElraOpDesc) -> CResult<ElraOp> {
    if p.is_null() {
        return Err(CError::Null("desc"));
    }
    // SAFETY: non-null; the caller guarantees a readable descriptor (plain data).
    let d = unsafe { p.read_unaligned() };
    let variant = variant_of(d.variant)?.ok_or_else(|| {
        ElraError::invalid(
            "variant",
            "the functional calls are ELRA's; LoRA is plain GEMMs",
        )
    })?;
    let op = ElraOp {
        variant,
        d: d.d,
        k: d.k,
        r: d.r,
    };
    op.validate()?;
    Ok(op)
}

pub(super) fn step_of(p: *const ElraOpStep) -> CResult<GeneratorSpec> {
    if p.is_null() {
        return Err(CError::Null("step"));
    }
    // SAFETY: non-null; the caller guarantees a readable step (plain data).
    let s = unsafe { p.read_unaligned() };
    let spec = GeneratorSpec {
        alpha: s.alpha,
        eta_mult: s.eta_mult,
        tau: (s.tau != 0.0).then_some(s.tau),
        lambda: s.lambda,
    };
    spec.validate()?;
    Ok(spec)
}

/// α (eq. 19, eq. 75), the η multiplier (App. H), τ and λ of an ELRA `config` at optimiser step
/// `step` ([`crate::adapter::GeneratorConfig::spec_at`]) into `*out`.
///
/// # Safety
/// `config` must point to a readable config, `out` to a writable `ElraOpStep`.
#[no_mangle]
pub unsafe extern "C" fn elra_schedule_at(
    config: *const ElraAdapterConfig,
    step: usize,
    out: *mut ElraOpStep,
) -> ElraStatus {
    guard(|| {
        if config.is_null() {
            return Err(CError::Null("config"));
        }
        check_scalar_out("out", out)?;
        // SAFETY: non-null; the caller guarantees a readable config (plain data).
        let c = unsafe { config.read_unaligned() };
        let v = variant_of(c.variant)?
            .ok_or_else(|| ElraError::invalid("variant", "LoRA has no generator schedule"))?;
        let s = c.elra(v)?.generator.spec_at(step);
        // SAFETY: validated; the caller guarantees writability.
        unsafe {
            out.write(ElraOpStep {
                alpha: s.alpha,
                eta_mult: s.eta_mult,
                tau: s.tau.unwrap_or(0.0),
                lambda: s.lambda,
            })
        };
        Ok(())
    })
}

/// The sizes, in elements of the call's type, of the `saved` array a forward of `n` rows fills
/// and its backward reads (`V = X Pᵀ`, `Z = C A`, `M = φ1(Z)` of eq. 5 and Prop. 1: N·r + 2·r²,
/// LoRA's N×r activation plus two r×r matrices, besides the input the engine keeps) and of the
/// `workspace` a call needs (3·N·r: `T`, `T̄`, `V̄` of the reverse mode).
///
/// # Safety
/// `desc` must point to a readable descriptor; the outputs to writable `size_t`s.
#[no_mangle]
pub unsafe extern "C" fn elra_op_sizes(
    desc: *const ElraOpDesc,
    n: usize,
    saved_len: *mut usize,
    workspace_len: *mut usize,
) -> ElraStatus {
    guard(|| {
        let op = desc_of(desc)?;
        check_scalar_out("saved_len", saved_len)?;
        check_scalar_out("workspace_len", workspace_len)?;
        let (s, w) = sizes(&op, n)?;
        // SAFETY: validated; the caller guarantees writability.
        unsafe {
            saved_len.write(s);
            workspace_len.write(w);
        }
        Ok(())
    })
}

/// The fused ELRA layer's forward on caller memory, f64 ([`crate::ops::forward`]):
/// `y = x W0ᵀ + bias + D∘(((x Pᵀ) φ1(Z)ᵀ) Aᵀ)` (with `base = 1`; `base = 0` writes only the
/// increment, for an engine that runs the frozen GEMM itself; a non-NULL `bias` then is
/// `ELRA_INVALID_ARGUMENT`) with `C` from (A, B, η) and `step` (eq. 2, §4.2.1, eq. 19, App. H), `Z = C A`, `P = C W0` (eq. 5, Prop. 1). `x` is n×k, `y` n×d; `w0`
/// d×k; `a` d×r; `b` r×d (ignored, may be NULL, for PSD); `bias` (d values) and `dropout` (n×d,
/// dense, entries 0 or 1/(1−p), scaling the adapter's increment) may be NULL. Fills `saved`
/// ([`elra_op_sizes`]) for the backward; `workspace` holds `workspace_len` values.
///
/// # Safety
/// Every non-NULL pointer must cover its described layout, readable (inputs) or writable
/// (outputs), for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn elra_op_forward_f64(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    w0: *const f64,
    ld_w0: usize,
    base: u32,
    bias: *const f64,
    a: *const f64,
    ld_a: usize,
    b: *const f64,
    ld_b: usize,
    eta: f64,
    x: *const f64,
    ld_x: usize,
    dropout: *const f64,
    y: *mut f64,
    ld_y: usize,
    saved: *mut f64,
    workspace: *mut f64,
    workspace_len: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        forward_t(
            desc,
            step,
            n,
            w0,
            ld_w0,
            base,
            bias,
            a,
            ld_a,
            b,
            ld_b,
            eta,
            x,
            ld_x,
            dropout,
            y,
            ld_y,
            saved,
            workspace,
            workspace_len,
        )
    })
}

/// [`elra_op_forward_f64`] for f32.
///
/// # Safety
/// As [`elra_op_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_forward_f32(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    w0: *const f32,
    ld_w0: usize,
    base: u32,
    bias: *const f32,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: f32,
    x: *const f32,
    ld_x: usize,
    dropout: *const f32,
    y: *mut f32,
    ld_y: usize,
    saved: *mut f32,
    workspace: *mut f32,
    workspace_len: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        forward_t(
            desc,
            step,
            n,
            w0,
            ld_w0,
            base,
            bias,
            a,
            ld_a,
            b,
            ld_b,
            eta,
            x,
            ld_x,
            dropout,
            y,
            ld_y,
            saved,
            workspace,
            workspace_len,
        )
    })
}

/// Reverse mode of [`elra_op_forward_f64`] (eq. 5 and Prop. 1 differentiated,
/// [`crate::ops::backward`]): from `dy` (n×d) writes `dx` (n×k; with `base = 0`, as in the
/// forward, only the increment's `V̄ P`) and writes or adds (`accumulate` 0/1) `da` (d×r), `db`
/// (r×d, not for PSD) and `*deta`, the gradients of `⟨y, dy⟩` (no energy term:
/// [`elra_op_energy_f64`]). `x`, the
/// parameters, `step`, `dropout` and `saved` must be the forward's. f64.
///
/// # Safety
/// As [`elra_op_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_backward_f64(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    w0: *const f64,
    ld_w0: usize,
    base: u32,
    a: *const f64,
    ld_a: usize,
    b: *const f64,
    ld_b: usize,
    eta: f64,
    x: *const f64,
    ld_x: usize,
    dropout: *const f64,
    saved: *const f64,
    dy: *const f64,
    ld_dy: usize,
    dx: *mut f64,
    ld_dx: usize,
    da: *mut f64,
    ld_da: usize,
    db: *mut f64,
    ld_db: usize,
    deta: *mut f64,
    accumulate: u32,
    workspace: *mut f64,
    workspace_len: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        backward_t(
            desc,
            step,
            n,
            w0,
            ld_w0,
            base,
            a,
            ld_a,
            b,
            ld_b,
            eta,
            x,
            ld_x,
            dropout,
            saved,
            dy,
            ld_dy,
            dx,
            ld_dx,
            da,
            ld_da,
            db,
            ld_db,
            deta,
            accumulate,
            workspace,
            workspace_len,
        )
    })
}

/// [`elra_op_backward_f64`] for f32.
///
/// # Safety
/// As [`elra_op_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_backward_f32(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    w0: *const f32,
    ld_w0: usize,
    base: u32,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: f32,
    x: *const f32,
    ld_x: usize,
    dropout: *const f32,
    saved: *const f32,
    dy: *const f32,
    ld_dy: usize,
    dx: *mut f32,
    ld_dx: usize,
    da: *mut f32,
    ld_da: usize,
    db: *mut f32,
    ld_db: usize,
    deta: *mut f32,
    accumulate: u32,
    workspace: *mut f32,
    workspace_len: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        backward_t(
            desc,
            step,
            n,
            w0,
            ld_w0,
            base,
            a,
            ld_a,
            b,
            ld_b,
            eta,
            x,
            ld_x,
            dropout,
            saved,
            dy,
            ld_dy,
            dx,
            ld_dx,
            da,
            ld_da,
            db,
            ld_db,
            deta,
            accumulate,
            workspace,
            workspace_len,
        )
    })
}

/// The output-side form's forward, f64 (eq. 5 on the base output, [`crate::ops::forward_out`]):
/// `y = u + D∘(((u Cᵀ) φ1(Z)ᵀ) Aᵀ)` for the base layer's output `u` (n×d, without bias) from any base layer
/// (quantised, fused, sharded). `y` (n×d) may not alias `u` (the backward needs `u`). Fills
/// `saved` ([`elra_op_sizes`]).
///
/// # Safety
/// As [`elra_op_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_forward_out_f64(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    a: *const f64,
    ld_a: usize,
    b: *const f64,
    ld_b: usize,
    eta: f64,
    u: *const f64,
    ld_u: usize,
    dropout: *const f64,
    y: *mut f64,
    ld_y: usize,
    saved: *mut f64,
    workspace: *mut f64,
    workspace_len: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        forward_out_t(
            desc,
            step,
            n,
            a,
            ld_a,
            b,
            ld_b,
            eta,
            u,
            ld_u,
            dropout,
            y,
            ld_y,
            saved,
            workspace,
            workspace_len,
        )
    })
}

/// [`elra_op_forward_out_f64`] for f32.
///
/// # Safety
/// As [`elra_op_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_forward_out_f32(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: f32,
    u: *const f32,
    ld_u: usize,
    dropout: *const f32,
    y: *mut f32,
    ld_y: usize,
    saved: *mut f32,
    workspace: *mut f32,
    workspace_len: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        forward_out_t(
            desc,
            step,
            n,
            a,
            ld_a,
            b,
            ld_b,
            eta,
            u,
            ld_u,
            dropout,
            y,
            ld_y,
            saved,
            workspace,
            workspace_len,
        )
    })
}

/// Reverse mode of [`elra_op_forward_out_f64`] (eq. 5 on the base output, differentiated;
/// [`crate::ops::backward_out`]): `du = dy + V̄ C`
/// (n×d, for the base layer's own backward) and the parameter gradients (written or added),
/// from the forward's `u`, `saved`, parameters, `step` and `dropout`. f64.
///
/// # Safety
/// As [`elra_op_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_backward_out_f64(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    a: *const f64,
    ld_a: usize,
    b: *const f64,
    ld_b: usize,
    eta: f64,
    u: *const f64,
    ld_u: usize,
    dropout: *const f64,
    saved: *const f64,
    dy: *const f64,
    ld_dy: usize,
    du: *mut f64,
    ld_du: usize,
    da: *mut f64,
    ld_da: usize,
    db: *mut f64,
    ld_db: usize,
    deta: *mut f64,
    accumulate: u32,
    workspace: *mut f64,
    workspace_len: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        backward_out_t(
            desc,
            step,
            n,
            a,
            ld_a,
            b,
            ld_b,
            eta,
            u,
            ld_u,
            dropout,
            saved,
            dy,
            ld_dy,
            du,
            ld_du,
            da,
            ld_da,
            db,
            ld_db,
            deta,
            accumulate,
            workspace,
            workspace_len,
        )
    })
}

/// [`elra_op_backward_out_f64`] for f32.
///
/// # Safety
/// As [`elra_op_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_backward_out_f32(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: f32,
    u: *const f32,
    ld_u: usize,
    dropout: *const f32,
    saved: *const f32,
    dy: *const f32,
    ld_dy: usize,
    du: *mut f32,
    ld_du: usize,
    da: *mut f32,
    ld_da: usize,
    db: *mut f32,
    ld_db: usize,
    deta: *mut f32,
    accumulate: u32,
    workspace: *mut f32,
    workspace_len: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        backward_out_t(
            desc,
            step,
            n,
            a,
            ld_a,
            b,
            ld_b,
            eta,
            u,
            ld_u,
            dropout,
            saved,
            dy,
            ld_dy,
            du,
            ld_du,
            da,
            ld_da,
            db,
            ld_db,
            deta,
            accumulate,
            workspace,
            workspace_len,
        )
    })
}

/// The merged weight `out = exp(G) w = w + A (φ1(Z) (C w))` of `w` (d×k) (eq. 30, merge: pass
/// `W0`), or with `inverse = 1` the unmerge `out = exp(−G) w` (Prop. 3), into `out` (d×k); with
/// `right = 1` the same on the right, `out = w exp(±G)` for a k×d `w` (the right generator of
/// double-sided ELRA, App. B eq. 22). f64.
///
/// # Safety
/// As [`elra_op_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_merge_f64(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    a: *const f64,
    ld_a: usize,
    b: *const f64,
    ld_b: usize,
    eta: f64,
    w: *const f64,
    ld_w: usize,
    inverse: u32,
    right: u32,
    out: *mut f64,
    ld_out: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        merge_t(
            desc, step, a, ld_a, b, ld_b, eta, w, ld_w, inverse, right, out, ld_out,
        )
    })
}

/// [`elra_op_merge_f64`] for f32.
///
/// # Safety
/// As [`elra_op_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_merge_f32(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: f32,
    w: *const f32,
    ld_w: usize,
    inverse: u32,
    right: u32,
    out: *mut f32,
    ld_out: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        merge_t(
            desc, step, a, ld_a, b, ld_b, eta, w, ld_w, inverse, right, out, ld_out,
        )
    })
}

/// The energy penalty `*energy = λ‖G‖²_F` of the step's generator (eq. 20–21, λ = `step->lambda`)
/// and, when `da` is not NULL, its gradient written or added into `da`, `db` (not for PSD) and
/// `*deta`. f64.
///
/// # Safety
/// As [`elra_op_forward_f64`]; `da`, `db`, `deta` may be NULL together.
#[no_mangle]
pub unsafe extern "C" fn elra_op_energy_f64(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    a: *const f64,
    ld_a: usize,
    b: *const f64,
    ld_b: usize,
    eta: f64,
    energy: *mut f64,
    da: *mut f64,
    ld_da: usize,
    db: *mut f64,
    ld_db: usize,
    deta: *mut f64,
    accumulate: u32,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        energy_t(
            desc, step, a, ld_a, b, ld_b, eta, energy, da, ld_da, db, ld_db, deta, accumulate,
        )
    })
}

/// [`elra_op_energy_f64`] for f32.
///
/// # Safety
/// As [`elra_op_energy_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_energy_f32(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    a: *const f32,
    ld_a: usize,
    b: *const f32,
    ld_b: usize,
    eta: f32,
    energy: *mut f32,
    da: *mut f32,
    ld_da: usize,
    db: *mut f32,
    ld_db: usize,
    deta: *mut f32,
    accumulate: u32,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        energy_t(
            desc, step, a, ld_a, b, ld_b, eta, energy, da, ld_da, db, ld_db, deta, accumulate,
        )
    })
}
