#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(coco) = serde_json::from_slice::<seg_io::coco::CocoFile>(data) {
        for image in coco.images.iter().take(4) {
            let anns: Vec<_> = coco.annotations.iter().filter(|a| a.image_id == image.id).collect();
            let _ = seg_data::livecell::annotations_to_labels(image, &anns, 50);
        }
    }
});
