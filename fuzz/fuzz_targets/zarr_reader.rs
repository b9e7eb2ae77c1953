#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| seg_data::fuzz::zarr_reader(data));
