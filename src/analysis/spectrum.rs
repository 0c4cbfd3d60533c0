//! The paper's rank analysis: singular values of each projection's total update
//! `W_final - W_base`, where `W_final` is the fully merged weight (every phase and the current
//! adapter) and `W_base` the weight at the switch to adapters, or another checkpoint's merged
//! weights (for full-rank runs, or to measure from a chosen step). A plain LoRA update has rank at
//! most r; ReLoRA's sum of phases can reach K r.
//!
//! The singular values come from the eigenvalues of the Gram matrix of the update (computed in
//! f64), so values below about 1e-8 of the largest are at the level of rounding and mean zero.

use super::linalg::symmetric_eigenvalues;
use crate::checkpoint::source::{is_projection, CheckpointSource};
use crate::error::{Error, Result, TensorContext};
use crate::plots::png::{tick_label, Canvas, CHAR_H, CHAR_W, PALETTE};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// Singular values at or below this fraction of the largest count as zero in ranks.
pub(crate) const RANK_TOLERANCE: f64 = 1e-2;
/// The paper's threshold for "small" singular values of an update.
pub(crate) const SMALL_SIGMA: f64 = 0.1;

/// One projection's update spectrum.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleSpectrum {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Singular values of `W_final - W_base`, descending.
    pub singular_values: Vec<f64>,
    /// The largest singular value (the update's spectral norm).
    pub sigma_max: f64,
    /// Frobenius norm of the update.
    pub frobenius: f64,
    /// `||dW||_F^2 / sigma_max^2`: a smooth count of the significant directions.
    pub stable_rank: f64,
    /// Singular values above [`RANK_TOLERANCE`] times the largest.
    pub rank: usize,
    /// Singular values below [`SMALL_SIGMA`] (the paper's histogram threshold).
    pub below_small: usize,
}

/// The spectra of one checkpoint's updates.
#[derive(Clone, Debug, Serialize)]
pub struct Spectrum {
    /// The checkpoint analysed.
    pub checkpoint: String,
    /// Its training mode (full, lora, relora).
    pub mode: String,
    /// Its optimizer step.
    pub step: u64,
    /// Its completed ReLoRA phases.
    pub phases: usize,
    /// Its adapter rank (0 when it never had adapters).
    pub lora_rank: usize,
    /// What `W_base` is: the checkpoint's own base, or another checkpoint.
    pub reference: String,
    /// One entry per projection, in model order.
    pub modules: Vec<ModuleSpectrum>,
}

/// Singular values of a matrix `[m, n]`, descending, via the eigenvalues of its smaller Gram
/// matrix in f64.
pub(crate) fn singular_values(d: &Tensor) -> Result<Vec<f64>> {
    let ctx = || "singular values".to_string();
    let d = d.to_dtype(DType::F64).with_ctx(ctx)?;
    let (m, n) = d.dims2().with_ctx(ctx)?;
    let gram = if m <= n {
        d.matmul(&d.t().with_ctx(ctx)?)
    } else {
        d.t().and_then(|t| t.matmul(&d))
    }
    .and_then(|g| g.flatten_all())
    .and_then(|g| g.to_vec1::<f64>())
    .with_ctx(ctx)?;
    let k = m.min(n);
    let mut s: Vec<f64> = symmetric_eigenvalues(gram, k)
        .into_iter()
        .map(|l| l.max(0.0).sqrt())
        .collect();
    s.sort_by(|a, b| b.total_cmp(a));
    Ok(s)
}

fn module_spectrum(module: &str, update: &Tensor) -> Result<ModuleSpectrum> {
    let (o, i) = update.dims2().with_ctx(|| module.to_string())?;
    let s = singular_values(update)?;
    let sigma_max = s.first().copied().unwrap_or(0.0);
    let fro2: f64 = s.iter().map(|x| x * x).sum();
    Ok(ModuleSpectrum {
        module: module.to_string(),
        shape: [o, i],
        sigma_max,
        frobenius: fro2.sqrt(),
        stable_rank: if sigma_max > 0.0 {
            fro2 / (sigma_max * sigma_max)
        } else {
            0.0
        },
        rank: s
            .iter()
            .filter(|&&x| x > RANK_TOLERANCE * sigma_max && x > 0.0)
            .count(),
        below_small: s.iter().filter(|&&x| x < SMALL_SIGMA).count(),
        singular_values: s,
    })
}

