//! The plumbing every entry point goes through: the panic boundary, the internal failure type,
//! pointer and string checks, text outputs, and the registry of live handles.
//!
//! The registry is what lets the library answer a freed, foreign or wrong-kind handle with
//! `RELORA_STATUS_INVALID_HANDLE` instead of dereferencing it: a handle's address is entered when
//! it is created and removed when it is freed, and every call checks it first. (A freed address
//! that the allocator hands to a new handle of the same kind cannot be told apart; that is the
//! limit of what the library can detect.)

use super::last_error::{clear_last_error, set_last_error};
use super::status::{relora_status, status_of};
use std::any::Any;
use std::collections::BTreeMap;
use std::os::raw::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Why a call failed: the status and the detail for the last-error message.
#[derive(Debug)]
pub struct Failure {
    /// The status returned to the caller.
    pub status: relora_status,
    /// The detail, without the function name (the boundary adds it).
    pub message: String,
}

impl Failure {
    /// A failure with `status` and `message`.
    pub fn new(status: relora_status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }

    /// A NULL pointer passed for argument `arg`.
    pub fn null(arg: &str) -> Self {
        Failure::new(
            relora_status::NullParameter,
            format!("argument '{arg}' is NULL"),
        )
    }

    /// An invalid argument.
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new(relora_status::InvalidArgument, message)
    }

    /// A call not allowed in the object's current state.
    pub fn state(message: impl Into<String>) -> Self {
        Failure::new(relora_status::InvalidState, message)
    }
}

impl From<crate::error::Error> for Failure {
    fn from(e: crate::error::Error) -> Self {
        Failure::new(status_of(&e), e.to_string())
    }
}

/// Result type of entry-point bodies.
pub type FfiResult<T> = Result<T, Failure>;

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Runs the body of entry point `func` inside the panic boundary and turns its outcome into a
/// status: success clears the last error, a failure records "func: detail", a panic becomes
/// `RELORA_STATUS_PANIC`.
pub fn boundary(func: &str, body: impl FnOnce() -> FfiResult<()>) -> relora_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            clear_last_error();
            relora_status::Ok
        }
        Ok(Err(f)) => {
            set_last_error(format!("{func}: {}", f.message));
            f.status
        }
        Err(payload) => {
            set_last_error(format!(
                "{func}: internal panic: {}",
                panic_message(&*payload)
            ));
            relora_status::Panic
        }
    }
}

/// The panic boundary for functions that return a value instead of a status: a panic returns
/// `on_panic` (NULL, 0, ...).
pub(crate) fn boundary_value<T>(on_panic: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(on_panic)
}

/// Writes `value` through `out` when `out` is not NULL.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
pub(crate) unsafe fn write_out<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: non-NULL and valid per the caller's contract.
        unsafe { out.write(value) };
    }
}

/// Checks a required output pointer: not NULL and aligned for `T`.
pub(crate) fn out_ptr<T>(out: *mut T, arg: &str) -> FfiResult<*mut T> {
    if out.is_null() {
        return Err(Failure::null(arg));
    }
    if !(out as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Failure::invalid(format!(
            "argument '{arg}' is not aligned for its type"
        )));
    }
    Ok(out)
}

/// Borrows `len` elements at `ptr` as a slice after checking the pointer (not NULL, aligned) and
/// the length (positive, addressable).
///
/// # Safety
/// When the checks pass, `ptr` must be valid for reads of `len` elements for `'a`.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize, arg: &str) -> FfiResult<&'a [T]> {
    if ptr.is_null() {
        return Err(Failure::null(arg));
    }
    if len == 0 {
        return Err(Failure::invalid(format!("'{arg}' has length 0")));
    }
    if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Failure::invalid(format!(
            "argument '{arg}' is not aligned for its type"
        )));
    }
    match len.checked_mul(std::mem::size_of::<T>()) {
        Some(bytes) if bytes <= isize::MAX as usize => {}
        _ => {
            return Err(Failure::invalid(format!(
                "'{arg}' length {len} is too large"
            )))
        }
    }
    // SAFETY: checked above; validity of the memory is the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Borrows `len` elements at `ptr` for writing, with the checks of [`slice`].
///
/// # Safety
/// When the checks pass, `ptr` must be valid for writes of `len` elements for `'a`, and not
/// aliased.
pub(crate) unsafe fn slice_mut<'a, T>(
    ptr: *mut T,
    len: usize,
    arg: &str,
) -> FfiResult<&'a mut [T]> {
    // SAFETY: the same checks as for reading; the caller's contract covers writing.
    unsafe { slice(ptr as *const T, len, arg)? };
    // SAFETY: checked above; validity and exclusivity are the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// Borrows a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn cstr<'a>(ptr: *const c_char, arg: &str) -> FfiResult<&'a str> {
    if ptr.is_null() {
        return Err(Failure::null(arg));
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    let c = unsafe { std::ffi::CStr::from_ptr(ptr) };
    c.to_str()
        .map_err(|_| Failure::invalid(format!("'{arg}' is not valid UTF-8")))
}

