//! Safetensors files for streaming: a reader that checks the header against the file and maps one
//! tensor (or one window of it) at a time, and a writer that lays out the header first and then
//! takes the tensors' bytes in order, so neither side ever holds a whole model.
//!
//! The format: an 8-byte little-endian header length `N`, `N` bytes of JSON (`{"name": {"dtype",
//! "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the data, whose offsets
//! are relative to the end of the header and must tile it exactly.

use super::dtype::StDType;
use crate::error::{Error, Result};
use memmap2::{Mmap, MmapOptions};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// Largest header accepted, as in the reference implementation: a bigger one is a corrupt file.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Bytes mapped at a time when a tensor is streamed in windows.
pub(crate) const WINDOW_BYTES: usize = 64 << 20;

/// One tensor's entry in a safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: StDType,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Byte offset of the data from the end of the header.
    pub begin: u64,
    /// One past the last byte of the data.
    pub end: u64,
}

impl TensorInfo {
    /// Size of the data in bytes.
    pub fn bytes(&self) -> u64 {
        self.end - self.begin
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open safetensors file whose header has been checked against its length.
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    data_start: u64,
    tensors: HashMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
    len: u64,
}

/// A mapped byte range of a file (empty ranges need no mapping).
pub struct Mapped(Option<Mmap>);

impl Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

/// Something that is not a regular file where a safetensors file should be is a damaged input,
/// like a truncated one ([`Error::Checkpoint`], naming the file).
fn not_regular_is_bad(e: Error) -> Error {
    match e {
        Error::Io { path, source } if source.kind() == crate::fs::read::NOT_REGULAR => {
            Error::Checkpoint {
                path,
                message: source.to_string(),
            }
        }
        e => e,
    }
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::checkpoint(path, message)
}

impl SafetensorsFile {
    /// Opens `path` and checks the header: its length, JSON, every entry's dtype, shape and
    /// offsets, and that the entries tile the data to the last byte (so a truncated or padded
    /// file is an error here, naming the file).
    pub fn open(path: &Path) -> Result<Self> {
        // Only a regular file: a FIFO or a device would block the open or never end.
        let (file, _) = crate::fs::read::open_regular(path).map_err(not_regular_is_bad)?;
        Self::from_file(file, path)
    }

