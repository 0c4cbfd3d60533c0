//! The CUDA kernels of `src/ops/kernels.cu`, run on the CPU by an emulator and checked against
//! the CPU kernels of the same ops (or, where no op exposes a kernel alone, a float64
//! computation).
//!
//! The GPU tests (tests/cuda.rs) need a GPU, which most machines that run this suite lack, so
//! without these a kernel would go untested from the session that writes it to the next GPU
//! run. `tests/kernel-emulator/emulator.cpp` compiles kernels.cu as C++: each CUDA thread is a
//! fiber, barriers and warp shuffles are honoured, and every buffer is fenced by inaccessible
//! pages. The tests launch each kernel with the arguments and the grid that `src/ops` gives it,
//! and again with a small grid and small blocks, so that every grid-stride and block-stride
//! loop turns more than once. Outputs start as NaN, so an element that a kernel forgets to write
//! fails the comparison.
//!
//! Not covered here: cuBLAS (the widening matmul), NVRTC (scripts/check-cuda.sh compiles the
//! file with it), and the card's own arithmetic (tests/cuda.rs, on a GPU).
//! Needs a C++17 compiler: `g++`, or the one `CXX` names.

use candle_core::{Device, Tensor, Var};
use relora::ops::adamw_update::{adamw_update, AdamWConstants};
use relora::ops::{
    causal_softmax, cross_entropy_rows, rms_norm_fused, rotary, sum_squares, swiglu,
};
use relora::rng::Rng;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

const KERNELS: &str = include_str!("../src/ops/kernels.cu");

/// The emulator, compiled once per test process.
fn emulator() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("relora-kernel-emulator");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        let out = Command::new(&cxx)
            .args(["-std=c++17", "-O2", "-Wall", "-Wextra", "-o"])
            .arg(&exe)
            .arg("-I")
            .arg(root.join("src/ops"))
            .arg(root.join("tests/kernel-emulator/emulator.cpp"))
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "this test needs a C++17 compiler `{cxx}` (Debian: apt-get install g++): {e}"
                )
            });
        assert!(
            out.status.success(),
            "the kernel emulator does not compile:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
}

/// A kernel argument: a buffer (from its start, or from a byte offset) or a scalar.
#[derive(Clone, Copy, Debug)]
enum Arg {
    Buf(usize),
    At(usize, usize),
    I32(i32),
    U64(u64),
    F32(f32),
}

/// One run of the emulator: buffers, the addresses to write into them, and launches in order.
#[derive(Default)]
struct Request {
    header: String,
    data: Vec<u8>,
    lens: Vec<usize>,
}

impl Request {
    fn bytes(&mut self, b: &[u8]) -> usize {
        self.header += &format!("buffer {}\n", b.len());
        self.data.extend_from_slice(b);
        self.lens.push(b.len());
        self.lens.len() - 1
    }

    fn f32s(&mut self, v: &[f32]) -> usize {
        self.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
    }

    fn u32s(&mut self, v: &[u32]) -> usize {
        self.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
    }

    fn bf16s(&mut self, v: &[half::bf16]) -> usize {
        self.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
    }

    /// A buffer of `len` bytes, all ones: NaN read as f32, f64 or bf16, as an uninitialised
    /// device allocation should be treated.
    fn output(&mut self, len: usize) -> usize {
        self.bytes(&vec![0xff; len])
    }

    /// Writes the address of byte `offset` of buffer `target` at byte `pos` of buffer `buf`.
    fn address(&mut self, buf: usize, pos: usize, target: usize, offset: usize) {
        self.header += &format!("reloc {buf} {pos} {target} {offset}\n");
    }

    fn launch(&mut self, name: &str, (grid, block): Geometry, args: &[Arg]) {
        let (gx, gy) = grid;
        self.header += &format!("launch {name} {gx} {gy} 1 {block} 1 1\n");
        for a in args {
            self.header += &match *a {
                Arg::Buf(i) => format!("arg buf {i} 0\n"),
                Arg::At(i, off) => format!("arg buf {i} {off}\n"),
                Arg::I32(v) => format!("arg i32 {v}\n"),
                Arg::U64(v) => format!("arg u64 {v}\n"),
                Arg::F32(v) => format!("arg f32 {:x}\n", v.to_bits()),
            };
        }
    }

