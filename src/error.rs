//! The crate's one error type.
//!
//! Every fallible public function returns [`Result<T>`]. Bad input is reported with the name
//! of the offending argument; numerical trouble (non-finite values, overflow) is reported
//! instead of being returned as silent `Inf`/`NaN`. Nothing in the public API panics on bad
//! input.

/// Errors produced by `elra`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ElraError {
    /// Two shapes that must agree do not.
    #[error("shape mismatch for `{arg}`: expected {expected}, got {got}")]
    Shape {
        /// The argument whose shape is wrong.
        arg: &'static str,
        /// What was expected, e.g. `"16×8"`.
        expected: String,
        /// What was given.
        got: String,
    },
    /// A scalar or dimension argument is outside its domain (r = 0, η ≤ 0, τ ≤ 0, …).
    #[error("invalid `{arg}`: {reason}")]
    InvalidArgument {
        /// The argument that is out of range.
        arg: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// An input contains NaN or ±Inf.
    #[error("non-finite value in `{arg}`")]
    NonFinite {
        /// The argument that holds the non-finite value.
        arg: &'static str,
    },
    /// A result would overflow the floating-point range.
    #[error("overflow: {what}")]
    Overflow {
        /// What overflowed.
        what: String,
    },
    /// A numerical routine failed (singular Padé denominator, SVD that did not converge, …).
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// Training stopped: a loss or gradient became non-finite, or shapes disagreed, at `step`.
    #[error("training stopped at step {step}: {reason}")]
    Training {
        /// The optimiser step at which training stopped.
        step: usize,
        /// Why it stopped.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("I/O error on `{path}`: {reason}")]
    Io {
        /// The file involved.
        path: String,
        /// The operating system's message.
        reason: String,
    },
    /// A file was read but its contents are malformed.
    #[error("format error: {0}")]
    Format(String),
    /// No usable CUDA driver or device at run time.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA driver, cuBLAS or kernel error.
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// Memory for a request could not be allocated (sizes a caller controls are reserved
    /// fallibly before any work, so a request too large for the machine is an error, not an
    /// abort).
    #[error("out of memory: {what}")]
    OutOfMemory {
        /// What needed the memory, with the size asked for.
        what: String,
    },
}

/// `Result` with [`ElraError`] as the default error type.
pub type Result<T, E = ElraError> = std::result::Result<T, E>;

impl ElraError {
    /// Shorthand for [`ElraError::OutOfMemory`] for `bytes` bytes needed by `what`.
    pub fn out_of_memory(what: &str, bytes: usize) -> Self {
        ElraError::OutOfMemory {
            what: format!("{what} needs {bytes} bytes, which could not be allocated"),
        }
    }

    /// Shorthand for [`ElraError::InvalidArgument`].
    pub fn invalid(arg: &'static str, reason: impl Into<String>) -> Self {
        ElraError::InvalidArgument {
            arg,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`ElraError::Shape`] from two `(rows, cols)` pairs.
    pub fn shape(arg: &'static str, expected: (usize, usize), got: (usize, usize)) -> Self {
        ElraError::Shape {
            arg,
            expected: format!("{}×{}", expected.0, expected.1),
            got: format!("{}×{}", got.0, got.1),
        }
    }
}
