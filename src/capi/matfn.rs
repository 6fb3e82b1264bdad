//! Batched r×r matrix functions on caller memory: `e^Z`, `φ1(Z)` (Prop. 1, eq. 4), both from one
//! factorisation, and the adjoint Fréchet derivatives `L_exp(Zᵀ, G)` and `L_φ1(Zᵀ, G)` used by the
//! reverse mode, in f32 and f64, named `elra_{op}_{dtype}`.
//!
//! Every function takes a batch of `batch` row-major r×r matrices `z` (leading dimension `ldz`,
//! batch stride `stride_z`) and writes batches of the same shape (`ld_*`, `stride_*` per output);
//! see the [module conventions](super). An output may alias an input with the same layout; two
//! outputs may not overlap. The batch is all-or-nothing: if any matrix fails (non-finite entry,
//! overflow), nothing is written and the message names the failing batch item. All matrices go
//! through one [`MatFnBatch`] workspace, so the results equal the single-matrix functions of
//! [`crate::linalg`] bit for bit.

use super::layout::{elements, reserve, try_with_capacity};
use super::{check_in, check_out, guard, read_in, write_out, CResult, ElraStatus, Layout};
use crate::linalg::{MatFnBatch, Real};
use crate::ElraError;

/// Which function of Z to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Expm,
    Phi1,
    ExpmPhi1,
    ExpmAdjoint,
    Phi1Adjoint,
}

/// A caller input batch: pointer, leading dimension, stride.
#[derive(Clone, Copy)]
struct In<T> {
    name: &'static str,
    p: *const T,
    ld: usize,
    stride: usize,
}

/// A caller output batch: pointer, leading dimension, stride.
#[derive(Clone, Copy)]
struct Out<T> {
    name: &'static str,
    p: *mut T,
    ld: usize,
    stride: usize,
}

impl<T> In<T> {
    /// The argument `name` of an export, as the caller passed it (checked later by `run`).
    fn new(name: &'static str, p: *const T, ld: usize, stride: usize) -> Self {
        In {
            name,
            p,
            ld,
            stride,
        }
    }
}

impl<T> Out<T> {
    /// The argument `name` of an export, as the caller passed it (checked later by `run`).
    fn new(name: &'static str, p: *mut T, ld: usize, stride: usize) -> Self {
        Out {
            name,
            p,
            ld,
            stride,
        }
    }
}

fn layout(batch: usize, r: usize, ld: usize, stride: usize) -> Layout {
    Layout {
        batch,
        rows: r,
        cols: r,
        ld,
        stride,
    }
}

