//! Reproducible synthetic label images for tests, benchmarks and smoke runs: Voronoi tilings of
//! jittered grid seeds (cell-like or neurite-like instance labels) from a seeded generator.

use std::path::Path;

use ndarray::{Array2, Array3, Zip};

use crate::{Error, Result};
use seg_io::coco::{CocoAnnotation, CocoImage, Segmentation};
use seg_io::hdf5::{write_volumes, VolumeData};
use seg_io::tiff::{write_tiff, WriteOptions};

/// SplitMix64: a tiny, fast, seedable generator (Steele, Lea & Flood 2014). Not cryptographic.
/// The one generator of the workspace: synthetic data, patch sampling, model initialisation.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)` (53 random bits).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller, one value per two uniform draws).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// One seed per cell of a regular grid, moved by a random offset, each with a random id.
#[derive(Debug, Clone)]
pub struct VoronoiSeeds {
    height: usize,
    width: usize,
    cell: usize,
    /// `(y, x, id)` per grid cell, row-major.
    seeds: Vec<(usize, usize, u32)>,
}

impl VoronoiSeeds {
    /// Seeds at the centres of `cell × cell` grid cells covering `height × width`, each moved by
    /// up to ±`jitter` pixels (`jitter < cell / 2` keeps every seed in its cell), with random
    /// non-consecutive ids in `1..2^30`.
    pub fn jittered(
        height: usize,
        width: usize,
        cell: usize,
        jitter: usize,
        rng: &mut SplitMix64,
    ) -> Self {
        let cell = cell.max(1);
        let (rows, cols) = (height.div_ceil(cell), width.div_ceil(cell));
        let seeds = (0..rows * cols)
            .map(|k| ((k / cols) * cell + cell / 2, (k % cols) * cell + cell / 2))
            .collect::<Vec<_>>();
        VoronoiSeeds {
            height,
            width,
            cell,
            seeds: Vec::new(),
        }
        .with_moved(&seeds, jitter, rng)
    }

    /// The same seeds moved again by up to ±`jitter`, with new ids: a perturbed copy, e.g. a
    /// "prediction" of a tiling.
    pub fn moved(&self, jitter: usize, rng: &mut SplitMix64) -> Self {
        let base: Vec<(usize, usize)> = self.seeds.iter().map(|&(y, x, _)| (y, x)).collect();
        VoronoiSeeds {
            seeds: Vec::new(),
            ..self.clone()
        }
        .with_moved(&base, jitter, rng)
    }

    fn with_moved(mut self, base: &[(usize, usize)], jitter: usize, rng: &mut SplitMix64) -> Self {
        let span = 2 * jitter + 1;
        self.seeds = base
            .iter()
            .map(|&(y, x)| {
                let y = (y + rng.below(span)).saturating_sub(jitter);
                let x = (x + rng.below(span)).saturating_sub(jitter);
                (y, x, (rng.next_u64() >> 34) as u32 + 1)
            })
            .collect();
        self
    }

