//! Invariants of the targets on random images, and brute-force references.

use ndarray::{Array2, Array3};
use proptest::prelude::*;
use seg_targets::{
    connected_components, distance_transform, find_boundaries, per_object_distances, BoundaryMode,
    BoundaryOptions, Connectivity, PerObjectDistanceOptions,
};

fn labels(max_id: u16) -> impl Strategy<Value = Array2<u16>> {
    (1usize..14, 1usize..14).prop_flat_map(move |(h, w)| {
        proptest::collection::vec(0..=max_id, h * w)
            .prop_map(move |v| Array2::from_shape_vec((h, w), v).unwrap())
    })
}

/// Blocky label images: random ids on a coarse grid, upsampled, so objects have interiors.
fn blocky_labels() -> impl Strategy<Value = Array2<u16>> {
    labels(4).prop_map(|a| {
        Array2::from_shape_fn((a.nrows() * 3, a.ncols() * 3), |(y, x)| a[[y / 3, x / 3]])
    })
}

fn mask_2d() -> impl Strategy<Value = Array2<bool>> {
    (1usize..20, 1usize..20).prop_flat_map(|(h, w)| {
        proptest::collection::vec(proptest::bool::weighted(0.1), h * w)
            .prop_map(move |v| Array2::from_shape_vec((h, w), v).unwrap())
    })
}

fn mask_3d() -> impl Strategy<Value = Array3<bool>> {
    (1usize..7, 1usize..7, 1usize..7).prop_flat_map(|(d, h, w)| {
        proptest::collection::vec(proptest::bool::weighted(0.1), d * h * w)
            .prop_map(move |v| Array3::from_shape_vec((d, h, w), v).unwrap())
    })
}

const MODES: [BoundaryMode; 3] = [
    BoundaryMode::Thick,
    BoundaryMode::Inner,
    BoundaryMode::Outer,
];
const CONNECTIVITIES: [Connectivity; 2] = [Connectivity::Face, Connectivity::Full];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn edt_equals_brute_force_in_2d(mask in mask_2d()) {
        let d = distance_transform(mask.view()).unwrap();
        let features: Vec<(usize, usize)> = mask.indexed_iter().filter(|(_, b)| **b).map(|(i, _)| i).collect();
        for ((y, x), v) in d.indexed_iter() {
            let brute = features
                .iter()
                .map(|&(fy, fx)| ((y.abs_diff(fy).pow(2) + x.abs_diff(fx).pow(2)) as f64).sqrt())
                .fold(f64::INFINITY, f64::min);
            prop_assert_eq!(*v, brute, "at ({}, {})", y, x);
        }
    }

    #[test]
    fn edt_equals_brute_force_in_3d(mask in mask_3d()) {
        let d = distance_transform(mask.view()).unwrap();
        let features: Vec<(usize, usize, usize)> = mask.indexed_iter().filter(|(_, b)| **b).map(|(i, _)| i).collect();
        for ((z, y, x), v) in d.indexed_iter() {
            let brute = features
                .iter()
                .map(|&(fz, fy, fx)| {
                    ((z.abs_diff(fz).pow(2) + y.abs_diff(fy).pow(2) + x.abs_diff(fx).pow(2)) as f64).sqrt()
                })
                .fold(f64::INFINITY, f64::min);
            prop_assert_eq!(*v, brute);
        }
    }

    #[test]
    fn boundaries_are_symmetric_under_swapping_two_labels(l in labels(4), a in 1u16..=4, b in 1u16..=4) {
        let swapped = l.mapv(|v| if v == a { b } else if v == b { a } else { v });
        for mode in MODES {
            for connectivity in CONNECTIVITIES {
                let opts = {
    let mut opts = BoundaryOptions::default();
    opts.mode = mode;
    opts.connectivity = connectivity;
    opts.background = 0;
    opts
};
                prop_assert_eq!(
                    find_boundaries(l.view(), &opts).unwrap(),
                    find_boundaries(swapped.view(), &opts).unwrap(),
                    "{:?} {:?}", mode, connectivity
                );
            }
        }
    }

    #[test]
    fn thick_boundaries_are_the_union_of_inner_and_outer_sides(l in labels(3)) {
        // Every thick boundary pixel is either an object pixel (inner) or a background pixel
        // (outer includes all thick background pixels).
        let opts = |mode| {
    let mut opts = BoundaryOptions::default();
    opts.mode = mode;
    opts
};
        let thick = find_boundaries(l.view(), &opts(BoundaryMode::Thick)).unwrap();
        let inner = find_boundaries(l.view(), &opts(BoundaryMode::Inner)).unwrap();
        let outer = find_boundaries(l.view(), &opts(BoundaryMode::Outer)).unwrap();
        for (((t, i), o), v) in thick.iter().zip(&inner).zip(&outer).zip(&l) {
            prop_assert_eq!(*t, *i || (*o && *v == 0));
        }
    }

    #[test]
    fn components_equal_a_flood_fill(l in labels(2)) {
        for connectivity in CONNECTIVITIES {
            let (cc, n) = connected_components(l.view(), connectivity).unwrap();
            // Brute force: flood fill from every unvisited non-zero pixel in raster order.
            let (h, w) = l.dim();
            let mut brute = Array2::<u32>::zeros((h, w));
            let mut next = 0;
            for start in 0..h * w {
                let (sy, sx) = (start / w, start % w);
                if l[[sy, sx]] == 0 || brute[[sy, sx]] != 0 {
                    continue;
                }
                next += 1;
                let mut stack = vec![(sy, sx)];
                brute[[sy, sx]] = next;
                while let Some((y, x)) = stack.pop() {
                    for dy in -1isize..=1 {
                        for dx in -1isize..=1 {
                            let diagonal = dy != 0 && dx != 0;
                            if (dy == 0 && dx == 0) || (diagonal && connectivity == Connectivity::Face) {
                                continue;
                            }
                            let (ny, nx) = (y as isize + dy, x as isize + dx);
                            if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                                continue;
                            }
                            let (ny, nx) = (ny as usize, nx as usize);
                            if l[[ny, nx]] == l[[y, x]] && brute[[ny, nx]] == 0 {
                                brute[[ny, nx]] = next;
                                stack.push((ny, nx));
                            }
                        }
                    }
                }
            }
            prop_assert_eq!(n as u32, next);
            prop_assert_eq!(&cc, &brute);
        }
    }

    #[test]
    fn per_object_distances_do_not_depend_on_ids(l in blocky_labels(), offset in 1u16..1000) {
        let renamed = l.mapv(|v| if v == 0 { 0 } else { 4 - v + offset });
        let opts = {
    let mut opts = PerObjectDistanceOptions::default();
    opts.min_size = 5;
    opts
};
        let a = per_object_distances(l.view(), &opts).unwrap();
        let b = per_object_distances(renamed.view(), &opts).unwrap();
        prop_assert_eq!(&a.center, &b.center);
        prop_assert_eq!(&a.boundary, &b.boundary);
        prop_assert_eq!(&a.foreground, &b.foreground);
        prop_assert!(a.center.iter().chain(a.boundary.iter()).all(|v| (0.0..=1.0).contains(v)));
    }
}