/// Checks that every r×r matrix of the packed batch has a finite entrywise 1-norm `Σ|m_ij|`
/// (computed in f64), which bounds both its 1-norm and the 1-norm of its transpose.
fn check_norms<T: Real>(arg: &'static str, v: &[T], r: usize) -> CResult<()> {
    for (b, m) in v.chunks_exact(r * r).enumerate() {
        let total: f64 = m.iter().map(|x| x.f64().abs()).sum();
        if !total.is_finite() {
            return Err(ElraError::Overflow {
                what: format!(
                    "matrix {b} of the batch: the sum of |entries| of `{arg}` exceeds the f64 range"
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// Validates everything, reads the inputs, runs `op` over the batch, writes the outputs.
///
/// # Safety
/// The export's caller guarantees that every pointer covers the memory its layout describes.
unsafe fn run<T: Real>(
    op: Op,
    batch: usize,
    r: usize,
    z: In<T>,
    g: Option<In<T>>,
    outs: &[Out<T>],
) -> CResult<()> {
    if r == 0 {
        return Err(ElraError::invalid("r", "r = 0: matrices must be at least 1×1").into());
    }
    // Every layout is checked before anything is allocated.
    let lz = layout(batch, r, z.ld, z.stride);
    check_in(z.name, z.p, &lz)?;
    if let Some(g) = &g {
        check_in(g.name, g.p, &layout(batch, r, g.ld, g.stride))?;
    }
    for o in outs {
        check_out(o.name, o.p, &layout(batch, r, o.ld, o.stride))?;
    }
    // The packed inputs and results, and the workspace (≈ 25 r×r matrices, linalg::MatFnBatch).
    // batch·r² fits: the layouts above span at least that many elements of the address space.
    let packed = batch * r * r;
    let buffers = 1 + usize::from(g.is_some()) + outs.len();
    reserve::<T>("the batch", elements(&[(buffers, packed), (26 * r, r)]))?;
    let mut ws = MatFnBatch::<T>::new(r)?;
    // SAFETY: validated above; the export's caller guarantees the described memory is readable.
    let zin = unsafe { read_in(z.name, z.p, &lz)? };
    let gin = match &g {
        // SAFETY: as for z.
        Some(g) => Some(unsafe { read_in(g.name, g.p, &layout(batch, r, g.ld, g.stride))? }),
        None => None,
    };
    if let Some(g) = &gin {
        // The Fréchet kernel balances ‖G‖₁ against ‖Zᵀ‖₁ by a power of two; a norm outside
        // the f64 range would make that exponent saturate (a near-endless rescaling loop, found
        // by the abi_args fuzz target), so such inputs are reported as overflow up front.
        check_norms("z", &zin, r)?;
        check_norms("g", g, r)?;
    }
    let n = zin.len();
    let zeros = |len: usize| -> CResult<Vec<T>> {
        let mut v = try_with_capacity("the results", len)?;
        v.resize(len, T::zero());
        Ok(v)
    };
    let mut res0 = zeros(n)?;
    let mut res1 = Vec::new();
    match op {
        Op::Expm => ws.expm(&zin, &mut res0)?,
        Op::Phi1 => ws.phi1(&zin, &mut res0)?,
        Op::ExpmPhi1 => {
            res1 = zeros(n)?;
            ws.expm_phi1(&zin, &mut res0, &mut res1)?
        }
        Op::ExpmAdjoint => {
            ws.expm_frechet_adjoint(&zin, gin.as_deref().unwrap_or(&[]), &mut res0)?
        }
        Op::Phi1Adjoint => {
            ws.phi1_frechet_adjoint(&zin, gin.as_deref().unwrap_or(&[]), &mut res0)?
        }
    }
    for (o, res) in outs.iter().zip([&res0, &res1]) {
        // SAFETY: validated above; `res` holds batch·r·r entries; the caller guarantees the
        // output memory is writable.
        unsafe { write_out(o.p, &layout(batch, r, o.ld, o.stride), res) };
    }
    Ok(())
}

/// Batched matrix exponential `out_b = e^{Z_b}` in f64 (Padé scaling and squaring,
/// Al-Mohy & Higham 2009 Alg. 5.1).
///
/// `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`), row-major: matrix `b` of `z` starts at
/// `z + b·stride_z`, its entry `(i, j)` is `z[b·stride_z + i·ldz + j]`, with `ldz ≥ r` and
/// `stride_z ≥ (r−1)·ldz + r` (the stride is ignored when `batch == 1`); the other matrix
/// arguments likewise. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT`
/// (dimensions, strides, alignment), `ELRA_NON_FINITE` (NaN/Inf in an input), `ELRA_OVERFLOW`
/// (a result outside the floating-point range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error no output
/// is modified.
///
/// # Safety
/// Every input pointer must cover readable memory and every output pointer writable memory for
/// the layout its dimensions describe. An output may alias an input only with an identical
/// layout; outputs may not overlap each other.
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
    let z = In::new("z", z, ldz, stride_z);
    let g = None;
    let outs = [Out::new("out", out, ld_out, stride_out)];
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe { run::<f64>(Op::Expm, batch, r, z, g, &outs) })
}

/// Batched `out_b = φ1(Z_b) = Σₙ Z_bⁿ/(n+1)!` in f64: the r×r factor of the Woodbury form
/// `exp(AC) = I + A φ1(CA) C` (Prop. 1, eq. 4), from the Padé factorisation (never divides by Z).
///
/// `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`), row-major: matrix `b` of `z` starts at
/// `z + b·stride_z`, its entry `(i, j)` is `z[b·stride_z + i·ldz + j]`, with `ldz ≥ r` and
/// `stride_z ≥ (r−1)·ldz + r` (the stride is ignored when `batch == 1`); the other matrix
/// arguments likewise. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT`
/// (dimensions, strides, alignment), `ELRA_NON_FINITE` (NaN/Inf in an input), `ELRA_OVERFLOW`
/// (a result outside the floating-point range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error no output
/// is modified.
///
/// # Safety
/// Every input pointer must cover readable memory and every output pointer writable memory for
/// the layout its dimensions describe. An output may alias an input only with an identical
/// layout; outputs may not overlap each other.
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
    let z = In::new("z", z, ldz, stride_z);
    let g = None;
    let outs = [Out::new("out", out, ld_out, stride_out)];
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe { run::<f64>(Op::Phi1, batch, r, z, g, &outs) })
}

/// Batched `(e^{Z_b}, φ1(Z_b))` in f64 from one Padé factorisation and one squaring phase per
/// matrix (AMH 2009 Alg. 5.1 plus `φ1(2X) = ½(e^X + I)φ1(X)`): what the merge of Prop. 1 needs.
///
/// `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`), row-major: matrix `b` of `z` starts at
/// `z + b·stride_z`, its entry `(i, j)` is `z[b·stride_z + i·ldz + j]`, with `ldz ≥ r` and
/// `stride_z ≥ (r−1)·ldz + r` (the stride is ignored when `batch == 1`); the other matrix
/// arguments likewise. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT`
/// (dimensions, strides, alignment), `ELRA_NON_FINITE` (NaN/Inf in an input), `ELRA_OVERFLOW`
/// (a result outside the floating-point range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error no output
/// is modified.
///
/// # Safety
/// Every input pointer must cover readable memory and every output pointer writable memory for
/// the layout its dimensions describe. An output may alias an input only with an identical
/// layout; outputs may not overlap each other.
#[no_mangle]
pub unsafe extern "C" fn elra_expm_phi1_f64(
    batch: usize,
    r: usize,
    z: *const f64,
    ldz: usize,
    stride_z: usize,
    exp_out: *mut f64,
    ld_exp: usize,
    stride_exp: usize,
    phi1_out: *mut f64,
    ld_phi1: usize,
    stride_phi1: usize,
) -> ElraStatus {
    let z = In::new("z", z, ldz, stride_z);
    let g = None;
    let outs = [
        Out::new("exp_out", exp_out, ld_exp, stride_exp),
        Out::new("phi1_out", phi1_out, ld_phi1, stride_phi1),
    ];
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe { run::<f64>(Op::ExpmPhi1, batch, r, z, g, &outs) })
}

/// Batched adjoint Fréchet derivative of the exponential in f64: `out_b = L_exp(Z_bᵀ, G_b)`, the
/// gradient of `⟨e^Z, G⟩` with respect to Z (block-triangular Padé: `L_f(X, E)` is the top-right
/// block of `f([[X, E], [0, X]])`; Al-Mohy & Higham 2009).
///
/// `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`), row-major: matrix `b` of `z` starts at
/// `z + b·stride_z`, its entry `(i, j)` is `z[b·stride_z + i·ldz + j]`, with `ldz ≥ r` and
/// `stride_z ≥ (r−1)·ldz + r` (the stride is ignored when `batch == 1`); the other matrix
/// arguments likewise. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT`
/// (dimensions, strides, alignment), `ELRA_NON_FINITE` (NaN/Inf in an input), `ELRA_OVERFLOW`
/// (a result outside the floating-point range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error no output
/// is modified.
///
/// # Safety
/// Every input pointer must cover readable memory and every output pointer writable memory for
/// the layout its dimensions describe. An output may alias an input only with an identical
/// layout; outputs may not overlap each other.
#[no_mangle]
pub unsafe extern "C" fn elra_expm_frechet_adjoint_f64(
    batch: usize,
    r: usize,
    z: *const f64,
    ldz: usize,
    stride_z: usize,
    g: *const f64,
    ldg: usize,
    stride_g: usize,
    out: *mut f64,
    ld_out: usize,
    stride_out: usize,
) -> ElraStatus {
    let z = In::new("z", z, ldz, stride_z);
    let g = Some(In::new("g", g, ldg, stride_g));
    let outs = [Out::new("out", out, ld_out, stride_out)];
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe { run::<f64>(Op::ExpmAdjoint, batch, r, z, g, &outs) })
}