    /// Runs the launches; every buffer's bytes afterwards, or the emulator's complaint.
    fn try_run(self) -> Result<Vec<Vec<u8>>, String> {
        static RUN: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "kernel-emulator-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (req, resp) = (dir.join("request"), dir.join("response"));
        let mut body = self.header.into_bytes();
        body.extend_from_slice(b"data\n");
        body.extend_from_slice(&self.data);
        std::fs::write(&req, body).unwrap();
        let out = Command::new(emulator())
            .arg(&req)
            .arg(&resp)
            .output()
            .unwrap();
        let result = if out.status.success() {
            let all = std::fs::read(&resp).unwrap();
            let mut at = 0;
            Ok(self
                .lens
                .iter()
                .map(|&n| {
                    at += n;
                    all[at - n..at].to_vec()
                })
                .collect())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        };
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    fn run(self) -> Vec<Vec<u8>> {
        self.try_run().unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A launch's `(gridDim.x, gridDim.y)` and `blockDim.x`.
type Geometry = ((u32, u32), u32);

/// `cuda::elementwise(n)`: a grid-stride launch, blocks of 256, at most 65536 of them.
fn elementwise(n: usize) -> Geometry {
    ((n.div_ceil(256).clamp(1, 1 << 16) as u32, 1), 256)
}

/// `cuda::rows(blocks, width)`: one block a row, a warp multiple of up to 1024 threads.
fn rows(blocks: usize, width: usize) -> Geometry {
    (
        (blocks.max(1) as u32, 1),
        width.div_ceil(32).clamp(1, 32) as u32 * 32,
    )
}

/// `Grouped` (src/ops/grouped.rs): blocks of 256 along x, one row of blocks a tensor.
fn grouped(lens: &[usize]) -> Geometry {
    let longest = lens.iter().copied().max().unwrap_or(0);
    let per_tensor = longest.div_ceil(256 * 16).clamp(1, 256);
    ((per_tensor as u32, lens.len() as u32), 256)
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn f64s(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn bf16s(b: &[u8]) -> Vec<half::bf16> {
    b.chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `n` values drawn uniformly from `[-scale, scale]`, reproducibly.
fn noise(n: usize, scale: f64, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.uniform(-scale, scale) as f32).collect()
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

fn var(v: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&tensor(v, shape)).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Fails unless every value is finite where the reference is and within `tol` of it, relative
/// to the reference's largest magnitude.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs() as f64));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (*g as f64 - *w as f64).abs();
        assert!(
            d <= tol * scale,
            "{what}[{i}]: emulated kernel {g}, CPU {w} (tolerance {tol} of {scale})"
        );
    }
}

/// The gradients of `sum(op(inputs) * probe)` with respect to each input, on the CPU.
fn cpu_grads(inputs: &[&Var], y: &Tensor, probe: &[f32]) -> Vec<Vec<f32>> {
    let grads = (y * tensor(probe, y.dims()))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    inputs
        .iter()
        .map(|v| flat(grads.get(v.as_tensor()).unwrap()))
        .collect()
}

#[test]
fn every_kernel_of_kernels_cu_is_emulated() {
    let in_source: BTreeSet<String> = KERNELS
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .map(|s| s[..s.find('(').unwrap()].trim().to_string())
        .collect();
    assert!(in_source.len() >= 18, "{in_source:?}");
    let out = Command::new(emulator()).arg("--list").output().unwrap();
    let listed: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        listed, in_source,
        "add each new kernel to KERNELS in tests/kernel-emulator/emulator.cpp and test it here"
    );
}

/// The pieces of `text` separated by commas outside brackets.
fn top_level_items(text: &str) -> Vec<String> {
    let (mut items, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for c in text.chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut cur).trim().to_string());
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        items.push(cur.trim().to_string());
    }
    items
}

/// The text between the bracket that opens at `open` and its match.
fn bracketed(text: &str, open: usize) -> &str {
    let mut depth = 0;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[open + 1..open + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced brackets after byte {open}");
}

/// Every `launch!` in `src/` passes as many arguments as its kernel has parameters. cudarc's
/// launch builder checks nothing, so on a GPU a missing or extra argument would read garbage;
/// the emulator tests above write their own launches, so this ties them to the real ones.
#[test]
fn every_launch_in_src_passes_one_argument_per_kernel_parameter() {
    let mut params = std::collections::BTreeMap::new();
    for piece in KERNELS.split("extern \"C\" __global__ void ").skip(1) {
        let name = piece[..piece.find('(').unwrap()].trim().to_string();
        params.insert(
            name,
            top_level_items(bracketed(piece, piece.find('(').unwrap())).len(),
        );
    }
    let mut launches = 0;
    let mut stack = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (at, _) in text.match_indices("launch!(") {
                let items = top_level_items(bracketed(&text, at + "launch!".len()));
                if items.len() < 3 || !items[1].starts_with('"') {
                    continue; // the macro's own definition and documentation
                }
                let name = items[1].trim_matches('"');
                let want = params
                    .get(name)
                    .unwrap_or_else(|| panic!("{}: no kernel {name}", path.display()));
                assert_eq!(
                    items.len() - 3,
                    *want,
                    "{}: launch of {name} passes {} arguments for {want} parameters",
                    path.display(),
                    items.len() - 3
                );
                launches += 1;
            }
        }
    }
    assert!(launches >= 19, "found only {launches} launches");
}

