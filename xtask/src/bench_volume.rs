//! `cargo xtask bench volume`: a synthetic EM volume, made slice by slice into Zarr and never
//! held whole, through blockwise predict, segment and evaluate; voxels per second and peak
//! memory per stage, for several depths (each in its own process, so their peaks are apart),
//! and the blockwise watershed against the in-memory watershed of the same slices.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use ndarray::{Array2, Axis};
use seg_io::volume::{open_image, Element, ZarrArray};
use seg_pipeline::blockwise::{
    evaluate_zarr, finish_segment, plan_segment, predict_to_zarr, segment_task, BlockwiseOptions,
    EvaluateOptions, PlanOptions, SegmentOptions, Task,
};
use seg_pipeline::system::{peak_rss, reset_peak_rss};
use seg_targets::TargetSetting;
use vim_nets::{Model, ModelConfig, ModelKind, NetConfig, PresetOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Volume depths to run, each in its own process (the sizes: 64,256 with --side
    /// 2048).
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    depths: Vec<usize>,
    /// Slice side (square slices).
    #[arg(long, default_value_t = 2048)]
    side: usize,
    /// Block side and halo of the prediction (the defaults of `vimseg predict`; the block is
    /// also the chunk of the inputs and of the evaluation's boxes).
    #[arg(long, default_value_t = 512)]
    block: usize,
    #[arg(long, default_value_t = 128)]
    halo: usize,
    /// Block side and halo of the segmentation (the defaults of `vimseg segment`).
    #[arg(long, default_value_t = 1024)]
    segment_block: usize,
    #[arg(long, default_value_t = 64)]
    segment_halo: usize,
    /// UNet initial features (the quick profile: 16).
    #[arg(long, default_value_t = 16)]
    features: usize,
    /// Work folder (default: a temporary one, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run one depth in this process and print its figures as one JSON line.
    #[arg(long, hide = true)]
    single: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.single {
        let depth = *args.depths.first().context("--depths is empty")?;
        let dir = match &args.dir {
            Some(d) => d.clone(),
            None => anyhow::bail!("--single needs --dir"),
        };
        let figures = one_depth(args, depth, &dir)?;
        println!("{figures}");
        return Ok(());
    }
    println!(
        "{}, {} threads; volumes of depth {:?} × {s} × {s}, prediction blocks of {} with halo \
         {}, segmentation blocks of {} with halo {}, UNet with {} features (untrained: speed \
         only); each depth in its own process",
        seg_data::machine::describe(),
        rayon::current_num_threads(),
        args.depths,
        args.block,
        args.halo,
        args.segment_block,
        args.segment_halo,
        args.features,
        s = args.side
    );
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for &depth in &args.depths {
        let dir = root.join(format!("depth-{depth}"));
        let out = std::process::Command::new(&exe)
            .args(["bench", "volume", "--single", "--depths"])
            .arg(depth.to_string())
            .args(["--side", &args.side.to_string()])
            .args(["--block", &args.block.to_string()])
            .args(["--halo", &args.halo.to_string()])
            .args(["--segment-block", &args.segment_block.to_string()])
            .args(["--segment-halo", &args.segment_halo.to_string()])
            .args(["--features", &args.features.to_string()])
            .arg("--dir")
            .arg(&dir)
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(out.status.success(), "depth {depth}: the run failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("depth {depth}: no figures in {text:?}"))?;
        rows.push(v);
        if args.dir.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    println!(
        "{:>6} {:>8} | {:>22} | {:>22} | {:>22} | {:>9}",
        "depth",
        "Mvoxels",
        "predict Mvox/s  peak",
        "segment Mvox/s  peak",
        "evaluate Mvox/s  peak",
        "peak RSS"
    );
    let gib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
    for v in &rows {
        let stage = |name: &str| {
            format!(
                "{:>9.2} {:>8.2} GiB",
                v[name]["voxels_per_s"].as_f64().unwrap_or(0.0) / 1e6,
                gib(&v[name]["peak_rss_bytes"])
            )
        };
        println!(
            "{:>6} {:>8.1} | {:>22} | {:>22} | {:>22} | {:>5.2} GiB",
            v["depth"],
            v["voxels"].as_f64().unwrap_or(0.0) / 1e6,
            stage("predict"),
            stage("segment"),
            stage("evaluate"),
            gib(&v["peak_rss_bytes"])
        );
    }
    for v in &rows {
        println!(
            "depth {}: blockwise watershed {:.2} Mvox/s ({:.2} in the blocks, the rest is the \
             finish step), in-memory watershed of the same slices with the same threads {:.2} \
             Mvox/s: in-memory / blockwise = {:.2}×; slice 0 blockwise against whole: mSA {:.4} \
             ({} objects); the 3-D score's pair sorts wrote {} run files",
            v["depth"],
            v["segment"]["voxels_per_s"].as_f64().unwrap_or(0.0) / 1e6,
            v["segment"]["blocks_voxels_per_s"].as_f64().unwrap_or(0.0) / 1e6,
            v["in_memory_segment_voxels_per_s"].as_f64().unwrap_or(0.0) / 1e6,
            v["in_memory_segment_voxels_per_s"].as_f64().unwrap_or(0.0)
                / v["segment"]["voxels_per_s"].as_f64().unwrap_or(1.0),
            v["msa_blockwise_vs_whole_slice"].as_f64().unwrap_or(0.0),
            v["objects_first_slice"],
            v["evaluate"]["pair_runs"]
        );
    }
    if let (Some(a), Some(b)) = (rows.first(), rows.last()) {
        if rows.len() > 1 {
            let (pa, pb) = (gib(&a["peak_rss_bytes"]), gib(&b["peak_rss_bytes"]));
            println!(
                "peak RSS, depth {} against depth {}: {:.2}× ({:+.1} %)",
                b["depth"],
                a["depth"],
                pb / pa,
                (pb / pa - 1.0) * 100.0
            );
        }
    }
    Ok(())
}

/// Stage timing and peak memory.
fn stage<T>(
    voxels: usize,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, serde_json::Value)> {
    reset_peak_rss();
    let start = Instant::now();
    let out = f()?;
    let secs = start.elapsed().as_secs_f64();
    Ok((
        out,
        serde_json::json!({
            "seconds": secs,
            "voxels_per_s": voxels as f64 / secs.max(1e-9),
            "peak_rss_bytes": peak_rss(),
        }),
    ))
}

fn one_depth(args: &Args, depth: usize, dir: &Path) -> anyhow::Result<serde_json::Value> {
    std::fs::create_dir_all(dir)?;
    let side = args.side;
    let voxels = depth * side * side;
    let chunk = [1, args.block.min(side), args.block.min(side)];
    // The inputs, slice by slice: raw (u8), ground truth (u32) and a boundary map (f32, the
    // ground truth's boundaries lightly blurred) that the segment stage floods, so that the
    // watershed does the work it does on a trained network's output.
    let raw = ZarrArray::create(
        &dir.join("raw.zarr"),
        &[depth, side, side],
        &chunk,
        Element::F32,
        &["z", "y", "x"],
    )?;
    let gt = ZarrArray::create(
        &dir.join("gt.zarr"),
        &[depth, side, side],
        &chunk,
        Element::U32,
        &["z", "y", "x"],
    )?;
    let bd = ZarrArray::create(
        &dir.join("boundaries.zarr"),
        &[1, depth, side, side],
        &[1, 1, chunk[1], chunk[2]],
        Element::F32,
        &["c", "z", "y", "x"],
    )?;
    let mut o = seg_data::synthetic::EmVolumeOptions::default();
    o.depth = 1;
    o.height = side;
    o.width = side;
    let mut first_map: Option<Array2<f32>> = None;
    reset_peak_rss();
    let made = Instant::now();
    for z in 0..depth {
        let (r, l) = seg_data::synthetic::em_volume(&o, 1000 + z as u64);
        raw.write_f32(&[z, 0, 0], &r.mapv(f32::from).into_dyn())?;
        let labels = l.index_axis(Axis(0), 0).mapv(|v| v as u32);
        gt.write(&[z, 0, 0], &labels.clone().insert_axis(Axis(0)).into_dyn())?;
        let edges = seg_targets::find_boundaries(labels.view(), &Default::default())?;
        let map = edges.mapv(|b| if b { 1.0f32 } else { 0.0 });
        if first_map.is_none() {
            first_map = Some(map.clone());
        }
        bd.write_f32(
            &[0, z, 0, 0],
            &map.insert_axis(Axis(0)).insert_axis(Axis(0)).into_dyn(),
        )?;
    }
    let made = made.elapsed().as_secs_f64();
    let make_peak = peak_rss();

    // predict: an untrained UNet of the quick profile's width (speed and memory only).
    let mut config = ModelConfig::preset(ModelKind::UNet, 1, &PresetOptions::default());
    if let NetConfig::UNet(u) = &mut config.net {
        u.initial_features = args.features;
    }
    let model = Model::new(config, &Device::Cpu, 0)?;
    let input = open_image(&dir.join("raw.zarr"))?;
    let mut p = BlockwiseOptions::default();
    p.block = args.block;
    p.halo = args.halo;
    p.model = "bench".into();
    let (_, predict) = stage(voxels, || {
        Ok(predict_to_zarr(&model, &input, &dir.join("pred.zarr"), &p)?)
    })?;

    // segment: the boundary map, CREMI's recipe, stitched across blocks.
    let mut so = SegmentOptions::default();
    so.block = args.segment_block;
    so.halo = args.segment_halo;
    let recipes = seg_pipeline::Recipes::default();
    let seg_dir = dir.join("seg.zarr");
    let mut blocks_seconds = 0.0;
    let (seg, mut segment) = stage(voxels, || {
        // The three steps in one process (as segment_zarr runs them), the blocks timed apart
        // from the finish step (offsets, stitching, relabelling).
        plan_segment(
            &bd,
            TargetSetting::Cremi,
            &recipes,
            &seg_dir,
            &so,
            &PlanOptions::default(),
        )?;
        let t = Instant::now();
        let task = Task { index: 0, count: 1 };
        let done = segment_task(&bd, TargetSetting::Cremi, &recipes, &seg_dir, &so, task)?;
        anyhow::ensure!(done.failed.is_empty(), "blocks failed: {:?}", done.failed);
        blocks_seconds = t.elapsed().as_secs_f64();
        Ok(finish_segment(&seg_dir)?)
    })?;
    segment["blocks_seconds"] = blocks_seconds.into();
    segment["blocks_voxels_per_s"] = (voxels as f64 / blocks_seconds.max(1e-9)).into();
    // The in-memory watershed of the same slices, with the same threads: a few whole slices,
    // read first, segmented side by side (one slice per thread, as the blocks run).
    let threads = rayon::current_num_threads();
    let mut slices = vec![first_map.context("no slice")?];
    for z in 1..depth.min(2 * threads) {
        let map = bd.read_f32(&[0..1, z..z + 1, 0..side, 0..side])?;
        slices.push(map.into_shape_with_order((side, side))?);
    }
    let start = Instant::now();
    let wholes: Vec<ndarray::Array2<u32>> = {
        use rayon::prelude::*;
        slices
            .par_iter()
            .map(|m| {
                seg_pipeline::segment(
                    m.view().insert_axis(Axis(0)),
                    TargetSetting::Cremi,
                    &recipes,
                )
            })
            .collect::<Result<_, _>>()?
    };
    let in_memory = (slices.len() * side * side) as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let whole = &wholes[0];
    // How far the blockwise result of that slice is from the whole-slice one.
    let blockwise = ZarrArray::open(&seg.array)?.read_labels(&[0..1, 0..side, 0..side])?;
    let agreement = msa_eval::mean_segmentation_accuracy(
        blockwise.index_axis(Axis(0), 0),
        whole.view().into_dyn(),
        &msa_eval::MsaOptions::default(),
    )?;

    // evaluate: the segmentation against the ground truth, per slice and in 3-D.
    let seg = ZarrArray::open(&seg.array)?;
    let mut eo = EvaluateOptions::default();
    eo.block = args.block;
    let (scores, mut evaluate) = stage(voxels, || Ok(evaluate_zarr(&seg, &gt, &eo)?))?;
    evaluate["pair_runs"] = scores.pair_runs.into();
    let peak = [
        make_peak,
        predict["peak_rss_bytes"].as_u64(),
        segment["peak_rss_bytes"].as_u64(),
        evaluate["peak_rss_bytes"].as_u64(),
    ]
    .into_iter()
    .flatten()
    .max();
    Ok(serde_json::json!({
        "depth": depth,
        "side": side,
        "voxels": voxels,
        "make_input_seconds": made,
        "predict": predict,
        "segment": segment,
        "evaluate": evaluate,
        "in_memory_segment_voxels_per_s": in_memory,
        "msa_3d": scores.volume.msa,
        "msa_blockwise_vs_whole_slice": agreement.msa,
        "objects_first_slice": agreement.n_true,
        "make_input_peak_rss_bytes": make_peak,
        "peak_rss_bytes": peak,
    }))
}
