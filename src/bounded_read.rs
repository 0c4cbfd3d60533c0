//! Whole-file reads of small documents (configs, manifests, index and tokenizer files) with a size
//! limit, so that a path to a device or a mistaken huge file (`/dev/zero`, a data file given as a
//! config) is a clear error instead of exhausting memory.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Limit for JSON documents: configs, manifests, shard indexes, tokenizer files (the largest
/// public tokenizer.json files are tens of MB).
pub const JSON_LIMIT: u64 = 256 << 20;

/// Reads all of `path`, refusing more than `limit` bytes without reading past the limit.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > limit {
        return Err(Error::io(
            path,
            std::io::Error::other(format!(
                "larger than {limit} bytes, the limit for this kind of file"
            )),
        ));
    }
    Ok(buf)
}

/// [`read_limited`] for UTF-8 text.
pub fn read_limited_text(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_limited(path, limit)?).map_err(|_| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_without_reading_everything() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        std::fs::write(&p, b"{\"x\": 1}").unwrap();
        assert_eq!(read_limited_text(&p, 8).unwrap(), "{\"x\": 1}");
        let err = read_limited(&p, 7).unwrap_err().to_string();
        assert!(err.contains("a.json") && err.contains("limit"), "{err}");
        // An endless device stops at the limit.
        if Path::new("/dev/zero").exists() {
            let err = read_limited(Path::new("/dev/zero"), 1 << 20).unwrap_err();
            assert!(err.to_string().contains("/dev/zero"));
        }
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(read_limited_text(&p, 8)
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
    }
}
