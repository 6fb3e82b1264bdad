//! # elra — exponential low-rank adapters
//!
//! (crate documentation is written with the modules; see README.md and ARCHITECTURE.md)
#![warn(missing_docs)]

pub mod adapter;
pub mod error;
pub mod expressivity;
pub mod linalg;
pub mod reference;
pub mod verify;

pub use error::{ElraError, Result};
