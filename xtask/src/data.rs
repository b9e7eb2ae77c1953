use std::path::{Path, PathBuf};

use anyhow::Context;
use ndarray::{Array2, ArrayView2};
use seg_data::synthetic::{
    em_volume, phase_contrast_cells, write_cremi_like, write_livecell_like, CellImageOptions,
    EmVolumeOptions,
};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Write the synthetic stand-in datasets (no download): an EM-like volume set in the CREMI
    /// layout and phase-contrast-like cell images in the LIVECell layout.
    Synth(SynthArgs),
}

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output folder; gets cremi/ and livecell/.
    #[arg(long, default_value = "data/synthetic")]
    dir: PathBuf,
    /// Seed of the generators (same seed, same bytes).
    #[arg(long, default_value_t = 2024)]
    seed: u64,
    /// Also write PNG previews (raw | labels) into this folder.
    #[arg(long)]
    preview: Option<PathBuf>,
}

pub fn run(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Synth(args) => synth(args),
    }
}

fn synth(args: &SynthArgs) -> anyhow::Result<()> {
    let em = EmVolumeOptions::default();
    let cells = CellImageOptions::default();
    let cremi = write_cremi_like(&args.dir.join("cremi"), &em, args.seed)?;
    write_livecell_like(&args.dir.join("livecell"), [8, 2, 4], &cells, args.seed)?;
    println!(
        "synthetic CREMI-layout volumes ({}x{}x{}): {}",
        em.depth,
        em.height,
        em.width,
        cremi
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "synthetic LIVECell-layout images ({}x{}, 8/2/4 train/val/test): {}",
        cells.height,
        cells.width,
        args.dir.join("livecell").display()
    );
    if let Some(dir) = &args.preview {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let (raw, ids) = em_volume(&EmVolumeOptions { depth: 1, ..em }, args.seed);
        let ids = ids.index_axis_move(ndarray::Axis(0), 0).mapv(|v| v as u32);
        let em_path = dir.join("synthetic-em.png");
        write_preview(&em_path, raw.index_axis(ndarray::Axis(0), 0), ids.view())?;
        let c = phase_contrast_cells(&cells, args.seed);
        let cells_path = dir.join("synthetic-cells.png");
        write_preview(&cells_path, c.image.view(), c.labels.mapv(u32::from).view())?;
        println!("previews: {}, {}", em_path.display(), cells_path.display());
    }
    Ok(())
}

/// Raw image (grey) beside its labels (one colour per id, background black), as an RGB PNG.
fn write_preview(path: &Path, raw: ArrayView2<u8>, labels: ArrayView2<u32>) -> anyhow::Result<()> {
    let (h, w) = raw.dim();
    let gap = 4;
    let mut rgb = Array2::<[u8; 3]>::from_elem((h, 2 * w + gap), [255, 255, 255]);
    for ((y, x), v) in raw.indexed_iter() {
        rgb[[y, x]] = [*v; 3];
    }
    for ((y, x), id) in labels.indexed_iter() {
        rgb[[y, w + gap + x]] = if *id == 0 { [0, 0, 0] } else { colour(*id) };
    }
    let bytes: Vec<u8> = rgb.iter().flatten().copied().collect();
    let file = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    let mut encoder = png::Encoder::new(
        std::io::BufWriter::new(file),
        (2 * w + gap) as u32,
        h as u32,
    );
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&bytes)?;
    Ok(())
}

/// A bright, well-spread colour per id.
fn colour(id: u32) -> [u8; 3] {
    let mut x = id.wrapping_mul(0x9E37_79B9);
    x ^= x >> 15;
    x = x.wrapping_mul(0x85EB_CA6B);
    [
        64 + (x & 0xBF) as u8,
        64 + ((x >> 8) & 0xBF) as u8,
        64 + ((x >> 16) & 0xBF) as u8,
    ]
}