    /// [`SafetensorsFile::open`] for a file already open for reading and positioned at its
    /// start (an unlinked temporary file, say); `path` only names it in errors.
    pub fn from_file(mut file: File, path: &Path) -> Result<Self> {
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(bad(
                path,
                format!("is {len} bytes, too short for a safetensors file (truncated?)"),
            ));
        }
        let mut head = [0u8; 8];
        file.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
        let n = u64::from_le_bytes(head);
        if n > MAX_HEADER_BYTES {
            return Err(bad(
                path,
                format!("header length {n} is implausible: not a safetensors file, or corrupt"),
            ));
        }
        if 8 + n > len {
            return Err(bad(
                path,
                format!("header claims {n} bytes but the file has only {len} (truncated)"),
            ));
        }
        let mut json = vec![0u8; n as usize];
        file.read_exact(&mut json).map_err(|e| Error::io(path, e))?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&json)
            .map_err(|e| bad(path, format!("header is not a JSON object: {e}")))?;
        let data_len = len - 8 - n;
        let mut tensors = HashMap::with_capacity(header.len());
        let mut metadata = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                let obj = v
                    .as_object()
                    .ok_or_else(|| bad(path, "__metadata__ is not an object"))?;
                for (k, v) in obj {
                    let v = v.as_str().ok_or_else(|| {
                        bad(path, format!("__metadata__ value of {k} is not a string"))
                    })?;
                    metadata.insert(k.clone(), v.to_string());
                }
                continue;
            }
            let info = parse_entry(path, &name, &v)?;
            tensors.insert(name, info);
        }
        let mut order: Vec<&TensorInfo> = tensors.values().collect();
        order.sort_by_key(|t| (t.begin, t.end));
        let mut at = 0u64;
        for t in &order {
            if t.begin != at {
                return Err(bad(
                    path,
                    format!(
                        "tensor {} starts at byte {} of the data, expected {at} (overlapping or \
                         gapped offsets)",
                        t.name, t.begin
                    ),
                ));
            }
            at = t.end;
        }
        if at != data_len {
            let what = if at > data_len {
                format!(
                    "the header describes {at} bytes of data but the file holds {data_len} \
                     (truncated)"
                )
            } else {
                format!(
                    "the file holds {data_len} bytes of data but the header describes only {at} \
                     (trailing garbage)"
                )
            };
            return Err(bad(path, what));
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            data_start: 8 + n,
            tensors,
            metadata,
            len,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The `__metadata__` strings.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The entry for `name`, if present.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The entry for `name`, or an error naming the tensor and this file.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| bad(&self.path, format!("tensor {name} is missing")))
    }

    /// Every entry, sorted by name.
    pub fn tensors(&self) -> Vec<&TensorInfo> {
        let mut v: Vec<&TensorInfo> = self.tensors.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every entry in the order of the data.
    pub fn tensors_in_file_order(&self) -> Vec<&TensorInfo> {
        let mut v: Vec<&TensorInfo> = self.tensors.values().collect();
        v.sort_by_key(|t| t.begin);
        v
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }

    /// Maps `len` bytes of the file from absolute offset `offset`.
    fn map_abs(&self, offset: u64, len: usize) -> Result<Mapped> {
        if len == 0 {
            return Ok(Mapped(None));
        }
        // SAFETY: the mapping is read-only and private to this process. As with every mmap-based
        // loader, another process truncating the file while it is mapped would fault the reads;
        // the length was checked at open, and the mapping lives only while one tensor is used.
        let map = unsafe { MmapOptions::new().offset(offset).len(len).map(&self.file) }
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(Mapped(Some(map)))
    }

    /// Maps the whole data of tensor `name`.
    pub fn map(&self, name: &str) -> Result<Mapped> {
        let t = self.info(name)?;
        self.map_abs(self.data_start + t.begin, t.bytes() as usize)
    }

    /// Calls `f` on the data of tensor `name` in windows of at most [`WINDOW_BYTES`] (whole
    /// elements each), mapping one window at a time so memory stays bounded for any tensor size.
    pub fn for_each_window(
        &self,
        name: &str,
        mut f: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let t = self.info(name)?;
        let elem = t.dtype.size();
        let step = (WINDOW_BYTES / elem).max(1) * elem;
        let mut at = 0u64;
        while at < t.bytes() {
            let len = (t.bytes() - at).min(step as u64) as usize;
            let m = self.map_abs(self.data_start + t.begin + at, len)?;
            f(&m)?;
            at += len as u64;
        }
        Ok(())
    }

    /// Loads tensor `name` as a candle tensor on the CPU, in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<candle_core::Tensor> {
        let t = self.info(name)?;
        let dtype = t.dtype.to_candle().ok_or_else(|| {
            bad(
                &self.path,
                format!(
                    "tensor {name} has dtype {}, which cannot be loaded",
                    t.dtype
                ),
            )
        })?;
        let m = self.map(name)?;
        candle_core::Tensor::from_raw_buffer(&m, dtype, &t.shape, &candle_core::Device::Cpu)
            .map_err(|e| Error::tensor(format!("loading {name} from {}", self.path.display()), e))
    }

    /// Loads a tensor holding one float (a phase's scale) as f64.
    pub fn scalar_f64(&self, name: &str) -> Result<f64> {
        let t = self.info(name)?;
        if t.numel() != 1 {
            return Err(bad(
                &self.path,
                format!(
                    "tensor {name} should hold one value, has shape {:?}",
                    t.shape
                ),
            ));
        }
        let m = self.map(name)?;
        let mut out = Vec::new();
        super::dtype::convert_into(&m, t.dtype, StDType::F64, &mut out)
            .map_err(|e| bad(&self.path, format!("tensor {name}: {e}")))?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&out[..8]);
        Ok(f64::from_le_bytes(b))
    }
}

