//! Row-major GEMM over cuBLAS: `C ← α·op(A)·op(B) + β·C` for batches of row-major matrices.
//!
//! cuBLAS is column-major. A row-major `m×n` matrix with leading dimension `n` is, read
//! column-major, its transpose. So the row-major product `C = op(A) op(B)` is computed as the
//! column-major product `Cᵀ = op(B)ᵀ op(A)ᵀ`: cuBLAS gets the operands swapped, `m` and `n`
//! swapped, and the same transpose flags (Golub & Van Loan §1.1; the "row-major trick").
//!
//! Precision: f32 uses `CUBLAS_COMPUTE_32F` (full f32, no TF32 unless
//! [`CudaDevice::set_allow_tf32`] asked for it, then `CUBLAS_COMPUTE_32F_FAST_TF32`); f64 uses
//! `CUBLAS_COMPUTE_64F`; f16 and bf16 inputs and outputs accumulate in f32 (`cublasGemmEx`
//! family with `CUBLAS_COMPUTE_32F`).

use std::ffi::{c_int, c_longlong, c_void};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
use cudarc::driver::DevicePtr;

use super::{CudaDevice, DeviceMatrices, DeviceScalar};
use crate::{ElraError, Result};

/// Whether an operand enters the product as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transpose {
    /// `op(X) = X`.
    No,
    /// `op(X) = Xᵀ`.
    Yes,
}

impl Transpose {
    fn cublas(self) -> cublasOperation_t {
        match self {
            Transpose::No => cublasOperation_t::CUBLAS_OP_N,
            Transpose::Yes => cublasOperation_t::CUBLAS_OP_T,
        }
    }
    /// `(rows, cols)` of `op(X)` for a stored `rows × cols` matrix.
    fn apply(self, rows: usize, cols: usize) -> (usize, usize) {
        match self {
            Transpose::No => (rows, cols),
            Transpose::Yes => (cols, rows),
        }
    }
}

/// The scale factors α, β in the compute type cuBLAS expects (f32 for f32/f16/bf16, f64 for f64).
enum Scale {
    F32(f32, f32),
    F64(f64, f64),
}

fn compute_type<T: DeviceScalar>(
    tf32: bool,
    alpha: f64,
    beta: f64,
) -> (cublasComputeType_t, Scale) {
    match T::DTYPE {
        "f64" => (
            cublasComputeType_t::CUBLAS_COMPUTE_64F,
            Scale::F64(alpha, beta),
        ),
        "f32" if tf32 => (
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            Scale::F32(alpha as f32, beta as f32),
        ),
        _ => (
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            Scale::F32(alpha as f32, beta as f32),
        ),
    }
}

fn to_int(arg: &'static str, v: usize) -> Result<c_int> {
    c_int::try_from(v)
        .map_err(|_| ElraError::invalid(arg, format!("{v} exceeds cuBLAS's 32-bit range")))
}

fn to_stride(arg: &'static str, v: usize) -> Result<c_longlong> {
    c_longlong::try_from(v)
        .map_err(|_| ElraError::invalid(arg, format!("stride {v} exceeds cuBLAS's 64-bit range")))
}

/// `C[b] ← α·op(A[b])·op(B[b]) + β·C[b]` for every matrix `b` of the batch, all row-major
/// (BLAS `xGEMM` semantics, Golub & Van Loan Alg. 1.1.5, on row-major storage via the transposed
/// column-major product). `A` or `B` may hold a single matrix, which is then used for every `b`.
///
/// Shapes: `op(A[b])` is m×k, `op(B[b])` is k×n, `C[b]` is m×n, with `C.batch()` matrices.
/// With `β = 0` the previous contents of `C` are not read (NaN in C does not propagate).
/// The call is asynchronous on `dev`'s stream.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: DeviceScalar>(
    dev: &CudaDevice,
    alpha: f64,
    a: &DeviceMatrices<T>,
    trans_a: Transpose,
    b: &DeviceMatrices<T>,
    trans_b: Transpose,
    beta: f64,
    c: &mut DeviceMatrices<T>,
) -> Result<()> {
    // `c` is borrowed mutably: a different allocation from `a` and `b`.
    gemm_unaliased(dev, alpha, a, trans_a, b, trans_b, beta, c)
}

/// [`gemm()`] with the output taken by shared reference, for matrices that are views of caller
/// memory ([`crate::cuda::ops`]): errors unless `c`'s memory is disjoint from `a`'s and `b`'s.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_shared<T: DeviceScalar>(
    dev: &CudaDevice,
    alpha: f64,
    a: &DeviceMatrices<T>,
    trans_a: Transpose,
    b: &DeviceMatrices<T>,
    trans_b: Transpose,
    beta: f64,
    c: &DeviceMatrices<T>,
) -> Result<()> {
    let span = |m: &DeviceMatrices<T>| {
        let p = m.device_addr();
        (p, p + m.len() * std::mem::size_of::<T>())
    };
    let (c0, c1) = span(c);
    for (arg, m) in [("a", a), ("b", b)] {
        let (m0, m1) = span(m);
        if c0 < m1 && m0 < c1 {
            return Err(ElraError::invalid(
                "c",
                format!("the output overlaps `{arg}`"),
            ));
        }
    }
    gemm_unaliased(dev, alpha, a, trans_a, b, trans_b, beta, c)
}

