//! Seeded watershed by priority flooding, bit-exact to scikit-image.

use ndarray::{Array, ArrayView, Dimension};
use seg_targets::{Connectivity, Label};

use crate::{Error, Result};

/// How flooding priorities are assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flooding {
    /// A pixel's priority is its height; equal heights are flooded first in, first out.
    /// This is scikit-image's `watershed` up to version 0.24, the one torch-em used for the
    /// paper's results.
    #[default]
    Classic,
    /// A pixel's priority is the maximum of its height and the priority of the pixel that
    /// reached it, so costs never decrease along a flooding path. This is scikit-image 0.25.2
    /// and later (0.26); 0.25.0 and 0.25.1 briefly gave markers priority −∞ instead.
    Monotone,
}

/// In which order markers of exactly equal height are flooded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MarkerOrder {
    /// The order scikit-image's binary heap produces (all markers enter the heap first with the
    /// same age, so equal-height markers leave it in an order set by the heap's layout). Bit-exact
    /// to scikit-image; every marker pixel has to pass through the queue.
    #[default]
    ScikitImage,
    /// Raster order, first in first out, like every other pixel. Differs from scikit-image only
    /// where two markers of exactly equal height compete, and is faster: markers that cannot
    /// spread never enter the queue.
    Raster,
}

/// Options of [`seeded_watershed`]; `Default` is skimage's `connectivity=1` with the flooding of
/// the paper's scikit-image, bit-exact.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WatershedOptions {
    /// Face (4 / 6 neighbours, skimage's default) or full (8 / 26) connectivity.
    pub connectivity: Connectivity,
    pub flooding: Flooding,
    pub marker_order: MarkerOrder,
}

/// Floods `heights` from `markers`, as `skimage.segmentation.watershed(heights, markers,
/// mask=mask, connectivity=…)` does, label for label.
///
/// Every non-zero marker pixel inside the mask is a seed. A pixel takes the label of the first
/// flooded neighbour that reaches it, flooding in order of priority (see [`Flooding`]) and among
/// equal priorities in the order pixels were reached. Pixels outside the mask, or not reachable
/// from a marker inside the mask, stay 0. Marker ids are copied as they are.
///
/// Exactness includes ties: the queue is the same binary heap with the same sift rules as
/// scikit-image's, so even on plateaus and with equal-height markers the result is identical.
/// When no two markers that can spread have the same height, markers that cannot spread are left
/// out of the queue, which gives the same result faster; [`MarkerOrder::Raster`] does so always.
///
/// Cost: O(n log q) for n flooded pixels and queue length q.
///
/// ```
/// use ndarray::array;
/// use watershed::{seeded_watershed, WatershedOptions};
///
/// let heights = array![[0.0f32, 0.2, 0.9, 0.3, 0.0]];
/// let markers = array![[1u32, 0, 0, 0, 2]];
/// let seg = seeded_watershed(heights.view(), markers.view(), None, &WatershedOptions::default())?;
/// // The pixel at 0.9 is reached first from the left (via 0.2 < 0.3).
/// assert_eq!(seg, array![[1, 1, 1, 2, 2]]);
/// # Ok::<(), watershed::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`], [`Error::Dimensionality`], [`Error::NotANumber`] for a NaN height,
/// [`Error::TooLarge`] beyond 2^32 pixels.
pub fn seeded_watershed<T: Label, D: Dimension>(
    heights: ArrayView<f32, D>,
    markers: ArrayView<T, D>,
    mask: Option<ArrayView<bool, D>>,
    options: &WatershedOptions,
) -> Result<Array<T, D>> {
    check_shape("markers", markers.shape(), heights.shape())?;
    if let Some(m) = &mask {
        check_shape("mask", m.shape(), heights.shape())?;
    }
    check_finite_or_infinite("height map", &heights)?;
    let padded = Padded::new(heights.shape())?;
    if padded.inner_len == 0 {
        return Ok(markers.to_owned());
    }

    // Heights as order-preserving integers; mask and labels with a one-pixel border of zeros so
    // that neighbours never leave the buffer.
    let mut keys = vec![0u32; padded.len];
    let mut inside = vec![false; padded.len];
    let mut labels = vec![T::ZERO; padded.len];
    let mut mask_iter = mask.as_ref().map(|m| m.iter());
    for ((p, h), m) in padded.positions().zip(heights.iter()).zip(markers.iter()) {
        keys[p] = order_key(*h);
        let inside_mask = match mask_iter.as_mut() {
            Some(it) => *it.next().expect("same shape"),
            None => true,
        };
        inside[p] = inside_mask;
        if inside_mask {
            labels[p] = *m;
        }
    }
    let offsets = padded.neighbour_offsets(options.connectivity);
    flood(&keys, &inside, &mut labels, &offsets, options);
    let out: Vec<T> = padded.positions().map(|p| labels[p]).collect();
    Ok(Array::from_shape_vec(heights.raw_dim(), out).expect("same number of pixels"))
}

