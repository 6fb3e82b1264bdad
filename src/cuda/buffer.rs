//! Typed device buffers: a batch of row-major matrices.

use std::mem::ManuallyDrop;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr};
use nalgebra::DMatrix;

use super::{CudaDevice, DeviceScalar};
use crate::{ElraError, Result};

/// A batch of `batch` matrices of `rows × cols` in device memory, each row-major and stored one
/// after the other: entry `(b, i, j)` is at `b·rows·cols + i·cols + j`.
///
/// nalgebra's `DMatrix` is column-major; [`Self::from_host`] and [`Self::to_host`] convert.
/// All dimensions are at least 1.
pub struct DeviceMatrices<T: DeviceScalar> {
    data: CudaSlice<T>,
    batch: usize,
    rows: usize,
    cols: usize,
    ordinal: usize,
}

impl<T: DeviceScalar> std::fmt::Debug for DeviceMatrices<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceMatrices<{}>({}×{}×{} on device {})",
            T::DTYPE,
            self.batch,
            self.rows,
            self.cols,
            self.ordinal
        )
    }
}

fn check_dims(batch: usize, rows: usize, cols: usize) -> Result<usize> {
    if batch == 0 {
        return Err(ElraError::invalid("batch", "must be at least 1"));
    }
    if rows == 0 || cols == 0 {
        return Err(ElraError::invalid(
            "rows/cols",
            format!("matrices must be non-empty, got {rows}×{cols}"),
        ));
    }
    batch
        .checked_mul(rows)
        .and_then(|x| x.checked_mul(cols))
        .ok_or_else(|| ElraError::invalid("batch", "batch·rows·cols overflows usize"))
}

impl<T: DeviceScalar> DeviceMatrices<T> {
    /// A zero-filled batch.
    pub fn zeros(dev: &CudaDevice, batch: usize, rows: usize, cols: usize) -> Result<Self> {
        let len = check_dims(batch, rows, cols)?;
        let data = dev.stream().alloc_zeros::<T>(len)?;
        Ok(Self::wrap(dev, data, batch, rows, cols))
    }

    /// A batch with every entry equal to `value` (tests poison outputs with NaN this way).
    pub fn filled(
        dev: &CudaDevice,
        batch: usize,
        rows: usize,
        cols: usize,
        value: T,
    ) -> Result<Self> {
        let len = check_dims(batch, rows, cols)?;
        let data = dev.stream().clone_htod(&vec![value; len])?;
        Ok(Self::wrap(dev, data, batch, rows, cols))
    }

    /// Uploads `data` (row-major matrices one after the other, `batch·rows·cols` entries).
    pub fn from_row_major(
        dev: &CudaDevice,
        batch: usize,
        rows: usize,
        cols: usize,
        data: &[T],
    ) -> Result<Self> {
        let len = check_dims(batch, rows, cols)?;
        if data.len() != len {
            return Err(ElraError::Shape {
                arg: "data",
                expected: format!("{batch}·{rows}·{cols} = {len} entries"),
                got: format!("{} entries", data.len()),
            });
        }
        let data = dev.stream().clone_htod(data)?;
        Ok(Self::wrap(dev, data, batch, rows, cols))
    }

    /// Uploads a batch of nalgebra matrices, which must all have the same shape.
    pub fn from_host(dev: &CudaDevice, mats: &[DMatrix<T>]) -> Result<Self> {
        let first = mats
            .first()
            .ok_or_else(|| ElraError::invalid("mats", "empty batch"))?;
        let (rows, cols) = first.shape();
        let mut host = Vec::with_capacity(mats.len() * rows * cols);
        for m in mats {
            if m.shape() != (rows, cols) {
                return Err(ElraError::shape("mats", (rows, cols), m.shape()));
            }
            for i in 0..rows {
                for j in 0..cols {
                    host.push(m[(i, j)]);
                }
            }
        }
        Self::from_row_major(dev, mats.len(), rows, cols, &host)
    }

    fn wrap(dev: &CudaDevice, data: CudaSlice<T>, batch: usize, rows: usize, cols: usize) -> Self {
        DeviceMatrices {
            data,
            batch,
            rows,
            cols,
            ordinal: dev.ordinal(),
        }
    }

