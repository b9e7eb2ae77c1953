//! A plain textbook seeded watershed: `std::collections::BinaryHeap` ordered by (height, time of
//! insertion), every marker pixel queued first in raster order, a pixel labelled when queued,
//! face connectivity, bounds checks instead of a padded border. The property tests compare the
//! crate against it; the benchmark uses it as its baseline.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ndarray::{Array3, ArrayView3};

/// Floods `heights` from `markers` inside `mask` (all of it when `None`).
pub fn textbook_watershed(
    heights: ArrayView3<f32>,
    markers: ArrayView3<u32>,
    mask: Option<ArrayView3<bool>>,
) -> Array3<u32> {
    let (d, h, w) = heights.dim();
    let inside = |z: usize, y: usize, x: usize| mask.as_ref().is_none_or(|m| m[[z, y, x]]);
    let mut labels = Array3::<u32>::zeros((d, h, w));
    // Heights are finite here, so their bit patterns order like the values once made positive.
    let key = |v: f32| {
        let b = f64::from(v + 0.0).to_bits();
        if b >> 63 == 1 {
            !b
        } else {
            b | (1 << 63)
        }
    };
    let mut queue = BinaryHeap::new();
    let mut time = 0u64;
    for ((z, y, x), &m) in markers.indexed_iter() {
        if m != 0 && inside(z, y, x) {
            labels[[z, y, x]] = m;
            queue.push(Reverse((key(heights[[z, y, x]]), time, z, y, x)));
            time += 1;
        }
    }
    let steps: [(isize, isize, isize); 6] = [
        (-1, 0, 0),
        (0, -1, 0),
        (0, 0, -1),
        (0, 0, 1),
        (0, 1, 0),
        (1, 0, 0),
    ];
    while let Some(Reverse((_, _, z, y, x))) = queue.pop() {
        let label = labels[[z, y, x]];
        for (dz, dy, dx) in steps {
            let (nz, ny, nx) = (z as isize + dz, y as isize + dy, x as isize + dx);
            if nz < 0
                || ny < 0
                || nx < 0
                || nz >= d as isize
                || ny >= h as isize
                || nx >= w as isize
            {
                continue;
            }
            let (nz, ny, nx) = (nz as usize, ny as usize, nx as usize);
            if !inside(nz, ny, nx) || labels[[nz, ny, nx]] != 0 {
                continue;
            }
            labels[[nz, ny, nx]] = label;
            queue.push(Reverse((key(heights[[nz, ny, nx]]), time, nz, ny, nx)));
            time += 1;
        }
    }
    labels
}
