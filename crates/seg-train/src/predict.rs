//! Prediction on whole images (reflect padding to the model's multiple) and in tiles with a
//! halo (torch-em's `predict_with_halo`: reflect padding at the image border, each window
//! standardised on its own, only the central block kept).

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{s, Array2, Array3, ArrayView2};
use vim_nets::Model;

use crate::{Error, Result};

/// numpy's `reflect` index (the edge is not repeated) for any integer position.
pub fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// The window `[y0, y0 + h) × [x0, x0 + w)` of `image`, reflected where it leaves the image.
pub fn reflect_window(
    image: ArrayView2<f32>,
    y0: isize,
    x0: isize,
    h: usize,
    w: usize,
) -> Array2<f32> {
    reflect_window_in(image, (0, 0), image.dim(), y0, x0, h, w)
}

/// [`reflect_window`] of an image of `size` of which only the box starting at `origin` is at
/// hand (`part`): the box must hold [`reflected_range`] of the window's rows and columns.
pub fn reflect_window_in(
    part: ArrayView2<f32>,
    origin: (usize, usize),
    size: (usize, usize),
    y0: isize,
    x0: isize,
    h: usize,
    w: usize,
) -> Array2<f32> {
    Array2::from_shape_fn((h, w), |(y, x)| {
        part[[
            reflect(y0 + y as isize, size.0) - origin.0,
            reflect(x0 + x as isize, size.1) - origin.1,
        ]]
    })
}

/// The image rows (or columns) that the reflected positions `start .. start + len` of an axis
/// of length `n` read.
pub fn reflected_range(start: isize, len: usize, n: usize) -> std::ops::Range<usize> {
    let indices = (0..len as isize).map(|i| reflect(start + i, n));
    let (lo, hi) = indices.fold((usize::MAX, 0), |(lo, hi), i| (lo.min(i), hi.max(i)));
    lo..hi + 1
}

fn check_image(image: ArrayView2<f32>) -> Result<()> {
    let (h, w) = image.dim();
    if h == 0 || w == 0 {
        return Err(Error::Shape {
            what: "image",
            shape: vec![h, w],
            problem: "the image is empty".into(),
        });
    }
    if let Some(i) = image.iter().position(|v| !v.is_finite()) {
        return Err(Error::Shape {
            what: "image",
            shape: vec![h, w],
            problem: format!(
                "holds NaN or infinite values (the first at y {}, x {})",
                i / w,
                i % w
            ),
        });
    }
    Ok(())
}

/// Anything that maps (B, 1, H, W) images to (B, C, H, W) predictions: the models, or a
/// user's own function (tests use a purely local filter).
pub trait Predictor {
    fn predict(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// Input sides must be multiples of this.
    fn size_multiple(&self) -> usize;
    /// The largest input side, if limited.
    fn max_side(&self) -> Option<usize>;
    fn device(&self) -> &Device;
    /// The number of output channels.
    fn out_channels(&self) -> usize;
    /// Refuses a forward pass on `batch` images of `height` × `width` that cannot fit in
    /// memory (the default checks nothing).
    fn check_memory(&self, _batch: usize, _height: usize, _width: usize) -> Result<()> {
        Ok(())
    }
}

impl Predictor for Model {
    fn predict(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward(x, train)?)
    }
    fn size_multiple(&self) -> usize {
        Model::size_multiple(self)
    }
    fn max_side(&self) -> Option<usize> {
        Model::max_side(self)
    }
    fn device(&self) -> &Device {
        Model::device(self)
    }
    fn out_channels(&self) -> usize {
        self.config().out_channels()
    }
    fn check_memory(&self, batch: usize, height: usize, width: usize) -> Result<()> {
        crate::memory::check_inference(self, batch, height, width)
    }
}

/// Runs the model (eval mode) on one 2-D image: reflect-pads bottom/right to the model's size
/// multiple, predicts, crops back. Returns (C, H, W).
pub fn predict_image(model: &dyn Predictor, image: ArrayView2<f32>) -> Result<Array3<f32>> {
    predict_image_mode(model, image, false)
}

/// [`predict_image`] with an explicit mode; `train = true` reproduces the paper's ViM-UNet
/// test numbers (stochastic depth and BatchNorm batch statistics on) and is meant for fidelity
/// checks only.
pub fn predict_image_mode(
    model: &dyn Predictor,
    image: ArrayView2<f32>,
    train: bool,
) -> Result<Array3<f32>> {
    check_image(image)?;
    let (h, w) = image.dim();
    let m = model.size_multiple();
    let (ph, pw) = (h.div_ceil(m) * m, w.div_ceil(m) * m);
    model.check_memory(1, ph, pw)?;
    let padded = reflect_window(image, 0, 0, ph, pw);
    let x = Tensor::from_vec(
        padded.into_raw_vec_and_offset().0,
        (1, 1, ph, pw),
        model.device(),
    )?;
    let y = model.predict(&x, train)?.to_device(&Device::Cpu)?;
    let c = y.dim(1)?;
    let y = y.narrow(2, 0, h)?.narrow(3, 0, w)?.contiguous()?;
    let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
    Ok(Array3::from_shape_vec((c, h, w), v).expect("shape from the tensor"))
}

