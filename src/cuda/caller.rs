//! Working on memory and streams that the caller owns (an engine such as PyTorch, through the C
//! ABI of `crate::capi::gpu`): the thread's context guard, the join of the caller's stream with the
//! device's one stream, and the checks and borrowing of caller device pointers. Everything here
//! returns [`ElraError`]; the ABI only maps it to status codes.
//!
//! * [`CtxRestore`] puts back the thread's current context when a call returns.
//! * [`CallerStream::ordered`] orders work enqueued on the device's stream after the caller's
//!   `stream` and the caller's later work after it: an event recorded on `stream` that the
//!   device's stream waits for, then an event recorded on the device's stream that `stream` waits
//!   for (a drop guard does the second half on error paths too).
//! * [`CallerMatrix::check`] validates a caller pointer without touching the memory (NULL, zero
//!   dimensions, contiguity `ld == cols`, alignment, size, and through `cuPointerGetAttribute`
//!   that the address is device memory of the layer's device); [`no_overlap`] rejects outputs
//!   that overlap another operand; [`CallerMatrix::borrow`] lends the memory to a layer as a
//!   [`DeviceMatrices`](super::DeviceMatrices) without copying.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::sys::{self as cu, CUdeviceptr, CUstream};
use cudarc::driver::{CudaEvent, CudaStream};

use super::{BorrowedMatrices, CudaDevice, DeviceScalar};
use crate::{ElraError, Result};

/// Restores the calling thread's current CUDA context when dropped. cudarc binds a device's
/// primary context to the thread; an engine that had another device's context current (the CUDA
/// runtime's "current device") gets it back. Create it only once the driver is known to be
/// loaded (a live GPU handle, or after [`super::device_count`] succeeded).
pub(crate) struct CtxRestore(Option<cu::CUcontext>);

impl CtxRestore {
    /// Remembers the thread's current context (none when the driver reports none).
    pub(crate) fn new() -> Self {
        CtxRestore(cudarc::driver::result::ctx::get_current().ok().flatten())
    }
}

impl Drop for CtxRestore {
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            let now = cudarc::driver::result::ctx::get_current().ok().flatten();
            if now != Some(prev) {
                // SAFETY: `prev` was the thread's current context when the guard was made (owned
                // by whoever made it current; the library never destroys contexts), so making it
                // current again is what the thread had before the call.
                let _ = unsafe { cudarc::driver::result::ctx::set_current(prev) };
            }
        }
    }
}

/// The stream plumbing of one caller-facing handle: the device and the two events of the join
/// ([`Self::ordered`]).
pub(crate) struct CallerStream {
    dev: Arc<CudaDevice>,
    ev_in: Arc<CudaEvent>,
    ev_out: Arc<CudaEvent>,
}

impl CallerStream {
    /// The events of the join on `dev`'s context.
    pub(crate) fn new(dev: Arc<CudaDevice>) -> Result<Self> {
        let ctx = dev.context().clone();
        Ok(CallerStream {
            ev_in: Arc::new(ctx.new_event(None)?),
            ev_out: Arc::new(ctx.new_event(None)?),
            dev,
        })
    }

