//! The two recipes recover a synthetic label image from the targets `seg-targets` makes of it.

use msa_eval::{mean_segmentation_accuracy, MsaOptions};
use ndarray::{s, Array2, Axis};
use seg_targets::{make_targets, TargetSetting};
use watershed::{
    watershed_from_boundaries, watershed_from_distances, BoundaryRecipe, DistanceRecipe,
};

/// Convex objects of at least 200 pixels on a 192×256 canvas: rectangles in touching rows,
/// discs and ellipses, some touching each other, some on the image border.
fn synthetic_labels() -> Array2<u32> {
    let mut l = Array2::<u32>::zeros((192, 256));
    let mut id = 0;
    let mut next = || {
        id += 1;
        id
    };
    // Three touching rectangles (20×16 = 320 px each).
    for k in 0..3 {
        let v = next();
        l.slice_mut(s![8..28, 10 + 16 * k..26 + 16 * k]).fill(v);
    }
    // A rectangle on the top border and one in the corner.
    let v = next();
    l.slice_mut(s![0..14, 80..110]).fill(v);
    let v = next();
    l.slice_mut(s![178..192, 236..256]).fill(v);
    // Discs of radius 9-12 (≥ 250 px), two pairs touching side by side.
    let discs = [
        (60.0, 30.0, 10.0),
        (60.0, 50.0, 10.0),
        (70.0, 120.0, 12.0),
        (110.0, 40.0, 9.0),
        (150.0, 90.0, 11.0),
        (150.0, 112.0, 11.0),
    ];
    for (cy, cx, r) in discs {
        let v = next();
        for ((y, x), p) in l.indexed_iter_mut() {
            let (dy, dx) = (y as f64 - cy, x as f64 - cx);
            if dy * dy + dx * dx <= r * r {
                *p = v;
            }
        }
    }
    // Ellipses.
    for (cy, cx, ry, rx) in [
        (40.0, 200.0, 12.0, 24.0),
        (100.0, 190.0, 20.0, 9.0),
        (130.0, 230.0, 10.0, 16.0),
    ] {
        let v = next();
        for ((y, x), p) in l.indexed_iter_mut() {
            let (dy, dx) = ((y as f64 - cy) / ry, (x as f64 - cx) / rx);
            if dy * dy + dx * dx <= 1.0 {
                *p = v;
            }
        }
    }
    l
}

fn msa(seg: &Array2<u32>, gt: &Array2<u32>) -> f64 {
    mean_segmentation_accuracy(seg.view(), gt.view(), &MsaOptions::default())
        .unwrap()
        .msa
}

#[test]
fn every_synthetic_object_is_convex_and_large_enough() {
    let l = synthetic_labels();
    let max = *l.iter().max().unwrap();
    for id in 1..=max {
        let size = l.iter().filter(|v| **v == id).count();
        assert!(size >= 200, "object {id} has {size} px");
    }
}

#[test]
fn the_boundary_recipe_recovers_the_labels_exactly() {
    let gt = synthetic_labels();
    let t = make_targets(gt.view(), TargetSetting::LivecellBoundaries).unwrap();
    let (fg, bd) = (t.index_axis(Axis(0), 0), t.index_axis(Axis(0), 1));
    let seg = watershed_from_boundaries(bd, Some(fg), &BoundaryRecipe::default()).unwrap();
    assert_eq!(msa(&seg, &gt), 1.0);
}

#[test]
fn the_cremi_form_recovers_a_tiling_exactly() {
    // CREMI-like: objects fill the image, boundaries only.
    let mut gt = Array2::<u32>::zeros((120, 150));
    for ((y, x), v) in gt.indexed_iter_mut() {
        *v = (y / 30) as u32 * 10 + (x / 25) as u32 + 1;
    }
    let t = make_targets(gt.view(), TargetSetting::Cremi).unwrap();
    let seg = watershed_from_boundaries(t.index_axis(Axis(0), 0), None, &BoundaryRecipe::default())
        .unwrap();
    assert_eq!(msa(&seg, &gt), 1.0);
}

#[test]
fn the_distance_recipe_recovers_the_labels() {
    let gt = synthetic_labels();
    let t = make_targets(gt.view(), TargetSetting::LivecellDistances).unwrap();
    let seg = watershed_from_distances(
        t.index_axis(Axis(0), 1),
        t.index_axis(Axis(0), 2),
        t.index_axis(Axis(0), 0),
        &DistanceRecipe::default(),
    )
    .unwrap();
    let score = msa(&seg, &gt);
    assert!(score >= 0.9, "mSA {score}");
}

#[test]
fn all_background_and_nan_inputs() {
    let zeros = Array2::<f32>::zeros((1, 40));
    let seg =
        watershed_from_boundaries(zeros.view(), Some(zeros.view()), &BoundaryRecipe::default())
            .unwrap();
    assert!(seg.iter().all(|v| *v == 0));
    let seg = watershed_from_distances(
        zeros.view(),
        zeros.view(),
        zeros.view(),
        &DistanceRecipe::default(),
    )
    .unwrap();
    assert!(seg.iter().all(|v| *v == 0));
    let mut bad = Array2::<f32>::zeros((40, 1));
    bad[[3, 0]] = f32::NAN;
    let err = watershed_from_boundaries(bad.view(), None, &BoundaryRecipe::default()).unwrap_err();
    assert!(
        err.to_string().contains("NaN") && err.to_string().contains("[3, 0]"),
        "{err}"
    );
}

#[test]
fn infinite_predictions_and_nan_thresholds_are_errors_naming_them() {
    let zeros = Array2::<f32>::zeros((8, 8));
    for value in [f32::INFINITY, f32::NEG_INFINITY] {
        let mut bad = zeros.clone();
        bad[[2, 5]] = value;
        let err = watershed_from_boundaries(bad.view(), None, &BoundaryRecipe::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("boundary map") && err.contains("[2, 5]"),
            "{err}"
        );
        assert!(err.contains("inf"), "{err}");
        let err = watershed_from_distances(
            zeros.view(),
            zeros.view(),
            bad.view(),
            &DistanceRecipe::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("foreground map") && err.contains("[2, 5]"),
            "{err}"
        );
    }
    let mut recipe = BoundaryRecipe::default();
    recipe.seed_threshold = f32::NAN;
    let err = watershed_from_boundaries(zeros.view(), None, &recipe)
        .unwrap_err()
        .to_string();
    assert!(err.contains("seed_threshold"), "{err}");
    let mut recipe = DistanceRecipe::default();
    recipe.center_threshold = f32::NAN;
    let err = watershed_from_distances(zeros.view(), zeros.view(), zeros.view(), &recipe)
        .unwrap_err()
        .to_string();
    assert!(err.contains("center_threshold"), "{err}");
}
