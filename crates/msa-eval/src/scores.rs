//! Mean segmentation accuracy and single-threshold matching, as `elf.evaluation.matching`.

use ndarray::{Array2, ArrayView, Dimension};

use crate::assignment::linear_sum_assignment;
use crate::overlap::Overlap;
use crate::{Error, Result};

/// How the overlap of a predicted object P and a true object G is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatchCriterion {
    /// Intersection over union: |P ∩ G| / |P ∪ G|.
    #[default]
    Iou,
    /// Intersection over the predicted object: |P ∩ G| / |P|.
    Iop,
    /// Intersection over the true object: |P ∩ G| / |G|.
    Iot,
}

/// The paper's thresholds 0.50, 0.55, …, 0.95, bit for bit as numpy's `arange(0.5, 1.0, 0.05)`
/// computes them (`start + i·delta` with `delta = (start + step) − start`, so the third is
/// 0.6000000000000001), so that scores equal to a threshold compare exactly as in elf.
pub fn default_thresholds() -> Vec<f64> {
    let (start, step) = (0.5f64, 0.05f64);
    let delta = (start + step) - start;
    (0..10).map(|i| start + i as f64 * delta).collect()
}

/// Options of [`mean_segmentation_accuracy`]; `Default` is elf's.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct MsaOptions {
    /// IoU thresholds, each in (0, 1].
    pub thresholds: Vec<f64>,
    /// A label ignored on both sides (its objects are neither matched nor counted); `None` makes
    /// every label, 0 included, an object.
    pub ignore_label: Option<u64>,
}

impl Default for MsaOptions {
    fn default() -> Self {
        MsaOptions {
            thresholds: default_thresholds(),
            ignore_label: Some(0),
        }
    }
}

/// Counts at one threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdScore {
    pub threshold: f64,
    /// Segmentation accuracy TP / (TP + FP + FN), 0 when TP = 0.
    pub accuracy: f64,
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
}

/// The result of [`mean_segmentation_accuracy`].
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentationAccuracy {
    /// Mean of the per-threshold accuracies.
    pub msa: f64,
    /// One entry per threshold, in the order given.
    pub per_threshold: Vec<ThresholdScore>,
    /// Objects in the segmentation (ignored label excluded).
    pub n_pred: usize,
    /// Objects in the ground truth (ignored label excluded).
    pub n_true: usize,
}

impl SegmentationAccuracy {
    /// The score at a threshold (compared with a 1e-9 tolerance), if it was computed.
    pub fn at(&self, threshold: f64) -> Option<&ThresholdScore> {
        self.per_threshold
            .iter()
            .find(|s| (s.threshold - threshold).abs() < 1e-9)
    }

    /// Segmentation accuracy at IoU 0.5, if computed.
    pub fn sa50(&self) -> Option<f64> {
        self.at(0.5).map(|s| s.accuracy)
    }

    /// Segmentation accuracy at IoU 0.75, if computed.
    pub fn sa75(&self) -> Option<f64> {
        self.at(0.75).map(|s| s.accuracy)
    }
}

