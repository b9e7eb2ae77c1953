//! The experiment command end to end at the smoke scale, and the GPU check's refusal without
//! CUDA.

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

/// Every score of a `results.json` is a number in [0, 1]: mSA, SA50 and SA75 of each result
/// and each per-image mSA; there is at least one result.
fn check_scores(json: &serde_json::Value) {
    let results = json["results"].as_array().expect("a results array");
    assert!(!results.is_empty(), "no results: {json}");
    for r in results {
        let mut scores: Vec<Option<f64>> = ["msa", "sa50", "sa75"]
            .iter()
            .map(|k| r[k].as_f64())
            .collect();
        let per_image = r["per_image"].as_array().expect("per-image scores");
        assert!(!per_image.is_empty(), "{r}");
        scores.extend(per_image.iter().map(|p| p[1].as_f64()));
        for s in scores {
            assert!(s.is_some_and(|s| (0.0..=1.0).contains(&s)), "{r}");
        }
    }
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
    // A second experiment into the same folder is refused while the first runs.
    let concurrent = xtask(&args);
    let t = text(&concurrent);
    assert!(!concurrent.status.success(), "{t}");
    assert!(
        t.contains(&format!("in use by process {}", child.id())),
        "{t}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = latest_iteration(&run).unwrap();
    assert!(killed_at < 150, "killed after the end ({killed_at})");
    // The killed run's report was never complete, so it is not where reports are.
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(
        !names(dir.path())
            .iter()
            .any(|n| n.starts_with("cremi-smoke-")),
        "{:?}",
        names(dir.path())
    );

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
    // Every report folder is complete, and the killed run's unfinished one was removed.
    for name in names(dir.path()) {
        assert!(!name.ends_with(".partial"), "{name}");
        if name.starts_with("cremi-smoke-") {
            assert!(dir.path().join(&name).join("results.md").exists(), "{name}");
        }
    }
    let md = std::fs::read_to_string(reports[0].path().join("results.md")).unwrap();
    assert!(md.contains("| UNet | 31,030,658 | 28M |"), "{md}");
    assert!(md.contains("embedded synthetic stand-in"), "{md}");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(reports[0].path().join("results.json")).unwrap(),
    )
    .unwrap();
    check_scores(&json);
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
    let report = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("livecell-smoke-")
        })
        .expect("a report folder");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.path().join("results.json")).unwrap())
            .unwrap();
    check_scores(&json);
    assert_eq!(
        json["results"].as_array().unwrap().len(),
        4,
        "2 settings × 2 models"
    );

    // The same experiment with the test labels as an nnU-Net-style class map (1 inside, 2 on
    // each object's border), scored in the boundary setting beside the paper's nnU-Net number.
    let labels_dir = dir
        .path()
        .join("livecell-smoke/synthetic-data/annotations/livecell_test_images/SYN");
    let baseline = dir.path().join("nnunet");
    std::fs::create_dir_all(&baseline).unwrap();
    for entry in std::fs::read_dir(&labels_dir).unwrap() {
        let path = entry.unwrap().path();
        let labels = seg_io::tiff::read_tiff(&path)
            .unwrap()
            .into_label_ids()
            .unwrap()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        let (h, w) = labels.dim();
        let classes = ndarray::Array2::from_shape_fn((h, w), |(y, x)| {
            let l = labels[[y, x]];
            let differs = |yy: usize, xx: usize| labels[[yy, xx]] != l;
            let border = (y > 0 && differs(y - 1, x))
                || (x > 0 && differs(y, x - 1))
                || (y + 1 < h && differs(y + 1, x))
                || (x + 1 < w && differs(y, x + 1));
            match (l, border) {
                (0, _) => 0u32,
                (_, true) => 2,
                _ => 1,
            }
        });
        seg_io::tiff::write_tiff(
            baseline.join(path.file_name().unwrap()),
            classes.view(),
            &Default::default(),
        )
        .unwrap();
    }
    let with_baseline = |dir_arg: &Path| {
        xtask(&[
            "experiment",
            "livecell",
            "--profile",
            "smoke",
            "--models",
            "unet,vim-unet-t",
            "--out",
            dir.path().to_str().unwrap(),
            "--baseline",
            &format!("nnunet={}", dir_arg.display()),
        ])
    };
    let o = with_baseline(&baseline);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("nnU-Net v2       livecell-boundaries  mSA"),
        "{t}"
    );
    let report = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("results.json").exists())
        .find(|p| {
            std::fs::read_to_string(p.join("results.json"))
                .unwrap()
                .contains("nnU-Net v2")
        })
        .expect("a report with the baseline");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("results.json")).unwrap())
            .unwrap();
    let baselines = json["baselines"].as_array().unwrap();
    assert_eq!(baselines.len(), 1, "the boundary setting only: {json}");
    assert!(baselines[0]["msa"].as_f64().unwrap() > 0.3, "{json}");
    let md = std::fs::read_to_string(report.join("results.md")).unwrap();
    assert!(md.contains("| nnU-Net v2 | livecell-boundaries |"), "{md}");
    assert!(md.contains("| 0.228 |"), "{md}");
    // A folder without the outputs stops the experiment and names what is missing.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = with_baseline(&empty);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("no output for the test image SYN_Phase_test_0000_1"),
        "{t}"
    );
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
        !o.status.success() && text(&o).contains("model = \"resnet\": unknown model"),
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
