//! Batched r×r matrix functions on caller memory: `e^Z` and `φ1(Z)` (Prop. 1, eq. 4) in f32 and
//! f64, named `elra_{op}_{dtype}`.
//!
//! Every function takes a batch of `batch` row-major r×r matrices `z` (leading dimension `ldz`,
//! batch stride `stride_z`) and writes a batch of the same shape to `out` (`ld_out`,
//! `stride_out`); see the [module conventions](super). `out` may alias `z` with the same layout.
//! The batch is all-or-nothing: if any matrix fails (non-finite entry, overflow), nothing is
//! written and the message names the failing batch index.

use super::{check_in, check_out, guard, read_in, write_out, CError, CResult, ElraStatus, Layout};
use crate::linalg::{self, Real};
use crate::ElraError;
use nalgebra::DMatrix;

/// Which function of Z to evaluate.
#[derive(Clone, Copy, Debug)]
enum Op {
    Expm,
    Phi1,
}

/// Checks `(z, out)`, reads z, applies `op` to each matrix, writes out. Errors name the index.
///
/// # Safety
/// The export's caller guarantees that `z` and `out` point to memory described by their layouts.
#[allow(clippy::too_many_arguments)]
unsafe fn apply<T: Real>(
    op: Op,
    batch: usize,
    r: usize,
    z: *const T,
    ldz: usize,
    stride_z: usize,
    out: *mut T,
    ld_out: usize,
    stride_out: usize,
) -> CResult<()> {
    if r == 0 {
        return Err(ElraError::invalid("r", "r = 0: the matrices must be at least 1×1").into());
    }
    let lz = Layout {
        batch,
        rows: r,
        cols: r,
        ld: ldz,
        stride: stride_z,
    };
    let lo = Layout {
        batch,
        rows: r,
        cols: r,
        ld: ld_out,
        stride: stride_out,
    };
    check_in("z", z, &lz)?;
    check_out("out", out, &lo)?;
    // SAFETY: validated above; the export's caller guarantees the described memory is readable.
    let zin = unsafe { read_in("z", z, &lz)? };
    let rr = r * r;
    let mut res = vec![T::zero(); rr * batch];
    for (b, (zb, ob)) in zin
        .chunks_exact(rr)
        .zip(res.chunks_exact_mut(rr))
        .enumerate()
    {
        let zm = DMatrix::from_row_slice(r, r, zb);
        let m = match op {
            Op::Expm => linalg::expm(&zm),
            Op::Phi1 => linalg::phi1(&zm),
        }
        .map_err(|e| at_index(e, b))?;
        for i in 0..r {
            for j in 0..r {
                ob[i * r + j] = m[(i, j)];
            }
        }
    }
    // SAFETY: validated above; `res` has batch·r·r entries; the caller guarantees out is writable.
    unsafe { write_out(out, &lo, &res) };
    Ok(())
}

/// Adds the batch index to a per-matrix error message (keeping its variant, hence its status).
pub(crate) fn at_index(e: ElraError, b: usize) -> CError {
    let e = match e {
        ElraError::Overflow { what } => ElraError::Overflow {
            what: format!("batch item {b}: {what}"),
        },
        ElraError::Numerical(w) => ElraError::Numerical(format!("batch item {b}: {w}")),
        ElraError::InvalidArgument { arg, reason } => ElraError::InvalidArgument {
            arg,
            reason: format!("batch item {b}: {reason}"),
        },
        other => other,
    };
    CError::Elra(e)
}

/// Batched matrix exponential `out_b = e^{Z_b}` in f64 (Padé scaling and squaring,
/// Al-Mohy & Higham 2009 Alg. 5.1).
///
/// Arguments: `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`); `z` row-major with leading dimension
/// `ldz ≥ r` and batch stride `stride_z ≥ (r−1)·ldz + r` (ignored when `batch == 1`); `out`
/// likewise with `ld_out`, `stride_out`. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`,
/// `ELRA_INVALID_ARGUMENT` (dimensions, alignment), `ELRA_NON_FINITE` (NaN/Inf in z),
/// `ELRA_OVERFLOW` (result out of range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error `out` is
/// untouched.
///
/// # Safety
/// `z` must point to readable memory and `out` to writable memory covering the described
/// layouts; `out` may alias `z` only with an identical layout.
#[no_mangle]
pub unsafe extern "C" fn elra_expm_f64(
    batch: usize,
    r: usize,
    z: *const f64,
    ldz: usize,
    stride_z: usize,
    out: *mut f64,
    ld_out: usize,
    stride_out: usize,
) -> ElraStatus {
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe {
        apply::<f64>(
            Op::Expm,
            batch,
            r,
            z,
            ldz,
            stride_z,
            out,
            ld_out,
            stride_out,
        )
    })
}

