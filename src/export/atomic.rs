//! Outputs that appear whole or not at all: everything is written under a temporary sibling name
//! and renamed into place at the end. A run that fails (or is killed) leaves no partial output;
//! an existing output is refused unless replacing it was asked for, and then it is removed only
//! after the new one is in place.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// An output being written: a file or directory at a temporary path, renamed on [`Staged::commit`]
/// and removed if dropped uncommitted.
pub struct Staged {
    target: PathBuf,
    tmp: PathBuf,
    parent: PathBuf,
    committed: bool,
}

/// Refuses an existing `out` unless `force`, with a message that says how to proceed.
pub fn check_target(out: &Path, force: bool) -> Result<()> {
    if !force && std::fs::symlink_metadata(out).is_ok() {
        return Err(Error::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the output already exists (pass --force to replace it)",
            ),
        ));
    }
    Ok(())
}

impl Staged {
    /// Prepares to write `out` (a directory when `dir`): checks it may be written, creates its
    /// parent and a fresh temporary sibling (`.{name}.tmp-{pid}`; a directory is created empty).
    pub fn new(out: &Path, dir: bool, force: bool) -> Result<Staged> {
        check_target(out, force)?;
        let name = out
            .file_name()
            .ok_or_else(|| {
                Error::io(
                    out,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "the output path has no file name",
                    ),
                )
            })?
            .to_string_lossy()
            .to_string();
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        remove_any(&tmp)?;
        if dir {
            std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        Ok(Staged {
            target: out.to_path_buf(),
            tmp,
            parent,
            committed: false,
        })
    }

    /// Where to write now (the temporary path).
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs the temporary output and renames it into place, replacing an existing target.
    pub fn commit(mut self) -> Result<()> {
        if self.tmp.is_dir() {
            sync_path(&self.tmp)?;
        }
        let mut old = None;
        if std::fs::symlink_metadata(&self.target).is_ok() {
            let o = self.parent.join(format!(
                ".{}.old-{}",
                self.target
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy(),
                std::process::id()
            ));
            remove_any(&o)?;
            std::fs::rename(&self.target, &o).map_err(|e| Error::io(&self.target, e))?;
            old = Some(o);
        }
        std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        sync_path(&self.parent)?;
        if let Some(o) = old {
            remove_any(&o)?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the target was never touched.
            let _ = remove_any(&self.tmp);
        }
    }
}

/// Removes a file or directory tree if it exists.
fn remove_any(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e)),
        Ok(_) => std::fs::remove_file(p).map_err(|e| Error::io(p, e)),
        Err(_) => Ok(()),
    }
}

/// Flushes a directory's entries to disk.
fn sync_path(p: &Path) -> Result<()> {
    let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    f.sync_all().map_err(|e| Error::io(p, e))
}

/// Writes a small file (JSON and the like) and syncs it.
pub fn write_small(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::checkpoint::files::write_synced(path, bytes).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_outputs_vanish_and_existing_ones_need_force() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        {
            let s = Staged::new(&out, true, false).unwrap();
            std::fs::write(s.path().join("x"), b"1").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let s = Staged::new(&out, true, false).unwrap();
        std::fs::write(s.path().join("x"), b"1").unwrap();
        s.commit().unwrap();
        assert!(out.join("x").exists());
        let err = Staged::new(&out, true, false).err().unwrap().to_string();
        assert!(err.contains("--force"), "{err}");
        let s = Staged::new(&out, true, true).unwrap();
        std::fs::write(s.path().join("y"), b"2").unwrap();
        s.commit().unwrap();
        assert!(out.join("y").exists() && !out.join("x").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
