//! Blockwise prediction of volumes of any size into OME-Zarr, in memory bounded by the block.
//!
//! The volume (z, y, x) is cut into blocks of one slice × `block` × `block` (the 2-D models run
//! slice by slice). Each block reads its window (block + halo, reflected at the volume's border)
//! from the source, is predicted exactly as [`seg_train::predict_tiled`] predicts the same tile
//! (same window, same per-window standardisation), and writes its centre as one whole output
//! chunk of the Zarr array `OUT/0` of shape (c, z, y, x) with chunks (c, 1, block, block). So the
//! result equals the in-memory tiled prediction bit for bit, and no two blocks write the same
//! chunk.
//!
//! Resumable: after its chunk is stored, a block leaves a marker in `OUT/blocks/`; a run that
//! finds the marker skips the block. `OUT/blocks/manifest.json` records the region, the block,
//! the halo, the standardisation and the model; a rerun with other settings is refused.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use seg_io::volume::{write_ome_zarr_group, Element, VolumeSource, ZarrArray};
use seg_train::predict::{check_tiles, predict_window, reflect_window_in, reflected_range};
use seg_train::{Predictor, TileOptions};

use crate::{Error, Result};

/// Options of [`predict_to_zarr`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct BlockwiseOptions {
    /// The block side (also the output chunk's), and the halo around it.
    pub block: usize,
    pub halo: usize,
    /// Standardise each window on its own (torch-em does).
    pub standardize: bool,
    pub progress: bool,
    /// Predict in training mode (fidelity checks only).
    pub train_mode: bool,
    /// Names the model in the manifest (a rerun with another model is refused).
    pub model: String,
}

