//! Caller buffers of the functional calls: checked descriptions first ([`Buf`]: non-null,
//! aligned, in the address space, not overlapping an output), references only afterwards.

use super::super::layout::{check_scalar_out, Layout};
use super::super::{check_in, check_out, CError, CResult};
use crate::grad::ops::{Strided, StridedMut};
use crate::linalg::Real;
use crate::ops::{self, ElraOp, Generator, GeneratorGrads};
use crate::ElraError;

/// A caller buffer of the call, described before any reference to it exists.
#[derive(Clone, Copy)]
pub(super) struct Buf {
    pub(super) arg: &'static str,
    pub(super) start: usize,
    pub(super) bytes: usize,
    pub(super) out: bool,
}

/// A caller matrix (`rows×cols`, leading dimension `ld`) of `T`, checked: non-null, aligned,
/// `ld ≥ cols`, span within the address space.
pub(super) fn mat<T>(
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
    let bytes = ((rows - 1) * ld + cols) * std::mem::size_of::<T>();
    // The overlap test adds start and length: both must stay inside the address space.
    if (p as usize).checked_add(bytes).is_none() {
        return Err(
            ElraError::invalid(arg, "the buffer runs past the end of the address space").into(),
        );
    }
    Ok(Buf {
        arg,
        start: p as usize,
        bytes,
        out,
    })
}

/// A dense caller array of `len` values of `T`.
pub(super) fn arr<T>(arg: &'static str, p: *const T, len: usize, out: bool) -> CResult<Buf> {
    mat(arg, p, 1, len.max(1), len.max(1), out)
}

/// Outputs may overlap nothing else of the call.
pub(super) fn no_overlap(bufs: &[Buf]) -> CResult<()> {
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
pub(super) unsafe fn view<'a, T: Real>(
    b: &Buf,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Strided<'a, T> {
    // SAFETY: checked span and alignment; readable per the caller's contract.
    let s = unsafe {
        std::slice::from_raw_parts(b.start as *const T, b.bytes / std::mem::size_of::<T>())
    };
    Strided::row_major(s, rows, cols, ld).expect("span checked by `mat`")
}

/// # Safety
/// As [`view`], for writing; `b` overlaps no other buffer of the call ([`no_overlap`]).
pub(super) unsafe fn view_mut<'a, T: Real>(
    b: &Buf,
    rows: usize,
    cols: usize,
    ld: usize,
) -> StridedMut<'a, T> {
    // SAFETY: checked span and alignment; writable and unaliased per the caller's contract and
    // `no_overlap`.
    let s = unsafe {
        std::slice::from_raw_parts_mut(b.start as *mut T, b.bytes / std::mem::size_of::<T>())
    };
    StridedMut::row_major(s, rows, cols, ld).expect("span checked by `mat`")
}

/// # Safety
/// As [`view_mut`], for a dense array of `len` values.
pub(super) unsafe fn slice_mut<'a, T>(b: &Buf, len: usize) -> &'a mut [T] {
    // SAFETY: as `view_mut`.
    unsafe { std::slice::from_raw_parts_mut(b.start as *mut T, len) }
}

/// The generator's buffers (`A` d×r, `B` r×d when the variant has it).
pub(super) fn gen_bufs<T>(
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
pub(super) unsafe fn generator<'a, T: Real>(
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
pub(super) fn grad_bufs<T>(
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
pub(super) unsafe fn grads<'a, T: Real>(
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
pub(in crate::capi) fn flag(arg: &'static str, v: u32) -> CResult<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(ElraError::invalid(arg, format!("must be 0 or 1, got {v}")).into()),
    }
}

pub(super) fn finite_eta<T: Real>(eta: T) -> CResult<T> {
    crate::adapter::config::check_eta(eta)?;
    Ok(eta)
}

/// The values `n` rows need: `(saved, workspace)`.
pub(super) fn sizes(op: &ElraOp, n: usize) -> CResult<(usize, usize)> {
    if n == 0 {
        return Err(ElraError::invalid("n", "the batch is empty").into());
    }
    let too_big = || CError::from(ElraError::invalid("n", "n·r overflows"));
    Ok((
        ops::saved_len(n, op.r).ok_or_else(too_big)?,
        ops::workspace_len(n, op.r).ok_or_else(too_big)?,
    ))
}