/// The emulator's own checks fire: a read past a buffer's end, a block that is not whole warps
/// where a kernel shuffles, and an argument of the wrong type all stop the run with a message,
/// and so would hide nothing.
#[test]
fn the_emulator_refuses_out_of_bounds_access_partial_warps_and_wrong_arguments() {
    let n = 100;
    let mut r = Request::default();
    let (g, u, y) = (
        r.f32s(&noise(n, 1.0, 1)),
        r.f32s(&noise(n, 1.0, 2)),
        r.output(4 * n),
    );
    let args = |len: u64| [Arg::Buf(g), Arg::Buf(u), Arg::Buf(y), Arg::U64(len)];
    r.launch("swiglu_fwd", elementwise(n + 1100), &args(n as u64 + 1100));
    let e = r.try_run().unwrap_err();
    assert!(e.contains("outside its buffers"), "{e}");

    let mut r = Request::default();
    let (x, w, y) = (r.f32s(&[1.0; 64]), r.f32s(&[1.0; 8]), r.output(4 * 64));
    let rms = [
        Arg::Buf(x),
        Arg::Buf(w),
        Arg::Buf(y),
        Arg::I32(8),
        Arg::F32(1e-5),
    ];
    r.launch("rms_fwd", ((8, 1), 48), &rms);
    let e = r.try_run().unwrap_err();
    assert!(e.contains("not whole warps"), "{e}");

    let mut r = Request::default();
    let (g, u, y) = (r.f32s(&[1.0]), r.f32s(&[1.0]), r.output(4));
    r.launch(
        "swiglu_fwd",
        elementwise(1),
        &[Arg::Buf(g), Arg::Buf(u), Arg::Buf(y), Arg::I32(1)],
    );
    let e = r.try_run().unwrap_err();
    assert!(e.contains("expected u64, got i32"), "{e}");
}

#[test]
fn swiglu_kernels_match_the_cpu_op() {
    let n = 1000;
    let (g, u, dy) = (noise(n, 4.0, 1), noise(n, 2.0, 2), noise(n, 1.0, 3));
    let (gv, uv) = (var(&g, &[n]), var(&u, &[n]));
    let y = swiglu(gv.as_tensor(), uv.as_tensor()).unwrap();
    let want = cpu_grads(&[&gv, &uv], &y, &dy);
    for geometry in [elementwise(n), ((3, 1), 64)] {
        let mut r = Request::default();
        let (bg, bu, bd) = (r.f32s(&g), r.f32s(&u), r.f32s(&dy));
        let (by, bo) = (r.output(4 * n), r.output(8 * n));
        let len = Arg::U64(n as u64);
        r.launch(
            "swiglu_fwd",
            geometry,
            &[Arg::Buf(bg), Arg::Buf(bu), Arg::Buf(by), len],
        );
        let bwd = [Arg::Buf(bg), Arg::Buf(bu), Arg::Buf(bd), Arg::Buf(bo), len];
        r.launch("swiglu_bwd", geometry, &bwd);
        let out = r.run();
        assert_close("y", &f32s(&out[by]), &flat(&y), 1e-6);
        let both = f32s(&out[bo]);
        assert_close("dgate", &both[..n], &want[0], 1e-6);
        assert_close("dup", &both[n..], &want[1], 1e-6);
    }
}

#[test]
fn add_scaled_adds_the_scaled_product_in_place() {
    let n = 777;
    let (y, u, s) = (noise(n, 1.0, 4), noise(n, 1.0, 5), 0.37f32);
    let want: Vec<f32> = y.iter().zip(&u).map(|(a, b)| a + s * b).collect();
    for geometry in [elementwise(n), ((2, 1), 32)] {
        let mut r = Request::default();
        let (by, bu) = (r.f32s(&y), r.f32s(&u));
        let args = [Arg::Buf(by), Arg::Buf(bu), Arg::F32(s), Arg::U64(n as u64)];
        r.launch("add_scaled", geometry, &args);
        assert_close("y", &f32s(&r.run()[by]), &want, 0.0);
    }
}

