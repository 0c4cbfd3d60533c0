//! The target projections' weights as of the switch to adapters, kept on disk instead of in memory.
//!
//! A checkpoint stores them (`base.safetensors`) so `relora-convert` can replay the merges from
//! the start of the adapter phase. Nothing in training reads them, yet an in-memory copy is as
//! large as the frozen weights themselves: 101 MB on the 60m preset, 1.4 GB of GPU memory on 350m.
//! So the switch writes them once to an unlinked temporary file: no name is left behind when the
//! process dies, and the pages are the page cache's, not the process's; a trainer loaded from a
//! checkpoint reads the checkpoint's own file instead. A checkpoint copies the file's bytes as
//! they are.
//!
//! Where the file goes ([`spill_dir`]): the directory set with [`set_spill_dir`] (`relora train`
//! sets its run directory), else `$RELORA_SPILL_DIR`, else the system's temporary directory.
//! A `/tmp` on tmpfs would keep the weights in memory after all, only no longer counted as the
//! process's: the run directory is on the disk that holds the checkpoints anyway.

use crate::error::{Error, Result};
use crate::fs::file_info::FileInfo;
use crate::tensor_file::dtype::StDType;
use crate::tensor_file::safetensors::{
    pt_metadata, PlannedTensor, SafetensorsFile, SafetensorsWriter,
};
use crate::tensor_file::windows::tensor_windows;
use candle_core::Tensor;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Chunk copied at a time when the file is written into a checkpoint.
const COPY_CHUNK: usize = 8 << 20;

/// The directory set for this process, if any.
static SPILL_DIR: RwLock<Option<PathBuf>> = RwLock::new(None);

/// Sets (or with `None` clears) the directory where this process writes base weights from now on.
pub fn set_spill_dir(dir: Option<PathBuf>) {
    let mut guard = SPILL_DIR.write().unwrap_or_else(|e| e.into_inner());
    *guard = dir;
}

/// The directory base weights are written to: the one set with [`set_spill_dir`], else
/// `$RELORA_SPILL_DIR`, else the system's temporary directory (`$TMPDIR` or `/tmp`).
pub(crate) fn spill_dir() -> PathBuf {
    let set = SPILL_DIR.read().unwrap_or_else(|e| e.into_inner()).clone();
    set.or_else(|| std::env::var_os("RELORA_SPILL_DIR").map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir)
}

/// Frozen base weights in an unlinked temporary safetensors file.
pub struct BaseWeights {
    file: SafetensorsFile,
    /// Tensor names in the order they were given (the model's projection order).
    names: Vec<String>,
}

impl std::fmt::Debug for BaseWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseWeights")
            .field("tensors", &self.names.len())
            .field("bytes", &self.file.len())
            .finish()
    }
}

impl BaseWeights {
    /// Writes `tensors` (any device; f32, f64, bf16 or f16) to a new unlinked file in
    /// [`spill_dir`], bit for bit.
    pub(crate) fn spill<'a>(
        tensors: impl IntoIterator<Item = (String, &'a Tensor)>,
    ) -> Result<Self> {
        Self::spill_in(&spill_dir(), tensors)
    }

    /// [`BaseWeights::spill`] into the directory `dir`.
    pub(crate) fn spill_in<'a>(
        dir: &Path,
        tensors: impl IntoIterator<Item = (String, &'a Tensor)>,
    ) -> Result<Self> {
        let tensors: Vec<(String, &Tensor)> = tensors.into_iter().collect();
        let mut plan = Vec::with_capacity(tensors.len());
        for (name, t) in &tensors {
            let dtype = StDType::from_candle(t.dtype()).ok_or_else(|| {
                Error::Data(format!(
                    "base weight {name} has dtype {:?}, which cannot be stored",
                    t.dtype()
                ))
            })?;
            plan.push(PlannedTensor {
                name: name.clone(),
                dtype,
                shape: t.dims().to_vec(),
            });
        }
        let (file, path) = create_unlinked(dir)?;
        let mut w = SafetensorsWriter::from_file(file, &path, plan, &pt_metadata())?;
        for (_, t) in &tensors {
            tensor_windows(t, |bytes, _| w.write(bytes))?;
        }
        let mut file = w.into_file()?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(&path, e))?;
        let file = SafetensorsFile::from_file(file, &path)?;
        Ok(BaseWeights {
            file,
            names: tensors.into_iter().map(|(n, _)| n).collect(),
        })
    }

    /// Uses a checkpoint's `base.safetensors` at `path` as it is, with no copy: checkpoints are
    /// never rewritten in place (a newer one replaces a directory by renaming), and the open
    /// handle keeps the file readable even after the checkpoint is pruned. `names` must all be
    /// in the file.
    pub fn open(path: &Path, names: Vec<String>) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        for n in &names {
            file.info(n)?;
        }
        Ok(BaseWeights { file, names })
    }

    /// Tensor names, in the order they were spilled.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Bytes of the file (header included).
    #[cfg(test)]
    pub(crate) fn file_bytes(&self) -> u64 {
        self.file.len()
    }

    /// Reads tensor `name` back onto the CPU, in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.file.tensor(name)
    }

    /// Reads every tensor back onto the CPU, in spill order.
    pub fn to_vec(&self) -> Result<Vec<(String, Tensor)>> {
        self.names
            .iter()
            .map(|n| Ok((n.clone(), self.tensor(n)?)))
            .collect()
    }

    /// Copies the file to `path` (created or truncated) a chunk at a time, syncs it, and returns
    /// its size and CRC-32 for a checkpoint manifest.
    pub(crate) fn write_copy(&self, path: &Path) -> Result<FileInfo> {
        let mut out = File::create(path).map_err(|e| Error::io(path, e))?;
        let src = self.file.file();
        let mut buf = vec![0u8; COPY_CHUNK.min(self.file.len() as usize)];
        let mut crc = crc32fast::Hasher::new();
        let mut at = 0u64;
        while at < self.file.len() {
            let n = ((self.file.len() - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)
                .map_err(|e| Error::io(self.file.path(), e))?;
            crc.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| Error::io(path, e))?;
            at += n as u64;
        }
        out.sync_all().map_err(|e| Error::io(path, e))?;
        Ok(FileInfo {
            bytes: at,
            crc32: crc.finalize(),
        })
    }
}