    /// The device.
    pub(crate) fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Runs `f` (which enqueues work on the device's stream) ordered after the work enqueued so
    /// far on the caller's `stream`, and orders the caller's later work on `stream` after `f`'s:
    /// records an event on `stream`, makes the device's stream wait for it, runs `f`, records an
    /// event on the device's stream and makes `stream` wait for it — also when `f` fails.
    ///
    /// # Safety
    /// `stream` must be NULL (the legacy default stream) or a live stream of the device's
    /// primary context that outlives the call.
    pub(crate) unsafe fn ordered<R, E: From<ElraError>>(
        &self,
        stream: *mut c_void,
        f: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let ctx = self.dev.context();
        ctx.bind_to_thread().map_err(ElraError::from)?;
        // SAFETY: the caller guarantees that `stream` is NULL or a live stream of this device's
        // primary context that outlives the call. The wrapper does not own the stream (dropping it
        // destroys nothing), and all work submitted through it is an event record or wait.
        let caller = unsafe { ctx.wrap_borrowed_stream(stream as CUstream) };
        self.ev_in.record(&caller).map_err(ElraError::from)?;
        self.dev
            .stream()
            .wait(&self.ev_in)
            .map_err(ElraError::from)?;
        let join = JoinBack {
            ours: self.dev.stream().clone(),
            caller,
            ev: self.ev_out.clone(),
            done: false,
        };
        let r = f()?;
        join.finish()?;
        Ok(r)
    }
}

/// Makes the caller's stream wait for the device's stream when dropped, so that work enqueued
/// before an early return (or a panic) is still ordered before the caller's later work.
struct JoinBack {
    ours: Arc<CudaStream>,
    caller: Arc<CudaStream>,
    ev: Arc<CudaEvent>,
    done: bool,
}

impl JoinBack {
    fn finish(mut self) -> Result<()> {
        self.done = true;
        self.ev.record(&self.ours)?;
        Ok(self.caller.wait(&self.ev)?)
    }
}

impl Drop for JoinBack {
    fn drop(&mut self) {
        if !self.done {
            // Best effort on the error path; the error being returned is the one to report.
            if self.ev.record(&self.ours).is_ok() {
                let _ = self.caller.wait(&self.ev);
            }
        }
    }
}

/// A caller device matrix of `T` after validation ([`Self::check`]): its address and shape.
#[derive(Debug)]
pub(crate) struct CallerMatrix<T: DeviceScalar> {
    /// The argument's name, for errors.
    pub(crate) arg: &'static str,
    /// The device address.
    pub(crate) ptr: CUdeviceptr,
    /// Rows.
    pub(crate) rows: usize,
    /// Columns (= the leading dimension).
    pub(crate) cols: usize,
    /// Bytes the matrix spans.
    pub(crate) bytes: usize,
    _t: PhantomData<T>,
}

impl<T: DeviceScalar> Clone for CallerMatrix<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: DeviceScalar> Copy for CallerMatrix<T> {}

impl<T: DeviceScalar> CallerMatrix<T> {
    /// Validates a caller device matrix of `T` (rows×cols, row-major, leading dimension `ld`)
    /// without touching it: non-NULL, dimensions ≥ 1, `ld == cols` (contiguous; strided device
    /// layouts are reserved), then as [`CallerSpan::check`] (alignment, address space, device).
    pub(crate) fn check(
        dev: Option<&CudaDevice>,
        arg: &'static str,
        p: *const c_void,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<Self> {
        if !p.is_null() && rows != 0 && cols != 0 && ld != cols {
            return Err(ElraError::invalid(
                arg,
                format!(
                    "leading dimension {ld} ≠ {cols} columns: device matrices must be contiguous \
                     row-major (ld = cols)"
                ),
            ));
        }
        let s = CallerSpan::<T>::check(dev, arg, p, rows, cols, ld)?;
        Ok(CallerMatrix {
            arg,
            ptr: s.ptr,
            rows,
            cols,
            bytes: s.bytes,
            _t: PhantomData,
        })
    }

    /// Lends the matrix to the library without copying (released, never freed, on drop).
    ///
    /// # Safety
    /// The memory must stay allocated (and, for a matrix written through the wrapper, not be
    /// accessed by other work) until the work enqueued through the wrapper on `dev`'s stream has
    /// run; [`CallerStream::ordered`] orders the caller's stream after it. `self` must have been
    /// checked against `dev` ([`Self::check`] with `Some(dev)`).
    pub(crate) unsafe fn borrow(&self, dev: &CudaDevice) -> Result<BorrowedMatrices<T>> {
        // SAFETY: forwarded contract; `check` validated alignment for T, the size and the device.
        unsafe { BorrowedMatrices::new(dev, self.ptr, 1, self.rows, self.cols) }
    }
}

/// A caller device matrix of `T` with a row stride after validation ([`Self::check`]): the
/// device address and the bytes from its first to its last entry. Read-only uses (the non-finite
/// scan) take such strided layouts; [`CallerMatrix`] is the contiguous case.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallerSpan<T> {
    /// The device address.
    pub(crate) ptr: CUdeviceptr,
    /// Rows.
    pub(crate) rows: usize,
    /// Columns.
    pub(crate) cols: usize,
    /// The row stride (elements, `≥ cols`).
    pub(crate) ld: usize,
    /// Elements of `T` from the first entry to the last, `(rows − 1)·ld + cols`.
    pub(crate) len: usize,
    /// Bytes the matrix spans (`len` elements).
    pub(crate) bytes: usize,
    _t: PhantomData<T>,
}

impl<T> CallerSpan<T> {
    /// Validates `rows × cols` entries of `T` at `p` with row stride `ld` without touching them:
    /// non-NULL, dimensions ≥ 1, `ld ≥ cols`, aligned to `T`, inside the address space, and —
    /// with `dev` — that the driver knows the address as memory of `dev`'s device
    /// (`cuPointerGetAttribute`).
    pub(crate) fn check(
        dev: Option<&CudaDevice>,
        arg: &'static str,
        p: *const c_void,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<Self> {
        if p.is_null() {
            return Err(ElraError::invalid(arg, "null device pointer"));
        }
        if rows == 0 || cols == 0 {
            return Err(ElraError::invalid(
                arg,
                format!("zero dimension ({rows}×{cols} matrix)"),
            ));
        }
        if ld < cols {
            return Err(ElraError::invalid(
                arg,
                format!("leading dimension {ld} < {cols} columns"),
            ));
        }
        let size = std::mem::size_of::<T>();
        if (p as usize) % size != 0 {
            return Err(ElraError::invalid(
                arg,
                format!("device pointer is not aligned to {size} bytes"),
            ));
        }
        let len = (rows - 1).checked_mul(ld).and_then(|x| x.checked_add(cols));
        let bytes = len
            .and_then(|x| x.checked_mul(size))
            .filter(|&b| b <= isize::MAX as usize && (p as usize).checked_add(b).is_some())
            .ok_or_else(|| {
                ElraError::invalid(arg, "the described memory exceeds the address space")
            })?;
        let ptr = p as CUdeviceptr;
        if let Some(dev) = dev {
            check_on_device(dev, arg, ptr)?;
        }
        Ok(CallerSpan {
            ptr,
            rows,
            cols,
            ld,
            len: bytes / size,
            bytes,
            _t: PhantomData,
        })
    }
}

/// The stream plumbing the functional calls ([`crate::cuda::ops`] through the C ABI) share per
/// device: one [`CallerStream`] (the device handle with its cuBLAS handle bound to the device's
/// stream, and the two join events) per ordinal, created on first use and kept for the life of
/// the process. The mutex serialises the join of concurrent calls on the shared events.
static SHARED: std::sync::Mutex<Vec<(usize, Arc<std::sync::Mutex<CallerStream>>)>> =
    std::sync::Mutex::new(Vec::new());

/// The shared [`CallerStream`] of device `ordinal` (opened on first use).
pub(crate) fn shared_stream(ordinal: usize) -> Result<Arc<std::sync::Mutex<CallerStream>>> {
    let mut table = SHARED
        .lock()
        .map_err(|_| ElraError::Cuda("stream registry poisoned by an earlier panic".into()))?;
    if let Some((_, s)) = table.iter().find(|(o, _)| *o == ordinal) {
        return Ok(s.clone());
    }
    let dev = Arc::new(CudaDevice::new(ordinal)?);
    let s = Arc::new(std::sync::Mutex::new(CallerStream::new(dev)?));
    table.push((ordinal, s.clone()));
    Ok(s)
}

/// The device ordinal the driver reports for the device memory at `p` (`arg` names it in
/// errors). When the thread has no current context the driver may not answer: then device 0's
/// primary context is made current (the caller restores the thread's context with
/// [`CtxRestore`]) and the query repeated. Call only once the driver is known to be loaded.
pub(crate) fn ordinal_of(arg: &'static str, p: *const c_void) -> Result<usize> {
    let query = || {
        let mut ordinal: i32 = -1;
        // SAFETY: as in `check_on_device`: the driver writes one `int` into a live local and only
        // looks the address up in its tables.
        let r = unsafe {
            cu::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                p as CUdeviceptr,
            )
        };
        (r, ordinal)
    };
    let (mut r, mut ordinal) = query();
    if r == cu::CUresult::CUDA_ERROR_INVALID_CONTEXT {
        let s = shared_stream(0)?;
        s.lock()
            .map_err(|_| ElraError::Cuda("stream poisoned by an earlier panic".into()))?
            .device()
            .context()
            .bind_to_thread()?;
        (r, ordinal) = query();
    }
    if r != cu::CUresult::CUDA_SUCCESS {
        return Err(ElraError::invalid(
            arg,
            format!("not device memory known to the CUDA driver ({r:?})"),
        ));
    }
    usize::try_from(ordinal)
        .map_err(|_| ElraError::invalid(arg, format!("the driver reports device {ordinal}")))
}

/// Errors unless the driver knows `ptr` as memory of `dev`'s device.
fn check_on_device(dev: &CudaDevice, arg: &'static str, ptr: CUdeviceptr) -> Result<()> {
    let mut ordinal: i32 = -1;
    // SAFETY: the driver writes one `int` (the attribute's documented type) into `ordinal`, a live
    // local; it only looks the address up in its allocation tables and never dereferences it.
    let r = unsafe {
        cu::cuPointerGetAttribute(
            (&mut ordinal as *mut i32).cast(),
            cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr,
        )
    };
    if r != cu::CUresult::CUDA_SUCCESS {
        return Err(ElraError::invalid(
            arg,
            format!("not device memory known to the CUDA driver ({r:?})"),
        ));
    }
    if usize::try_from(ordinal).ok() != Some(dev.ordinal()) {
        return Err(ElraError::invalid(
            arg,
            format!(
                "memory is on device {ordinal} but the handle is on device {}",
                dev.ordinal()
            ),
        ));
    }
    Ok(())
}

/// Errors when an output overlaps any other matrix of the call (an output listed in `all` is
/// not compared with itself).
pub(crate) fn no_overlap<T: DeviceScalar>(
    outputs: &[CallerMatrix<T>],
    all: &[CallerMatrix<T>],
) -> Result<()> {
    for o in outputs {
        for m in all {
            if o.arg == m.arg && o.ptr == m.ptr {
                continue;
            }
            let (a0, a1) = (o.ptr, o.ptr + o.bytes as u64);
            let (b0, b1) = (m.ptr, m.ptr + m.bytes as u64);
            if a0 < b1 && b0 < a1 {
                return Err(ElraError::invalid(
                    o.arg,
                    format!("overlaps `{}` (device buffers may not alias)", m.arg),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use std::ptr::null;

    /// A non-null pointer aligned for every element type, never dereferenced.
    const FAKE: *const c_void = 0x1000 as *const c_void;

    fn check<T: DeviceScalar>(p: *const c_void, rows: usize, cols: usize, ld: usize) -> String {
        match CallerMatrix::<T>::check(None, "x", p, rows, cols, ld) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn device_matrix_checks_without_a_device() {
        let ok = CallerMatrix::<f32>::check(None, "x", FAKE, 3, 4, 4).unwrap();
        assert_eq!((ok.rows, ok.cols, ok.bytes), (3, 4, 48));
        assert!(check::<f32>(null(), 3, 4, 4).contains("null"));
        assert!(check::<f32>(FAKE, 0, 4, 4).contains("zero"));
        assert!(check::<f32>(FAKE, 3, 0, 0).contains("zero"));
        assert!(check::<f32>(FAKE, 3, 4, 5).contains("contiguous"));
        assert!(check::<f32>(FAKE, 3, 4, 3).contains("contiguous"));
        assert!(check::<f32>(0x1002 as _, 3, 4, 4).contains("aligned"));
        assert!(CallerMatrix::<f16>::check(None, "x", 0x1002 as _, 3, 4, 4).is_ok());
        let huge = usize::MAX / 2;
        assert!(check::<f32>(FAKE, huge, 4, 4).contains("address space"));
        // Overlap: y = [0x1000, 0x1030) against x at 0x1020 (overlaps) and at 0x1030 (adjacent).
        let m = |arg, p: usize, rows| CallerMatrix::<f32>::check(None, arg, p as _, rows, 4, 4);
        let y = m("y", 0x1000, 3).unwrap();
        let x1 = m("x", 0x1020, 1).unwrap();
        let x2 = m("x", 0x1030, 1).unwrap();
        let err = no_overlap(&[y], &[x1, y]).unwrap_err().to_string();
        assert!(err.contains("overlaps `x`"), "{err}");
        assert!(no_overlap(&[y], &[x2, y]).is_ok());
    }

    #[test]
    fn strided_spans_checks_without_a_device() {
        let span = |p: *const c_void, rows, cols, ld| {
            CallerSpan::<f16>::check(None, "x", p, rows, cols, ld).map_err(|e| e.to_string())
        };
        let s = span(FAKE, 3, 4, 6).unwrap();
        assert_eq!((s.rows, s.cols, s.ld, s.len, s.bytes), (3, 4, 6, 16, 32));
        assert_eq!(span(FAKE, 1, 4, 4).unwrap().len, 4);
        assert!(span(null(), 3, 4, 6).unwrap_err().contains("null"));
        assert!(span(FAKE, 0, 4, 6).unwrap_err().contains("zero"));
        assert!(span(FAKE, 3, 4, 3)
            .unwrap_err()
            .contains("leading dimension 3 < 4"));
        assert!(span(0x1001 as _, 3, 4, 6).unwrap_err().contains("aligned"));
        assert!(span(FAKE, usize::MAX / 4, 4, 8)
            .unwrap_err()
            .contains("address space"));
        // A matrix reaching past the end of the address space.
        assert!(span(usize::MAX as *const c_void, 1, 1, 1).is_err());
    }
}
