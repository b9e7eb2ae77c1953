//! The paper's two instance post-processing recipes (torch-em's `watershed_from_components` and
//! `watershed_from_center_and_boundary_distances`) and the size filter they share.

use ndarray::{Array, ArrayView, Dimension, Zip};
use seg_targets::{
    connected_components, relabel_sequential, remove_small_objects, Connectivity, Label,
};

use crate::flood::{check_finite, seeded_watershed, WatershedOptions};
use crate::smoothing::gaussian_smoothing;
use crate::{Error, Result};

/// Removes objects with fewer than `min_size` pixels (set to 0) and relabels the rest 1…N,
/// as torch-em's `size_filter` without a height map. `min_size = 0` only relabels.
///
/// # Errors
/// [`Error::Labels`] past u32 ids.
pub fn size_filter<T: Label, D: Dimension>(
    segmentation: ArrayView<T, D>,
    min_size: usize,
) -> Result<Array<u32, D>> {
    let kept = remove_small_objects(segmentation, min_size);
    Ok(relabel_sequential(kept.view())?.0)
}

/// Seeds from a binary map: its connected components with full connectivity (skimage's
/// `label`), ids 1…N in raster order.
///
/// # Errors
/// [`Error::Labels`] for unsupported shapes.
pub fn seeds_from_mask<D: Dimension>(mask: ArrayView<bool, D>) -> Result<Array<u32, D>> {
    Ok(connected_components(mask, Connectivity::Full)?.0)
}

/// Options of [`watershed_from_boundaries`]; `Default` is the paper's values.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoundaryRecipe {
    /// Seeds are the components of `foreground − boundaries > seed_threshold` (torch-em
    /// `threshold1`).
    pub seed_threshold: f32,
    /// The flooding mask is `foreground > foreground_threshold` (torch-em `threshold2`).
    pub foreground_threshold: f32,
    /// Objects under this many pixels are removed after flooding.
    pub min_size: usize,
    pub watershed: WatershedOptions,
}

impl Default for BoundaryRecipe {
    fn default() -> Self {
        BoundaryRecipe {
            seed_threshold: 0.5,
            foreground_threshold: 0.5,
            min_size: 50,
            watershed: WatershedOptions::default(),
        }
    }
}

/// Instance segmentation from boundary (and foreground) probabilities, as torch-em's
/// `watershed_from_components`:
///
/// 1. seeds = connected components of `(foreground − boundaries) > seed_threshold`;
/// 2. mask = `foreground > foreground_threshold`;
/// 3. seeded watershed of the boundary map inside the mask;
/// 4. [`size_filter`] with `min_size`.
///
/// `foreground = None` is the CREMI form: an all-ones foreground, so seeds are the components of
/// `boundaries < 1 − seed_threshold` and every pixel is flooded. Arithmetic and comparisons are
/// in f32, as numpy does them on float32 predictions.
///
/// ```
/// use ndarray::array;
/// use watershed::{watershed_from_boundaries, BoundaryRecipe};
///
/// let boundaries = array![[0.0f32, 0.1, 0.9, 0.9, 0.2, 0.0]];
/// let mut recipe = BoundaryRecipe::default();
/// recipe.min_size = 0;
/// let seg = watershed_from_boundaries(boundaries.view(), None, &recipe)?;
/// assert_eq!(seg, array![[1u32, 1, 1, 2, 2, 2]]);
/// # Ok::<(), watershed::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`], [`Error::NotANumber`] and [`Error::Infinite`] for a map that is
/// not finite, [`Error::InvalidOption`] for a NaN threshold, [`Error::Dimensionality`].
pub fn watershed_from_boundaries<D: Dimension>(
    boundaries: ArrayView<f32, D>,
    foreground: Option<ArrayView<f32, D>>,
    recipe: &BoundaryRecipe,
) -> Result<Array<u32, D>> {
    check_thresholds(&[
        ("seed_threshold", recipe.seed_threshold),
        ("foreground_threshold", recipe.foreground_threshold),
    ])?;
    check_finite("boundary map", &boundaries)?;
    let (seed_mask, mask) = match &foreground {
        Some(fg) => {
            check_companion("foreground map", fg, &boundaries)?;
            let seeds = Zip::from(fg)
                .and(&boundaries)
                .map_collect(|f, b| f - b > recipe.seed_threshold);
            (seeds, Some(fg.mapv(|f| f > recipe.foreground_threshold)))
        }
        None => (
            boundaries.mapv(|b| 1.0f32 - b > recipe.seed_threshold),
            None,
        ),
    };
    let seeds = seeds_from_mask(seed_mask.view())?;
    let seg = seeded_watershed(
        boundaries,
        seeds.view(),
        mask.as_ref().map(|m| m.view()),
        &recipe.watershed,
    )?;
    size_filter(seg.view(), recipe.min_size)
}

