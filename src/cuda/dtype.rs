//! The element types of the CUDA back end, in one place:
//!
//! * [`DeviceScalar`]: what a device buffer, the GEMM wrapper and the kernels can hold (`f32`,
//!   `f64`, `half::f16`, `half::bf16`).
//! * [`FloatKernel`]: the types the r×r matrix-function and Gram kernels compute in (`f32`,
//!   `f64`; never TF32 or bf16).
//! * [`Activation`]: the types of activations and of the frozen weight of a GPU layer (`f32`,
//!   `f16`, `bf16`); the layer's parameters, r×r matrices and gradients are always f32.
//!
//! All three are sealed: the kernels exist for exactly these types.

use cudarc::cublas::sys::cudaDataType_t;
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

use crate::linalg::Real;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type that device buffers, the GEMM wrapper and the kernels know:
/// `f32`, `f64`, `half::f16`, `half::bf16`.
pub trait DeviceScalar:
    DeviceRepr
    + ValidAsZeroBits
    + Copy
    + Default
    + PartialEq
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
    + sealed::Sealed
{
    /// The kernel-name suffix (`"f32"`, `"f64"`, `"f16"`, `"bf16"`).
    const DTYPE: &'static str;
    /// The cuBLAS data type of this element.
    const CUDA_TYPE: cudaDataType_t;
}

impl DeviceScalar for f32 {
    const DTYPE: &'static str = "f32";
    const CUDA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
}
impl DeviceScalar for f64 {
    const DTYPE: &'static str = "f64";
    const CUDA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_64F;
}
impl DeviceScalar for half::f16 {
    const DTYPE: &'static str = "f16";
    const CUDA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_16F;
}
impl DeviceScalar for half::bf16 {
    const DTYPE: &'static str = "bf16";
    const CUDA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
}

/// Element types with matrix-function and Gram kernels: `f32` and `f64` (the math runs in that
/// precision; never TF32 or bf16).
pub trait FloatKernel: DeviceScalar + Real {}
impl FloatKernel for f32 {}
impl FloatKernel for f64 {}

/// The element type of activations and of the frozen weight on the GPU layer: `f32`,
/// `half::f16` or `half::bf16`. Adapter parameters, r×r matrices and gradients are always f32.
pub trait Activation: DeviceScalar {
    /// Index of the dtype in the kernel tables (f32, f16, bf16).
    #[doc(hidden)]
    const INDEX: usize;
    /// Bytes per element.
    const BYTES: usize;
    /// Rounds an f64 to this type (round to nearest even).
    fn from_f64(x: f64) -> Self;
    /// Widens to f64 (exact).
    fn to_f64(self) -> f64;
    /// The IEEE bit pattern, zero-extended (what a driver memset writes for this value).
    fn to_bits_u32(self) -> u32;
}

impl Activation for f32 {
    const INDEX: usize = 0;
    const BYTES: usize = 4;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
}
impl Activation for half::f16 {
    const INDEX: usize = 1;
    const BYTES: usize = 2;
    fn from_f64(x: f64) -> Self {
        half::f16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
    fn to_bits_u32(self) -> u32 {
        u32::from(half::f16::to_bits(self))
    }
}
impl Activation for half::bf16 {
    const INDEX: usize = 2;
    const BYTES: usize = 2;
    fn from_f64(x: f64) -> Self {
        half::bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
    fn to_bits_u32(self) -> u32 {
        u32::from(half::bf16::to_bits(self))
    }
}
