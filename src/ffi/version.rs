//! Version numbers. The constants become `#define`s in the header; a test keeps them equal to the
//! crate version in Cargo.toml, and the C hosts check the header's macros against the functions.

use super::guard::boundary_value;
use std::os::raw::c_char;

/// Major version of the library (the crate's semver major).
pub const RELORA_VERSION_MAJOR: u32 = 0;
/// Minor version of the library.
pub const RELORA_VERSION_MINOR: u32 = 1;
/// Patch version of the library.
pub const RELORA_VERSION_PATCH: u32 = 0;
/// The version as one number, `(MAJOR << 16) | (MINOR << 8) | PATCH`, for `#if` comparisons.
pub const RELORA_VERSION_NUMBER: u32 =
    (RELORA_VERSION_MAJOR << 16) | (RELORA_VERSION_MINOR << 8) | RELORA_VERSION_PATCH;
/// The C ABI's version: raised whenever a function's signature or meaning, a struct's layout or
/// an enum's values change incompatibly. Additions (new functions, new keys, new statuses, fields
/// appended to a sized struct) keep it.
pub const RELORA_ABI_VERSION: u32 = 1;

/// The library version as a static NUL-terminated string, e.g. "0.1.0". Never NULL; must not be
/// freed.
#[no_mangle]
pub extern "C" fn relora_version() -> *const c_char {
    boundary_value(c"?".as_ptr(), || {
        concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
    })
}

/// The library version as `(major << 16) | (minor << 8) | patch`; equals `RELORA_VERSION_NUMBER`
/// when the header and the library match.
#[no_mangle]
pub extern "C" fn relora_version_number() -> u32 {
    boundary_value(0, || RELORA_VERSION_NUMBER)
}

/// The ABI version the library implements; a host compiled against a header whose
/// `RELORA_ABI_VERSION` differs must not use it.
#[no_mangle]
pub extern "C" fn relora_abi_version() -> u32 {
    boundary_value(0, || RELORA_ABI_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_cargo_toml() {
        let parse = |s: &str| s.parse::<u32>().unwrap();
        assert_eq!(RELORA_VERSION_MAJOR, parse(env!("CARGO_PKG_VERSION_MAJOR")));
        assert_eq!(RELORA_VERSION_MINOR, parse(env!("CARGO_PKG_VERSION_MINOR")));
        assert_eq!(RELORA_VERSION_PATCH, parse(env!("CARGO_PKG_VERSION_PATCH")));
        let s = unsafe { std::ffi::CStr::from_ptr(relora_version()) };
        assert_eq!(s.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
        assert_eq!(
            relora_version_number(),
            (RELORA_VERSION_MAJOR << 16) | (RELORA_VERSION_MINOR << 8) | RELORA_VERSION_PATCH
        );
    }
}