/// Options of [`watershed_from_distances`]; `Default` is the paper's LIVECell values (torch-em's
/// function defaults differ: σ 1.6, boundary threshold 0.5, no size filter).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistanceRecipe {
    pub center_threshold: f32,
    pub boundary_threshold: f32,
    pub foreground_threshold: f32,
    /// σ of the Gaussian applied to both distance maps.
    pub smoothing: f64,
    pub min_size: usize,
    pub watershed: WatershedOptions,
}

impl Default for DistanceRecipe {
    fn default() -> Self {
        DistanceRecipe {
            center_threshold: 0.5,
            boundary_threshold: 0.6,
            foreground_threshold: 0.5,
            smoothing: 1.0,
            min_size: 50,
            watershed: WatershedOptions::default(),
        }
    }
}

/// Instance segmentation from centre-distance, boundary-distance and foreground predictions,
/// as torch-em's `watershed_from_center_and_boundary_distances`:
///
/// 1. both distance maps smoothed with [`gaussian_smoothing`] (σ = `smoothing`);
/// 2. mask = `foreground > foreground_threshold`;
/// 3. seeds = components of `center < center_threshold ∧ boundary < boundary_threshold ∧ mask`;
/// 4. seeded watershed of the smoothed boundary-distance map inside the mask;
/// 5. [`size_filter`] with `min_size`.
///
/// # Errors
/// [`Error::ShapeMismatch`], [`Error::NotANumber`] and [`Error::Infinite`] for a map that is
/// not finite, [`Error::Dimensionality`], [`Error::InvalidOption`] for a bad σ or a NaN
/// threshold.
pub fn watershed_from_distances<D: Dimension>(
    center: ArrayView<f32, D>,
    boundary: ArrayView<f32, D>,
    foreground: ArrayView<f32, D>,
    recipe: &DistanceRecipe,
) -> Result<Array<u32, D>> {
    check_thresholds(&[
        ("center_threshold", recipe.center_threshold),
        ("boundary_threshold", recipe.boundary_threshold),
        ("foreground_threshold", recipe.foreground_threshold),
    ])?;
    check_companion("centre-distance map", &center, &boundary)?;
    check_companion("foreground map", &foreground, &boundary)?;
    check_finite("boundary-distance map", &boundary)?;
    let center = gaussian_smoothing(center, recipe.smoothing)?;
    let boundary = gaussian_smoothing(boundary, recipe.smoothing)?;
    let mask = foreground.mapv(|f| f > recipe.foreground_threshold);
    let marker_map = Zip::from(&center)
        .and(&boundary)
        .and(&mask)
        .map_collect(|c, b, m| {
            *m && *c < recipe.center_threshold && *b < recipe.boundary_threshold
        });
    let seeds = seeds_from_mask(marker_map.view())?;
    let seg = seeded_watershed(
        boundary.view(),
        seeds.view(),
        Some(mask.view()),
        &recipe.watershed,
    )?;
    size_filter(seg.view(), recipe.min_size)
}

/// Thresholds must be numbers: a NaN threshold would silently select nothing.
fn check_thresholds(thresholds: &[(&'static str, f32)]) -> Result<()> {
    for &(name, value) in thresholds {
        if value.is_nan() {
            return Err(Error::InvalidOption {
                name,
                value: value.to_string(),
                reason: "a threshold must be a number",
            });
        }
    }
    Ok(())
}

/// A second input map must have the first one's shape and only finite values.
fn check_companion<D: Dimension>(
    what: &'static str,
    map: &ArrayView<f32, D>,
    like: &ArrayView<f32, D>,
) -> Result<()> {
    if map.shape() != like.shape() {
        return Err(Error::ShapeMismatch {
            what,
            found: map.shape().to_vec(),
            expected: like.shape().to_vec(),
        });
    }
    check_finite(what, map)
}
