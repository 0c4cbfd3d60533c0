//! Line charts of training curves (a metric against the step, one line a run) saved as PNG, for
//! reports such as EXPERIMENTS.md. Drawn on the same small canvas as the spectrum histograms.

use super::png::{tick_label, Canvas, CHAR_H, CHAR_W, PALETTE};
use crate::error::{Error, Result};
use std::path::Path;

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    /// The legend text.
    pub label: String,
    /// `(x, y)` points in drawing order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// Titles and the visible y range of a chart.
#[derive(Clone, Debug, Default)]
pub struct ChartText {
    /// Printed above the plot.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// Above the y axis.
    pub y_label: String,
    /// Lower end of the y axis (default: the smallest value).
    pub y_min: Option<f64>,
    /// Upper end of the y axis (default: the largest value); points above are clipped, which keeps
    /// the first steps' high loss from flattening the rest of the curve.
    pub y_max: Option<f64>,
}

/// The data range of all finite points: `(x_min, x_max, y_min, y_max)`.
fn extent(curves: &[Curve]) -> Option<(f64, f64, f64, f64)> {
    let mut it = curves
        .iter()
        .flat_map(|c| c.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let &(x, y) = it.next()?;
    Some(it.fold((x, x, y, y), |(a, b, c, d), &(x, y)| {
        (a.min(x), b.max(x), c.min(y), d.max(y))
    }))
}

/// A tick spacing of 1, 2 or 5 times a power of ten, at least `raw`.
fn round_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.max(f64::MIN_POSITIVE).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * p)
}

/// Draws `curves` as lines on one set of axes and writes the PNG to `path`.
pub fn line_chart_png(curves: &[Curve], text: &ChartText, path: &Path) -> Result<()> {
    if curves.is_empty() || curves.len() > PALETTE.len() {
        return Err(Error::Config(format!(
            "a chart takes 1 to {} curves, not {}",
            PALETTE.len(),
            curves.len()
        )));
    }
    let Some((x_lo, x_hi, data_lo, data_hi)) = extent(curves) else {
        return Err(Error::Config(format!(
            "nothing to plot for {}: no finite points",
            path.display()
        )));
    };
    let y_lo = text.y_min.unwrap_or(data_lo);
    let mut y_hi = text.y_max.unwrap_or(data_hi);
    // Also catches NaN limits, which compare false.
    if y_hi.partial_cmp(&y_lo) != Some(std::cmp::Ordering::Greater) {
        y_hi = y_lo + 1.0;
    }
    let x_hi = if x_hi > x_lo { x_hi } else { x_lo + 1.0 };

    let (w, h) = (960usize, 600usize);
    let (left, right, top, bottom) = (90usize, 30usize, 60usize, 70usize);
    let (px0, px1, py0, py1) = (left, w - right, top, h - bottom);
    let to_x = |x: f64| px0 as f64 + (x - x_lo) / (x_hi - x_lo) * (px1 - px0) as f64;
    let to_y = |y: f64| py1 as f64 - (y - y_lo) / (y_hi - y_lo) * (py1 - py0) as f64;
    let (black, grey) = ([0, 0, 0], [215, 215, 215]);

    let mut c = Canvas::new(w, h);
    c.text(left, 16, &text.title, black);
    for k in 0..=5 {
        let y = py1 - (py1 - py0) * k / 5;
        c.fill(px0, y, px1, y + 1, grey);
        let label = tick_label(y_lo + (y_hi - y_lo) * k as f64 / 5.0);
        let x = px0.saturating_sub(8 + label.len() * CHAR_W);
        c.text(x, y.saturating_sub(CHAR_H / 2), &label, black);
    }
    let step = round_step((x_hi - x_lo) / 5.0);
    let mut tx = (x_lo / step).ceil() * step;
    while tx <= x_hi {
        let x = to_x(tx) as usize;
        c.fill(x, py1, x + 1, py1 + 6, black);
        let label = tick_label(tx);
        c.text(
            x.saturating_sub(label.len() * CHAR_W / 2),
            py1 + 10,
            &label,
            black,
        );
        tx += step;
    }
    for (k, curve) in curves.iter().enumerate() {
        // Clip to the plot area by clamping y; lines leaving the top run along its edge.
        let pts: Vec<(f64, f64)> = curve
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| (to_x(x), to_y(y.clamp(y_lo, y_hi))))
            .collect();
        for pair in pts.windows(2) {
            let ((xa, ya), (xb, yb)) = (pair[0], pair[1]);
            c.line(xa, ya, xb, yb, PALETTE[k], 2);
        }
        if let [(x, y)] = pts[..] {
            c.fill(
                x as usize,
                y as usize,
                x as usize + 4,
                y as usize + 4,
                PALETTE[k],
            );
        }
    }
    c.fill(px0, py1, px1, py1 + 2, black);
    c.fill(px0 - 2, py0, px0, py1 + 2, black);
    c.text(
        px0 + (px1 - px0) / 2 - text.x_label.len() * CHAR_W / 2,
        h - 26,
        &text.x_label,
        black,
    );
    c.text(8, top - 30, &text.y_label, black);
    // Legend in the upper right corner, where falling loss curves leave room.
    let longest = curves
        .iter()
        .map(|c| c.label.len().min(32))
        .max()
        .unwrap_or(0);
    for (k, curve) in curves.iter().enumerate() {
        let y = py0 + 10 + k * (CHAR_H + 8);
        let x = px1.saturating_sub((longest + 2) * CHAR_W + CHAR_H);
        c.fill(x, y, x + CHAR_H, y + CHAR_H, PALETTE[k]);
        let mut label = curve.label.clone();
        label.truncate(32);
        c.text(x + CHAR_H + 8, y, &label, black);
    }
    c.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(round_step(300.0), 500.0);
        assert_eq!(round_step(183.4), 200.0);
        assert_eq!(round_step(0.07), 0.1);
        assert_eq!(round_step(1.0), 1.0);
    }

    #[test]
    fn extent_skips_non_finite_points() {
        let curves = vec![
            Curve {
                label: "a".into(),
                points: vec![(0.0, 5.0), (10.0, f64::NAN), (20.0, 2.0)],
            },
            Curve {
                label: "b".into(),
                points: vec![(5.0, f64::INFINITY), (30.0, 3.0)],
            },
        ];
        assert_eq!(extent(&curves), Some((0.0, 30.0, 2.0, 5.0)));
    }

    #[test]
    fn charts_are_written_and_bad_requests_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let curve = |label: &str, slope: f64| Curve {
            label: label.into(),
            points: (0..50)
                .map(|i| (i as f64, 5.0 - slope * i as f64))
                .collect(),
        };
        let text = ChartText {
            title: "EVAL LOSS".into(),
            x_label: "STEP".into(),
            y_label: "LOSS".into(),
            y_min: None,
            y_max: Some(4.0),
        };
        line_chart_png(&[curve("full", 0.05), curve("relora", 0.04)], &text, &path).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[1..4], b"PNG");

        let none = Curve {
            label: "x".into(),
            points: vec![(1.0, f64::NAN)],
        };
        assert!(line_chart_png(&[none], &text, &path).is_err());
        assert!(line_chart_png(&[], &text, &path).is_err());
        let many: Vec<Curve> = (0..9).map(|i| curve(&i.to_string(), 0.01)).collect();
        assert!(line_chart_png(&many, &text, &path).is_err());
    }
}
