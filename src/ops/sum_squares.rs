//! The sum of squares of many tensors as one f64 reduction, for the global gradient norm.
//!
//! Per tensor, candle's composed route (cast to f64, square, `sum_all`, read back) is four
//! launches and a host synchronisation, and its all-elements reduction runs in one thread
//! block: on a GPU with a few hundred gradients that cost more than the AdamW update. Here one
//! grouped launch (`ops/grouped.rs`) reduces every tensor by a fixed grid of blocks into one
//! partials buffer, one block sums the partials in a fixed order, and the caller reads one
//! number. On the CPU, where the composed route allocated an f64 copy and its square of every
//! gradient (19 ms of a 60m full-rank step), fixed chunks are summed in parallel and their sums
//! added in order. Either way results do not depend on scheduling or thread count, so a run
//! repeats exactly.

use super::widest::{widest, WideKernel};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per CPU task: fixed, so the order of the additions does not depend on the threads.
const CPU_CHUNK: usize = 1 << 16;

struct SumSquares {
    /// The tensors after the first, which is the op's input.
    rest: Vec<Tensor>,
}

/// The element range a layout covers when its elements fill it exactly, in any order (a
/// contiguous tensor, or a transposed view of one, as gradients often are).
pub(crate) fn dense_range(l: &Layout) -> Option<(usize, usize)> {
    if let Some(r) = l.contiguous_offsets() {
        return Some(r);
    }
    if l.shape().elem_count() == 0 {
        return Some((l.start_offset(), l.start_offset()));
    }
    let mut dims: Vec<(usize, usize)> = l
        .stride()
        .iter()
        .copied()
        .zip(l.dims().iter().copied())
        .filter(|&(_, d)| d > 1)
        .collect();
    dims.sort_unstable();
    let mut expected = 1;
    for (stride, dim) in dims {
        if stride != expected {
            return None;
        }
        expected *= dim;
    }
    Some((l.start_offset(), l.start_offset() + expected))
}

fn cpu_sum(s: &CpuStorage, l: &Layout) -> candle_core::Result<f64> {
    let Some((a, b)) = dense_range(l) else {
        candle_core::bail!("sum of squares: input is not dense");
    };
    Ok(match s {
        CpuStorage::F32(v) => chunked_sum(&v[a..b]),
        CpuStorage::F64(v) => chunked_sum(&v[a..b]),
        other => candle_core::bail!("sum of squares: unsupported dtype {:?}", other.dtype()),
    })
}

/// An element type whose squares the norm sums in f64.
trait Squared: Copy + Sync {
    /// `x²` in f64.
    fn squared(self) -> f64;
}

impl Squared for f32 {
    #[inline(always)]
    fn squared(self) -> f64 {
        f64::from(self) * f64::from(self)
    }
}

impl Squared for f64 {
    #[inline(always)]
    fn squared(self) -> f64 {
        self * self
    }
}

/// One chunk's sum of squares as a kernel for [`widest`].
struct ChunkSquares<'a, T>(&'a [T]);

impl<T: Squared> WideKernel for ChunkSquares<'_, T> {
    type Output = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        super::lanes::sum_map(self.0, T::squared)
    }
}

