//! Invariants of the seeded watershed on random inputs.

#[path = "common/textbook.rs"]
mod textbook;

use ndarray::{Array2, Array3, Axis};
use proptest::prelude::*;
use seg_targets::{connected_components, Connectivity};
use watershed::{seeded_watershed, Flooding, MarkerOrder, WatershedOptions};

/// Heights, markers (sparse, random ids up to 5) and a mask, of one random 2-D shape.
fn case(levels: u32) -> impl Strategy<Value = (Array2<f32>, Array2<u32>, Array2<bool>)> {
    (1usize..16, 1usize..16).prop_flat_map(move |(h, w)| {
        let n = h * w;
        (
            proptest::collection::vec(0..levels, n),
            proptest::collection::vec(prop_oneof![8 => Just(0u32), 1 => 1u32..=5], n),
            proptest::collection::vec(proptest::bool::weighted(0.8), n),
        )
            .prop_map(move |(hs, ms, mask)| {
                (
                    Array2::from_shape_vec(
                        (h, w),
                        hs.into_iter().map(|v| v as f32 / levels as f32).collect(),
                    )
                    .unwrap(),
                    Array2::from_shape_vec((h, w), ms).unwrap(),
                    Array2::from_shape_vec((h, w), mask).unwrap(),
                )
            })
    })
}

/// Like [`case`], with pairwise distinct heights (a shuffled ramp).
fn distinct_case() -> impl Strategy<Value = (Array2<f32>, Array2<u32>, Array2<bool>)> {
    case(2).prop_flat_map(|(h, m, mask)| {
        let n = h.len() as u32;
        let shape = h.raw_dim();
        Just((0..n).collect::<Vec<_>>())
            .prop_shuffle()
            .prop_map(move |ramp| {
                let h = Array2::from_shape_vec(
                    shape,
                    ramp.into_iter().map(|v| v as f32 / n as f32).collect(),
                )
                .unwrap();
                (h, m.clone(), mask.clone())
            })
    })
}

/// Every combination of connectivity, flooding and marker order.
fn all_options() -> Vec<WatershedOptions> {
    let mut out = Vec::new();
    for connectivity in [Connectivity::Face, Connectivity::Full] {
        for flooding in [Flooding::Classic, Flooding::Monotone] {
            for marker_order in [MarkerOrder::ScikitImage, MarkerOrder::Raster] {
                out.push({
                    let mut opts = WatershedOptions::default();
                    opts.connectivity = connectivity;
                    opts.flooding = flooding;
                    opts.marker_order = marker_order;
                    opts
                });
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_reachable_masked_pixel_is_labelled_and_nothing_outside_the_mask((h, m, mask) in case(4)) {
        for opts in all_options() {
            let seg = seeded_watershed(h.view(), m.view(), Some(mask.view()), &opts).unwrap();
            // Reachable = in a mask component (same connectivity) that holds a marker in the mask.
            let (components, n) = connected_components(mask.view(), opts.connectivity).unwrap();
            let mut seeded = vec![false; n + 1];
            for ((c, mk), inside) in components.iter().zip(&m).zip(&mask) {
                if *mk != 0 && *inside {
                    seeded[*c as usize] = true;
                }
            }
            for ((s, c), inside) in seg.iter().zip(&components).zip(&mask) {
                if !inside {
                    prop_assert_eq!(*s, 0);
                } else {
                    prop_assert_eq!(*s != 0, seeded[*c as usize]);
                }
            }
        }
    }

    #[test]
    fn the_result_does_not_depend_on_marker_ids((h, m, mask) in case(3), shift in 1u32..1000) {
        // Any injective renaming of the marker ids renames the result the same way.
        let rename = |v: u32| if v == 0 { 0 } else { (6 - v) * 7919 + shift };
        let renamed = m.mapv(rename);
        for opts in all_options() {
            let a = seeded_watershed(h.view(), m.view(), Some(mask.view()), &opts).unwrap();
            let b = seeded_watershed(h.view(), renamed.view(), Some(mask.view()), &opts).unwrap();
            prop_assert_eq!(a.mapv(rename), b);
        }
    }

    #[test]
    fn classic_flooding_equals_a_textbook_watershed_when_heights_are_distinct((h, m, mask) in distinct_case()) {
        // With distinct heights the flooding order is unique, so the textbook queue and the
        // crate's must agree pixel for pixel.
        let ours = seeded_watershed(h.view(), m.view(), Some(mask.view()), &WatershedOptions::default()).unwrap();
        let reference = textbook::textbook_watershed(
            h.view().insert_axis(Axis(0)),
            m.view().insert_axis(Axis(0)),
            Some(mask.view().insert_axis(Axis(0))),
        );
        prop_assert_eq!(ours, reference.index_axis_move(Axis(0), 0));
    }

    #[test]
    fn raster_marker_order_equals_the_textbook_watershed_even_on_plateaus((h, m, mask) in case(3)) {
        // Both queue markers in raster order and break every tie first in, first out.
        let opts = {
    let mut opts = WatershedOptions::default();
    opts.marker_order = MarkerOrder::Raster;
    opts
};
        let ours = seeded_watershed(h.view(), m.view(), Some(mask.view()), &opts).unwrap();
        let reference = textbook::textbook_watershed(
            h.view().insert_axis(Axis(0)),
            m.view().insert_axis(Axis(0)),
            Some(mask.view().insert_axis(Axis(0))),
        );
        prop_assert_eq!(ours, reference.index_axis_move(Axis(0), 0));
    }

    #[test]
    fn three_d_floods_equal_the_textbook_one(
        hs in Just((0..120u32).collect::<Vec<_>>()).prop_shuffle(),
        seeds in proptest::collection::vec(prop_oneof![20 => Just(0u32), 1 => 1u32..=4], 4 * 5 * 6),
    ) {
        let h = Array3::from_shape_vec((4, 5, 6), hs.into_iter().map(|v| v as f32 / 120.0).collect()).unwrap();
        let m = Array3::from_shape_vec((4, 5, 6), seeds).unwrap();
        let ours = seeded_watershed(h.view(), m.view(), None, &WatershedOptions::default()).unwrap();
        prop_assert_eq!(ours, textbook::textbook_watershed(h.view(), m.view(), None));
    }
}
