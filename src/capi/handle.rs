//! Opaque handles: one checked cast from a C pointer to a live handle, for every handle type.
//!
//! A handle is a `Box` handed to C as a raw pointer. Its first field is a magic tag, set on
//! creation and cleared on destruction, so that NULL, misaligned, destroyed or foreign pointers
//! give `ELRA_NULL_POINTER` / `ELRA_INVALID_ARGUMENT` instead of undefined behaviour wherever the
//! memory is still mapped (a best-effort check: a freed pointer reused by the allocator for
//! another object cannot be told apart).

use super::{CError, CResult};
use crate::ElraError;

/// A type the C ABI hands out behind an opaque pointer.
pub(crate) trait Handle: Sized {
    /// The tag of a live handle of this type.
    const MAGIC: u64;
    /// The kind of handle, for messages (`"elra adapter"`).
    const KIND: &'static str;
    /// The handle's tag.
    fn tag(&self) -> u64;
    /// Sets the handle's tag.
    fn set_tag(&mut self, tag: u64);
}

/// Checks a handle pointer and borrows the handle for reading.
///
/// # Safety
/// `h` must be NULL or point to memory that holds an initialised `H` (a pointer returned by this
/// library and not yet destroyed), not mutably borrowed elsewhere.
pub(crate) unsafe fn live_ref<'a, H: Handle>(h: *const H) -> CResult<&'a H> {
    if h.is_null() {
        return Err(CError::Null("adapter"));
    }
    if (h as usize) % std::mem::align_of::<H>() != 0 {
        return Err(ElraError::invalid("adapter", "misaligned handle pointer").into());
    }
    // SAFETY: non-null and aligned; the caller guarantees it points to an initialised `H` that
    // nothing borrows mutably.
    let a = unsafe { &*h };
    if a.tag() != H::MAGIC {
        return Err(ElraError::invalid("adapter", format!("not a live {} handle", H::KIND)).into());
    }
    Ok(a)
}

/// Checks a handle pointer and borrows the handle exclusively.
///
/// # Safety
/// As [`live_ref`], with exclusive access for the duration of the borrow.
pub(crate) unsafe fn live<'a, H: Handle>(h: *mut H) -> CResult<&'a mut H> {
    // SAFETY: forwarded contract; the checks run through the shared path first.
    unsafe { live_ref(h.cast_const())? };
    // SAFETY: validated above; the caller guarantees exclusive access.
    Ok(unsafe { &mut *h })
}

/// Moves a new handle to the heap and returns the pointer C keeps.
pub(crate) fn into_raw<H: Handle>(mut h: H) -> *mut H {
    h.set_tag(H::MAGIC);
    Box::into_raw(Box::new(h))
}

/// Destroys a live handle (NULL is ignored): clears its tag, then frees it.
///
/// # Safety
/// `h` must be NULL or a live handle from [`into_raw`], not used concurrently or afterwards.
pub(crate) unsafe fn destroy<H: Handle>(h: *mut H) -> CResult<()> {
    if h.is_null() {
        return Ok(());
    }
    // SAFETY: forwarded contract.
    let a = unsafe { live(h)? };
    a.set_tag(0);
    // SAFETY: the pointer came from `into_raw` (Box::into_raw) and is freed once.
    drop(unsafe { Box::from_raw(h) });
    Ok(())
}
