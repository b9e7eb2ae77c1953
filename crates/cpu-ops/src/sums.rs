//! Sums over long rows that vectorise: blocks of [`BLOCK`] values summed in [`LANES`] f32
//! partial sums (independent chains, which the compiler turns into vector adds, where one
//! running sum would wait on every add), the blocks' totals added in f64. The order of the
//! additions depends on the length alone, so a result repeats exactly.

/// Partial sums per block.
const LANES: usize = 16;
/// Values per block (16 per lane).
const BLOCK: usize = 256;

/// `(Σ f(a_i, b_i).0, Σ f(a_i, b_i).1)` over two rows of equal length.
#[inline(always)]
pub(crate) fn pair_sums(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> (f32, f32)) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "pair_sums: rows of different lengths");
    let (mut s0, mut s1) = (0.0f64, 0.0f64);
    for (ab, bb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let (mut l0, mut l1) = ([0.0f32; LANES], [0.0f32; LANES]);
        let (ac, bc) = (ab.chunks_exact(LANES), bb.chunks_exact(LANES));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            let (x, y): (&[f32; LANES], &[f32; LANES]) = match (x.try_into(), y.try_into()) {
                (Ok(x), Ok(y)) => (x, y),
                _ => unreachable!("chunks_exact gives LANES values"),
            };
            for i in 0..LANES {
                let (u, v) = f(x[i], y[i]);
                l0[i] += u;
                l1[i] += v;
            }
        }
        for (i, (&x, &y)) in ar.iter().zip(br).enumerate() {
            let (u, v) = f(x, y);
            l0[i] += u;
            l1[i] += v;
        }
        s0 += l0.iter().sum::<f32>() as f64;
        s1 += l1.iter().sum::<f32>() as f64;
    }
    (s0, s1)
}

/// Σ x_i (see [`pair_sums`]).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f64 {
    pair_sums(x, x, |v, _| (v, 0.0)).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    /// Against f64 sums, for lengths around the lane and block sizes.
    #[test]
    fn block_sums_match_f64_sums() {
        for len in [0, 1, 15, 16, 17, 255, 256, 257, 1000, 70_001] {
            let (a, b) = (values(len, len as u64), values(len, len as u64 + 1));
            let want0: f64 = a.iter().map(|&v| v as f64).sum();
            let want1: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let (got0, got1) = pair_sums(&a, &b, |x, y| (x, x * y));
            let scale = 1.0 + a.iter().map(|v| v.abs() as f64).sum::<f64>();
            assert!(
                (got0 - want0).abs() < 1e-6 * scale,
                "{len}: {got0} against {want0}"
            );
            assert!(
                (got1 - want1).abs() < 1e-6 * scale,
                "{len}: {got1} against {want1}"
            );
            assert_eq!(sum(&a), got0);
        }
    }
}