fn check_shape(what: &'static str, found: &[usize], expected: &[usize]) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what,
            found: found.to_vec(),
            expected: expected.to_vec(),
        })
    }
}

/// Rejects NaN (±∞ are valid heights).
pub(crate) fn check_finite_or_infinite<D: Dimension>(
    what: &'static str,
    map: &ArrayView<f32, D>,
) -> Result<()> {
    match map.iter().position(|v| v.is_nan()) {
        Some(flat) => Err(Error::NotANumber {
            what,
            index: unravel(flat, map.shape()),
        }),
        None => Ok(()),
    }
}

/// Rejects NaN and ±∞: the check of the recipes' prediction maps.
pub(crate) fn check_finite<D: Dimension>(
    what: &'static str,
    map: &ArrayView<f32, D>,
) -> Result<()> {
    check_finite_or_infinite(what, map)?;
    match map.iter().enumerate().find(|(_, v)| v.is_infinite()) {
        Some((flat, &value)) => Err(Error::Infinite {
            what,
            value,
            index: unravel(flat, map.shape()),
        }),
        None => Ok(()),
    }
}

/// The index of the `flat`-th element in logical (row-major) order.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (axis, &len) in shape.iter().enumerate().rev() {
        index[axis] = flat % len;
        flat /= len;
    }
    index
}

/// Maps a height to an integer with the same order (−0.0 and 0.0 compare equal, as in C).
/// scikit-image compares f64 copies of f32 heights, which order exactly as the f32 values.
fn order_key(h: f32) -> u32 {
    let bits = (h + 0.0).to_bits(); // + 0.0 turns −0.0 into 0.0
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | (1 << 31)
    }
}

/// The padded raveled layout: a one-pixel border on every real axis.
struct Padded {
    ndim: usize,
    shape: [usize; 3],
    padded: [usize; 3],
    len: usize,
    inner_len: usize,
}

impl Padded {
    fn new(shape: &[usize]) -> Result<Padded> {
        let (ndim, shape) = match *shape {
            [h, w] => (2, [1, h, w]),
            [d, h, w] => (3, [d, h, w]),
            _ => {
                return Err(Error::Dimensionality {
                    shape: shape.to_vec(),
                })
            }
        };
        let padded = [
            if ndim == 3 { shape[0] + 2 } else { 1 },
            shape[1] + 2,
            shape[2] + 2,
        ];
        let len: usize = padded.iter().product();
        if u32::try_from(len).is_err() {
            return Err(Error::TooLarge { pixels: len });
        }
        Ok(Padded {
            ndim,
            shape,
            padded,
            len,
            inner_len: shape.iter().product(),
        })
    }

    /// Padded indices of the image's pixels in row-major order.
    fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        let z0 = usize::from(self.ndim == 3);
        (0..self.shape[0]).flat_map(move |z| {
            (0..self.shape[1]).flat_map(move |y| {
                let row = ((z + z0) * self.padded[1] + y + 1) * self.padded[2] + 1;
                row..row + self.shape[2]
            })
        })
    }

    /// Raveled neighbour offsets in scikit-image's order: by distance from the centre, then by
    /// raveled offset.
    fn neighbour_offsets(&self, connectivity: Connectivity) -> Vec<isize> {
        let mut offsets: Vec<(usize, isize)> = Vec::new();
        for dz in -1isize..=1 {
            if self.ndim == 2 && dz != 0 {
                continue;
            }
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let nonzero =
                        usize::from(dz != 0) + usize::from(dy != 0) + usize::from(dx != 0);
                    let keep = match connectivity {
                        Connectivity::Face => nonzero == 1,
                        Connectivity::Full => nonzero >= 1,
                    };
                    if keep {
                        let raveled =
                            (dz * self.padded[1] as isize + dy) * self.padded[2] as isize + dx;
                        offsets.push((nonzero, raveled));
                    }
                }
            }
        }
        offsets.sort_by_key(|&(d, _)| d); // stable: raveled order within a distance
        offsets.into_iter().map(|(_, o)| o).collect()
    }
}