/// Options of [`predict_tiled`]; `Default` is the paper's CREMI setting.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileOptions {
    pub block: (usize, usize),
    pub halo: (usize, usize),
    /// Standardise each window `(x − mean) / (std + 1e-7)` (torch-em does).
    pub standardize: bool,
    pub progress: bool,
    /// Predict in training mode (see [`predict_image_mode`]).
    pub train_mode: bool,
}

impl Default for TileOptions {
    fn default() -> Self {
        TileOptions {
            block: (512, 512),
            halo: (128, 128),
            standardize: true,
            progress: false,
            train_mode: false,
        }
    }
}

/// Tiled prediction of a 2-D image: blocks of `block` (truncated at the border), each read
/// with `halo` on every side (reflected outside the image), optionally standardised, predicted,
/// and the central block written to the output (C, H, W).
pub fn predict_tiled(
    model: &dyn Predictor,
    image: ArrayView2<f32>,
    opts: &TileOptions,
) -> Result<Array3<f32>> {
    check_image(image)?;
    let (h, w) = image.dim();
    check_tiles(model, (h, w), opts)?;
    let (bh, bw) = opts.block;
    let (hh, hw) = opts.halo;
    let starts = |n: usize, b: usize| (0..n).step_by(b).collect::<Vec<_>>();
    let (ys, xs) = (starts(h, bh), starts(w, bw));
    let bar = if opts.progress {
        let pb = ProgressBar::new((ys.len() * xs.len()) as u64);
        pb.set_style(
            ProgressStyle::with_template("  predict {bar:30} {pos}/{len} tiles {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut out: Option<Array3<f32>> = None;
    for &y in &ys {
        for &x in &xs {
            let (th, tw) = ((h - y).min(bh), (w - x).min(bw));
            let win = reflect_window(
                image,
                y as isize - hh as isize,
                x as isize - hw as isize,
                th + 2 * hh,
                tw + 2 * hw,
            );
            let pred = predict_window(model, win, opts)?;
            let o = out.get_or_insert_with(|| Array3::zeros((pred.dim().0, h, w)));
            o.slice_mut(s![.., y..y + th, x..x + tw])
                .assign(&pred.slice(s![.., hh..hh + th, hw..hw + tw]));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(out.expect("at least one tile"))
}

/// Refuses tiles that cannot work on an image of `size`: an empty block, a halo larger than the
/// image, or a window larger than the model's canvas.
///
/// # Errors
/// [`Error::Option`] naming the option.
pub fn check_tiles(model: &dyn Predictor, size: (usize, usize), opts: &TileOptions) -> Result<()> {
    let (h, w) = size;
    let (bh, bw) = opts.block;
    let (hh, hw) = opts.halo;
    if bh == 0 || bw == 0 {
        return Err(Error::Option {
            option: "tile block",
            value: format!("{bh}×{bw}"),
            problem: "must be positive".into(),
        });
    }
    if hh > h || hw > w {
        return Err(Error::Option {
            option: "tile halo",
            value: format!("{hh}×{hw}"),
            problem: format!(
                "is larger than the image ({h}×{w}); a halo beyond the image adds no context \
                 and multiplies the work: use a halo up to the image size, or no tiles"
            ),
        });
    }
    if let Some(side) = model.max_side() {
        if bh + 2 * hh > side || bw + 2 * hw > side {
            return Err(Error::Option {
                option: "tile block + 2 × halo",
                value: format!("{}×{}", bh + 2 * hh, bw + 2 * hw),
                problem: format!("does not fit the model's {side}×{side} canvas"),
            });
        }
    }
    Ok(())
}

/// One tile's prediction from its window (block and halo): standardised on its own when the
/// options say so, then predicted whole. (C, window height, window width).
///
/// # Errors
/// Those of [`predict_image_mode`].
pub fn predict_window(
    model: &dyn Predictor,
    mut window: Array2<f32>,
    opts: &TileOptions,
) -> Result<Array3<f32>> {
    if opts.standardize {
        seg_data::sampling::standardize(&mut window);
    }
    predict_image_mode(model, window.view(), opts.train_mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_matches_numpy() {
        // np.pad([0,1,2,3], 5, mode="reflect") = [1,2,3,2,1, 0,1,2,3, 2,1,0,1,2]
        let got: Vec<usize> = (-5..9).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, vec![1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]);
        assert_eq!(reflect(-3, 1), 0);
    }
}