/// `sum(x²)` over `v`: each [`CPU_CHUNK`] summed in sixteen running sums
/// ([`super::lanes::sum_map`]: one chain of dependent f64 additions made the norm latency-bound,
/// 27 ms of a 60m full-rank step on 2 cores) in the CPU's widest vectors, in parallel, then the
/// chunks' sums in order.
fn chunked_sum<T: Squared>(v: &[T]) -> f64 {
    let sum = |c: &[T]| widest(ChunkSquares(c));
    if v.len() <= CPU_CHUNK {
        return sum(v);
    }
    let partials: Vec<f64> = v.par_chunks(CPU_CHUNK).map(sum).collect();
    partials.iter().sum()
}

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "sum-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut total = cpu_sum(s, l)?;
        for t in &self.rest {
            let (storage, layout) = t.storage_and_layout();
            let candle_core::Storage::Cpu(s) = &*storage else {
                candle_core::bail!("sum of squares: tensors on different devices");
            };
            total += cpu_sum(s, layout)?;
        }
        Ok((CpuStorage::F64(vec![total]), Shape::from(1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use super::grouped::Grouped;
        use candle_core::cuda_backend::cudarc::driver::DevicePtr as _;
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let guards: Vec<_> = self.rest.iter().map(|t| t.storage_and_layout()).collect();
        let mut inputs = vec![(s, l)];
        for (storage, layout) in &guards {
            let candle_core::Storage::Cuda(s) = &**storage else {
                candle_core::bail!("sum of squares: tensors on different devices");
            };
            inputs.push((s, layout));
        }
        let mut views = Vec::with_capacity(inputs.len());
        for (s, l) in inputs {
            let Some((a, b)) = dense_range(l) else {
                candle_core::bail!("sum of squares: input is not dense");
            };
            if s.dtype() != candle_core::DType::F32 {
                candle_core::bail!(
                    "sum of squares: the CUDA kernel takes f32, got {:?}",
                    s.dtype()
                );
            }
            views.push(s.as_cuda_slice::<f32>()?.slice(a..b));
        }
        // Held until the launch is queued: with cudarc's event tracking on, dropping one
        // records that the kernel read the buffer.
        let ptrs: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
        let entries: Vec<SquaresEntry> = ptrs
            .iter()
            .zip(&views)
            .map(|((x, _), v)| SquaresEntry {
                x: *x,
                n: v.len() as u64,
            })
            .collect();
        let grid = Grouped::new(entries.iter().map(|e| e.n as usize));
        let table = dev.clone_htod(&entries)?;
        let mut partials = cuda::output::<f64>(&dev, grid.blocks())?;
        for tensors in grid.launches() {
            let t = table.slice(tensors.clone());
            let mut slot = partials.slice_mut(grid.partials(&tensors));
            cuda::launch!(
                dev,
                "sum_squares_group",
                grid.config(&tensors),
                &t,
                &mut slot
            );
        }
        drop(ptrs);
        let out = dev.alloc_zeros::<f64>(1)?;
        let cfg = cuda::rows(1, 1024);
        let total = grid.blocks() as u64;
        cuda::launch!(dev, "sum_f64", cfg, &partials, &total, &out);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(1),
        ))
    }
}

/// One tensor of the grouped CUDA reduction, as `SquaresEntry` in kernels.cu: the device address
/// of its first element and its length.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct SquaresEntry {
    x: u64,
    n: u64,
}

#[cfg(feature = "cuda")]
// SAFETY: a plain `repr(C)` struct of integers, laid out as the kernel's struct.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for SquaresEntry {}

/// `sum over tensors of sum(t^2)`, accumulated in f64, as a `[1]` f64 tensor on the tensors'
/// device. f32 or f64 on the CPU, f32 on CUDA; every tensor's elements must fill their storage
/// range (contiguous or transposed views). `None` for an empty list.
pub fn sum_squares(tensors: &[Tensor]) -> candle_core::Result<Option<Tensor>> {
    let Some((first, rest)) = tensors.split_first() else {
        return Ok(None);
    };
    let first = if dense_range(first.layout()).is_some() {
        first.clone()
    } else {
        first.contiguous()?
    };
    let rest = rest
        .iter()
        .map(|t| {
            if dense_range(t.layout()).is_some() {
                Ok(t.clone())
            } else {
                t.contiguous()
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    first.apply_op1_no_bwd(&SumSquares { rest }).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn sums_squares_of_contiguous_and_transposed_tensors_in_f64() {
        let a = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, -1.5], &Device::Cpu).unwrap();
        let at = a.t().unwrap();
        assert!(at.layout().contiguous_offsets().is_none());
        let s = sum_squares(&[at, b, a.narrow(1, 1, 2).unwrap()])
            .unwrap()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // 91 + 2.5 + (4 + 9 + 25 + 36)
        assert_eq!(s, vec![91.0 + 2.5 + 74.0]);
        assert!(sum_squares(&[]).unwrap().is_none());
    }

    #[test]
    fn large_cpu_sums_match_f64_and_do_not_depend_on_the_threads() {
        // Several chunks and a partial one.
        let n = 3 * CPU_CHUNK + 1234;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let t = Tensor::from_vec(v.clone(), n, &Device::Cpu).unwrap();
        let want: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| sum_squares(std::slice::from_ref(&t)).unwrap().unwrap())
                .to_vec1::<f64>()
                .unwrap()[0]
        };
        let one = on(1);
        assert!((one - want).abs() <= 1e-12 * want, "{one} vs {want}");
        assert_eq!(one.to_bits(), on(3).to_bits());
    }

    #[test]
    fn dense_range_accepts_permutations_only() {
        let t = Tensor::zeros((3, 4, 5), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(dense_range(t.layout()), Some((0, 60)));
        let p = t.permute((2, 0, 1)).unwrap();
        assert_eq!(dense_range(p.layout()), Some((0, 60)));
        let n = t.narrow(2, 1, 3).unwrap();
        assert_eq!(dense_range(n.layout()), None);
        let empty = t.narrow(2, 0, 0).unwrap();
        assert_eq!(dense_range(empty.layout()).map(|(a, b)| b - a), Some(0));
    }
}
