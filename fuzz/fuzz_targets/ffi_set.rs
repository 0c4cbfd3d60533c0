//! The C API's text setter, `relora_params_set(params, key, value)`, called as a C host would:
//! the input is split at NUL bytes into the key and the value (so both are proper C strings and
//! may be any other bytes, not UTF-8 included). A key/value that is accepted is read back with
//! `relora_params_get` and set again, and the options are then checked with
//! `relora_params_validate`.
//!
//! Must hold: no panic (the harness aborts on one even inside the library's panic boundary) and
//! no `RELORA_STATUS_PANIC`; every failure leaves a non-empty last-error message; what
//! `relora_params_get` returns for a key can be set again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use relora::ffi::error::relora_last_error_length;
use relora::ffi::params::{
    relora_params, relora_params_free, relora_params_get, relora_params_new, relora_params_set,
    relora_params_validate,
};
use relora::ffi::status::relora_status;
use std::ffi::{c_char, CString};
use std::ptr;

fn checked(func: &str, status: relora_status) -> relora_status {
    assert_ne!(
        status,
        relora_status::Panic,
        "{func} reported an internal panic"
    );
    if status != relora_status::Ok {
        assert!(
            relora_last_error_length() > 0,
            "{func} failed ({status:?}) without a message"
        );
    }
    status
}

/// `relora_params_get` with the size query first, as the header documents.
unsafe fn get(params: *const relora_params, key: &CString) -> Option<CString> {
    let mut len = 0usize;
    let s = checked("relora_params_get", unsafe {
        relora_params_get(params, key.as_ptr(), ptr::null_mut(), 0, &mut len)
    });
    if s != relora_status::Ok {
        return None;
    }
    let mut buf = vec![0u8; len + 1];
    let mut written = 0usize;
    let s = checked("relora_params_get", unsafe {
        relora_params_get(
            params,
            key.as_ptr(),
            buf.as_mut_ptr().cast::<c_char>(),
            buf.len(),
            &mut written,
        )
    });
    assert_eq!(
        s,
        relora_status::Ok,
        "the size query succeeded but the read did not"
    );
    assert_eq!(written, len);
    buf.truncate(written);
    Some(CString::new(buf).expect("no NUL inside the returned text"))
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let key = CString::new(parts.next().unwrap_or_default()).expect("split at NULs");
    let value = CString::new(parts.next().unwrap_or_default()).expect("split at NULs");

    let mut params: *mut relora_params = ptr::null_mut();
    // SAFETY: `params` is a valid out-pointer; the strings are NUL-terminated and outlive the
    // calls; the handle is freed once below.
    unsafe {
        assert_eq!(relora_params_new(&mut params), relora_status::Ok);
        let s = checked(
            "relora_params_set",
            relora_params_set(params, key.as_ptr(), value.as_ptr()),
        );
        if s == relora_status::Ok {
            let back = get(params, &key).expect("a key that was set can be read");
            let s = checked(
                "relora_params_set",
                relora_params_set(params, key.as_ptr(), back.as_ptr()),
            );
            assert_eq!(
                s,
                relora_status::Ok,
                "{key:?} = {back:?}, as read back, is refused"
            );
            let again = get(params, &key).expect("a key that was set can be read");
            assert_eq!(back, again, "reading back is not stable for {key:?}");
        }
        // The remaining NUL-separated pieces are more key/value pairs on the same handle.
        while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
            let (k, v) = (CString::new(k).unwrap(), CString::new(v).unwrap());
            checked(
                "relora_params_set",
                relora_params_set(params, k.as_ptr(), v.as_ptr()),
            );
        }
        checked("relora_params_validate", relora_params_validate(params));
        relora_params_free(params);
    }
});