fn parse_entry(path: &Path, name: &str, v: &serde_json::Value) -> Result<TensorInfo> {
    let obj = v
        .as_object()
        .ok_or_else(|| bad(path, format!("header entry {name} is not an object")))?;
    let dtype_name = obj
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| bad(path, format!("tensor {name} has no dtype")))?;
    let dtype = StDType::from_name(dtype_name).ok_or_else(|| {
        bad(
            path,
            format!("tensor {name} has dtype {dtype_name}, which is not supported"),
        )
    })?;
    let shape: Vec<usize> = obj
        .get("shape")
        .and_then(|s| s.as_array())
        .and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| bad(path, format!("tensor {name} has no valid shape")))?;
    let offs: Vec<u64> = obj
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
        .filter(|o| o.len() == 2 && o[0] <= o[1])
        .ok_or_else(|| bad(path, format!("tensor {name} has invalid data_offsets")))?;
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(path, format!("tensor {name}: shape {shape:?} overflows")))?;
    // Checked: a shape whose element count fits in a usize can still overflow as a byte count.
    let expect = (numel as u64)
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| bad(path, format!("tensor {name}: {dtype} {shape:?} overflows")))?;
    if offs[1] - offs[0] != expect {
        return Err(bad(
            path,
            format!(
                "tensor {name}: {dtype} {shape:?} needs {expect} bytes, the offsets span {}",
                offs[1] - offs[0]
            ),
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        begin: offs[0],
        end: offs[1],
    })
}

/// What a safetensors file will hold: name, dtype and shape of each tensor, in data order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTensor {
    /// Tensor name.
    pub name: String,
    /// Element type written.
    pub dtype: StDType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    /// Size of the data in bytes.
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// The header bytes (length prefix included) of a file holding `plan` in order.
pub fn header_bytes(plan: &[PlannedTensor], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut at = 0u64;
    for t in plan {
        let end = at + t.bytes();
        map.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map)).unwrap_or_default();
    // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// Writes a safetensors file whose header is known up front, taking the tensors' bytes in plan
/// order through any number of [`SafetensorsWriter::write`] calls.
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    plan: Vec<PlannedTensor>,
    index: usize,
    written: u64,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `plan`.
    pub fn create(
        path: &Path,
        plan: Vec<PlannedTensor>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        check_unique(&plan, path)?;
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Self::from_file(file, path, plan, metadata)
    }

    /// [`SafetensorsWriter::create`] into a file already open for writing (an unlinked temporary
    /// file, say); `path` only names it in errors.
    pub fn from_file(
        file: File,
        path: &Path,
        plan: Vec<PlannedTensor>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        check_unique(&plan, path)?;
        // Small: big chunks bypass the buffer (a chunk larger than it is written directly), so
        // only headers and small tensors are copied through it.
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header_bytes(&plan, metadata))
            .map_err(|e| Error::io(path, e))?;
        let mut w = SafetensorsWriter {
            path: path.to_path_buf(),
            out,
            plan,
            index: 0,
            written: 0,
        };
        w.skip_empty();
        Ok(w)
    }

    fn skip_empty(&mut self) {
        while self.index < self.plan.len() && self.written == self.plan[self.index].bytes() {
            self.index += 1;
            self.written = 0;
        }
    }

    /// The tensor whose bytes are expected next, if any.
    #[cfg(test)]
    pub(crate) fn next_tensor(&self) -> Option<&PlannedTensor> {
        self.plan.get(self.index)
    }

    /// Appends bytes of the current tensor; a chunk may not run past its end.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(t) = self.plan.get(self.index) else {
            return Err(Error::Data(format!(
                "{}: {} bytes written past the last tensor",
                self.path.display(),
                bytes.len()
            )));
        };
        if self.written + bytes.len() as u64 > t.bytes() {
            return Err(Error::Shape {
                name: t.name.clone(),
                message: format!(
                    "{} bytes given for a tensor of {} ({} already written)",
                    bytes.len(),
                    t.bytes(),
                    self.written
                ),
            });
        }
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written += bytes.len() as u64;
        self.skip_empty();
        Ok(())
    }

    /// Checks every tensor was written in full, flushes and syncs the file.
    pub fn finish(self) -> Result<()> {
        let path = self.path.clone();
        let file = self.into_file()?;
        file.sync_all().map_err(|e| Error::io(&path, e))
    }

    /// Checks every tensor was written in full and flushes the buffer, without syncing, and
    /// hands back the file (a temporary file that is read back needs no trip to the disk).
    pub(crate) fn into_file(mut self) -> Result<File> {
        if let Some(t) = self.plan.get(self.index) {
            return Err(Error::Shape {
                name: t.name.clone(),
                message: format!(
                    "only {} of {} bytes written to {}",
                    self.written,
                    t.bytes(),
                    self.path.display()
                ),
            });
        }
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        self.out
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))
    }
}

