//! CUDA back end (feature `cuda`): device handle, typed device buffers, the batched r×r kernels
//! and a row-major GEMM over cuBLAS.
//!
//! # What runs where
//! | file | holds |
//! |---|---|
//! | `device.rs` | [`CudaDevice`]: the device's primary context (`Arc<CudaContext>`), its one stream (shared by all handles of that ordinal), a cuBLAS handle bound to that stream, and the one kernel table of the context — every kernel of the fatbin that `build.rs` compiles from `cuda/*.cu`, embedded in the library, loaded and looked up once per context |
//! | `dtype.rs` | the element types: [`DeviceScalar`] (buffers, GEMM), [`FloatKernel`] (r×r kernels, f32/f64), [`Activation`] (layer activations, f32/f16/bf16) |
//! | `buffer.rs` | [`DeviceMatrices`], a batch of row-major matrices in device memory (nalgebra's `DMatrix` is column-major: the host conversions transpose), and the non-owning view of caller memory |
//! | [`gemm`](mod@gemm) | `C ← α op(A) op(B) + β C` on row-major operands (cuBLAS is column-major; the wrapper computes `Cᵀ = op(B)ᵀ op(A)ᵀ`) |
//! | [`kernels`] | batched `exp` and `φ1` of r×r matrices by Padé scaling and squaring (the algorithm of [`crate::linalg::expm`](mod@crate::linalg::expm), Al-Mohy & Higham 2009), the adjoint Fréchet derivative `L_φ1(Zᵀ, G)`, and the Grams of eq. (21); each writes a per-matrix status that the host turns into an error naming the matrix |
//! | `skinny.rs` | checked launches of the fused skinny kernels of `cuda/skinny.cu` and of the non-finite scan of `cuda/finite.cu` (the overflow rule on request) on strided views |
//! | [`layer`] | the adapters on the GPU — [`GpuElraLayer`] (general/PSD/Hyb; Woodbury and merged routes), [`GpuDoubleSidedLayer`], [`GpuLoraLayer`] — each an [`Adapter`](crate::adapter::Adapter) over [`DeviceMatrices`] ([`GpuAdapter`]) |
//! | `caller.rs` | memory and streams owned by a caller (the C ABI): context guard, stream join, caller-pointer checks and borrowing |
//! | [`ops`] | the functional calls of [`crate::ops`] on the device (stateless forward/backward, output-side form, merge, energy on caller buffers; no allocation, no host wait), built as plans of the layer's kernels |
//!
//! # Without a GPU
//! The driver library (`libcuda`) and cuBLAS are loaded at run time. [`cuda_available`] probes for
//! them and for a device without panicking; [`CudaDevice::new`] returns
//! [`ElraError::NoDevice`] when there is none.
//!
//! # Numerics on the GPU
//! The r×r matrix functions run in the input precision (f32 or f64) with IEEE arithmetic; never
//! TF32 or bf16. `cuda/phi1.cu` ports the CPU core `src/linalg/expm.rs` operation by operation
//! (same summation orders; built with `-fmad=false` so no product-sum is fused, as in Rust), so
//! its results equal the CPU's bit for bit except where the device's `pow`/`log2` move a
//! degree/scaling decision across a boundary. The Gram kernel uses explicit FMA. The f32 GEMM
//! uses `CUBLAS_COMPUTE_32F` (no TF32) unless TF32 is asked for with
//! [`CudaDevice::set_allow_tf32`]; f16/bf16 GEMMs accumulate in f32.
//!
//! # Testing without a GPU
//! `cuda/emu/` compiles the same kernel sources with the host C++ compiler (threads and a barrier
//! for a thread block); `tests/cuda_phi1.rs` runs them there and checks bit-for-bit equality with
//! the CPU core, so the kernels' logic is tested on every CI run. The GPU tests in the same file
//! skip, printing why, when [`cuda_available`] reports no device.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod buffer;
pub(crate) mod caller;
mod device;
mod dtype;
pub mod gemm;
pub mod kernels;
pub mod layer;
pub mod ops;
mod skinny;

pub use buffer::DeviceMatrices;
pub(crate) use buffer::{BorrowedMatrices, BorrowedSlice};
pub use device::{cuda_available, device_count, CudaDevice, MatrixTeam, Workspace};
pub use dtype::{Activation, DeviceScalar, FloatKernel};
pub use gemm::{gemm, Transpose};
pub use kernels::{
    adapter_grams, expm_phi1, phi1_adjoint, spectral_norm_sq, AdapterGrams, DeviceGrams,
    MatrixStatus,
};
pub use layer::{
    choose_route, route_cost, GpuAdapter, GpuDoubleSidedLayer, GpuElraLayer, GpuLoraLayer,
    RouteCost,
};
pub(crate) use skinny::check_rank;
pub use skinny::MAX_RANK;

use crate::ElraError;

impl From<cudarc::driver::DriverError> for ElraError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        // `{:?}` names the CUresult without calling back into the driver.
        ElraError::Cuda(format!("driver: {:?}", e.0))
    }
}

impl From<cudarc::cublas::result::CublasError> for ElraError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        ElraError::Cuda(format!("cuBLAS: {:?}", e.0))
    }
}
