//! Mean segmentation accuracy from the overlapping pairs given one at a time, for tables too
//! large to hold (the 3-D score of a volume with millions of objects).

use crate::scores::{check_threshold, ratio, Edge, ScoreTable};
use crate::{Error, MsaOptions, Result, SegmentationAccuracy, ThresholdScore};

/// One overlapping pair of objects with the full size of each (overlap with the background or
/// the ignored label included, as in [`crate::Overlap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizedPair {
    pub pred: u64,
    pub gt: u64,
    /// Pixels the two objects share.
    pub overlap: u64,
    pub pred_size: u64,
    pub gt_size: u64,
}

/// [`crate::mean_segmentation_accuracy_of`] computed from a stream of [`SizedPair`]s in any
/// order, each distinct pair given once.
///
/// Above IoU 0.5 an object has at most one pair at or over the threshold, so the true
/// positives at a threshold τ > 0.5 are a count. At τ = 0.5 two pairs of one object can both
/// reach it only in an exact tie (the object split into two halves that are whole objects);
/// only those tied pairs are kept and matched. A threshold below 0.5 keeps every pair at or over
/// it and matches them as the in-memory score does. So with the default thresholds the tally
/// holds ten counters and the ties, whatever the number of objects.
///
/// ```
/// use msa_eval::{mean_segmentation_accuracy, MsaOptions, PairTally, Overlap, SizedPair};
/// use ndarray::array;
///
/// let gt = array![[1u16, 1, 0, 2], [1, 1, 0, 2]];
/// let seg = array![[5u32, 5, 0, 0], [5, 5, 0, 7]];
/// let table = Overlap::new(seg.view(), gt.view())?;
/// let mut tally = PairTally::new(&MsaOptions::default())?;
/// for &(p, g, n) in table.pairs() {
///     tally.add(SizedPair {
///         pred: table.pred_ids()[p as usize],
///         gt: table.gt_ids()[g as usize],
///         overlap: n,
///         pred_size: table.pred_sizes()[p as usize],
///         gt_size: table.gt_sizes()[g as usize],
///     });
/// }
/// // Objects other than the background: 2 in the segmentation, 2 in the ground truth.
/// let streamed = tally.finish(2, 2);
/// let whole = mean_segmentation_accuracy(seg.view(), gt.view(), &MsaOptions::default())?;
/// assert_eq!(streamed, whole);
/// # Ok::<(), msa_eval::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PairTally {
    thresholds: Vec<f64>,
    ignore: Option<u64>,
    /// Per threshold: pairs with IoU ≥ τ for τ > 0.5, IoU > 0.5 for τ = 0.5 (unused below).
    counts: Vec<usize>,
    /// The lowest threshold under 0.5, if any: every pair at or over it is kept.
    low: Option<f64>,
    /// Whether 0.5 is a threshold: pairs at exactly 0.5 are kept.
    half: bool,
    /// `(pred, gt, IoU)` of the kept pairs.
    kept: Vec<(u64, u64, f64)>,
}

impl PairTally {
    /// An empty tally for `options`' thresholds and ignore label.
    ///
    /// # Errors
    /// [`Error::NoThresholds`], [`Error::InvalidThreshold`] for a threshold outside (0, 1].
    pub fn new(options: &MsaOptions) -> Result<PairTally> {
        if options.thresholds.is_empty() {
            return Err(Error::NoThresholds);
        }
        for &t in &options.thresholds {
            check_threshold(t)?;
        }
        let low = options
            .thresholds
            .iter()
            .copied()
            .filter(|&t| t < 0.5)
            .reduce(f64::min);
        Ok(PairTally {
            thresholds: options.thresholds.clone(),
            ignore: options.ignore_label,
            counts: vec![0; options.thresholds.len()],
            low,
            half: options.thresholds.contains(&0.5),
            kept: Vec::new(),
        })
    }