/// A plan naming one tensor twice would make an ambiguous header.
fn check_unique(plan: &[PlannedTensor], path: &Path) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for t in plan {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::Shape {
                name: t.name.clone(),
                message: format!("listed twice for {}", path.display()),
            });
        }
    }
    Ok(())
}

/// `{"format": "pt"}`, the metadata older transformers versions insist on.
pub fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Vec<PlannedTensor> {
        vec![
            PlannedTensor {
                name: "b".into(),
                dtype: StDType::F32,
                shape: vec![2, 3],
            },
            PlannedTensor {
                name: "empty".into(),
                dtype: StDType::F32,
                shape: vec![0],
            },
            PlannedTensor {
                name: "a".into(),
                dtype: StDType::BF16,
                shape: vec![3],
            },
        ]
    }

    #[test]
    fn written_files_read_back_here_and_in_the_reference_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut w = SafetensorsWriter::create(&path, plan(), &pt_metadata()).unwrap();
        let b: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.write(&b[..10]).unwrap();
        w.write(&b[10..]).unwrap();
        assert_eq!(w.next_tensor().unwrap().name, "a");
        w.write(&[1, 2, 3, 4, 5, 6]).unwrap();
        assert!(w.write(&[0]).is_err());
        w.finish().unwrap();

        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.names(), vec!["a", "b", "empty"]);
        assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
        let t = f.tensor("b").unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        assert_eq!(&*f.map("a").unwrap(), &[1, 2, 3, 4, 5, 6]);
        assert!(f.map("empty").unwrap().is_empty());
        let bytes = std::fs::read(&path).unwrap();
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &[1, 2, 3, 4, 5, 6]);
        assert!(f.info("nope").unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn short_writes_truncation_and_garbage_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut w = SafetensorsWriter::create(&path, plan(), &pt_metadata()).unwrap();
        w.write(&[0; 24]).unwrap();
        let err = w.finish().unwrap_err().to_string();
        assert!(err.contains("tensor a"), "{err}");

        let mut w = SafetensorsWriter::create(&path, plan(), &pt_metadata()).unwrap();
        w.write(&[0; 24]).unwrap();
        w.write(&[0; 6]).unwrap();
        w.finish().unwrap();
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 1]).unwrap();
        let err = SafetensorsFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&path, &full[..20]).unwrap();
        let err = SafetensorsFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        let mut longer = full.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        let err = SafetensorsFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("trailing"), "{err}");
        let mut garbage = full;
        garbage[9] = b'!';
        std::fs::write(&path, &garbage).unwrap();
        let err = SafetensorsFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("JSON"), "{err}");
    }

    #[test]
    fn windows_cover_a_tensor_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let n = WINDOW_BYTES / 4 + 3;
        let plan = vec![PlannedTensor {
            name: "x".into(),
            dtype: StDType::F32,
            shape: vec![n],
        }];
        let mut w = SafetensorsWriter::create(&path, plan, &BTreeMap::new()).unwrap();
        let data: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.write(&data).unwrap();
        w.finish().unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        let mut back = Vec::new();
        let mut calls = 0;
        f.for_each_window("x", |c| {
            calls += 1;
            back.extend_from_slice(c);
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 2);
        assert_eq!(back, data);
    }

    /// A header and its data, as the fuzz target's inputs are.
    fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn implausible_sizes_are_errors_before_anything_is_allocated() {
        // Found by fuzzing (fuzz/seeds/safetensors/shape-bytes-overflow.safetensors): 2^61 F64
        // elements fit in a usize but not as a byte count, which panicked on the overflow.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let header = r#"{"x":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}}"#;
        std::fs::write(&path, raw_file(header, &[])).unwrap();
        let err = SafetensorsFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("overflows"), "{err}");
        // A header that claims a 1 TB tensor with no data behind it: refused by the length check.
        let header =
            r#"{"x":{"dtype":"F32","shape":[262144,1048576],"data_offsets":[0,1099511627776]}}"#;
        std::fs::write(&path, raw_file(header, &[0; 16])).unwrap();
        let err = SafetensorsFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
