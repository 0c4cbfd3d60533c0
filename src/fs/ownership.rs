//! How relora tells its own output from anything else at a path, and removes only what it
//! wrote: each kind of output says how it is recognised ([`OutputKind`]); what is at a path is
//! judged as nothing, an empty directory, relora's own output (and the list of what it wrote),
//! or something else, which is refused with [`Error::OutputExists`]. See [`super::output`] for
//! the rule these serve.

use crate::error::{Error, Result};
use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

/// What relora wrote in a directory output, relative to it: the files and the directories
/// (which may be empty) that belong to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claim {
    /// Files (and symlinks) relora wrote.
    pub files: BTreeSet<PathBuf>,
    /// Directories relora made; ancestors of the files count too.
    pub dirs: BTreeSet<PathBuf>,
}

impl Claim {
    /// Whether the relative entry `rel` (a directory when `dir`) is one relora wrote.
    fn covers(&self, rel: &Path, dir: bool) -> bool {
        if dir {
            self.dirs.contains(rel) || self.files.iter().any(|f| f.starts_with(rel))
        } else {
            self.files.contains(rel)
        }
    }
}

/// How relora recognises its own earlier output of a kind.
#[derive(Clone, Copy)]
pub enum Recognise {
    /// A directory carrying the marker file `file`, which [`Staged::commit`] writes last:
    /// `{"format": FORMAT, "writer": "relora X.Y.Z", "files": [...], "dirs": [...]}`.
    Marker {
        /// The marker's file name inside the directory.
        file: &'static str,
        /// The value of its `format` field.
        format: &'static str,
    },
    /// The kind's own test: what relora wrote there (an empty claim for a single file), or what
    /// is there instead, in words.
    Custom(fn(&Path) -> std::result::Result<Claim, String>),
}

/// A kind of output: what it is called, whether it is a directory, and how relora recognises
/// its own earlier output of this kind.
#[derive(Clone, Copy)]
pub struct OutputKind {
    /// What the output is, for messages ("checkpoint", "model export").
    pub noun: &'static str,
    /// Whether the output is a directory (else a single file).
    pub dir: bool,
    /// How relora's own earlier output of this kind is recognised.
    pub recognise: Recognise,
}

/// What an existing target holds, as judged for a kind of output.
#[derive(Debug, PartialEq)]
pub(crate) enum Occupant {
    Nothing,
    EmptyDir,
    Own(Claim),
}

/// Whether `rel` is a plain relative path below a directory: no root, prefix or `..`.
pub fn is_inside(rel: &Path) -> bool {
    !rel.as_os_str().is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Every entry under `dir` (not following symlinks), relative, with whether it is a directory;
/// parents before their children.
pub fn entries(dir: &Path) -> Result<Vec<(PathBuf, bool)>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let abs = dir.join(&rel);
        for entry in std::fs::read_dir(&abs).map_err(|e| Error::io(&abs, e))? {
            let entry = entry.map_err(|e| Error::io(&abs, e))?;
            let child = rel.join(entry.file_name());
            let is_dir = entry.file_type().map_err(|e| Error::io(&abs, e))?.is_dir();
            if is_dir {
                todo.push(child.clone());
            }
            out.push((child, is_dir));
        }
    }
    Ok(out)
}

/// The entries of `dir` that `claim` does not cover, for the message.
fn unclaimed(dir: &Path, claim: &Claim) -> Result<Vec<PathBuf>> {
    Ok(entries(dir)?
        .into_iter()
        .filter(|(rel, is_dir)| !claim.covers(rel, *is_dir))
        .map(|(rel, _)| rel)
        .collect())
}

/// Names a few entries relora did not write, for a message.
fn list_unclaimed(extra: &[PathBuf]) -> String {
    let shown: Vec<String> = extra
        .iter()
        .take(3)
        .map(|p| p.display().to_string())
        .collect();
    let more = extra.len().saturating_sub(shown.len());
    let mut s = shown.join(", ");
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

fn foreign(path: &Path, found: impl Into<String>) -> Error {
    Error::OutputExists {
        path: path.to_path_buf(),
        found: found.into(),
        own: false,
    }
}

/// Reads a marker file: what relora wrote in the directory, marker included.
fn read_marker(dir: &Path, file: &str, format: &str) -> std::result::Result<Claim, String> {
    let path = dir.join(file);
    let bytes = match crate::fs::read::read_limited(&path, 16 << 20) {
        Ok(b) => b,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("no {file}, so not relora's"));
        }
        Err(e) => return Err(format!("its {file} cannot be read ({e})")),
    };
    let doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| format!("its {file} is not JSON, so not relora's"))?;
    if doc["format"].as_str() != Some(format) {
        return Err(format!(
            "its {file} is not relora's (format is not {format})"
        ));
    }
    let mut claim = Claim::default();
    for (key, set) in [("files", &mut claim.files), ("dirs", &mut claim.dirs)] {
        for v in doc[key].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let rel = PathBuf::from(v.as_str().unwrap_or(""));
            if !is_inside(&rel) {
                return Err(format!("its {file} lists {v}, outside it"));
            }
            set.insert(rel);
        }
    }
    claim.files.insert(PathBuf::from(file));
    Ok(claim)
}

