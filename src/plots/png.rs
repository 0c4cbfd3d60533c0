//! A small raster canvas with a built-in 5x7 pixel font, saved as PNG (8-bit RGB, zlib through
//! `miniz_oxide`). Enough for the spectrum histograms and loss curves; not a plotting library.

use crate::error::Result;
use crate::fs::output::{Claim, OutputKind, Recognise};
use std::path::Path;

/// An RGB colour.
pub(crate) type Rgb = [u8; 3];

/// A white canvas of `width x height` pixels.
pub(crate) struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

/// Rows of a 5x7 glyph, most significant of the low 5 bits = leftmost column.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        ' ' => [0; 7],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
    }
}

/// Distinguishable colours for the series of one chart, in the order they are used.
pub(crate) const PALETTE: [Rgb; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

/// Formats an axis value compactly (at most 6 characters).
pub(crate) fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() < 1e4 && v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1e4 || v.abs() < 1e-2 {
        format!("{v:.0e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Pixel scale of text.
pub(crate) const TEXT_SCALE: usize = 2;
/// Horizontal advance of one character at [`TEXT_SCALE`].
pub(crate) const CHAR_W: usize = 6 * TEXT_SCALE;
/// Height of a line of text at [`TEXT_SCALE`].
pub(crate) const CHAR_H: usize = 7 * TEXT_SCALE;

impl Canvas {
    /// A white canvas.
    pub fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![255; width * height * 3],
        }
    }

    /// Fills the rectangle `[x0, x1) x [y0, y1)`, clipped to the canvas.
    pub fn fill(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, c: Rgb) {
        for y in y0.min(self.height)..y1.min(self.height) {
            for x in x0.min(self.width)..x1.min(self.width) {
                let i = (y * self.width + x) * 3;
                self.pixels[i..i + 3].copy_from_slice(&c);
            }
        }
    }

    /// Draws `text` with its top-left corner at `(x, y)`.
    pub fn text(&mut self, x: usize, y: usize, text: &str, c: Rgb) {
        for (k, ch) in text.chars().enumerate() {
            let rows = glyph(ch);
            let gx = x + k * CHAR_W;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let px = gx + col * TEXT_SCALE;
                        let py = y + r * TEXT_SCALE;
                        self.fill(px, py, px + TEXT_SCALE, py + TEXT_SCALE, c);
                    }
                }
            }
        }
    }

    /// Draws a straight line of `thickness` pixels from `(x0, y0)` to `(x1, y1)`; coordinates may
    /// lie off the canvas (clipped) and a line with a non-finite end is skipped.
    pub fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb, thickness: usize) {
        if ![x0, y0, x1, y1].iter().all(|v| v.is_finite()) {
            return;
        }
        // Clamp far-away ends so the step count stays bounded by the canvas size.
        let lim = |v: f64, n: usize| v.clamp(-1.0, n as f64);
        let (x0, x1) = (lim(x0, self.width), lim(x1, self.width));
        let (y0, y1) = (lim(y0, self.height), lim(y1, self.height));
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
        let t = thickness.max(1);
        let half = (t / 2) as f64;
        for k in 0..=steps {
            let f = k as f64 / steps as f64;
            let x = (x0 + (x1 - x0) * f - half).round();
            let y = (y0 + (y1 - y0) * f - half).round();
            if x + (t as f64) <= 0.0 || y + (t as f64) <= 0.0 {
                continue;
            }
            let (x, y) = (x.max(0.0) as usize, y.max(0.0) as usize);
            self.fill(x, y, x + t, y + t, c);
        }
    }

    /// Encodes the canvas as PNG bytes.
    pub(crate) fn png_bytes(&self) -> Vec<u8> {
        // Scanlines, each prefixed with filter type 0 (none).
        let stride = self.width * 3;
        let mut raw = Vec::with_capacity((stride + 1) * self.height);
        for row in self.pixels.chunks(stride.max(1)).take(self.height) {
            raw.push(0);
            raw.extend_from_slice(row);
        }
        // Flat-coloured charts compress by about two orders of magnitude, which keeps the plots
        // small enough to commit next to the documents that show them.
        let z = miniz_oxide::deflate::compress_to_vec_zlib(&raw, 6);

        let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter, no interlace
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"tEXt", SOFTWARE_TEXT);
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }

    /// Writes the canvas to `path` as PNG, replacing only an earlier chart of relora's.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fs::output::write_file_output(path, &PNG_CHART, true, &self.png_bytes())
    }
}

