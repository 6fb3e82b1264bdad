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
use super::layout::{check_scalar_out, Layout};
use super::{check_in, check_out, guard, CError, CResult, ElraAdapterConfig, ElraStatus};
use crate::adapter::GeneratorSpec;
use crate::grad::ops::{Strided, StridedMut};
use crate::linalg::Real;
use crate::ops::{self, ElraOp, Generator, GeneratorGrads};
use crate::ElraError;

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

/// A caller buffer of the call, described before any reference to it exists.
#[derive(Clone, Copy)]
struct Buf {
    arg: &'static str,
    start: usize,
    bytes: usize,
    out: bool,
}

/// A caller matrix (`rows×cols`, leading dimension `ld`) of `T`, checked: non-null, aligned,
/// `ld ≥ cols`, span within the address space.
fn mat<T>(
    arg: &'static str,
    p: *const T,
    rows: usize,
    cols: usize,
    ld: usize,
    out: bool,
) -> CResult<Buf> {
    let l = Layout {
        batch: 1,
        rows,
        cols,
        ld,
        stride: 0,
    };
    if out {
        check_out(arg, p.cast_mut(), &l)?;
    } else {
        check_in(arg, p, &l)?;
    }
    Ok(Buf {
        arg,
        start: p as usize,
        bytes: ((rows - 1) * ld + cols) * std::mem::size_of::<T>(),
        out,
    })
}

/// A dense caller array of `len` values of `T`.
fn arr<T>(arg: &'static str, p: *const T, len: usize, out: bool) -> CResult<Buf> {
    mat(arg, p, 1, len.max(1), len.max(1), out)
}

/// Outputs may overlap nothing else of the call.
fn no_overlap(bufs: &[Buf]) -> CResult<()> {
    for (i, o) in bufs.iter().enumerate().filter(|(_, b)| b.out) {
        for (j, m) in bufs.iter().enumerate() {
            if i != j && o.start < m.start + m.bytes && m.start < o.start + o.bytes {
                return Err(ElraError::invalid(
                    o.arg,
                    format!("overlaps `{}` (outputs may not alias other buffers)", m.arg),
                )
                .into());
            }
        }
    }
    Ok(())
}

/// # Safety
/// `b` was checked by [`mat`]; the caller guarantees the memory is readable for the call.
unsafe fn view<'a, T: Real>(b: &Buf, rows: usize, cols: usize, ld: usize) -> Strided<'a, T> {
    // SAFETY: checked span and alignment; readable per the caller's contract.
    let s = unsafe {
        std::slice::from_raw_parts(b.start as *const T, b.bytes / std::mem::size_of::<T>())
    };
    Strided::row_major(s, rows, cols, ld).expect("span checked by `mat`")
}

/// # Safety
/// As [`view`], for writing; `b` overlaps no other buffer of the call ([`no_overlap`]).
unsafe fn view_mut<'a, T: Real>(b: &Buf, rows: usize, cols: usize, ld: usize) -> StridedMut<'a, T> {
    // SAFETY: checked span and alignment; writable and unaliased per the caller's contract and
    // `no_overlap`.
    let s = unsafe {
        std::slice::from_raw_parts_mut(b.start as *mut T, b.bytes / std::mem::size_of::<T>())
    };
    StridedMut::row_major(s, rows, cols, ld).expect("span checked by `mat`")
}

/// # Safety
/// As [`view_mut`], for a dense array of `len` values.
unsafe fn slice_mut<'a, T>(b: &Buf, len: usize) -> &'a mut [T] {
    // SAFETY: as `view_mut`.
    unsafe { std::slice::from_raw_parts_mut(b.start as *mut T, len) }
}

/// The generator's buffers (`A` d×r, `B` r×d when the variant has it).
fn gen_bufs<T>(
    op: &ElraOp,
    a: *const T,
    ld_a: usize,
    b: *const T,
    ld_b: usize,
) -> CResult<(Buf, Option<Buf>)> {
    let ab = mat("a", a, op.d, op.r, ld_a, false)?;
    let bb = if op.variant.uses_b() {
        Some(mat("b", b, op.r, op.d, ld_b, false)?)
    } else {
        None
    };
    Ok((ab, bb))
}

/// # Safety
/// The buffers were checked by [`gen_bufs`]; readable for the call.
unsafe fn generator<'a, T: Real>(
    op: &ElraOp,
    ab: &Buf,
    bb: &Option<Buf>,
    ld_a: usize,
    ld_b: usize,
    eta: T,
) -> Generator<'a, T> {
    Generator {
        // SAFETY: forwarded.
        a: unsafe { view(ab, op.d, op.r, ld_a) },
        // SAFETY: forwarded.
        b: bb.as_ref().map(|b| unsafe { view(b, op.r, op.d, ld_b) }),
        eta,
    }
}

