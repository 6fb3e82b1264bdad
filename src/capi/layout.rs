//! Caller memory: row-major matrix layouts with leading dimensions and batch strides (module
//! docs of [`crate::capi`]), their validation before any access, copies in and out, host
//! matrices, and C strings.

use std::ffi::{c_char, CStr};
use std::path::PathBuf;

use nalgebra::DMatrix;

use super::{CError, CResult};
use crate::linalg::Real;
use crate::ElraError;

/// A row-major strided batch of matrices described by the caller (see the module docs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    /// Number of matrices.
    pub batch: usize,
    /// Rows of each matrix.
    pub rows: usize,
    /// Columns of each matrix.
    pub cols: usize,
    /// Leading dimension (distance between rows, in elements).
    pub ld: usize,
    /// Distance between matrices, in elements (ignored when `batch == 1`).
    pub stride: usize,
}

impl Layout {
    /// Checks the dimensions: all ≥ 1, `ld ≥ cols`, `stride ≥ (rows−1)·ld + cols` when
    /// `batch > 1`, and a total span of at most `isize::MAX` bytes. Names `arg` in the error.
    pub fn check<T>(&self, arg: &'static str) -> CResult<()> {
        let bad = |why: String| CError::Elra(ElraError::invalid(arg, why));
        if self.batch == 0 || self.rows == 0 || self.cols == 0 {
            return Err(bad(format!(
                "zero dimension (batch = {}, rows = {}, cols = {})",
                self.batch, self.rows, self.cols
            )));
        }
        if self.ld < self.cols {
            return Err(bad(format!(
                "leading dimension {} is smaller than the {} columns",
                self.ld, self.cols
            )));
        }
        let too_big = || bad("the described memory exceeds the address space".to_string());
        let one = (self.rows - 1)
            .checked_mul(self.ld)
            .and_then(|x| x.checked_add(self.cols))
            .ok_or_else(too_big)?;
        let total = if self.batch > 1 {
            if self.stride < one {
                return Err(bad(format!(
                    "batch stride {} is smaller than one matrix's span {one} (matrices overlap)",
                    self.stride
                )));
            }
            (self.batch - 1)
                .checked_mul(self.stride)
                .and_then(|x| x.checked_add(one))
                .ok_or_else(too_big)?
        } else {
            one
        };
        match total.checked_mul(std::mem::size_of::<T>()) {
            Some(bytes) if bytes <= isize::MAX as usize => Ok(()),
            _ => Err(too_big()),
        }
    }

    /// Number of entries of the dense (packed) copy: `batch·rows·cols`.
    pub fn dense_len(&self) -> usize {
        self.batch * self.rows * self.cols
    }

    /// Offset of row `i` of matrix `b`.
    fn row_offset(&self, b: usize, i: usize) -> usize {
        b * self.stride + i * self.ld
    }
}

/// Checks a pointer for NULL and alignment.
fn check_ptr<T>(arg: &'static str, p: *const T) -> CResult<()> {
    if p.is_null() {
        return Err(CError::Null(arg));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(CError::Elra(ElraError::invalid(
            arg,
            format!(
                "pointer is not aligned to {} bytes",
                std::mem::align_of::<T>()
            ),
        )));
    }
    Ok(())
}

/// Validates a caller input (pointer + layout) without reading it.
pub(crate) fn check_in<T>(arg: &'static str, p: *const T, l: &Layout) -> CResult<()> {
    check_ptr(arg, p)?;
    l.check::<T>(arg)
}

/// Validates a caller output (pointer + layout) without touching it.
pub(crate) fn check_out<T>(arg: &'static str, p: *mut T, l: &Layout) -> CResult<()> {
    check_ptr(arg, p.cast_const())?;
    l.check::<T>(arg)
}

/// Copies a caller matrix batch into a packed row-major vector (`batch·rows·cols` entries) and
/// checks every entry for NaN/Inf (reported as `ElraError::NonFinite` naming `arg`).
///
/// # Safety
/// `p` must have passed [`check_in`] with `l`, and the caller of the export must guarantee that
/// every entry the layout describes is readable for the duration of the call.
pub(crate) unsafe fn read_in<T: Real>(
    arg: &'static str,
    p: *const T,
    l: &Layout,
) -> CResult<Vec<T>> {
    let mut out = try_with_capacity(arg, l.dense_len())?;
    for b in 0..l.batch {
        for i in 0..l.rows {
            // SAFETY: `check_in` verified that p is non-null, aligned, and that the span of the
            // layout fits the address space; the export's caller guarantees the described
            // entries (row i of matrix b: `cols` elements at `row_offset`) are readable. Only
            // that row is borrowed, and only until it is copied.
            let row = unsafe { std::slice::from_raw_parts(p.add(l.row_offset(b, i)), l.cols) };
            out.extend_from_slice(row);
        }
    }
    if out.iter().all(|x| x.is_finite()) {
        Ok(out)
    } else {
        Err(CError::Elra(ElraError::NonFinite { arg }))
    }
}