/// The effective weight's scale, add and cast: every element is the f32 `w + s d` rounded to
/// the nearest bf16, ties to even, bit for bit as `half` rounds it; NaN stays NaN.
#[test]
fn add_scaled_to_bf16_rounds_each_f32_sum_to_the_nearest_bf16() {
    let (n, s) = (3001, 0.5f32);
    let mut w = noise(n, 1.0, 70);
    let mut d = noise(n, 0.01, 71);
    // Exact ties: 1 + 3/256 goes up to 1 + 4/256, 1 + 1/256 down to 1.
    (w[0], d[0], w[1], d[1]) = (1.0, 6.0 / 256.0, 1.0, 2.0 / 256.0);
    (w[2], d[2]) = (f32::NAN, 1.0);
    let want: Vec<u16> = w
        .iter()
        .zip(&d)
        .map(|(a, b)| half::bf16::from_f32(a + s * b).to_bits())
        .collect();
    for geometry in [elementwise(n), ((2, 1), 64)] {
        let mut r = Request::default();
        let (bw, bd, bo) = (r.f32s(&w), r.f32s(&d), r.output(2 * n));
        let args = [
            Arg::Buf(bw),
            Arg::Buf(bd),
            Arg::F32(s),
            Arg::Buf(bo),
            Arg::U64(n as u64),
        ];
        r.launch("add_scaled_to_bf16", geometry, &args);
        let got = bf16s(&r.run()[bo]);
        assert!(got[2].is_nan());
        for (i, (g, w)) in got.iter().zip(&want).enumerate().filter(|(i, _)| *i != 2) {
            assert_eq!(g.to_bits(), *w, "element {i}");
        }
        assert_eq!(got[0].to_f32(), 1.0 + 4.0 / 256.0);
        assert_eq!(got[1].to_f32(), 1.0);
    }
}

/// Forward, then the backward's per-block partial sums of dw reduced by `col_sum`, as
/// `rms_norm.rs` launches them: with its grids (one block a row, up to 512 blocks), with fewer
/// blocks than rows, with one warp a row, and with rows wider than a block.
#[test]
fn rms_norm_kernels_match_the_cpu_op() {
    let eps = 1e-5;
    // (rows, width, backward blocks, threads per block; 0: rows()'s)
    for (n, h, blocks, threads) in [(37, 300, 37, 0), (37, 300, 5, 32), (3, 2000, 3, 0)] {
        let (x, w, dy) = (noise(n * h, 2.0, 6), noise(h, 1.5, 7), noise(n * h, 1.0, 8));
        let (xv, wv) = (var(&x, &[n, h]), var(&w, &[h]));
        let y = rms_norm_fused(xv.as_tensor(), wv.as_tensor(), eps).unwrap();
        let want = cpu_grads(&[&xv, &wv], &y, &dy);
        let geometry = |blocks: usize| {
            let (grid, t) = rows(blocks, h);
            (grid, if threads == 0 { t } else { threads })
        };
        let mut r = Request::default();
        let (bx, bw, bd) = (r.f32s(&x), r.f32s(&w), r.f32s(&dy));
        let (by, bo) = (r.output(4 * n * h), r.output(4 * (n + 1) * h));
        let partial = r.f32s(&vec![0.0; blocks * h]);
        let (ni, hi, e) = (Arg::I32(n as i32), Arg::I32(h as i32), Arg::F32(eps as f32));
        r.launch(
            "rms_fwd",
            geometry(n),
            &[Arg::Buf(bx), Arg::Buf(bw), Arg::Buf(by), hi, e],
        );
        let bwd = [
            Arg::Buf(bx),
            Arg::Buf(bw),
            Arg::Buf(bd),
            Arg::Buf(bo),
            Arg::Buf(partial),
            ni,
            hi,
            e,
        ];
        r.launch("rms_bwd", geometry(blocks), &bwd);
        let dw = Arg::At(bo, 4 * n * h);
        let col = [Arg::Buf(partial), dw, Arg::I32(blocks as i32), hi];
        r.launch("col_sum", elementwise(h), &col);
        let out = r.run();
        let what = format!("{n}x{h}, {blocks} blocks");
        assert_close(&format!("y {what}"), &f32s(&out[by]), &flat(&y), 1e-6);
        let grads = f32s(&out[bo]);
        assert_close(&format!("dx {what}"), &grads[..n * h], &want[0], 1e-5);
        assert_close(&format!("dw {what}"), &grads[n * h..], &want[1], 1e-5);
    }
}