    /// Adds one pair; pairs with the ignored label on either side are passed over.
    pub fn add(&mut self, pair: SizedPair) {
        if self.ignore == Some(pair.pred) || self.ignore == Some(pair.gt) {
            return;
        }
        let n = pair.overlap as f64;
        let union = pair.pred_size as f64 + pair.gt_size as f64 - n;
        let iou = n / union.max(1e-7);
        for (&t, c) in self.thresholds.iter().zip(&mut self.counts) {
            if (t > 0.5 && iou >= t) || (t == 0.5 && iou > 0.5) {
                *c += 1;
            }
        }
        if (self.half && iou == 0.5) || self.low.is_some_and(|l| iou >= l) {
            self.kept.push((pair.pred, pair.gt, iou));
        }
    }

    /// Pairs held for matching (ties at 0.5 and pairs over a threshold below 0.5).
    pub fn kept_pairs(&self) -> usize {
        self.kept.len()
    }

    /// The score, given the number of objects on each side (ignored label excluded).
    pub fn finish(self, n_pred: usize, n_true: usize) -> SegmentationAccuracy {
        let table = self.kept_table(n_pred, n_true);
        let per_threshold: Vec<ThresholdScore> = self
            .thresholds
            .iter()
            .zip(&self.counts)
            .map(|(&t, &count)| {
                let tp = if n_pred.min(n_true) == 0 {
                    0
                } else if t > 0.5 {
                    count
                } else if t == 0.5 && self.low.is_none() {
                    // Kept are only the ties, none of which shares an object with a pair over 0.5.
                    count + table.matches(t).len()
                } else {
                    table.matches(t).len()
                };
                let (fp, fn_) = (n_pred.saturating_sub(tp), n_true.saturating_sub(tp));
                ThresholdScore {
                    threshold: t,
                    accuracy: ratio(tp, tp + fp + fn_),
                    true_positives: tp,
                    false_positives: fp,
                    false_negatives: fn_,
                }
            })
            .collect();
        let msa =
            per_threshold.iter().map(|s| s.accuracy).sum::<f64>() / per_threshold.len() as f64;
        SegmentationAccuracy {
            msa,
            per_threshold,
            n_pred,
            n_true,
        }
    }

    /// The kept pairs with their ids renumbered densely.
    fn kept_table(&self, n_pred: usize, n_true: usize) -> ScoreTable {
        let dense = |pick: fn(&(u64, u64, f64)) -> u64| {
            let mut ids: Vec<u64> = self.kept.iter().map(pick).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let (preds, gts) = (dense(|e| e.0), dense(|e| e.1));
        let index = |ids: &[u64], id: u64| {
            ids.binary_search(&id).expect("every kept id was collected") as u32
        };
        ScoreTable {
            edges: self
                .kept
                .iter()
                .map(|&(p, g, score)| Edge {
                    pred: index(&preds, p),
                    gt: index(&gts, g),
                    score,
                })
                .collect(),
            n_pred,
            n_true,
            n_pred_index: preds.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mean_segmentation_accuracy_of, Overlap};
    use ndarray::{array, Array2};

    fn tally_of(table: &Overlap, options: &MsaOptions) -> (SegmentationAccuracy, usize) {
        let mut tally = PairTally::new(options).unwrap();
        // Reversed, to show that the order does not matter.
        for &(p, g, n) in table.pairs().iter().rev() {
            tally.add(SizedPair {
                pred: table.pred_ids()[p as usize],
                gt: table.gt_ids()[g as usize],
                overlap: n,
                pred_size: table.pred_sizes()[p as usize],
                gt_size: table.gt_sizes()[g as usize],
            });
        }
        let objects = |ids: &[u64]| {
            ids.iter()
                .filter(|&&i| Some(i) != options.ignore_label)
                .count()
        };
        let kept = tally.kept_pairs();
        (
            tally.finish(objects(table.pred_ids()), objects(table.gt_ids())),
            kept,
        )
    }

    fn options(thresholds: &[f64], ignore_label: Option<u64>) -> MsaOptions {
        let mut o = MsaOptions::default();
        if !thresholds.is_empty() {
            o.thresholds = thresholds.to_vec();
        }
        o.ignore_label = ignore_label;
        o
    }

    /// Random label images with few ids (many partial overlaps) and blocky ones (good matches).
    fn random_pair(seed: u64) -> (Array2<u32>, Array2<u32>) {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move |m: u32| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % m as u64) as u32
        };
        let (h, w) = (12, 15);
        let cell = 2 + next(3) as usize;
        let gt = Array2::from_shape_fn((h, w), |(y, x)| ((y / cell) * 10 + x / cell) as u32);
        let noise = next(4);
        let seg = gt.mapv(|v| v * 3 + 1);
        let seg = Array2::from_shape_fn((h, w), |(y, x)| {
            if next(8) < noise {
                next(5)
            } else {
                seg[[y, x]]
            }
        });
        (seg, gt)
    }

