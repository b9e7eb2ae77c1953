use std::path::{Path, PathBuf};

use anyhow::Context;
use ndarray::ArrayView2;
use seg_data::synthetic::{
    em_volume, phase_contrast_cells, write_cremi_like, write_livecell_like, CellImageOptions,
    EmVolumeOptions,
};
use seg_pipeline::picture::{panels, write_png, Panel};
use seg_pipeline::Dataset;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Download a real dataset (resumable, checksummed) and prepare it.
    Fetch(FetchArgs),
    /// Write the synthetic stand-in datasets (no download): an EM-like volume set in the CREMI
    /// layout and phase-contrast-like cell images in the LIVECell layout.
    Synth(SynthArgs),
}

#[derive(clap::Args)]
pub struct FetchArgs {
    #[arg(value_parser = parse_dataset)]
    dataset: Dataset,
    /// Target folder [default: data/livecell or data/cremi].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Accept a TLS certificate that fails verification (cremi.org's has expired).
    #[arg(long)]
    accept_invalid_certificates: bool,
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
        Command::Fetch(args) => fetch(args),
        Command::Synth(args) => synth(args),
    }
}

fn fetch(args: &FetchArgs) -> anyhow::Result<()> {
    use seg_data::download::{
        cremi_files, download, livecell_files, record_or_verify_checksums, unzip_safely,
        DownloadOptions,
    };
    let (files, default_dir) = match args.dataset {
        Dataset::Livecell => (livecell_files(), "data/livecell"),
        Dataset::Cremi => (cremi_files(), "data/cremi"),
        _ => anyhow::bail!("no download for {}", args.dataset.name()),
    };
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(default_dir));
    let options = {
        let mut opts = DownloadOptions::default();
        opts.accept_invalid_certificates = args.accept_invalid_certificates;
        opts
    };
    if args.accept_invalid_certificates {
        eprintln!("warning: TLS certificate verification is off for this download (--accept-invalid-certificates)");
    } else if args.dataset == Dataset::Cremi {
        eprintln!("note: cremi.org's TLS certificate has expired; if the download fails on it, rerun with --accept-invalid-certificates (the files are still checked against their SHA-256)");
    }
    for remote in &files {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>16} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(remote.file_name.clone());
        let path = download(remote, &dir, &options, &mut |done, total| {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
        })?;
        bar.finish();
        println!("{}", path.display());
    }
    if args.dataset == Dataset::Livecell {
        // LIVECell publishes no checksums: record them at the first download, verify later.
        let names: Vec<&str> = files.iter().map(|f| f.file_name.as_str()).collect();
        record_or_verify_checksums(&dir, &names)?;
        if !dir.join("images").is_dir() {
            let n = unzip_safely(&dir.join("images.zip"), &dir)?;
            println!("unpacked {n} files into {}", dir.join("images").display());
        }
        for split in seg_data::livecell::Split::ALL {
            let ds = seg_data::livecell::LivecellDataset::open(&dir, split, &Default::default())?;
            println!(
                "{}: {} images{}",
                split.name(),
                ds.samples.len(),
                if ds.skipped.is_empty() {
                    String::new()
                } else {
                    format!(", {} annotations skipped", ds.skipped.len())
                }
            );
            for s in ds.skipped.iter().take(5) {
                eprintln!("  skipped: {s}");
            }
        }
    }
    Ok(())
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
        let (raw, ids) = em_volume(
            &{
                let mut opts = em;
                opts.depth = 1;
                opts
            },
            args.seed,
        );
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
    let rgb = panels(
        &[
            Panel::Grey(raw.reborrow()),
            Panel::Labels(labels.reborrow()),
        ],
        4,
    );
    Ok(write_png(path, &rgb)?)
}

/// `cremi` or `livecell`.
pub(crate) fn parse_dataset(text: &str) -> Result<Dataset, String> {
    text.parse::<Dataset>().map_err(|e| e.to_string())
}
