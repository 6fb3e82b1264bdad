//! The GPU-or-skip pattern shared by the CUDA tests: without a driver and a device, a test prints
//! why and returns (it never fails for lack of a GPU).
use elra::cuda::{cuda_available, CudaDevice};

/// The device, or `None` after printing why the test is skipped.
pub fn device() -> Option<CudaDevice> {
    match cuda_available() {
        Ok(()) => Some(CudaDevice::new(0).expect("cuda_available() said a device exists")),
        Err(reason) => {
            eprintln!("skipping: {reason}");
            None
        }
    }
}

/// `let dev = device_or_skip!();` — the device, or return from the test after printing why.
macro_rules! device_or_skip {
    () => {
        match crate::common::device::device() {
            Some(d) => d,
            None => return,
        }
    };
}