/// Gradient buffers (`da` d×r, `db` r×d when the variant has `B`, `deta`).
fn grad_bufs<T>(
    op: &ElraOp,
    da: *mut T,
    ld_da: usize,
    db: *mut T,
    ld_db: usize,
    deta: *mut T,
) -> CResult<Vec<Buf>> {
    let mut v = vec![mat("da", da.cast_const(), op.d, op.r, ld_da, true)?];
    if op.variant.uses_b() {
        v.push(mat("db", db.cast_const(), op.r, op.d, ld_db, true)?);
    }
    check_scalar_out("deta", deta)?;
    v.push(arr("deta", deta.cast_const(), 1, true)?);
    Ok(v)
}

/// # Safety
/// `bufs` came from [`grad_bufs`] and passed [`no_overlap`]; writable for the call.
unsafe fn grads<'a, T: Real>(
    op: &ElraOp,
    bufs: &[Buf],
    ld_da: usize,
    ld_db: usize,
    accumulate: u32,
) -> CResult<GeneratorGrads<'a, 'a, T>> {
    let accumulate = match accumulate {
        0 => false,
        1 => true,
        v => {
            return Err(ElraError::invalid("accumulate", format!("must be 0 or 1, got {v}")).into())
        }
    };
    let has_b = op.variant.uses_b();
    Ok(GeneratorGrads {
        // SAFETY: forwarded.
        a: unsafe { view_mut(&bufs[0], op.d, op.r, ld_da) },
        // SAFETY: forwarded.
        b: has_b.then(|| unsafe { view_mut(&bufs[1], op.r, op.d, ld_db) }),
        // SAFETY: forwarded; one value.
        eta: unsafe { &mut slice_mut::<T>(&bufs[bufs.len() - 1], 1)[0] },
        accumulate,
    })
}

/// A 0/1 flag argument.
pub(super) fn flag(arg: &'static str, v: u32) -> CResult<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(ElraError::invalid(arg, format!("must be 0 or 1, got {v}")).into()),
    }
}

fn finite_eta<T: Real>(eta: T) -> CResult<T> {
    crate::adapter::config::check_eta(eta)?;
    Ok(eta)
}