/// Spectra of the checkpoint `ckpt`'s updates. With `from`, `W_base` is that checkpoint's merged
/// weights and every projection is analysed; otherwise `W_base` is the checkpoint's own base
/// (its weights at the switch to adapters) and the adapted projections are analysed.
pub fn spectrum(ckpt: &Path, from: Option<&Path>) -> Result<Spectrum> {
    let src = CheckpointSource::open(ckpt)?;
    let reference = match from {
        Some(p) => {
            let r = CheckpointSource::open(p)?;
            if r.config() != src.config() {
                return Err(Error::Config(format!(
                    "{} and {} are models of different shapes",
                    ckpt.display(),
                    p.display()
                )));
            }
            Some(r)
        }
        None => {
            if !src.has_adapters() {
                return Err(Error::checkpoint(
                    ckpt,
                    "has no base weights (adapters were never attached); pass another \
                     checkpoint of the same run as the reference (--from)",
                ));
            }
            None
        }
    };
    let modules: Vec<String> = match &reference {
        Some(_) => src
            .expected()
            .iter()
            .filter(|(n, _)| is_projection(n))
            .map(|(n, _)| n.trim_end_matches(".weight").to_string())
            .collect(),
        None => src.adapted_modules().to_vec(),
    };
    let mut out = Vec::with_capacity(modules.len());
    for module in &modules {
        let name = format!("{module}.weight");
        let fin = src.weight(&name)?;
        let base = match &reference {
            Some(r) => r.weight(&name)?,
            None => src.base_weight(module)?,
        };
        let update = fin
            .to_dtype(DType::F64)
            .and_then(|f| f - base.to_dtype(DType::F64)?)
            .with_ctx(|| format!("{module} update"))?;
        out.push(module_spectrum(module, &update)?);
    }
    let m = src.manifest();
    Ok(Spectrum {
        checkpoint: ckpt.display().to_string(),
        mode: m.train.mode.to_string(),
        step: m.counters.step,
        phases: src.phase_count(),
        lora_rank: if src.has_adapters() {
            m.train.lora_rank
        } else {
            0
        },
        reference: match from {
            Some(p) => format!("merged weights of {}", p.display()),
            None => "base weights at the switch to adapters".into(),
        },
        modules: out,
    })
}

/// Summary over all modules of a run: (singular values, fraction below [`SMALL_SIGMA`], mean
/// stable rank, mean rank).
fn summary(s: &Spectrum) -> (usize, f64, f64, f64) {
    let n: usize = s.modules.iter().map(|m| m.singular_values.len()).sum();
    let small: usize = s.modules.iter().map(|m| m.below_small).sum();
    let k = s.modules.len().max(1) as f64;
    (
        n,
        small as f64 / n.max(1) as f64,
        s.modules.iter().map(|m| m.stable_rank).sum::<f64>() / k,
        s.modules.iter().map(|m| m.rank as f64).sum::<f64>() / k,
    )
}

