//! Reproducible synthetic label images for tests, benchmarks and smoke runs: Voronoi tilings of
//! jittered grid seeds (cell-like or neurite-like instance labels) from a seeded generator.

use ndarray::Array2;

/// SplitMix64: a tiny, fast, seedable generator (Steele, Lea & Flood 2014). Not cryptographic.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One seed per cell of a regular grid, moved by a random offset, each with a random id.
#[derive(Debug, Clone)]
pub struct VoronoiSeeds {
    height: usize,
    width: usize,
    cell: usize,
    /// `(y, x, id)` per grid cell, row-major.
    seeds: Vec<(usize, usize, u32)>,
}

impl VoronoiSeeds {
    /// Seeds at the centres of `cell × cell` grid cells covering `height × width`, each moved by
    /// up to ±`jitter` pixels (`jitter < cell / 2` keeps every seed in its cell), with random
    /// non-consecutive ids in `1..2^30`.
    pub fn jittered(
        height: usize,
        width: usize,
        cell: usize,
        jitter: usize,
        rng: &mut SplitMix64,
    ) -> Self {
        let cell = cell.max(1);
        let (rows, cols) = (height.div_ceil(cell), width.div_ceil(cell));
        let seeds = (0..rows * cols)
            .map(|k| ((k / cols) * cell + cell / 2, (k % cols) * cell + cell / 2))
            .collect::<Vec<_>>();
        VoronoiSeeds {
            height,
            width,
            cell,
            seeds: Vec::new(),
        }
        .with_moved(&seeds, jitter, rng)
    }

    /// The same seeds moved again by up to ±`jitter`, with new ids: a perturbed copy, e.g. a
    /// "prediction" of a tiling.
    pub fn moved(&self, jitter: usize, rng: &mut SplitMix64) -> Self {
        let base: Vec<(usize, usize)> = self.seeds.iter().map(|&(y, x, _)| (y, x)).collect();
        VoronoiSeeds {
            seeds: Vec::new(),
            ..self.clone()
        }
        .with_moved(&base, jitter, rng)
    }

    fn with_moved(mut self, base: &[(usize, usize)], jitter: usize, rng: &mut SplitMix64) -> Self {
        let span = 2 * jitter + 1;
        self.seeds = base
            .iter()
            .map(|&(y, x)| {
                let y = (y + rng.below(span)).saturating_sub(jitter);
                let x = (x + rng.below(span)).saturating_sub(jitter);
                (y, x, (rng.next_u64() >> 34) as u32 + 1)
            })
            .collect();
        self
    }

    /// The label image: each pixel takes the id of its nearest seed (squared Euclidean
    /// distance, first seed on ties), searching the pixel's grid cell and its neighbours.
    pub fn labels(&self) -> Array2<u32> {
        let cols = self.width.div_ceil(self.cell) as isize;
        let rows = self.height.div_ceil(self.cell) as isize;
        Array2::from_shape_fn((self.height, self.width), |(y, x)| {
            let (cy, cx) = ((y / self.cell) as isize, (x / self.cell) as isize);
            let mut best = (usize::MAX, 0u32);
            for ny in (cy - 2).max(0)..=(cy + 2).min(rows - 1) {
                for nx in (cx - 2).max(0)..=(cx + 2).min(cols - 1) {
                    let (sy, sx, id) = self.seeds[(ny * cols + nx) as usize];
                    let d = sy.abs_diff(y).pow(2) + sx.abs_diff(x).pow(2);
                    if d < best.0 {
                        best = (d, id);
                    }
                }
            }
            best.1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_image_and_another_seed_another() {
        let make =
            |seed| VoronoiSeeds::jittered(60, 80, 10, 3, &mut SplitMix64::new(seed)).labels();
        assert_eq!(make(1), make(1));
        assert_ne!(make(1), make(2));
    }

    #[test]
    fn every_cell_seed_owns_pixels_and_ids_are_nonzero() {
        let labels = VoronoiSeeds::jittered(60, 80, 10, 3, &mut SplitMix64::new(5)).labels();
        let mut ids: Vec<u32> = labels.iter().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 6 * 8);
        assert!(ids[0] > 0);
    }

    #[test]
    fn uniform_values_lie_in_the_unit_interval() {
        let mut rng = SplitMix64::new(9);
        assert!((0..1000)
            .map(|_| rng.uniform())
            .all(|v| (0.0..1.0).contains(&v)));
    }
}