/// Batched matrix exponential `out_b = e^{Z_b}` in f32 (Padé scaling and squaring,
/// Al-Mohy & Higham 2009 Alg. 5.1 with the f32 θ table).
///
/// Arguments: `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`); `z` row-major with leading dimension
/// `ldz ≥ r` and batch stride `stride_z ≥ (r−1)·ldz + r` (ignored when `batch == 1`); `out`
/// likewise with `ld_out`, `stride_out`. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`,
/// `ELRA_INVALID_ARGUMENT` (dimensions, alignment), `ELRA_NON_FINITE` (NaN/Inf in z),
/// `ELRA_OVERFLOW` (result out of range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error `out` is
/// untouched.
///
/// # Safety
/// `z` must point to readable memory and `out` to writable memory covering the described
/// layouts; `out` may alias `z` only with an identical layout.
#[no_mangle]
pub unsafe extern "C" fn elra_expm_f32(
    batch: usize,
    r: usize,
    z: *const f32,
    ldz: usize,
    stride_z: usize,
    out: *mut f32,
    ld_out: usize,
    stride_out: usize,
) -> ElraStatus {
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe {
        apply::<f32>(
            Op::Expm,
            batch,
            r,
            z,
            ldz,
            stride_z,
            out,
            ld_out,
            stride_out,
        )
    })
}

/// Batched `out_b = φ1(Z_b) = Σ Z_bⁿ/(n+1)!` in f64: the r×r factor of the Woodbury form
/// `exp(AC) = I + A φ1(CA) C` (Prop. 1, eq. 4).
///
/// Arguments: `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`); `z` row-major with leading dimension
/// `ldz ≥ r` and batch stride `stride_z ≥ (r−1)·ldz + r` (ignored when `batch == 1`); `out`
/// likewise with `ld_out`, `stride_out`. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`,
/// `ELRA_INVALID_ARGUMENT` (dimensions, alignment), `ELRA_NON_FINITE` (NaN/Inf in z),
/// `ELRA_OVERFLOW` (result out of range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error `out` is
/// untouched.
///
/// # Safety
/// `z` must point to readable memory and `out` to writable memory covering the described
/// layouts; `out` may alias `z` only with an identical layout.
#[no_mangle]
pub unsafe extern "C" fn elra_phi1_f64(
    batch: usize,
    r: usize,
    z: *const f64,
    ldz: usize,
    stride_z: usize,
    out: *mut f64,
    ld_out: usize,
    stride_out: usize,
) -> ElraStatus {
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe {
        apply::<f64>(
            Op::Phi1,
            batch,
            r,
            z,
            ldz,
            stride_z,
            out,
            ld_out,
            stride_out,
        )
    })
}

/// Batched `out_b = φ1(Z_b) = Σ Z_bⁿ/(n+1)!` in f32: the r×r factor of the Woodbury form
/// `exp(AC) = I + A φ1(CA) C` (Prop. 1, eq. 4).
///
/// Arguments: `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`); `z` row-major with leading dimension
/// `ldz ≥ r` and batch stride `stride_z ≥ (r−1)·ldz + r` (ignored when `batch == 1`); `out`
/// likewise with `ld_out`, `stride_out`. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`,
/// `ELRA_INVALID_ARGUMENT` (dimensions, alignment), `ELRA_NON_FINITE` (NaN/Inf in z),
/// `ELRA_OVERFLOW` (result out of range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error `out` is
/// untouched.
///
/// # Safety
/// `z` must point to readable memory and `out` to writable memory covering the described
/// layouts; `out` may alias `z` only with an identical layout.
#[no_mangle]
pub unsafe extern "C" fn elra_phi1_f32(
    batch: usize,
    r: usize,
    z: *const f32,
    ldz: usize,
    stride_z: usize,
    out: *mut f32,
    ld_out: usize,
    stride_out: usize,
) -> ElraStatus {
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe {
        apply::<f32>(
            Op::Phi1,
            batch,
            r,
            z,
            ldz,
            stride_z,
            out,
            ld_out,
            stride_out,
        )
    })
}
