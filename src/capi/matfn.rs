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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capi::{elra_last_error_message, ELRA_OK};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const SENTINEL: f64 = -12345.0;

    fn last_error() -> String {
        let mut buf = vec![0 as std::os::raw::c_char; 512];
        // SAFETY: buf holds 512 writable bytes.
        unsafe { elra_last_error_message(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: the message is NUL-terminated inside buf.
        let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        s.to_string_lossy().into_owned()
    }

    /// A strided batch: `batch` r×r matrices with leading dimension ld and stride, gaps filled
    /// with SENTINEL.
    fn strided(batch: usize, r: usize, ld: usize, stride: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
        let mut v = vec![SENTINEL; (batch - 1) * stride + (r - 1) * ld + r];
        for b in 0..batch {
            for i in 0..r {
                for j in 0..r {
                    v[b * stride + i * ld + j] = rng.random_range(-1.5..1.5);
                }
            }
        }
        v
    }

    #[test]
    fn strided_batches_match_the_matrix_functions_bit_for_bit_and_leave_gaps_alone() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (batch, r, ldz, sz, ldo, so) = (5, 4, 6, 30, 5, 23);
        let z = strided(batch, r, ldz, sz, &mut rng);
        for op in [Op::Expm, Op::Phi1] {
            let mut out = vec![SENTINEL; (batch - 1) * so + (r - 1) * ldo + r];
            let f = match op {
                Op::Expm => elra_expm_f64,
                Op::Phi1 => elra_phi1_f64,
            };
            // SAFETY: z and out are live vectors that cover the described layouts.
            let s = unsafe { f(batch, r, z.as_ptr(), ldz, sz, out.as_mut_ptr(), ldo, so) };
            assert_eq!(s, ELRA_OK);
            let mut written = 0;
            for b in 0..batch {
                let zm = DMatrix::from_fn(r, r, |i, j| z[b * sz + i * ldz + j]);
                let want = match op {
                    Op::Expm => linalg::expm(&zm).unwrap(),
                    Op::Phi1 => linalg::phi1(&zm).unwrap(),
                };
                for i in 0..r {
                    for j in 0..r {
                        // Same algorithm, same inputs: identical bits.
                        assert_eq!(out[b * so + i * ldo + j], want[(i, j)]);
                        written += 1;
                    }
                }
            }
            let untouched = out.iter().filter(|&&x| x == SENTINEL).count();
            assert_eq!(untouched + written, out.len(), "gaps must stay untouched");
        }
    }

    #[test]
    fn f32_phi1_matches_f64_within_f32_accuracy() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (batch, r) = (3, 5);
        let z = strided(batch, r, r, r * r, &mut rng);
        let z32: Vec<f32> = z.iter().map(|&x| x as f32).collect();
        let mut o64 = vec![0.0f64; z.len()];
        let mut o32 = vec![0.0f32; z.len()];
        // SAFETY: live vectors of batch·r·r entries, packed layout.
        let (s64, s32) = unsafe {
            (
                elra_phi1_f64(batch, r, z.as_ptr(), r, r * r, o64.as_mut_ptr(), r, r * r),
                elra_phi1_f32(batch, r, z32.as_ptr(), r, r * r, o32.as_mut_ptr(), r, r * r),
            )
        };
        assert_eq!((s64, s32), (ELRA_OK, ELRA_OK));
        // ‖Z‖₁ ≤ 7.5 here; φ1's condition number is modest, so a few hundred f32 ulps bound the
        // error of the f32 path relative to the f64 result (u₃₂ ≈ 6e-8 → 1e-5).
        let err = o64
            .iter()
            .zip(&o32)
            .map(|(a, &b)| (a - b as f64).abs())
            .fold(0.0, f64::max);
        let scale = o64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(
            err / scale < 1e-5,
            "f32 vs f64 relative error {}",
            err / scale
        );
    }

    #[test]
    fn in_place_use_with_identical_layout() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (batch, r, ld, st) = (2, 3, 4, 13);
        let z = strided(batch, r, ld, st, &mut rng);
        let mut want = vec![0.0; z.len()];
        let mut inplace = z.clone();
        // SAFETY: live vectors covering the layouts; the in-place call aliases with an identical
        // layout, which the contract allows.
        unsafe {
            assert_eq!(
                elra_phi1_f64(batch, r, z.as_ptr(), ld, st, want.as_mut_ptr(), ld, st),
                ELRA_OK
            );
            let p = inplace.as_mut_ptr();
            assert_eq!(elra_phi1_f64(batch, r, p, ld, st, p, ld, st), ELRA_OK);
        }
        for b in 0..batch {
            for i in 0..r {
                for j in 0..r {
                    let k = b * st + i * ld + j;
                    assert_eq!(inplace[k], want[k]);
                }
            }
        }
    }

    #[test]
    fn bad_arguments_return_codes_and_leave_out_untouched() {
        use ElraStatus::*;
        let z = vec![0.5f64; 64];
        let mut out = vec![SENTINEL; 64];
        let zp = z.as_ptr();
        let op = out.as_mut_ptr();
        let null_in: *const f64 = std::ptr::null();
        let null_out: *mut f64 = std::ptr::null_mut();
        // SAFETY: every call either fails validation before touching memory or describes memory
        // inside the 64-entry vectors.
        unsafe {
            assert_eq!(
                elra_phi1_f64(1, 2, null_in, 2, 4, op, 2, 4),
                ELRA_NULL_POINTER
            );
            assert!(last_error().contains("`z`"));
            assert_eq!(
                elra_phi1_f64(1, 2, zp, 2, 4, null_out, 2, 4),
                ELRA_NULL_POINTER
            );
            assert!(last_error().contains("`out`"));
            assert_eq!(
                elra_phi1_f64(0, 2, zp, 2, 4, op, 2, 4),
                ELRA_INVALID_ARGUMENT
            );
            assert_eq!(
                elra_phi1_f64(1, 0, zp, 2, 4, op, 2, 4),
                ELRA_INVALID_ARGUMENT
            );
            assert!(last_error().contains("`r`"));
            assert_eq!(
                elra_phi1_f64(1, 3, zp, 2, 9, op, 3, 9),
                ELRA_INVALID_ARGUMENT
            );
            assert!(last_error().contains("leading dimension"));
            assert_eq!(
                elra_phi1_f64(2, 3, zp, 3, 8, op, 3, 9),
                ELRA_INVALID_ARGUMENT
            );
            assert!(last_error().contains("overlap"));
            assert_eq!(
                elra_phi1_f64(3, 2, zp, 2, usize::MAX / 2, op, 2, 4),
                ELRA_INVALID_ARGUMENT
            );
            let misaligned = (zp as *const u8).add(1) as *const f64;
            assert_eq!(
                elra_phi1_f64(1, 2, misaligned, 2, 4, op, 2, 4),
                ELRA_INVALID_ARGUMENT
            );
            assert!(last_error().contains("aligned"));
            // NaN in the second matrix of a batch of three: nothing written.
            let mut zn = z.clone();
            zn[4 + 3] = f64::NAN;
            assert_eq!(
                elra_expm_f64(3, 2, zn.as_ptr(), 2, 4, op, 2, 4),
                ELRA_NON_FINITE
            );
            zn[4 + 3] = f64::INFINITY;
            assert_eq!(
                elra_phi1_f64(3, 2, zn.as_ptr(), 2, 4, op, 2, 4),
                ELRA_NON_FINITE
            );
            // Overflow in the last matrix of a batch: e^{200} is beyond f32.
            let mut zf = [0.1f32; 8];
            zf[4] = 200.0;
            let mut of = [-7.0f32; 8];
            let s = elra_expm_f32(2, 2, zf.as_ptr(), 2, 4, of.as_mut_ptr(), 2, 4);
            assert_eq!(s, ELRA_OVERFLOW);
            assert!(last_error().contains("batch item 1"), "{}", last_error());
            assert!(of.iter().all(|&x| x == -7.0), "outputs untouched on error");
            // Success clears the message.
            assert_eq!(elra_phi1_f64(1, 2, zp, 2, 4, op, 2, 4), ELRA_OK);
            assert_eq!(last_error(), "");
        }
        assert!(out[4..].iter().all(|&x| x == SENTINEL));
    }
}