#[test]
fn causal_softmax_kernels_match_the_cpu_op() {
    let scale = 0.125f32;
    // Rows of 45 (two warps) and 130 (five), one warp striding, and single keys.
    for (t, threads) in [(45, 0), (130, 0), (45, 32), (1, 0)] {
        let heads = if t > 100 { 1 } else { 6 };
        let n = heads * t * t;
        let (x, dy) = (noise(n, 30.0, 9), noise(n, 1.0, 10));
        let xv = var(&x, &[1, heads, t, t]);
        let y = causal_softmax(xv.as_tensor(), scale as f64).unwrap();
        let want = cpu_grads(&[&xv], &y, &dy);
        let (grid, default) = rows(heads * t, t);
        let geometry = (grid, if threads == 0 { default } else { threads });
        let mut r = Request::default();
        let (bx, bd, by, bdx) = (r.f32s(&x), r.f32s(&dy), r.output(4 * n), r.output(4 * n));
        let (ti, s) = (Arg::I32(t as i32), Arg::F32(scale));
        let fwd = [Arg::Buf(bx), Arg::Buf(by), ti, s];
        r.launch("causal_softmax_fwd", geometry, &fwd);
        let bwd = [Arg::Buf(by), Arg::Buf(bd), Arg::Buf(bdx), ti, s];
        r.launch("causal_softmax_bwd", geometry, &bwd);
        let out = r.run();
        assert_close(&format!("y t={t}"), &f32s(&out[by]), &flat(&y), 1e-6);
        assert_close(&format!("dx t={t}"), &f32s(&out[bdx]), &want[0], 1e-5);
    }
}

/// The bf16 softmax: each probability is the f32 CPU op's value rounded to the nearest bf16, or
/// its neighbour where the two f32 computations straddle a rounding boundary; masked entries are
/// exactly zero. The backward matches a float64 computation on the same bf16 values to bf16
/// rounding.
#[test]
fn bf16_causal_softmax_kernels_round_the_f32_results() {
    let (t, heads, scale) = (70, 3, 0.125f32);
    let n = heads * t * t;
    let x: Vec<half::bf16> = noise(n, 30.0, 11)
        .iter()
        .map(|&v| half::bf16::from_f32(v))
        .collect();
    let dy: Vec<half::bf16> = noise(n, 1.0, 12)
        .iter()
        .map(|&v| half::bf16::from_f32(v))
        .collect();
    let widened: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let y32 = flat(&causal_softmax(&tensor(&widened, &[1, heads, t, t]), scale as f64).unwrap());
    let mut r = Request::default();
    let (bx, bd, by, bdx) = (r.bf16s(&x), r.bf16s(&dy), r.output(2 * n), r.output(2 * n));
    let (ti, s) = (Arg::I32(t as i32), Arg::F32(scale));
    let geometry = rows(heads * t, t);
    r.launch(
        "causal_softmax_fwd_bf16",
        geometry,
        &[Arg::Buf(bx), Arg::Buf(by), ti, s],
    );
    let bwd = [Arg::Buf(by), Arg::Buf(bd), Arg::Buf(bdx), ti, s];
    r.launch("causal_softmax_bwd_bf16", geometry, &bwd);
    let out = r.run();
    let y = bf16s(&out[by]);
    for (i, (got, want)) in y.iter().zip(&y32).enumerate() {
        let (row, col) = (i / t, i % t);
        if col > row % t {
            assert_eq!(got.to_bits(), 0, "masked entry {i}");
            continue;
        }
        let nearest = half::bf16::from_f32(*want).to_bits() as i32;
        assert!(
            (got.to_bits() as i32 - nearest).abs() <= 1,
            "y[{i}]: {got} against the f32 {want}"
        );
    }
    let dx = bf16s(&out[bdx]);
    for row in 0..heads * t {
        let span = row * t..(row + 1) * t;
        let (yr, dr) = (&y[span.clone()], &dy[span.clone()]);
        let dot: f64 = yr
            .iter()
            .zip(dr)
            .map(|(a, b)| a.to_f64() * b.to_f64())
            .sum();
        let want: Vec<f64> = yr
            .iter()
            .zip(dr)
            .map(|(a, b)| scale as f64 * a.to_f64() * (b.to_f64() - dot))
            .collect();
        let largest = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (j, w) in want.iter().enumerate() {
            let got = dx[span.start + j].to_f64();
            assert!(
                (got - w).abs() <= w.abs() / 256.0 + 1e-5 * largest,
                "dx[{row}, {j}]: {got} against {w}"
            );
        }
    }
}

/// The bf16 kernels round ties to even: with scores that give exact probabilities (1, and 1/2,
/// 1/2), the backward's values fall exactly halfway between two bf16 numbers, 1 + 3/256 between
/// 1 + 2/256 and 1 + 4/256, and must land on the even one, 1 + 4/256, in either sign.
#[test]
fn bf16_kernels_round_halfway_values_to_even() {
    let bf = |v: f32| half::bf16::from_f32(v);
    let x = [bf(0.0); 4];
    let dy = [bf(0.3), bf(-0.7), bf(1.0), bf(-3.0 / 256.0)];
    let mut r = Request::default();
    let (bx, bd, by, bdx) = (r.bf16s(&x), r.bf16s(&dy), r.output(8), r.output(8));
    let (ti, s) = (Arg::I32(2), Arg::F32(4.0));
    let fwd = [Arg::Buf(bx), Arg::Buf(by), ti, Arg::F32(1.0)];
    r.launch("causal_softmax_fwd_bf16", rows(2, 2), &fwd);
    let bwd = [Arg::Buf(by), Arg::Buf(bd), Arg::Buf(bdx), ti, s];
    r.launch("causal_softmax_bwd_bf16", rows(2, 2), &bwd);
    let out = r.run();
    let y: Vec<f32> = bf16s(&out[by]).iter().map(|v| v.to_f32()).collect();
    assert_eq!(y, [1.0, 0.0, 0.5, 0.5]);
    let dx: Vec<f32> = bf16s(&out[bdx]).iter().map(|v| v.to_f32()).collect();
    let even = 1.0 + 4.0 / 256.0;
    assert_eq!(dx, [0.0, 0.0, even, -even]);
}

