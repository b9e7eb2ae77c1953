//! `experiment cremi|livecell`: the paper's comparison from data to report
//! ([`seg_pipeline::run_experiment`]), with one line per event.

use std::path::PathBuf;

use seg_pipeline::system::group_digits;
use seg_pipeline::{run_experiment, Dataset, Event, ExperimentOptions, ProfileName};
use vim_nets::ModelKind;

#[derive(clap::Args)]
pub struct Args {
    /// cremi or livecell.
    #[arg(value_parser = crate::data::parse_dataset)]
    dataset: Dataset,
    /// smoke (CI, < 2 min), quick (a laptop CPU, ~10 min for CREMI) or paper (the paper's
    /// settings, for a GPU and the real data).
    #[arg(long, default_value = "quick", value_parser = parse_profile)]
    profile: ProfileName,
    /// Fetched real data (`vimseg data fetch …`); without it the embedded synthetic data.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Models (comma-separated): unet, unetr-b, unetr-l, unetr-h, vim-unet-t, vim-unet-s.
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    #[command(flatten)]
    run: crate::RunArgs,
    /// Results folder.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Retrain models that are already trained.
    #[arg(long)]
    force: bool,
    /// Override the profile's iteration count.
    #[arg(long, value_parser = crate::args::at_least_one)]
    iterations: Option<usize>,
    /// Predict ViM-UNet in training mode, as the paper's numbers were computed (fidelity
    /// checks only; see docs/experiments.md).
    #[arg(long)]
    vim_train_mode: bool,
    /// NAME=DIR: a baseline's class maps (0 background, 1 foreground, 2 boundary), one TIFF per
    /// test image named after it, scored in the boundary settings (repeatable; nnunet,
    /// umamba-bot and umamba-enc are shown beside the paper's numbers).
    #[arg(long = "baseline")]
    baselines: Vec<seg_pipeline::Baseline>,
}

fn parse_profile(text: &str) -> Result<ProfileName, String> {
    text.parse::<ProfileName>().map_err(|e| e.to_string())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut opts = ExperimentOptions::new(args.dataset, args.profile);
    if let Some(n) = args.iterations {
        opts.profile.iterations = n;
    }
    if let Some(names) = &args.models {
        opts.profile.models = names
            .iter()
            .map(|n| n.parse::<ModelKind>())
            .collect::<Result<_, _>>()?;
    }
    opts.data = args.data.clone();
    opts.device = args.run.device.clone();
    opts.precision = args.run.precision;
    opts.checkpoint_activations = args.run.checkpoint_activations;
    opts.seed = args.run.seed;
    opts.out = args.out.clone();
    opts.force = args.force;
    opts.vim_train_mode = args.vim_train_mode;
    opts.baselines = args.baselines.clone();
    let (dataset, profile) = (args.dataset.name(), args.profile.name());
    let patch = opts.profile.patch;
    run_experiment(&opts, &mut |event| match event {
        Event::Data {
            dir,
            synthetic: true,
        } => println!(
            "{dataset} ({profile} profile) on the embedded synthetic data (no --data given): {}",
            dir.display()
        ),
        Event::Data { dir, .. } => {
            println!("{dataset} ({profile} profile) on {}", dir.display())
        }
        Event::Splits {
            train_samples,
            val_samples,
            test_images,
        } => println!(
            "  data: {train_samples} train / {val_samples} val samples per epoch at \
             {patch}×{patch}, {test_images} test images; device {}, {} threads",
            args.run.device,
            rayon::current_num_threads(),
        ),
        Event::Training {
            model,
            setting,
            from: None,
            iterations,
        } => println!(
            "  {} ({setting}): training {iterations} iterations",
            model.label()
        ),
        Event::Training {
            model,
            from: Some(from),
            iterations,
            ..
        } => println!(
            "  {}: resuming from iteration {from} of {iterations}",
            model.label()
        ),
        Event::Scored(r) => println!(
            "  {:<16} {:<20} mSA {:.3}  SA50 {:.3}  SA75 {:.3}  ({} params, {:.0} ms/image{})",
            r.label,
            r.setting,
            r.msa,
            r.sa50,
            r.sa75,
            group_digits(r.parameters),
            r.inference_ms_median,
            if r.reused_checkpoint {
                ", reused checkpoint"
            } else {
                ""
            }
        ),
        Event::BaselineScored(b) => println!(
            "  {:<16} {:<20} mSA {:.3}  SA50 {:.3}  SA75 {:.3}  (outputs in {})",
            b.label,
            b.setting,
            b.msa,
            b.sa50,
            b.sa75,
            b.dir.display()
        ),
        Event::Report { dir, seconds } => println!(
            "  report: {} (results.md, results.json, msa.png, msa.svg, panels/) in {seconds:.0} s",
            dir.display()
        ),
        _ => {}
    })?;
    Ok(())
}
