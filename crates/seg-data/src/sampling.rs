//! Training patches as torch-em samples them, and a batch loader that prepares batches on
//! worker threads.
//!
//! Per sample, in torch-em's order: random crop (start drawn from `0..size − patch`, the last
//! valid start never drawn; zero padding when the image is smaller than the patch) → rejection
//! by the [`MinInstances`] rule → per-patch standardisation `(x − mean) / (std + 1e-7)` → the
//! label transform (targets, supplied by the caller) → joint augmentation of raw and targets
//! (flips with p = 0.5 each; rot90 and intensity jitter only when asked).
//!
//! Every batch is drawn from its own generator, seeded by (seed, epoch, batch index), so the
//! batches do not depend on how many worker threads prepare them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use ndarray::{s, Array2, Array3, Array4, ArrayView2, Axis};

use crate::cremi::CremiVolume;
use crate::synthetic::SplitMix64;
use crate::{Error, Result};
use seg_io::tiff::read_tiff;

/// Images to sample patches from: raw intensities and instance labels of one 2-D image each.
pub trait ImageSource: Send + Sync {
    /// Number of images (slices for volumes).
    fn len(&self) -> usize;
    /// Whether there is no image.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `(height, width)` of image `index`.
    fn shape(&self, index: usize) -> Result<(usize, usize)>;
    /// The window `[y, y + h) × [x, x + w)` of image `index` (inside the image).
    fn window(
        &self,
        index: usize,
        y: usize,
        x: usize,
        h: usize,
        w: usize,
    ) -> Result<(Array2<f32>, Array2<u32>)>;
    /// Samples per epoch for a patch size: torch-em's `int(prod(size / patch))` summed.
    fn samples_per_epoch(&self, patch: (usize, usize)) -> Result<usize>;
    /// Whether an epoch visits images in order (LIVECell) rather than at random (volumes).
    fn ordered(&self) -> bool;
    /// Image `index` as messages name it: its file where it has one.
    fn name(&self, index: usize) -> String {
        format!("image {index}")
    }
}

/// 2-D image and label files (e.g. a LIVECell split), read when sampled.
pub struct ImageFiles {
    pairs: Vec<(PathBuf, PathBuf)>,
    shapes: Vec<(usize, usize)>,
}

impl ImageFiles {
    /// Checks that every pair exists and has matching 2-D shapes (reads each file once).
    ///
    /// # Errors
    /// The reader's errors, or [`Error::Content`] for mismatched shapes.
    pub fn new(pairs: Vec<(PathBuf, PathBuf)>) -> Result<ImageFiles> {
        let shapes = pairs
            .iter()
            .map(|(image, labels)| {
                let a = read_tiff(image)?;
                if let seg_io::tiff::TiffImage::F32(values) = &a {
                    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                        return Err(Error::Content {
                            path: image.clone(),
                            what: format!("holds {v}; training images must be finite"),
                        });
                    }
                }
                let b = read_tiff(labels)?;
                match (a.shape(), b.shape()) {
                    ([h, w], [lh, lw]) if (h, w) == (lh, lw) => Ok((*h, *w)),
                    (sa, sb) => Err(Error::Content {
                        path: labels.clone(),
                        what: format!(
                            "labels of shape {sb:?} for image {} of shape {sa:?}",
                            image.display()
                        ),
                    }),
                }
            })
            .collect::<Result<_>>()?;
        Ok(ImageFiles { pairs, shapes })
    }
}

impl ImageSource for ImageFiles {
    fn len(&self) -> usize {
        self.pairs.len()
    }
    fn shape(&self, index: usize) -> Result<(usize, usize)> {
        Ok(self.shapes[index])
    }
    fn window(
        &self,
        index: usize,
        y: usize,
        x: usize,
        h: usize,
        w: usize,
    ) -> Result<(Array2<f32>, Array2<u32>)> {
        let (image, labels) = &self.pairs[index];
        let raw = read_tiff(image)?.into_f32();
        let ids = read_tiff(labels)?.into_label_ids()?;
        let cut = |a: ndarray::ArrayViewD<f32>| a.slice(s![y..y + h, x..x + w]).to_owned();
        let raw = cut(raw.view());
        let ids = ids.slice(s![y..y + h, x..x + w]).to_owned();
        Ok((raw, ids))
    }
    fn samples_per_epoch(&self, _patch: (usize, usize)) -> Result<usize> {
        Ok(self.pairs.len())
    }
    fn ordered(&self) -> bool {
        true
    }
    fn name(&self, index: usize) -> String {
        match self.pairs.get(index) {
            Some((image, labels)) => {
                format!("{} with labels {}", image.display(), labels.display())
            }
            None => format!("image {index}"),
        }
    }
}