/// Loss and log-sum-exp rows, then the logits' gradient from each row's dloss, against the CPU
/// op; a target outside the vocabulary gives a NaN loss instead of an out-of-bounds read.
#[test]
fn cross_entropy_kernels_match_the_cpu_op() {
    for (n, vocab) in [(20, 1000), (9, 50), (3, 5000)] {
        let x = noise(n * vocab, 8.0, 13);
        let mut rng = Rng::new(14);
        let targets: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
        let dloss = noise(n, 1.0, 15);
        let xv = var(&x, &[n, vocab]);
        let t = Tensor::from_slice(&targets, n, &Device::Cpu).unwrap();
        let loss = cross_entropy_rows(xv.as_tensor(), &t).unwrap();
        let want = cpu_grads(&[&xv], &loss, &dloss);
        let lse: Vec<f32> = x
            .chunks(vocab)
            .map(|row| {
                let m = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
                (m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()) as f32
            })
            .collect();

        // One more row whose target is the vocabulary size.
        let mut bad_targets = targets.clone();
        bad_targets.push(vocab as u32);
        let mut x_plus = x.clone();
        x_plus.extend(noise(vocab, 1.0, 16));
        let rows_n = n + 1;
        let mut r = Request::default();
        let (bx, bt, bo) = (r.f32s(&x_plus), r.u32s(&bad_targets), r.output(8 * rows_n));
        let (vi, ri) = (Arg::I32(vocab as i32), Arg::U64(rows_n as u64));
        let fwd = [Arg::Buf(bx), Arg::Buf(bt), Arg::Buf(bo), vi, ri];
        r.launch("cross_entropy_fwd", rows(rows_n, vocab), &fwd);
        let both = f32s(&r.run()[bo]);
        let what = format!("{n}x{vocab}");
        assert_close(&format!("loss {what}"), &both[..n], &flat(&loss), 1e-6);
        assert!(
            both[n].is_nan(),
            "the out-of-range target's loss: {}",
            both[n]
        );
        assert_close(&format!("lse {what}"), &both[rows_n..2 * n + 1], &lse, 1e-6);

        let mut r = Request::default();
        let (bx, bt) = (r.f32s(&x), r.u32s(&targets));
        let dl = r.f32s(&[dloss.as_slice(), &both[rows_n..2 * n + 1]].concat());
        let bdx = r.output(4 * n * vocab);
        let (vi, ni) = (Arg::I32(vocab as i32), Arg::U64(n as u64));
        let bwd = [
            Arg::Buf(bx),
            Arg::Buf(bt),
            Arg::Buf(dl),
            Arg::Buf(bdx),
            vi,
            ni,
        ];
        r.launch("cross_entropy_bwd", rows(n, vocab), &bwd);
        let dx = f32s(&r.run()[bdx]);
        assert_close(&format!("dlogits {what}"), &dx, &want[0], 1e-6);
    }
}

#[test]
fn rotary_kernel_and_its_inverse_match_the_cpu_op() {
    let (heads, t, d, positions) = (3, 11, 16, 14);
    let half_d = d / 2;
    let (mut cos, mut sin) = (vec![0f32; positions * d], vec![0f32; positions * d]);
    for p in 0..positions {
        for j in 0..half_d {
            let angle = p as f64 * 10_000f64.powf(-2.0 * j as f64 / d as f64);
            for k in [j, j + half_d] {
                cos[p * d + k] = angle.cos() as f32;
                sin[p * d + k] = angle.sin() as f32;
            }
        }
    }
    let n = 2 * heads * t * d;
    let (x, dy) = (noise(n, 1.0, 17), noise(n, 1.0, 18));
    let xv = var(&x, &[2, heads, t, d]);
    let y = rotary(
        xv.as_tensor(),
        &tensor(&cos, &[positions, d]),
        &tensor(&sin, &[positions, d]),
    )
    .unwrap();
    let want = cpu_grads(&[&xv], &y, &dy);
    for geometry in [elementwise(n / 2), ((2, 1), 32)] {
        let mut r = Request::default();
        let (bx, bd, bc, bs) = (r.f32s(&x), r.f32s(&dy), r.f32s(&cos), r.f32s(&sin));
        let (by, bdx) = (r.output(4 * n), r.output(4 * n));
        for (input, output, inverse) in [(bx, by, 0), (bd, bdx, 1)] {
            let args = [
                Arg::Buf(input),
                Arg::Buf(bc),
                Arg::Buf(bs),
                Arg::Buf(output),
                Arg::I32(t as i32),
                Arg::I32(d as i32),
                Arg::I32(inverse),
                Arg::U64(n as u64 / 2),
            ];
            r.launch("rotary", geometry, &args);
        }
        let out = r.run();
        assert_close("y", &f32s(&out[by]), &flat(&y), 1e-6);
        assert_close("dx", &f32s(&out[bdx]), &want[0], 1e-6);
    }
}