/// Batched adjoint Fréchet derivative of φ1 in f64: `out_b = L_φ1(Z_bᵀ, G_b)`, the gradient of
/// `⟨φ1(Z), G⟩` with respect to Z, which the reverse mode of the Woodbury form (Prop. 1) chains
/// through `M = φ1(CA)` (top-right block of `φ1([[X, E], [0, X]])`).
///
/// `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`), row-major: matrix `b` of `z` starts at
/// `z + b·stride_z`, its entry `(i, j)` is `z[b·stride_z + i·ldz + j]`, with `ldz ≥ r` and
/// `stride_z ≥ (r−1)·ldz + r` (the stride is ignored when `batch == 1`); the other matrix
/// arguments likewise. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT`
/// (dimensions, strides, alignment), `ELRA_NON_FINITE` (NaN/Inf in an input), `ELRA_OVERFLOW`
/// (a result outside the floating-point range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error no output
/// is modified.
///
/// # Safety
/// Every input pointer must cover readable memory and every output pointer writable memory for
/// the layout its dimensions describe. An output may alias an input only with an identical
/// layout; outputs may not overlap each other.
#[no_mangle]
pub unsafe extern "C" fn elra_phi1_frechet_adjoint_f64(
    batch: usize,
    r: usize,
    z: *const f64,
    ldz: usize,
    stride_z: usize,
    g: *const f64,
    ldg: usize,
    stride_g: usize,
    out: *mut f64,
    ld_out: usize,
    stride_out: usize,
) -> ElraStatus {
    let z = In::new("z", z, ldz, stride_z);
    let g = Some(In::new("g", g, ldg, stride_g));
    let outs = [Out::new("out", out, ld_out, stride_out)];
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe { run::<f64>(Op::Phi1Adjoint, batch, r, z, g, &outs) })
}