impl Default for BlockwiseOptions {
    fn default() -> Self {
        BlockwiseOptions {
            block: 512,
            halo: 128,
            standardize: true,
            progress: false,
            train_mode: false,
            model: String::new(),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockwiseSummary {
    /// All blocks, and those found done before this run.
    pub blocks: usize,
    pub already_done: usize,
    pub seconds: f64,
    /// The output array (`OUT/0`).
    pub array: PathBuf,
}

/// One block: slice `z`, rows and columns starting at `y`, `x`.
#[derive(Debug, Clone, Copy)]
struct Block {
    index: usize,
    z: usize,
    y: usize,
    x: usize,
}

fn blocks(shape: [usize; 3], block: usize) -> Vec<Block> {
    let mut v = Vec::new();
    for z in 0..shape[0] {
        for y in (0..shape[1]).step_by(block) {
            for x in (0..shape[2]).step_by(block) {
                v.push(Block {
                    index: v.len(),
                    z,
                    y,
                    x,
                });
            }
        }
    }
    v
}

fn file_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Predicts `input` with `model` block by block into the OME-Zarr group `out`, resuming a run
/// interrupted there.
///
/// # Errors
/// [`Error::Run`] when `out` holds a run with other settings or an array of another shape;
/// [`Error::Option`] for block and halo that do not fit the volume or the model; read,
/// prediction and write errors.
pub fn predict_to_zarr(
    model: &dyn Predictor,
    input: &dyn VolumeSource,
    out: &Path,
    opts: &BlockwiseOptions,
) -> Result<BlockwiseSummary> {
    let started = Instant::now();
    let shape = input.shape();
    let [depth, h, w] = shape;
    if depth == 0 || h == 0 || w == 0 {
        return Err(Error::Input {
            path: PathBuf::from(input.describe()),
            what: format!("nothing to predict: shape {shape:?}"),
        });
    }
    let mut tile = TileOptions::default();
    tile.block = (opts.block, opts.block);
    tile.halo = (opts.halo, opts.halo);
    tile.standardize = opts.standardize;
    tile.train_mode = opts.train_mode;
    check_tiles(model, (h, w), &tile)?;

    let markers = out.join("blocks");
    std::fs::create_dir_all(&markers).map_err(file_error(&markers))?;
    let manifest = serde_json::json!({
        "input": input.describe(),
        "shape": shape,
        "block": opts.block,
        "halo": opts.halo,
        "standardize": opts.standardize,
        "train_mode": opts.train_mode,
        "model": opts.model,
    });
    let manifest_path = markers.join("manifest.json");
    match std::fs::read_to_string(&manifest_path) {
        Ok(text) => {
            let stored: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if stored != manifest {
                return Err(Error::Run {
                    path: out.to_path_buf(),
                    what: format!(
                        "holds a blockwise prediction with other settings ({stored}); remove \
                         it or choose another output"
                    ),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = serde_json::to_string_pretty(&manifest).unwrap_or_default();
            crate::picture::write_file(&manifest_path, text.as_bytes())?;
        }
        Err(e) => return Err(file_error(&manifest_path)(e)),
    }

    let all = blocks(shape, opts.block);
    let marker = |b: &Block| markers.join(b.index.to_string());
    let todo: Vec<Block> = all
        .iter()
        .copied()
        .filter(|b| !marker(b).exists())
        .collect();
    let already_done = all.len() - todo.len();
    let array_path = out.join("0");
    let mut array = if array_path.exists() {
        Some(ZarrArray::open(&array_path)?)
    } else {
        None
    };
    let bar = if opts.progress {
        let pb = ProgressBar::new(all.len() as u64);
        pb.set_position(already_done as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "  predict {bar:30} {pos}/{len} blocks {elapsed} ({msg} voxels/s)",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut voxels = 0usize;
    for b in &todo {
        let (th, tw) = ((h - b.y).min(opts.block), (w - b.x).min(opts.block));
        let (y0, x0) = (
            b.y as isize - opts.halo as isize,
            b.x as isize - opts.halo as isize,
        );
        let (wh, ww) = (th + 2 * opts.halo, tw + 2 * opts.halo);
        let rows = reflected_range(y0, wh, h);
        let cols = reflected_range(x0, ww, w);
        let part = input.read_box(b.z..b.z + 1, rows.clone(), cols.clone())?;
        let window = reflect_window_in(
            part.index_axis(ndarray::Axis(0), 0),
            (rows.start, cols.start),
            (h, w),
            y0,
            x0,
            wh,
            ww,
        );
        let pred = predict_window(model, window, &tile)?;
        let c = pred.dim().0;
        let zarr = match &array {
            Some(a) => a,
            None => {
                write_ome_zarr_group(out, &["c", "z", "y", "x"], "prediction")?;
                array.insert(ZarrArray::create(
                    &array_path,
                    &[c, depth, h, w],
                    &[c, 1, opts.block, opts.block],
                    Element::F32,
                    &["c", "z", "y", "x"],
                )?)
            }
        };
        if zarr.shape() != [c, depth, h, w] || zarr.chunks() != [c, 1, opts.block, opts.block] {
            return Err(Error::Run {
                path: out.to_path_buf(),
                what: format!(
                    "its array has shape {:?} and chunks {:?}, this prediction needs {:?} and \
                     {:?}; remove it or choose another output",
                    zarr.shape(),
                    zarr.chunks(),
                    [c, depth, h, w],
                    [c, 1, opts.block, opts.block]
                ),
            });
        }
        let centre = pred
            .slice(ndarray::s![
                ..,
                opts.halo..opts.halo + th,
                opts.halo..opts.halo + tw
            ])
            .to_owned()
            .insert_axis(ndarray::Axis(1))
            .into_dyn();
        zarr.write_f32(&[0, b.z, b.y, b.x], &centre)?;
        crate::picture::write_file(&marker(b), b"")?;
        voxels += th * tw;
        let rate = voxels as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{rate:.0}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    if array.is_none() && !array_path.exists() {
        return Err(Error::Run {
            path: out.to_path_buf(),
            what: "every block is marked done but the array is missing; remove the folder".into(),
        });
    }
    Ok(BlockwiseSummary {
        blocks: all.len(),
        already_done,
        seconds: started.elapsed().as_secs_f64(),
        array: array_path,
    })
}