/// Creates a file no other process can have opened and removes its name at once, so it
/// disappears with its last handle whatever way the process ends.
fn create_unlinked(dir: &Path) -> Result<(File, PathBuf)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for _ in 0..16 {
        let path = dir.join(format!(
            ".relora-base-{}-{}-{nanos}.safetensors",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                return Ok((f, path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Err(Error::io(
        dir,
        std::io::Error::other("no free name for the base weights' temporary file"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn tensors() -> Vec<(String, Tensor)> {
        let dev = Device::Cpu;
        vec![
            (
                "a.weight".to_string(),
                Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap(),
            ),
            (
                "b.weight".to_string(),
                Tensor::randn(0f64, 1.0, (3, 4), &dev).unwrap(),
            ),
            (
                "c.weight".to_string(),
                Tensor::randn(0f32, 1.0, (2, 9), &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            ),
            // A transposed view: spilled in logical order, not storage order.
            (
                "d.weight".to_string(),
                Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap().t().unwrap(),
            ),
        ]
    }

    fn bits(t: &Tensor) -> Vec<u64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn spilled_weights_read_back_bit_for_bit_and_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let ts = tensors();
        let base =
            BaseWeights::spill_in(dir.path(), ts.iter().map(|(n, t)| (n.clone(), t))).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the file must be unlinked"
        );
        assert_eq!(
            base.names(),
            ["a.weight", "b.weight", "c.weight", "d.weight"]
        );
        for ((n, t), (n2, back)) in ts.iter().zip(base.to_vec().unwrap()) {
            assert_eq!(n, &n2);
            assert_eq!(t.dtype(), back.dtype(), "{n}");
            assert_eq!(t.dims(), back.dims(), "{n}");
            assert_eq!(bits(t), bits(&back), "{n}");
        }
    }

    #[test]
    fn a_checkpoint_copy_is_a_valid_file_with_the_right_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let ts = tensors();
        let base =
            BaseWeights::spill_in(dir.path(), ts.iter().map(|(n, t)| (n.clone(), t))).unwrap();
        let out = dir.path().join("base.safetensors");
        let info = base.write_copy(&out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(info.bytes, bytes.len() as u64);
        assert_eq!(info.bytes, base.file_bytes());
        assert_eq!(info.crc32, crc32fast::hash(&bytes));
        let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        for (n, t) in &ts {
            assert_eq!(bits(t), bits(&loaded[n]), "{n}");
        }
    }

    #[test]
    fn the_set_directory_takes_the_spill_and_nothing_is_left_in_it() {
        let dir = tempfile::tempdir().unwrap();
        set_spill_dir(Some(dir.path().to_path_buf()));
        assert_eq!(spill_dir(), dir.path());
        let t = Tensor::ones((3, 3), DType::F32, &Device::Cpu).unwrap();
        let base = BaseWeights::spill([("w".to_string(), &t)]);
        set_spill_dir(None);
        let base = base.unwrap();
        assert_eq!(bits(&base.tensor("w").unwrap()), bits(&t));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_ne!(spill_dir(), dir.path());
    }

    #[test]
    fn an_opened_checkpoint_file_outlives_its_name_and_names_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let ts = tensors();
        let spilled =
            BaseWeights::spill_in(dir.path(), ts.iter().map(|(n, t)| (n.clone(), t))).unwrap();
        let path = dir.path().join("base.safetensors");
        spilled.write_copy(&path).unwrap();
        let names: Vec<String> = ts.iter().map(|(n, _)| n.clone()).collect();
        let opened = BaseWeights::open(&path, names.clone()).unwrap();
        std::fs::remove_file(&path).unwrap();
        for (n, t) in &ts {
            assert_eq!(bits(t), bits(&opened.tensor(n).unwrap()), "{n}");
        }
        let copy = dir.path().join("copy.safetensors");
        assert_eq!(
            opened.write_copy(&copy).unwrap(),
            spilled.write_copy(&path).unwrap()
        );
        let mut more = names;
        more.push("z.weight".into());
        let err = BaseWeights::open(&path, more).unwrap_err().to_string();
        assert!(err.contains("z.weight"), "{err}");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let err = BaseWeights::spill_in(Path::new("/nonexistent/relora-dir"), [("w".into(), &t)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/relora-dir"), "{err}");
    }
}
