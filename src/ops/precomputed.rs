//! The result of a node whose forward pass already ran outside the graph: candle calls a custom
//! op's forward with the inputs' storages, and nodes that compute their result from several
//! tensors beforehand (the attention node, the decoder-layer node) hand it over here instead.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Shape, Storage, Tensor};
use std::sync::Mutex;

/// A result waiting for its node's forward call, taken exactly once.
pub(crate) struct Precomputed {
    op: &'static str,
    dims: Vec<usize>,
    value: Mutex<Option<Tensor>>,
}

impl Precomputed {
    /// Holds `value`, which must be a fresh contiguous tensor.
    pub fn new(op: &'static str, value: Tensor) -> Self {
        Precomputed {
            op,
            dims: value.dims().to_vec(),
            value: Mutex::new(Some(value)),
        }
    }

    /// Takes the result, checked to be contiguous from the start of its storage.
    fn take(&self) -> candle_core::Result<Tensor> {
        let op = self.op;
        let taken = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: result lock poisoned")))?
            .take();
        let Some(value) = taken else {
            candle_core::bail!("{op}: the node's forward ran twice");
        };
        let l = value.layout();
        if value.dims() != self.dims.as_slice() || !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("{op}: internal result has layout {l:?}");
        }
        Ok(value)
    }

    /// The result as a CPU storage (a copy: the storage is shared with the tensor).
    pub(crate) fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let (s, l) = value.storage_and_layout();
        let Storage::Cpu(s) = &*s else {
            candle_core::bail!("{}: result is not on the CPU", self.op);
        };
        Ok((s.try_clone(l)?, l.shape().clone()))
    }

    /// The result as a CUDA storage (a device-to-device copy).
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let value = self.take()?;
        let (s, l) = value.storage_and_layout();
        let Storage::Cuda(s) = &*s else {
            candle_core::bail!("{}: result is not on the GPU", self.op);
        };
        Ok((s.try_clone(l)?, l.shape().clone()))
    }
}
