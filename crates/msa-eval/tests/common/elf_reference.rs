//! elf's `mean_segmentation_accuracy` written the straightforward way: ids remapped through a
//! hash map, a dense overlap table over all id pairs, and per threshold a full assignment over
//! all objects with elf's cost. The property tests compare the crate against it; the benchmark
//! uses it as its baseline.

use std::collections::HashMap;

use msa_eval::linear_sum_assignment;
use ndarray::{Array2, ArrayView2};

/// mSA of `seg` against `gt` with label 0 ignored, by elf's algorithm on dense tables.
pub fn dense_msa(seg: ArrayView2<u32>, gt: ArrayView2<u32>, thresholds: &[f64]) -> f64 {
    let index = |img: ArrayView2<u32>| {
        let mut map: HashMap<u32, usize> = HashMap::new();
        let idx: Vec<usize> = img
            .iter()
            .map(|v| {
                let n = map.len();
                *map.entry(*v).or_insert(n)
            })
            .collect();
        let zero = map.get(&0).copied();
        (idx, map.len(), zero)
    };
    let (pi, np, pz) = index(seg);
    let (gi, ng, gz) = index(gt);
    let mut table = Array2::<f64>::zeros((np, ng));
    for (p, g) in pi.iter().zip(&gi) {
        table[[*p, *g]] += 1.0;
    }
    let ps: Vec<f64> = table.rows().into_iter().map(|r| r.sum()).collect();
    let gs: Vec<f64> = table.columns().into_iter().map(|c| c.sum()).collect();
    let rows: Vec<usize> = (0..np).filter(|r| Some(*r) != pz).collect();
    let cols: Vec<usize> = (0..ng).filter(|c| Some(*c) != gz).collect();
    let iou = Array2::from_shape_fn((rows.len(), cols.len()), |(r, c)| {
        let o = table[[rows[r], cols[c]]];
        o / (ps[rows[r]] + gs[cols[c]] - o).max(1e-7)
    });
    let n_matched = rows.len().min(cols.len());
    let mut total = 0.0;
    for &t in thresholds {
        if n_matched == 0 || !iou.iter().any(|v| *v >= t) {
            continue;
        }
        let cost = iou.mapv(|v| -((v >= t) as u8 as f64) - v / (2.0 * n_matched as f64));
        let tp = linear_sum_assignment(cost.view())
            .into_iter()
            .filter(|&(r, c)| iou[[r, c]] >= t)
            .count();
        total += tp as f64 / (rows.len() + cols.len() - tp) as f64;
    }
    total / thresholds.len() as f64
}
