//! The rendezvous file of a job whose ranks share a filesystem: rank 0 publishes a fixed-size
//! secret (NCCL's unique id) and every other rank waits for it. Rank 0 writes it under a
//! temporary name and renames it into place, so a reader never sees half of it. A file that
//! already exists when rank 0 starts is an error, not a stale id silently reused by the others
//! (who would then wait for a job that is not there).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes of the id (NCCL's `ncclUniqueId`).
pub(crate) const ID_BYTES: usize = 128;

/// Rank 0: writes `id` under a temporary name and renames it to `path`; an existing `path` is
/// an error.
pub fn publish(path: &Path, id: &[u8; ID_BYTES]) -> Result<()> {
    if path.exists() {
        return Err(Error::Distributed(format!(
            "id file {} already exists: it is left from another job, or two jobs share it. \
             Remove it, or give this job its own path",
            path.display()
        )));
    }
    let tmp = PathBuf::from(format!("{}.tmp-{}", path.display(), std::process::id()));
    // Created exclusively: a file of that name that is not ours is an error, not overwritten.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    std::io::Write::write_all(&mut f, id).map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    // A hard link, unlike a rename, fails if `path` appeared meanwhile.
    let linked = std::fs::hard_link(&tmp, path).map_err(|e| Error::io(path, e));
    let _ = std::fs::remove_file(&tmp);
    linked
}

/// Other ranks: waits up to `timeout` for rank 0's file at `path` and reads it.
pub fn wait(path: &Path, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let started = Instant::now();
    loop {
        // Bounded, and only a regular file: a FIFO or a device there is an error, not a wait.
        match crate::fs::read::read_limited(path, 1 << 16) {
            Ok(bytes) if bytes.len() == ID_BYTES => {
                let mut id = [0u8; ID_BYTES];
                id.copy_from_slice(&bytes);
                return Ok(id);
            }
            Ok(bytes) => {
                return Err(Error::Distributed(format!(
                    "id file {} holds {} bytes, not {ID_BYTES}",
                    path.display(),
                    bytes.len()
                )))
            }
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if started.elapsed() > timeout {
            return Err(Error::Distributed(format!(
                "id file {} did not appear within {} s: is rank 0 running, and does it see \
                 the same path?",
                path.display(),
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_file_round_trips_and_a_stale_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nccl-id");
        let mut id = [0u8; ID_BYTES];
        for (i, c) in id.iter_mut().enumerate() {
            *c = (i * 7 + 3) as u8;
        }
        publish(&path, &id).unwrap();
        assert_eq!(wait(&path, Duration::from_secs(1)).unwrap(), id);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file may be left"
        );
        let err = publish(&path, &id).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
    }

    #[test]
    fn a_missing_or_short_id_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nccl-id");
        let err = wait(&path, Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not appear"), "{err}");
        std::fs::write(&path, b"short").unwrap();
        let err = wait(&path, Duration::from_secs(1)).unwrap_err().to_string();
        assert!(err.contains("5 bytes"), "{err}");
    }
}
