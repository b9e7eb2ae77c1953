//! Optimal linear assignment (the Hungarian method with potentials, as scipy's
//! `linear_sum_assignment`).

use ndarray::ArrayView2;

/// Minimum-cost one-to-one assignment of rows to columns of a rectangular cost matrix.
///
/// Returns `min(rows, cols)` pairs `(row, col)` sorted by row, minimising the summed cost.
/// Cost: O(n²·m) for n = min(rows, cols), m = max(rows, cols). Costs must be finite.
///
/// ```
/// use ndarray::array;
/// use msa_eval::linear_sum_assignment;
///
/// let cost = array![[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]];
/// assert_eq!(linear_sum_assignment(cost.view()), vec![(0, 1), (1, 0), (2, 2)]);
/// ```
pub fn linear_sum_assignment(cost: ArrayView2<f64>) -> Vec<(usize, usize)> {
    let (rows, cols) = cost.dim();
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    if rows > cols {
        let mut pairs: Vec<_> = linear_sum_assignment(cost.t())
            .into_iter()
            .map(|(c, r)| (r, c))
            .collect();
        pairs.sort_unstable();
        return pairs;
    }
    // Shortest augmenting paths with row potentials u and column potentials v; column 0 is a
    // virtual start column. `owner[j]` is the row (1-based) assigned to column j.
    let (n, m) = (rows, cols);
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; m + 1];
    let mut owner = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    let mut min_slack = vec![0.0f64; m + 1];
    let mut used = vec![false; m + 1];
    for i in 1..=n {
        owner[0] = i;
        let mut j0 = 0;
        min_slack.iter_mut().for_each(|s| *s = f64::INFINITY);
        used.iter_mut().for_each(|s| *s = false);
        loop {
            used[j0] = true;
            let i0 = owner[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0;
            for j in 1..=m {
                if !used[j] {
                    let slack = cost[[i0 - 1, j - 1]] - u[i0] - v[j];
                    if slack < min_slack[j] {
                        min_slack[j] = slack;
                        way[j] = j0;
                    }
                    if min_slack[j] < delta {
                        delta = min_slack[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[owner[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_slack[j] -= delta;
                }
            }
            j0 = j1;
            if owner[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            owner[j0] = owner[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut pairs: Vec<_> = (1..=m)
        .filter(|&j| owner[j] != 0)
        .map(|j| (owner[j] - 1, j - 1))
        .collect();
    pairs.sort_unstable();
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2};

    fn total(cost: &Array2<f64>, pairs: &[(usize, usize)]) -> f64 {
        pairs.iter().map(|&(r, c)| cost[[r, c]]).sum()
    }

    /// Every injective map of the smaller side, by brute force.
    fn brute_force(cost: &Array2<f64>) -> f64 {
        fn go(cost: &Array2<f64>, row: usize, used: &mut Vec<bool>) -> f64 {
            if row == cost.nrows() {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for c in 0..cost.ncols() {
                if !used[c] {
                    used[c] = true;
                    best = best.min(cost[[row, c]] + go(cost, row + 1, used));
                    used[c] = false;
                }
            }
            best
        }
        if cost.nrows() <= cost.ncols() {
            go(cost, 0, &mut vec![false; cost.ncols()])
        } else {
            let t = cost.t().to_owned();
            go(&t, 0, &mut vec![false; t.ncols()])
        }
    }

    #[test]
    fn matches_brute_force_on_small_rectangular_matrices() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % 10) as f64
        };
        for rows in 1..=5 {
            for cols in 1..=5 {
                for _ in 0..20 {
                    let cost = Array2::from_shape_fn((rows, cols), |_| next());
                    let pairs = linear_sum_assignment(cost.view());
                    assert_eq!(pairs.len(), rows.min(cols));
                    let mut rs: Vec<_> = pairs.iter().map(|p| p.0).collect();
                    let mut cs: Vec<_> = pairs.iter().map(|p| p.1).collect();
                    rs.dedup();
                    cs.sort_unstable();
                    cs.dedup();
                    assert_eq!((rs.len(), cs.len()), (pairs.len(), pairs.len()));
                    assert_eq!(total(&cost, &pairs), brute_force(&cost), "{cost:?}");
                }
            }
        }
    }

    #[test]
    fn empty_matrices_give_no_pairs() {
        assert!(linear_sum_assignment(Array2::<f64>::zeros((0, 3)).view()).is_empty());
        assert_eq!(
            linear_sum_assignment(array![[1.0], [0.0]].view()),
            vec![(1, 0)]
        );
    }
}