/// The body of [`gemm()`]; the caller guarantees that `c` does not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
fn gemm_unaliased<T: DeviceScalar>(
    dev: &CudaDevice,
    alpha: f64,
    a: &DeviceMatrices<T>,
    trans_a: Transpose,
    b: &DeviceMatrices<T>,
    trans_b: Transpose,
    beta: f64,
    c: &DeviceMatrices<T>,
) -> Result<()> {
    a.check_device(dev, "a")?;
    b.check_device(dev, "b")?;
    c.check_device(dev, "c")?;
    if !alpha.is_finite() {
        return Err(ElraError::invalid("alpha", "must be finite"));
    }
    if !beta.is_finite() {
        return Err(ElraError::invalid("beta", "must be finite"));
    }
    let (m, k) = trans_a.apply(a.rows(), a.cols());
    let (kb, n) = trans_b.apply(b.rows(), b.cols());
    if kb != k {
        return Err(ElraError::Shape {
            arg: "b",
            expected: format!("op(b) with {k} rows (op(a) is {m}×{k})"),
            got: format!("op(b) is {kb}×{n}"),
        });
    }
    let batch = c.batch();
    if (c.rows(), c.cols()) != (m, n) {
        return Err(ElraError::shape("c", (m, n), (c.rows(), c.cols())));
    }
    for (arg, x) in [("a", a.batch()), ("b", b.batch())] {
        if x != 1 && x != batch {
            return Err(ElraError::invalid(
                arg,
                format!("batch {x} must be 1 or equal to c's batch {batch}"),
            ));
        }
    }
    let stride = |x: &DeviceMatrices<T>, arg| {
        if x.batch() == 1 {
            Ok(0)
        } else {
            to_stride(arg, x.rows() * x.cols())
        }
    };
    let (stride_a, stride_b) = (stride(a, "a")?, stride(b, "b")?);
    let stride_c = to_stride("c", m * n)?;
    let (mi, ni, ki) = (to_int("m", m)?, to_int("n", n)?, to_int("k", k)?);
    let (lda, ldb, ldc) = (
        to_int("a", a.cols())?,
        to_int("b", b.cols())?,
        to_int("c", n)?,
    );
    let batch_i = to_int("batch", batch)?;
    let (compute, scale) = compute_type::<T>(dev.allow_tf32(), alpha, beta);
    let (alpha_ptr, beta_ptr): (*const c_void, *const c_void) = match &scale {
        Scale::F32(a, b) => (
            a as *const f32 as *const c_void,
            b as *const f32 as *const c_void,
        ),
        Scale::F64(a, b) => (
            a as *const f64 as *const c_void,
            b as *const f64 as *const c_void,
        ),
    };
    let stream = dev.stream();
    let (a_ptr, _rec_a) = a.slice().device_ptr(stream);
    let (b_ptr, _rec_b) = b.slice().device_ptr(stream);
    // Device memory is outside Rust's aliasing model: the pointer of a shared borrow is the
    // same address; exclusivity is the callers' guarantee (see the SAFETY note below).
    let (c_ptr, _rec_c) = c.slice().device_ptr(stream);
    // SAFETY: column-major view of the row-major problem: Cᵀ (n×m, ld n) = op(B)ᵀ (n×k) · op(A)ᵀ
    // (k×m). Every operand was checked above to live on this device and to have the shape these
    // dimensions and leading dimensions describe, so cuBLAS reads/writes only inside the three
    // allocations: the last matrix of X starts at (batch−1)·stride_X and spans rows·cols
    // entries, and stride 0 is used only for a single-matrix operand. α/β point to host scalars of
    // the compute type, alive for the call (host pointer mode, cuBLAS reads them before
    // returning). C does not overlap A or B (a distinct allocation borrowed
    // mutably in `gemm`, checked by address in `gemm_shared`). The handle's
    // stream is `stream`, on which the `_rec_*` guards order the accesses.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *dev.blas().handle(),
            trans_b.cublas(),
            trans_a.cublas(),
            ni,
            mi,
            ki,
            alpha_ptr,
            b_ptr as *const c_void,
            T::CUDA_TYPE,
            ldb,
            stride_b,
            a_ptr as *const c_void,
            T::CUDA_TYPE,
            lda,
            stride_a,
            beta_ptr,
            c_ptr as *mut c_void,
            T::CUDA_TYPE,
            ldc,
            stride_c,
            batch_i,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
    }
    Ok(())
}