    /// The label image: each pixel takes the id of its nearest seed (squared Euclidean
    /// distance, first seed on ties), searching the pixel's grid cell and its neighbours.
    pub fn labels(&self) -> Array2<u32> {
        let cols = self.width.div_ceil(self.cell) as isize;
        let rows = self.height.div_ceil(self.cell) as isize;
        Array2::from_shape_fn((self.height, self.width), |(y, x)| {
            let (cy, cx) = ((y / self.cell) as isize, (x / self.cell) as isize);
            let mut best = (usize::MAX, 0u32);
            for ny in (cy - 2).max(0)..=(cy + 2).min(rows - 1) {
                for nx in (cx - 2).max(0)..=(cx + 2).min(cols - 1) {
                    let (sy, sx, id) = self.seeds[(ny * cols + nx) as usize];
                    let d = sy.abs_diff(y).pow(2) + sx.abs_diff(x).pow(2);
                    if d < best.0 {
                        best = (d, id);
                    }
                }
            }
            best.1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_image_and_another_seed_another() {
        let make =
            |seed| VoronoiSeeds::jittered(60, 80, 10, 3, &mut SplitMix64::new(seed)).labels();
        assert_eq!(make(1), make(1));
        assert_ne!(make(1), make(2));
    }

    #[test]
    fn every_cell_seed_owns_pixels_and_ids_are_nonzero() {
        let labels = VoronoiSeeds::jittered(60, 80, 10, 3, &mut SplitMix64::new(5)).labels();
        let mut ids: Vec<u32> = labels.iter().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 6 * 8);
        assert!(ids[0] > 0);
    }

    #[test]
    fn uniform_values_lie_in_the_unit_interval() {
        let mut rng = SplitMix64::new(9);
        assert!((0..1000)
            .map(|_| rng.uniform())
            .all(|v| (0.0..1.0).contains(&v)));
    }
}

// ---------------------------------------------------------------------------------------------
// EM-like volumes (CREMI stand-in) and phase-contrast-like cell images (LIVECell stand-in).
// Both are synthetic: made by the generators below from a seed, with no real data involved.

/// Parameters of [`em_volume`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct EmVolumeOptions {
    pub depth: usize,
    pub height: usize,
    pub width: usize,
    /// Mean spacing of neurite centres in pixels.
    pub spacing: usize,
    /// Mean membrane width in pixels (varies per membrane between 0.6× and 1.4×).
    pub membrane_width: f64,
    /// Standard deviation of the pixel noise (grey levels).
    pub noise: f64,
}

impl Default for EmVolumeOptions {
    fn default() -> Self {
        EmVolumeOptions {
            depth: 20,
            height: 256,
            width: 256,
            spacing: 28,
            membrane_width: 2.5,
            noise: 12.0,
        }
    }
}

/// Approximately normal noise: the sum of four uniforms, scaled to unit variance.
fn normal(rng: &mut SplitMix64) -> f64 {
    ((0..4).map(|_| rng.uniform()).sum::<f64>() - 2.0) * 3f64.sqrt()
}

/// Separable box blur with clamped borders, applied `passes` times (≈ Gaussian).
fn box_blur(image: &mut Array2<f32>, radius: usize, passes: usize) {
    let (h, w) = image.dim();
    let mut line = Vec::new();
    for _ in 0..passes {
        for axis in 0..2 {
            let n = if axis == 0 { h } else { w };
            for mut lane in image.lanes_mut(ndarray::Axis(axis)) {
                line.clear();
                line.extend(lane.iter().copied());
                for (i, out) in lane.iter_mut().enumerate() {
                    let (lo, hi) = (i.saturating_sub(radius), (i + radius).min(n - 1));
                    *out = line[lo..=hi].iter().sum::<f32>() / (hi - lo + 1) as f32;
                }
            }
        }
    }
}

/// A synthetic EM volume of neurite cross-sections: a weighted Voronoi tiling whose seeds drift
/// slowly through z (so neurons continue across slices), dark membranes of varying width between
/// neighbouring neurites, per-neurite brightness, blur, noise and a slow intensity drift. Returns
/// the raw u8 volume and its neuron ids (random, non-consecutive, below 2^32, stored as u64 like
/// the CREMI files). Deterministic in `seed`.
pub fn em_volume(options: &EmVolumeOptions, seed: u64) -> (Array3<u8>, Array3<u64>) {
    let mut rng = SplitMix64::new(seed);
    let (d, h, w, s) = (
        options.depth,
        options.height,
        options.width,
        options.spacing.max(4),
    );
    let (rows, cols) = (h.div_ceil(s), w.div_ceil(s));
    struct Seed {
        y: f64,
        x: f64,
        vy: f64,
        vx: f64,
        weight: f64,
        id: u64,
        brightness: f64,
    }
    let seeds: Vec<Seed> = (0..rows * cols)
        .map(|k| Seed {
            y: ((k / cols) * s) as f64 + s as f64 * (0.2 + 0.6 * rng.uniform()),
            x: ((k % cols) * s) as f64 + s as f64 * (0.2 + 0.6 * rng.uniform()),
            vy: (rng.uniform() - 0.5) * 1.2,
            vx: (rng.uniform() - 0.5) * 1.2,
            weight: 0.85 + 0.3 * rng.uniform(),
            id: (rng.next_u64() >> 33) + 1,
            brightness: (rng.uniform() - 0.5) * 40.0,
        })
        .collect();
    let pair_width = |a: u64, b: u64| {
        let mut r = SplitMix64::new(a.min(b).wrapping_mul(31).wrapping_add(a.max(b)));
        options.membrane_width * (0.6 + 0.8 * r.uniform())
    };
    let mut raw = Array3::<u8>::zeros((d, h, w));
    let mut ids = Array3::<u64>::zeros((d, h, w));
    for z in 0..d {
        let mut slice = Array2::<f32>::zeros((h, w));
        for y in 0..h {
            for x in 0..w {
                let (cy, cx) = ((y / s) as isize, (x / s) as isize);
                let (mut best, mut second) = ((f64::MAX, 0usize), (f64::MAX, 0usize));
                for ny in (cy - 2).max(0)..=(cy + 2).min(rows as isize - 1) {
                    for nx in (cx - 2).max(0)..=(cx + 2).min(cols as isize - 1) {
                        let k = ny as usize * cols + nx as usize;
                        let sd = &seeds[k];
                        let (py, px) = (sd.y + sd.vy * z as f64, sd.x + sd.vx * z as f64);
                        let dist =
                            ((y as f64 - py).powi(2) + (x as f64 - px).powi(2)).sqrt() * sd.weight;
                        if dist < best.0 {
                            second = best;
                            best = (dist, k);
                        } else if dist < second.0 {
                            second = (dist, k);
                        }
                    }
                }
                let own = &seeds[best.1];
                ids[[z, y, x]] = own.id;
                slice[[y, x]] = (175.0 + own.brightness) as f32;
                // The distance gap to the second-nearest seed is about twice the distance to
                // the membrane between the two; each pair of neurites has its own width.
                if second.0 - best.0 < pair_width(own.id, seeds[second.1].id) {
                    slice[[y, x]] = 55.0;
                }
            }
        }
        box_blur(&mut slice, 1, 2);
        let phase = z as f64 * 0.05;
        Zip::indexed(&mut raw.index_axis_mut(ndarray::Axis(0), z))
            .and(&slice)
            .for_each(|(y, x), out, v| {
                let drift = 18.0
                    * ((y as f64 / h as f64 + phase) * std::f64::consts::TAU).sin()
                    * (x as f64 / w as f64);
                let value = f64::from(*v) + drift + options.noise * normal(&mut rng);
                *out = value.round().clamp(0.0, 255.0) as u8;
            });
    }
    (raw, ids)
}

/// Writes synthetic CREMI-layout files `sample{A,B,C}.h5` (keys `volumes/raw` and
/// `volumes/labels/neuron_ids`, resolution 40 × 4 × 4 nm, chunked and gzip-compressed) into
/// `dir`, one seed per sample derived from `seed`. Returns the paths.
pub fn write_cremi_like(
    dir: &Path,
    options: &EmVolumeOptions,
    seed: u64,
) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    ["A", "B", "C"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (raw, ids) = em_volume(options, seed.wrapping_add(i as u64 * 1_000_003));
            let path = dir.join(format!("sample{name}.h5"));
            let res = Some([40.0, 4.0, 4.0]);
            write_volumes(
                &path,
                &[
                    (crate::cremi::RAW_KEY, VolumeData::U8(raw.view()), res),
                    (crate::cremi::LABEL_KEY, VolumeData::U64(ids.view()), res),
                ],
            )?;
            Ok(path)
        })
        .collect()
}