/// Writes a packed row-major vector to a caller matrix batch.
///
/// # Safety
/// `p` must have passed [`check_out`] with `l`, `data` must hold `l.dense_len()` entries, and the
/// caller of the export must guarantee that every entry the layout describes is writable and not
/// borrowed elsewhere during the call.
pub(crate) unsafe fn write_out<T: Copy>(p: *mut T, l: &Layout, data: &[T]) {
    debug_assert_eq!(data.len(), l.dense_len());
    for b in 0..l.batch {
        for i in 0..l.rows {
            let src = &data[(b * l.rows + i) * l.cols..][..l.cols];
            // SAFETY: `check_out` verified that p is non-null, aligned and that the layout's span
            // fits the address space; the export's caller guarantees these `cols` entries are
            // writable. `src` is library-owned memory, so the regions do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), p.add(l.row_offset(b, i)), l.cols)
            };
        }
    }
}

/// Validates a scalar out-pointer (non-null, aligned).
pub(crate) fn check_scalar_out<T>(arg: &'static str, p: *mut T) -> CResult<()> {
    check_ptr(arg, p.cast_const())
}

/// Checks the scalar outputs `a` and `b` (NULL, alignment), computes the pair with `f` and writes
/// it — the exports that return two scalars (`*_param_shape`, `*_get_step`, `*_energy` of both
/// handles). Nothing is written unless the whole call succeeds.
///
/// # Safety
/// Both pointers, once checked, must be writable (the export's contract).
pub(crate) unsafe fn write_pair<A, B>(
    (name_a, a): (&'static str, *mut A),
    (name_b, b): (&'static str, *mut B),
    f: impl FnOnce() -> CResult<(A, B)>,
) -> CResult<()> {
    check_scalar_out(name_a, a)?;
    check_scalar_out(name_b, b)?;
    let (x, y) = f()?;
    // SAFETY: validated non-null and aligned; the caller guarantees writability.
    unsafe {
        a.write(x);
        b.write(y);
    }
    Ok(())
}

/// [`write_pair`] for one scalar output: checks `p` (NULL, alignment), then writes `v`.
///
/// # Safety
/// `p`, once checked, must be writable (the export's contract).
pub(crate) unsafe fn write_one<A>((name, p): (&'static str, *mut A), v: A) -> CResult<()> {
    check_scalar_out(name, p)?;
    // SAFETY: validated non-null and aligned; the caller guarantees writability.
    unsafe { p.write(v) };
    Ok(())
}

/// Reads a caller matrix (rows×cols, leading dimension ld) into a DMatrix, checking finiteness.
///
/// # Safety
/// `p` must cover the described layout for reading.
pub(crate) unsafe fn read_matrix<T: Real>(
    arg: &'static str,
    p: *const T,
    rows: usize,
    cols: usize,
    ld: usize,
) -> CResult<DMatrix<T>> {
    let l = Layout {
        batch: 1,
        rows,
        cols,
        ld,
        stride: 0,
    };
    check_in(arg, p, &l)?;
    // nalgebra stores columns: fill the column-major buffer directly (one allocation).
    let mut v = try_with_capacity(arg, rows * cols)?;
    v.resize(rows * cols, T::zero());
    for i in 0..rows {
        // SAFETY: `check_in` validated the layout; the export's caller guarantees that row i
        // (`cols` elements at `i·ld`) is readable. It is borrowed only until it is copied.
        let row = unsafe { std::slice::from_raw_parts(p.add(i * ld), cols) };
        for (j, &x) in row.iter().enumerate() {
            if !x.is_finite() {
                return Err(CError::Elra(ElraError::NonFinite { arg }));
            }
            v[j * rows + i] = x;
        }
    }
    Ok(DMatrix::from_vec(rows, cols, v))
}

/// Row-major copy of a (small) matrix.
#[cfg(any(test, feature = "cuda"))]
pub(crate) fn row_major<T: Real>(m: &DMatrix<T>) -> Vec<T> {
    let mut v = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        v.extend(m.row(i).iter().copied());
    }
    v
}

/// Writes a host matrix to a caller matrix (rows of `m` at `p + i·ld`), without an intermediate
/// copy.
///
/// # Safety
/// `p` must have passed [`check_out`] with `l` (a single matrix of `m`'s shape), and the export's
/// caller must guarantee that the described entries are writable and not borrowed elsewhere.
pub(crate) unsafe fn write_matrix<T: Real>(p: *mut T, l: &Layout, m: &DMatrix<T>) {
    debug_assert_eq!((l.batch, l.rows, l.cols), (1, m.nrows(), m.ncols()));
    for i in 0..l.rows {
        for j in 0..l.cols {
            // SAFETY: (i, j) lies in the validated layout; the caller guarantees writability.
            unsafe { p.add(l.row_offset(0, i) + j).write(m[(i, j)]) };
        }
    }
}

/// An empty vector with room for `len` elements, or `ELRA_OUT_OF_MEMORY` (never an abort).
pub(crate) fn try_with_capacity<T>(what: &str, len: usize) -> CResult<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        ElraError::out_of_memory(what, len.saturating_mul(std::mem::size_of::<T>()))
    })?;
    Ok(v)
}