/// Batched matrix exponential `out_b = e^{Z_b}` in f32 (Padé scaling and squaring,
/// Al-Mohy & Higham 2009 Alg. 5.1).
///
/// `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`), row-major: matrix `b` of `z` starts at
/// `z + b·stride_z`, its entry `(i, j)` is `z[b·stride_z + i·ldz + j]`, with `ldz ≥ r` and
/// `stride_z ≥ (r−1)·ldz + r` (the stride is ignored when `batch == 1`); the other matrix
/// arguments likewise. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT`
/// (dimensions, strides, alignment), `ELRA_NON_FINITE` (NaN/Inf in an input), `ELRA_OVERFLOW`
/// (a result outside the floating-point range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error no output
/// is modified.
///
/// # Safety
/// Every input pointer must cover readable memory and every output pointer writable memory for
/// the layout its dimensions describe. An output may alias an input only with an identical
/// layout; outputs may not overlap each other.
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
    let z = In::new("z", z, ldz, stride_z);
    let g = None;
    let outs = [Out::new("out", out, ld_out, stride_out)];
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe { run::<f32>(Op::Expm, batch, r, z, g, &outs) })
}

/// Batched `out_b = φ1(Z_b) = Σₙ Z_bⁿ/(n+1)!` in f32: the r×r factor of the Woodbury form
/// `exp(AC) = I + A φ1(CA) C` (Prop. 1, eq. 4), from the Padé factorisation (never divides by Z).
///
/// `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`), row-major: matrix `b` of `z` starts at
/// `z + b·stride_z`, its entry `(i, j)` is `z[b·stride_z + i·ldz + j]`, with `ldz ≥ r` and
/// `stride_z ≥ (r−1)·ldz + r` (the stride is ignored when `batch == 1`); the other matrix
/// arguments likewise. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT`
/// (dimensions, strides, alignment), `ELRA_NON_FINITE` (NaN/Inf in an input), `ELRA_OVERFLOW`
/// (a result outside the floating-point range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error no output
/// is modified.
///
/// # Safety
/// Every input pointer must cover readable memory and every output pointer writable memory for
/// the layout its dimensions describe. An output may alias an input only with an identical
/// layout; outputs may not overlap each other.
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
    let z = In::new("z", z, ldz, stride_z);
    let g = None;
    let outs = [Out::new("out", out, ld_out, stride_out)];
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe { run::<f32>(Op::Phi1, batch, r, z, g, &outs) })
}

