//! The experiment, train and predict commands end to end at the smoke scale.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("the xtask binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn latest_iteration(run: &Path) -> Option<u64> {
    let json = std::fs::read_to_string(run.join("latest/checkpoint.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&json).ok()?["iteration"].as_u64()
}

/// A run killed mid-training resumes from its latest checkpoint; a finished run is reused;
/// the report holds the paper's exact parameter counts.
#[test]
fn a_killed_experiment_resumes_and_a_finished_one_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = [
        "experiment",
        "cremi",
        "--profile",
        "smoke",
        "--models",
        "unet",
        "--iterations",
        "150",
        "--out",
        out,
    ];
    let run = dir.path().join("cremi-smoke/runs/cremi/unet");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while latest_iteration(&run).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = latest_iteration(&run).unwrap();
    assert!(killed_at < 150, "killed after the end ({killed_at})");

    let second = xtask(&args);
    let t = text(&second);
    assert!(second.status.success(), "{t}");
    assert!(
        t.contains(&format!("resuming from iteration {killed_at} of 150")),
        "{t}"
    );
    assert_eq!(latest_iteration(&run), Some(150));

    let third = xtask(&args);
    let t = text(&third);
    assert!(
        third.status.success() && t.contains("reused checkpoint") && !t.contains("training 150"),
        "{t}"
    );
    assert!(t.contains("on the embedded synthetic data"), "{t}");

    // A timestamped report per finished run (the killed one has none).
    let reports: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("cremi-smoke-"))
        .filter(|e| e.path().join("results.md").exists())
        .collect();
    assert!(reports.len() >= 2, "one report per finished run");
    let md = std::fs::read_to_string(reports[0].path().join("results.md")).unwrap();
    assert!(md.contains("| UNet | 31,030,658 | 28M |"), "{md}");
    assert!(md.contains("embedded synthetic stand-in"), "{md}");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(reports[0].path().join("results.json")).unwrap(),
    )
    .unwrap();
    let msa = json["results"][0]["msa"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&msa));
    assert!(reports[0].path().join("msa.svg").exists());
    assert!(
        std::fs::read_dir(reports[0].path().join("panels"))
            .unwrap()
            .count()
            >= 1
    );
}