/// Judges what is at `out` for an output of `kind`: nothing, an empty directory, or relora's
/// own earlier output (and what it consists of); anything else is an [`Error::OutputExists`].
pub(crate) fn judge(out: &Path, kind: &OutputKind) -> Result<Occupant> {
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Occupant::Nothing),
        Err(e) => return Err(Error::io(out, e)),
    };
    let ft = meta.file_type();
    let wrong_type = (kind.dir && !ft.is_dir()) || (!kind.dir && !ft.is_file());
    if wrong_type {
        return Err(foreign(out, crate::fs::read::describe(&ft)));
    }
    if kind.dir
        && std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_none()
    {
        return Ok(Occupant::EmptyDir);
    }
    let claim = match kind.recognise {
        Recognise::Marker { file, format } => read_marker(out, file, format),
        Recognise::Custom(f) => f(out),
    }
    .map_err(|reason| {
        let what = if kind.dir {
            let mut top: Vec<PathBuf> = std::fs::read_dir(out)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| PathBuf::from(e.file_name()))
                .collect();
            top.sort();
            format!("a directory holding {}", list_unclaimed(&top))
        } else {
            crate::fs::read::describe(&ft).to_string()
        };
        foreign(out, format!("{what} ({reason})"))
    })?;
    if kind.dir {
        let extra = unclaimed(out, &claim)?;
        if !extra.is_empty() {
            return Err(foreign(
                out,
                format!(
                    "a {} that also holds {}, which relora did not write",
                    kind.noun,
                    list_unclaimed(&extra)
                ),
            ));
        }
    }
    Ok(Occupant::Own(claim))
}

/// Judges `out` for an output of `kind` and refuses what may not be replaced: anything relora
/// did not write, and its own earlier output unless `replace_own`. Call it before expensive work
/// so that a refusal comes first; [`Staged::new`] and [`Staged::commit`] check again.
pub fn check_target(out: &Path, kind: &OutputKind, replace_own: bool) -> Result<()> {
    judge_allowed(out, kind, replace_own).map(|_| ())
}

pub(crate) fn judge_allowed(out: &Path, kind: &OutputKind, replace_own: bool) -> Result<Occupant> {
    let occupant = judge(out, kind)?;
    if matches!(occupant, Occupant::Own(_)) && !replace_own {
        return Err(Error::OutputExists {
            path: out.to_path_buf(),
            found: format!("relora's {}", kind.noun),
            own: true,
        });
    }
    Ok(occupant)
}

/// Checks that `out` could be created, without creating anything: the nearest existing path
/// above it must be a directory this process may write into.
pub fn check_parent_writable(out: &Path) -> Result<()> {
    let mut dir = out.parent();
    loop {
        let d = match dir {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => return writable(d),
            Ok(m) => {
                return Err(Error::io(
                    d,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!(
                            "is {}, so {} cannot be created",
                            crate::fs::read::describe(&m.file_type()),
                            out.display()
                        ),
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != Path::new(".") => {
                dir = d.parent();
            }
            Err(e) => return Err(Error::io(d, e)),
        }
    }
}

/// Whether this process may create entries in the directory `dir`.
fn writable(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
            Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "contains a NUL byte"),
            )
        })?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            return Err(Error::io(dir, std::io::Error::last_os_error()));
        }
    }
    let _ = dir;
    Ok(())
}

/// Whether `out` holds relora's own earlier output of `kind` (and nothing else).
pub fn holds_own(out: &Path, kind: &OutputKind) -> bool {
    matches!(judge(out, kind), Ok(Occupant::Own(_)))
}

/// Removes the directory `dir` that relora wrote, as `claim` lists it: the listed files, then
/// the directories, deepest first, with `rmdir`. An entry `claim` does not cover is an error
/// before anything is removed, and one that appears meanwhile stays (its directory with it).
pub fn remove_claimed(dir: &Path, claim: &Claim) -> Result<()> {
    let extra = unclaimed(dir, claim)?;
    if !extra.is_empty() {
        return Err(foreign(
            dir,
            format!(
                "a directory that holds {}, which relora did not write",
                list_unclaimed(&extra)
            ),
        ));
    }
    let mut dirs = Vec::new();
    for (rel, is_dir) in entries(dir)? {
        if is_dir {
            dirs.push(rel);
        } else {
            let p = dir.join(&rel);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&p, e)),
                _ => {}
            }
        }
    }
    // Children before parents.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.push(PathBuf::new());
    for rel in dirs {
        let p = dir.join(&rel);
        std::fs::remove_dir(&p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// Removes `dir` if it is relora's own output of `kind` (and holds nothing else); otherwise an
/// [`Error::OutputExists`] says what is there, and nothing is removed. A missing `dir` is fine.
pub fn remove_own(dir: &Path, kind: &OutputKind) -> Result<()> {
    match judge(dir, kind)? {
        Occupant::Nothing => Ok(()),
        Occupant::EmptyDir => std::fs::remove_dir(dir).map_err(|e| Error::io(dir, e)),
        Occupant::Own(claim) if kind.dir => remove_claimed(dir, &claim),
        Occupant::Own(_) => std::fs::remove_file(dir).map_err(|e| Error::io(dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_parent_that_cannot_hold_the_output_is_found_without_creating_anything() {
        let dir = tempfile::tempdir().unwrap();
        check_parent_writable(&dir.path().join("a/b/c")).unwrap();
        assert!(!dir.path().join("a").exists());
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_parent_writable(&file.join("hf"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a regular file") && err.contains("cannot be created"),
            "{err}"
        );
    }

    #[test]
    fn removal_takes_only_listed_entries() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        std::fs::create_dir_all(d.join("phases")).unwrap();
        std::fs::write(d.join("a"), b"1").unwrap();
        let claim = Claim {
            files: [PathBuf::from("a"), PathBuf::from("phases/p")]
                .into_iter()
                .collect(),
            dirs: BTreeSet::new(),
        };
        remove_claimed(&d, &claim).unwrap();
        assert!(!d.exists());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("b"), b"1").unwrap();
        let err = remove_claimed(&d, &claim).unwrap_err().to_string();
        assert!(err.contains("b"), "{err}");
        assert!(d.join("b").exists());
    }
}