    /// Downloads all entries, row-major, matrices one after the other. Synchronises the stream.
    pub fn to_row_major(&self, dev: &CudaDevice) -> Result<Vec<T>> {
        self.check_device(dev, "self")?;
        let v = dev.stream().clone_dtoh(&self.data)?;
        dev.synchronize()?;
        Ok(v)
    }

    /// Downloads the batch as nalgebra matrices. Synchronises the stream.
    pub fn to_host(&self, dev: &CudaDevice) -> Result<Vec<DMatrix<T>>> {
        let v = self.to_row_major(dev)?;
        let (r, c) = (self.rows, self.cols);
        Ok(v.chunks_exact(r * c)
            .map(|m| DMatrix::from_row_slice(r, c, m))
            .collect())
    }

    /// Overwrites every entry with a copy of `src` (same shape, same device; one
    /// device-to-device copy on `dev`'s stream).
    pub fn copy_from(&mut self, dev: &CudaDevice, src: &DeviceMatrices<T>) -> Result<()> {
        self.check_device(dev, "self")?;
        src.check_device(dev, "src")?;
        src.check_shape("src", self.batch, self.rows, self.cols)?;
        dev.stream().memcpy_dtod(&src.data, &mut self.data)?;
        Ok(())
    }

    /// The device address of the first entry (an identity for the input key of a layer's tape;
    /// nothing is dereferenced or enqueued).
    pub fn device_addr(&self) -> usize {
        let (p, _guard) = self.data.device_ptr(self.data.stream());
        p as usize
    }

    /// Overwrites every entry with `value`.
    pub fn fill(&mut self, dev: &CudaDevice, value: T) -> Result<()> {
        self.check_device(dev, "self")?;
        dev.stream()
            .memcpy_htod(&vec![value; self.len()], &mut self.data)?;
        Ok(())
    }

    /// Number of matrices.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Rows of each matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns of each matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Total number of entries, `batch·rows·cols`.
    pub fn len(&self) -> usize {
        self.batch * self.rows * self.cols
    }
    /// Always `false` (dimensions are at least 1); present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The ordinal of the device holding the data.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The underlying cudarc slice.
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.data
    }
    /// The underlying cudarc slice, mutably.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.data
    }

    /// Errors unless the buffer lives on `dev`'s device.
    pub(crate) fn check_device(&self, dev: &CudaDevice, arg: &'static str) -> Result<()> {
        if self.ordinal == dev.ordinal() {
            Ok(())
        } else {
            Err(ElraError::invalid(
                arg,
                format!(
                    "buffer is on device {} but the handle is device {}",
                    self.ordinal,
                    dev.ordinal()
                ),
            ))
        }
    }

    /// Errors unless the shape is `batch × rows × cols`.
    pub(crate) fn check_shape(
        &self,
        arg: &'static str,
        batch: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if (self.batch, self.rows, self.cols) == (batch, rows, cols) {
            Ok(())
        } else {
            Err(ElraError::Shape {
                arg,
                expected: format!("{batch}×{rows}×{cols}"),
                got: format!("{}×{}×{}", self.batch, self.rows, self.cols),
            })
        }
    }
}

/// A non-owning [`DeviceMatrices`] over device memory that someone else owns (the C ABI's
/// caller-owned activations, e.g. PyTorch tensors): it lends the layer a `&DeviceMatrices` /
/// `&mut DeviceMatrices` without copying, and dropping it never frees the memory.
///
/// Internally the cudarc slice is created with `CudaStream::upgrade_device_ptr` on the device's
/// stream and given back with `CudaSlice::leak` on drop (which releases only its stream reference,
/// and cudarc's events where event tracking is on; the crate turns it off). Ordering with the
/// owner's stream is the user's job (the C ABI records and waits on explicit events). The wrapped matrices are never handed out by value, so no code path
/// can drop the owning slice. Crate-internal: a public `&mut DeviceMatrices` could be swapped out
/// by safe code.
pub(crate) struct BorrowedMatrices<T: DeviceScalar> {
    inner: ManuallyDrop<DeviceMatrices<T>>,
}

