//! The C ABI: plain `extern "C"` functions on caller-owned memory, declared in `include/elra.h`
//! (generated from this module by cbindgen, see `cbindgen.toml` and `scripts/check-header.sh`).
//!
//! # Conventions (every export follows them)
//!
//! - **Status codes.** Every function that can fail returns an [`ElraStatus`]; results come back
//!   through out-pointers only, never through an overloaded return value. [`ELRA_OK`] is 0.
//! - **Error text.** A failing call stores a message on the calling thread, readable with
//!   [`elra_last_error_message`]; every call into the library first clears it, so after a call
//!   that returned [`ELRA_OK`] the message is empty.
//! - **Panic boundary.** Every export runs inside `catch_unwind`; a Rust panic (a bug) becomes
//!   [`ElraStatus::ELRA_PANIC`] with the panic message, never an unwind into C.
//! - **Matrices** are row-major. A `rows×cols` matrix at `p` with leading dimension `ld`
//!   (`ld ≥ cols`) has entry `(i, j)` at `p[i·ld + j]`; only those `rows·cols` entries are read or
//!   written, the gaps between rows are never touched. A batch of matrices adds a batch stride
//!   `stride ≥ (rows−1)·ld + cols` (matrices may not overlap): matrix `b` starts at `p + b·stride`.
//! - **Validation before work.** Null pointers ([`ElraStatus::ELRA_NULL_POINTER`]), misaligned
//!   pointers, zero dimensions, `ld < cols`, overlapping batch strides, spans larger than the
//!   address space ([`ElraStatus::ELRA_INVALID_ARGUMENT`]) and NaN/Inf in inputs
//!   ([`ElraStatus::ELRA_NON_FINITE`]) are reported before anything is written.
//! - **Outputs are untouched on error.** Results are computed into library-owned memory and
//!   copied to the caller's buffers only when the whole call succeeded. Because inputs are copied
//!   before outputs are written, an output may alias an input of the same shape (in-place use).
//! - **Threads.** Functions on caller memory are reentrant. An adapter handle is not
//!   synchronised: use one handle from one thread at a time (different handles are independent).
//!
//! Only this module and `src/cuda/` contain `unsafe` code; every `unsafe` block carries a
//! `// SAFETY:` comment, enforced by `clippy::undocumented_unsafe_blocks`.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use crate::ElraError;
use std::cell::RefCell;
use std::os::raw::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

pub mod adapter;
pub mod config;
pub mod files;
/// Self-checking driver of the exports for the fuzz targets (`fuzz/`) and unit tests.
#[doc(hidden)]
pub mod fuzz;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod gpu_ops;
mod handle;
mod layout;
pub mod matfn;
pub mod ops;

pub use adapter::*;
pub use config::*;
pub use files::*;
#[cfg(feature = "cuda")]
pub use gpu::*;
#[cfg(feature = "cuda")]
pub use gpu_ops::*;
pub(crate) use layout::{check_in, check_out, read_in, write_out, Layout};
pub use matfn::*;
pub use ops::*;

/// Version of the C ABI described by `include/elra.h`. It changes whenever a declaration in the
/// header changes incompatibly; [`elra_version`] returns the value the library was built with, so
/// a program can compare it with the `ELRA_ABI_VERSION` macro it was compiled against.
pub const ELRA_ABI_VERSION: u32 = 1;

/// Status code returned by every fallible export. `ELRA_OK` (0) is success; every other value
/// names a class of failure, with details in [`elra_last_error_message`].
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElraStatus {
    /// Success.
    ELRA_OK = 0,
    /// A required pointer argument was NULL.
    ELRA_NULL_POINTER = 1,
    /// A scalar or dimension is out of range: zero dimension, `ld < cols`, overlapping batch
    /// stride, misaligned pointer, r = 0, η ≤ 0, unknown enum value, … (`ElraError::InvalidArgument`).
    ELRA_INVALID_ARGUMENT = 2,
    /// Two shapes that must agree do not (`ElraError::Shape`).
    ELRA_SHAPE_MISMATCH = 3,
    /// An input holds NaN or ±Inf (`ElraError::NonFinite`).
    ELRA_NON_FINITE = 4,
    /// A result would leave the floating-point range (`ElraError::Overflow`).
    ELRA_OVERFLOW = 5,
    /// A numerical routine failed, e.g. a singular Padé denominator (`ElraError::Numerical`).
    ELRA_NUMERICAL = 6,
    /// Training stopped: non-finite loss or gradient (`ElraError::Training`).
    ELRA_TRAINING = 7,
    /// A file could not be read or written (`ElraError::Io`).
    ELRA_IO = 8,
    /// A file was read but is malformed (`ElraError::Format`).
    ELRA_FORMAT = 9,
    /// No usable CUDA device (`ElraError::NoDevice`).
    ELRA_NO_DEVICE = 10,
    /// A CUDA driver, cuBLAS or kernel error (`ElraError::Cuda`).
    ELRA_CUDA = 11,
    /// A Rust panic was caught at the ABI boundary (a bug in the library; please report it).
    ELRA_PANIC = 12,
    /// The memory a call needs could not be allocated; nothing was written
    /// (`ElraError::OutOfMemory`).
    ELRA_OUT_OF_MEMORY = 13,
}

