//! `cargo bench -p msa-eval`: mean segmentation accuracy on a CREMI-sized slice (1250×1250,
//! ~1000 objects per side), against an elf-style baseline (dense contingency table over all id
//! pairs and a full assignment over all objects per threshold) measured in the same run.

use std::time::{Duration, Instant};

use msa_eval::{default_thresholds, mean_segmentation_accuracy, MsaOptions};
use ndarray::Array2;

#[path = "../tests/common/elf_reference.rs"]
mod elf_reference;

const SIZE: usize = 1250;
const CELL: usize = 39; // 32×32 seeds → 1024 objects

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const CELLS: usize = SIZE.div_ceil(CELL);

/// One seed per grid cell, moved by up to ±`jitter` from `base` (the cell centres when `None`),
/// each with a random (non-consecutive) id.
fn seeds(
    rng: &mut SplitMix,
    base: Option<&[(usize, usize, u32)]>,
    jitter: usize,
) -> Vec<(usize, usize, u32)> {
    (0..CELLS * CELLS)
        .map(|k| {
            let (y0, x0) = match base {
                Some(b) => (b[k].0, b[k].1),
                None => ((k / CELLS) * CELL + CELL / 2, (k % CELLS) * CELL + CELL / 2),
            };
            let y = (y0 + rng.below(2 * jitter + 1)).saturating_sub(jitter);
            let x = (x0 + rng.below(2 * jitter + 1)).saturating_sub(jitter);
            (y, x, (rng.next() >> 34) as u32 + 1)
        })
        .collect()
}

/// The Voronoi tiling of the seeds (each seed is searched only in its own and adjacent cells).
fn voronoi(seeds: &[(usize, usize, u32)]) -> Array2<u32> {
    let cells = CELLS;
    Array2::from_shape_fn((SIZE, SIZE), |(y, x)| {
        let (cy, cx) = ((y / CELL) as isize, (x / CELL) as isize);
        let mut best = (usize::MAX, 0u32);
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (ny, nx) = (cy + dy, cx + dx);
                if ny < 0 || nx < 0 || ny >= cells as isize || nx >= cells as isize {
                    continue;
                }
                let (sy, sx, id) = seeds[ny as usize * cells + nx as usize];
                let d = sy.abs_diff(y).pow(2) + sx.abs_diff(x).pow(2);
                if d < best.0 {
                    best = (d, id);
                }
            }
        }
        best.1
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // Ground truth: jittered seeds; prediction: the same seeds moved by up to 4 px, new ids.
    let mut rng = SplitMix(2024);
    let true_seeds = seeds(&mut rng, None, 12);
    let gt = voronoi(&true_seeds);
    let seg = voronoi(&seeds(&mut rng, Some(&true_seeds), 4));
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

    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let ours = median(ours);
    println!("mean_segmentation_accuracy, {SIZE}x{SIZE} u32 labels, {} predicted / {} true objects, 10 thresholds", count(&seg) - 1, count(&gt) - 1);
    println!("machine: {machine}; 1 thread (the metric is single-threaded)");
    println!("  msa-eval (sparse overlap + grouped assignment), median of 11: {:>10.2} ms   mSA = {score:.4}", ours.as_secs_f64() * 1e3);
    println!("  dense baseline (elf's algorithm, dense table + full assignment): {:>10.2} ms   mSA = {baseline_score:.4}", baseline.as_secs_f64() * 1e3);
    println!(
        "  ratio baseline / msa-eval: {:.1}x",
        baseline.as_secs_f64() / ours.as_secs_f64()
    );
}
