//! `W + s B A` in one pass over `W`, for the effective weight of an adapted projection on the CPU.
//!
//! As a gemm this is a product with an inner dimension of only `r` (32 to 128) added to a copy of
//! `W`: the copy is a pass over `[out, in]`, the gemm reads and writes that copy again, and with
//! so short an inner dimension its packing and its passes over the result cost as much as the
//! multiply-adds (measured: `B A` at 85-115 GFLOP/s at rank 32, and the build 32 ms of a 60m
//! adapter-phase step). Here each tile of 4 rows by 64 columns keeps its sums in registers over
//! all `r` terms while the tile's columns of `A` stay in L1, and `W` is read and the result
//! written once.
//!
//! Every element is `fma(s, sum, w)` with `sum` the fused multiply-adds of `b[i, k] a[k, j]` in
//! order of `k` from zero: the same bits whichever tile or remainder path computes it, and on
//! every CPU that runs it (AVX-512F, or AVX2 with FMA). Other CPUs get `None`, and the caller's
//! gemm.

use super::widest::{fma_vectors, widest_fma, WideKernel};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows of a register tile.
const TILE_ROWS: usize = 4;
/// Columns of a register tile: four 16-lane vectors.
const TILE_COLS: usize = 64;
/// Rows per parallel task: tiles that reuse one column tile of `A` from L1.
const TASK_ROWS: usize = 16;

/// `w + s b a` for `w [out, k]`, `b [out, r]`, `a [r, k]` (row-major f32), or `None` on a CPU
/// without fused multiply-add vectors.
///
/// # Panics
/// If the buffers' lengths do not match the shapes (the caller checks them).
pub(crate) fn low_rank_sum(
    w: &[f32],
    b: &[f32],
    a: &[f32],
    (out, k, r): (usize, usize, usize),
    s: f32,
) -> Option<Vec<f32>> {
    assert!(
        w.len() == out * k && b.len() == out * r && a.len() == r * k,
        "low-rank sum: buffers do not fit the shapes"
    );
    if !fma_vectors() {
        return None;
    }
    let n = out * k;
    if n == 0 || r == 0 {
        // Nothing to add (and no rows of B to hand the tasks).
        return Some(w.to_vec());
    }
    let mut dst: Vec<f32> = Vec::with_capacity(n);
    let done = dst.spare_capacity_mut()[..n]
        .par_chunks_mut(TASK_ROWS * k)
        .zip(w.par_chunks(TASK_ROWS * k))
        .zip(b.par_chunks(TASK_ROWS * r))
        .map(|((dst, w), b)| {
            let rows = Rows {
                dst,
                w,
                b,
                a,
                k,
                r,
                s,
            };
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (which implies FMA).
                unsafe { rows_avx512(rows) };
                return true;
            }
            widest_fma(rows).is_some()
        })
        .reduce(|| true, |x, y| x && y);
    if !done {
        return None;
    }
    // SAFETY: the tasks cover all n elements (chunks of whole rows of k over w's n, zipped with
    // as many chunks of whole rows of r over b's out * r), and each task ran (`done`) and wrote
    // every element of its rows (see `Rows::run`).
    unsafe { dst.set_len(n) };
    Some(dst)
}

/// One task's rows: `dst = w + s b a` over them.
struct Rows<'a> {
    dst: &'a mut [MaybeUninit<f32>],
    w: &'a [f32],
    b: &'a [f32],
    a: &'a [f32],
    k: usize,
    r: usize,
    s: f32,
}

impl WideKernel for Rows<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        self.each_tile(Portable)
    }
}

/// [`Rows`] with AVX-512 tiles whose sums are sixteen vector registers (the portable tile's
/// sums, compiled, went through the stack on every term).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn rows_avx512(rows: Rows<'_>) {
    rows.each_tile(Avx512)
}

