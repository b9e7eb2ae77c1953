//! TIFF stacks read box by box (`TiffStack`): the same values as the whole file, decoding only
//! the strips or tiles a box overlaps.

use ndarray::{s, Array3};
use seg_io::tiff::{read_tiff, write_tiff, Compression, TiffStack, WriteOptions};
use seg_io::volume::VolumeSource;

fn data(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn whole(path: &std::path::Path) -> Array3<f32> {
    read_tiff(path)
        .unwrap()
        .into_f32()
        .into_dimensionality()
        .unwrap()
}

fn boxes_equal(stack: &TiffStack, all: &Array3<f32>) {
    let [d, h, w] = stack.shape();
    assert_eq!([d, h, w], [all.dim().0, all.dim().1, all.dim().2]);
    // Boxes inside one chunk, across chunk borders, at the far edges, and the whole stack.
    for (z, y, x) in [
        (0..1, 0..10, 0..10),
        (1..3, 20..45, 30..70),
        (2..3, h - 1..h, w - 1..w),
        (0..d, 0..h, 0..w),
        (0..2, 31..33, 47..49),
        (1..2, 5..69, 0..90),
    ] {
        let got = stack.read_box(z.clone(), y.clone(), x.clone()).unwrap();
        assert_eq!(
            got,
            all.slice(s![z.clone(), y.clone(), x.clone()]),
            "{z:?} {y:?} {x:?}"
        );
    }
}

/// Files tifffile wrote: tiles of 48×32 (Deflate with predictor) and strips of 9 rows (LZW).
#[test]
fn tiled_and_striped_stacks_read_box_by_box_as_the_whole_file() {
    for name in ["tifffile-tiled-u16.tif", "tifffile-strips-u16.tif"] {
        let path = data(name);
        let all = whole(&path);
        assert_eq!(all[[1, 33, 50]], 4851.0);
        let stack = TiffStack::open(&path, None).unwrap();
        boxes_equal(&stack, &all);
        // A subset of pages is a volume of those pages.
        let part = TiffStack::open(&path, Some(1..3)).unwrap();
        assert_eq!(part.shape(), [2, 70, 90]);
        assert_eq!(
            part.read_box(0..2, 0..70, 0..90).unwrap(),
            all.slice(s![1..3, .., ..])
        );
        let e = stack.read_box(0..4, 0..1, 0..1).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("not inside"), "{e}");
        let e = TiffStack::open(&path, Some(2..5))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("pages 2..5 of a stack of 3 pages"), "{e}");
    }
}

/// A box decodes the chunks it overlaps and no others; chunks kept are not decoded again.
#[test]
fn a_box_decodes_only_the_chunks_it_overlaps() {
    let tiled = TiffStack::open(data("tifffile-tiled-u16.tif"), None).unwrap();
    tiled.read_box(0..1, 0..10, 0..10).unwrap();
    assert_eq!(tiled.chunks_decoded(), 1);
    // Rows 31..33 and columns 47..49 touch the four tiles around (32, 48).
    tiled.read_box(0..1, 31..33, 47..49).unwrap();
    assert_eq!(tiled.chunks_decoded(), 4, "tile (0, 0) is kept");
    // All six tiles of page 1.
    tiled.read_box(1..2, 0..70, 0..90).unwrap();
    assert_eq!(tiled.chunks_decoded(), 10);
    let strips = TiffStack::open(data("tifffile-strips-u16.tif"), None).unwrap();
    strips.read_box(2..3, 10..20, 0..5).unwrap();
    assert_eq!(
        strips.chunks_decoded(),
        2,
        "rows 10..20 lie in strips 1 and 2 of 9 rows"
    );
}

/// Stacks this crate writes read the same way, in every compression.
#[test]
fn stacks_written_here_read_box_by_box() {
    let dir = tempfile::tempdir().unwrap();
    let a = Array3::from_shape_fn((3, 70, 90), |(z, y, x)| ((z * 31 + y * 7 + x) % 251) as u8);
    for compression in [Compression::None, Compression::Lzw, Compression::Deflate] {
        let path = dir.path().join(format!("{compression:?}.tif"));
        let mut o = WriteOptions::default();
        o.compression = compression;
        write_tiff(&path, a.view(), &o).unwrap();
        let stack = TiffStack::open(&path, None).unwrap();
        boxes_equal(&stack, &a.mapv(f32::from));
    }
}

/// Pages that are not one grey sample, and files that are not TIFF, are refused with the
/// reason, naming the file.
#[test]
fn colour_pages_and_foreign_files_are_refused() {
    let e = TiffStack::open(data("tifffile-rgb-u8.tif"), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tifffile-rgb-u8.tif") && e.contains("one grey sample"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-tiff.tif");
    std::fs::write(&path, b"not a tiff").unwrap();
    let e = TiffStack::open(&path, None).err().unwrap().to_string();
    assert!(e.contains("not-a-tiff.tif"), "{e}");
}