pub use ElraStatus::ELRA_OK;

/// Maps the crate's error to its status code (one code per [`ElraError`] variant).
pub fn status_of(e: &ElraError) -> ElraStatus {
    match e {
        ElraError::Shape { .. } => ElraStatus::ELRA_SHAPE_MISMATCH,
        ElraError::InvalidArgument { .. } => ElraStatus::ELRA_INVALID_ARGUMENT,
        ElraError::NonFinite { .. } => ElraStatus::ELRA_NON_FINITE,
        ElraError::Overflow { .. } => ElraStatus::ELRA_OVERFLOW,
        ElraError::Numerical(_) => ElraStatus::ELRA_NUMERICAL,
        ElraError::Training { .. } => ElraStatus::ELRA_TRAINING,
        ElraError::Io { .. } => ElraStatus::ELRA_IO,
        ElraError::Format(_) => ElraStatus::ELRA_FORMAT,
        ElraError::NoDevice(_) => ElraStatus::ELRA_NO_DEVICE,
        ElraError::Cuda(_) => ElraStatus::ELRA_CUDA,
        ElraError::OutOfMemory { .. } => ElraStatus::ELRA_OUT_OF_MEMORY,
    }
}

/// Errors inside the ABI layer: the crate's errors plus the FFI-only null pointer.
#[derive(Debug)]
pub(crate) enum CError {
    /// A NULL pointer for the named argument.
    Null(&'static str),
    /// Any error of the crate.
    Elra(ElraError),
}

impl From<ElraError> for CError {
    fn from(e: ElraError) -> Self {
        CError::Elra(e)
    }
}

/// Result type of the ABI layer's internals.
pub(crate) type CResult<T> = std::result::Result<T, CError>;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(msg: String) {
    LAST_ERROR.with(|m| *m.borrow_mut() = msg);
}

fn clear_last_error() {
    LAST_ERROR.with(|m| m.borrow_mut().clear());
}

/// The panic boundary of the exports that return nothing (the destroy functions): as [`guard`],
/// but the thread's error text is left as it was. A finaliser that frees a handle — Python's
/// garbage collector, a C++ destructor — may run between a failing call and its caller reading
/// the message, and must not erase it.
pub(crate) fn guard_void<F: FnOnce() -> CResult<()>>(f: F) {
    let saved = LAST_ERROR.with(|m| std::mem::take(&mut *m.borrow_mut()));
    let _ = guard(f);
    LAST_ERROR.with(|m| *m.borrow_mut() = saved);
}

/// Runs `f` inside the panic boundary: clears the thread's error text, maps `Err` to its status
/// and text, and turns a panic into [`ElraStatus::ELRA_PANIC`].
pub(crate) fn guard<F: FnOnce() -> CResult<()>>(f: F) -> ElraStatus {
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => ELRA_OK,
        Ok(Err(CError::Null(arg))) => {
            set_last_error(format!("null pointer for `{arg}`"));
            ElraStatus::ELRA_NULL_POINTER
        }
        Ok(Err(CError::Elra(e))) => {
            set_last_error(e.to_string());
            status_of(&e)
        }
        Err(payload) => {
            let what = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "unknown panic payload".to_string()
            };
            set_last_error(format!("internal panic (library bug): {what}"));
            ElraStatus::ELRA_PANIC
        }
    }
}

/// Returns [`ELRA_ABI_VERSION`], the ABI version this library was built with.
#[no_mangle]
pub extern "C" fn elra_version() -> u32 {
    ELRA_ABI_VERSION
}