/// Parameters of [`phase_contrast_cells`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct CellImageOptions {
    pub height: usize,
    pub width: usize,
    pub cells: usize,
    /// Cell radii are drawn from this range (pixels).
    pub radius: (f64, f64),
    /// Probability that a cell is placed touching or overlapping an earlier one.
    pub touching: f64,
}

impl Default for CellImageOptions {
    fn default() -> Self {
        CellImageOptions {
            height: 160,
            width: 208,
            cells: 14,
            radius: (9.0, 17.0),
            touching: 0.4,
        }
    }
}

/// A synthetic phase-contrast image with its cells as COCO polygons and instance labels.
#[derive(Debug, Clone)]
pub struct SyntheticCells {
    pub image: Array2<u8>,
    /// One polygon per cell (flat `[x0, y0, …]`), in creation order.
    pub polygons: Vec<Vec<f64>>,
    /// The labels torch-em makes of those polygons (larger cells win overlaps, ids under 50 px
    /// removed, consecutive).
    pub labels: Array2<u16>,
}

/// Irregular, elongated blobs on an uneven background, darker inside with bright halos outside
/// (the look of phase contrast), some touching or overlapping, plus noise. Deterministic in
/// `seed`.
pub fn phase_contrast_cells(options: &CellImageOptions, seed: u64) -> SyntheticCells {
    let mut rng = SplitMix64::new(seed);
    let (h, w) = (options.height, options.width);
    let mut centres: Vec<(f64, f64, f64)> = Vec::new();
    let mut polygons = Vec::new();
    for _ in 0..options.cells {
        let r = options.radius.0 + (options.radius.1 - options.radius.0) * rng.uniform();
        let (cy, cx) = match centres.last() {
            Some(&(py, px, pr)) if rng.uniform() < options.touching => {
                let angle = rng.uniform() * std::f64::consts::TAU;
                let dist = (pr + r) * (0.8 + 0.2 * rng.uniform());
                (py + dist * angle.sin(), px + dist * angle.cos())
            }
            _ => (
                r + rng.uniform() * (h as f64 - 2.0 * r),
                r + rng.uniform() * (w as f64 - 2.0 * r),
            ),
        };
        centres.push((cy, cx, r));
        let (elong, tilt) = (
            0.6 + 0.4 * rng.uniform(),
            rng.uniform() * std::f64::consts::PI,
        );
        let waves: Vec<(f64, f64, f64)> = (2..5)
            .map(|k| (k as f64, 0.08 * rng.uniform(), rng.uniform() * 6.3))
            .collect();
        let n = 28;
        let mut poly = Vec::with_capacity(2 * n);
        for i in 0..n {
            let t = i as f64 / n as f64 * std::f64::consts::TAU;
            let radial = 1.0
                + waves
                    .iter()
                    .map(|(k, a, p)| a * (k * t + p).sin())
                    .sum::<f64>();
            let (ey, ex) = (r * radial * elong * t.sin(), r * radial * t.cos());
            let (y, x) = (
                cy + ey * tilt.cos() + ex * tilt.sin(),
                cx - ey * tilt.sin() + ex * tilt.cos(),
            );
            poly.push((x * 100.0).round() / 100.0);
            poly.push((y * 100.0).round() / 100.0);
        }
        polygons.push(poly);
    }
    let image_info = CocoImage {
        id: 0,
        width: w,
        height: h,
        file_name: String::new(),
    };
    let annotations = cell_annotations(&polygons, h, w, 0, 0);
    let refs: Vec<&CocoAnnotation> = annotations.iter().collect();
    let (labels, _) = crate::livecell::annotations_to_labels(&image_info, &refs, 50);
    let labels = labels.expect("far fewer than 65535 cells");

    let inside = labels.mapv(|v| if v > 0 { 1.0f32 } else { 0.0 });
    let (mut near, mut wide) = (inside.clone(), inside.clone());
    box_blur(&mut near, 1, 2);
    box_blur(&mut wide, 4, 2);
    let mut image = Array2::<f32>::zeros((h, w));
    Zip::indexed(&mut image)
        .and(&inside)
        .and(&near)
        .and(&wide)
        .for_each(|(y, x), out, &cell, &near, &wide| {
            let background =
                118.0 + 22.0 * (x as f32 / w as f32) + 10.0 * (y as f32 / h as f32 * 3.1).sin();
            *out = if cell > 0.5 {
                background - 45.0 + 25.0 * (1.0 - near) // darker inside, a darker rim
            } else {
                background + 190.0 * near + 45.0 * wide // a narrow bright halo over a wider glow
            };
        });
    box_blur(&mut image, 1, 1);
    let image = image.mapv(|v| {
        (f64::from(v) + 5.0 * normal(&mut rng))
            .round()
            .clamp(0.0, 255.0) as u8
    });
    SyntheticCells {
        image,
        polygons,
        labels,
    }
}

