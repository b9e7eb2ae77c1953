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
    check_manifest(out, &markers.join("manifest.json"), &manifest)?;
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
    let bar = progress_bar(opts.progress, all.len(), "predict");
    bar.set_position(already_done as u64);
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

/// Options of [`segment_zarr`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentOptions {
    /// The block side (also the output chunk's), and the halo around it.
    pub block: usize,
    pub halo: usize,
    pub progress: bool,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            block: 512,
            halo: 128,
            progress: false,
        }
    }
}

/// Union-find over global object ids.
struct Merges(std::collections::HashMap<u64, u64>);

impl Merges {
    fn root(&mut self, a: u64) -> u64 {
        let mut r = a;
        while let Some(&p) = self.0.get(&r) {
            if p == r {
                break;
            }
            r = p;
        }
        // Path compression.
        let mut x = a;
        while x != r {
            let next = self.0.get(&x).copied().unwrap_or(r);
            self.0.insert(x, r);
            x = next;
        }
        r
    }

    fn union(&mut self, a: u64, b: u64) {
        let (ra, rb) = (self.root(a), self.root(b));
        if ra != rb {
            let (lo, hi) = (ra.min(rb), ra.max(rb));
            self.0.insert(hi, lo);
        }
    }
}

/// A block's window segmentation kept for the stitching: its origin and its labels.
fn write_window(path: &Path, y0: usize, x0: usize, labels: &ndarray::Array2<u32>) -> Result<()> {
    let (h, w) = labels.dim();
    let mut bytes = Vec::with_capacity(32 + 4 * h * w);
    for v in [y0, x0, h, w] {
        bytes.extend_from_slice(&(v as u64).to_le_bytes());
    }
    labels
        .iter()
        .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
    crate::picture::write_file(path, &bytes)
}

fn read_window(path: &Path) -> Result<(usize, usize, ndarray::Array2<u32>)> {
    let bytes = std::fs::read(path).map_err(file_error(path))?;
    let bad = || Error::Input {
        path: path.to_path_buf(),
        what: "a block's window file is damaged; remove the output and segment again".into(),
    };
    let word = |i: usize| -> Option<usize> {
        Some(u64::from_le_bytes(bytes.get(8 * i..8 * i + 8)?.try_into().ok()?) as usize)
    };
    let (y0, x0, h, w) = (
        word(0).ok_or_else(bad)?,
        word(1).ok_or_else(bad)?,
        word(2).ok_or_else(bad)?,
        word(3).ok_or_else(bad)?,
    );
    let body = bytes.get(32..).ok_or_else(bad)?;
    if body.len() != 4 * h * w {
        return Err(bad());
    }
    let values = body
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let labels = ndarray::Array2::from_shape_vec((h, w), values).map_err(|_| bad())?;
    Ok((y0, x0, labels))
}