/// Mean segmentation accuracy of `segmentation` against `groundtruth`, exactly as elf's
/// `mean_segmentation_accuracy`:
///
/// - IoU = overlap / (|P| + |G| − overlap) with full object sizes (overlap with background
///   counts in the union);
/// - the ignore label (default 0) is removed on both sides;
/// - per threshold τ, TP = the number of pairs with IoU ≥ τ in an optimal one-to-one assignment
///   that maximises the number of such pairs, ties broken by the summed IoU (elf's cost
///   `−[IoU ≥ τ] − IoU / (2·n_matched)`);
/// - SA(τ) = TP / (TP + FP + FN), and 0 when TP = 0, so that two empty images score 0;
/// - mSA = mean of SA(τ).
///
/// Works for any unsigned label types (ids up to u64::MAX, non-consecutive), 2-D and 3-D.
///
/// Cost: a sparse overlap count (one pass over the pixels) and, per threshold, an assignment
/// only within groups of objects linked by pairs above the threshold (for IoU > 0.5 every group
/// is a single pair).
///
/// ```
/// use ndarray::array;
/// use msa_eval::{mean_segmentation_accuracy, MsaOptions};
///
/// let gt = array![[1u16, 1, 0, 2], [1, 1, 0, 2]];
/// let seg = array![[5u32, 5, 0, 0], [5, 5, 0, 7]];
/// let score = mean_segmentation_accuracy(seg.view(), gt.view(), &MsaOptions::default())?;
/// // Object 1 is matched perfectly; object 2 has IoU 0.5 with object 7.
/// assert_eq!(score.sa50(), Some(1.0));
/// assert_eq!(score.sa75(), Some(1.0 / 3.0));
/// assert!((score.msa - (1.0 + 9.0 / 3.0) / 10.0).abs() < 1e-12);
/// # Ok::<(), msa_eval::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`], [`Error::NoThresholds`], [`Error::InvalidThreshold`] for a
/// threshold outside (0, 1].
pub fn mean_segmentation_accuracy<A, B, D>(
    segmentation: ArrayView<A, D>,
    groundtruth: ArrayView<B, D>,
    options: &MsaOptions,
) -> Result<SegmentationAccuracy>
where
    A: Copy + Into<u64>,
    B: Copy + Into<u64>,
    D: Dimension,
{
    mean_segmentation_accuracy_of(&Overlap::new(segmentation, groundtruth)?, options)
}

/// [`mean_segmentation_accuracy`] from the contingency table of the two images (for a volume
/// scored block by block: [`Overlap::merge`] the blocks' tables).
///
/// # Errors
/// [`Error::NoThresholds`], [`Error::InvalidThreshold`] for a threshold outside (0, 1].
pub fn mean_segmentation_accuracy_of(
    overlap: &Overlap,
    options: &MsaOptions,
) -> Result<SegmentationAccuracy> {
    if options.thresholds.is_empty() {
        return Err(Error::NoThresholds);
    }
    for &t in &options.thresholds {
        check_threshold(t)?;
    }
    let table = ScoreTable::new(overlap, MatchCriterion::Iou, options.ignore_label);
    let per_threshold: Vec<ThresholdScore> = options
        .thresholds
        .iter()
        .map(|&t| {
            let tp = table.matches(t).len();
            let fp = table.n_pred - tp;
            let fn_ = table.n_true - tp;
            ThresholdScore {
                threshold: t,
                accuracy: ratio(tp, tp + fp + fn_),
                true_positives: tp,
                false_positives: fp,
                false_negatives: fn_,
            }
        })
        .collect();
    let msa = per_threshold.iter().map(|s| s.accuracy).sum::<f64>() / per_threshold.len() as f64;
    Ok(SegmentationAccuracy {
        msa,
        per_threshold,
        n_pred: table.n_pred,
        n_true: table.n_true,
    })
}

/// Options of [`matching`]; `Default` is elf's (`threshold=0.5, criterion="iou",
/// ignore_label=0`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchingOptions {
    pub threshold: f64,
    pub criterion: MatchCriterion,
    pub ignore_label: Option<u64>,
}

impl Default for MatchingOptions {
    fn default() -> Self {
        MatchingOptions {
            threshold: 0.5,
            criterion: MatchCriterion::Iou,
            ignore_label: Some(0),
        }
    }
}

/// One matched pair of objects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    pub pred: u64,
    pub gt: u64,
    /// The pair's score under the criterion.
    pub score: f64,
}

/// The result of [`matching`]. Every ratio is 0 when TP = 0, as in elf.
#[derive(Debug, Clone, PartialEq)]
pub struct Matching {
    /// TP / (TP + FP).
    pub precision: f64,
    /// TP / (TP + FN).
    pub recall: f64,
    /// Segmentation accuracy TP / (TP + FP + FN).
    pub accuracy: f64,
    /// 2·TP / (2·TP + FP + FN).
    pub f1: f64,
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
    /// The matched pairs, sorted by predicted id.
    pub matches: Vec<Match>,
}

