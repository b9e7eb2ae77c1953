#![no_main]
use libfuzzer_sys::fuzz_target;
use seg_io::coco::{segmentation_mask, Segmentation};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (h, w) = (1 + data[0] as usize % 64, 1 + data[1] as usize % 64);
    let coords: Vec<f64> = data[2..]
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let _ = segmentation_mask(&Segmentation::Polygons(vec![coords]), h, w);
});