/// Segments the prediction array `pred` (c, z, y, x), slice by slice as the paper scores CREMI,
/// block by block into the OME-Zarr group `out` (array `0`: u32 labels (z, y, x), one chunk per
/// block), with object ids consistent across block borders.
///
/// Each block segments its window (block + halo, cut at the volume's border) with the setting's
/// recipe and keeps its centre with block-local ids; the window's labels are kept for the
/// stitching. The finish step gives each block an id offset (the sum of the ids before it),
/// merges the objects that the overlaps decide are one (see below) with a union-find, and
/// writes consecutive ids. Overlap rule, for two neighbouring blocks A and B: in the part of A's
/// halo that is B's centre, an object b of B and the object a of A's window that covers most of
/// b there are one object when a covers more than half of b's pixels there and b more than half
/// of a's; both directions are checked. Objects that, with their seeds, fit inside a block plus
/// halo get the same pixels as the whole-slice segmentation (tested, up to relabelling).
///
/// Resumable: the per-block stage leaves markers in `out/blocks/`; the finish step reruns
/// whole (it only reads the block results).
///
/// # Errors
/// [`Error::Run`] for an output holding other settings, [`Error::Option`] for a prediction
/// whose channels do not fit the setting; read, segmentation and write errors.
pub fn segment_zarr(
    pred: &ZarrArray,
    setting: seg_targets::TargetSetting,
    recipes: &crate::Recipes,
    out: &Path,
    opts: &SegmentOptions,
) -> Result<BlockwiseSummary> {
    let started = Instant::now();
    let shape = pred.shape();
    let [c, depth, h, w] = shape[..] else {
        return Err(Error::Input {
            path: pred.path().to_path_buf(),
            what: format!("a prediction is (c, z, y, x); this array has shape {shape:?}"),
        });
    };
    if opts.block == 0 {
        return Err(Error::Option {
            option: "block".into(),
            what: "must be positive".into(),
        });
    }
    let markers = out.join("blocks");
    std::fs::create_dir_all(&markers).map_err(file_error(&markers))?;
    let manifest = serde_json::json!({
        "prediction": pred.path().display().to_string(),
        "shape": shape,
        "setting": setting.to_string(),
        "block": opts.block,
        "halo": opts.halo,
        "recipes": format!("{recipes:?}"),
    });
    check_manifest(out, &markers.join("manifest.json"), &manifest)?;
    let all = blocks([depth, h, w], opts.block);
    let local_path = out.join("local");
    let local = if local_path.exists() {
        ZarrArray::open(&local_path)?
    } else {
        ZarrArray::create(
            &local_path,
            &[depth, h, w],
            &[1, opts.block, opts.block],
            Element::U32,
            &["z", "y", "x"],
        )?
    };
    let bar = progress_bar(opts.progress, all.len(), "segment");
    let marker = |b: &Block| markers.join(format!("{}.max", b.index));
    let window_file = |b: &Block| markers.join(format!("{}.window", b.index));
    let mut already_done = 0;
    for b in &all {
        if marker(b).exists() {
            already_done += 1;
            bar.inc(1);
            continue;
        }
        let (th, tw) = ((h - b.y).min(opts.block), (w - b.x).min(opts.block));
        let rows = b.y.saturating_sub(opts.halo)..(b.y + th + opts.halo).min(h);
        let cols = b.x.saturating_sub(opts.halo)..(b.x + tw + opts.halo).min(w);
        let window = pred
            .read_f32(&[0..c, b.z..b.z + 1, rows.clone(), cols.clone()])?
            .into_shape_with_order((c, rows.len(), cols.len()))
            .map_err(|e| Error::Input {
                path: pred.path().to_path_buf(),
                what: e.to_string(),
            })?;
        let labels = crate::segment(window.view(), setting, recipes)?;
        let (cy, cx) = (b.y - rows.start, b.x - cols.start);
        let core = labels.slice(ndarray::s![cy..cy + th, cx..cx + tw]);
        // Block-local ids 1..=n in order of first appearance in the core.
        let mut ids = std::collections::HashMap::new();
        let core = core.mapv(|v| {
            if v == 0 {
                0
            } else {
                let n = ids.len() as u32 + 1;
                *ids.entry(v).or_insert(n)
            }
        });
        let window_labels = labels.mapv(|v| ids.get(&v).copied().unwrap_or(0));
        local.write(
            &[b.z, b.y, b.x],
            &core.insert_axis(ndarray::Axis(0)).into_dyn(),
        )?;
        write_window(&window_file(b), rows.start, cols.start, &window_labels)?;
        crate::picture::write_file(&marker(b), ids.len().to_string().as_bytes())?;
        bar.inc(1);
    }
    bar.finish_and_clear();

    // Finish: offsets, merges across faces, consecutive ids.
    let mut offsets = Vec::with_capacity(all.len());
    let mut total: u64 = 0;
    for b in &all {
        offsets.push(total);
        let text = std::fs::read_to_string(marker(b)).map_err(file_error(&marker(b)))?;
        total += text.trim().parse::<u64>().map_err(|_| Error::Input {
            path: marker(b),
            what: "a block marker is damaged; remove the output and segment again".into(),
        })?;
    }
    let per_row = w.div_ceil(opts.block);
    let per_slice = h.div_ceil(opts.block) * per_row;
    let mut merges = Merges(std::collections::HashMap::new());
    for b in &all {
        let within = b.index % per_slice;
        let right = (within % per_row + 1 < per_row).then(|| b.index + 1);
        let below = (within / per_row + 1 < h.div_ceil(opts.block)).then(|| b.index + per_row);
        for n in [right, below].into_iter().flatten() {
            let nb = all[n];
            for (from, to) in [(b, &nb), (&nb, b)] {
                for (a, bb) in matches(&read_window(&window_file(from))?, to, &local, opts)? {
                    merges.union(offsets[from.index] + a, offsets[to.index] + bb);
                }
            }
        }
    }
    let array_path = out.join("0");
    write_ome_zarr_group(out, &["z", "y", "x"], "segmentation")?;
    let labels = ZarrArray::create(
        &array_path,
        &[depth, h, w],
        &[1, opts.block, opts.block],
        Element::U32,
        &["z", "y", "x"],
    )?;
    // Consecutive final ids, in order of the roots.
    let mut roots: Vec<u64> = (1..=total).map(|g| merges.root(g)).collect();
    roots.sort_unstable();
    roots.dedup();
    if roots.len() > u32::MAX as usize {
        return Err(Error::Run {
            path: out.to_path_buf(),
            what: format!("{} objects do not fit in u32 labels", roots.len()),
        });
    }
    let final_id: std::collections::HashMap<u64, u32> = roots
        .iter()
        .enumerate()
        .map(|(i, &r)| (r, i as u32 + 1))
        .collect();
    for b in &all {
        let (th, tw) = ((h - b.y).min(opts.block), (w - b.x).min(opts.block));
        let core = local.read_labels(&[b.z..b.z + 1, b.y..b.y + th, b.x..b.x + tw])?;
        let relabelled = core.mapv(|v| {
            if v == 0 {
                0
            } else {
                final_id[&merges.root(offsets[b.index] + u64::from(v))]
            }
        });
        labels.write(&[b.z, b.y, b.x], &relabelled)?;
    }
    Ok(BlockwiseSummary {
        blocks: all.len(),
        already_done,
        seconds: started.elapsed().as_secs_f64(),
        array: array_path,
    })
}

