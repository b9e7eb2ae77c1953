//! Invariants of the metric on random label images.

#[path = "common/elf_reference.rs"]
mod elf_reference;

use msa_eval::{
    default_thresholds, matching, mean_segmentation_accuracy, MatchingOptions, MsaOptions,
};
use ndarray::Array2;
use proptest::prelude::*;

/// Small random label images with few ids, so that objects overlap in many ways.
fn labels(max_id: u32) -> impl Strategy<Value = Array2<u32>> {
    (1usize..12, 1usize..12).prop_flat_map(move |(h, w)| {
        proptest::collection::vec(0..=max_id, h * w)
            .prop_map(move |v| Array2::from_shape_vec((h, w), v).unwrap())
    })
}

/// A pair of images of one shape: a ground truth and a noisy copy.
fn pair() -> impl Strategy<Value = (Array2<u32>, Array2<u32>)> {
    labels(5).prop_flat_map(|gt| {
        let n = gt.len();
        let shape = gt.raw_dim();
        (
            Just(gt),
            proptest::collection::vec(0u32..=6, n)
                .prop_map(move |v| Array2::from_shape_vec(shape, v).unwrap()),
        )
    })
}

/// Blocky images (2×2 blocks) so that IoUs well above 0.5 occur.
fn blocky_pair() -> impl Strategy<Value = (Array2<u32>, Array2<u32>)> {
    pair().prop_map(|(gt, seg)| {
        let up = |a: &Array2<u32>| {
            Array2::from_shape_fn((a.nrows() * 2, a.ncols() * 2), |(y, x)| a[[y / 2, x / 2]])
        };
        let gt2 = up(&gt);
        let mut seg2 = gt2.clone();
        // Perturb a few pixels only.
        for ((y, x), v) in seg.indexed_iter() {
            if (y + x) % 3 == 0 {
                seg2[[2 * y, 2 * x]] = *v;
            }
        }
        (gt2, seg2)
    })
}

/// A permutation of 0..=max with 0 fixed, as a lookup table with huge, non-consecutive ids.
fn renaming() -> impl Strategy<Value = Vec<u64>> {
    Just((1u64..=6).collect::<Vec<_>>())
        .prop_shuffle()
        .prop_map(|p| {
            std::iter::once(0)
                .chain(p.into_iter().map(|v| v * 0x1_0000_0001 + 7))
                .collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn an_identical_segmentation_scores_one(gt in labels(6)) {
        let s = mean_segmentation_accuracy(gt.view(), gt.view(), &MsaOptions::default()).unwrap();
        let expected = if gt.iter().any(|v| *v != 0) { 1.0 } else { 0.0 };
        prop_assert_eq!(s.msa, expected);
    }

    #[test]
    fn renaming_ids_never_changes_a_score((gt, seg) in pair(), a in renaming(), b in renaming()) {
        let base = mean_segmentation_accuracy(seg.view(), gt.view(), &MsaOptions::default()).unwrap();
        let gt2 = gt.mapv(|v| a[v as usize]);
        let seg2 = seg.mapv(|v| b[v as usize]);
        let renamed = mean_segmentation_accuracy(seg2.view(), gt2.view(), &MsaOptions::default()).unwrap();
        prop_assert_eq!(&base.per_threshold, &renamed.per_threshold);
        prop_assert_eq!(base.msa, renamed.msa);
    }

    #[test]
    fn equals_elfs_dense_algorithm((gt, seg) in pair()) {
        let ours = mean_segmentation_accuracy(seg.view(), gt.view(), &MsaOptions::default()).unwrap();
        let reference = elf_reference::dense_msa(seg.view(), gt.view(), &default_thresholds());
        prop_assert!((ours.msa - reference).abs() < 1e-12, "{} vs {}", ours.msa, reference);
    }

    #[test]
    fn equals_elfs_dense_algorithm_on_similar_segmentations((gt, seg) in blocky_pair()) {
        let ours = mean_segmentation_accuracy(seg.view(), gt.view(), &MsaOptions::default()).unwrap();
        let reference = elf_reference::dense_msa(seg.view(), gt.view(), &default_thresholds());
        prop_assert!((ours.msa - reference).abs() < 1e-12, "{} vs {}", ours.msa, reference);
    }

    #[test]
    fn matches_are_one_to_one_and_above_the_threshold((gt, seg) in pair(), t in 0.05f64..1.0) {
        let m = matching(seg.view(), gt.view(), &{
    let mut opts = MatchingOptions::default();
    opts.threshold = t;
    opts
}).unwrap();
        let mut preds: Vec<_> = m.matches.iter().map(|x| x.pred).collect();
        let mut gts: Vec<_> = m.matches.iter().map(|x| x.gt).collect();
        preds.dedup();
        gts.sort_unstable();
        gts.dedup();
        prop_assert_eq!(preds.len(), m.true_positives);
        prop_assert_eq!(gts.len(), m.true_positives);
        prop_assert!(m.matches.iter().all(|x| x.score >= t && x.pred != 0 && x.gt != 0));
    }
}