/// Slices of CREMI volumes held in memory; a sample is a random slice of a random volume.
pub struct VolumeSlices {
    volumes: Vec<CremiVolume>,
}

impl VolumeSlices {
    pub fn new(volumes: Vec<CremiVolume>) -> VolumeSlices {
        VolumeSlices { volumes }
    }

    fn locate(&self, index: usize) -> Result<(&CremiVolume, usize)> {
        let mut rest = index;
        for v in &self.volumes {
            if rest < v.raw.dim().0 {
                return Ok((v, rest));
            }
            rest -= v.raw.dim().0;
        }
        Err(Error::Conversion {
            from: "volumes",
            to: "a slice",
            what: format!("slice {index} out of {} slices", self.len()),
        })
    }
}

impl ImageSource for VolumeSlices {
    fn len(&self) -> usize {
        self.volumes.iter().map(|v| v.raw.dim().0).sum()
    }
    fn shape(&self, index: usize) -> Result<(usize, usize)> {
        let (v, _) = self.locate(index)?;
        Ok((v.raw.dim().1, v.raw.dim().2))
    }
    fn window(
        &self,
        index: usize,
        y: usize,
        x: usize,
        h: usize,
        w: usize,
    ) -> Result<(Array2<f32>, Array2<u32>)> {
        let (v, z) = self.locate(index)?;
        Ok((
            v.raw.slice(s![z, y..y + h, x..x + w]).mapv(f32::from),
            v.labels.slice(s![z, y..y + h, x..x + w]).to_owned(),
        ))
    }
    fn samples_per_epoch(&self, patch: (usize, usize)) -> Result<usize> {
        Ok(self
            .volumes
            .iter()
            .map(|v| {
                let (d, h, w) = v.raw.dim();
                (d as f64 * (h as f64 / patch.0 as f64) * (w as f64 / patch.1 as f64)) as usize
            })
            .sum())
    }
    fn ordered(&self) -> bool {
        false
    }
}

/// torch-em's `MinInstanceSampler`: a patch is kept when its labels hold at least `min` distinct
/// values (background included); otherwise it is redrawn, up to `max_attempts` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinInstances {
    pub min: usize,
    pub max_attempts: usize,
}

impl Default for MinInstances {
    /// The paper's CREMI setting: at least 2 values, 500 attempts.
    fn default() -> Self {
        MinInstances {
            min: 2,
            max_attempts: 500,
        }
    }
}

/// Augmentations; `Default` is the paper's (flips only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    /// Probability of each of the horizontal and vertical flips.
    pub flip: f64,
    /// Rotate by a random multiple of 90° (square patches only). Not in the paper.
    pub rot90: bool,
    /// Multiply the standardised raw patch by `1 + U(−j, j)` and add `U(−j, j)`. Not in the
    /// paper; 0 disables it.
    pub intensity_jitter: f32,
}

impl Default for Augmentation {
    fn default() -> Self {
        Augmentation {
            flip: 0.5,
            rot90: false,
            intensity_jitter: 0.0,
        }
    }
}

/// Turns a label patch into its target stack `(C, h, w)`.
pub type LabelTransform = Arc<dyn Fn(ArrayView2<u32>) -> Result<Array3<f32>> + Send + Sync>;

