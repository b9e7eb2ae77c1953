//! `cargo bench -p watershed`: the CREMI boundary recipe on a 1250×1250 boundary map, against
//! the same recipe with a plain textbook priority-queue watershed, measured in the same run.
//!
//! The map is realistic rather than noise: the thick boundaries of a Voronoi tiling with ~1000
//! cells (neurite-like), smoothed with σ = 1, scaled by 1.5 and with ±0.1 uniform noise, clipped
//! to [0, 1]: about 0.9 on the boundaries, rising towards them, near 0 inside the cells.

use std::time::{Duration, Instant};

#[path = "../tests/common/textbook.rs"]
mod textbook;

use ndarray::{Array2, Axis, Zip};
use seg_data::synthetic::{SplitMix64, VoronoiSeeds};
use seg_targets::{find_boundaries, BoundaryOptions};
use watershed::{
    gaussian_smoothing, seeds_from_mask, size_filter, watershed_from_boundaries, BoundaryRecipe,
    MarkerOrder,
};

const SIZE: usize = 1250;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The recipe's steps with the textbook flood in place of the crate's.
fn textbook_recipe(boundaries: &Array2<f32>, recipe: &BoundaryRecipe) -> Array2<u32> {
    let seeds =
        seeds_from_mask(boundaries.mapv(|b| 1.0 - b > recipe.seed_threshold).view()).unwrap();
    let seg = textbook::textbook_watershed(
        boundaries.view().insert_axis(Axis(0)),
        seeds.view().insert_axis(Axis(0)),
        None,
    )
    .index_axis_move(Axis(0), 0);
    size_filter(seg.view(), recipe.min_size).unwrap()
}

fn main() {
    let mut rng = SplitMix64::new(7);
    let truth = VoronoiSeeds::jittered(SIZE, SIZE, 39, 12, &mut rng).labels();
    let thick = find_boundaries(truth.view(), &BoundaryOptions::default()).unwrap();
    let smooth =
        gaussian_smoothing(thick.mapv(|b| if b { 1.0f32 } else { 0.0 }).view(), 1.0).unwrap();
    let mut boundaries = smooth.clone();
    Zip::from(&mut boundaries)
        .for_each(|v| *v = (1.5 * *v + (rng.uniform() as f32 - 0.5) * 0.2).clamp(0.0, 1.0));
    let recipe = BoundaryRecipe::default();

    let mut ours = Vec::new();
    let mut seg = Array2::zeros((0, 0));
    for _ in 0..7 {
        let start = Instant::now();
        seg = watershed_from_boundaries(boundaries.view(), None, &recipe).unwrap();
        ours.push(start.elapsed());
    }
    let mut raster_recipe = recipe;
    raster_recipe.watershed.marker_order = MarkerOrder::Raster;
    let mut raster = Vec::new();
    let mut raster_seg = Array2::zeros((0, 0));
    for _ in 0..7 {
        let start = Instant::now();
        raster_seg = watershed_from_boundaries(boundaries.view(), None, &raster_recipe).unwrap();
        raster.push(start.elapsed());
    }
    let mut base = Vec::new();
    let mut reference = Array2::zeros((0, 0));
    for _ in 0..3 {
        let start = Instant::now();
        reference = textbook_recipe(&boundaries, &recipe);
        base.push(start.elapsed());
    }
    assert_eq!(
        raster_seg, reference,
        "raster marker order must equal the textbook flood"
    );
    let differing = seg.iter().zip(&raster_seg).filter(|(a, b)| a != b).count();
    let n_objects = seg.iter().copied().max().unwrap_or(0);

    let machine = seg_data::machine::describe();
    let (ours, raster, base) = (median(ours), median(raster), median(base));
    println!("CREMI boundary recipe (seeds, flood, size filter), {SIZE}x{SIZE} f32 boundary map, {n_objects} objects");
    println!("machine: {machine}; the recipe runs on 1 thread");
    println!("  textbook priority-queue watershed (std BinaryHeap, all markers queued), median of 3: {:>8.1} ms", ms(base));
    println!("  crate, default (bit-exact to scikit-image), median of 7:                           {:>8.1} ms   {:.2}x faster", ms(ours), ms(base) / ms(ours));
    println!("  crate, MarkerOrder::Raster (identical to the textbook flood), median of 7:         {:>8.1} ms   {:.2}x faster", ms(raster), ms(base) / ms(raster));
    println!(
        "  pixels where scikit-image's marker tie order changes the result: {differing} of {}",
        seg.len()
    );
}
