//! The loaders read back what the synthetic generators write in the real layouts.

use seg_data::cremi::{read_cremi, CremiSplit};
use seg_data::livecell::{LivecellDataset, LivecellOptions, Split};
use seg_data::synthetic::{
    em_volume, phase_contrast_cells, write_cremi_like, write_livecell_like, CellImageOptions,
    EmVolumeOptions,
};
use seg_io::tiff::read_tiff;

/// A fresh directory, removed when the guard drops.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("seg-data-it-{name}-"))
        .tempdir()
        .unwrap()
}

fn small_em() -> EmVolumeOptions {
    {
        let mut opts = EmVolumeOptions::default();
        opts.depth = 10;
        opts.height = 96;
        opts.width = 80;
        opts
    }
}

#[test]
fn generators_are_deterministic_to_the_byte() {
    let (a_raw, a_ids) = em_volume(&small_em(), 5);
    let (b_raw, b_ids) = em_volume(&small_em(), 5);
    assert_eq!((a_raw, a_ids), (b_raw, b_ids));
    let (c_raw, _) = em_volume(&small_em(), 6);
    assert_ne!(c_raw, em_volume(&small_em(), 5).0);

    let a = phase_contrast_cells(&CellImageOptions::default(), 3);
    let b = phase_contrast_cells(&CellImageOptions::default(), 3);
    assert_eq!(
        (a.image, a.labels, a.polygons),
        (b.image, b.labels, b.polygons)
    );

    let (g1, g2) = (scratch("det1"), scratch("det2"));
    let (d1, d2) = (g1.path().to_path_buf(), g2.path().to_path_buf());
    for d in [&d1, &d2] {
        write_cremi_like(&d.join("cremi"), &small_em(), 9).unwrap();
        write_livecell_like(
            &d.join("livecell"),
            [2, 1, 1],
            &CellImageOptions::default(),
            9,
        )
        .unwrap();
    }
    for file in [
        "cremi/sampleA.h5",
        "cremi/sampleC.h5",
        "livecell/train.json",
        "livecell/test.json",
        "livecell/images/livecell_test_images/SYN_Phase_test_0000_1.tif",
    ] {
        assert_eq!(
            std::fs::read(d1.join(file)).unwrap(),
            std::fs::read(d2.join(file)).unwrap(),
            "{file}"
        );
    }
}

#[test]
fn the_em_volume_looks_like_membranes_around_neurites() {
    let (raw, ids) = em_volume(&small_em(), 1);
    // Membrane pixels (at id changes) are darker on average than neurite interiors.
    let (mut edge, mut inner) = ((0.0, 0), (0.0, 0));
    for z in 0..raw.dim().0 {
        for y in 1..raw.dim().1 - 1 {
            for x in 1..raw.dim().2 - 1 {
                let id = ids[[z, y, x]];
                let at_change = [
                    ids[[z, y - 1, x]],
                    ids[[z, y + 1, x]],
                    ids[[z, y, x - 1]],
                    ids[[z, y, x + 1]],
                ]
                .iter()
                .any(|n| *n != id);
                let v = f64::from(raw[[z, y, x]]);
                if at_change {
                    edge = (edge.0 + v, edge.1 + 1);
                } else {
                    inner = (inner.0 + v, inner.1 + 1);
                }
            }
        }
    }
    let (edge, inner) = (edge.0 / edge.1 as f64, inner.0 / inner.1 as f64);
    assert!(
        inner - edge > 40.0,
        "membranes {edge:.0} vs interiors {inner:.0}"
    );
    // Neurons continue through z: most pixels keep their id from one slice to the next.
    let same = ids
        .outer_iter()
        .zip(ids.outer_iter().skip(1))
        .map(|(a, b)| a.iter().zip(b).filter(|(p, q)| p == q).count())
        .sum::<usize>();
    assert!(same as f64 > 0.8 * (ids.len() - ids.dim().1 * ids.dim().2) as f64);
}

#[test]
fn cremi_layout_files_read_back_per_split() {
    let dir_guard = scratch("cremi");
    let dir = dir_guard.path().to_path_buf();
    let paths = write_cremi_like(&dir, &small_em(), 4).unwrap();
    assert_eq!(paths.len(), 3);
    let (raw, ids) = em_volume(&small_em(), 4);
    let train = read_cremi(&paths[0], CremiSplit::Train).unwrap();
    let test = read_cremi(&paths[0], CremiSplit::Test).unwrap();
    assert_eq!((train.slices.clone(), test.slices.clone()), (0..6, 8..10));
    assert_eq!(train.raw, raw.slice(ndarray::s![0..6, .., ..]));
    assert_eq!(
        test.labels,
        ids.slice(ndarray::s![8..10, .., ..]).mapv(|v| v as u32)
    );
    assert_eq!(train.resolution, Some([40.0, 4.0, 4.0]));
}