/// How a tile of rows `i..i + 4` and columns `j..j + 64` is computed.
trait Tile {
    /// `dst = w + s b a` over the tile.
    fn tile(&self, rows: &mut Rows<'_>, at: (usize, usize));
}

/// Portable code the compiler vectorises.
struct Portable;

impl Tile for Portable {
    #[inline(always)]
    fn tile(&self, rows: &mut Rows<'_>, at: (usize, usize)) {
        let Rows {
            w, b, a, k, r, s, ..
        } = *rows;
        tile(rows.dst, w, b, a, at, (k, r), s)
    }
}

/// AVX-512 intrinsics (the caller runs with AVX-512F enabled).
#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Tile for Avx512 {
    #[inline(always)]
    fn tile(&self, rows: &mut Rows<'_>, (i, j): (usize, usize)) {
        use std::arch::x86_64::*;
        let (k, r) = (rows.k, rows.r);
        // Every offset below stays inside its buffer: the tile's rows i..i + 4 and columns
        // j..j + 64 lie inside the task's rows of dst and w ([rows, k]) and b ([rows, r]),
        // and a is [r, k] (checked by `low_rank_sum` and `each_tile`).
        assert!(
            (i + TILE_ROWS) * k <= rows.w.len()
                && j + TILE_COLS <= k
                && (i + TILE_ROWS) * r <= rows.b.len()
                && r * k <= rows.a.len()
                && rows.dst.len() == rows.w.len(),
            "low-rank sum: tile outside its rows"
        );
        let (a, b) = (rows.a.as_ptr(), rows.b.as_ptr());
        // SAFETY: the loads and stores read and write inside the buffers (asserted above); the
        // function runs only where AVX-512F is enabled (`rows_avx512`).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; TILE_ROWS];
            for kk in 0..r {
                let ap = a.add(kk * k + j);
                let av = [
                    _mm512_loadu_ps(ap),
                    _mm512_loadu_ps(ap.add(16)),
                    _mm512_loadu_ps(ap.add(32)),
                    _mm512_loadu_ps(ap.add(48)),
                ];
                for (q, acc) in acc.iter_mut().enumerate() {
                    let bq = _mm512_set1_ps(*b.add((i + q) * r + kk));
                    for (acc, &av) in acc.iter_mut().zip(&av) {
                        *acc = _mm512_fmadd_ps(bq, av, *acc);
                    }
                }
            }
            let sv = _mm512_set1_ps(rows.s);
            let (w, dst) = (rows.w.as_ptr(), rows.dst.as_mut_ptr() as *mut f32);
            for (q, acc) in acc.iter().enumerate() {
                for (c, &acc) in acc.iter().enumerate() {
                    let at = (i + q) * k + j + 16 * c;
                    let wv = _mm512_loadu_ps(w.add(at));
                    _mm512_storeu_ps(dst.add(at), _mm512_fmadd_ps(sv, acc, wv));
                }
            }
        }
    }
}

impl Rows<'_> {
    /// Every element of the rows: whole tiles by `kind`, the remainders element by element.
    #[inline(always)]
    fn each_tile(mut self, kind: impl Tile) {
        let (k, r, s) = (self.k, self.r, self.s);
        let rows = self.w.len() / k;
        let whole_rows = rows - rows % TILE_ROWS;
        let whole_cols = k - k % TILE_COLS;
        // Column tiles outside, so each tile of `a` serves every row of the task from L1.
        for j in (0..whole_cols).step_by(TILE_COLS) {
            for i in (0..whole_rows).step_by(TILE_ROWS) {
                kind.tile(&mut self, (i, j));
            }
        }
        // The rows after the whole tiles, and the columns after them in every row.
        let Rows { dst, w, b, a, .. } = self;
        for i in 0..rows {
            let cols = if i < whole_rows { whole_cols..k } else { 0..k };
            for j in cols {
                let mut sum = 0f32;
                for kk in 0..r {
                    sum = b[i * r + kk].mul_add(a[kk * k + j], sum);
                }
                dst[i * k + j].write(s.mul_add(sum, w[i * k + j]));
            }
        }
    }
}