/// COCO annotations for polygons; the area is the rasterised pixel count, as COCO computes it.
fn cell_annotations(
    polygons: &[Vec<f64>],
    h: usize,
    w: usize,
    image_id: u64,
    first_id: u64,
) -> Vec<CocoAnnotation> {
    polygons
        .iter()
        .enumerate()
        .map(|(i, p)| CocoAnnotation {
            id: first_id + i as u64,
            image_id,
            category_id: 1,
            area: seg_io::coco::polygon_mask(p, h, w)
                .iter()
                .filter(|v| **v)
                .count() as f64,
            segmentation: Segmentation::Polygons(vec![p.clone()]),
            iscrowd: 0,
        })
        .collect()
}

/// Writes a synthetic dataset in the LIVECell layout under `root`: `train.json`, `val.json`,
/// `test.json` and the images (cell type "SYN"; train/val in per-cell-type folders, test flat,
/// so both archive layouts are exercised). `counts` is the number of images per split.
pub fn write_livecell_like(
    root: &Path,
    counts: [usize; 3],
    options: &CellImageOptions,
    seed: u64,
) -> Result<()> {
    use crate::livecell::Split;
    let mut annotation_id = 1u64;
    for (s, split) in Split::ALL.iter().enumerate() {
        let folder = root.join("images").join(split.image_folder());
        let folder = if *split == Split::Test {
            folder
        } else {
            folder.join("SYN")
        };
        std::fs::create_dir_all(&folder).map_err(|source| Error::Io {
            path: folder.clone(),
            source,
        })?;
        let mut images = Vec::new();
        let mut annotations = Vec::new();
        for i in 0..counts[s] {
            let image_id = (s * 100_000 + i) as u64 + 1;
            let cells = phase_contrast_cells(options, seed.wrapping_add(image_id * 7919));
            let file_name = format!("SYN_Phase_{}_{i:04}_1.tif", split.name());
            write_tiff(
                folder.join(&file_name),
                cells.image.view(),
                &WriteOptions::default(),
            )?;
            annotations.extend(cell_annotations(
                &cells.polygons,
                options.height,
                options.width,
                image_id,
                annotation_id,
            ));
            annotation_id += cells.polygons.len() as u64;
            images.push(serde_json::json!({
                "id": image_id, "width": options.width, "height": options.height, "file_name": file_name,
            }));
        }
        let annotations: Vec<serde_json::Value> = annotations
            .iter()
            .map(|a| {
                let Segmentation::Polygons(p) = &a.segmentation else {
                    unreachable!("polygons only")
                };
                serde_json::json!({
                    "id": a.id, "image_id": a.image_id, "category_id": 1, "segmentation": p,
                    "area": a.area, "iscrowd": 0, "bbox": [0, 0, 0, 0],
                })
            })
            .collect();
        let json = serde_json::json!({
            "info": {"description": "synthetic LIVECell-layout data generated by vimseg (not LIVECell)"},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "cell"}],
        });
        let path = root.join(format!("{}.json", split.name()));
        seg_io::atomic::write_atomically(&path, |w| {
            serde_json::to_writer(w, &json).map_err(|e| seg_io::Error::Content {
                path: path.clone(),
                what: e.to_string(),
            })
        })?;
    }
    Ok(())
}