/// The `tEXt` chunk every chart carries: keyword `Software`, value `relora`; it is how a chart
/// relora wrote is told from any other file.
const SOFTWARE_TEXT: &[u8] = b"Software\0relora";

/// A PNG chart written by relora (recognised by its [`SOFTWARE_TEXT`] chunk).
pub(crate) const PNG_CHART: OutputKind = OutputKind {
    noun: "chart",
    dir: false,
    recognise: Recognise::Custom(recognise_chart),
};

fn recognise_chart(path: &Path) -> std::result::Result<Claim, String> {
    // Charts are small; the text chunk sits right after the header.
    let head = crate::fs::read::open_regular(path)
        .and_then(|(f, _)| crate::fs::read::read_prefix(f, path, 256))
        .map_err(|e| format!("unreadable ({e})"))?;
    let signature = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    if head.starts_with(&signature)
        && head
            .windows(SOFTWARE_TEXT.len())
            .any(|w| w == SOFTWARE_TEXT)
    {
        Ok(Claim::default())
    } else {
        Err("not a chart relora wrote".into())
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(kind);
    h.update(data);
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&h.finalize().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_structure_is_valid() {
        let mut c = Canvas::new(70_000 / 3 / 2, 3);
        c.fill(0, 0, 10, 2, [255, 0, 0]);
        c.text(0, 0, "Ab1.", [0, 0, 0]);
        let png = c.png_bytes();
        assert_eq!(&png[..8], &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        assert_eq!(&png[12..16], b"IHDR");
        // Walk the chunks and check each CRC.
        let mut at = 8;
        let mut kinds = Vec::new();
        let mut idat = Vec::new();
        while at < png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let body = &png[at + 4..at + 8 + len];
            let crc = u32::from_be_bytes(png[at + 8 + len..at + 12 + len].try_into().unwrap());
            assert_eq!(crc32fast::hash(body), crc);
            kinds.push(String::from_utf8_lossy(&body[..4]).to_string());
            if &body[..4] == b"IDAT" {
                idat.extend_from_slice(&body[4..]);
            }
            at += 12 + len;
        }
        assert_eq!(kinds, vec!["IHDR", "tEXt", "IDAT", "IEND"]);
        // The image data inflates back to filter-0 scanlines of exactly the canvas pixels.
        let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&idat).unwrap();
        let stride = c.width * 3;
        assert_eq!(raw.len(), (stride + 1) * c.height);
        for (row, line) in raw.chunks(stride + 1).enumerate() {
            assert_eq!(line[0], 0);
            assert_eq!(&line[1..], &c.pixels[row * stride..(row + 1) * stride]);
        }
        assert_eq!(&raw[1..4], &[255, 0, 0]);
    }

    #[test]
    fn lines_cover_their_end_points_and_stay_on_the_canvas() {
        let mut c = Canvas::new(20, 10);
        c.line(1.0, 1.0, 18.0, 8.0, [0, 0, 0], 1);
        let at = |c: &Canvas, x: usize, y: usize| c.pixels[(y * c.width + x) * 3];
        assert_eq!(at(&c, 1, 1), 0);
        assert_eq!(at(&c, 18, 8), 0);
        assert_eq!(at(&c, 18, 1), 255);
        // Off-canvas and non-finite coordinates are clipped, not a panic.
        c.line(-50.0, 5.0, 500.0, 5.0, [0, 0, 0], 3);
        c.line(f64::NAN, 0.0, 3.0, 3.0, [0, 0, 0], 1);
        assert_eq!(at(&c, 0, 5), 0);
        assert_eq!(at(&c, 19, 5), 0);
    }
}
