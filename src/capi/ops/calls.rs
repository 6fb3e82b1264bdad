//! The bodies of the functional exports, generic over the element type: check every buffer,
//! then call [`crate::ops`].

use super::super::layout::check_scalar_out;
use super::super::CResult;
use super::buffers::*;
use super::{desc_of, step_of, ElraOpDesc, ElraOpStep};
use crate::linalg::Real;
use crate::ops;
use crate::ElraError;

/// # Safety
/// Every pointer covers its described layout (export docs).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn forward_t<T: Real>(
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
pub(super) unsafe fn backward_t<T: Real>(
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
pub(super) unsafe fn forward_out_t<T: Real>(
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
pub(super) unsafe fn backward_out_t<T: Real>(
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
pub(super) unsafe fn merge_t<T: Real>(
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
pub(super) unsafe fn energy_t<T: Real>(
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