/// Like [`cstr`] for an optional argument: NULL gives `None`.
///
/// # Safety
/// As for [`cstr`].
pub(crate) unsafe fn opt_cstr<'a>(ptr: *const c_char, arg: &str) -> FfiResult<Option<&'a str>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: as for `cstr`.
        unsafe { cstr(ptr, arg) }.map(Some)
    }
}

/// Copies `text` into a caller buffer as a NUL-terminated string, with the library's convention
/// for text outputs:
///
/// - `buf` NULL and `len` 0: a size query; `*out_len` receives the text's length (without NUL);
/// - otherwise `buf` must hold `len` >= text length + 1 bytes, or the call fails with
///   `RELORA_STATUS_BUFFER_TOO_SMALL` and writes nothing; on success `buf` holds the text and
///   `*out_len` its length.
///
/// # Safety
/// `buf` is NULL or valid for `len` bytes of writes; `out_len` is NULL or valid for a write.
pub(crate) unsafe fn write_text(
    text: &str,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> FfiResult<()> {
    let out_len = out_ptr(out_len, "out_len")?;
    if buf.is_null() {
        if len != 0 {
            return Err(Failure::null("buf"));
        }
        // SAFETY: checked by `out_ptr`.
        unsafe { out_len.write(text.len()) };
        return Ok(());
    }
    if len <= text.len() {
        return Err(Failure::new(
            relora_status::BufferTooSmall,
            format!(
                "the text needs {} bytes with its NUL, the buffer has {len}",
                text.len() + 1
            ),
        ));
    }
    // SAFETY: `buf` holds at least text.len() + 1 bytes per the caller's contract and the check.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        *buf.add(text.len()) = 0;
        out_len.write(text.len());
    }
    Ok(())
}

/// The kinds of handle the library hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HandleKind {
    /// `relora_params *`
    Params,
    /// `relora_trainer *`
    Trainer,
}

impl HandleKind {
    fn c_name(self) -> &'static str {
        match self {
            HandleKind::Params => "relora_params",
            HandleKind::Trainer => "relora_trainer",
        }
    }
}

static LIVE: Mutex<BTreeMap<usize, HandleKind>> = Mutex::new(BTreeMap::new());

/// The registry of live handles, locked. A panic while it was held cannot leave it inconsistent
/// (every update is a single insert or remove), so a poisoned lock is simply taken over.
pub(crate) fn registry() -> MutexGuard<'static, BTreeMap<usize, HandleKind>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Fails unless `addr` is a live handle of `kind`.
pub(crate) fn check_live(
    live: &BTreeMap<usize, HandleKind>,
    addr: usize,
    kind: HandleKind,
    arg: &str,
) -> FfiResult<()> {
    match live.get(&addr) {
        Some(k) if *k == kind => Ok(()),
        Some(other) => Err(Failure::new(
            relora_status::InvalidHandle,
            format!(
                "argument '{arg}' is a {} handle, not a {}",
                other.c_name(),
                kind.c_name()
            ),
        )),
        None => Err(Failure::new(
            relora_status::InvalidHandle,
            format!(
                "argument '{arg}' is not a live {} (already freed, or not created by this library)",
                kind.c_name()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_turns_panics_into_status() {
        let st = boundary("relora_test", || panic!("boom"));
        assert_eq!(st, relora_status::Panic);
        assert!(
            super::super::last_error::last_error().contains("relora_test: internal panic: boom")
        );
        let st = boundary("relora_test", || Err(Failure::null("x")));
        assert_eq!(st, relora_status::NullParameter);
        assert_eq!(
            super::super::last_error::last_error(),
            "relora_test: argument 'x' is NULL"
        );
        assert_eq!(boundary("relora_test", || Ok(())), relora_status::Ok);
        assert_eq!(super::super::last_error::last_error(), "");
    }

    #[test]
    fn text_outputs_follow_the_convention() {
        let mut n = 0usize;
        unsafe {
            write_text("abc", std::ptr::null_mut(), 0, &mut n).unwrap();
            assert_eq!(n, 3);
            let mut small = [1 as c_char; 3];
            let e = write_text("abc", small.as_mut_ptr(), 3, &mut n).unwrap_err();
            assert_eq!(e.status, relora_status::BufferTooSmall);
            assert_eq!(small, [1, 1, 1], "nothing written on failure");
            let mut buf = [1 as c_char; 4];
            write_text("abc", buf.as_mut_ptr(), 4, &mut n).unwrap();
            assert_eq!(buf, [b'a' as c_char, b'b' as c_char, b'c' as c_char, 0]);
            assert!(write_text("abc", buf.as_mut_ptr(), 4, std::ptr::null_mut()).is_err());
        }
    }

    #[test]
    fn slices_reject_null_zero_and_misaligned() {
        let v = [1i32, 2, 3];
        unsafe {
            assert_eq!(slice(v.as_ptr(), 3, "v").unwrap(), &v);
            assert!(slice::<i32>(std::ptr::null(), 3, "v").is_err());
            assert!(slice(v.as_ptr(), 0, "v").is_err());
            let mis = (v.as_ptr() as *const u8).add(1) as *const i32;
            assert!(slice(mis, 1, "v").is_err());
        }
    }
}