    #[test]
    fn the_tally_equals_the_whole_table_score() {
        let sets: [&[f64]; 4] = [&[], &[0.3, 0.5, 0.75], &[0.1], &[0.55, 0.95]];
        let (mut partial, mut low_kept) = (0, 0);
        for seed in 0..60 {
            let (seg, gt) = random_pair(seed);
            let table = Overlap::new(seg.view(), gt.view()).unwrap();
            for thresholds in sets {
                for ignore in [Some(0), None, Some(4)] {
                    let o = options(thresholds, ignore);
                    let whole = mean_segmentation_accuracy_of(&table, &o).unwrap();
                    let (streamed, kept) = tally_of(&table, &o);
                    assert_eq!(streamed, whole, "seed {seed}, {thresholds:?}, {ignore:?}");
                    partial += usize::from(whole.msa > 0.0 && whole.msa < 1.0);
                    low_kept +=
                        usize::from(thresholds.first().is_some_and(|&t| t < 0.5) && kept > 0);
                    if thresholds.is_empty() || thresholds[0] > 0.5 {
                        // Only exact ties at 0.5 are held.
                        assert!(kept <= 2 * table.pairs().len() / 3, "{kept} kept");
                    }
                }
            }
        }
        // The cases are not trivial: most scores are partial, and low thresholds match.
        assert!(
            partial > 400 && low_kept > 100,
            "{partial} partial, {low_kept} low"
        );
    }

    #[test]
    fn ties_at_one_half_are_matched_one_to_one() {
        for (seg, gt, tp) in [
            (array![[7u32, 5, 5, 9]], array![[1u32, 1, 2, 2]], 2),
            (array![[1u32, 1, 2, 2]], array![[1u32, 1, 1, 1]], 1),
        ] {
            let table = Overlap::new(seg.view(), gt.view()).unwrap();
            let (s, kept) = tally_of(&table, &MsaOptions::default());
            assert_eq!(s.per_threshold[0].true_positives, tp);
            assert_eq!(kept, 2, "the two tied pairs");
            assert_eq!(
                s,
                mean_segmentation_accuracy_of(&table, &MsaOptions::default()).unwrap()
            );
        }
    }

    #[test]
    fn good_matches_hold_no_pairs_and_empty_tallies_score_zero() {
        let gt = Array2::from_shape_fn((40, 40), |(y, x)| (y / 4 * 10 + x / 4) as u32 + 1);
        let table = Overlap::new(gt.view(), gt.view()).unwrap();
        let (s, kept) = tally_of(&table, &MsaOptions::default());
        assert_eq!((s.msa, kept, s.n_true), (1.0, 0, 100));
        let empty = PairTally::new(&MsaOptions::default()).unwrap().finish(0, 0);
        assert_eq!((empty.msa, empty.per_threshold.len()), (0.0, 10));
        assert!(matches!(
            PairTally::new(&options(&[1.5], Some(0))),
            Err(Error::InvalidThreshold(_))
        ));
    }
}