/// The number of elements of a call's working set: `Σ aᵢ·bᵢ` over `terms`, `None` when it
/// overflows `usize` (certainly more than any machine has).
pub(crate) fn elements(terms: &[(usize, usize)]) -> Option<usize> {
    terms
        .iter()
        .try_fold(0usize, |acc, &(a, b)| acc.checked_add(a.checked_mul(b)?))
}

/// Checks, before any work, that the working set of a call (`elements` values of `T`, from
/// [`elements`]) can be allocated now: the memory is reserved and released at once, so that a
/// request too large for the machine is `ELRA_OUT_OF_MEMORY` instead of an abort inside the
/// computation (whose own allocations cannot fail gracefully). A best-effort check: memory
/// taken by other threads in between can still run out.
pub(crate) fn reserve<T>(what: &str, elements: Option<usize>) -> CResult<()> {
    let bytes = elements
        .and_then(|n| n.checked_mul(std::mem::size_of::<T>()))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| ElraError::out_of_memory(what, usize::MAX))?;
    try_with_capacity::<u8>(what, bytes).map(drop)
}

/// A validated output layout for a rows×cols matrix.
pub(crate) fn out_layout<T>(
    arg: &'static str,
    p: *mut T,
    rows: usize,
    cols: usize,
    ld: usize,
) -> CResult<Layout> {
    let l = Layout {
        batch: 1,
        rows,
        cols,
        ld,
        stride: 0,
    };
    check_out(arg, p, &l)?;
    Ok(l)
}

pub(crate) fn c_str<'a>(arg: &'static str, p: *const c_char) -> CResult<&'a CStr> {
    if p.is_null() {
        return Err(CError::Null(arg));
    }
    // SAFETY: non-null; the export's caller guarantees a NUL-terminated string that outlives the
    // call (documented on every export taking a string).
    Ok(unsafe { CStr::from_ptr(p) })
}

pub(crate) fn c_path(arg: &'static str, p: *const c_char) -> CResult<PathBuf> {
    let s = c_str(arg, p)?;
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        Ok(PathBuf::from(s.to_str().map_err(|_| {
            ElraError::invalid(arg, "path is not valid UTF-8")
        })?))
    }
}

pub(crate) fn c_utf8<'a>(arg: &'static str, p: *const c_char) -> CResult<&'a str> {
    c_str(arg, p)?
        .to_str()
        .map_err(|_| ElraError::invalid(arg, "not valid UTF-8").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(rows: usize, cols: usize, ld: usize) -> Layout {
        Layout {
            batch: 1,
            rows,
            cols,
            ld,
            stride: 0,
        }
    }

    #[test]
    fn layout_checks() {
        assert!(single(2, 3, 3).check::<f64>("x").is_ok());
        assert!(single(2, 3, 2).check::<f64>("x").is_err());
        assert!(single(0, 3, 3).check::<f64>("x").is_err());
        let l = Layout {
            batch: 2,
            rows: 2,
            cols: 2,
            ld: 3,
            stride: 4,
        };
        assert!(l.check::<f64>("x").is_err(), "stride 4 < span 5");
        let l = Layout { stride: 5, ..l };
        assert!(l.check::<f64>("x").is_ok());
        let l = Layout {
            batch: usize::MAX,
            stride: usize::MAX / 2,
            ..l
        };
        assert!(l.check::<f64>("x").is_err());
    }
}