#[test]
fn livecell_layout_converts_to_the_generators_labels_and_caches_them() {
    let root_guard = scratch("livecell");
    let root = root_guard.path().to_path_buf();
    let options = CellImageOptions::default();
    write_livecell_like(&root, [3, 1, 2], &options, 11).unwrap();
    for split in Split::ALL {
        let ds = LivecellDataset::open(&root, split, &LivecellOptions::default()).unwrap();
        assert!(ds.converted && ds.skipped.is_empty(), "{:?}", ds.skipped);
        assert_eq!(ds.samples.len(), [3, 1, 2][split as usize]);
        for (i, sample) in ds.samples.iter().enumerate() {
            let image_id = (split as usize * 100_000 + i) as u64 + 1;
            let expected = phase_contrast_cells(&options, 11u64.wrapping_add(image_id * 7919));
            let labels = read_tiff(&sample.labels).unwrap().into_labels().unwrap();
            assert_eq!(
                labels,
                expected.labels.mapv(u64::from).into_dyn(),
                "{}",
                sample.image.display()
            );
            let image = read_tiff(&sample.image).unwrap().into_labels().unwrap();
            assert_eq!(image, expected.image.mapv(u64::from).into_dyn());
            assert_eq!(sample.cell_type, "SYN");
        }
    }
    // Test images sit flat, train images in a cell-type folder: both layouts were found.
    let test = LivecellDataset::open(&root, Split::Test, &LivecellOptions::default()).unwrap();
    assert!(!test.converted, "the cache is reused");
    assert!(test.samples[0]
        .image
        .parent()
        .unwrap()
        .ends_with("livecell_test_images"));
    let train = LivecellDataset::open(&root, Split::Train, &LivecellOptions::default()).unwrap();
    assert!(train.samples[0].image.parent().unwrap().ends_with("SYN"));

    // A changed JSON invalidates the cache.
    let json = root.join("test.json");
    let text = std::fs::read_to_string(&json).unwrap();
    std::fs::write(&json, text.replacen("\"iscrowd\":0", "\"iscrowd\":0 ", 1)).unwrap();
    assert!(
        LivecellDataset::open(&root, Split::Test, &LivecellOptions::default())
            .unwrap()
            .converted
    );

    // The cell-type filter is a substring test on the file name.
    let none = LivecellDataset::open(&root, Split::Train, &{
        let mut opts = LivecellOptions::default();
        opts.cell_types = Some(vec!["A172".into()]);
        opts
    })
    .unwrap();
    assert!(none.samples.is_empty());
}

#[test]
fn livecell_problems_are_errors_or_reported_skips() {
    let root_guard = scratch("livecell-bad");
    let root = root_guard.path().to_path_buf();
    write_livecell_like(&root, [1, 1, 1], &CellImageOptions::default(), 2).unwrap();
    // An annotation for an unknown image and a bounding-box-style one: skipped and reported.
    let path = root.join("val.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let anns = json["annotations"].as_array_mut().unwrap();
    let mut orphan = anns[0].clone();
    orphan["image_id"] = serde_json::json!(424242);
    orphan["id"] = serde_json::json!(9001);
    let mut boxy = anns[0].clone();
    boxy["segmentation"] = serde_json::json!([[1.0, 1.0, 5.0, 5.0]]);
    boxy["id"] = serde_json::json!(9002);
    anns.push(orphan);
    anns.push(boxy);
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let ds = LivecellDataset::open(&root, Split::Val, &LivecellOptions::default()).unwrap();
    assert_eq!(ds.skipped.len(), 2, "{:?}", ds.skipped);
    assert!(ds
        .skipped
        .iter()
        .any(|s| s.contains("9001") && s.contains("unknown image")));
    assert!(ds
        .skipped
        .iter()
        .any(|s| s.contains("9002") && s.contains("bounding-box")));

    // Truncated JSON, a missing image file, a missing JSON: errors naming the file.
    let test_json = root.join("test.json");
    let bytes = std::fs::read(&test_json).unwrap();
    std::fs::write(&test_json, &bytes[..bytes.len() / 2]).unwrap();
    let err = LivecellDataset::open(&root, Split::Test, &LivecellOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("test.json") && err.contains("COCO"), "{err}");
    std::fs::remove_dir_all(root.join("images/livecell_train_val_images/SYN")).unwrap();
    let err = LivecellDataset::open(&root, Split::Train, &LivecellOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not found") && err.contains("SYN_Phase_train_0000_1.tif"),
        "{err}"
    );
    std::fs::remove_file(root.join("train.json")).unwrap();
    let err = LivecellDataset::open(&root, Split::Train, &LivecellOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.json"), "{err}");
}