fn constants(t: i32, lr: f64, decay: Option<f64>) -> AdamWConstants {
    AdamWConstants {
        beta1: 0.9,
        beta2: 0.95,
        inv_sqrt_bc2: 1.0 / (1.0 - 0.95f64.powi(t)).sqrt(),
        eps: 1e-8,
        step_size: lr / (1.0 - 0.9f64.powi(t)),
        decay: decay.map(|wd| 1.0 - lr * wd),
        grad_scale: 0.6,
    }
}

/// One tensor's AdamW state, and the CPU op's update of it.
struct AdamWCase {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    k: AdamWConstants,
    want: [Vec<f32>; 3],
}

fn adamw_case(n: usize, k: AdamWConstants, seed: u64) -> AdamWCase {
    let (p, g) = (noise(n, 1.0, seed), noise(n, 0.1, seed + 1));
    let m = noise(n, 0.01, seed + 2);
    let v: Vec<f32> = noise(n, 0.01, seed + 3).iter().map(|a| a * a).collect();
    let pv = var(&p, &[n]);
    let (m2, v2) = adamw_update(
        pv.as_tensor(),
        &tensor(&g, &[n]),
        &tensor(&m, &[n]),
        &tensor(&v, &[n]),
        k,
    )
    .unwrap();
    let want = [flat(pv.as_tensor()), flat(&m2), flat(&v2)];
    AdamWCase {
        p,
        g,
        m,
        v,
        k,
        want,
    }
}

fn shared_args(k: &AdamWConstants) -> [Arg; 5] {
    let (b1, b2) = (k.beta1 as f32, k.beta2 as f32);
    [
        Arg::F32(k.grad_scale as f32),
        Arg::F32(b1),
        Arg::F32((1.0 - k.beta1) as f32),
        Arg::F32(b2),
        Arg::F32((1.0 - k.beta2) as f32),
    ]
}

/// The per-tensor pair (`adamw_update.rs`): the new moments into a fresh `[2, n]` buffer, then
/// the parameter in place from them.
#[test]
fn per_tensor_adamw_kernels_match_the_cpu_op() {
    let n = 3000;
    for (case, geometry) in [
        (
            adamw_case(n, constants(3, 1e-3, Some(0.1)), 20),
            elementwise(n),
        ),
        (adamw_case(n, constants(1, 3e-4, None), 30), ((2, 1), 64)),
    ] {
        let k = case.k;
        let mut r = Request::default();
        let (bp, bg, bm, bv) = (
            r.f32s(&case.p),
            r.f32s(&case.g),
            r.f32s(&case.m),
            r.f32s(&case.v),
        );
        let out = r.output(8 * n);
        let len = Arg::U64(n as u64);
        let mut moments = vec![Arg::Buf(bg), Arg::Buf(bm), Arg::Buf(bv), Arg::Buf(out)];
        moments.extend(shared_args(&k));
        moments.push(len);
        r.launch("adamw_moments", geometry, &moments);
        let apply = [
            Arg::Buf(bp),
            Arg::Buf(out),
            Arg::At(out, 4 * n),
            Arg::F32(k.inv_sqrt_bc2 as f32),
            Arg::F32(k.eps as f32),
            Arg::F32(k.step_size as f32),
            Arg::F32(k.decay.unwrap_or(1.0) as f32),
            len,
        ];
        r.launch("adamw_apply", geometry, &apply);
        let res = r.run();
        let both = f32s(&res[out]);
        assert_close("parameter", &f32s(&res[bp]), &case.want[0], 1e-6);
        assert_close("exp_avg", &both[..n], &case.want[1], 1e-6);
        assert_close("exp_avg_sq", &both[n..], &case.want[2], 1e-6);
    }
}