/// Options of [`BatchLoader`].
#[non_exhaustive]
#[derive(Clone)]
pub struct LoaderOptions {
    pub patch: (usize, usize),
    pub batch_size: usize,
    pub seed: u64,
    /// `None`: no rejection (LIVECell in the paper).
    pub min_instances: Option<MinInstances>,
    pub augmentation: Augmentation,
    /// Visit ordered sources in a random order each epoch (torch-em's paper-era loaders did
    /// not shuffle).
    pub shuffle: bool,
    /// Threads preparing batches.
    pub workers: usize,
}

impl Default for LoaderOptions {
    /// The paper's training batches: two 512² patches, flips, no rejection, no shuffling, two
    /// workers, seed 0.
    fn default() -> Self {
        LoaderOptions {
            patch: (512, 512),
            batch_size: 2,
            seed: 0,
            min_instances: None,
            augmentation: Augmentation::default(),
            shuffle: false,
            workers: 2,
        }
    }
}

/// One training batch: raw `(B, 1, h, w)` standardised, targets `(B, C, h, w)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub raw: Array4<f32>,
    pub targets: Array4<f32>,
}

/// Standardises in place: `(x − mean) / (std + 1e-7)` over the whole patch (population std).
pub fn standardize(x: &mut Array2<f32>) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|v| (f64::from(*v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let std = var.sqrt();
    x.mapv_inplace(|v| ((f64::from(v) - mean) / (std + 1e-7)) as f32);
}

/// torch-em's crop start for one axis: `randint(0, size − patch)` (exclusive), 0 if the image
/// is not larger than the patch.
fn crop_start(rng: &mut SplitMix64, size: usize, patch: usize) -> usize {
    if size > patch {
        rng.below(size - patch)
    } else {
        0
    }
}

/// Draws one patch: crop (with zero padding to the patch size), rejection, standardisation,
/// targets, augmentation.
///
/// # Errors
/// The source's and transform's errors; [`Error::Conversion`] when no patch passes the
/// rejection rule within its attempts.
pub fn sample_patch(
    source: &dyn ImageSource,
    index: usize,
    options: &LoaderOptions,
    transform: &LabelTransform,
    rng: &mut SplitMix64,
) -> Result<(Array2<f32>, Array3<f32>)> {
    let (ph, pw) = options.patch;
    let attempts = options.min_instances.map_or(1, |m| m.max_attempts.max(1));
    let mut index = index;
    for attempt in 0..attempts {
        if attempt > 0 && !source.ordered() {
            index = rng.below(source.len());
        }
        let (h, w) = source.shape(index)?;
        let (y, x) = (crop_start(rng, h, ph), crop_start(rng, w, pw));
        let (ch, cw) = (ph.min(h), pw.min(w));
        let (raw_part, ids_part) = source.window(index, y, x, ch, cw)?;
        let mut raw = Array2::<f32>::zeros((ph, pw));
        let mut ids = Array2::<u32>::zeros((ph, pw));
        raw.slice_mut(s![..ch, ..cw]).assign(&raw_part);
        ids.slice_mut(s![..ch, ..cw]).assign(&ids_part);
        if let Some(m) = options.min_instances {
            let mut values: Vec<u32> = ids.iter().copied().collect();
            values.sort_unstable();
            values.dedup();
            if values.len() < m.min {
                continue;
            }
        }
        standardize(&mut raw);
        let mut targets = transform(ids.view())?;
        augment(&mut raw, &mut targets, &options.augmentation, rng);
        return Ok((raw, targets));
    }
    Err(Error::Conversion {
        from: "images",
        to: "patches",
        what: format!(
            "no {ph}x{pw} patch with at least {} label values in {attempts} attempts ({})",
            options.min_instances.map_or(0, |m| m.min),
            source.name(index)
        ),
    })
}

fn augment(
    raw: &mut Array2<f32>,
    targets: &mut Array3<f32>,
    a: &Augmentation,
    rng: &mut SplitMix64,
) {
    // Decisions are drawn in a fixed order so that a seed always gives the same augmentation.
    let flip_x = rng.uniform() < a.flip;
    let flip_y = rng.uniform() < a.flip;
    let turns = if a.rot90 && raw.nrows() == raw.ncols() {
        rng.below(4)
    } else {
        0
    };
    let (gain, offset) = if a.intensity_jitter > 0.0 {
        let j = f64::from(a.intensity_jitter);
        (
            (1.0 + (rng.uniform() * 2.0 - 1.0) * j) as f32,
            ((rng.uniform() * 2.0 - 1.0) * j) as f32,
        )
    } else {
        (1.0, 0.0)
    };
    let transform = |mut v: ndarray::ArrayViewMut2<f32>| {
        if flip_x {
            v.invert_axis(Axis(1));
        }
        if flip_y {
            v.invert_axis(Axis(0));
        }
        for _ in 0..turns {
            v.swap_axes(0, 1);
            v.invert_axis(Axis(1));
        }
        v.to_owned()
    };
    *raw = transform(raw.view_mut());
    for mut c in targets.outer_iter_mut() {
        let t = transform(c.view_mut());
        c.assign(&t);
    }
    if gain != 1.0 || offset != 0.0 {
        raw.mapv_inplace(|v| v * gain + offset);
    }
}

/// Iterates over the batches of one epoch, prepared by worker threads in order.
pub struct BatchLoader {
    receiver: mpsc::Receiver<(usize, Result<Batch>)>,
    pending: BTreeMap<usize, Result<Batch>>,
    next: usize,
    batches: usize,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl BatchLoader {
    /// Starts the workers for epoch `epoch` (samples per epoch from the source, in batches of
    /// `batch_size`, the last one partial).
    pub fn epoch(
        source: Arc<dyn ImageSource>,
        transform: LabelTransform,
        options: &LoaderOptions,
        epoch: u64,
    ) -> Result<BatchLoader> {
        let samples = source.samples_per_epoch(options.patch)?.max(1);
        let batch_size = options.batch_size.max(1);
        let batches = samples.div_ceil(batch_size);
        let mut order: Vec<usize> = (0..source.len()).collect();
        if options.shuffle {
            let mut rng = SplitMix64::new(options.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
        }
        let order = Arc::new(order);
        let workers = options.workers.max(1);
        // Bounded: at most two batches per worker wait ahead of the consumer.
        let (sender, receiver) = mpsc::sync_channel(2 * workers);
        let handles = (0..workers)
            .map(|w| {
                let (source, transform, options, order, sender) = (
                    source.clone(),
                    transform.clone(),
                    options.clone(),
                    order.clone(),
                    sender.clone(),
                );
                std::thread::spawn(move || {
                    for b in (w..batches).step_by(workers) {
                        let batch = make_batch(
                            &*source, &transform, &options, &order, epoch, b, samples, batch_size,
                        );
                        if sender.send((b, batch)).is_err() {
                            return; // the loader was dropped
                        }
                    }
                })
            })
            .collect();
        Ok(BatchLoader {
            receiver,
            pending: BTreeMap::new(),
            next: 0,
            batches,
            workers: handles,
        })
    }

    /// Number of batches in the epoch.
    pub fn len(&self) -> usize {
        self.batches
    }

    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }
}

#[allow(clippy::too_many_arguments)]
fn make_batch(
    source: &dyn ImageSource,
    transform: &LabelTransform,
    options: &LoaderOptions,
    order: &[usize],
    epoch: u64,
    batch: usize,
    samples: usize,
    batch_size: usize,
) -> Result<Batch> {
    let mut rng = SplitMix64::new(
        options.seed
            ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (batch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
    );
    let first = batch * batch_size;
    let count = batch_size.min(samples - first);
    let mut raws = Vec::with_capacity(count);
    let mut targets = Vec::with_capacity(count);
    for k in first..first + count {
        let index = if source.ordered() {
            order[k % order.len()]
        } else {
            rng.below(source.len())
        };
        let (raw, t) = sample_patch(source, index, options, transform, &mut rng)?;
        raws.push(raw.insert_axis(Axis(0)));
        targets.push(t);
    }
    let raw_views: Vec<_> = raws.iter().map(|r| r.view()).collect();
    let target_views: Vec<_> = targets.iter().map(|t| t.view()).collect();
    Ok(Batch {
        raw: ndarray::stack(Axis(0), &raw_views).map_err(|e| shape_error(e.to_string()))?,
        targets: ndarray::stack(Axis(0), &target_views).map_err(|e| shape_error(e.to_string()))?,
    })
}

fn shape_error(what: String) -> Error {
    Error::Conversion {
        from: "patches",
        to: "a batch",
        what,
    }
}

impl Iterator for BatchLoader {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.batches {
            return None;
        }
        while !self.pending.contains_key(&self.next) {
            match self.receiver.recv() {
                Ok((b, batch)) => {
                    self.pending.insert(b, batch);
                }
                Err(_) => return None,
            }
        }
        let batch = self.pending.remove(&self.next);
        self.next += 1;
        batch
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        // Unblock workers waiting to send, then wait for them.
        while self.receiver.try_recv().is_ok() {}
        let workers = std::mem::take(&mut self.workers);
        drop(std::mem::replace(
            &mut self.receiver,
            mpsc::sync_channel(0).1,
        ));
        for w in workers {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cremi::CremiVolume;

    fn volume(d: usize, h: usize, w: usize) -> CremiVolume {
        CremiVolume {
            raw: Array3::from_shape_fn((d, h, w), |(z, y, x)| {
                ((z * 31 + y * 7 + x * 3) % 251) as u8
            }),
            labels: Array3::from_shape_fn((d, h, w), |(z, y, x)| {
                (z * 100 + (y / 8) * 10 + x / 8) as u32
            }),
            resolution: None,
            slices: 0..d,
        }
    }

    fn identity_targets() -> LabelTransform {
        Arc::new(|ids: ArrayView2<u32>| Ok(ids.mapv(|v| v as f32).insert_axis(Axis(0))))
    }

    fn options(workers: usize) -> LoaderOptions {
        LoaderOptions {
            patch: (16, 16),
            batch_size: 3,
            seed: 7,
            min_instances: Some(MinInstances::default()),
            augmentation: Augmentation::default(),
            shuffle: false,
            workers,
        }
    }

    #[test]
    fn crop_starts_follow_torch_em() {
        let mut rng = SplitMix64::new(1);
        let starts: Vec<usize> = (0..2000).map(|_| crop_start(&mut rng, 20, 16)).collect();
        assert_eq!(
            *starts.iter().max().unwrap(),
            3,
            "the last valid start (4) is never drawn"
        );
        assert_eq!(*starts.iter().min().unwrap(), 0);
        assert_eq!(crop_start(&mut rng, 16, 16), 0);
        assert_eq!(crop_start(&mut rng, 10, 16), 0);
    }

    #[test]
    fn standardisation_gives_zero_mean_unit_std() {
        let mut x = Array2::from_shape_fn((9, 7), |(y, x)| (y * 7 + x) as f32 * 3.0 + 10.0);
        standardize(&mut x);
        let n = x.len() as f32;
        let mean = x.sum() / n;
        let std = (x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
        assert!(
            mean.abs() < 1e-5 && (std - 1.0).abs() < 1e-5,
            "{mean} {std}"
        );
        let mut flat = Array2::from_elem((3, 3), 5.0f32);
        standardize(&mut flat);
        assert!(flat.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn small_images_are_zero_padded_and_flips_are_joint() {
        let mut v = volume(2, 10, 12);
        v.labels.mapv_inplace(|id| id + 1); // no 0 inside the image: 0 marks the padding
        let source = VolumeSlices::new(vec![v]);
        let opts = LoaderOptions {
            min_instances: None,
            ..options(1)
        };
        let mut rng = SplitMix64::new(3);
        for _ in 0..20 {
            let (raw, targets) =
                sample_patch(&source, 0, &opts, &identity_targets(), &mut rng).unwrap();
            assert_eq!(raw.dim(), (16, 16));
            assert_eq!(targets.dim(), (1, 16, 16));
            // The padded region is where the identity target is 0: raw and target moved together,
            // and padding holds the standardised value of 0.
            let zero_ids = targets
                .index_axis(Axis(0), 0)
                .iter()
                .filter(|v| **v == 0.0)
                .count();
            assert_eq!(zero_ids, 16 * 16 - 10 * 12);
            let pad = targets
                .index_axis(Axis(0), 0)
                .iter()
                .zip(&raw)
                .filter(|(t, _)| **t == 0.0)
                .map(|(_, r)| *r)
                .collect::<Vec<_>>();
            assert!(pad.windows(2).all(|w| w[0] == w[1]));
        }
    }

    #[test]
    fn patches_with_too_few_labels_are_redrawn_or_refused() {
        let mut flat = volume(3, 40, 40);
        flat.labels.fill(5);
        let source = VolumeSlices::new(vec![flat]);
        let opts = LoaderOptions {
            min_instances: Some(MinInstances {
                min: 2,
                max_attempts: 20,
            }),
            ..options(1)
        };
        let err = sample_patch(
            &source,
            0,
            &opts,
            &identity_targets(),
            &mut SplitMix64::new(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("20 attempts"), "{err}");
        let varied = VolumeSlices::new(vec![volume(3, 40, 40)]);
        let (_, t) = sample_patch(
            &varied,
            0,
            &opts,
            &identity_targets(),
            &mut SplitMix64::new(1),
        )
        .unwrap();
        let mut values: Vec<u32> = t.iter().map(|v| *v as u32).collect();
        values.sort_unstable();
        values.dedup();
        assert!(values.len() >= 2);
    }

    #[test]
    fn batches_do_not_depend_on_the_number_of_workers() {
        let source: Arc<dyn ImageSource> = Arc::new(VolumeSlices::new(vec![
            volume(4, 48, 40),
            volume(3, 48, 40),
        ]));
        let run = |workers| -> Vec<Batch> {
            BatchLoader::epoch(source.clone(), identity_targets(), &options(workers), 2)
                .unwrap()
                .map(|b| b.unwrap())
                .collect()
        };
        let one = run(1);
        assert_eq!(
            one.len(),
            (source.samples_per_epoch((16, 16)).unwrap()).div_ceil(3)
        );
        assert_eq!(one, run(3));
        let last = one.last().unwrap();
        assert_eq!(last.raw.dim().1, 1);
        assert_eq!(last.raw.dim().2, 16);
        let other_epoch: Vec<Batch> =
            BatchLoader::epoch(source.clone(), identity_targets(), &options(2), 3)
                .unwrap()
                .map(|b| b.unwrap())
                .collect();
        assert_ne!(one[0], other_epoch[0]);
    }

    #[test]
    fn dropping_a_loader_early_stops_its_workers() {
        let source: Arc<dyn ImageSource> = Arc::new(VolumeSlices::new(vec![volume(6, 64, 64)]));
        let mut loader = BatchLoader::epoch(source, identity_targets(), &options(2), 0).unwrap();
        assert!(loader.next().is_some());
        drop(loader); // must not hang
    }

    #[test]
    fn rot90_and_jitter_are_off_by_default_and_work_when_asked() {
        let source = VolumeSlices::new(vec![volume(1, 16, 16)]);
        let plain = LoaderOptions {
            min_instances: None,
            augmentation: Augmentation {
                flip: 0.0,
                ..Default::default()
            },
            ..options(1)
        };
        let (raw, t) = sample_patch(
            &source,
            0,
            &plain,
            &identity_targets(),
            &mut SplitMix64::new(4),
        )
        .unwrap();
        assert_eq!(
            t.index_axis(Axis(0), 0),
            source.window(0, 0, 0, 16, 16).unwrap().1.mapv(|v| v as f32)
        );
        let rotating = LoaderOptions {
            augmentation: Augmentation {
                flip: 0.0,
                rot90: true,
                intensity_jitter: 0.2,
            },
            ..plain
        };
        let mut seen_rotation = false;
        for seed in 0..16 {
            let (r, tt) = sample_patch(
                &source,
                0,
                &rotating,
                &identity_targets(),
                &mut SplitMix64::new(seed),
            )
            .unwrap();
            seen_rotation |= tt != t;
            assert_ne!(r, raw);
        }
        assert!(seen_rotation);
    }
}
