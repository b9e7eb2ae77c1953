//! `cargo bench -p msa-eval`: mean segmentation accuracy on a CREMI-sized slice (1250×1250,
//! ~1000 objects per side), against an elf-style baseline (dense contingency table over all id
//! pairs and a full assignment over all objects per threshold) measured in the same run.

use std::time::{Duration, Instant};

use msa_eval::{default_thresholds, mean_segmentation_accuracy, MsaOptions};
use ndarray::Array2;
use seg_data::synthetic::{SplitMix64, VoronoiSeeds};

#[path = "../tests/common/elf_reference.rs"]
mod elf_reference;

const SIZE: usize = 1250;
const CELL: usize = 39; // 32×32 seeds → ~1000 objects

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // Ground truth: a Voronoi tiling of jittered seeds; prediction: the same seeds moved by up
    // to 4 px, with new ids.
    let mut rng = SplitMix64::new(2024);
    let truth = VoronoiSeeds::jittered(SIZE, SIZE, CELL, 12, &mut rng);
    let gt = truth.labels();
    let seg = truth.moved(4, &mut rng).labels();
    let options = MsaOptions::default();
    let thresholds = default_thresholds();
    let count = |a: &Array2<u32>| {
        let mut ids: Vec<u32> = a.iter().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };

    let mut ours = Vec::new();
    let mut score = 0.0;
    for _ in 0..11 {
        let start = Instant::now();
        score = mean_segmentation_accuracy(seg.view(), gt.view(), &options)
            .expect("same shapes")
            .msa;
        ours.push(start.elapsed());
    }
    let start = Instant::now();
    let baseline_score = elf_reference::dense_msa(seg.view(), gt.view(), &thresholds);
    let baseline = start.elapsed();
    assert!(
        (score - baseline_score).abs() < 1e-12,
        "scores differ: {score} vs {baseline_score}"
    );

    let machine = seg_data::machine::describe();
    let ours = median(ours);
    println!("mean_segmentation_accuracy, {SIZE}x{SIZE} u32 labels, {} predicted / {} true objects, 10 thresholds", count(&seg) - 1, count(&gt) - 1);
    println!("machine: {machine}; the metric runs on 1 thread");
    println!("  msa-eval (sparse overlap + grouped assignment), median of 11: {:>10.2} ms   mSA = {score:.4}", ours.as_secs_f64() * 1e3);
    println!("  dense baseline (elf's algorithm, dense table + full assignment): {:>10.2} ms   mSA = {baseline_score:.4}", baseline.as_secs_f64() * 1e3);
    println!(
        "  ratio baseline / msa-eval: {:.1}x",
        baseline.as_secs_f64() / ours.as_secs_f64()
    );
}
