//! The multi-adapter forward ([`crate::ops::multi_forward`]) on caller memory: a set of
//! [`ElraMultiAdapter`] descriptions of one layer's adapters and a per-row adapter index.

use super::super::layout::check_scalar_out;
use super::super::{guard, CError, CResult, ElraStatus};
use super::buffers::{arr, mat, no_overlap, slice_mut, view, view_mut, Buf};
use super::{step_of, ElraOpStep};
use crate::capi::config::variant_of;
use crate::linalg::Real;
use crate::ops::{self, Generator, MultiAdapter};
use crate::ElraError;

/// Most adapters one call accepts.
const MAX_ADAPTERS: usize = 1 << 16;

/// One adapter of a layer's set for [`elra_op_multi_forward_f64`]. `variant` is an
/// [`super::super::ElraVariant`] value: general, PSD or Hyb (ELRA: `A` d×r, `B` r×d or NULL for
/// PSD, `eta` the trained η, `step` the settings of its step from [`super::elra_schedule_at`]),
/// or LoRA (`a` = `lora_A` r×k, `b` = `lora_B` d×r, `eta` the scaling `s = lora_alpha/r`,
/// `step` ignored). `a` and `b` point to row-major matrices of the call's element type with
/// leading dimensions `ld_a`, `ld_b`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ElraMultiAdapter {
    /// An `ElraVariant` value.
    pub variant: u32,
    /// Rank r.
    pub r: usize,
    /// ELRA's `A` (d×r) or LoRA's `lora_A` (r×k).
    pub a: *const std::ffi::c_void,
    /// Leading dimension of `a`.
    pub ld_a: usize,
    /// ELRA's `B` (r×d; NULL for PSD) or LoRA's `lora_B` (d×r).
    pub b: *const std::ffi::c_void,
    /// Leading dimension of `b`.
    pub ld_b: usize,
    /// ELRA: the trained η > 0; LoRA: the scaling s.
    pub eta: f64,
    /// ELRA: α, η multiplier, τ of the adapter's step (λ unused); LoRA: ignored.
    pub step: ElraOpStep,
}

/// The workspace, in values of the call's type, of a multi-adapter forward of `n` rows of a d×k
/// layer whose largest adapter rank is `max_r` ([`crate::ops::multi_workspace_len`]).
///
/// # Safety
/// `workspace_len` must point to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn elra_op_multi_workspace(
    n: usize,
    d: usize,
    k: usize,
    max_r: usize,
    workspace_len: *mut usize,
) -> ElraStatus {
    guard(|| {
        check_scalar_out("workspace_len", workspace_len)?;
        let w = ops::multi_workspace_len(n, d, k, max_r)
            .ok_or_else(|| ElraError::invalid("n", "the workspace size overflows"))?;
        // SAFETY: checked non-null and aligned; the caller guarantees writability.
        unsafe { workspace_len.write(w) };
        Ok(())
    })
}

/// An error about adapter `i` of a multi call's list, as `ELRA_INVALID_ARGUMENT` on `adapters`
/// naming the adapter (a NULL factor included: the list entry is what is wrong).
pub(crate) fn about_adapter(i: usize, e: CError) -> CError {
    let why = match e {
        CError::Elra(e) => e.to_string(),
        CError::Null(arg) => format!("`{arg}` is NULL"),
    };
    CError::Elra(ElraError::invalid(
        "adapters",
        format!("adapter {i}: {why}"),
    ))
}

/// An adapter's description with its checked buffers.
struct Described {
    variant: Option<crate::adapter::Variant>,
    r: usize,
    a: Buf,
    ld_a: usize,
    b: Option<Buf>,
    ld_b: usize,
    eta: f64,
    step: ElraOpStep,
}