/// A text table of one run, or two runs side by side (matched by module).
pub fn table(runs: &[Spectrum]) -> String {
    let mut out = String::new();
    for (k, s) in runs.iter().enumerate() {
        let _ = writeln!(
            out,
            "run {}: {} ({}, step {}, {} phases, rank {}); W_base = {}",
            (b'A' + k as u8) as char,
            s.checkpoint,
            s.mode,
            s.step,
            s.phases,
            s.lora_rank,
            s.reference
        );
    }
    let _ = write!(out, "\n{:<34} {:>11}", "module", "shape");
    for k in 0..runs.len() {
        let c = (b'A' + k as u8) as char;
        let _ = write!(
            out,
            " | {:>9} {:>8} {:>6} {:>7}",
            format!("{c}:sig_max"),
            "stable",
            "rank",
            "<0.1"
        );
    }
    out.push('\n');
    let Some(first) = runs.first() else {
        return out;
    };
    for m in &first.modules {
        let _ = write!(
            out,
            "{:<34} {:>11}",
            m.module.trim_start_matches("model."),
            format!("{}x{}", m.shape[0], m.shape[1])
        );
        for r in runs {
            match r.modules.iter().find(|x| x.module == m.module) {
                Some(x) => {
                    let _ = write!(
                        out,
                        " | {:>9.4} {:>8.2} {:>6} {:>7}",
                        x.sigma_max, x.stable_rank, x.rank, x.below_small
                    );
                }
                None => {
                    let _ = write!(out, " | {:>9} {:>8} {:>6} {:>7}", "-", "-", "-", "-");
                }
            }
        }
        out.push('\n');
    }
    for (k, s) in runs.iter().enumerate() {
        let (n, small, stable, rank) = summary(s);
        let _ = writeln!(
            out,
            "\nrun {}: {n} singular values, {:.1}% below {SMALL_SIGMA}; mean stable rank {stable:.2}, \
             mean rank {rank:.1} (singular values above {RANK_TOLERANCE} of the largest)",
            (b'A' + k as u8) as char,
            100.0 * small
        );
    }
    out
}

/// A short name for a checkpoint: its run directory's name for `RUN/checkpoints/step-N`,
/// otherwise its own.
fn run_name(p: &Path) -> String {
    let own = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let parent = p.parent();
    if own.starts_with("step-")
        && parent
            .and_then(|q| q.file_name())
            .is_some_and(|n| n == "checkpoints")
    {
        if let Some(run) = parent.and_then(|q| q.parent()).and_then(|r| r.file_name()) {
            return run.to_string_lossy().to_string();
        }
    }
    own
}

/// Decades shown by a logarithmic histogram, below the largest singular value.
const LOG_DECADES: f64 = 5.0;

