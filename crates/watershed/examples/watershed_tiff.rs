//! Floods a height map stored as TIFF from a marker TIFF (and an optional mask TIFF):
//!
//! ```sh
//! cargo run --release -p watershed --example watershed_tiff -- \
//!     heights.tif markers.tif out.tif [--mask mask.tif] [--full] [--monotone]
//! ```
//!
//! `--full` uses full connectivity, `--monotone` scikit-image ≥ 0.25.2's flooding order,
//! `--raster` floods equal-height markers in raster order.

use std::process::ExitCode;

use seg_io::tiff::{read_tiff, write_tiff, WriteOptions};
use watershed::{seeded_watershed, Connectivity, Flooding, MarkerOrder, WatershedOptions};

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let positional: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--mask"))
        .map(|(_, a)| a)
        .collect();
    let [heights, markers, out] = positional[..] else {
        return Err("usage: watershed_tiff HEIGHTS MARKERS OUT [--mask MASK] [--full] [--monotone] [--raster]".into());
    };
    let heights = read_tiff(heights)?.into_f32();
    let markers = read_tiff(markers)?.into_labels()?;
    let mask = match args.iter().position(|a| a == "--mask") {
        Some(i) => {
            let path = args.get(i + 1).ok_or("--mask needs a file")?;
            Some(read_tiff(path)?.into_labels()?.mapv(|v| v != 0))
        }
        None => None,
    };
    let options = {
        let mut opts = WatershedOptions::default();
        opts.connectivity = if flag("--full") {
            Connectivity::Full
        } else {
            Connectivity::Face
        };
        opts.flooding = if flag("--monotone") {
            Flooding::Monotone
        } else {
            Flooding::Classic
        };
        opts.marker_order = if flag("--raster") {
            MarkerOrder::Raster
        } else {
            MarkerOrder::ScikitImage
        };
        opts
    };
    let seg = seeded_watershed(
        heights.view(),
        markers.view(),
        mask.as_ref().map(|m| m.view()),
        &options,
    )?;
    write_tiff(out, seg.mapv(|v| v as u32).view(), &WriteOptions::default())?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