/// # Safety
/// Every pointer covers its described layout (export docs).
#[allow(clippy::too_many_arguments)]
unsafe fn multi_forward_t<T: Real>(
    adapters: *const ElraMultiAdapter,
    count: usize,
    index: *const i32,
    n: usize,
    w0: *const T,
    ld_w0: usize,
    d: usize,
    k: usize,
    bias: *const T,
    x: *const T,
    ld_x: usize,
    y: *mut T,
    ld_y: usize,
    workspace: *mut T,
    workspace_len: usize,
) -> CResult<()> {
    if count > MAX_ADAPTERS {
        return Err(ElraError::invalid(
            "count",
            format!("{count} adapters; at most {MAX_ADAPTERS}"),
        )
        .into());
    }
    if count > 0 && adapters.is_null() {
        return Err(CError::Null("adapters"));
    }
    if d == 0 || k == 0 || n == 0 {
        return Err(ElraError::invalid(
            "n, d, k",
            format!("n = {n}, d = {d}, k = {k}: each must be ≥ 1"),
        )
        .into());
    }
    let mut described = Vec::new();
    described
        .try_reserve_exact(count)
        .map_err(|_| ElraError::out_of_memory("adapter descriptions", count * 64))?;
    for i in 0..count {
        // SAFETY: non-null; the caller guarantees `count` readable descriptions (plain data).
        let m = unsafe { adapters.add(i).read_unaligned() };
        let tag = |e: CError| about_adapter(i, e);
        let variant = variant_of(m.variant).map_err(tag)?;
        let r = m.r;
        if r == 0 || r > d {
            return Err(tag(ElraError::invalid(
                "r",
                format!("{r} is not in 1 … {d}"),
            )
            .into()));
        }
        let (a, b) = match variant {
            Some(v) => (
                mat("a", m.a.cast::<T>(), d, r, m.ld_a, false).map_err(tag)?,
                v.uses_b()
                    .then(|| mat("b", m.b.cast::<T>(), r, d, m.ld_b, false))
                    .transpose()
                    .map_err(tag)?,
            ),
            None => (
                mat("a", m.a.cast::<T>(), r, k, m.ld_a, false).map_err(tag)?,
                Some(mat("b", m.b.cast::<T>(), d, r, m.ld_b, false).map_err(tag)?),
            ),
        };
        if variant.is_some() {
            step_of(&m.step).map_err(tag)?;
        }
        described.push(Described {
            variant,
            r,
            a,
            ld_a: m.ld_a,
            b,
            ld_b: m.ld_b,
            eta: m.eta,
            step: m.step,
        });
    }
    let max_r = described.iter().map(|a| a.r).max().unwrap_or(0);
    let need = ops::multi_workspace_len(n, d, k, max_r)
        .ok_or_else(|| ElraError::invalid("n", "the workspace size overflows"))?;
    if workspace_len < need {
        return Err(ElraError::invalid(
            "workspace_len",
            format!("{workspace_len} < {need} (elra_op_multi_workspace)"),
        )
        .into());
    }
    let mut bufs = vec![
        mat("w0", w0, d, k, ld_w0, false)?,
        mat("x", x, n, k, ld_x, false)?,
        arr("index", index, n, false)?,
        mat("y", y.cast_const(), n, d, ld_y, true)?,
        arr("workspace", workspace.cast_const(), workspace_len, true)?,
    ];
    let bias_b = (!bias.is_null())
        .then(|| arr("bias", bias, d, false))
        .transpose()?;
    bufs.extend(bias_b);
    for a in &described {
        bufs.push(a.a);
        bufs.extend(a.b);
    }
    no_overlap(&bufs)?;
    // SAFETY: every buffer was checked above and the outputs overlap nothing; the export's
    // caller guarantees the described memory is valid for the call.
    unsafe {
        let set: Vec<MultiAdapter<'_, T>> = described
            .iter()
            .map(|a| match a.variant {
                Some(variant) => MultiAdapter::Elra {
                    variant,
                    generator: Generator {
                        a: view(&a.a, d, a.r, a.ld_a),
                        b: a.b.as_ref().map(|b| view(b, a.r, d, a.ld_b)),
                        eta: T::of(a.eta),
                    },
                    spec: step_of(&a.step).expect("checked above"),
                },
                None => MultiAdapter::Lora {
                    a: view(&a.a, a.r, k, a.ld_a),
                    b: view(a.b.as_ref().expect("LoRA has B"), d, a.r, a.ld_b),
                    scale: T::of(a.eta),
                },
            })
            .collect();
        let index_s = std::slice::from_raw_parts(index, n);
        let bias_s = bias_b.map(|b| std::slice::from_raw_parts(b.start as *const T, d));
        ops::multi_forward(
            view(&bufs[0], d, k, ld_w0),
            bias_s,
            &set,
            index_s,
            view(&bufs[1], n, k, ld_x),
            &mut view_mut(&bufs[3], n, d, ld_y),
            slice_mut(&bufs[4], workspace_len),
        )?;
    }
    Ok(())
}