/// Matches objects at one threshold with the chosen criterion, as elf's `matching`.
///
/// Note: elf's `"iop"` and `"iot"` divide by the other object's size than their names say (its
/// table is transposed relative to the StarDist code it follows): elf's `"iot"` is
/// [`MatchCriterion::Iop`] here and vice versa. The names here mean what they say.
///
/// # Errors
/// [`Error::ShapeMismatch`]; [`Error::InvalidThreshold`] outside (0, 1].
pub fn matching<A, B, D>(
    segmentation: ArrayView<A, D>,
    groundtruth: ArrayView<B, D>,
    options: &MatchingOptions,
) -> Result<Matching>
where
    A: Copy + Into<u64>,
    B: Copy + Into<u64>,
    D: Dimension,
{
    check_threshold(options.threshold)?;
    let overlap = Overlap::new(segmentation, groundtruth)?;
    let table = ScoreTable::new(&overlap, options.criterion, options.ignore_label);
    let mut matches: Vec<Match> = table
        .matches(options.threshold)
        .into_iter()
        .map(|e| Match {
            pred: overlap.pred_ids()[e.pred as usize],
            gt: overlap.gt_ids()[e.gt as usize],
            score: e.score,
        })
        .collect();
    matches.sort_unstable_by_key(|m| (m.pred, m.gt));
    let tp = matches.len();
    let fp = table.n_pred - tp;
    let fn_ = table.n_true - tp;
    Ok(Matching {
        precision: ratio(tp, tp + fp),
        recall: ratio(tp, tp + fn_),
        accuracy: ratio(tp, tp + fp + fn_),
        f1: ratio(2 * tp, 2 * tp + fp + fn_),
        true_positives: tp,
        false_positives: fp,
        false_negatives: fn_,
        matches,
    })
}

pub(crate) fn check_threshold(t: f64) -> Result<()> {
    if t > 0.0 && t <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidThreshold(t))
    }
}

pub(crate) fn ratio(num: usize, den: usize) -> f64 {
    if num == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// A scored pair: indices into the overlap's id lists.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Edge {
    pub(crate) pred: u32,
    pub(crate) gt: u32,
    pub(crate) score: f64,
}

/// The scored overlapping pairs with the ignore label removed.
pub(crate) struct ScoreTable {
    pub(crate) edges: Vec<Edge>,
    /// Objects on each side (ignored label excluded); they set the tie-break weight.
    pub(crate) n_pred: usize,
    pub(crate) n_true: usize,
    /// One more than the largest pred index an edge may hold.
    pub(crate) n_pred_index: usize,
}

impl ScoreTable {
    fn new(overlap: &Overlap, criterion: MatchCriterion, ignore: Option<u64>) -> ScoreTable {
        let ignored_pred = ignore.and_then(|l| overlap.pred_ids().binary_search(&l).ok());
        let ignored_gt = ignore.and_then(|l| overlap.gt_ids().binary_search(&l).ok());
        let (ps, gs) = (overlap.pred_sizes(), overlap.gt_sizes());
        let edges = overlap
            .pairs()
            .iter()
            .filter(|&&(p, g, _)| {
                Some(p as usize) != ignored_pred && Some(g as usize) != ignored_gt
            })
            .map(|&(p, g, n)| {
                let (n, sp, sg) = (n as f64, ps[p as usize] as f64, gs[g as usize] as f64);
                let score = match criterion {
                    MatchCriterion::Iou => n / (sp + sg - n).max(1e-7),
                    MatchCriterion::Iop => n / sp,
                    MatchCriterion::Iot => n / sg,
                };
                Edge {
                    pred: p,
                    gt: g,
                    score,
                }
            })
            .collect();
        ScoreTable {
            edges,
            n_pred: overlap.pred_ids().len() - ignored_pred.is_some() as usize,
            n_true: overlap.gt_ids().len() - ignored_gt.is_some() as usize,
            n_pred_index: overlap.pred_ids().len(),
        }
    }

