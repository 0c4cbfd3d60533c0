//! The thread-local last-error message: the detail behind a status ("relora_trainer_step: input
//! token id 300 at position 7 (row 0, column 7) is >= vocab_size 258"), copied by the host into its
//! own buffer.

use super::guard::{boundary_value, write_out};
use super::last_error::last_error;
use super::status::relora_status;
use std::os::raw::c_char;

/// The largest prefix of `s` that fits in `max` bytes without splitting a UTF-8 character.
fn utf8_prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Copies this thread's last error message into `buf` as a NUL-terminated UTF-8 string.
///
/// The message describes the most recent failed call made on this thread; every call that
/// returns `RELORA_STATUS_OK` clears it, and the `relora_last_error_*` and `relora_status_string`
/// functions leave it unchanged. It is empty when there is nothing to report.
///
/// This is the one call that truncates rather than failing: when the message does not fit, the
/// longest prefix that fits in `len - 1` bytes (never splitting a UTF-8 character) is copied.
/// `relora_last_error_length` gives the full length.
///
/// `buf` must point to `len` writable bytes, `len` >= 1. On success `buf` holds the message and
/// `*written` (if `written` is not NULL) the number of bytes copied, not counting the NUL.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER` when `buf` is NULL, `RELORA_STATUS_INVALID_ARGUMENT`
/// when `len` is 0; neither changes the stored message.
#[no_mangle]
pub unsafe extern "C" fn relora_last_error_message(
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> relora_status {
    boundary_value(relora_status::Panic, || {
        if buf.is_null() {
            return relora_status::NullParameter;
        }
        if len == 0 {
            return relora_status::InvalidArgument;
        }
        let message = last_error();
        let text = utf8_prefix(&message, len - 1);
        // SAFETY: the caller provides `len` writable bytes at `buf`; we write text.len() + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
            *buf.add(text.len()) = 0;
        }
        // SAFETY: `written` is NULL or a valid pointer supplied by the caller.
        unsafe { write_out(written, text.len()) };
        relora_status::Ok
    })
}

/// The length in bytes of this thread's last error message, not counting the terminating NUL
/// (0 when there is none). A buffer of this length + 1 holds the whole message.
#[no_mangle]
pub extern "C" fn relora_last_error_length() -> usize {
    boundary_value(0, || last_error().len())
}

/// A fixed English description of a status value ("invalid argument", ...), as a static
/// NUL-terminated string that must not be freed. Unknown values give "unknown status". Does not
/// touch the last error message.
#[no_mangle]
pub extern "C" fn relora_status_string(status: i32) -> *const c_char {
    boundary_value(
        c"internal panic".as_ptr(),
        || match relora_status::from_code(status) {
            Some(s) => s.description().as_ptr().cast(),
            None => c"unknown status".as_ptr(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::last_error::{clear_last_error, set_last_error};

    #[test]
    fn truncation_keeps_utf8_whole() {
        assert_eq!(utf8_prefix("héllo", 2), "h");
        assert_eq!(utf8_prefix("héllo", 3), "hé");
        assert_eq!(utf8_prefix("abc", 10), "abc");
    }

    #[test]
    fn message_copies_truncate_and_report_length() {
        set_last_error("relora_x: something went wrong".into());
        assert_eq!(relora_last_error_length(), 30);
        let mut buf = [0 as c_char; 9];
        let mut n = 99usize;
        let st = unsafe { relora_last_error_message(buf.as_mut_ptr(), buf.len(), &mut n) };
        assert_eq!(st, relora_status::Ok);
        assert_eq!(n, 8);
        let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(s.to_str().unwrap(), "relora_x");
        assert_eq!(
            unsafe { relora_last_error_message(std::ptr::null_mut(), 4, &mut n) },
            relora_status::NullParameter
        );
        // Reading the message does not clear it.
        assert_eq!(relora_last_error_length(), 30);
        clear_last_error();
        assert_eq!(relora_last_error_length(), 0);
    }

    #[test]
    fn status_strings_are_static_and_total() {
        let s = unsafe { std::ffi::CStr::from_ptr(relora_status_string(101)) };
        assert_eq!(s.to_str().unwrap(), "invalid argument");
        let s = unsafe { std::ffi::CStr::from_ptr(relora_status_string(-5)) };
        assert_eq!(s.to_str().unwrap(), "unknown status");
    }
}