/// The grouped update (`adamw_group.rs`): one table of addresses and per-tensor constants, the
/// moments of all members in one state buffer, updated in place, with `Grouped`'s grid and with
/// one block a tensor. Each member ends as the CPU op leaves it, with its own step size and
/// decay; an empty member is harmless.
#[test]
fn grouped_adamw_kernel_matches_the_cpu_op_per_member() {
    let lens = [5000, 7, 0, 1200];
    let cases: Vec<AdamWCase> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let decay = (i % 2 == 0).then_some(0.1);
            adamw_case(
                n,
                constants(2 + i as i32, 1e-3 * (i + 1) as f64, decay),
                40 + i as u64,
            )
        })
        .collect();
    let shared = cases[0].k;
    for geometry in [grouped(&lens), ((1, lens.len() as u32), 256)] {
        let mut r = Request::default();
        let params: Vec<usize> = cases.iter().map(|c| r.f32s(&c.p)).collect();
        let grads: Vec<usize> = cases.iter().map(|c| r.f32s(&c.g)).collect();
        // Every member's exp_avg, then every member's exp_avg_sq, back to back.
        let state_vals: Vec<f32> = cases
            .iter()
            .flat_map(|c| c.m.iter())
            .chain(cases.iter().flat_map(|c| c.v.iter()))
            .copied()
            .collect();
        let state = r.f32s(&state_vals);
        let total: usize = lens.iter().sum();
        let mut table = Vec::new();
        for (c, &n) in cases.iter().zip(&lens) {
            table.extend_from_slice(&[0u8; 32]);
            table.extend_from_slice(&(n as u64).to_le_bytes());
            let decay = c.k.decay.unwrap_or(1.0);
            for f in [c.k.step_size, c.k.inv_sqrt_bc2, decay, 0.0] {
                table.extend_from_slice(&(f as f32).to_le_bytes());
            }
        }
        let tb = r.bytes(&table);
        let mut at = 0;
        for (i, &n) in lens.iter().enumerate() {
            let entry = 56 * i;
            r.address(tb, entry, params[i], 0);
            r.address(tb, entry + 8, grads[i], 0);
            r.address(tb, entry + 16, state, 4 * at);
            r.address(tb, entry + 24, state, 4 * (total + at));
            at += n;
        }
        let mut args = vec![Arg::Buf(tb)];
        args.extend(shared_args(&shared));
        args.push(Arg::F32(shared.eps as f32));
        r.launch("adamw_group", geometry, &args);
        let out = r.run();
        let state_out = f32s(&out[state]);
        let mut at = 0;
        for (i, (c, &n)) in cases.iter().zip(&lens).enumerate() {
            let what = |s: &str| format!("member {i} ({n}): {s}");
            assert_close(&what("parameter"), &f32s(&out[params[i]]), &c.want[0], 1e-6);
            let (m, v) = (
                &state_out[at..at + n],
                &state_out[total + at..total + at + n],
            );
            assert_close(&what("exp_avg"), m, &c.want[1], 1e-6);
            assert_close(&what("exp_avg_sq"), v, &c.want[2], 1e-6);
            at += n;
        }
    }
}

/// The gradient norm's reduction (`sum_squares.rs`): per-block partial sums of every tensor in
/// one grouped launch, then one block sums the partials, in f64.
#[test]
fn grouped_sum_of_squares_matches_the_cpu_op() {
    let lens = [5000, 3, 0, 70_000];
    let values: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| noise(n, 1.0 + i as f64, 50 + i as u64))
        .collect();
    let tensors: Vec<Tensor> = values.iter().map(|v| tensor(v, &[v.len()])).collect();
    let want = sum_squares(&tensors)
        .unwrap()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    for geometry in [grouped(&lens), ((3, lens.len() as u32), 256)] {
        let blocks = (geometry.0 .0 * geometry.0 .1) as usize;
        let mut r = Request::default();
        let bufs: Vec<usize> = values.iter().map(|v| r.f32s(v)).collect();
        let mut table = Vec::new();
        for &n in &lens {
            table.extend_from_slice(&[0u8; 8]);
            table.extend_from_slice(&(n as u64).to_le_bytes());
        }
        let tb = r.bytes(&table);
        for (i, &b) in bufs.iter().enumerate() {
            r.address(tb, 16 * i, b, 0);
        }
        let partials = r.output(8 * blocks);
        let total = r.bytes(&[0u8; 8]);
        r.launch(
            "sum_squares_group",
            geometry,
            &[Arg::Buf(tb), Arg::Buf(partials)],
        );
        r.launch(
            "sum_f64",
            rows(1, 1024),
            &[Arg::Buf(partials), Arg::U64(blocks as u64), Arg::Buf(total)],
        );
        let got = f64s(&r.run()[total])[0];
        assert!(
            (got - want).abs() <= 1e-12 * want,
            "sum of squares {got}, CPU {want}"
        );
    }
}
