//! Label utilities: foreground, connected components, consecutive relabelling, small-object
//! removal.

use ndarray::{Array, ArrayView, Dimension};

use crate::grid::{contiguous, shaped, Connectivity, Grid};
use crate::{Error, Label, Result};

/// The foreground mask: `label != 0`.
pub fn foreground<T: Label, D: Dimension>(labels: ArrayView<T, D>) -> Array<bool, D> {
    labels.mapv(|v| v != T::ZERO)
}

/// Labels the connected regions of equal non-zero value, as `skimage.measure.label(labels,
/// background=0, connectivity=…)` does: each region gets its own id, background stays 0, ids are
/// 1…N in raster order of each region's first pixel. A binary mask works too (`bool` labels).
///
/// Returns the label image and N. Cost: one raster pass with a union-find over provisional
/// labels, plus one relabelling pass.
///
/// ```
/// use ndarray::array;
/// use seg_targets::{connected_components, Connectivity};
///
/// let mask = array![[true, false, true], [false, true, false]];
/// let (face, n) = connected_components(mask.view(), Connectivity::Face)?;
/// assert_eq!((face, n), (array![[1u32, 0, 2], [0, 3, 0]], 3));
/// let (_, n) = connected_components(mask.view(), Connectivity::Full)?;
/// assert_eq!(n, 1);
/// # Ok::<(), seg_targets::Error>(())
/// ```
///
/// # Errors
/// [`Error::Dimensionality`] unless 2-D or 3-D; [`Error::TooManyObjects`] past u32 ids.
pub fn connected_components<T: Label, D: Dimension>(
    labels: ArrayView<T, D>,
    connectivity: Connectivity,
) -> Result<(Array<u32, D>, usize)> {
    let grid = Grid::of(labels.shape())?;
    let data = contiguous(&labels);
    let l = data.as_slice().expect("contiguous");
    let backward = connectivity.backward_offsets();
    // Provisional labels per pixel (0 = background) and a union-find over them.
    let mut provisional = vec![0u32; grid.len()];
    let mut parent: Vec<u32> = vec![0];
    let mut overflow = false;
    grid.for_each(|i, at| {
        let v = l[i];
        if v == T::ZERO || overflow {
            return;
        }
        let mut current = 0u32;
        for &o in &backward {
            if let Some(j) = grid.neighbour(at, o) {
                if l[j] == v {
                    let root = find(&mut parent, provisional[j]);
                    if current == 0 {
                        current = root;
                    } else if root != current {
                        let (lo, hi) = (root.min(current), root.max(current));
                        parent[hi as usize] = lo;
                        current = lo;
                    }
                }
            }
        }
        if current == 0 {
            match u32::try_from(parent.len()) {
                Ok(next) => {
                    parent.push(next);
                    current = next;
                }
                Err(_) => overflow = true,
            }
        }
        provisional[i] = current;
    });
    if overflow {
        return Err(Error::TooManyObjects {
            count: parent.len(),
        });
    }
    // Final ids in order of first appearance of each root.
    let mut final_id = vec![0u32; parent.len()];
    let mut next = 0u32;
    for p in provisional.iter_mut() {
        if *p != 0 {
            let root = find(&mut parent, *p) as usize;
            if final_id[root] == 0 {
                next += 1;
                final_id[root] = next;
            }
            *p = final_id[root];
        }
    }
    Ok((shaped(&labels, provisional), next as usize))
}

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        let grand = parent[parent[x as usize] as usize];
        parent[x as usize] = grand;
        x = grand;
    }
    x
}