/// A binary min-heap with exactly scikit-image's push and pop, so that equal priorities come out
/// in the same order. A priority is `height key << 32 | age`, compared as one integer; priorities
/// and pixels sit in separate arrays so that sifting reads only the priorities.
#[derive(Default)]
struct Heap {
    priority: Vec<u64>,
    pixel: Vec<u32>,
}

#[inline(always)]
fn priority(key: u32, age: u32) -> u64 {
    (u64::from(key) << 32) | u64::from(age)
}

impl Heap {
    fn with_capacity(n: usize) -> Heap {
        Heap {
            priority: Vec::with_capacity(n),
            pixel: Vec::with_capacity(n),
        }
    }

    #[inline]
    fn push(&mut self, p: u64, pixel: u32) {
        let mut child = self.priority.len();
        self.priority.push(p);
        self.pixel.push(pixel);
        while child > 0 {
            let parent = (child - 1) / 2;
            if self.priority[child] < self.priority[parent] {
                self.priority.swap(parent, child);
                self.pixel.swap(parent, child);
                child = parent;
            } else {
                break;
            }
        }
    }

    #[inline]
    fn pop(&mut self) -> Option<(u64, u32)> {
        let last_p = self.priority.pop()?;
        let last_x = self.pixel.pop().expect("arrays have one length");
        if self.priority.is_empty() {
            return Some((last_p, last_x));
        }
        let top = (
            std::mem::replace(&mut self.priority[0], last_p),
            std::mem::replace(&mut self.pixel[0], last_x),
        );
        let (pr, n) = (&mut self.priority, self.pixel.len());
        let mut i = 0;
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            if l >= n {
                break;
            }
            let mut smallest = i;
            if pr[l] < pr[i] {
                smallest = l;
            }
            if r < n && pr[r] < pr[smallest] {
                smallest = r;
            }
            if smallest == i {
                break;
            }
            pr.swap(i, smallest);
            self.pixel.swap(i, smallest);
            i = smallest;
        }
        Some(top)
    }
}