/// The tile of rows `i..i + 4` and columns `j..j + 64`, its sums in registers.
#[inline(always)]
fn tile(
    dst: &mut [MaybeUninit<f32>],
    w: &[f32],
    b: &[f32],
    a: &[f32],
    (i, j): (usize, usize),
    (k, r): (usize, usize),
    s: f32,
) {
    let mut sum = [[0f32; TILE_COLS]; TILE_ROWS];
    // Iterators, not indices: no bounds check in the loop keeps the sums out of registers.
    let b_row = |q: usize| &b[(i + q) * r..(i + q + 1) * r];
    let bs = b_row(0)
        .iter()
        .zip(b_row(1))
        .zip(b_row(2).iter().zip(b_row(3)));
    for (a_row, ((&b0, &b1), (&b2, &b3))) in a.chunks_exact(k).zip(bs) {
        let a_tile: &[f32; TILE_COLS] = a_row[j..j + TILE_COLS]
            .try_into()
            .expect("a tile of 64 columns");
        for (sum, bq) in sum.iter_mut().zip([b0, b1, b2, b3]) {
            for (acc, &av) in sum.iter_mut().zip(a_tile) {
                *acc = bq.mul_add(av, *acc);
            }
        }
    }
    for (q, sum) in sum.iter().enumerate() {
        let at = (i + q) * k + j;
        let (d, w) = (&mut dst[at..at + TILE_COLS], &w[at..at + TILE_COLS]);
        for ((d, &w), &acc) in d.iter_mut().zip(w).zip(sum) {
            d.write(s.mul_add(acc, w));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an f64 sum, for shapes with and without whole tiles and remainders of rows and
    /// columns, a rank of one, and an empty result; and tile and remainder paths agree to the
    /// bit (the same element computed as part of a tile or of a remainder).
    #[test]
    fn equals_w_plus_s_b_a_and_paths_agree() {
        let value = |i: usize, m: usize| ((i * m % 23) as f32 - 11.0) / 7.0;
        for (out, k, r) in [
            (37, 131, 8),
            (16, 128, 32),
            (5, 3, 1),
            (64, 64, 128),
            (0, 8, 2),
        ] {
            let w: Vec<f32> = (0..out * k).map(|i| value(i, 5)).collect();
            let b: Vec<f32> = (0..out * r).map(|i| value(i, 7)).collect();
            let a: Vec<f32> = (0..r * k).map(|i| value(i, 3)).collect();
            let s = 0.375f32;
            let Some(got) = low_rank_sum(&w, &b, &a, (out, k, r), s) else {
                return; // A CPU without fused multiply-add vectors: the caller's gemm runs.
            };
            assert_eq!(got.len(), out * k);
            // The portable tiles (what an AVX2 CPU runs), over all rows as one task.
            let mut portable = vec![MaybeUninit::new(f32::NAN); out * k];
            if r > 0 && out * k > 0 {
                let rows = Rows {
                    dst: &mut portable,
                    w: &w,
                    b: &b,
                    a: &a,
                    k,
                    r,
                    s,
                };
                assert!(widest_fma(rows).is_some());
            }
            for i in 0..out {
                for j in 0..k {
                    let mut want = 0f64;
                    let mut sum = 0f32;
                    for kk in 0..r {
                        want += f64::from(b[i * r + kk]) * f64::from(a[kk * k + j]);
                        sum = b[i * r + kk].mul_add(a[kk * k + j], sum);
                    }
                    let want = f64::from(w[i * k + j]) + f64::from(s) * want;
                    let g = f64::from(got[i * k + j]);
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{out}x{k} r{r}"
                    );
                    // The scalar order of operations, to the bit.
                    assert_eq!(
                        got[i * k + j].to_bits(),
                        s.mul_add(sum, w[i * k + j]).to_bits()
                    );
                }
            }
        }
    }
}
