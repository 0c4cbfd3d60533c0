//! `sum += t` where `sum` lies, for the residual stream's additions inside a decoder layer node.
//!
//! candle's add allocates its result and runs on candle's own worker pool, not on the trainer's
//! rayon pool: on a small machine that pool's threads spin after each add while the trainer's
//! threads start the next product, so the layer's four residual additions cost more than their
//! memory traffic. Here the sum is written into the left operand, a tensor the caller has just
//! been given and holds alone, by the calling trainer's pool.

use super::float::{contiguous, task_len, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

/// Below this many elements one thread adds: handing a small sum to the pool costs more.
const SERIAL_MAX: usize = 1 << 16;

/// `sum + t`: on the CPU in f32/f64, for a contiguous `sum` and `t` of one shape, written into
/// `sum` (which is returned, so the caller must hold it alone); otherwise a new tensor from
/// candle's add. Either way the same rounding as `sum + t`.
pub(crate) fn add_in_place(sum: Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    let fits = matches!(sum.device(), Device::Cpu)
        && matches!(t.device(), Device::Cpu)
        && sum.dtype() == t.dtype()
        && sum.dims() == t.dims()
        && sum.is_contiguous()
        && t.is_contiguous()
        && matches!(
            sum.dtype(),
            candle_core::DType::F32 | candle_core::DType::F64
        );
    if !fits {
        return sum + t;
    }
    sum.inplace_op2(t, &AddInPlace)?;
    Ok(sum)
}

/// `t` added to the sum so far, if there is one ([`add_in_place`]); `t` itself otherwise: the
/// input gradient of a projection that may share its input with those before it.
pub(crate) fn add_to_sum(t: Tensor, sum: Option<Tensor>) -> candle_core::Result<Tensor> {
    match sum {
        Some(sum) => add_in_place(sum, &t),
        None => Ok(t),
    }
}

fn add<T: Float>(sum: &mut [T], t: &[T]) {
    let body = |s: &mut [T], t: &[T]| s.iter_mut().zip(t).for_each(|(s, &t)| *s += t);
    if sum.len() <= SERIAL_MAX {
        body(sum, t);
        return;
    }
    let chunk = task_len(1);
    sum.par_chunks_mut(chunk)
        .zip(t.par_chunks(chunk))
        .for_each(|(s, t)| body(s, t));
}

struct AddInPlace;

impl InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "add-in-place"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<()> {
        let name = self.name();
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("{name}: the sum is not contiguous");
        };
        if l.shape() != tl.shape() {
            candle_core::bail!("{name}: shapes {:?} and {:?} differ", l.dims(), tl.dims());
        }
        match s {
            CpuStorage::F32(v) => add(&mut v[start..end], contiguous(name, ts, tl)?),
            CpuStorage::F64(v) => add(&mut v[start..end], contiguous(name, ts, tl)?),
            other => candle_core::bail!("{name}: unsupported dtype {:?}", other.dtype()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn adds_where_the_sum_lies_with_the_rounding_of_candles_add() {
        let dev = Device::Cpu;
        for n in [5, 3 * SERIAL_MAX + 7] {
            let a = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let b = Tensor::randn(0f32, 1e-3, n, &dev).unwrap();
            let want = (&a + &b).unwrap().to_vec1::<f32>().unwrap();
            let sum = a.copy().unwrap();
            let got = add_in_place(sum.clone(), &b).unwrap();
            assert_eq!(got.to_vec1::<f32>().unwrap(), want);
            // The very tensor given, changed in place.
            assert_eq!(sum.to_vec1::<f32>().unwrap(), want);
        }
    }

    #[test]
    fn other_layouts_get_a_new_sum_and_bad_shapes_an_error() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let at = a.t().unwrap();
        let b = Tensor::ones((3, 2), DType::F32, &dev).unwrap();
        let got = add_in_place(at.clone(), &b).unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 4.0], vec![2.0, 5.0], vec![3.0, 6.0]]
        );
        assert_eq!(a.to_vec2::<f32>().unwrap()[0], vec![0.0, 1.0, 2.0]);
        assert!(add_in_place(a, &b).is_err());
    }
}
