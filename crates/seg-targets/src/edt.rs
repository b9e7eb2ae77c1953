//! Exact Euclidean distance transform (Felzenszwalb & Huttenlocher's separable lower-envelope
//! algorithm: linear time per axis, exact squared distances).

use ndarray::{Array, ArrayView, Dimension};

use crate::grid::{contiguous, shaped, Grid};
use crate::{Error, Result};

/// For every pixel, the Euclidean distance to the nearest `true` pixel of `features` (0 on the
/// features themselves); `f64::INFINITY` everywhere if there is no feature.
///
/// This is vigra's `distanceTransform` convention; scipy's `distance_transform_edt(x)` equals
/// `distance_transform(x == 0)`. Exact (no chamfer approximation). Cost: O(pixels) per axis.
///
/// ```
/// use ndarray::array;
/// use seg_targets::distance_transform;
///
/// let f = array![[true, false, false], [false, false, false]];
/// let d = distance_transform(f.view())?;
/// assert_eq!(d[[1, 2]], 5f64.sqrt());
/// # Ok::<(), seg_targets::Error>(())
/// ```
///
/// # Errors
/// [`Error::Dimensionality`] unless 2-D or 3-D.
pub fn distance_transform<D: Dimension>(features: ArrayView<bool, D>) -> Result<Array<f64, D>> {
    distance_transform_sampled(features, &[])
}

/// [`distance_transform`] with a pixel spacing per axis (e.g. `[40.0, 4.0, 4.0]` for anisotropic
/// EM volumes). An empty `sampling` means spacing 1.
///
/// # Errors
/// [`Error::Dimensionality`] unless 2-D or 3-D; [`Error::InvalidOption`] if `sampling` has the
/// wrong length or a non-positive or non-finite entry.
pub fn distance_transform_sampled<D: Dimension>(
    features: ArrayView<bool, D>,
    sampling: &[f64],
) -> Result<Array<f64, D>> {
    let grid = Grid::of(features.shape())?;
    let ndim = features.ndim();
    let mut spacing = [1.0f64; 3];
    if !sampling.is_empty() {
        if sampling.len() != ndim || sampling.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::InvalidOption {
                name: "sampling",
                value: format!("{sampling:?}"),
                reason: "needs one positive, finite spacing per axis",
            });
        }
        spacing[3 - ndim..].copy_from_slice(sampling);
    }
    let data = contiguous(&features);
    let f = data.as_slice().expect("contiguous");
    let mut squared: Vec<f64> = f
        .iter()
        .map(|&b| if b { 0.0 } else { f64::INFINITY })
        .collect();
    squared_distance_in_place(&mut squared, grid, spacing);
    squared.iter_mut().for_each(|v| *v = v.sqrt());
    Ok(shaped(&features, squared))
}

/// Turns 0/∞ seeds into squared distances to the nearest seed, axis by axis.
pub(crate) fn squared_distance_in_place(values: &mut [f64], grid: Grid, spacing: [f64; 3]) {
    let strides = grid.strides();
    let mut scratch = Envelope::default();
    for axis in (0..3).rev() {
        let n = grid.shape[axis];
        if n == 0 || values.is_empty() {
            return;
        }
        let weight = spacing[axis] * spacing[axis];
        let stride = strides[axis];
        let mut line = vec![0.0; n];
        // Every line along `axis` starts at an index whose coordinate on `axis` is 0.
        for start in 0..values.len() {
            if !(start / stride).is_multiple_of(n) {
                continue;
            }
            for (k, v) in line.iter_mut().enumerate() {
                *v = values[start + k * stride];
            }
            scratch.transform(&mut line, weight);
            for (k, v) in line.iter().enumerate() {
                values[start + k * stride] = *v;
            }
        }
    }
}

/// Buffers of the 1-D lower-envelope transform.
#[derive(Default)]
struct Envelope {
    vertex: Vec<usize>,
    bound: Vec<f64>,
    input: Vec<f64>,
}

impl Envelope {
    /// `line[q] ← min_p line[p] + weight·(q − p)²`, skipping infinite entries.
    fn transform(&mut self, line: &mut [f64], weight: f64) {
        self.input.clear();
        self.input.extend_from_slice(line);
        let f = &self.input;
        self.vertex.clear();
        self.bound.clear();
        let Some(first) = f.iter().position(|v| v.is_finite()) else {
            return;
        };
        let parabola = |p: usize| f[p] + weight * (p * p) as f64;
        self.vertex.push(first);
        self.bound.push(f64::NEG_INFINITY);
        for (q, _) in f
            .iter()
            .enumerate()
            .skip(first + 1)
            .filter(|(_, v)| v.is_finite())
        {
            let mut s;
            loop {
                let r = *self.vertex.last().expect("envelope is never empty");
                s = (parabola(q) - parabola(r)) / (2.0 * weight * (q - r) as f64);
                if self.vertex.len() > 1 && s <= *self.bound.last().expect("one bound per vertex") {
                    self.vertex.pop();
                    self.bound.pop();
                } else {
                    break;
                }
            }
            self.vertex.push(q);
            self.bound.push(s);
        }
        let mut k = 0;
        for (q, out) in line.iter_mut().enumerate() {
            while k + 1 < self.vertex.len() && self.bound[k + 1] < q as f64 {
                k += 1;
            }
            let p = self.vertex[k];
            let d = q as f64 - p as f64;
            *out = f[p] + weight * d * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2, Array3};

    #[test]
    fn distances_to_a_single_point_are_euclidean() {
        let mut f = Array2::from_elem((5, 7), false);
        f[[2, 3]] = true;
        let d = distance_transform(f.view()).unwrap();
        for ((y, x), v) in d.indexed_iter() {
            let e = (((y as f64) - 2.0).powi(2) + ((x as f64) - 3.0).powi(2)).sqrt();
            assert_eq!(*v, e, "at {y},{x}");
        }
    }

    #[test]
    fn no_feature_gives_infinity_and_all_features_zero() {
        let none = Array2::from_elem((3, 3), false);
        assert!(distance_transform(none.view())
            .unwrap()
            .iter()
            .all(|v| v.is_infinite()));
        let all = Array2::from_elem((3, 3), true);
        assert!(distance_transform(all.view())
            .unwrap()
            .iter()
            .all(|v| *v == 0.0));
    }

    #[test]
    fn the_nearest_of_several_features_wins() {
        let f = array![[true, false, false, false, false, false, true]];
        let d = distance_transform(f.view()).unwrap();
        assert_eq!(d, array![[0.0, 1.0, 2.0, 3.0, 2.0, 1.0, 0.0]]);
    }

    #[test]
    fn sampling_scales_each_axis() {
        let mut f = Array3::from_elem((3, 1, 4), false);
        f[[0, 0, 0]] = true;
        let d = distance_transform_sampled(f.view(), &[10.0, 1.0, 2.0]).unwrap();
        assert_eq!(d[[0, 0, 3]], 6.0);
        assert_eq!(d[[2, 0, 0]], 20.0);
        assert_eq!(d[[1, 0, 1]], (100.0f64 + 4.0).sqrt());
        assert!(distance_transform_sampled(f.view(), &[1.0, 0.0, 1.0]).is_err());
        assert!(distance_transform_sampled(f.view(), &[1.0, 1.0]).is_err());
    }
}
