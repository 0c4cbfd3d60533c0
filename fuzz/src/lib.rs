//! What the fuzz targets share: a scratch directory for inputs that the project reads from a
//! path, and the check every target applies to an error.

use std::path::Path;
use std::sync::OnceLock;

/// A temporary directory that lives as long as the fuzzing process (one per process).
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
}

/// The value of `r`, or `None` after checking that its error has a message.
pub fn check_err<T>(r: relora::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(!e.to_string().is_empty(), "error without a message: {e:?}");
            None
        }
    }
}