/// The values `n` rows need: `(saved, workspace)`.
fn sizes(op: &ElraOp, n: usize) -> CResult<(usize, usize)> {
    if n == 0 {
        return Err(ElraError::invalid("n", "the batch is empty").into());
    }
    let too_big = || CError::from(ElraError::invalid("n", "n·r overflows"));
    Ok((
        ops::saved_len(n, op.r).ok_or_else(too_big)?,
        ops::workspace_len(n, op.r).ok_or_else(too_big)?,
    ))
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
/// and its backward reads (N·r + 2·r²: LoRA's N×r activation plus two r×r matrices, besides the
/// input the engine keeps) and of the `workspace` a call needs (3·N·r).
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

/// # Safety
/// Every pointer covers its described layout (export docs).
#[allow(clippy::too_many_arguments)]
unsafe fn forward_t<T: Real>(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    w0: *const T,
    ld_w0: usize,
    base: u32,
    bias: *const T,
    a: *const T,
    ld_a: usize,
    b: *const T,
    ld_b: usize,
    eta: T,
    x: *const T,
    ld_x: usize,
    dropout: *const T,
    y: *mut T,
    ld_y: usize,
    saved: *mut T,
    workspace: *mut T,
    workspace_len: usize,
) -> CResult<()> {
    let op = desc_of(desc)?;
    let spec = step_of(step)?;
    let eta = finite_eta(eta)?;
    let with_base = flag("base", base)?;
    if !with_base && !bias.is_null() {
        return Err(ElraError::invalid("bias", "a bias needs base = 1").into());
    }
    let (ns, nw) = sizes(&op, n)?;
    let (d, k) = (op.d, op.k);
    let (ab, bb) = gen_bufs(&op, a, ld_a, b, ld_b)?;
    let mut bufs = vec![
        mat("w0", w0, d, k, ld_w0, false)?,
        mat("x", x, n, k, ld_x, false)?,
        ab,
        mat("y", y.cast_const(), n, d, ld_y, true)?,
        arr("saved", saved.cast_const(), ns, true)?,
        arr(
            "workspace",
            workspace.cast_const(),
            workspace_len.max(1),
            true,
        )?,
    ];
    bufs.extend(bb);
    let bias_b = (!bias.is_null())
        .then(|| arr("bias", bias, d, false))
        .transpose()?;
    let drop_b = (!dropout.is_null())
        .then(|| mat("dropout", dropout, n, d, d, false))
        .transpose()?;
    bufs.extend(bias_b);
    bufs.extend(drop_b);
    no_overlap(&bufs)?;
    if workspace_len < nw {
        return Err(ElraError::invalid(
            "workspace_len",
            format!("{workspace_len} < {nw} (elra_op_sizes)"),
        )
        .into());
    }
    // SAFETY: every buffer was checked above and the outputs overlap nothing; the export's
    // caller guarantees the described memory is valid for the call.
    unsafe {
        let g = generator(&op, &bufs[2], &bb, ld_a, ld_b, eta);
        let bias_s = bias_b.map(|bb| std::slice::from_raw_parts(bb.start as *const T, d));
        let base = if with_base {
            ops::Base::Included { bias: bias_s }
        } else {
            ops::Base::Excluded
        };
        ops::forward(
            &op,
            view(&bufs[0], d, k, ld_w0),
            base,
            &g,
            &spec,
            view(&bufs[1], n, k, ld_x),
            drop_b.map(|m| view(&m, n, d, d)),
            &mut view_mut(&bufs[3], n, d, ld_y),
            slice_mut(&bufs[4], ns),
            slice_mut(&bufs[5], workspace_len),
        )?;
    }
    Ok(())
}

/// # Safety
/// Every pointer covers its described layout (export docs).
#[allow(clippy::too_many_arguments)]
unsafe fn backward_t<T: Real>(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    w0: *const T,
    ld_w0: usize,
    base: u32,
    a: *const T,
    ld_a: usize,
    b: *const T,
    ld_b: usize,
    eta: T,
    x: *const T,
    ld_x: usize,
    dropout: *const T,
    saved: *const T,
    dy: *const T,
    ld_dy: usize,
    dx: *mut T,
    ld_dx: usize,
    da: *mut T,
    ld_da: usize,
    db: *mut T,
    ld_db: usize,
    deta: *mut T,
    accumulate: u32,
    workspace: *mut T,
    workspace_len: usize,
) -> CResult<()> {
    let op = desc_of(desc)?;
    let spec = step_of(step)?;
    let eta = finite_eta(eta)?;
    let with_base = flag("base", base)?;
    let (ns, nw) = sizes(&op, n)?;
    let (d, k) = (op.d, op.k);
    let (ab, bb) = gen_bufs(&op, a, ld_a, b, ld_b)?;
    let gb = grad_bufs(&op, da, ld_da, db, ld_db, deta)?;
    let mut bufs = vec![
        mat("w0", w0, d, k, ld_w0, false)?,
        mat("x", x, n, k, ld_x, false)?,
        arr("saved", saved, ns, false)?,
        mat("dy", dy, n, d, ld_dy, false)?,
        mat("dx", dx.cast_const(), n, k, ld_dx, true)?,
        arr(
            "workspace",
            workspace.cast_const(),
            workspace_len.max(1),
            true,
        )?,
        ab,
    ];
    let drop_b = (!dropout.is_null())
        .then(|| mat("dropout", dropout, n, d, d, false))
        .transpose()?;
    bufs.extend(bb);
    bufs.extend(drop_b);
    bufs.extend(gb.iter().copied());
    no_overlap(&bufs)?;
    if workspace_len < nw {
        return Err(ElraError::invalid(
            "workspace_len",
            format!("{workspace_len} < {nw} (elra_op_sizes)"),
        )
        .into());
    }
    // SAFETY: as in `forward_t`.
    unsafe {
        let g = generator(&op, &bufs[6], &bb, ld_a, ld_b, eta);
        let saved_s = std::slice::from_raw_parts(bufs[2].start as *const T, ns);
        let out = grads(&op, &gb, ld_da, ld_db, accumulate)?;
        ops::backward(
            &op,
            view(&bufs[0], d, k, ld_w0),
            with_base,
            &g,
            &spec,
            view(&bufs[1], n, k, ld_x),
            drop_b.map(|m| view(&m, n, d, d)),
            saved_s,
            view(&bufs[3], n, d, ld_dy),
            &mut view_mut(&bufs[4], n, k, ld_dx),
            out,
            slice_mut(&bufs[5], workspace_len),
        )?;
    }
    Ok(())
}

/// # Safety
/// Every pointer covers its described layout (export docs).
#[allow(clippy::too_many_arguments)]
unsafe fn forward_out_t<T: Real>(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    a: *const T,
    ld_a: usize,
    b: *const T,
    ld_b: usize,
    eta: T,
    u: *const T,
    ld_u: usize,
    dropout: *const T,
    y: *mut T,
    ld_y: usize,
    saved: *mut T,
    workspace: *mut T,
    workspace_len: usize,
) -> CResult<()> {
    let op = desc_of(desc)?;
    let spec = step_of(step)?;
    let eta = finite_eta(eta)?;
    let (ns, nw) = sizes(&op, n)?;
    let d = op.d;
    let (ab, bb) = gen_bufs(&op, a, ld_a, b, ld_b)?;
    let mut bufs = vec![
        mat("u", u, n, d, ld_u, false)?,
        mat("y", y.cast_const(), n, d, ld_y, true)?,
        arr("saved", saved.cast_const(), ns, true)?,
        arr(
            "workspace",
            workspace.cast_const(),
            workspace_len.max(1),
            true,
        )?,
        ab,
    ];
    let drop_b = (!dropout.is_null())
        .then(|| mat("dropout", dropout, n, d, d, false))
        .transpose()?;
    bufs.extend(bb);
    bufs.extend(drop_b);
    no_overlap(&bufs)?;
    if workspace_len < nw {
        return Err(ElraError::invalid(
            "workspace_len",
            format!("{workspace_len} < {nw} (elra_op_sizes)"),
        )
        .into());
    }
    // SAFETY: as in `forward_t`.
    unsafe {
        let g = generator(&op, &bufs[4], &bb, ld_a, ld_b, eta);
        ops::forward_out(
            &op,
            &g,
            &spec,
            view(&bufs[0], n, d, ld_u),
            drop_b.map(|m| view(&m, n, d, d)),
            &mut view_mut(&bufs[1], n, d, ld_y),
            slice_mut(&bufs[2], ns),
            slice_mut(&bufs[3], workspace_len),
        )?;
    }
    Ok(())
}

/// # Safety
/// Every pointer covers its described layout (export docs).
#[allow(clippy::too_many_arguments)]
unsafe fn backward_out_t<T: Real>(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    n: usize,
    a: *const T,
    ld_a: usize,
    b: *const T,
    ld_b: usize,
    eta: T,
    u: *const T,
    ld_u: usize,
    dropout: *const T,
    saved: *const T,
    dy: *const T,
    ld_dy: usize,
    du: *mut T,
    ld_du: usize,
    da: *mut T,
    ld_da: usize,
    db: *mut T,
    ld_db: usize,
    deta: *mut T,
    accumulate: u32,
    workspace: *mut T,
    workspace_len: usize,
) -> CResult<()> {
    let op = desc_of(desc)?;
    let spec = step_of(step)?;
    let eta = finite_eta(eta)?;
    let (ns, nw) = sizes(&op, n)?;
    let d = op.d;
    let (ab, bb) = gen_bufs(&op, a, ld_a, b, ld_b)?;
    let gb = grad_bufs(&op, da, ld_da, db, ld_db, deta)?;
    let mut bufs = vec![
        mat("u", u, n, d, ld_u, false)?,
        arr("saved", saved, ns, false)?,
        mat("dy", dy, n, d, ld_dy, false)?,
        mat("du", du.cast_const(), n, d, ld_du, true)?,
        arr(
            "workspace",
            workspace.cast_const(),
            workspace_len.max(1),
            true,
        )?,
        ab,
    ];
    let drop_b = (!dropout.is_null())
        .then(|| mat("dropout", dropout, n, d, d, false))
        .transpose()?;
    bufs.extend(bb);
    bufs.extend(drop_b);
    bufs.extend(gb.iter().copied());
    no_overlap(&bufs)?;
    if workspace_len < nw {
        return Err(ElraError::invalid(
            "workspace_len",
            format!("{workspace_len} < {nw} (elra_op_sizes)"),
        )
        .into());
    }
    // SAFETY: as in `forward_t`.
    unsafe {
        let g = generator(&op, &bufs[5], &bb, ld_a, ld_b, eta);
        let saved_s = std::slice::from_raw_parts(bufs[1].start as *const T, ns);
        let out = grads(&op, &gb, ld_da, ld_db, accumulate)?;
        ops::backward_out(
            &op,
            &g,
            &spec,
            view(&bufs[0], n, d, ld_u),
            drop_b.map(|m| view(&m, n, d, d)),
            saved_s,
            view(&bufs[2], n, d, ld_dy),
            &mut view_mut(&bufs[3], n, d, ld_du),
            out,
            slice_mut(&bufs[4], workspace_len),
        )?;
    }
    Ok(())
}

/// # Safety
/// Every pointer covers its described layout (export docs).
#[allow(clippy::too_many_arguments)]
unsafe fn merge_t<T: Real>(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    a: *const T,
    ld_a: usize,
    b: *const T,
    ld_b: usize,
    eta: T,
    w: *const T,
    ld_w: usize,
    inverse: u32,
    right: u32,
    out: *mut T,
    ld_out: usize,
) -> CResult<()> {
    let op = desc_of(desc)?;
    let spec = step_of(step)?;
    let eta = finite_eta(eta)?;
    let inverse = flag("inverse", inverse)?;
    let (side, rows, cols) = if flag("right", right)? {
        (ops::Side::Right, op.k, op.d)
    } else {
        (ops::Side::Left, op.d, op.k)
    };
    let (ab, bb) = gen_bufs(&op, a, ld_a, b, ld_b)?;
    let mut bufs = vec![
        mat("w", w, rows, cols, ld_w, false)?,
        mat("out", out.cast_const(), rows, cols, ld_out, true)?,
        ab,
    ];
    bufs.extend(bb);
    no_overlap(&bufs)?;
    // SAFETY: as in `forward_t`.
    unsafe {
        let g = generator(&op, &bufs[2], &bb, ld_a, ld_b, eta);
        ops::merge(
            &op,
            &g,
            &spec,
            view(&bufs[0], rows, cols, ld_w),
            inverse,
            side,
            &mut view_mut(&bufs[1], rows, cols, ld_out),
        )?;
    }
    Ok(())
}

/// # Safety
/// Every pointer covers its described layout (export docs); gradient pointers may all be NULL.
#[allow(clippy::too_many_arguments)]
unsafe fn energy_t<T: Real>(
    desc: *const ElraOpDesc,
    step: *const ElraOpStep,
    a: *const T,
    ld_a: usize,
    b: *const T,
    ld_b: usize,
    eta: T,
    energy: *mut T,
    da: *mut T,
    ld_da: usize,
    db: *mut T,
    ld_db: usize,
    deta: *mut T,
    accumulate: u32,
) -> CResult<()> {
    let op = desc_of(desc)?;
    let spec = step_of(step)?;
    let eta = finite_eta(eta)?;
    check_scalar_out("energy", energy)?;
    let (ab, bb) = gen_bufs(&op, a, ld_a, b, ld_b)?;
    let want_grads = !da.is_null();
    let mut bufs = vec![arr("energy", energy.cast_const(), 1, true)?, ab];
    bufs.extend(bb);
    let gb = if want_grads {
        grad_bufs(&op, da, ld_da, db, ld_db, deta)?
    } else {
        Vec::new()
    };
    bufs.extend(gb.iter().copied());
    no_overlap(&bufs)?;
    // SAFETY: as in `forward_t`.
    unsafe {
        let g = generator(&op, &bufs[1], &bb, ld_a, ld_b, eta);
        let out = if want_grads {
            Some(grads(&op, &gb, ld_da, ld_db, accumulate)?)
        } else {
            None
        };
        let e = ops::energy(&op, &g, &spec, out)?;
        energy.write(e);
    }
    Ok(())
}

/// The fused ELRA layer's forward on caller memory, f64 ([`crate::ops::forward`]):
/// `y = x W0ᵀ + bias + D∘(((x Pᵀ) φ1(Z)ᵀ) Aᵀ)` (with `base = 1`; `base = 0` writes only the
/// increment, for an engine that runs the frozen GEMM itself) with `C` from (A, B, η) and `step` (eq. 2,
/// §4.2.1, eq. 19, App. H), `Z = C A`, `P = C W0` (eq. 5, Prop. 1). `x` is n×k, `y` n×d; `w0`
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

/// Reverse mode of [`elra_op_forward_f64`] ([`crate::ops::backward`]): from `dy` (n×d) writes
/// `dx` (n×k; with `base = 0`, as in the forward, only the increment's `V̄ P`) and writes or adds (`accumulate` 0/1) `da` (d×r), `db` (r×d, not for PSD) and
/// `*deta`, the gradients of `⟨y, dy⟩` (no energy term: [`elra_op_energy_f64`]). `x`, the
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

/// The output-side form's forward, f64 ([`crate::ops::forward_out`]): `y = u + D∘(((u Cᵀ)
/// φ1(Z)ᵀ) Aᵀ)` for the base layer's output `u` (n×d, without bias) from any base layer
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

/// Reverse mode of [`elra_op_forward_out_f64`] ([`crate::ops::backward_out`]): `du = dy + V̄ C`
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
