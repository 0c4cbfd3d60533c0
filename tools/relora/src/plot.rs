//! `relora plot`: training curves of several runs (from their metrics.jsonl) as one PNG chart.

use anyhow::{bail, Context, Result};
use clap::Args;
use relora::plots::curves::{line_chart_png, ChartText, Curve};
use std::path::{Path, PathBuf};

/// Arguments of `relora plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Runs to draw, each a run directory (its metrics.jsonl) or a metrics file, optionally
    /// followed by `=LABEL` for the legend (default: the directory's name).
    #[arg(required = true, value_name = "RUN[=LABEL]")]
    runs: Vec<String>,
    /// The PNG file to write.
    #[arg(long, value_name = "FILE")]
    png: PathBuf,
    /// The metric to draw: eval_loss, eval_perplexity, loss (training loss), lr, grad_norm,
    /// tokens_per_s, or any other numeric field of the metrics records.
    #[arg(long, default_value = "eval_loss")]
    key: String,
    /// Average each point with the previous N-1 (e.g. 20 for the noisy training loss).
    #[arg(long, default_value_t = 1)]
    smooth: usize,
    /// Chart title (default: the key).
    #[arg(long)]
    title: Option<String>,
    /// Lower end of the y axis.
    #[arg(long)]
    ymin: Option<f64>,
    /// Upper end of the y axis (higher points are clipped).
    #[arg(long)]
    ymax: Option<f64>,
}

/// The `(step, value)` points of `key` in a metrics file, in file order.
fn read_points(path: &Path, key: &str) -> Result<Vec<(f64, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut points = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON record", path.display(), n + 1))?;
        let (Some(step), Some(value)) = (
            record.get("step").and_then(|v| v.as_f64()),
            record.get(key).and_then(|v| v.as_f64()),
        ) else {
            continue;
        };
        points.push((step, value));
    }
    Ok(points)
}

/// Running mean over a window of `n` points (the first points average what there is).
fn smooth(points: &[(f64, f64)], n: usize) -> Vec<(f64, f64)> {
    let n = n.max(1);
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= n {
                sum -= points[i - n].1;
            }
            (x, sum / (i + 1).min(n) as f64)
        })
        .collect()
}

/// Runs `relora plot`.
pub fn run(a: PlotArgs) -> Result<()> {
    let mut curves = Vec::new();
    for spec in &a.runs {
        let (path, label) = match spec.rsplit_once('=') {
            Some((p, l)) if !l.is_empty() && !l.contains('/') => (PathBuf::from(p), l.to_string()),
            _ => (PathBuf::from(spec), String::new()),
        };
        let file = if path.is_dir() {
            path.join("metrics.jsonl")
        } else {
            path.clone()
        };
        let label = if label.is_empty() {
            let named = if path.is_dir() {
                path.as_path()
            } else {
                path.parent().unwrap_or(&path)
            };
            named
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| spec.clone())
        } else {
            label
        };
        let points = read_points(&file, &a.key)?;
        if points.is_empty() {
            bail!("{}: no records with a numeric '{}'", file.display(), a.key);
        }
        curves.push(Curve {
            label,
            points: smooth(&points, a.smooth),
        });
    }
    let title = a.title.clone().unwrap_or_else(|| a.key.clone());
    let text = ChartText {
        title,
        x_label: "STEP".into(),
        y_label: a.key.clone(),
        y_min: a.ymin,
        y_max: a.ymax,
    };
    line_chart_png(&curves, &text, &a.png)?;
    eprintln!("wrote {}", a.png.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_a_trailing_mean() {
        let p: Vec<(f64, f64)> = [1.0, 3.0, 5.0, 7.0]
            .iter()
            .enumerate()
            .map(|(i, &y)| (i as f64, y))
            .collect();
        let s = smooth(&p, 2);
        assert_eq!(s, vec![(0.0, 1.0), (1.0, 2.0), (2.0, 4.0), (3.0, 6.0)]);
        assert_eq!(smooth(&p, 1), p);
    }
}
