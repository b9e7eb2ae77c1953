//! Separable Gaussian smoothing with a reflective border.

use ndarray::{Array, ArrayView, Dimension};

use crate::{Error, Result};

/// Smooths a 2-D or 3-D map with a Gaussian of standard deviation `sigma` (pixels), axis by
/// axis, as vigra's `gaussianSmoothing` does: kernel radius `⌊3σ + 0.5⌋`, weights
/// `exp(−x²/2σ²)` normalised to sum 1, border reflected without repeating the edge pixel
/// (`… c b | a b c …`). Computed in f64, returned as f32. `sigma = 0` returns a copy.
///
/// ```
/// use ndarray::array;
/// use watershed::gaussian_smoothing;
///
/// let flat = array![[2.0f32, 2.0, 2.0], [2.0, 2.0, 2.0]];
/// assert_eq!(gaussian_smoothing(flat.view(), 1.0)?, flat);
/// # Ok::<(), watershed::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidOption`] for a negative or non-finite `sigma`, or one larger than the map's
/// largest side; [`Error::Dimensionality`].
pub fn gaussian_smoothing<D: Dimension>(
    map: ArrayView<f32, D>,
    sigma: f64,
) -> Result<Array<f32, D>> {
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(Error::InvalidOption {
            name: "sigma",
            value: sigma.to_string(),
            reason: "must be finite and >= 0",
        });
    }
    if !(2..=3).contains(&map.ndim()) {
        return Err(Error::Dimensionality {
            shape: map.shape().to_vec(),
        });
    }
    // A Gaussian wider than the map smooths it to a near-constant, and its kernel (3σ each side)
    // would cost time and memory without bound.
    let side = map
        .shape()
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(MIN_SIGMA_BOUND);
    if sigma > side as f64 {
        return Err(Error::InvalidOption {
            name: "sigma",
            value: format!("{sigma} (map {:?})", map.shape()),
            reason: "must be at most the map's largest side (or 64 for smaller maps)",
        });
    }
    let kernel = gaussian_kernel(sigma);
    let mut data: Array<f64, D> = map.mapv(f64::from);
    if kernel.len() > 1 {
        let mut line = Vec::new();
        let mut out = Vec::new();
        for axis in 0..data.ndim() {
            for mut lane in data.lanes_mut(ndarray::Axis(axis)) {
                line.clear();
                line.extend(lane.iter().copied());
                convolve_reflect(&line, &kernel, &mut out);
                lane.iter_mut().zip(&out).for_each(|(v, o)| *v = *o);
            }
        }
    }
    Ok(data.mapv(|v| v as f32))
}

/// σ up to this is accepted whatever the map's size (a kernel of at most 385 taps).
const MIN_SIGMA_BOUND: usize = 64;

fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let radius = (3.0 * sigma + 0.5) as usize;
    if sigma == 0.0 || radius == 0 {
        return vec![1.0];
    }
    let weights: Vec<f64> = (0..=2 * radius)
        .map(|i| {
            let x = i as f64 - radius as f64;
            (-x * x / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f64 = weights.iter().sum();
    weights.into_iter().map(|w| w / sum).collect()
}

/// Index of `i` (possibly outside `0..n`) after mirroring at both ends without repeating them.
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

fn convolve_reflect(line: &[f64], kernel: &[f64], out: &mut Vec<f64>) {
    let n = line.len();
    let radius = (kernel.len() / 2) as isize;
    out.clear();
    out.extend((0..n as isize).map(|i| {
        kernel
            .iter()
            .enumerate()
            .map(|(k, w)| w * line[reflect(i + k as isize - radius, n)])
            .sum::<f64>()
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2};

    #[test]
    fn the_kernel_has_radius_three_sigma_and_sums_to_one() {
        let k = gaussian_kernel(1.0);
        assert_eq!(k.len(), 7);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert!((k[3] / k[4] - (0.5f64).exp()).abs() < 1e-12);
        assert_eq!(gaussian_kernel(1.6).len(), 2 * 5 + 1);
    }

    #[test]
    fn reflection_mirrors_without_repeating_the_edge() {
        let n = 4; // a b c d
        let got: Vec<usize> = (-3..7).map(|i| reflect(i, n)).collect();
        assert_eq!(got, vec![3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
        assert_eq!(reflect(-5, 1), 0);
    }

    #[test]
    fn an_impulse_spreads_into_the_kernel_and_keeps_its_mass() {
        let mut m = Array2::<f32>::zeros((15, 15));
        m[[7, 7]] = 1.0;
        let s = gaussian_smoothing(m.view(), 1.0).unwrap();
        let k = gaussian_kernel(1.0);
        assert!((s[[7, 7]] as f64 - k[3] * k[3]).abs() < 1e-7);
        assert!((s[[7, 9]] as f64 - k[3] * k[5]).abs() < 1e-7);
        assert!((s.sum() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn the_border_is_reflected() {
        // 1-D step at the left border: reflection means the edge sees a symmetric neighbourhood.
        let m = array![[1.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]];
        let s = gaussian_smoothing(m.view(), 1.0).unwrap();
        let k = gaussian_kernel(1.0);
        assert!((s[[0, 0]] as f64 - k[3]).abs() < 1e-7);
        assert!((s[[0, 1]] as f64 - k[2]).abs() < 1e-7);
    }

    #[test]
    fn tiny_images_zero_sigma_and_bad_sigma() {
        let m = array![[3.0f32]];
        assert_eq!(gaussian_smoothing(m.view(), 2.0).unwrap(), m);
        let r = array![[1.0f32, 5.0]];
        assert_eq!(gaussian_smoothing(r.view(), 0.0).unwrap(), r);
        assert!(gaussian_smoothing(r.view(), -1.0).is_err());
        assert!(gaussian_smoothing(r.view(), f64::NAN).is_err());
        // Wider than the map: refused at once instead of building a kernel of 6σ taps.
        let big = ndarray::Array2::<f32>::zeros((80, 48));
        assert!(gaussian_smoothing(big.view(), 80.0).is_ok());
        for sigma in [80.5, 1e6, 1e18] {
            let e = gaussian_smoothing(big.view(), sigma)
                .unwrap_err()
                .to_string();
            assert!(e.contains("sigma") && e.contains("largest side"), "{e}");
        }
    }
}