    /// The matched pairs at `threshold` (> 0): a maximum set of one-to-one pairs with score ≥
    /// threshold, ties broken by the summed score, solved per connected group of such pairs.
    pub(crate) fn matches(&self, threshold: f64) -> Vec<Edge> {
        let n_matched = self.n_pred.min(self.n_true);
        if n_matched == 0 {
            return Vec::new();
        }
        let above: Vec<Edge> = self
            .edges
            .iter()
            .copied()
            .filter(|e| e.score >= threshold)
            .collect();
        // Group the pairs: nodes are pred indices, then gt indices shifted by n_pred_index.
        let node_gt = |g: u32| self.n_pred_index + g as usize;
        let mut groups = Groups::default();
        for e in &above {
            groups.union(e.pred as usize, node_gt(e.gt));
        }
        let mut by_group: std::collections::BTreeMap<usize, Vec<Edge>> = Default::default();
        for e in &above {
            by_group
                .entry(groups.find(e.pred as usize))
                .or_default()
                .push(*e);
        }
        let mut result = Vec::new();
        for (_, group) in by_group {
            if group.len() == 1 {
                result.push(group[0]);
                continue;
            }
            result.extend(self.assign(&group, threshold, n_matched));
        }
        result
    }

    /// Optimal assignment within one group with elf's cost, including the tie-break
    /// contribution of the group's pairs below the threshold.
    fn assign(&self, group: &[Edge], threshold: f64, n_matched: usize) -> Vec<Edge> {
        let mut rows: Vec<u32> = group.iter().map(|e| e.pred).collect();
        let mut cols: Vec<u32> = group.iter().map(|e| e.gt).collect();
        rows.sort_unstable();
        rows.dedup();
        cols.sort_unstable();
        cols.dedup();
        let mut cost = Array2::<f64>::zeros((rows.len(), cols.len()));
        let mut score = Array2::<f64>::zeros((rows.len(), cols.len()));
        let tie = 2.0 * n_matched as f64;
        for e in &self.edges {
            if let (Ok(r), Ok(c)) = (rows.binary_search(&e.pred), cols.binary_search(&e.gt)) {
                let hit = if e.score >= threshold { 1.0 } else { 0.0 };
                cost[[r, c]] = -hit - e.score / tie;
                score[[r, c]] = e.score;
            }
        }
        linear_sum_assignment(cost.view())
            .into_iter()
            .filter(|&(r, c)| score[[r, c]] >= threshold)
            .map(|(r, c)| Edge {
                pred: rows[r],
                gt: cols[c],
                score: score[[r, c]],
            })
            .collect()
    }
}

/// Union-find over node indices, grown on demand.
#[derive(Default)]
struct Groups {
    parent: std::collections::HashMap<usize, usize>,
}