/// Batched `(e^{Z_b}, φ1(Z_b))` in f32 from one Padé factorisation and one squaring phase per
/// matrix (AMH 2009 Alg. 5.1 plus `φ1(2X) = ½(e^X + I)φ1(X)`): what the merge of Prop. 1 needs.
///
/// `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`), row-major: matrix `b` of `z` starts at
/// `z + b·stride_z`, its entry `(i, j)` is `z[b·stride_z + i·ldz + j]`, with `ldz ≥ r` and
/// `stride_z ≥ (r−1)·ldz + r` (the stride is ignored when `batch == 1`); the other matrix
/// arguments likewise. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT`
/// (dimensions, strides, alignment), `ELRA_NON_FINITE` (NaN/Inf in an input), `ELRA_OVERFLOW`
/// (a result outside the floating-point range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error no output
/// is modified.
///
/// # Safety
/// Every input pointer must cover readable memory and every output pointer writable memory for
/// the layout its dimensions describe. An output may alias an input only with an identical
/// layout; outputs may not overlap each other.
#[no_mangle]
pub unsafe extern "C" fn elra_expm_phi1_f32(
    batch: usize,
    r: usize,
    z: *const f32,
    ldz: usize,
    stride_z: usize,
    exp_out: *mut f32,
    ld_exp: usize,
    stride_exp: usize,
    phi1_out: *mut f32,
    ld_phi1: usize,
    stride_phi1: usize,
) -> ElraStatus {
    let z = In::new("z", z, ldz, stride_z);
    let g = None;
    let outs = [
        Out::new("exp_out", exp_out, ld_exp, stride_exp),
        Out::new("phi1_out", phi1_out, ld_phi1, stride_phi1),
    ];
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe { run::<f32>(Op::ExpmPhi1, batch, r, z, g, &outs) })
}

/// Batched adjoint Fréchet derivative of the exponential in f32: `out_b = L_exp(Z_bᵀ, G_b)`, the
/// gradient of `⟨e^Z, G⟩` with respect to Z (block-triangular Padé: `L_f(X, E)` is the top-right
/// block of `f([[X, E], [0, X]])`; Al-Mohy & Higham 2009).
///
/// `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`), row-major: matrix `b` of `z` starts at
/// `z + b·stride_z`, its entry `(i, j)` is `z[b·stride_z + i·ldz + j]`, with `ldz ≥ r` and
/// `stride_z ≥ (r−1)·ldz + r` (the stride is ignored when `batch == 1`); the other matrix
/// arguments likewise. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT`
/// (dimensions, strides, alignment), `ELRA_NON_FINITE` (NaN/Inf in an input), `ELRA_OVERFLOW`
/// (a result outside the floating-point range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error no output
/// is modified.
///
/// # Safety
/// Every input pointer must cover readable memory and every output pointer writable memory for
/// the layout its dimensions describe. An output may alias an input only with an identical
/// layout; outputs may not overlap each other.
#[no_mangle]
pub unsafe extern "C" fn elra_expm_frechet_adjoint_f32(
    batch: usize,
    r: usize,
    z: *const f32,
    ldz: usize,
    stride_z: usize,
    g: *const f32,
    ldg: usize,
    stride_g: usize,
    out: *mut f32,
    ld_out: usize,
    stride_out: usize,
) -> ElraStatus {
    let z = In::new("z", z, ldz, stride_z);
    let g = Some(In::new("g", g, ldg, stride_g));
    let outs = [Out::new("out", out, ld_out, stride_out)];
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe { run::<f32>(Op::ExpmAdjoint, batch, r, z, g, &outs) })
}

