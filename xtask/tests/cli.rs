//! The xtask commands end to end, on files the tests write.

use std::path::Path;
use std::process::{Command, Output};

use ndarray::{s, Array2};
use seg_io::tiff::{read_tiff, write_tiff, WriteOptions};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("the xtask binary runs")
}

/// Runs a command that must succeed.
fn xtask_ok(args: &[&str]) -> Output {
    let out = xtask(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn cells() -> Array2<u16> {
    let mut l = Array2::<u16>::zeros((40, 48));
    l.slice_mut(s![2..18, 2..20]).fill(3);
    l.slice_mut(s![2..18, 20..40]).fill(7);
    l.slice_mut(s![22..38, 5..30]).fill(11);
    l
}

fn write(path: &Path, labels: &Array2<u16>) {
    write_tiff(path, labels.view(), &WriteOptions::default()).unwrap();
}

#[test]
fn evaluate_scores_a_folder_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let (gt, pred) = (dir.path().join("gt"), dir.path().join("pred"));
    std::fs::create_dir_all(&gt).unwrap();
    std::fs::create_dir_all(&pred).unwrap();
    let truth = cells();
    write(&gt.join("a.tif"), &truth);
    write(&pred.join("a.tif"), &truth.mapv(|v| v * 100));
    let mut half = truth.clone();
    half.slice_mut(s![22..38, ..]).fill(0); // one of three objects missed
    write(&gt.join("b.tif"), &truth);
    write(&pred.join("b.tif"), &half);

    let out = xtask(&[
        "evaluate",
        "--gt",
        gt.to_str().unwrap(),
        "--pred",
        pred.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["images"][0]["name"], "a.tif");
    assert_eq!(report["images"][0]["msa"], 1.0);
    let close = |v: &serde_json::Value, e: f64| (v.as_f64().unwrap() - e).abs() < 1e-12;
    assert!(close(&report["images"][1]["msa"], 2.0 / 3.0));
    assert_eq!(report["images"][1]["per_threshold"][0]["fn"], 1);
    assert_eq!(report["mean"]["n_images"], 2);
    assert!(close(&report["mean"]["msa"], (1.0 + 2.0 / 3.0) / 2.0));

    let table = xtask(&[
        "evaluate",
        "--gt",
        gt.to_str().unwrap(),
        "--pred",
        pred.to_str().unwrap(),
    ]);
    assert!(table.status.success());
    let t = text(&table);
    assert!(
        t.contains("a.tif") && t.contains("mean (2 images)") && t.contains("0.8333"),
        "{t}"
    );
}

#[test]
fn evaluate_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (gt, pred) = (dir.path().join("gt"), dir.path().join("pred"));
    std::fs::create_dir_all(&gt).unwrap();
    std::fs::create_dir_all(&pred).unwrap();
    write(&gt.join("only-gt.tif"), &cells());
    let out = xtask(&[
        "evaluate",
        "--gt",
        gt.to_str().unwrap(),
        "--pred",
        pred.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("only-gt.tif"), "{}", text(&out));

    std::fs::write(pred.join("only-gt.tif"), b"II*\0garbage").unwrap();
    let out = xtask(&[
        "evaluate",
        "--gt",
        gt.to_str().unwrap(),
        "--pred",
        pred.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("only-gt.tif") && !text(&out).contains("panicked"),
        "{}",
        text(&out)
    );

    write(&pred.join("only-gt.tif"), &Array2::zeros((10, 10)));
    let out = xtask(&[
        "evaluate",
        "--gt",
        gt.to_str().unwrap(),
        "--pred",
        pred.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("shape"), "{}", text(&out));

    let out = xtask(&[
        "evaluate",
        "--gt",
        "/no/such/gt.tif",
        "--pred",
        "/no/such/pred.tif",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("/no/such/gt.tif"), "{}", text(&out));
}

#[test]
fn targets_writes_a_float_stack_for_each_setting() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.tif");
    write(&labels, &cells());
    for (setting, channels) in [
        ("livecell-boundaries", 2),
        ("livecell-distances", 3),
        ("cremi", 1),
    ] {
        let out_path = dir.path().join(format!("{setting}.tif"));
        let out = xtask(&[
            "targets",
            "--labels",
            labels.to_str().unwrap(),
            "--setting",
            setting,
            "--out",
            out_path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let stack = read_tiff(&out_path).unwrap();
        assert_eq!(stack.sample_type(), seg_io::tiff::SampleType::F32);
        let expected: &[usize] = if channels == 1 {
            &[40, 48]
        } else {
            &[channels, 40, 48]
        };
        assert_eq!(stack.shape(), expected, "{setting}");
    }
    let out = xtask(&[
        "targets",
        "--labels",
        labels.to_str().unwrap(),
        "--setting",
        "nuclei",
        "--out",
        "x.tif",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("nuclei"), "{}", text(&out));
}

#[test]
fn targets_then_segment_then_evaluate_recovers_the_labels() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.tif");
    write(&labels, &cells());
    let labels = labels.to_str().unwrap();
    for setting in ["livecell-boundaries", "livecell-distances", "cremi"] {
        let t = dir.path().join(format!("{setting}-targets.tif"));
        let s = dir.path().join(format!("{setting}-seg.tif"));
        let (t, s) = (t.to_str().unwrap(), s.to_str().unwrap());
        xtask_ok(&[
            "targets",
            "--labels",
            labels,
            "--setting",
            setting,
            "--out",
            t,
        ]);
        xtask_ok(&["segment", "--pred", t, "--setting", setting, "--out", s]);
        let out = xtask_ok(&["evaluate", "--gt", labels, "--pred", s, "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let msa = report["mean"]["msa"].as_f64().unwrap();
        // CREMI has no foreground channel: the background becomes a fourth object (one false
        // positive next to three exact matches).
        let expected = if setting == "cremi" { 0.75 } else { 1.0 };
        assert_eq!(msa, expected, "{setting}");
    }
}

#[test]
fn segment_refuses_a_stack_with_the_wrong_channels() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.tif");
    write(&labels, &cells());
    let t = dir.path().join("t.tif");
    let out = xtask(&[
        "targets",
        "--labels",
        labels.to_str().unwrap(),
        "--setting",
        "livecell-boundaries",
        "--out",
        t.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let out = xtask(&[
        "segment",
        "--pred",
        t.to_str().unwrap(),
        "--setting",
        "livecell-distances",
        "--out",
        "never.tif",
    ]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("t.tif") && msg.contains("expected 3 channel"),
        "{msg}"
    );
    assert!(!Path::new("never.tif").exists());
}