/// Copies the calling thread's last error message into `buf` and returns its full length in bytes
/// (UTF-8, not counting the terminating NUL); 0 when the last call into the library succeeded.
///
/// Writes at most `len` bytes, always NUL-terminated when `len > 0`: the message is cut at the
/// last whole UTF-8 character that fits in `len − 1` bytes, so a truncated message is still valid
/// UTF-8. A return value `≥ len` means the message was truncated; call again with a buffer of
/// `return value + 1` bytes. `buf` may be NULL only when `len` is 0 (a pure length query).
/// Reading the message does not clear it.
///
/// # Safety
/// `buf` must be NULL with `len == 0`, or point to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn elra_last_error_message(buf: *mut c_char, len: usize) -> usize {
    let r = catch_unwind(AssertUnwindSafe(|| {
        LAST_ERROR.with(|m| {
            let m = m.borrow();
            if buf.is_null() || len == 0 {
                return m.len();
            }
            let mut n = m.len().min(len - 1);
            while !m.is_char_boundary(n) {
                n -= 1;
            }
            // SAFETY: the caller guarantees `buf` points to `len` writable bytes; we write
            // n + 1 ≤ len bytes, from a String we own (no overlap with caller memory).
            unsafe {
                std::ptr::copy_nonoverlapping(m.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
            m.len()
        })
    }));
    r.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_variant_has_its_own_status() {
        let errs = [
            ElraError::shape("a", (1, 2), (2, 1)),
            ElraError::invalid("a", "x"),
            ElraError::NonFinite { arg: "a" },
            ElraError::Overflow { what: "x".into() },
            ElraError::Numerical("x".into()),
            ElraError::Training {
                step: 1,
                reason: "x".into(),
            },
            ElraError::Io {
                path: "p".into(),
                reason: "x".into(),
            },
            ElraError::Format("x".into()),
            ElraError::NoDevice("x".into()),
            ElraError::Cuda("x".into()),
            ElraError::out_of_memory("x", 1),
        ];
        let mut codes: Vec<i32> = errs.iter().map(|e| status_of(e) as i32).collect();
        codes.push(ElraStatus::ELRA_NULL_POINTER as i32);
        codes.push(ElraStatus::ELRA_PANIC as i32);
        codes.push(ELRA_OK as i32);
        let n = codes.len();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), n, "status codes must be distinct");
    }

    #[test]
    fn panics_become_status_and_message() {
        let s = guard(|| panic!("boom {}", 7));
        assert_eq!(s, ElraStatus::ELRA_PANIC);
        let mut buf = [0 as c_char; 128];
        // SAFETY: buf is a live local array of 128 bytes.
        let n = unsafe { elra_last_error_message(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: elra_last_error_message NUL-terminates within the buffer.
        let msg = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(msg.to_bytes().len(), n);
        assert!(msg.to_str().unwrap().contains("boom 7"));
        assert_eq!(guard(|| Ok(())), ELRA_OK);
        // SAFETY: NULL with len 0 is the documented length query.
        let n = unsafe { elra_last_error_message(std::ptr::null_mut(), 0) };
        assert_eq!(n, 0);
    }

    #[test]
    fn truncation_keeps_utf8_and_nul() {
        let s = guard(|| Err(ElraError::shape("w", (2, 3), (3, 2)).into()));
        assert_eq!(s, ElraStatus::ELRA_SHAPE_MISMATCH);
        // SAFETY: length query.
        let full = unsafe { elra_last_error_message(std::ptr::null_mut(), 0) };
        let text = "shape mismatch for `w`: expected 2×3, got 3×2";
        assert_eq!(full, text.len());
        // "×" is two bytes in UTF-8: cut in the middle of it must back off to a boundary.
        let cut = text.find('×').unwrap() + 1;
        for len in 1..=full + 1 {
            let mut buf = vec![0x55 as c_char; len + 4];
            // SAFETY: buf has len + 4 ≥ len writable bytes.
            let n = unsafe { elra_last_error_message(buf.as_mut_ptr(), len) };
            assert_eq!(n, full);
            let bytes: Vec<u8> = buf.iter().map(|&c| c as u8).collect();
            let nul = bytes.iter().position(|&c| c == 0).unwrap();
            assert!(nul < len, "NUL inside the buffer");
            assert!(bytes[len..].iter().all(|&c| c == 0x55), "no write past len");
            let s = std::str::from_utf8(&bytes[..nul]).expect("valid UTF-8");
            assert!(text.starts_with(s));
            if len - 1 == cut {
                assert_eq!(nul, cut - 1);
            }
        }
    }
}