impl<T: DeviceScalar> BorrowedMatrices<T> {
    /// Wraps `batch` row-major `rows × cols` matrices stored contiguously at `ptr`.
    ///
    /// # Safety
    /// `ptr` must address `batch·rows·cols` elements of `T` (aligned for `T`) in device memory
    /// accessible from `dev`'s context, and the memory must stay allocated until all work
    /// enqueued through the wrapper on `dev`'s stream has finished (the C ABI orders the
    /// caller's stream after that work). For a wrapper used through [`Self::get_mut`], no other
    /// work may write or read the memory concurrently.
    pub(crate) unsafe fn new(
        dev: &CudaDevice,
        ptr: CUdeviceptr,
        batch: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let len = check_dims(batch, rows, cols)?;
        // SAFETY: forwarded contract: `ptr` covers `len` elements of T on this context. The
        // slice is wrapped in ManuallyDrop at once and only ever released through `leak`, so
        // cudarc never frees the caller's memory (not even on unwinding).
        let data = unsafe { dev.stream().upgrade_device_ptr::<T>(ptr, len) };
        Ok(BorrowedMatrices {
            inner: ManuallyDrop::new(DeviceMatrices::wrap(dev, data, batch, rows, cols)),
        })
    }

    /// A device copy owned by the library (one device-to-device copy on `dev`'s stream).
    pub(crate) fn to_owned(&self, dev: &CudaDevice) -> Result<DeviceMatrices<T>> {
        let m = self.get();
        let data = dev.stream().clone_dtod(m.slice())?;
        Ok(DeviceMatrices::wrap(dev, data, m.batch, m.rows, m.cols))
    }

    /// The matrices, for reading.
    pub(crate) fn get(&self) -> &DeviceMatrices<T> {
        &self.inner
    }

    /// The matrices, for writing. Callers must not move the value out (e.g. `mem::swap`).
    pub(crate) fn get_mut(&mut self) -> &mut DeviceMatrices<T> {
        &mut self.inner
    }
}

impl<T: DeviceScalar> Drop for BorrowedMatrices<T> {
    fn drop(&mut self) {
        // SAFETY: `inner` is taken exactly once, here, and not used afterwards.
        let m = unsafe { ManuallyDrop::take(&mut self.inner) };
        // `leak` makes the stream wait on the slice's events (a no-op on its own stream) and
        // drops the events and the stream reference; the device memory stays the caller's.
        let _caller_owned: CUdeviceptr = m.data.leak();
    }
}

/// A non-owning [`CudaSlice`] over device memory that someone else owns — a region of a caller's
/// workspace that a kernel takes as a buffer of its own (column-reduction partials, φ1 work
/// matrices, kernel statuses; [`crate::cuda::ops`]). Created with `upgrade_device_ptr` on the
/// device's stream and given back with `CudaSlice::leak` on drop, as [`BorrowedMatrices`]; the
/// memory is never freed by the library.
pub(crate) struct BorrowedSlice<T> {
    inner: ManuallyDrop<CudaSlice<T>>,
}

impl<T> BorrowedSlice<T> {
    /// Wraps `len` elements of `T` at `ptr`.
    ///
    /// # Safety
    /// As [`BorrowedMatrices::new`]: `ptr` must address `len` elements of `T` (aligned for `T`)
    /// in device memory of `dev`'s context that stays allocated until the work enqueued through
    /// the wrapper on `dev`'s stream has run, and no other work may access it concurrently.
    pub(crate) unsafe fn new(dev: &CudaDevice, ptr: CUdeviceptr, len: usize) -> Self {
        // SAFETY: forwarded contract; wrapped in ManuallyDrop at once and only released through
        // `leak`, so cudarc never frees the memory.
        let data = unsafe { dev.stream().upgrade_device_ptr::<T>(ptr, len) };
        BorrowedSlice {
            inner: ManuallyDrop::new(data),
        }
    }

    /// The slice, for reading (and for kernels that write through a shared view).
    pub(crate) fn get(&self) -> &CudaSlice<T> {
        &self.inner
    }

    /// The slice, for writing. Callers must not move the value out.
    pub(crate) fn get_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.inner
    }
}

impl<T> Drop for BorrowedSlice<T> {
    fn drop(&mut self) {
        // SAFETY: `inner` is taken exactly once, here, and not used afterwards.
        let s = unsafe { ManuallyDrop::take(&mut self.inner) };
        let _caller_owned: CUdeviceptr = s.leak();
    }
}