/// Draws a histogram of every singular value of each run (bars side by side per bin) and saves
/// it as PNG. With `log_x` the bins are even in log10 over the five decades below the largest
/// value (smaller values count in the first bin), which shows the mass between 0.1 and 1 that a
/// linear axis squeezes next to zero.
pub fn histogram_png(runs: &[Spectrum], path: &Path, bins: usize, log_x: bool) -> Result<()> {
    if runs.is_empty() || runs.len() > PALETTE.len() {
        return Err(Error::Config(format!(
            "a histogram takes 1 to {} runs, not {}",
            PALETTE.len(),
            runs.len()
        )));
    }
    let bins = bins.max(1);
    let all = |s: &Spectrum| {
        s.modules
            .iter()
            .flat_map(|m| m.singular_values.iter().copied())
            .collect::<Vec<f64>>()
    };
    let values: Vec<Vec<f64>> = runs.iter().map(all).collect();
    let top = values
        .iter()
        .flatten()
        .fold(0.0f64, |a, &b| a.max(b))
        .max(f64::MIN_POSITIVE);
    let (hi, lo) = (top.log10(), top.log10() - LOG_DECADES);
    let position = |x: f64| -> f64 {
        if log_x {
            ((x.max(f64::MIN_POSITIVE).log10() - lo) / (hi - lo)).max(0.0)
        } else {
            x / top
        }
    };
    let counts: Vec<Vec<usize>> = values
        .iter()
        .map(|v| {
            let mut c = vec![0usize; bins];
            for &x in v {
                let b = (position(x) * bins as f64) as usize;
                c[b.min(bins - 1)] += 1;
            }
            c
        })
        .collect();
    let ymax = counts.iter().flatten().copied().max().unwrap_or(1).max(1);

    let (w, h) = (960usize, 540usize);
    let (left, right, topm, bottom) = (90usize, 30usize, 60usize, 70usize);
    let mut c = Canvas::new(w, h);
    let black = [0, 0, 0];
    let grey = [200, 200, 200];
    c.text(
        left,
        16,
        "SINGULAR VALUES OF W_FINAL - W_BASE (ALL PROJECTIONS)",
        black,
    );
    let (px0, px1, py0, py1) = (left, w - right, topm, h - bottom);
    // Grid and y ticks.
    for k in 0..=4 {
        let y = py1 - (py1 - py0) * k / 4;
        c.fill(px0, y, px1, y + 1, grey);
        let label = format!("{}", ymax * k / 4);
        let x = px0.saturating_sub(8 + label.len() * CHAR_W);
        c.text(x, y.saturating_sub(CHAR_H / 2), &label, black);
    }
    // Bars.
    let bw = (px1 - px0) as f64 / bins as f64;
    let per = runs.len();
    for (r, cnt) in counts.iter().enumerate() {
        for (b, &n) in cnt.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let x0 = px0 as f64 + b as f64 * bw + bw * r as f64 / per as f64;
            let x1 = x0 + bw / per as f64 - 1.0;
            let hgt = ((py1 - py0) as f64 * n as f64 / ymax as f64).max(1.0);
            c.fill(
                x0 as usize,
                py1 - hgt as usize,
                (x1 as usize).max(x0 as usize + 1),
                py1,
                PALETTE[r],
            );
        }
    }
    // Axes and x ticks (at powers of ten on a logarithmic axis).
    c.fill(px0, py1, px1, py1 + 2, black);
    c.fill(px0 - 2, py0, px0, py1 + 2, black);
    let ticks: Vec<(f64, String)> = if log_x {
        (lo.ceil() as i32..=hi.floor() as i32)
            .map(|e| ((e as f64 - lo) / (hi - lo), tick_label(10f64.powi(e))))
            .collect()
    } else {
        (0..=4)
            .map(|k| (k as f64 / 4.0, tick_label(top * k as f64 / 4.0)))
            .collect()
    };
    for (at, label) in ticks {
        let x = px0 + ((px1 - px0) as f64 * at) as usize;
        c.fill(x, py1, x + 1, py1 + 6, black);
        c.text(
            x.saturating_sub(label.len() * CHAR_W / 2),
            py1 + 10,
            &label,
            black,
        );
    }
    c.text(
        px0 + (px1 - px0) / 2 - 7 * CHAR_W,
        h - 26,
        if log_x {
            "SINGULAR VALUE (LOG)"
        } else {
            "SINGULAR VALUE"
        },
        black,
    );
    c.text(8, topm - 30, "COUNT", black);
    // Legend.
    for (r, s) in runs.iter().enumerate() {
        let y = topm + 10 + r * (CHAR_H + 8);
        let x = px1.saturating_sub(44 * CHAR_W);
        c.fill(x, y, x + CHAR_H, y + CHAR_H, PALETTE[r]);
        let name = run_name(Path::new(&s.checkpoint));
        let mut label = format!("{} STEP {} {}", s.mode, s.step, name);
        label.truncate(40);
        c.text(x + CHAR_H + 8, y, &label, black);
    }
    c.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn singular_values_of_a_known_low_rank_matrix() {
        // U diag(3, 0.5) V^T with orthonormal columns U [6, 2], V [4, 2].
        let s2 = 1.0 / 2f64.sqrt();
        let u = Tensor::new(
            &[
                [s2, 0.0],
                [s2, 0.0],
                [0.0, 0.6],
                [0.0, 0.8],
                [0.0, 0.0],
                [0.0, 0.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let v = Tensor::new(
            &[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let sig = Tensor::new(&[[3.0, 0.0], [0.0, 0.5]], &Device::Cpu).unwrap();
        let m = u.matmul(&sig).unwrap().matmul(&v.t().unwrap()).unwrap();
        let s = singular_values(&m).unwrap();
        assert_eq!(s.len(), 4);
        assert!(
            (s[0] - 3.0).abs() < 1e-12 && (s[1] - 0.5).abs() < 1e-12,
            "{s:?}"
        );
        assert!(s[2].abs() < 1e-7 && s[3].abs() < 1e-7, "{s:?}");
        let ms = module_spectrum("p", &m).unwrap();
        assert_eq!(ms.rank, 2);
        assert!((ms.stable_rank - (9.25 / 9.0)).abs() < 1e-9);
        assert_eq!(ms.below_small, 2);
        // The transposed (wide) case gives the same values.
        let st = singular_values(&m.t().unwrap()).unwrap();
        assert!((st[0] - 3.0).abs() < 1e-12 && (st[1] - 0.5).abs() < 1e-12);
    }
}
