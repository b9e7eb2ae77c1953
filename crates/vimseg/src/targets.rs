use std::path::PathBuf;

use anyhow::{bail, Context};
use seg_io::tiff::{read_tiff, write_tiff, WriteOptions};
use seg_targets::{make_targets, TargetSetting};

#[derive(clap::Args)]
pub struct Args {
    /// Instance label image (2-D TIFF, any unsigned integer type).
    #[arg(long)]
    labels: PathBuf,
    /// livecell-boundaries (fg, boundaries), livecell-distances (fg, centre and boundary
    /// distances) or cremi (boundaries).
    #[arg(long)]
    setting: TargetSetting,
    /// Output TIFF: one float32 page per channel.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    seg_io::atomic::check_output(&args.out, &[&args.labels])?;
    let labels = read_tiff(&args.labels)?
        .into_label_ids()
        .with_context(|| format!("{}: not a label image", args.labels.display()))?;
    if labels.ndim() != 2 {
        bail!(
            "{}: expected a 2-D label image (one page), found shape {:?}",
            args.labels.display(),
            labels.shape()
        );
    }
    let targets = make_targets(labels.view(), args.setting)
        .with_context(|| format!("{}: computing targets", args.labels.display()))?;
    write_tiff(&args.out, targets.view(), &WriteOptions::default())?;
    println!(
        "{}: {} targets [{}] of shape {:?} -> {}",
        args.labels.display(),
        args.setting,
        args.setting.channels().join(", "),
        targets.shape(),
        args.out.display()
    );
    Ok(())
}
