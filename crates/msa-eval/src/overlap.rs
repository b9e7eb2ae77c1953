//! Sparse contingency table of two label images.

use ndarray::{ArrayView, Dimension, Zip};

use crate::{Error, Result};

/// The overlap counts of two label images, stored sparsely: only pairs of ids that share at
/// least one pixel. Ids are kept as they are (any u64, not necessarily consecutive); sizes are
/// full object sizes, including pixels that overlap label 0 or an ignored label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pred_ids: Vec<u64>,
    pred_sizes: Vec<u64>,
    gt_ids: Vec<u64>,
    gt_sizes: Vec<u64>,
    /// `(pred index, gt index, shared pixels)`, sorted by pred index then gt index.
    pairs: Vec<(u32, u32, u64)>,
}

impl Overlap {
    /// Counts the overlaps of `segmentation` (rows) and `groundtruth` (columns).
    ///
    /// Cost: one pass over the pixels that run-length-compresses equal neighbouring pairs, then
    /// a sort of the runs; no dense `n_pred × n_gt` table.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if the shapes differ; [`Error::TooManyObjects`] past 2^32 ids.
    pub fn new<A, B, D>(
        segmentation: ArrayView<A, D>,
        groundtruth: ArrayView<B, D>,
    ) -> Result<Overlap>
    where
        A: Copy + Into<u64>,
        B: Copy + Into<u64>,
        D: Dimension,
    {
        if segmentation.shape() != groundtruth.shape() {
            return Err(Error::ShapeMismatch {
                segmentation: segmentation.shape().to_vec(),
                groundtruth: groundtruth.shape().to_vec(),
            });
        }
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        let mut current: Option<(u64, u64, u64)> = None;
        Zip::from(&segmentation)
            .and(&groundtruth)
            .for_each(|&p, &g| {
                let (p, g) = (p.into(), g.into());
                match current.as_mut() {
                    Some((cp, cg, n)) if *cp == p && *cg == g => *n += 1,
                    _ => {
                        if let Some(run) = current.replace((p, g, 1)) {
                            runs.push(run);
                        }
                    }
                }
            });
        runs.extend(current);
        Overlap::from_counts(runs)
    }

    /// The table of `(segmentation id, ground-truth id, shared pixels)` counts in any order,
    /// repeated pairs summed: e.g. a volume's table from those of its blocks, so that a volume
    /// is scored without being held whole.
    ///
    /// # Errors
    /// [`Error::TooManyObjects`] past 2^32 ids.
    pub fn from_counts(mut runs: Vec<(u64, u64, u64)>) -> Result<Overlap> {
        runs.sort_unstable_by_key(|&(p, g, _)| (p, g));
        let mut merged: Vec<(u64, u64, u64)> = Vec::with_capacity(runs.len());
        for (p, g, n) in runs {
            match merged.last_mut() {
                Some((lp, lg, ln)) if *lp == p && *lg == g => *ln += n,
                _ => merged.push((p, g, n)),
            }
        }
        let mut pred_ids: Vec<u64> = Vec::new();
        let mut pred_sizes: Vec<u64> = Vec::new();
        for &(p, _, n) in &merged {
            if pred_ids.last() == Some(&p) {
                *pred_sizes.last_mut().expect("sizes follow ids") += n;
            } else {
                pred_ids.push(p);
                pred_sizes.push(n);
            }
        }
        let mut by_gt: Vec<(u64, u64)> = merged.iter().map(|&(_, g, n)| (g, n)).collect();
        by_gt.sort_unstable_by_key(|&(g, _)| g);
        let mut gt_ids: Vec<u64> = Vec::new();
        let mut gt_sizes: Vec<u64> = Vec::new();
        for (g, n) in by_gt {
            if gt_ids.last() == Some(&g) {
                *gt_sizes.last_mut().expect("sizes follow ids") += n;
            } else {
                gt_ids.push(g);
                gt_sizes.push(n);
            }
        }
        let too_many = pred_ids.len().max(gt_ids.len());
        if u32::try_from(too_many).is_err() {
            return Err(Error::TooManyObjects { count: too_many });
        }
        let mut pairs = Vec::with_capacity(merged.len());
        let mut pi = 0usize;
        for (p, g, n) in merged {
            while pred_ids[pi] != p {
                pi += 1;
            }
            let gi = gt_ids.binary_search(&g).expect("every gt id was collected");
            pairs.push((pi as u32, gi as u32, n));
        }
        Ok(Overlap {
            pred_ids,
            pred_sizes,
            gt_ids,
            gt_sizes,
            pairs,
        })
    }

    /// The `(segmentation id, ground-truth id, shared pixels)` counts.
    pub fn counts(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.pairs
            .iter()
            .map(|&(p, g, n)| (self.pred_ids[p as usize], self.gt_ids[g as usize], n))
    }

    /// The table of the union of the images of `self` and `other` (disjoint pixels).
    ///
    /// # Errors
    /// [`Error::TooManyObjects`] past 2^32 ids.
    pub fn merge(&self, other: &Overlap) -> Result<Overlap> {
        Overlap::from_counts(self.counts().chain(other.counts()).collect())
    }

    /// The distinct ids of the segmentation, ascending (label 0 included when present).
    pub fn pred_ids(&self) -> &[u64] {
        &self.pred_ids
    }

    /// Pixel count of each id in [`Self::pred_ids`].
    pub fn pred_sizes(&self) -> &[u64] {
        &self.pred_sizes
    }

    /// The distinct ids of the ground truth, ascending (label 0 included when present).
    pub fn gt_ids(&self) -> &[u64] {
        &self.gt_ids
    }

    /// Pixel count of each id in [`Self::gt_ids`].
    pub fn gt_sizes(&self) -> &[u64] {
        &self.gt_sizes
    }

    /// The non-zero entries `(pred index, gt index, shared pixels)`, indices into the id lists.
    pub fn pairs(&self) -> &[(u32, u32, u64)] {
        &self.pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn counts_pairs_and_full_sizes() {
        let seg = array![[0u8, 1, 1], [2, 2, 0]];
        let gt = array![[0u32, 7, 0], [7, 9, 9]];
        let o = Overlap::new(seg.view(), gt.view()).unwrap();
        assert_eq!(o.pred_ids(), &[0, 1, 2]);
        assert_eq!(o.pred_sizes(), &[2, 2, 2]);
        assert_eq!(o.gt_ids(), &[0, 7, 9]);
        assert_eq!(o.gt_sizes(), &[2, 2, 2]);
        assert_eq!(
            o.pairs(),
            &[
                (0, 0, 1),
                (0, 2, 1),
                (1, 0, 1),
                (1, 1, 1),
                (2, 1, 1),
                (2, 2, 1)
            ]
        );
    }

    #[test]
    fn different_shapes_are_an_error() {
        let a = ndarray::Array2::<u8>::zeros((2, 3));
        let b = ndarray::Array2::<u8>::zeros((3, 2));
        assert!(matches!(
            Overlap::new(a.view(), b.view()),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
