//! Outputs that appear whole or not at all, and that replace only what relora wrote: the one
//! implementation behind checkpoints, exports, the converter and the command-line programs.
//!
//! An output is written under a fresh hidden sibling (`.NAME.tmp-PID`), synced, and renamed into
//! place at the end; a run that fails or is killed leaves the target as it was. The rule that
//! keeps users' data safe decides what an existing target may be:
//!
//! - nothing, or an empty directory when the output is a directory: written;
//! - relora's own earlier output of the same kind, holding nothing relora did not write: replaced
//!   when the caller asked for it (`--force`, `overwrite`; a checkpoint save always asks);
//! - anything else (a user's directory, a file of another kind, a symlink, a device): refused
//!   with [`Error::OutputExists`] naming what was found, and nothing is touched.
//!
//! The check runs before anything is written and again just before the rename. A replaced
//! directory is parked under a hidden name (`.NAME.old-PID`) while the new one is renamed in,
//! then removed file by file from the list of what relora wrote, its directories last with a
//! plain `rmdir`: an entry relora did not write is never deleted, even one that appeared while
//! the new output was being written.

pub use super::ownership::{
    check_parent_writable, check_target, holds_own, is_inside, remove_claimed, remove_own, Claim,
    OutputKind, Recognise,
};
use super::ownership::{entries, judge_allowed, Occupant};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A hidden sibling name `.NAME.TAG-PID` (then `.NAME.TAG-PID-N`) that nothing holds yet.
fn free_sibling(parent: &Path, name: &str, tag: &str) -> PathBuf {
    let pid = std::process::id();
    let mut n = 0u32;
    loop {
        let candidate = if n == 0 {
            parent.join(format!(".{name}.{tag}-{pid}"))
        } else {
            parent.join(format!(".{name}.{tag}-{pid}-{n}"))
        };
        if std::fs::symlink_metadata(&candidate).is_err() {
            return candidate;
        }
        n += 1;
    }
}

/// Flushes a directory's entries (new names, renames) to disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    f.sync_all().map_err(|e| Error::io(dir, e))
}

/// An output being written: a file or directory at a fresh temporary path, renamed into place by
/// [`Staged::commit`] and removed if dropped uncommitted.
pub(crate) struct Staged {
    target: PathBuf,
    tmp: PathBuf,
    parent: PathBuf,
    kind: OutputKind,
    replace_own: bool,
    committed: bool,
}

