//! Per-object centre and boundary distances, as torch-em's `PerObjectDistanceTransform`.

use ndarray::{Array, ArrayView, Dimension};

use crate::boundaries::{find_boundaries, BoundaryMode, BoundaryOptions};
use crate::components::{connected_components, relabel_sequential, remove_small_objects};
use crate::edt::squared_distance_in_place;
use crate::grid::{contiguous, shaped, Connectivity, Grid};
use crate::{Label, Result};

/// Options of [`per_object_distances`]; `Default` is the paper's LIVECell distance setting
/// (`PerObjectDistanceTransform(distances=True, boundary_distances=True, foreground=True,
/// min_size=25)` with torch-em's other defaults).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct PerObjectDistanceOptions {
    /// Split each id into its connected components (full connectivity) first (torch-em's
    /// `apply_label=True`); otherwise ids are only relabelled consecutively.
    pub connected_components: bool,
    /// Objects with fewer pixels are removed (set to background) before anything else.
    pub min_size: usize,
    /// Value of both distance maps outside every object.
    pub fill_value: f32,
}

impl Default for PerObjectDistanceOptions {
    fn default() -> Self {
        PerObjectDistanceOptions {
            connected_components: true,
            min_size: 25,
            fill_value: 1.0,
        }
    }
}

/// The result of [`per_object_distances`]: the three channels of the paper's distance target
/// and the label image they were computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct PerObjectDistances<D: Dimension> {
    /// 1.0 inside the (filtered) objects, 0.0 elsewhere.
    pub foreground: Array<f32, D>,
    /// Distance to the object's centre, divided by its maximum over the object: 0 at the centre.
    pub center: Array<f32, D>,
    /// Distance to the object's most interior point measured as boundary distance, normalised:
    /// 0 at that point, 1 at the boundary.
    pub boundary: Array<f32, D>,
    /// The objects after connected components, size filter and relabelling (ids 1…N).
    pub labels: Array<u32, D>,
}

const EPS: f64 = 1e-7;

/// Computes normalised per-object distances exactly as torch-em's `PerObjectDistanceTransform`:
///
/// 1. connected components (full connectivity) or consecutive relabelling;
/// 2. objects under `min_size` pixels removed, ids relabelled;
/// 3. inner boundaries (`find_boundaries(mode="inner")`, face connectivity);
/// 4. per object, inside its bounding box: `bd` = distance to the nearest inner-boundary pixel
///    (of any object in the box), 0 outside the object; `p*` = first maximum of `bd` in raster
///    order; the centre is the rounded centroid (round half to even, as numpy), replaced by `p*`
///    when it falls outside the object; centre distance = Euclidean distance to the centre;
///    boundary distance = `bd(p*) − bd`; both 0 outside the object and divided by their maximum
///    over the box plus 1e-7;
/// 5. pixels outside every object get `fill_value` in both distance channels.
///
/// Distances are computed in f64 and stored as f32. An object that fills the whole image has no
/// boundary; its boundary distance is 0 everywhere.
///
/// Cost: one EDT per object over its bounding box.
///
/// ```
/// use ndarray::Array2;
/// use seg_targets::{per_object_distances, PerObjectDistanceOptions};
///
/// let mut labels = Array2::<u16>::zeros((9, 9));
/// labels.slice_mut(ndarray::s![1..8, 1..8]).fill(3);
/// let d = per_object_distances(labels.view(), &PerObjectDistanceOptions::default())?;
/// assert_eq!(d.center[[4, 4]], 0.0); // the centre
/// assert_eq!(d.boundary[[4, 4]], 0.0); // the most interior point
/// assert!(d.boundary[[1, 4]] > 0.99); // on the boundary
/// assert_eq!(d.center[[0, 0]], 1.0); // background fill
/// # Ok::<(), seg_targets::Error>(())
/// ```
///
/// # Errors
/// [`Error::Dimensionality`] unless 2-D or 3-D; [`Error::TooManyObjects`] past u32 ids.
pub fn per_object_distances<T: Label, D: Dimension>(
    labels: ArrayView<T, D>,
    options: &PerObjectDistanceOptions,
) -> Result<PerObjectDistances<D>> {
    let grid = Grid::of(labels.shape())?;
    let ids = if options.connected_components {
        connected_components(labels.view(), Connectivity::Full)?.0
    } else {
        relabel_sequential(labels.view())?.0
    };
    let ids = if options.min_size > 0 {
        relabel_sequential(remove_small_objects(ids.view(), options.min_size).view())?.0
    } else {
        ids
    };
    let inner = find_boundaries(
        ids.view(),
        &BoundaryOptions {
            mode: BoundaryMode::Inner,
            connectivity: Connectivity::Face,
            background: 0,
        },
    )?;
    let ids_std = contiguous(&ids.view()).into_owned();
    let l = ids_std.as_slice().expect("contiguous");
    let inner_std = contiguous(&inner.view()).into_owned();
    let boundary_mask = inner_std.as_slice().expect("contiguous");

    let objects = object_statistics(l, grid);
    let fill = options.fill_value;
    let mut center = vec![fill; grid.len()];
    let mut boundary = vec![fill; grid.len()];
    for (k, object) in objects.iter().enumerate() {
        let id = k as u32 + 1;
        if object.count == 0 {
            continue;
        }
        object.write_distances(id, l, boundary_mask, grid, &mut center, &mut boundary);
    }
    let foreground = l.iter().map(|&v| if v != 0 { 1.0 } else { 0.0 }).collect();
    Ok(PerObjectDistances {
        foreground: shaped(&labels, foreground),
        center: shaped(&labels, center),
        boundary: shaped(&labels, boundary),
        labels: ids,
    })
}