#[test]
fn experiment_livecell_smoke_runs_both_settings() {
    let dir = tempfile::tempdir().unwrap();
    let o = xtask(&[
        "experiment",
        "livecell",
        "--profile",
        "smoke",
        "--models",
        "unet,vim-unet-t",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for needle in ["livecell-boundaries", "livecell-distances", "ViM-UNet Tiny"] {
        assert!(t.contains(needle), "{needle}: {t}");
    }
}

#[test]
fn experiment_refuses_unknown_models_and_missing_data() {
    let dir = tempfile::tempdir().unwrap();
    let o = xtask(&[
        "experiment",
        "cremi",
        "--models",
        "resnet",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("unknown model \"resnet\""),
        "{}",
        text(&o)
    );
    let o = xtask(&[
        "experiment",
        "cremi",
        "--data",
        dir.path().to_str().unwrap(),
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("sampleA.h5: missing"),
        "{}",
        text(&o)
    );
    let o = xtask(&[
        "experiment",
        "cremi",
        "--device",
        "cuda",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("no CUDA support"),
        "{}",
        text(&o)
    );
    // The GPU check of a CPU-only build fails the same way and records why in its JSON lines.
    let out = dir.path().join("gpu-check");
    let o = xtask(&["gpu-check", "--out", out.to_str().unwrap()]);
    assert!(
        !o.status.success() && text(&o).contains("no CUDA support"),
        "{}",
        text(&o)
    );
    let line = std::fs::read_to_string(out.join("gpu-check.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(v["check"], "device");
    assert!(
        v["error"].as_str().unwrap().contains("--features cuda"),
        "{v}"
    );
}

#[test]
fn train_then_predict_on_tiff_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // TIFF pairs: a synthetic EM volume's slices as 2-D images.
    let (raw, ids) = seg_data::synthetic::em_volume(
        &seg_data::synthetic::EmVolumeOptions {
            depth: 3,
            height: 64,
            width: 64,
            ..Default::default()
        },
        5,
    );
    for (split, z) in [("train", 0), ("train", 1), ("val", 2)] {
        for sub in ["images", "labels"] {
            std::fs::create_dir_all(d.join(split).join(sub)).unwrap();
        }
        let name = format!("s{z}.tif");
        let opts = seg_io::tiff::WriteOptions::default();
        seg_io::tiff::write_tiff(
            d.join(split).join("images").join(&name),
            raw.index_axis(ndarray::Axis(0), z),
            &opts,
        )
        .unwrap();
        let l = ids.index_axis(ndarray::Axis(0), z).mapv(|v| v as u32);
        seg_io::tiff::write_tiff(d.join(split).join("labels").join(&name), l.view(), &opts)
            .unwrap();
    }
    let run = d.join("run");
    let o = xtask(&[
        "train",
        "--model",
        "vim-unet-t",
        "--setting",
        "cremi",
        "--data",
        d.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--iterations",
        "2",
        "--patch",
        "32",
        "--features",
        "4",
        "--canvas",
        "native",
        "--epoch-length",
        "2",
        "--val-batches",
        "1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let image = d.join("train/images/s0.tif");
    let pred = d.join("pred.tif");
    let o = xtask(&[
        "predict",
        "--checkpoint",
        run.join("best").to_str().unwrap(),
        "--input",
        image.to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
        "--tile",
        "16",
        "--halo",
        "8",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let p = seg_io::tiff::read_tiff(&pred).unwrap().into_f32();
    assert_eq!(p.shape(), &[64, 64]);
    assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
    // A window larger than the 32² canvas is refused with the reason.
    let o = xtask(&[
        "predict",
        "--checkpoint",
        run.join("best").to_str().unwrap(),
        "--input",
        image.to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
        "--tile",
        "32",
        "--halo",
        "8",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("does not fit the model's 32×32 canvas"),
        "{}",
        text(&o)
    );
    // HDF5 input: slices 1..3 of the raw volume in the CREMI layout; slice 1 equals the TIFF
    // prediction of the same image.
    let best = run.join("best");
    let best = best.to_str().unwrap();
    let h5 = d.join("volume.h5");
    seg_io::hdf5::write_volumes(
        &h5,
        &[(
            "volumes/raw",
            seg_io::hdf5::VolumeData::U8(raw.view()),
            None,
        )],
    )
    .unwrap();
    let image1 = d.join("train/images/s1.tif");
    let pred1 = d.join("pred1.tif");
    let pred_h5 = d.join("pred-h5.tif");
    for (input, out, extra) in [
        (&image1, &pred1, &[][..]),
        (&h5, &pred_h5, &["--slices", "1:3"][..]),
    ] {
        let mut a = vec![
            "predict",
            "--checkpoint",
            best,
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--tile", "16", "--halo", "8"]);
        let o = xtask(&a);
        assert!(o.status.success(), "{}", text(&o));
    }
    let one = seg_io::tiff::read_tiff(&pred1).unwrap().into_f32();
    let stack = seg_io::tiff::read_tiff(&pred_h5).unwrap().into_f32();
    assert_eq!(stack.shape(), &[2, 64, 64]);
    let first = stack.index_axis(ndarray::Axis(0), 0);
    let diff = first
        .iter()
        .zip(one.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "HDF5 slice 1 differs from its TIFF by {diff}");
    // A wrong dataset key and a bad range are named.
    for (extra, needle) in [
        (["--key", "volumes/nothing"], "volumes/nothing"),
        (["--slices", "2:9"], "--slices"),
    ] {
        let mut a = vec![
            "predict",
            "--checkpoint",
            best,
            "--input",
            h5.to_str().unwrap(),
            "--out",
            pred_h5.to_str().unwrap(),
        ];
        a.extend_from_slice(&extra);
        let o = xtask(&a);
        assert!(
            !o.status.success() && text(&o).contains(needle),
            "{}",
            text(&o)
        );
    }
}