/// The flooding loop on the padded buffers (border pixels are outside the mask).
fn flood<T: Label>(
    keys: &[u32],
    inside: &[bool],
    labels: &mut [T],
    offsets: &[isize],
    options: &WatershedOptions,
) {
    let flooding = options.flooding;
    let spreads = |i: usize, labels: &[T]| {
        offsets.iter().any(|&o| {
            let n = i.wrapping_add_signed(o);
            inside[n] && labels[n] == T::ZERO
        })
    };
    let markers: Vec<usize> = (0..labels.len())
        .filter(|&i| labels[i] != T::ZERO)
        .collect();
    // Markers that cannot spread do nothing when popped; they matter only through the heap's
    // arrangement, i.e. for the order of equal-priority markers. Leave them out when that order
    // is not scikit-image's or cannot matter (no two spreading markers share a priority); the
    // spreading markers then get raster-order ages, which decides only ties.
    let active: Vec<usize> = markers
        .iter()
        .copied()
        .filter(|&i| spreads(i, labels))
        .collect();
    let fifo = options.marker_order == MarkerOrder::Raster || {
        let mut active_keys: Vec<u32> = active.iter().map(|&i| keys[i]).collect();
        active_keys.sort_unstable();
        active_keys.windows(2).all(|w| w[0] != w[1])
    };
    let seeds = if fifo { &active } else { &markers };
    let mut heap = Heap::with_capacity(seeds.len().max(1024));
    for (rank, &i) in seeds.iter().enumerate() {
        let age = if fifo { rank as u32 } else { 0 };
        heap.push(priority(keys[i], age), i as u32);
    }
    // scikit-image's pushes start at age 2 (its counter starts at 1, incremented before use).
    let mut age: u32 = if fifo { seeds.len() as u32 } else { 1 };
    while let Some((popped, pixel)) = heap.pop() {
        let at = pixel as usize;
        let popped_key = (popped >> 32) as u32;
        let label = labels[at];
        for &o in offsets {
            let n = at.wrapping_add_signed(o);
            if !inside[n] || labels[n] != T::ZERO {
                continue;
            }
            age = age.wrapping_add(1);
            labels[n] = label;
            let key = match flooding {
                Flooding::Classic => keys[n],
                Flooding::Monotone => keys[n].max(popped_key),
            };
            heap.push(priority(key, age), n as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2, Array3};

    fn ws(
        h: &Array2<f32>,
        m: &Array2<u32>,
        mask: Option<&Array2<bool>>,
        opts: WatershedOptions,
    ) -> Array2<u32> {
        seeded_watershed(h.view(), m.view(), mask.map(|m| m.view()), &opts).unwrap()
    }

    // Reference outputs computed with skimage.segmentation.watershed(h, m) (connectivity 1).
    #[test]
    fn equal_height_markers_flood_in_scikit_images_heap_order() {
        let h = array![
            [0.0f32, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0],
            [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0],
            [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0],
        ];
        let m = array![
            [1u32, 0, 0, 0, 0, 0, 2],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 3, 0, 0, 0],
            [4, 0, 0, 0, 0, 0, 5],
        ];
        // Identical in scikit-image 0.24.0 and 0.26.0.
        let expected = array![
            [1u32, 1, 1, 3, 2, 2, 2],
            [1, 1, 1, 3, 2, 2, 2],
            [4, 4, 3, 3, 3, 5, 5],
            [4, 4, 4, 3, 5, 5, 5],
        ];
        for flooding in [Flooding::Classic, Flooding::Monotone] {
            let opts = WatershedOptions {
                flooding,
                ..Default::default()
            };
            assert_eq!(ws(&h, &m, None, opts), expected, "{flooding:?}");
        }
    }

    #[test]
    fn classic_and_monotone_flooding_match_their_scikit_image_versions() {
        let h = array![
            [1.0f32, 1.0, 0.5, 0.0, 0.0, 0.5, 0.5],
            [0.0, 0.0, 1.0, 0.5, 0.0, 0.5, 1.0],
            [1.0, 1.0, 0.5, 0.5, 1.0, 0.0, 0.5],
            [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0],
        ];
        let m = array![
            [0u32, 0, 0, 0, 0, 0, 0],
            [2, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 3, 0, 1],
        ];
        let skimage_0_24 = array![
            [2u32, 2, 1, 1, 1, 1, 1],
            [2, 2, 2, 1, 1, 1, 1],
            [2, 2, 1, 1, 1, 1, 1],
            [2, 1, 1, 1, 3, 1, 1],
        ];
        let skimage_0_26 = array![
            [2u32, 2, 2, 2, 3, 1, 1],
            [2, 2, 2, 2, 3, 1, 1],
            [2, 2, 2, 3, 3, 1, 1],
            [2, 2, 3, 3, 3, 1, 1],
        ];
        let run = |flooding| {
            ws(
                &h,
                &m,
                None,
                WatershedOptions {
                    flooding,
                    ..Default::default()
                },
            )
        };
        assert_eq!(run(Flooding::Classic), skimage_0_24);
        assert_eq!(run(Flooding::Monotone), skimage_0_26);
    }

    #[test]
    fn order_keys_preserve_the_order_of_heights() {
        let hs = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            0.5,
            7.0,
            f32::INFINITY,
        ];
        for w in hs.windows(2) {
            assert!(order_key(w[0]) <= order_key(w[1]), "{} {}", w[0], w[1]);
        }
        assert_eq!(order_key(-0.0), order_key(0.0));
    }

    #[test]
    fn a_ridge_splits_two_basins() {
        let h = array![[0.0f32, 1.0, 2.0, 5.0, 2.0, 1.0, 0.0]];
        let m = array![[1u32, 0, 0, 0, 0, 0, 2]];
        // The ridge pixel (5.0) is reached from both sides at equal priority; the left basin's
        // pixel at height 2 was pushed first, so it wins (first in, first out).
        assert_eq!(
            ws(&h, &m, None, Default::default()),
            array![[1, 1, 1, 1, 2, 2, 2]]
        );
    }

    #[test]
    fn plateaus_are_shared_first_in_first_out() {
        // A flat plateau between two markers: pixels alternate being reached from each side,
        // so the plateau is split in the middle.
        let h = Array2::<f32>::zeros((1, 8));
        let mut m = Array2::<u32>::zeros((1, 8));
        m[[0, 0]] = 1;
        m[[0, 7]] = 2;
        assert_eq!(
            ws(&h, &m, None, Default::default()),
            array![[1, 1, 1, 1, 2, 2, 2, 2]]
        );
    }

    #[test]
    fn masked_and_unreachable_pixels_stay_zero() {
        let h = Array2::<f32>::zeros((3, 5));
        let m = array![[1u32, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]];
        let mask = array![
            [true, true, false, true, true],
            [true, true, false, true, true],
            [false, false, false, true, true],
        ];
        let seg = ws(&h, &m, Some(&mask), Default::default());
        assert_eq!(
            seg,
            array![[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
        );
    }

    #[test]
    fn markers_outside_the_mask_are_dropped() {
        let h = Array2::<f32>::zeros((1, 4));
        let m = array![[5u32, 0, 0, 6]];
        let mask = array![[false, true, true, true]];
        assert_eq!(
            ws(&h, &m, Some(&mask), Default::default()),
            array![[0, 6, 6, 6]]
        );
    }

    #[test]
    fn touching_markers_keep_their_ids() {
        let h = array![[0.0f32, 0.0, 0.3, 0.1]];
        let m = array![[9u32, 4, 0, 0]];
        assert_eq!(ws(&h, &m, None, Default::default()), array![[9, 4, 4, 4]]);
    }

    #[test]
    fn full_connectivity_crosses_diagonals() {
        let h = Array2::<f32>::zeros((2, 2));
        let m = array![[1u32, 0], [0, 0]];
        let mask = array![[true, false], [false, true]];
        let face = ws(&h, &m, Some(&mask), Default::default());
        assert_eq!(face, array![[1, 0], [0, 0]]);
        let full = ws(
            &h,
            &m,
            Some(&mask),
            WatershedOptions {
                connectivity: Connectivity::Full,
                ..Default::default()
            },
        );
        assert_eq!(full, array![[1, 0], [0, 1]]);
    }

    #[test]
    fn volumes_flood_across_slices() {
        let h = Array3::<f32>::zeros((3, 2, 2));
        let mut m = Array3::<u16>::zeros((3, 2, 2));
        m[[0, 0, 0]] = 1;
        m[[2, 1, 1]] = 2;
        let seg = seeded_watershed(h.view(), m.view(), None, &Default::default()).unwrap();
        assert!(seg.iter().all(|&v| v == 1 || v == 2));
        assert_eq!(seg[[1, 0, 0]], 1);
        assert_eq!(seg[[1, 1, 1]], 2);
    }

    #[test]
    fn thin_and_empty_images_work() {
        let h = Array2::<f32>::zeros((5, 1));
        let m = array![[0u8], [0], [3], [0], [0]];
        let seg = seeded_watershed(h.view(), m.view(), None, &Default::default()).unwrap();
        assert_eq!(seg, array![[3u8], [3], [3], [3], [3]]);
        let none = Array2::<u8>::zeros((2, 3));
        let seg = seeded_watershed(
            Array2::<f32>::zeros((2, 3)).view(),
            none.view(),
            None,
            &Default::default(),
        )
        .unwrap();
        assert!(seg.iter().all(|&v| v == 0));
        let e = Array2::<f32>::zeros((0, 3));
        let seg = seeded_watershed(
            e.view(),
            Array2::<u8>::zeros((0, 3)).view(),
            None,
            &Default::default(),
        )
        .unwrap();
        assert_eq!(seg.len(), 0);
    }

    #[test]
    fn nan_heights_and_shape_mismatches_are_errors() {
        let h = array![[0.0f32, f32::NAN]];
        let m = array![[1u32, 0]];
        let err = seeded_watershed(h.view(), m.view(), None, &Default::default()).unwrap_err();
        assert_eq!(
            err,
            Error::NotANumber {
                what: "height map",
                index: vec![0, 1]
            }
        );
        let m3 = array![[1u32, 0, 0]];
        assert!(matches!(
            seeded_watershed(
                array![[0.0f32, 0.0]].view(),
                m3.view(),
                None,
                &Default::default()
            ),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
