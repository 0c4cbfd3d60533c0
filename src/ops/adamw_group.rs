//! AdamW over every parameter of a step in one CUDA launch and one pass, in place.
//!
//! The per-tensor update ([`super::adamw_update`]) costs two launches, an allocation and a few
//! candle tensors per parameter. The adapter phase of the 350m preset has about 390 trainable
//! tensors, most of them small, so its optimizer step took longer than full rank's (14.6 against
//! 10.2 ms on an H100) with a fifth of the parameters: the host issuing work, not the card doing
//! it. Here one table of device addresses and per-tensor constants goes to the card and one
//! grouped kernel (`ops/grouped.rs`) reads the gradient and both moments, writes the moments
//! back and updates the parameter: 28 bytes of traffic an element instead of 36, and no new
//! buffers, so the optimizer's peak memory is its state and nothing more.
//!
//! In place means the moments are written where they are: the optimizer gives each parameter
//! moments in storage of their own before the first grouped step, and the launch refuses any
//! table in which written memory overlaps ([`super::grouped::check_disjoint`]). The arithmetic
//! is the per-tensor kernels' (shared device functions in `kernels.cu`).

use super::adamw_update::AdamWConstants;
use candle_core::{DType, Device, Tensor};

/// Whether the calling trainer uses the grouped AdamW update
/// ([`crate::engine::Engine::grouped_updates`]): off, each parameter gets launches of its own
/// ([`super::adamw_update`]), as before the grouped kernel existed. No effect on the CPU, which
/// launches nothing. (The gradient norm's reduction is always grouped.)
pub fn grouped_updates() -> bool {
    crate::engine::current().grouped_updates
}

/// One parameter of a grouped update: the parameter and its moments are updated in place.
#[derive(Clone, Copy, Debug)]
pub struct GroupMember<'a> {
    /// The parameter's name, for errors.
    pub name: &'a str,
    /// The parameter, contiguous.
    pub param: &'a Tensor,
    /// Its gradient, contiguous, same shape.
    pub grad: &'a Tensor,
    /// First moment, contiguous, same shape, in storage no other member writes.
    pub exp_avg: &'a Tensor,
    /// Second moment, as the first.
    pub exp_avg_sq: &'a Tensor,
    /// This parameter's constants (its own step count, its own decay). `beta1`, `beta2`, `eps`
    /// and `grad_scale` must be the same for every member.
    pub constants: AdamWConstants,
}

/// Whether grouped updates run on `device`: a CUDA device, in a build with the `cuda` feature,
/// with the fused ops and the grouped update on.
pub fn grouping_on(device: &Device) -> bool {
    cfg!(feature = "cuda")
        && grouped_updates()
        && super::fused_kernels()
        && matches!(device, Device::Cuda(_))
}

/// Whether the grouped kernel takes this parameter on `device` ([`grouping_on`]): the
/// parameter, its gradient and both moments are contiguous f32 tensors of one shape there.
pub fn group_applies(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    device: &Device,
) -> bool {
    grouping_on(device)
        && [param, grad, exp_avg, exp_avg_sq].iter().all(|t| {
            t.dtype() == DType::F32
                && t.is_contiguous()
                && t.device().same_device(device)
                && t.shape() == param.shape()
        })
}