/// Many adapters of one layer in one batch, f64 ([`crate::ops::multi_forward`]): row `i` of
/// `x` (n×k) goes through adapter `index[i]` of `adapters` (`count` descriptions; `−1`: the base
/// layer alone), `y_i = x_i W0ᵀ + bias + Δ_{index[i]}(x_i)` into `y` (n×d), with ELRA's
/// `Δ(x) = ((u Cᵀ) φ1(C A)ᵀ) Aᵀ`, `u = x W0ᵀ` (eq. 3, eq. 5 on the base output, Prop. 1) and
/// LoRA's `Δ(x) = s (x Aᵀ) Bᵀ`. The frozen GEMM runs once for the batch; the adapters' rows are
/// grouped by adapter. `w0` is d×k, `bias` d values or NULL; `workspace` holds `workspace_len`
/// values ([`elra_op_multi_workspace`]). Forward only (inference). An index outside the set,
/// an adapter's bad description (named by its number) or a non-finite input is an error.
///
/// # Safety
/// Every non-NULL pointer must cover its described layout, readable (inputs) or writable
/// (outputs), for the duration of the call; `adapters` holds `count` descriptions.
#[no_mangle]
pub unsafe extern "C" fn elra_op_multi_forward_f64(
    adapters: *const ElraMultiAdapter,
    count: usize,
    index: *const i32,
    n: usize,
    w0: *const f64,
    ld_w0: usize,
    d: usize,
    k: usize,
    bias: *const f64,
    x: *const f64,
    ld_x: usize,
    y: *mut f64,
    ld_y: usize,
    workspace: *mut f64,
    workspace_len: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        multi_forward_t(
            adapters,
            count,
            index,
            n,
            w0,
            ld_w0,
            d,
            k,
            bias,
            x,
            ld_x,
            y,
            ld_y,
            workspace,
            workspace_len,
        )
    })
}

/// [`elra_op_multi_forward_f64`] for f32 (the factors `a`, `b` of every adapter are f32 too).
///
/// # Safety
/// As [`elra_op_multi_forward_f64`].
#[no_mangle]
pub unsafe extern "C" fn elra_op_multi_forward_f32(
    adapters: *const ElraMultiAdapter,
    count: usize,
    index: *const i32,
    n: usize,
    w0: *const f32,
    ld_w0: usize,
    d: usize,
    k: usize,
    bias: *const f32,
    x: *const f32,
    ld_x: usize,
    y: *mut f32,
    ld_y: usize,
    workspace: *mut f32,
    workspace_len: usize,
) -> ElraStatus {
    // SAFETY: the caller's contract is forwarded unchanged.
    guard(|| unsafe {
        multi_forward_t(
            adapters,
            count,
            index,
            n,
            w0,
            ld_w0,
            d,
            k,
            bias,
            x,
            ld_x,
            y,
            ld_y,
            workspace,
            workspace_len,
        )
    })
}