impl Staged {
    /// Prepares to write `out` as an output of `kind`: checks the target under the rule above
    /// (`replace_own`: whether relora's own earlier output may be replaced), creates the parent
    /// and a fresh temporary sibling (a directory is created empty, a file is not created).
    pub fn new(out: &Path, kind: &OutputKind, replace_own: bool) -> Result<Staged> {
        check_target(out, kind, replace_own)?;
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
        // Created exclusively: a name that something else took in between is never reused.
        let tmp = loop {
            let tmp = free_sibling(&parent, &name, "tmp");
            let made = if kind.dir {
                std::fs::create_dir(&tmp)
            } else {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map(|_| ())
            };
            match made {
                Ok(()) => break tmp,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&tmp, e)),
            }
        };
        Ok(Staged {
            target: out.to_path_buf(),
            tmp,
            parent,
            kind: *kind,
            replace_own,
            committed: false,
        })
    }

    /// Where to write now (the temporary path).
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Writes the marker of a [`Recognise::Marker`] kind, syncs the temporary output, checks
    /// the target again and renames the output into place (see the module documentation).
    pub(crate) fn commit(mut self) -> Result<()> {
        if self.kind.dir {
            if let Recognise::Marker { file, format } = self.kind.recognise {
                self.write_marker(file, format)?;
            }
            for (rel, is_dir) in entries(&self.tmp)? {
                if is_dir {
                    sync_dir(&self.tmp.join(rel))?;
                }
            }
            sync_dir(&self.tmp)?;
        } else {
            let f = std::fs::File::open(&self.tmp).map_err(|e| Error::io(&self.tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        }
        let occupant = judge_allowed(&self.target, &self.kind, self.replace_own)?;
        let mut parked = None;
        match occupant {
            Occupant::Nothing if !self.kind.dir => self.link_new_file()?,
            // A directory renamed onto an empty one replaces it; onto one that is no longer
            // empty, the rename fails and nothing changes.
            Occupant::Nothing | Occupant::EmptyDir => self.rename_in()?,
            Occupant::Own(_) if !self.kind.dir => self.rename_in()?,
            Occupant::Own(claim) => {
                let name = self
                    .target
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy();
                let park = free_sibling(&self.parent, &name, "old");
                std::fs::rename(&self.target, &park).map_err(|e| Error::io(&self.target, e))?;
                if let Err(e) = self.rename_in() {
                    // Put the old output back; the new one stays at the temporary path and
                    // is removed on drop.
                    let _ = std::fs::rename(&park, &self.target);
                    return Err(e);
                }
                parked = Some((park, claim));
            }
        }
        sync_dir(&self.parent)?;
        if let Some((park, claim)) = parked {
            remove_claimed(&park, &claim).map_err(|e| {
                Error::io(
                    &park,
                    std::io::Error::other(format!(
                        "the new {} is in place at {}, but its predecessor, parked here, was \
                         not removed: {e}",
                        self.kind.noun,
                        self.target.display()
                    )),
                )
            })?;
        }
        Ok(())
    }

    fn rename_in(&mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        Ok(())
    }

    /// Puts a new single file in place without replacing anything that appeared meanwhile: a
    /// hard link fails if the name exists (a rename would silently replace it).
    fn link_new_file(&mut self) -> Result<()> {
        match std::fs::hard_link(&self.tmp, &self.target) {
            Ok(()) => {
                self.committed = true;
                std::fs::remove_file(&self.tmp).map_err(|e| Error::io(&self.tmp, e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Judged again, so the message says what appeared there.
                judge_allowed(&self.target, &self.kind, self.replace_own)?;
                Err(Error::io(&self.target, e))
            }
            // A file system without hard links: the check just before has to do.
            Err(_) => self.rename_in(),
        }
    }

    fn write_marker(&self, file: &str, format: &str) -> Result<()> {
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        for (rel, is_dir) in entries(&self.tmp)? {
            let s = rel.to_string_lossy().replace('\\', "/");
            if is_dir {
                dirs.push(s);
            } else {
                files.push(s);
            }
        }
        files.sort();
        dirs.sort();
        let doc = serde_json::json!({
            "format": format,
            "writer": format!("relora {}", env!("CARGO_PKG_VERSION")),
            "files": files,
            "dirs": dirs,
        });
        let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| Error::Data(e.to_string()))?;
        write_synced(&self.tmp.join(file), &bytes)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort. The temporary path was created fresh by this writer, so everything
            // in it is relora's; the target was never touched.
            let _ = if self.kind.dir {
                std::fs::remove_dir_all(&self.tmp)
            } else {
                std::fs::remove_file(&self.tmp)
            };
        }
    }
}

/// Writes the single-file output `out` of `kind` whole (staged, synced, renamed into place),
/// under the rule of this module: an earlier output of the same kind is replaced when
/// `replace_own`, anything else is refused.
pub fn write_file_output(
    out: &Path,
    kind: &OutputKind,
    replace_own: bool,
    bytes: &[u8],
) -> Result<()> {
    let staged = Staged::new(out, kind, replace_own)?;
    write_synced(staged.path(), bytes)?;
    staged.commit()
}

/// Writes `bytes` to a new file at `path` and flushes it to disk.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKED: OutputKind = OutputKind {
        noun: "test output",
        dir: true,
        recognise: Recognise::Marker {
            file: "relora-test.json",
            format: "relora-test",
        },
    };

    /// A single file is relora's when it starts with "relora".
    const FILE: OutputKind = OutputKind {
        noun: "test file",
        dir: false,
        recognise: Recognise::Custom(|p| match std::fs::read(p) {
            Ok(b) if b.starts_with(b"relora") => Ok(Claim::default()),
            _ => Err("not written by relora".into()),
        }),
    };

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    fn write_marked(out: &Path, replace: bool, file: &str) -> Result<()> {
        let s = Staged::new(out, &MARKED, replace)?;
        std::fs::create_dir(s.path().join("sub")).unwrap();
        std::fs::write(s.path().join("sub").join(file), b"1").unwrap();
        std::fs::create_dir(s.path().join("empty")).unwrap();
        s.commit()
    }

    #[test]
    fn own_output_is_replaced_only_when_asked_and_uncommitted_output_vanishes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        {
            let s = Staged::new(&out, &MARKED, false).unwrap();
            std::fs::write(s.path().join("x"), b"1").unwrap();
        }
        assert!(names(dir.path()).is_empty());
        write_marked(&out, false, "a").unwrap();
        assert_eq!(names(&out), ["empty", "relora-test.json", "sub"]);
        let err = write_marked(&out, false, "b").unwrap_err();
        assert!(
            matches!(err, Error::OutputExists { own: true, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--force"), "{err}");
        write_marked(&out, true, "b").unwrap();
        assert_eq!(names(&out.join("sub")), ["b"]);
        // No hidden leftovers beside it.
        assert_eq!(names(dir.path()), ["model"]);
    }

    #[test]
    fn anything_relora_did_not_write_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        write_marked(&out, false, "a").unwrap();
        // A user's file dropped into relora's output makes it not relora's alone.
        std::fs::write(out.join("sub/notes.txt"), b"mine").unwrap();
        let err = write_marked(&out, true, "b").unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::OutputExists { own: false, .. }),
            "{msg}"
        );
        assert!(msg.contains("notes.txt") && msg.contains("model"), "{msg}");
        assert_eq!(std::fs::read(out.join("sub/notes.txt")).unwrap(), b"mine");
        assert!(remove_own(&out, &MARKED).is_err());
        assert!(out.join("sub/notes.txt").exists());

        // A user's directory, a regular file and a symlink are refused even with replace.
        let user = dir.path().join("user");
        std::fs::create_dir_all(user.join("sub")).unwrap();
        std::fs::write(user.join("notes.txt"), b"n").unwrap();
        std::fs::write(user.join("sub/a.txt"), b"a").unwrap();
        let err = write_marked(&user, true, "b").unwrap_err().to_string();
        assert!(
            err.contains("relora-test.json") && err.contains("user"),
            "{err}"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, b"data").unwrap();
        let err = write_marked(&file, true, "b").unwrap_err().to_string();
        assert!(err.contains("a regular file"), "{err}");
        #[cfg(unix)]
        {
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&user, &link).unwrap();
            let err = write_marked(&link, true, "b").unwrap_err().to_string();
            assert!(err.contains("symbolic link"), "{err}");
        }
        assert_eq!(names(&user), ["notes.txt", "sub"]);
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        // Nothing hidden was left behind by the refusals.
        assert_eq!(names(dir.path()), ["file", "link", "model", "user"]);

        // An empty directory is fine without asking.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        write_marked(&empty, false, "a").unwrap();
        assert!(empty.join("sub/a").exists());
    }

    #[test]
    fn what_appears_while_writing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        // The target appears (a user's directory) while the output is being written.
        let s = Staged::new(&out, &MARKED, true).unwrap();
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("theirs"), b"t").unwrap();
        assert!(s.commit().is_err());
        assert_eq!(names(&out), ["theirs"]);
        assert_eq!(names(dir.path()), ["model"]);
        // A single file that appears meanwhile is not replaced either.
        let f = dir.path().join("f.bin");
        let s = Staged::new(&f, &FILE, true).unwrap();
        std::fs::write(s.path(), b"relora new").unwrap();
        std::fs::write(&f, b"theirs").unwrap();
        assert!(s.commit().is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"theirs");
        // Its own earlier file is replaced in one rename.
        std::fs::write(&f, b"relora old").unwrap();
        let s = Staged::new(&f, &FILE, true).unwrap();
        std::fs::write(s.path(), b"relora new").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"relora new");
        assert_eq!(names(dir.path()), ["f.bin", "model"]);
    }
}
