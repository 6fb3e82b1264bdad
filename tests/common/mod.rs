//! Helpers shared by the CUDA integration tests.
#[macro_use]
pub mod device;
pub mod emu;
