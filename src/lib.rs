//! # elra — exponential low-rank adapters
//!
//! (crate documentation is written with the modules; see README.md and ARCHITECTURE.md)
#![warn(missing_docs)]

pub mod capi;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod expressivity;
pub mod io;
pub mod linalg;

pub use error::{ElraError, Result};
