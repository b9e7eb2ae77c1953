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