/// The sorted distinct values of a slice. Label images come in long runs of one value, so runs
/// are collapsed before sorting.
pub(crate) fn unique<T: Label>(values: &[T]) -> Vec<T> {
    let mut ids: Vec<T> = Vec::new();
    for &v in values {
        if ids.last() != Some(&v) {
            ids.push(v);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// For each pixel, the position of its value in the sorted `ids` (looked up once per run).
fn positions<'a, T: Label>(values: &'a [T], ids: &'a [T]) -> impl Iterator<Item = usize> + 'a {
    let mut last: Option<(T, usize)> = None;
    values.iter().map(move |&v| match last {
        Some((id, k)) if id == v => k,
        _ => {
            let k = ids.binary_search(&v).expect("id is in the list");
            last = Some((v, k));
            k
        }
    })
}

/// Relabels to consecutive ids 1…N keeping 0 as 0 and the order of the ids (as skimage's
/// `relabel_sequential`). Returns the label image and N.
///
/// # Errors
/// [`Error::TooManyObjects`] past u32 ids.
pub fn relabel_sequential<T: Label, D: Dimension>(
    labels: ArrayView<T, D>,
) -> Result<(Array<u32, D>, usize)> {
    let data = contiguous(&labels);
    let l = data.as_slice().expect("contiguous");
    // Background first (added if absent), so that each id's position in the list is its new id.
    let mut ids = unique(l);
    if ids.first() != Some(&T::ZERO) {
        ids.insert(0, T::ZERO);
    }
    let n = ids.len() - 1;
    if u32::try_from(n).is_err() {
        return Err(Error::TooManyObjects { count: n });
    }
    let out = positions(l, &ids).map(|k| k as u32).collect();
    Ok((shaped(&labels, out), n))
}

/// Sets every object with fewer than `min_size` pixels to 0 (as skimage's
/// `remove_small_objects` on a label image, and torch-em's `sizes < min_size` rule). Other ids
/// are kept as they are; follow with [`relabel_sequential`] for consecutive ids.
pub fn remove_small_objects<T: Label, D: Dimension>(
    labels: ArrayView<T, D>,
    min_size: usize,
) -> Array<T, D> {
    let data = contiguous(&labels);
    let l = data.as_slice().expect("contiguous");
    let ids = unique(l);
    let mut counts = vec![0usize; ids.len()];
    for k in positions(l, &ids) {
        counts[k] += 1;
    }
    let out = positions(l, &ids)
        .zip(l)
        .map(|(k, &v)| if counts[k] < min_size { T::ZERO } else { v })
        .collect();
    shaped(&labels, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array3};

    #[test]
    fn equal_valued_regions_split_and_touching_objects_stay_apart() {
        let l = array![[7u16, 7, 0, 7], [0, 0, 0, 7], [3, 3, 9, 9],];
        let (cc, n) = connected_components(l.view(), Connectivity::Face).unwrap();
        assert_eq!(n, 4);
        assert_eq!(cc, array![[1u32, 1, 0, 2], [0, 0, 0, 2], [3, 3, 4, 4]]);
    }

    #[test]
    fn full_connectivity_joins_diagonals_face_does_not() {
        let l = array![[1u8, 0, 0], [0, 1, 0], [0, 0, 1]];
        assert_eq!(
            connected_components(l.view(), Connectivity::Face)
                .unwrap()
                .1,
            3
        );
        assert_eq!(
            connected_components(l.view(), Connectivity::Full)
                .unwrap()
                .1,
            1
        );
    }

    #[test]
    fn u_shapes_merge_provisional_labels() {
        // Two arms meet only at the bottom: the scan sees two labels first, then merges them.
        let l = array![[1u8, 0, 1, 0, 1], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1],];
        let (cc, n) = connected_components(l.view(), Connectivity::Face).unwrap();
        assert_eq!(n, 1);
        assert!(cc.iter().all(|&v| v <= 1));
    }

    #[test]
    fn components_in_3d_connect_across_slices() {
        let mut l = Array3::<u8>::zeros((3, 2, 2));
        l[[0, 0, 0]] = 1;
        l[[1, 0, 0]] = 1;
        l[[2, 1, 1]] = 1;
        assert_eq!(
            connected_components(l.view(), Connectivity::Face)
                .unwrap()
                .1,
            2
        );
        // (1,1,1) joins (2,1,1) through a face but touches (1,0,0) only along an edge.
        l[[1, 1, 1]] = 1;
        assert_eq!(
            connected_components(l.view(), Connectivity::Face)
                .unwrap()
                .1,
            2
        );
        assert_eq!(
            connected_components(l.view(), Connectivity::Full)
                .unwrap()
                .1,
            1
        );
    }

    #[test]
    fn empty_and_all_background_images_have_no_components() {
        let z = ndarray::Array2::<u32>::zeros((4, 4));
        assert_eq!(
            connected_components(z.view(), Connectivity::Full)
                .unwrap()
                .1,
            0
        );
        let e = ndarray::Array2::<u32>::zeros((0, 4));
        assert_eq!(
            connected_components(e.view(), Connectivity::Full)
                .unwrap()
                .1,
            0
        );
    }

    #[test]
    fn relabel_keeps_order_and_background() {
        let l = array![[0u64, u64::MAX, 5], [1_000_000_007, 5, 0]];
        let (r, n) = relabel_sequential(l.view()).unwrap();
        assert_eq!(n, 3);
        assert_eq!(r, array![[0u32, 3, 1], [2, 1, 0]]);
    }

    #[test]
    fn small_objects_go_to_background_at_the_exact_threshold() {
        let l = array![[1u8, 1, 1, 2, 2], [0, 0, 3, 3, 3]];
        let r = remove_small_objects(l.view(), 3);
        assert_eq!(r, array![[1u8, 1, 1, 0, 0], [0, 0, 3, 3, 3]]);
        assert_eq!(remove_small_objects(l.view(), 0), l);
    }

    #[test]
    fn foreground_is_nonzero() {
        let l = array![[0u8, 3], [9, 0]];
        assert_eq!(foreground(l.view()), array![[false, true], [true, false]]);
    }
}
