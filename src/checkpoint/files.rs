//! Safetensors files as checkpoints use them: written with fsync and a CRC-32 recorded in the
//! manifest; read back with size and checksum verified before any tensor is built.

use crate::error::{Error, Result, TensorContext};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub use crate::fs::file_info::FileInfo;

/// Writes `bytes` to `path`, flushes it to disk, and returns its size and checksum.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<FileInfo> {
    crate::fs::output::write_synced(path, bytes)?;
    Ok(FileInfo {
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(bytes),
    })
}

/// Serialises named tensors (moved to the CPU) as safetensors with `{"format": "pt"}` metadata.
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut cpu = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t
            .to_device(&Device::Cpu)
            .and_then(|t| t.contiguous())
            .with_ctx(|| format!("preparing {name} for saving"))?;
        cpu.push((name.clone(), t));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| Error::Data(format!("serialising tensors: {e}")))
}

/// Writes named tensors to `path` as safetensors, synced.
pub(crate) fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<FileInfo> {
    write_synced(path, &safetensors_bytes(tensors)?)
}

/// A failed read of a checkpoint's file as what it means: a file that is missing, is not a
/// regular file (a FIFO, a device) or is over its size limit is a damaged checkpoint
/// ([`Error::Checkpoint`], naming the file); other OS errors (permissions, I/O) stay I/O errors.
pub fn damaged(e: Error) -> Error {
    use std::io::ErrorKind;
    match e {
        Error::Io { path, source }
            if matches!(
                source.kind(),
                ErrorKind::NotFound | ErrorKind::InvalidData | ErrorKind::Other
            ) || crate::fs::read::NOT_REGULAR == source.kind() =>
        {
            let message = match source.kind() {
                ErrorKind::NotFound => "is missing".to_string(),
                _ => source.to_string(),
            };
            Error::Checkpoint { path, message }
        }
        e => e,
    }
}

/// Reads a checkpoint file, checking its length and checksum against the manifest. Only a
/// regular file is read, and no more than the manifest's length of it.
pub(crate) fn read_verified(path: &Path, expect: &FileInfo) -> Result<Vec<u8>> {
    let (file, len) = crate::fs::read::open_regular(path).map_err(damaged)?;
    if len != expect.bytes {
        return Err(Error::checkpoint(
            path,
            format!(
                "is {len} bytes, the manifest says {} (truncated or replaced)",
                expect.bytes
            ),
        ));
    }
    let bytes = crate::fs::read::read_at_most(file, path, expect.bytes).map_err(damaged)?;
    if bytes.len() as u64 != expect.bytes {
        return Err(Error::checkpoint(
            path,
            format!(
                "is {} bytes, the manifest says {} (truncated while reading)",
                bytes.len(),
                expect.bytes
            ),
        ));
    }
    let crc = crc32fast::hash(&bytes);
    if crc != expect.crc32 {
        return Err(Error::checkpoint(
            path,
            format!(
                "checksum {crc:08x} differs from the manifest's {:08x} (corrupt)",
                expect.crc32
            ),
        ));
    }
    Ok(bytes)
}

/// Parses safetensors bytes into tensors on `device`; a malformed file is a checkpoint error.
pub fn parse_tensors(
    path: &Path,
    bytes: &[u8],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))
}

/// Takes a tensor out of a loaded file, or names what is missing.
pub fn take(map: &mut HashMap<String, Tensor>, name: &str, file: &Path) -> Result<Tensor> {
    map.remove(name)
        .ok_or_else(|| Error::checkpoint(file, format!("tensor {name} is missing")))
}
