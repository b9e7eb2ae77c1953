//! Prediction of a user's image or stack with a trained model: reading the input (TIFF, or a
//! 3-D 8-bit HDF5 dataset) and predicting it slice by slice, whole or in tiles.

use std::ops::Range;
use std::path::Path;

use ndarray::{Array3, ArrayView3, Axis, Ix2, Ix3};
use seg_train::TileOptions;
use vim_nets::Model;

use crate::{Error, Result};

/// Whether `path` names an HDF5 file (`.h5`, `.hdf5`, `.hdf`).
pub fn is_hdf5(path: &Path) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    matches!(ext.as_str(), "h5" | "hdf5" | "hdf")
}

/// An image or stack as f32 slices (z, y, x): a 2-D TIFF is one slice, a multi-page TIFF a
/// stack; an HDF5 file's 3-D u8 dataset `key`, all slices or `slices`.
///
/// # Errors
/// Unreadable files, a dataset that is not 3-D u8, `slices` on a TIFF or outside the dataset,
/// an input with no slice or an empty image.
pub fn read_stack(path: &Path, key: &str, slices: Option<Range<usize>>) -> Result<Array3<f32>> {
    let stack = if is_hdf5(path) {
        read_hdf5_u8(path, key, slices)?
    } else {
        if slices.is_some() {
            return Err(Error::Option {
                option: "--slices".into(),
                what: "applies to HDF5 input only".into(),
            });
        }
        let samples = seg_io::tiff::samples_per_pixel(path)?;
        if samples > 1 {
            return Err(Error::Input {
                path: path.to_path_buf(),
                what: format!(
                    "an image of {samples} samples per pixel (RGB or multiband); the models take \
                     one grey channel: convert it, or give a stack of grey pages"
                ),
            });
        }
        let image = seg_io::tiff::read_tiff(path)?.into_f32();
        match image.ndim() {
            2 => image
                .into_dimensionality::<Ix2>()
                .map(|a| a.insert_axis(Axis(0))),
            3 => image.into_dimensionality::<Ix3>(),
            n => {
                return Err(Error::Input {
                    path: path.to_path_buf(),
                    what: format!("a {n}-D image; expected 2-D or a 3-D stack"),
                })
            }
        }
        .map_err(|e| Error::Input {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?
    };
    if stack.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            what: format!("nothing to predict: shape {:?}", stack.shape()),
        });
    }
    if let Some((index, v)) = stack.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::Input {
            path: path.to_path_buf(),
            what: format!(
                "holds {v} at (slice, y, x) = {index:?}; the input must be finite (a NaN or an \
                 infinity would spread through the whole prediction)"
            ),
        });
    }
    Ok(stack)
}

/// Opens an HDF5 file's 3-D u8 dataset `key` and checks the slices asked for.
fn open_hdf5_u8(
    path: &Path,
    key: &str,
    slices: Option<Range<usize>>,
) -> Result<(seg_io::hdf5::PureHdf5, Range<usize>, [usize; 3])> {
    use seg_io::hdf5::{ElementType, PureHdf5, VolumeSource};
    let file = PureHdf5::open(path)?;
    let shape = file.shape(key)?;
    let [d, h, w] = shape[..] else {
        return Err(Error::Input {
            path: path.to_path_buf(),
            what: format!("dataset {key} has shape {shape:?}; expected a 3-D (z, y, x) volume"),
        });
    };
    let kind = file.element_type(key)?;
    if kind != ElementType::U8 {
        return Err(Error::Input {
            path: path.to_path_buf(),
            what: format!("dataset {key} is {kind:?}; predict reads 8-bit raw data"),
        });
    }
    if shape.contains(&0) {
        return Err(Error::Input {
            path: path.to_path_buf(),
            what: format!("dataset {key} has shape {shape:?}: nothing to predict"),
        });
    }
    let z = slices.unwrap_or(0..d);
    if z.start >= z.end || z.end > d {
        return Err(Error::Option {
            option: "--slices".into(),
            what: format!(
                "{}:{} is not a non-empty range of the {d} slices of {} {key}",
                z.start,
                z.end,
                path.display()
            ),
        });
    }
    Ok((file, z, [d, h, w]))
}

fn read_hdf5_u8(path: &Path, key: &str, slices: Option<Range<usize>>) -> Result<Array3<f32>> {
    use seg_io::hdf5::VolumeSource;
    let (file, z, _) = open_hdf5_u8(path, key, slices)?;
    Ok(file.read_u8(key, z)?.mapv(f32::from))
}

/// The last slice read: its index in the dataset and its pixels.
type CachedSlice = (usize, ndarray::Array2<u8>);