/// Applies one AdamW update to every member, in place, in one launch (or one per 65535
/// members). Every member must satisfy [`group_applies`]; moments that share memory with
/// another member's written tensors are refused before anything is written.
#[cfg(feature = "cuda")]
pub fn adamw_update_group(members: &[GroupMember]) -> candle_core::Result<()> {
    use super::cuda;
    use super::grouped::{check_disjoint, Grouped, Span};
    use candle_core::cuda_backend::cudarc::driver::DevicePtr as _;
    use candle_core::Storage;

    let Some(first) = members.first() else {
        return Ok(());
    };
    let shared = first.constants;
    let Device::Cuda(dev) = first.param.device() else {
        candle_core::bail!("grouped AdamW: {} is not on a CUDA device", first.name);
    };
    for m in members {
        let c = m.constants;
        if (c.beta1, c.beta2, c.eps, c.grad_scale)
            != (shared.beta1, shared.beta2, shared.eps, shared.grad_scale)
        {
            candle_core::bail!(
                "grouped AdamW: {} has other shared constants than {}",
                m.name,
                first.name
            );
        }
        if !group_applies(
            m.param,
            m.grad,
            m.exp_avg,
            m.exp_avg_sq,
            first.param.device(),
        ) {
            candle_core::bail!(
                "grouped AdamW: {} and its gradient and moments must be contiguous f32 tensors \
                 of one shape on {:?}",
                m.name,
                first.param.device()
            );
        }
    }
    let stream = dev.cuda_stream();
    // Read guards on every storage, held until the launch is queued. The kernel writes the
    // parameter and the moments through the addresses taken here; nothing else runs between.
    let guards: Vec<_> = members
        .iter()
        .flat_map(|m| [m.param, m.grad, m.exp_avg, m.exp_avg_sq])
        .map(|t| t.storage_and_layout())
        .collect();
    let mut views = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cuda(s) = &**storage else {
            candle_core::bail!("grouped AdamW: a tensor is not on the CUDA device");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("grouped AdamW: a tensor is not contiguous");
        };
        views.push(s.as_cuda_slice::<f32>()?.slice(a..b));
    }
    // Held until the launch is queued: with cudarc's event tracking on, dropping one records
    // that the kernel used the buffer.
    let ptrs: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
    // Span ids are indices into `ptrs`: member * 4 + (0 parameter, 1 gradient, 2 and 3 moments).
    let span = |id: usize| Span {
        start: ptrs[id].0,
        end: ptrs[id].0 + 4 * members[id / 4].param.elem_count() as u64,
        id,
    };
    let mut written: Vec<Span> = (0..ptrs.len()).filter(|i| i % 4 != 1).map(span).collect();
    let read: Vec<Span> = (0..ptrs.len()).filter(|i| i % 4 == 1).map(span).collect();
    if let Err(o) = check_disjoint(&mut written, &read) {
        let what = |id: usize| {
            let role = ["the parameter", "the gradient", "exp_avg", "exp_avg_sq"][id % 4];
            format!("{role} of {}", members[id / 4].name)
        };
        if o.second_read {
            candle_core::bail!(
                "grouped AdamW: {} is read while {} is written in place, and they share memory",
                what(o.second),
                what(o.first)
            );
        }
        candle_core::bail!(
            "grouped AdamW: {} and {} are both written in place and share memory",
            what(o.first),
            what(o.second)
        );
    }
    let addr = |member: usize, which: usize| ptrs[4 * member + which].0;

    let entries: Vec<GroupEntry> = members
        .iter()
        .enumerate()
        .map(|(i, m)| GroupEntry {
            p: addr(i, 0),
            g: addr(i, 1),
            m: addr(i, 2),
            v: addr(i, 3),
            n: m.param.elem_count() as u64,
            step_size: m.constants.step_size as f32,
            inv_bc2: m.constants.inv_sqrt_bc2 as f32,
            // A decay factor of exactly 1 leaves the parameter as it is, as `None` does.
            decay: m.constants.decay.unwrap_or(1.0) as f32,
            pad: 0.0,
        })
        .collect();
    let grid = Grouped::new(entries.iter().map(|e| e.n as usize));
    let table = dev.clone_htod(&entries)?;
    let (b1, b2) = (shared.beta1 as f32, shared.beta2 as f32);
    let (b1c, b2c) = ((1.0 - shared.beta1) as f32, (1.0 - shared.beta2) as f32);
    let (gs, eps) = (shared.grad_scale as f32, shared.eps as f32);
    for part in grid.launches() {
        let t = table.slice(part.clone());
        cuda::launch!(
            dev,
            "adamw_group",
            grid.config(&part),
            &t,
            &gs,
            &b1,
            &b1c,
            &b2,
            &b2c,
            &eps
        );
    }
    Ok(())
}

/// One member of the grouped CUDA update, as `AdamWGroupEntry` in kernels.cu: device addresses
/// of the parameter, gradient and moments, the element count, and the member's constants.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct GroupEntry {
    p: u64,
    g: u64,
    m: u64,
    v: u64,
    n: u64,
    step_size: f32,
    inv_bc2: f32,
    decay: f32,
    pad: f32,
}

#[cfg(feature = "cuda")]
// SAFETY: a plain `repr(C)` struct of integers and floats, laid out as the kernel's struct.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for GroupEntry {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rust tables match the layout of the kernels' structs: 8-byte addresses and counts
    /// first, then the f32 constants, no padding the C compiler would not also add.
    #[test]
    fn table_entries_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<GroupEntry>(), 56);
        assert_eq!(std::mem::align_of::<GroupEntry>(), 8);
        assert_eq!(std::mem::offset_of!(GroupEntry, n), 32);
        assert_eq!(std::mem::offset_of!(GroupEntry, step_size), 40);
        assert_eq!(std::mem::offset_of!(GroupEntry, pad), 52);
        let src = include_str!("kernels.cu");
        let entry = &src[src.find("struct AdamWGroupEntry {").unwrap()..];
        let fields: Vec<&str> = entry[..entry.find("};").unwrap()]
            .lines()
            .skip(1)
            .map(|l| l.trim().split(';').next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "float* p",
                "const float* g",
                "float* m",
                "float* v",
                "unsigned long long n",
                "float step_size",
                "float inv_bc2",
                "float decay",
                "float pad"
            ]
        );
        assert_eq!(
            std::mem::size_of::<super::super::sum_squares::SquaresEntry>(),
            16
        );
    }

    #[test]
    fn only_contiguous_f32_tensors_on_a_gpu_are_grouped() {
        let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        // The CPU updates tensor by tensor: there is no launch to save.
        assert!(!group_applies(&t, &t, &t, &t, &Device::Cpu));
    }
}