/// Batched adjoint Fréchet derivative of φ1 in f32: `out_b = L_φ1(Z_bᵀ, G_b)`, the gradient of
/// `⟨φ1(Z), G⟩` with respect to Z, which the reverse mode of the Woodbury form (Prop. 1) chains
/// through `M = φ1(CA)` (top-right block of `φ1([[X, E], [0, X]])`).
///
/// `batch ≥ 1` matrices of size `r×r` (`r ≥ 1`), row-major: matrix `b` of `z` starts at
/// `z + b·stride_z`, its entry `(i, j)` is `z[b·stride_z + i·ldz + j]`, with `ldz ≥ r` and
/// `stride_z ≥ (r−1)·ldz + r` (the stride is ignored when `batch == 1`); the other matrix
/// arguments likewise. Returns `ELRA_OK`, or `ELRA_NULL_POINTER`, `ELRA_INVALID_ARGUMENT`
/// (dimensions, strides, alignment), `ELRA_NON_FINITE` (NaN/Inf in an input), `ELRA_OVERFLOW`
/// (a result outside the floating-point range), `ELRA_NUMERICAL`, `ELRA_PANIC`; on error no output
/// is modified.
///
/// # Safety
/// Every input pointer must cover readable memory and every output pointer writable memory for
/// the layout its dimensions describe. An output may alias an input only with an identical
/// layout; outputs may not overlap each other.
#[no_mangle]
pub unsafe extern "C" fn elra_phi1_frechet_adjoint_f32(
    batch: usize,
    r: usize,
    z: *const f32,
    ldz: usize,
    stride_z: usize,
    g: *const f32,
    ldg: usize,
    stride_g: usize,
    out: *mut f32,
    ld_out: usize,
    stride_out: usize,
) -> ElraStatus {
    let z = In::new("z", z, ldz, stride_z);
    let g = Some(In::new("g", g, ldg, stride_g));
    let outs = [Out::new("out", out, ld_out, stride_out)];
    // SAFETY: the pointer contract is forwarded unchanged from this export's caller.
    guard(|| unsafe { run::<f32>(Op::Phi1Adjoint, batch, r, z, g, &outs) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capi::{elra_last_error_message, ELRA_OK};
    use crate::linalg;
    use nalgebra::DMatrix;
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
                _ => elra_phi1_f64,
            };
            // SAFETY: z and out are live vectors that cover the described layouts.
            let s = unsafe { f(batch, r, z.as_ptr(), ldz, sz, out.as_mut_ptr(), ldo, so) };
            assert_eq!(s, ELRA_OK);
            let mut written = 0;
            for b in 0..batch {
                let zm = DMatrix::from_fn(r, r, |i, j| z[b * sz + i * ldz + j]);
                let want = match op {
                    Op::Expm => linalg::expm(&zm).unwrap(),
                    _ => linalg::phi1(&zm).unwrap(),
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
            assert!(
                last_error().contains("matrix 1 of the batch"),
                "{}",
                last_error()
            );
            assert!(of.iter().all(|&x| x == -7.0), "outputs untouched on error");
            // Success clears the message.
            assert_eq!(elra_phi1_f64(1, 2, zp, 2, 4, op, 2, 4), ELRA_OK);
            assert_eq!(last_error(), "");
        }
        assert!(out[4..].iter().all(|&x| x == SENTINEL));
    }
    #[test]
    fn adjoints_match_linalg_and_a_central_difference() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let (batch, r) = (4, 3);
        let rr = r * r;
        let z = strided(batch, r, r, rr, &mut rng);
        let g = strided(batch, r, r, rr, &mut rng);
        let e = strided(batch, r, r, rr, &mut rng);
        let mut ex = vec![0.0; batch * rr];
        let mut ph = vec![0.0; batch * rr];
        let mut ea = vec![0.0; batch * rr];
        let mut pa = vec![0.0; batch * rr];
        // SAFETY: packed live vectors of batch·r·r entries.
        unsafe {
            let (zp, gp) = (z.as_ptr(), g.as_ptr());
            let s = elra_expm_phi1_f64(
                batch,
                r,
                zp,
                r,
                rr,
                ex.as_mut_ptr(),
                r,
                rr,
                ph.as_mut_ptr(),
                r,
                rr,
            );
            assert_eq!(s, ELRA_OK);
            let s = elra_expm_frechet_adjoint_f64(
                batch,
                r,
                zp,
                r,
                rr,
                gp,
                r,
                rr,
                ea.as_mut_ptr(),
                r,
                rr,
            );
            assert_eq!(s, ELRA_OK);
            let s = elra_phi1_frechet_adjoint_f64(
                batch,
                r,
                zp,
                r,
                rr,
                gp,
                r,
                rr,
                pa.as_mut_ptr(),
                r,
                rr,
            );
            assert_eq!(s, ELRA_OK);
        }
        let m = |v: &[f64], b: usize| DMatrix::from_row_slice(r, r, &v[b * rr..(b + 1) * rr]);
        for b in 0..batch {
            let (zb, gb, eb) = (m(&z, b), m(&g, b), m(&e, b));
            assert_eq!(m(&ex, b), linalg::expm(&zb).unwrap());
            assert_eq!(m(&ph, b), linalg::phi1(&zb).unwrap());
            assert_eq!(m(&ea, b), linalg::expm_frechet_adjoint(&zb, &gb).unwrap());
            assert_eq!(m(&pa, b), linalg::phi1_frechet_adjoint(&zb, &gb).unwrap());
            // <L*(G), E> = d/dh <f(Z + hE), G> at h = 0. Central difference with h = 1e-5:
            // truncation error O(h² ‖f‴‖) ≈ 1e-10, rounding error O(u/h) ≈ 1e-11 here
            // (entries of Z, E, G in (−1.5, 1.5), r = 3).
            let h = 1e-5;
            let fd = |f: &dyn Fn(&DMatrix<f64>) -> DMatrix<f64>| {
                ((f(&(&zb + &eb * h)) - f(&(&zb - &eb * h))).dot(&gb)) / (2.0 * h)
            };
            let fd_e = fd(&|x| linalg::expm(x).unwrap());
            let fd_p = fd(&|x| linalg::phi1(x).unwrap());
            let (an_e, an_p) = (m(&ea, b).dot(&eb), m(&pa, b).dot(&eb));
            assert!(
                (fd_e - an_e).abs() < 1e-8 * (1.0 + an_e.abs()),
                "{fd_e} vs {an_e}"
            );
            assert!(
                (fd_p - an_p).abs() < 1e-8 * (1.0 + an_p.abs()),
                "{fd_p} vs {an_p}"
            );
        }
        // A NaN in G is reported as non-finite `g`, nothing written.
        let mut gn = g.clone();
        gn[5] = f64::NAN;
        let mut out = vec![SENTINEL; batch * rr];
        // SAFETY: packed live vectors.
        let s = unsafe {
            elra_phi1_frechet_adjoint_f64(
                batch,
                r,
                z.as_ptr(),
                r,
                rr,
                gn.as_ptr(),
                r,
                rr,
                out.as_mut_ptr(),
                r,
                rr,
            )
        };
        assert_eq!(s, ElraStatus::ELRA_NON_FINITE);
        assert!(last_error().contains("`g`"));
        assert!(out.iter().all(|&x| x == SENTINEL));
    }

    #[test]
    fn adjoint_inputs_with_norms_beyond_f64_fail_fast() {
        // Regression (abi_args fuzz target): entries near f64::MAX whose 1-norm overflows used to
        // make the Fréchet kernel's power-of-two balancing loop ~1e17 times.
        let z = [1.0, 0.0, 0.0, 1.0];
        let g = [1.5e308, 0.0, 1.5e308, 0.0];
        // Row sums overflow while column sums do not (the kernel works on Zᵀ).
        let zr = [1.0e308, 1.0e308, 0.0, 0.0];
        let mut out = [SENTINEL; 4];
        let t = std::time::Instant::now();
        // SAFETY: 2×2 packed live arrays.
        let s = unsafe {
            elra_phi1_frechet_adjoint_f64(
                1,
                2,
                z.as_ptr(),
                2,
                0,
                g.as_ptr(),
                2,
                0,
                out.as_mut_ptr(),
                2,
                0,
            )
        };
        assert_eq!(s, ElraStatus::ELRA_OVERFLOW);
        assert!(last_error().contains("`g`"), "{}", last_error());
        // SAFETY: as above, with the roles swapped.
        let s = unsafe {
            elra_expm_frechet_adjoint_f64(
                1,
                2,
                g.as_ptr(),
                2,
                0,
                z.as_ptr(),
                2,
                0,
                out.as_mut_ptr(),
                2,
                0,
            )
        };
        assert_eq!(s, ElraStatus::ELRA_OVERFLOW);
        // SAFETY: as above.
        let s = unsafe {
            elra_expm_frechet_adjoint_f64(
                1,
                2,
                zr.as_ptr(),
                2,
                0,
                z.as_ptr(),
                2,
                0,
                out.as_mut_ptr(),
                2,
                0,
            )
        };
        assert_eq!(s, ElraStatus::ELRA_OVERFLOW);
        assert!(t.elapsed().as_secs() < 5);
        assert!(out.iter().all(|&x| x == SENTINEL));
    }
}