/// An HDF5 file's 3-D u8 dataset (or its slices `z`) as a [`seg_io::volume::VolumeSource`]
/// read one slice at a time (the last slice read is kept for the next box), so a blockwise
/// prediction holds one slice of the input, not the volume.
pub struct Hdf5Slices {
    file: std::sync::Mutex<(seg_io::hdf5::PureHdf5, Option<CachedSlice>)>,
    path: std::path::PathBuf,
    key: String,
    z: Range<usize>,
    side: [usize; 2],
}

impl Hdf5Slices {
    /// Opens dataset `key` of `path`, all slices or `slices`.
    ///
    /// # Errors
    /// As [`read_stack`] for HDF5 input: unreadable files, a dataset that is not 3-D u8,
    /// slices outside it, an empty dataset.
    pub fn open(path: &Path, key: &str, slices: Option<Range<usize>>) -> Result<Hdf5Slices> {
        let (file, z, [_, h, w]) = open_hdf5_u8(path, key, slices)?;
        Ok(Hdf5Slices {
            file: std::sync::Mutex::new((file, None)),
            path: path.to_path_buf(),
            key: key.into(),
            z,
            side: [h, w],
        })
    }
}

impl seg_io::volume::VolumeSource for Hdf5Slices {
    fn shape(&self) -> [usize; 3] {
        [self.z.len(), self.side[0], self.side[1]]
    }

    fn read_box(
        &self,
        z: Range<usize>,
        y: Range<usize>,
        x: Range<usize>,
    ) -> seg_io::Result<Array3<f32>> {
        use seg_io::hdf5::VolumeSource;
        let [d, h, w] = self.shape();
        if z.start >= z.end
            || z.end > d
            || y.start >= y.end
            || y.end > h
            || x.start >= x.end
            || x.end > w
        {
            return Err(seg_io::Error::Content {
                path: self.path.clone(),
                what: format!(
                    "the box {z:?} × {y:?} × {x:?} is not inside {} ({d} × {h} × {w})",
                    self.key
                ),
            });
        }
        let mut guard = self.file.lock().map_err(|_| seg_io::Error::Content {
            path: self.path.clone(),
            what: "a reader thread failed".into(),
        })?;
        let mut out = Array3::zeros((z.len(), y.len(), x.len()));
        for (i, slice) in z.clone().enumerate() {
            let at = self.z.start + slice;
            let cached = matches!(&guard.1, Some((c, _)) if *c == at);
            if !cached {
                let plane = guard.0.read_u8(&self.key, at..at + 1)?;
                guard.1 = Some((at, plane.index_axis_move(Axis(0), 0)));
            }
            let plane = &guard.1.as_ref().expect("read above").1;
            out.index_axis_mut(Axis(0), i).assign(
                &plane
                    .slice(ndarray::s![y.clone(), x.clone()])
                    .mapv(f32::from),
            );
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!(
            "{} {} slices {}..{}",
            self.path.display(),
            self.key,
            self.z.start,
            self.z.end
        )
    }
}

/// How [`predict_stack`] runs the model on each slice.
#[non_exhaustive]
#[derive(Debug, Clone, Copy)]
pub struct StackPrediction {
    /// Tiles with a halo; None: each slice whole.
    pub tiles: Option<TileOptions>,
    /// Standardise each slice (whole) before predicting; tiles standardise per tile as their
    /// options say.
    pub standardize: bool,
    /// Training-mode forward (stochastic depth, batch statistics; fidelity checks only).
    pub train_mode: bool,
}

impl Default for StackPrediction {
    fn default() -> Self {
        StackPrediction {
            tiles: None,
            standardize: true,
            train_mode: false,
        }
    }
}

/// The model's prediction of every slice, stacked slice-major then channel: (z·C, y, x).
pub fn predict_stack(
    model: &Model,
    stack: ArrayView3<f32>,
    how: &StackPrediction,
) -> Result<Array3<f32>> {
    let mut outputs = Vec::with_capacity(stack.dim().0);
    for slice in stack.outer_iter() {
        let pred = match &how.tiles {
            Some(tiles) => seg_train::predict_tiled(model, slice, tiles)?,
            None => {
                let mut x = slice.to_owned();
                if how.standardize {
                    seg_data::sampling::standardize(&mut x);
                }
                seg_train::predict::predict_image_mode(model, x.view(), how.train_mode)?
            }
        };
        outputs.push(pred);
    }
    // The slices of one stack share a shape, so the model's predictions of them do too.
    let views: Vec<_> = outputs.iter().map(|o| o.view()).collect();
    ndarray::concatenate(Axis(0), &views).map_err(|e| Error::Option {
        option: "model".into(),
        what: format!("its predictions of one stack's slices differ in shape: {e}"),
    })
}
