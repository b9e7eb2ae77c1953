//! Losses against hand-computed values and finite differences; training on the embedded
//! synthetic EM data (loss goes down, kill-and-resume ends with the same weights); tiled
//! prediction equals whole-image prediction; bad runs fail clearly.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use ndarray::Array2;
use seg_data::cremi::CremiVolume;
use seg_data::sampling::{LabelTransform, VolumeSlices};
use seg_data::synthetic::{em_volume, EmVolumeOptions};
use seg_targets::{make_targets, TargetSetting};
use seg_train::*;
use vim_nets::{Canvas, Model, ModelConfig, ModelKind, NetConfig, PresetOptions};

#[test]
fn dice_loss_equals_the_hand_computed_value() {
    // Channel 0: p = [1, .5, 0, .5], g = [1, 1, 0, 0] → 2·1.5 / (1.5 + 2) = 6/7.
    // Channel 1: p = 0, g = 0 → 0 / max(0, 1e-7) = 0 → loss term 1.
    let p = Tensor::new(
        &[[[[1.0f64, 0.5], [0.0, 0.5]], [[0.0, 0.0], [0.0, 0.0]]]],
        &Device::Cpu,
    )
    .unwrap();
    let g = Tensor::new(
        &[[[[1.0f64, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]],
        &Device::Cpu,
    )
    .unwrap();
    let loss = dice_loss(&p, &g).unwrap().to_scalar::<f64>().unwrap();
    assert!((loss - (1.0 - 6.0 / 7.0 + 1.0)).abs() < 1e-12, "{loss}");
    // The batch is pooled per channel (torch-em flattens samples into one vector).
    let p2 = Tensor::cat(&[&p, &p], 0).unwrap();
    let g2 = Tensor::cat(&[&g, &g], 0).unwrap();
    let loss2 = dice_loss(&p2, &g2).unwrap().to_scalar::<f64>().unwrap();
    assert!((loss2 - loss).abs() < 1e-12);
    assert!(dice_loss(&p, &p.narrow(1, 0, 1).unwrap()).is_err());
}

#[test]
fn distance_loss_masks_distances_by_the_true_foreground() {
    // fg perfect → 0; distances wrong only outside the true foreground → masked away → 0.
    let g = Tensor::new(
        &[[[[1.0f64, 0.0]], [[0.3, 1.0]], [[0.6, 1.0]]]],
        &Device::Cpu,
    )
    .unwrap();
    let p = Tensor::new(
        &[[[[1.0f64, 0.0]], [[0.3, 0.0]], [[0.6, 0.2]]]],
        &Device::Cpu,
    )
    .unwrap();
    let loss = distance_loss(&p, &g).unwrap().to_scalar::<f64>().unwrap();
    assert!(loss.abs() < 1e-12, "{loss}");
    // Inside the foreground a wrong centre distance counts: 1 − 2·0.3·0.15/(0.15² + 0.3²).
    let p = Tensor::new(
        &[[[[1.0f64, 0.0]], [[0.15, 0.0]], [[0.6, 0.2]]]],
        &Device::Cpu,
    )
    .unwrap();
    let loss = distance_loss(&p, &g).unwrap().to_scalar::<f64>().unwrap();
    let want = 1.0 - 2.0 * 0.3 * 0.15 / (0.15f64.powi(2) + 0.09);
    assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
}

#[test]
fn loss_gradients_match_central_differences() {
    let dev = Device::Cpu;
    let mut rng = vim_nets::Rng::new(3);
    let mut rand = |n: usize| (0..n).map(|_| rng.uniform()).collect::<Vec<f64>>();
    let shape = (2, 3, 4, 5);
    let p = Var::from_vec(rand(120), shape, &dev).unwrap();
    let g = Tensor::from_vec(rand(120), shape, &dev)
        .unwrap()
        .ge(0.5)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    for kind in [LossKind::Dice, LossKind::DistanceDice] {
        let grads = kind.compute(p.as_tensor(), &g).unwrap().backward().unwrap();
        let analytic: Vec<f64> = grads
            .get(p.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = p.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in (0..120).step_by(7) {
            let eval = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, shape, &dev).unwrap();
                kind.compute(&t, &g).unwrap().to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(1e-6) - eval(-1e-6)) / 2e-6;
            assert!(
                (numeric - analytic[i]).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "{kind:?} element {i}: {numeric} vs {}",
                analytic[i]
            );
        }
    }
}

fn synthetic_em(seed: u64) -> VolumeSlices {
    let (raw, ids) = em_volume(
        &{
            let mut opts = EmVolumeOptions::default();
            opts.depth = 4;
            opts.height = 64;
            opts.width = 64;
            opts.spacing = 14;
            opts
        },
        seed,
    );
    VolumeSlices::new(vec![CremiVolume {
        raw,
        labels: ids.mapv(|v| v as u32),
        resolution: None,
        slices: 0..4,
    }])
}

fn cremi_data() -> TrainData {
    let transform: LabelTransform = train::target_transform(TargetSetting::Cremi);
    TrainData {
        train: Arc::new(synthetic_em(1)),
        val: Arc::new(synthetic_em(2)),
        transform,
        loss: LossKind::Dice,
        description: serde_json::json!({"dataset": "synthetic-em"}),
    }
}

fn tiny_unet() -> ModelConfig {
    let mut c = ModelConfig::preset(ModelKind::UNet, 1, &PresetOptions::default());
    if let NetConfig::UNet(u) = &mut c.net {
        u.initial_features = 4;
        u.depth = 2;
    }
    c
}

fn options(iterations: usize) -> TrainOptions {
    {
        let mut opts = TrainOptions::default();
        opts.iterations = iterations;
        opts.batch_size = 2;
        opts.patch = (32, 32);
        opts.lr = 3e-3;
        opts.seed = 9;
        opts.epoch_length = Some(5);
        opts.val_batches = Some(4);
        opts.min_instances = Some(2);
        opts.workers = 1;
        opts.progress = false;
        opts
    }
}

fn weights(m: &Model) -> Vec<f32> {
    m.params()
        .all()
        .iter()
        .flat_map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn training_on_synthetic_em_drives_the_loss_down_and_writes_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    let data = cremi_data();
    let before = train::validate(&model, &data, &options(40)).unwrap();
    let summary = train(
        &model,
        &data,
        &options(40),
        dir.path(),
        Start::New,
        StopAfter(None),
    )
    .unwrap();
    assert!(summary.finished && summary.iterations == 40 && summary.epochs == 8);
    assert!(
        summary.best_val_loss < 0.8 * before,
        "validation loss {before} → {}",
        summary.best_val_loss
    );
    let log = std::fs::read_to_string(dir.path().join("validation.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 8);
    let (loaded, state) = checkpoint::load_model(&dir.path().join("latest"), &Device::Cpu).unwrap();
    assert_eq!(state.iteration, 40);
    assert_eq!(weights(&loaded), weights(&model));
    assert!(
        checkpoint::read_state(&dir.path().join("best"))
            .unwrap()
            .val_loss
            == summary.best_val_loss
    );
    // The folder now holds a run: starting again without resume is refused, not overwritten.
    let e = train(
        &model,
        &data,
        &options(40),
        dir.path(),
        Start::New,
        StopAfter(None),
    )
    .unwrap_err();
    assert!(e.to_string().contains("already holds a run"), "{e}");
}

#[test]
fn bf16_mixed_precision_training_drives_the_loss_down_with_f32_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    let data = cremi_data();
    let o = {
        let mut opts = options(40);
        opts.precision = "bf16".parse().unwrap();
        opts
    };
    let before = train::validate(&model, &data, &options(40)).unwrap();
    let summary = train(&model, &data, &o, dir.path(), Start::New, StopAfter(None)).unwrap();
    assert!(
        summary.best_val_loss < 0.8 * before,
        "validation loss {before} → {}",
        summary.best_val_loss
    );
    for (name, var) in model.params().trainable() {
        assert_eq!(var.dtype(), candle_core::DType::F32, "{name}");
    }
    // The precision is recorded with the run's options.
    let state = checkpoint::read_state(&dir.path().join("latest")).unwrap();
    assert_eq!(state.options["precision"], "bf16");
    assert!("fp8".parse::<seg_train::Precision>().is_err());
}

#[test]
fn a_killed_and_resumed_run_ends_with_the_same_weights() {
    let data = cremi_data();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    train(
        &whole,
        &data,
        &options(23),
        a.path(),
        Start::New,
        StopAfter(None),
    )
    .unwrap();

    let first = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    // Killed after 13 iterations: mid-epoch, after the epoch-2 checkpoint at iteration 10.
    let s = train(
        &first,
        &data,
        &options(23),
        b.path(),
        Start::New,
        StopAfter(Some(13)),
    )
    .unwrap();
    assert!(!s.finished);
    let resumed = Model::new(tiny_unet(), &Device::Cpu, 77).unwrap();
    let s = train(
        &resumed,
        &data,
        &options(23),
        b.path(),
        Start::Resume,
        StopAfter(None),
    )
    .unwrap();
    assert!(s.finished && s.iterations_this_call == 13, "{s:?}");
    assert_eq!(weights(&resumed), weights(&whole));
}

#[test]
fn a_non_finite_loss_stops_with_the_iteration_and_keeps_the_checkpoint() {
    let mut data = cremi_data();
    data.transform = Arc::new(|ids| {
        let mut t = make_targets(ids, TargetSetting::Cremi).unwrap();
        t[[0, 0, 0]] = f32::NAN;
        Ok(t)
    });
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    let e = train(
        &model,
        &data,
        &options(10),
        dir.path(),
        Start::New,
        StopAfter(None),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("at iteration 1") && msg.contains("no checkpoint"),
        "{msg}"
    );
}

/// A purely local predictor: a 5×5 box filter (receptive field 2 < halo) with a sigmoid.
struct BoxFilter(Device);

impl Predictor for BoxFilter {
    fn predict(&self, x: &Tensor, _train: bool) -> seg_train::Result<Tensor> {
        let w = Tensor::full(1.0f32 / 25.0, (1, 1, 5, 5), &self.0)?;
        Ok(candle_nn::ops::sigmoid(&x.conv2d(&w, 2, 1, 1, 1)?)?)
    }
    fn size_multiple(&self) -> usize {
        4
    }
    fn max_side(&self) -> Option<usize> {
        None
    }
    fn device(&self) -> &Device {
        &self.0
    }
    fn out_channels(&self) -> usize {
        1
    }
}

#[test]
fn tiled_prediction_equals_whole_image_prediction() {
    let model = BoxFilter(Device::Cpu);
    let mut rng = vim_nets::Rng::new(1);
    let image = Array2::from_shape_fn((50, 70), |_| rng.normal() as f32);
    let whole = predict_image(&model, image.view()).unwrap();
    let opts = {
        let mut opts = TileOptions::default();
        opts.block = (16, 24);
        opts.halo = (4, 4);
        opts.standardize = false;
        opts
    };
    let tiled = predict_tiled(&model, image.view(), &opts).unwrap();
    assert_eq!(tiled.dim(), (1, 50, 70));
    // The filter zero-pads the image it gets: the whole image at its own border, each tile
    // only at its halo's. They agree everywhere beyond the filter's reach (2) of the border.
    let inner = ndarray::s![.., 2..48, 2..68];
    let diff = (&whole.slice(inner) - &tiled.slice(inner))
        .mapv(f32::abs)
        .fold(0.0f32, |a, &b| a.max(b));
    assert!(diff < 1e-6, "max difference {diff}");
    // Standardising each window changes the result (the paper's setting), so it is an option.
    let mut standardised = opts;
    standardised.standardize = true;
    let std = predict_tiled(&model, image.view(), &standardised).unwrap();
    assert!((&std - &tiled).mapv(f32::abs).sum() > 0.0);
    // Bad inputs are errors.
    let nan = Array2::from_elem((16, 16), f32::NAN);
    assert!(predict_image(&model, nan.view())
        .unwrap_err()
        .to_string()
        .contains("NaN"));
    let vim = ModelConfig::preset(ModelKind::VimUnetT, 1, &{
        let mut opts = PresetOptions::default();
        opts.canvas = Canvas::Native(32);
        opts
    });
    let vim = Model::new(shrink_vim(vim), &Device::Cpu, 1).unwrap();
    let e = predict_tiled(&vim, image.view(), &{
        let mut opts = TileOptions::default();
        opts.block = (32, 32);
        opts.halo = (8, 8);
        opts
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("does not fit the model's 32×32 canvas"), "{e}");
}

fn shrink_vim(mut c: ModelConfig) -> ModelConfig {
    if let NetConfig::VimUnet {
        encoder, decoder, ..
    } = &mut c.net
    {
        encoder.embed_dim = 16;
        encoder.depth = 1;
        encoder.num_classes = 2;
        decoder.embed_dim = 16;
        decoder.initial_features = 2;
    }
    c
}

#[test]
fn devices_parse_and_cuda_without_support_is_a_clear_error() {
    assert!(matches!(device("cpu").unwrap(), Device::Cpu));
    assert!(device("gpu")
        .unwrap_err()
        .to_string()
        .contains("use cpu, cuda or cuda:N"));
    assert!(device("cuda:x").is_err());
    if !candle_core::utils::cuda_is_available() {
        let e = device("cuda:0").unwrap_err().to_string();
        assert!(e.contains("no CUDA support"), "{e}");
    }
}

/// The epochs and iterations of a run's `validation.jsonl`.
fn logged(dir: &std::path::Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(dir.join("validation.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["epoch"].as_u64().unwrap(),
                v["iteration"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_run_without_latest_is_neither_restarted_over_nor_resumed_and_best_is_kept() {
    let data = cremi_data();
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    train(
        &model,
        &data,
        &options(10),
        dir.path(),
        Start::New,
        StopAfter(None),
    )
    .unwrap();
    let best_before = std::fs::read(dir.path().join("best/model.safetensors")).unwrap();
    let log_before = std::fs::read(dir.path().join("validation.jsonl")).unwrap();
    // The user deletes a latest/ they believe is bad.
    std::fs::remove_dir_all(dir.path().join("latest")).unwrap();
    for start in [Start::New, Start::Resume, Start::ResumeAnyway] {
        let fresh = Model::new(tiny_unet(), &Device::Cpu, 5).unwrap();
        let e = train(
            &fresh,
            &data,
            &options(20),
            dir.path(),
            start,
            StopAfter(None),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("best/ at iteration 10"), "{start:?}: {e}");
        assert!(
            e.contains("validation.jsonl with 2 line(s)"),
            "{start:?}: {e}"
        );
    }
    assert_eq!(
        std::fs::read(dir.path().join("best/model.safetensors")).unwrap(),
        best_before
    );
    assert_eq!(
        std::fs::read(dir.path().join("validation.jsonl")).unwrap(),
        log_before
    );
    // Only a log, or only the temporary folder of an interrupted write, is a run too.
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir(other.path().join(".latest.tmp")).unwrap();
    let e = train(
        &model,
        &data,
        &options(10),
        other.path(),
        Start::New,
        StopAfter(None),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already holds a run (.latest.tmp/)"), "{e}");
    // Moving it aside keeps everything and frees the folder.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("validation.jsonl"), "{}\n").unwrap();
    let aside = run::set_aside(&run).unwrap().unwrap();
    assert_eq!(aside, dir.path().join("run.previous-1"));
    assert!(aside.join("validation.jsonl").is_file() && !run.exists());
}

#[test]
fn a_kill_between_the_checkpoint_and_the_log_line_loses_no_line() {
    let data = cremi_data();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let whole = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    train(
        &whole,
        &data,
        &options(15),
        a.path(),
        Start::New,
        StopAfter(None),
    )
    .unwrap();
    let first = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    train(
        &first,
        &data,
        &options(15),
        b.path(),
        Start::New,
        StopAfter(Some(10)),
    )
    .unwrap();
    // As if killed after the epoch-2 checkpoint swap, before its line was appended.
    let log = b.path().join("validation.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let first_line = text.lines().next().unwrap();
    std::fs::write(&log, format!("{first_line}\n")).unwrap();
    let resumed = Model::new(tiny_unet(), &Device::Cpu, 8).unwrap();
    train(
        &resumed,
        &data,
        &options(15),
        b.path(),
        Start::Resume,
        StopAfter(None),
    )
    .unwrap();
    assert_eq!(logged(b.path()), logged(a.path()));
    assert_eq!(logged(b.path()), vec![(1, 5), (2, 10), (3, 15)]);
    assert_eq!(weights(&resumed), weights(&whole));
}

#[test]
fn resuming_with_other_options_is_refused_unless_asked_for() {
    let data = cremi_data();
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    train(
        &model,
        &data,
        &options(5),
        dir.path(),
        Start::New,
        StopAfter(None),
    )
    .unwrap();
    let mut other = options(10);
    other.patch = (48, 48);
    other.lr = 1e-3;
    let e = train(
        &model,
        &data,
        &other,
        dir.path(),
        Start::Resume,
        StopAfter(None),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("patch: [32,32] → [48,48]") && e.contains("lr: 0.003 → 0.001"),
        "{e}"
    );
    let mut other_data = cremi_data();
    other_data.description = serde_json::json!({"dataset": "other"});
    let e = train(
        &model,
        &other_data,
        &options(10),
        dir.path(),
        Start::Resume,
        StopAfter(None),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("data: "), "{e}");
    // More iterations and other workers are not a different run.
    let mut more = options(10);
    more.workers = 2;
    let s = train(
        &model,
        &data,
        &more,
        dir.path(),
        Start::Resume,
        StopAfter(None),
    )
    .unwrap();
    assert_eq!((s.iterations, s.iterations_this_call), (10, 5));
    other.iterations = 15;
    let s = train(
        &model,
        &data,
        &other,
        dir.path(),
        Start::ResumeAnyway,
        StopAfter(None),
    )
    .unwrap();
    assert_eq!(s.iterations, 15);
    let state = checkpoint::read_state(&dir.path().join("latest")).unwrap();
    assert_eq!(state.options["patch"], serde_json::json!([48, 48]));
}

#[test]
fn a_run_folder_in_use_is_refused_with_the_holders_pid() {
    let data = cremi_data();
    let dir = tempfile::tempdir().unwrap();
    let _held = seg_io::lock::FolderLock::acquire(dir.path()).unwrap();
    let model = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    let e = train(
        &model,
        &data,
        &options(5),
        dir.path(),
        Start::New,
        StopAfter(None),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("in use by process {}", std::process::id())),
        "{e}"
    );
    assert!(!dir.path().join("latest").exists());
}

#[test]
fn options_a_run_cannot_use_are_refused_by_name_before_anything_is_written() {
    let data = cremi_data();
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    type Change = fn(&mut TrainOptions);
    let cases: [(&str, Change); 6] = [
        ("iterations", |o| o.iterations = 0),
        ("batch_size", |o| o.batch_size = 0),
        ("patch", |o| o.patch = (32, 0)),
        ("lr", |o| o.lr = -1.0),
        ("lr", |o| o.lr = f64::NAN),
        ("plateau_factor", |o| o.plateau_factor = 2.0),
    ];
    for (name, change) in cases {
        let mut o = options(5);
        change(&mut o);
        let e = train(&model, &data, &o, dir.path(), Start::New, StopAfter(None))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(name), "{name}: {e}");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "{name}"
        );
    }
}
