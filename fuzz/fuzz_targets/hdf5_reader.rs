#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("fuzz-{}.h5", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let _ = seg_data::cremi::read_cremi(&path, seg_data::cremi::CremiSplit::All);
    }
});
