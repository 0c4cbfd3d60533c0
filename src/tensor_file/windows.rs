//! A tensor's elements as little-endian bytes, a window at a time: how in-memory tensors reach a
//! safetensors writer without a whole copy of the tensor.

use super::dtype::StDType;
use crate::error::{Error, Result, TensorContext};
use candle_core::{CpuStorage, Device, Storage, Tensor};

/// Calls `f` with the little-endian bytes of `t`'s elements, a window at a time.
pub(crate) fn tensor_windows(
    t: &Tensor,
    mut f: impl FnMut(&[u8], StDType) -> Result<()>,
) -> Result<()> {
    const ELEMS: usize = 1 << 20;
    let t = t
        .to_device(&Device::Cpu)
        .and_then(|t| t.contiguous())
        .ctx("preparing a tensor for writing")?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Data("tensor is not on the CPU".into()));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Data("tensor is not contiguous".into()))?;
    let mut bytes = Vec::new();
    macro_rules! windows {
        ($v:expr, $dt:expr) => {
            for c in $v[start..end].chunks(ELEMS) {
                bytes.clear();
                for x in c {
                    bytes.extend_from_slice(&x.to_le_bytes());
                }
                f(&bytes, $dt)?;
            }
        };
    }
    match cpu {
        // Little-endian hosts hand out the buffer itself, with no per-element copy.
        #[cfg(target_endian = "little")]
        CpuStorage::F32(v) => {
            for c in v[start..end].chunks(ELEMS) {
                f(bytemuck::cast_slice(c), StDType::F32)?;
            }
        }
        #[cfg(target_endian = "little")]
        CpuStorage::F64(v) => {
            for c in v[start..end].chunks(ELEMS) {
                f(bytemuck::cast_slice(c), StDType::F64)?;
            }
        }
        #[cfg(not(target_endian = "little"))]
        CpuStorage::F32(v) => windows!(v, StDType::F32),
        #[cfg(not(target_endian = "little"))]
        CpuStorage::F64(v) => windows!(v, StDType::F64),
        CpuStorage::BF16(v) => windows!(v, StDType::BF16),
        CpuStorage::F16(v) => windows!(v, StDType::F16),
        _ => {
            return Err(Error::Data(format!(
                "cannot export a tensor of dtype {:?}",
                t.dtype()
            )))
        }
    }
    Ok(())
}
