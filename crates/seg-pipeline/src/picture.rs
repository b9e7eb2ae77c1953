//! RGB pictures for people: PNG encoding and a colour per object id.

use std::path::Path;

use ndarray::{Array2, Array3, ArrayView2};

use crate::{Error, Result};

/// A bright, well-spread colour per id (black for the background, id 0).
pub fn label_colour(id: u32) -> [u8; 3] {
    if id == 0 {
        return [0, 0, 0];
    }
    let mut x = id.wrapping_mul(0x9E37_79B9);
    x ^= x >> 15;
    x = x.wrapping_mul(0x85EB_CA6B);
    [
        64 + (x & 0xBF) as u8,
        64 + ((x >> 8) & 0xBF) as u8,
        64 + ((x >> 16) & 0xBF) as u8,
    ]
}

/// The 8-bit grey version of a float image (its range stretched to 0–255).
pub fn grey_u8(x: &Array2<f32>) -> Array2<u8> {
    let (lo, hi) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let scale = if hi > lo { 255.0 / (hi - lo) } else { 0.0 };
    x.mapv(|v| ((v - lo) * scale).round().clamp(0.0, 255.0) as u8)
}

/// An RGB image (height, width, 3) as PNG bytes.
pub fn png_bytes(rgb: &Array3<u8>) -> Result<Vec<u8>> {
    let (h, w, c) = rgb.dim();
    if c != 3 {
        return Err(Error::Chart(format!(
            "an RGB image needs 3 channels, got {c}"
        )));
    }
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let data: Vec<u8> = rgb.iter().copied().collect();
    enc.write_header()
        .and_then(|mut w| w.write_image_data(&data))
        .map_err(|e| Error::Chart(format!("PNG encoding: {e}")))?;
    Ok(bytes)
}

/// Writes an RGB image as a PNG file, atomically.
pub fn write_png(path: &Path, rgb: &Array3<u8>) -> Result<()> {
    let bytes = png_bytes(rgb)?;
    write_file(path, &bytes)
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    seg_io::atomic::write_atomically(path, |w| {
        w.write_all(bytes).map_err(|source| seg_io::Error::Io {
            path: path.to_path_buf(),
            source,
        })
    })?;
    Ok(())
}

/// Panels side by side with a white gap of `gap` pixels: grey images and label images (one
/// colour per id).
pub fn panels(items: &[Panel<'_>], gap: usize) -> Array3<u8> {
    let h = items.iter().map(|p| p.dim().0).max().unwrap_or(0);
    let width =
        items.iter().map(|p| p.dim().1).sum::<usize>() + gap * items.len().saturating_sub(1);
    let mut rgb = Array3::from_elem((h, width, 3), 255u8);
    let mut x0 = 0;
    for item in items {
        let (ph, pw) = item.dim();
        for y in 0..ph {
            for x in 0..pw {
                let c = match item {
                    Panel::Grey(v) => [v[[y, x]]; 3],
                    Panel::Labels(v) => label_colour(v[[y, x]]),
                };
                for (k, &v) in c.iter().enumerate() {
                    rgb[[y, x0 + x, k]] = v;
                }
            }
        }
        x0 += pw + gap;
    }
    rgb
}

/// One panel of [`panels`].
pub enum Panel<'a> {
    Grey(ArrayView2<'a, u8>),
    Labels(ArrayView2<'a, u32>),
}

impl Panel<'_> {
    fn dim(&self) -> (usize, usize) {
        match self {
            Panel::Grey(v) => v.dim(),
            Panel::Labels(v) => v.dim(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn panels_are_laid_out_with_gaps_and_read_back_from_png() {
        let grey = Array2::from_elem((3, 4), 100u8);
        let labels = Array2::from_shape_fn((3, 2), |(y, _)| y as u32);
        let rgb = panels(&[Panel::Grey(grey.view()), Panel::Labels(labels.view())], 1);
        assert_eq!(rgb.dim(), (3, 7, 3));
        assert_eq!(rgb[[0, 0, 0]], 100);
        assert_eq!(rgb[[0, 4, 0]], 255); // the gap
        assert_eq!([rgb[[0, 5, 0]], rgb[[0, 5, 1]], rgb[[0, 5, 2]]], [0, 0, 0]);
        assert_eq!(rgb[[2, 5, 0]], label_colour(2)[0]);
        let bytes = png_bytes(&rgb).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes))
            .read_info()
            .unwrap();
        let mut back = vec![0u8; reader.output_buffer_size()];
        let info = reader.next_frame(&mut back).unwrap();
        assert_eq!((info.width, info.height), (7, 3));
        assert_eq!(back, rgb.iter().copied().collect::<Vec<_>>());
    }
}