/// Bounding box, coordinate sums and size of one object.
#[derive(Debug, Clone)]
struct ObjectStats {
    lo: [usize; 3],
    hi: [usize; 3],
    sum: [f64; 3],
    count: usize,
}

fn object_statistics(l: &[u32], grid: Grid) -> Vec<ObjectStats> {
    let n = l.iter().copied().max().unwrap_or(0) as usize;
    let mut stats = vec![
        ObjectStats {
            lo: [usize::MAX; 3],
            hi: [0; 3],
            sum: [0.0; 3],
            count: 0,
        };
        n
    ];
    grid.for_each(|i, at| {
        if l[i] == 0 {
            return;
        }
        let s = &mut stats[l[i] as usize - 1];
        for (a, &c) in at.iter().enumerate() {
            s.lo[a] = s.lo[a].min(c);
            s.hi[a] = s.hi[a].max(c + 1);
            s.sum[a] += c as f64;
        }
        s.count += 1;
    });
    stats
}

impl ObjectStats {
    fn write_distances(
        &self,
        id: u32,
        l: &[u32],
        boundary_mask: &[bool],
        grid: Grid,
        center_out: &mut [f32],
        boundary_out: &mut [f32],
    ) {
        let crop = Grid {
            shape: [0, 1, 2].map(|a| self.hi[a] - self.lo[a]),
        };
        let global = |at: [usize; 3]| {
            let s = grid.strides();
            (0..3).map(|a| (at[a] + self.lo[a]) * s[a]).sum::<usize>()
        };
        let mut inside = vec![false; crop.len()];
        let mut bd = vec![0.0f64; crop.len()];
        crop.for_each(|i, at| {
            let g = global(at);
            inside[i] = l[g] == id;
            bd[i] = if boundary_mask[g] { 0.0 } else { f64::INFINITY };
        });
        squared_distance_in_place(&mut bd, crop, [1.0; 3]);
        let mut peak = (0usize, f64::NEG_INFINITY);
        for (i, v) in bd.iter_mut().enumerate() {
            *v = if !inside[i] {
                0.0
            } else if v.is_finite() {
                v.sqrt()
            } else {
                // No boundary pixel in the box: the object fills the whole image.
                0.0
            };
            if *v > peak.1 {
                peak = (i, *v);
            }
        }
        let (peak_index, peak_value) = peak;
        let crop_strides = crop.strides();
        let unravel = |i: usize| [0, 1, 2].map(|a| (i / crop_strides[a]) % crop.shape[a]);
        let centroid = [0, 1, 2]
            .map(|a| (self.sum[a] / self.count as f64).round_ties_even() as usize - self.lo[a]);
        let centroid_index: usize = (0..3).map(|a| centroid[a] * crop_strides[a]).sum();
        let centre = if inside[centroid_index] {
            centroid
        } else {
            unravel(peak_index)
        };
        let mut dc = vec![0.0f64; crop.len()];
        let (mut max_c, mut max_b) = (0.0f64, 0.0f64);
        crop.for_each(|i, at| {
            if inside[i] {
                let d2: f64 = (0..3)
                    .map(|a| (at[a] as f64 - centre[a] as f64).powi(2))
                    .sum();
                dc[i] = d2.sqrt();
                bd[i] = peak_value - bd[i];
                max_c = max_c.max(dc[i]);
                max_b = max_b.max(bd[i]);
            }
        });
        crop.for_each(|i, at| {
            if inside[i] {
                let g = global(at);
                center_out[g] = (dc[i] / (max_c + EPS)) as f32;
                boundary_out[g] = (bd[i] / (max_b + EPS)) as f32;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, s, Array2};

    fn opts(min_size: usize) -> PerObjectDistanceOptions {
        PerObjectDistanceOptions {
            min_size,
            ..Default::default()
        }
    }

    #[test]
    fn a_square_has_its_centre_at_the_middle_and_boundary_distance_one_at_the_rim() {
        let mut l = Array2::<u8>::zeros((7, 7));
        l.slice_mut(s![1..6, 1..6]).fill(1);
        let d = per_object_distances(l.view(), &opts(0)).unwrap();
        // Inner boundary = rim of the 5x5 square; bd = Chebyshev-like rings 0,1,2 at the middle.
        assert_eq!(d.boundary[[3, 3]], 0.0);
        let rim = (2.0 / (2.0 + EPS)) as f32;
        assert_eq!(d.boundary[[1, 3]], rim);
        assert_eq!(d.boundary[[2, 2]], ((2.0 - 1.0) / (2.0 + EPS)) as f32);
        // Centre distance: corner of the square is sqrt(8) from (3,3) and the maximum.
        assert_eq!(d.center[[3, 3]], 0.0);
        assert_eq!(d.center[[1, 1]], (8f64.sqrt() / (8f64.sqrt() + EPS)) as f32);
        assert_eq!(d.center[[1, 3]], (2.0 / (8f64.sqrt() + EPS)) as f32);
        assert_eq!(d.center[[0, 0]], 1.0);
        assert_eq!(d.foreground[[3, 3]], 1.0);
        assert_eq!(d.foreground[[0, 0]], 0.0);
    }

    #[test]
    fn centroids_round_half_to_even() {
        // A 1x4 bar: centroid x = 1.5 -> 2 (numpy rounds half to even), y = 0.
        let l = array![[1u8, 1, 1, 1]];
        let d = per_object_distances(l.view(), &opts(0)).unwrap();
        assert_eq!(d.center[[0, 2]], 0.0);
        assert_eq!(d.center[[0, 0]], (2.0 / (2.0 + EPS)) as f32);
    }

    #[test]
    fn a_centroid_outside_a_ring_moves_to_the_most_interior_point() {
        // A thick ring: centroid (5,5) lies in the hole.
        let mut l = Array2::<u8>::zeros((11, 11));
        l.slice_mut(s![0..11, 0..11]).fill(1);
        l.slice_mut(s![3..8, 3..8]).fill(0);
        let d = per_object_distances(l.view(), &opts(0)).unwrap();
        assert_eq!(d.center[[5, 5]], 1.0, "the hole is background");
        // bd is largest (first in raster order) where the ring is thickest: the image-border rows
        // are not boundaries, so the ring's outer rows are interior.
        let zero: Vec<_> = d
            .center
            .indexed_iter()
            .filter(|(_, v)| **v == 0.0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(zero.len(), 1);
        let (y, x) = zero[0];
        assert_eq!(d.boundary[[y, x]], 0.0);
        assert_ne!((y, x), (5, 5));
    }

    #[test]
    fn touching_objects_get_their_own_normalised_maps() {
        let mut l = Array2::<u16>::zeros((6, 10));
        l.slice_mut(s![1..5, 1..5]).fill(4);
        l.slice_mut(s![1..5, 5..9]).fill(9);
        let d = per_object_distances(l.view(), &opts(0)).unwrap();
        for region in [s![1..5, 1..5], s![1..5, 5..9]] {
            let c = d.center.slice(region);
            let max = c.iter().cloned().fold(0.0f32, f32::max);
            assert!(max > 0.999 && max < 1.0, "{max}");
            assert!(c.iter().any(|v| *v == 0.0));
        }
        assert_eq!(d.labels[[1, 1]], 1);
        assert_eq!(d.labels[[1, 5]], 2);
    }

    #[test]
    fn small_and_disconnected_pieces_are_handled_like_torch_em() {
        // Id 2 has two pieces: one of 4 pixels (kept with min_size 4), one of 1 pixel (removed).
        let l = array![[2u8, 2, 0, 0, 2], [2, 2, 0, 0, 0], [0, 0, 0, 0, 0],];
        let d = per_object_distances(l.view(), &opts(4)).unwrap();
        assert_eq!(
            d.labels,
            array![[1u32, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
        );
        assert_eq!(d.foreground[[0, 4]], 0.0);
        assert_eq!(d.center[[0, 4]], 1.0);
        assert_eq!(d.boundary[[0, 4]], 1.0);
    }

    #[test]
    fn one_pixel_objects_and_empty_images() {
        let l = array![[0u8, 0, 0], [0, 5, 0], [0, 0, 0]];
        let d = per_object_distances(l.view(), &opts(0)).unwrap();
        assert_eq!(d.center[[1, 1]], 0.0);
        assert_eq!(d.boundary[[1, 1]], 0.0);
        let z = Array2::<u8>::zeros((4, 4));
        let d = per_object_distances(z.view(), &opts(0)).unwrap();
        assert!(d.center.iter().all(|v| *v == 1.0) && d.foreground.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn an_object_filling_the_image_is_finite() {
        let l = Array2::<u8>::from_elem((4, 5), 1);
        let d = per_object_distances(l.view(), &opts(0)).unwrap();
        assert!(d.boundary.iter().all(|v| *v == 0.0));
        assert!(d.center.iter().all(|v| v.is_finite() && *v <= 1.0));
    }

    #[test]
    fn works_in_3d() {
        let mut l = ndarray::Array3::<u8>::zeros((5, 5, 5));
        l.slice_mut(s![1..4, 1..4, 1..4]).fill(1);
        let d = per_object_distances(l.view(), &opts(0)).unwrap();
        assert_eq!(d.center[[2, 2, 2]], 0.0);
        assert_eq!(d.boundary[[2, 2, 2]], 0.0);
        assert!(d.boundary[[1, 2, 2]] > 0.99);
    }
}