impl Groups {
    fn find(&mut self, x: usize) -> usize {
        let mut root = x;
        while let Some(&p) = self.parent.get(&root) {
            if p == root {
                break;
            }
            root = p;
        }
        self.parent.insert(x, root);
        root
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent.insert(ra.max(rb), ra.min(rb));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A volume scored from the tables of its halves equals the volume scored whole.
    #[test]
    fn merged_tables_score_as_the_whole_volume() {
        // Objects spanning both halves; the segmentation shifts some borders and merges two.
        let gt =
            ndarray::Array3::from_shape_fn((4, 9, 7), |(_, y, x)| (y / 3 * 3 + x / 3 + 1) as u32);
        let seg = ndarray::Array3::from_shape_fn((4, 9, 7), |(z, y, x)| {
            let x = if z >= 3 { (x + 1).min(6) } else { x };
            if y < 3 && x < 6 {
                1
            } else {
                (y / 3 * 3 + x / 3 + 1) as u32
            }
        });
        let whole =
            mean_segmentation_accuracy(seg.view(), gt.view(), &MsaOptions::default()).unwrap();
        let half = |r: std::ops::Range<usize>| {
            Overlap::new(
                seg.slice(ndarray::s![r.clone(), .., ..]),
                gt.slice(ndarray::s![r, .., ..]),
            )
            .unwrap()
        };
        let merged = half(0..2).merge(&half(2..4)).unwrap();
        assert_eq!(merged, Overlap::new(seg.view(), gt.view()).unwrap());
        let streamed = mean_segmentation_accuracy_of(&merged, &MsaOptions::default()).unwrap();
        assert_eq!(streamed, whole);
        assert!(whole.msa > 0.0 && whole.msa < 1.0, "{whole:?}");
    }
    use ndarray::{array, Array2, Array3};

    fn msa(seg: &Array2<u32>, gt: &Array2<u32>) -> SegmentationAccuracy {
        mean_segmentation_accuracy(seg.view(), gt.view(), &MsaOptions::default()).unwrap()
    }

    #[test]
    fn default_thresholds_equal_numpy_arange() {
        let t = default_thresholds();
        assert_eq!(t.len(), 10);
        // numpy: np.arange(0.5, 1.0, 0.05)[2] == 0.6000000000000001
        assert_eq!(t[2], 0.6000000000000001);
        assert_eq!(t[5], 0.7500000000000002);
        assert_eq!(t[9], 0.9500000000000004);
    }

    #[test]
    fn an_iou_equal_to_a_rounded_threshold_compares_like_numpy() {
        // IoU exactly 3/5 = 0.6 < 0.6000000000000001: not a match at the third threshold.
        let gt = array![[1u32, 1, 1, 1, 1]];
        let seg = array![[1u32, 1, 1, 0, 0]];
        let s = msa(&seg, &gt);
        assert_eq!(s.per_threshold[1].true_positives, 1); // 0.55
        assert_eq!(s.per_threshold[2].true_positives, 0); // 0.6000000000000001
    }

    #[test]
    fn touching_objects_background_overlap_and_border_objects() {
        // GT: two touching objects; seg: the first one right, the second one grown into the
        // background (IoU 4/6) and a false positive on the border.
        let gt = array![
            [1u32, 1, 2, 2, 0, 0],
            [1, 1, 2, 2, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ];
        let seg = array![
            [4u32, 4, 8, 8, 8, 0],
            [4, 4, 8, 8, 8, 0],
            [0, 0, 0, 0, 0, 3],
        ];
        let s = msa(&seg, &gt);
        assert_eq!((s.n_pred, s.n_true), (3, 2));
        for t in &s.per_threshold {
            let tp = if t.threshold <= 4.0 / 6.0 { 2 } else { 1 };
            assert_eq!(t.true_positives, tp, "at {}", t.threshold);
            assert_eq!(t.false_positives, 3 - tp);
            assert_eq!(t.false_negatives, 2 - tp);
            assert_eq!(t.accuracy, tp as f64 / (5 - tp) as f64);
        }
    }

    #[test]
    fn empty_versus_empty_scores_zero_as_in_elf() {
        let z = Array2::<u32>::zeros((4, 4));
        let s = msa(&z, &z);
        assert_eq!(s.msa, 0.0);
        assert_eq!((s.n_pred, s.n_true), (0, 0));
        let e = Array2::<u32>::zeros((0, 0));
        assert_eq!(msa(&e, &e).msa, 0.0);
    }

    #[test]
    fn one_pixel_objects_and_huge_non_consecutive_ids() {
        let gt = array![[u64::MAX, 0], [0, 1 << 40]];
        let seg = array![[3u8, 0], [0, 200]];
        let s = mean_segmentation_accuracy(seg.view(), gt.view(), &MsaOptions::default()).unwrap();
        assert_eq!(s.msa, 1.0);
    }

    #[test]
    fn a_tie_at_exactly_one_half_is_resolved_one_to_one() {
        let gt = array![[1u32, 1, 2, 2]];
        let seg = array![[7u32, 5, 5, 9]];
        let s = msa(&seg, &gt);
        // IoU(7,1)=1/2, IoU(5,1)=1/3, IoU(5,2)=1/3, IoU(9,2)=1/2.
        assert_eq!(s.per_threshold[0].true_positives, 2);
        let star = array![[1u32, 1, 1, 1]];
        let halves = array![[1u32, 1, 2, 2]];
        // Both preds have IoU 0.5 with the one GT: only one can match.
        let s = msa(&halves, &star);
        assert_eq!(s.per_threshold[0].true_positives, 1);
        assert_eq!(s.per_threshold[0].accuracy, 0.5);
    }

    #[test]
    fn ignore_label_none_makes_background_an_object() {
        let gt = array![[0u32, 0, 1, 1]];
        let seg = array![[0u32, 0, 1, 1]];
        let opts = MsaOptions {
            ignore_label: None,
            ..Default::default()
        };
        let s = mean_segmentation_accuracy(seg.view(), gt.view(), &opts).unwrap();
        assert_eq!((s.n_pred, s.n_true, s.msa), (2, 2, 1.0));
        let other = MsaOptions {
            ignore_label: Some(1),
            ..Default::default()
        };
        let s = mean_segmentation_accuracy(seg.view(), gt.view(), &other).unwrap();
        assert_eq!((s.n_pred, s.n_true, s.msa), (1, 1, 1.0));
    }

    #[test]
    fn volumes_are_scored_like_images() {
        let mut gt = Array3::<u16>::zeros((2, 3, 3));
        gt[[0, 0, 0]] = 1;
        gt[[1, 0, 0]] = 1;
        let s = mean_segmentation_accuracy(gt.view(), gt.view(), &MsaOptions::default()).unwrap();
        assert_eq!(s.msa, 1.0);
    }

    #[test]
    fn invalid_thresholds_and_shapes_are_errors() {
        let a = Array2::<u32>::zeros((2, 2));
        for bad in [vec![], vec![0.0], vec![1.5], vec![f64::NAN]] {
            let o = MsaOptions {
                thresholds: bad,
                ..Default::default()
            };
            assert!(mean_segmentation_accuracy(a.view(), a.view(), &o).is_err());
        }
        let b = Array2::<u32>::zeros((2, 3));
        assert!(mean_segmentation_accuracy(a.view(), b.view(), &MsaOptions::default()).is_err());
    }

    #[test]
    fn matching_criteria_divide_by_the_named_object() {
        // Pred 1 (2 px) lies inside GT 1 (4 px).
        let gt = array![[1u32, 1, 1, 1]];
        let seg = array![[1u32, 1, 0, 0]];
        let run = |criterion, threshold| {
            matching(
                seg.view(),
                gt.view(),
                &MatchingOptions {
                    threshold,
                    criterion,
                    ignore_label: Some(0),
                },
            )
            .unwrap()
        };
        assert_eq!(run(MatchCriterion::Iou, 0.5).true_positives, 1);
        assert_eq!(run(MatchCriterion::Iou, 0.51).true_positives, 0);
        assert_eq!(run(MatchCriterion::Iop, 1.0).matches[0].score, 1.0);
        assert_eq!(run(MatchCriterion::Iot, 0.5).matches[0].score, 0.5);
        assert_eq!(run(MatchCriterion::Iot, 0.6).true_positives, 0);
    }

    #[test]
    fn matching_reports_precision_recall_f1_and_pairs() {
        let gt = array![[1u32, 1, 2, 2, 3, 3]];
        let seg = array![[4u32, 4, 5, 5, 0, 0]];
        let m = matching(seg.view(), gt.view(), &MatchingOptions::default()).unwrap();
        assert_eq!(
            (m.true_positives, m.false_positives, m.false_negatives),
            (2, 0, 1)
        );
        assert_eq!(m.precision, 1.0);
        assert_eq!(m.recall, 2.0 / 3.0);
        assert_eq!(m.f1, 4.0 / 5.0);
        assert_eq!(m.accuracy, 2.0 / 3.0);
        assert_eq!(
            m.matches.iter().map(|x| (x.pred, x.gt)).collect::<Vec<_>>(),
            vec![(4, 1), (5, 2)]
        );
    }

    #[test]
    fn many_small_predictions_in_one_object_match_once_under_iop() {
        let gt = array![[1u32, 1, 1, 1, 1, 1]];
        let seg = array![[1u32, 2, 3, 4, 5, 6]];
        let m = matching(
            seg.view(),
            gt.view(),
            &MatchingOptions {
                criterion: MatchCriterion::Iop,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((m.true_positives, m.false_positives), (1, 5));
    }
}