/// Pairs (id in `from`'s window, id in `to`'s centre) that the overlap rule makes one object,
/// from the part of `from`'s window that is `to`'s centre.
fn matches(
    from: &(usize, usize, ndarray::Array2<u32>),
    to: &Block,
    local: &ZarrArray,
    opts: &SegmentOptions,
) -> Result<Vec<(u64, u64)>> {
    let (wy, wx, window) = from;
    let (wh, ww) = window.dim();
    let shape = local.shape();
    let (h, w) = (shape[1], shape[2]);
    let (th, tw) = ((h - to.y).min(opts.block), (w - to.x).min(opts.block));
    let rows = (*wy).max(to.y)..(wy + wh).min(to.y + th);
    let cols = (*wx).max(to.x)..(wx + ww).min(to.x + tw);
    if rows.is_empty() || cols.is_empty() {
        return Ok(Vec::new());
    }
    let theirs = local.read_labels(&[to.z..to.z + 1, rows.clone(), cols.clone()])?;
    let mut pairs: std::collections::HashMap<(u32, u32), usize> = Default::default();
    let mut size_a: std::collections::HashMap<u32, usize> = Default::default();
    let mut size_b: std::collections::HashMap<u32, usize> = Default::default();
    for (i, y) in rows.clone().enumerate() {
        for (j, x) in cols.clone().enumerate() {
            let a = window[[y - wy, x - wx]];
            let b = theirs[[0, i, j]];
            if a != 0 {
                *size_a.entry(a).or_default() += 1;
            }
            if b != 0 {
                *size_b.entry(b).or_default() += 1;
            }
            if a != 0 && b != 0 {
                *pairs.entry((a, b)).or_default() += 1;
            }
        }
    }
    Ok(pairs
        .into_iter()
        .filter(|&((a, b), n)| 2 * n > size_a[&a] && 2 * n > size_b[&b])
        .map(|((a, b), _)| (u64::from(a), u64::from(b)))
        .collect())
}

