#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("fuzz-{}.tif", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let _ = seg_io::tiff::read_tiff(&path).map(|t| t.into_labels());
    }
});
