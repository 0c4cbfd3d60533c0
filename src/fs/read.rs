//! Reading the files relora loads (manifests, configs, tokenizers, safetensors): only regular
//! files are opened (a symlink to one is followed), and every read is bounded by the file's
//! length or a limit. A FIFO, a socket or a device such as `/dev/zero` would otherwise block the
//! open or feed an endless stream; here it is an error naming the file, returned at once.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Limit for JSON documents: configs, manifests, shard indexes, tokenizer files (the largest
/// public tokenizer.json files are tens of MB).
pub(crate) const JSON_LIMIT: u64 = 256 << 20;

/// The error kind of [`open_regular`]'s refusal, so callers can tell it from an OS error.
pub(crate) const NOT_REGULAR: std::io::ErrorKind = std::io::ErrorKind::InvalidInput;

/// What a file-system entry is, in words, for messages.
pub fn describe(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_socket() {
            return "a socket";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading when it is a regular file (following symlinks) and returns it with
/// its length. Anything else is refused with an [`Error::Io`] of kind [`NOT_REGULAR`] that says
/// what was found. The open itself never blocks: on Unix it is non-blocking, so a FIFO without
/// a writer is refused rather than waited for.
pub(crate) fn open_regular(path: &Path) -> Result<(File, u64)> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| Error::io(path, e))?;
    // The type of what was opened, not of what the name pointed to a moment earlier.
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                NOT_REGULAR,
                format!("is {}, not a regular file", describe(&meta.file_type())),
            ),
        ));
    }
    Ok((file, meta.len()))
}

/// Whether `e` is [`open_regular`]'s refusal of something that is not a regular file.
#[cfg(test)]
pub(crate) fn is_not_regular(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == NOT_REGULAR)
}

/// Reads all of the regular file `path`, refusing one longer than `limit` bytes without reading
/// past the limit.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > limit {
        return Err(too_long(path, limit));
    }
    read_at_most(file, path, limit)
}

/// Reads the regular file `path` whole; its length bounds the read.
pub(crate) fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    read_at_most(file, path, len)
}

/// Reads up to `limit` bytes of an open file (from [`open_regular`]); a file that grew past it
/// meanwhile is an error.
pub(crate) fn read_at_most(file: File, path: &Path, limit: u64) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(usize::try_from(limit.min(1 << 26)).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > limit {
        return Err(too_long(path, limit));
    }
    Ok(buf)
}

/// Reads the first `n` bytes (fewer if the file is shorter) of an open file.
pub(crate) fn read_prefix(file: File, path: &Path, n: u64) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    file.take(n)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    Ok(buf)
}

fn too_long(path: &Path, limit: u64) -> Error {
    Error::io(
        path,
        std::io::Error::other(format!(
            "larger than {limit} bytes, the limit for this kind of file"
        )),
    )
}

/// [`read_limited`] for UTF-8 text.
pub(crate) fn read_limited_text(path: &Path, limit: u64) -> Result<String> {
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
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(read_limited_text(&p, 8)
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
    }

    #[cfg(unix)]
    #[test]
    fn devices_fifos_and_directories_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let target = dir.path().join("real");
        std::fs::write(&target, b"{}").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for (p, what) in [
            (&fifo, "FIFO"),
            (&zero, "character device"),
            (&dir.path().to_path_buf(), "directory"),
        ] {
            for e in [
                read_limited(p, 1 << 20).unwrap_err(),
                read_regular(p).unwrap_err(),
            ] {
                assert!(is_not_regular(&e), "{e}");
                let msg = e.to_string();
                assert!(
                    msg.contains(what) && msg.contains(&*p.to_string_lossy()),
                    "{msg}"
                );
            }
        }
        // A symlink to a regular file is fine.
        assert_eq!(read_regular(&link).unwrap(), b"{}");
    }
}