/// Refuses an output whose manifest differs from `manifest`; writes it on the first run.
fn check_manifest(out: &Path, path: &Path, manifest: &serde_json::Value) -> Result<()> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let stored: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if &stored != manifest {
                return Err(Error::Run {
                    path: out.to_path_buf(),
                    what: format!(
                        "holds a blockwise run with other settings ({stored}); remove it or \
                         choose another output"
                    ),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = serde_json::to_string_pretty(manifest).unwrap_or_default();
            crate::picture::write_file(path, text.as_bytes())
        }
        Err(e) => Err(file_error(path)(e)),
    }
}

fn progress_bar(show: bool, len: usize, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "  {what} {{bar:30}} {{pos}}/{{len}} blocks {{elapsed}} ({{msg}} voxels/s)"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// A segmentation volume scored against its ground truth: per slice (as the paper scores
/// CREMI) and as one 3-D volume.
#[derive(Debug, Clone)]
pub struct VolumeScores {
    pub slices: Vec<msa_eval::SegmentationAccuracy>,
    pub volume: msa_eval::SegmentationAccuracy,
}

/// Scores `seg` against `gt` ((z, y, x) or (y, x) label arrays of the same shape), reading
/// boxes of one slice × `block` × `block`: only the overlap counts are held, never either
/// volume. Per slice the mSA of that slice's objects; for the volume the mSA of the 3-D objects.
///
/// # Errors
/// [`Error::Input`] for shapes that differ or are not volumes; read errors (ids above 2³²
/// are refused); [`msa_eval::Error`] for bad options.
pub fn evaluate_zarr(
    seg: &ZarrArray,
    gt: &ZarrArray,
    block: usize,
    options: &msa_eval::MsaOptions,
) -> Result<VolumeScores> {
    use std::collections::HashMap;
    let (s, g) = (seg.shape(), gt.shape());
    let volume_shape = |shape: &[usize]| match *shape {
        [y, x] => Some((1, y, x)),
        [z, y, x] => Some((z, y, x)),
        _ => None,
    };
    let (Some((depth, h, w)), true) = (volume_shape(&s), s == g) else {
        return Err(Error::Input {
            path: seg.path().to_path_buf(),
            what: format!(
                "a segmentation of shape {s:?} against ground truth {} of shape {g:?}: expected \
                 two (z, y, x) or (y, x) label arrays of the same shape",
                gt.path().display()
            ),
        });
    };
    let block = block.max(1);
    let read = |a: &ZarrArray, z: usize, y: std::ops::Range<usize>, x: std::ops::Range<usize>| {
        if a.shape().len() == 2 {
            a.read_labels(&[y, x])
        } else {
            a.read_labels(&[z..z + 1, y, x])
        }
    };
    let mut volume: HashMap<(u64, u64), u64> = HashMap::new();
    let mut slices = Vec::with_capacity(depth);
    for z in 0..depth {
        let mut slice: HashMap<(u64, u64), u64> = HashMap::new();
        for y in (0..h).step_by(block) {
            for x in (0..w).step_by(block) {
                let (ys, xs) = (y..(y + block).min(h), x..(x + block).min(w));
                let a = read(seg, z, ys.clone(), xs.clone())?;
                let b = read(gt, z, ys, xs)?;
                let table = msa_eval::Overlap::new(a.view(), b.view())?;
                for (p, g, n) in table.counts() {
                    *slice.entry((p, g)).or_default() += n;
                }
            }
        }
        for (&k, &n) in &slice {
            *volume.entry(k).or_default() += n;
        }
        let table = msa_eval::Overlap::from_counts(
            slice.into_iter().map(|((p, g), n)| (p, g, n)).collect(),
        )?;
        slices.push(msa_eval::mean_segmentation_accuracy_of(&table, options)?);
    }
    let table =
        msa_eval::Overlap::from_counts(volume.into_iter().map(|((p, g), n)| (p, g, n)).collect())?;
    Ok(VolumeScores {
        slices,
        volume: msa_eval::mean_segmentation_accuracy_of(&table, options)?,
    })
}
