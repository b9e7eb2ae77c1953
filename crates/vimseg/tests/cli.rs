//! The vimseg commands end to end, on files the tests write.

use std::path::Path;
use std::process::{Command, Output};

use ndarray::{s, Array2};
use seg_io::tiff::{read_tiff, write_tiff, WriteOptions};

fn vimseg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vimseg"))
        .args(args)
        .output()
        .expect("the vimseg binary runs")
}

/// Runs a command that must succeed.
fn vimseg_ok(args: &[&str]) -> Output {
    let out = vimseg(args);
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

    let out = vimseg(&[
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

    let table = vimseg(&[
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
    let out = vimseg(&[
        "evaluate",
        "--gt",
        gt.to_str().unwrap(),
        "--pred",
        pred.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("only-gt.tif"), "{}", text(&out));

    std::fs::write(pred.join("only-gt.tif"), b"II*\0garbage").unwrap();
    let out = vimseg(&[
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
    let out = vimseg(&[
        "evaluate",
        "--gt",
        gt.to_str().unwrap(),
        "--pred",
        pred.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("shape"), "{}", text(&out));

    let out = vimseg(&[
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
        let out = vimseg(&[
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
    let out = vimseg(&[
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
        vimseg_ok(&[
            "targets",
            "--labels",
            labels,
            "--setting",
            setting,
            "--out",
            t,
        ]);
        vimseg_ok(&["segment", "--pred", t, "--setting", setting, "--out", s]);
        let out = vimseg_ok(&["evaluate", "--gt", labels, "--pred", s, "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let msa = report["mean"]["msa"].as_f64().unwrap();
        // CREMI has no foreground channel: the background becomes a fourth object (one false
        // positive next to three exact matches).
        let expected = if setting == "cremi" { 0.75 } else { 1.0 };
        assert_eq!(msa, expected, "{setting}");
    }
}

/// `--out` naming an input (by another spelling, or through a link) is refused before
/// anything is read, and the input keeps its bytes.
#[test]
fn an_output_that_is_the_input_is_refused_and_the_input_kept() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.tif");
    write(&labels, &cells());
    let before = std::fs::read(&labels).unwrap();
    let same = dir.path().join(".").join("labels.tif");
    let link = dir.path().join("link.tif");
    std::fs::hard_link(&labels, &link).unwrap();
    let (l, same, link) = (
        labels.to_str().unwrap(),
        same.to_str().unwrap(),
        link.to_str().unwrap(),
    );
    for args in [
        vec![
            "targets",
            "--labels",
            l,
            "--setting",
            "cremi",
            "--out",
            same,
        ],
        vec!["segment", "--pred", l, "--setting", "cremi", "--out", link],
        vec![
            "predict",
            "--checkpoint",
            "no-such-run/best",
            "--input",
            l,
            "--out",
            l,
        ],
    ] {
        let o = vimseg(&args);
        assert!(!o.status.success(), "{args:?}");
        let t = text(&o);
        assert!(t.contains("would destroy it"), "{args:?}: {t}");
        assert_eq!(std::fs::read(&labels).unwrap(), before, "{args:?}");
    }
}

/// A smoothing σ far beyond the image is a clear error, not an endless run or an abort.
#[test]
fn an_absurd_sigma_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.tif");
    write(&labels, &cells());
    let t = dir.path().join("t.tif");
    let (l, t) = (labels.to_str().unwrap(), t.to_str().unwrap());
    let setting = ["--setting", "livecell-distances"];
    vimseg_ok(&[&["targets", "--labels", l, "--out", t][..], &setting[..]].concat());
    let s = dir.path().join("s.tif");
    let o = vimseg(
        &[
            &["segment", "--pred", t, "--out", s.to_str().unwrap()][..],
            &setting[..],
            &["--sigma", "1e18"][..],
        ]
        .concat(),
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("sigma"), "{}", text(&o));
}

#[test]
fn segment_refuses_a_stack_with_the_wrong_channels() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.tif");
    write(&labels, &cells());
    let t = dir.path().join("t.tif");
    let out = vimseg(&[
        "targets",
        "--labels",
        labels.to_str().unwrap(),
        "--setting",
        "livecell-boundaries",
        "--out",
        t.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let out = vimseg(&[
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
        msg.contains("t.tif") && msg.contains("needs 3 channel"),
        "{msg}"
    );
    assert!(!Path::new("never.tif").exists());
}

#[test]
fn train_then_predict_on_tiff_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // TIFF pairs: a synthetic EM volume's slices as 2-D images.
    let (raw, ids) = seg_data::synthetic::em_volume(
        &{
            let mut opts = seg_data::synthetic::EmVolumeOptions::default();
            opts.depth = 3;
            opts.height = 64;
            opts.width = 64;
            opts
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
    let o = vimseg(&[
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
        "--checkpoint-activations",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let image = d.join("train/images/s0.tif");
    let pred = d.join("pred.tif");
    let o = vimseg(&[
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
    let o = vimseg(&[
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
        let o = vimseg(&a);
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
        let o = vimseg(&a);
        assert!(
            !o.status.success() && text(&o).contains(needle),
            "{}",
            text(&o)
        );
    }
}

/// A torch-em checkpoint file predicts directly, with the architecture from its init record.
#[test]
fn predict_reads_a_torch_em_checkpoint_without_python() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../vim-nets/tests/fixtures/torch_em_unet.pt");
    let image = dir.path().join("image.tif");
    let raw = Array2::from_shape_fn((48, 40), |(y, x)| ((y * 7 + x * 3) % 256) as u8);
    write_tiff(&image, raw.view(), &WriteOptions::default()).unwrap();
    let out = dir.path().join("pred.tif");
    let o = vimseg_ok(&[
        "predict",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--input",
        image.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        text(&o).contains("torch-em checkpoint, iteration 40"),
        "{}",
        text(&o)
    );
    let p = read_tiff(&out).unwrap().into_f32();
    assert_eq!(p.shape(), &[2, 48, 40]);
    assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
}

/// A class map as nnU-Net writes it (0 background, 1 foreground, 2 boundary) segments exactly as
/// the float stack foreground = (class == 1), boundaries = (class == 2) does.
#[test]
fn segment_takes_nnunet_class_maps_as_the_paper_scored_them() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.tif");
    write(&labels, &cells());
    let t = dir.path().join("t.tif");
    let args = |a: &[&Path]| {
        a.iter()
            .map(|p| p.to_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let [l, t_] = &args(&[&labels, &t])[..] else {
        unreachable!()
    };
    vimseg_ok(&[
        "targets",
        "--labels",
        l,
        "--setting",
        "livecell-boundaries",
        "--out",
        t_,
    ]);
    let targets = read_tiff(&t).unwrap().into_f32();
    let (fg, bd) = (
        targets.index_axis(ndarray::Axis(0), 0),
        targets.index_axis(ndarray::Axis(0), 1),
    );
    // Boundary overrides foreground, as the benchmark's conversion does.
    let classes = ndarray::Zip::from(&fg).and(&bd).map_collect(|f, b| {
        if *b > 0.5 {
            2u8
        } else if *f > 0.5 {
            1
        } else {
            0
        }
    });
    let class_map = dir.path().join("classes.tif");
    write_tiff(&class_map, classes.view(), &WriteOptions::default()).unwrap();
    let floats = ndarray::stack(
        ndarray::Axis(0),
        &[
            classes.mapv(|c| f32::from(u8::from(c == 1))).view(),
            classes.mapv(|c| f32::from(u8::from(c == 2))).view(),
        ],
    )
    .unwrap()
    .into_dimensionality::<ndarray::Ix3>()
    .unwrap();
    let float_path = dir.path().join("floats.tif");
    write_tiff(&float_path, floats.view(), &WriteOptions::default()).unwrap();
    let (a, b) = (dir.path().join("a.tif"), dir.path().join("b.tif"));
    let [cm, fp, a_, b_] = &args(&[&class_map, &float_path, &a, &b])[..] else {
        unreachable!()
    };
    let setting = ["--setting", "livecell-boundaries"];
    vimseg_ok(
        &[
            &["segment", "--class-map", "--pred", cm, "--out", a_][..],
            &setting[..],
        ]
        .concat(),
    );
    vimseg_ok(&[&["segment", "--pred", fp, "--out", b_][..], &setting[..]].concat());
    let (sa, sb) = (read_tiff(&a).unwrap(), read_tiff(&b).unwrap());
    assert_eq!(sa, sb);
    assert!(sa.into_label_ids().unwrap().iter().any(|v| *v > 0));
    // A class the setting does not have is named.
    let o = vimseg(&[
        "segment",
        "--class-map",
        "--pred",
        cm,
        "--setting",
        "cremi",
        "--out",
        a_,
    ]);
    assert!(
        !o.status.success() && text(&o).contains("class 2 at"),
        "{}",
        text(&o)
    );
}

/// A torch-em checkpoint exported as safetensors + config.json predicts the same values.
#[test]
fn an_exported_model_predicts_as_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../vim-nets/tests/fixtures/torch_em_unet.pt");
    let image = dir.path().join("image.tif");
    let raw = Array2::from_shape_fn((32, 48), |(y, x)| ((y * 5 + x * 11) % 256) as u8);
    write_tiff(&image, raw.view(), &WriteOptions::default()).unwrap();
    let exported = dir.path().join("exported");
    let (c, e, i) = (
        ckpt.to_str().unwrap(),
        exported.to_str().unwrap(),
        image.to_str().unwrap(),
    );
    vimseg_ok(&["export", "--checkpoint", c, "--out", e]);
    assert!(exported.join("model.safetensors").is_file() && exported.join("config.json").is_file());
    let (a, b) = (dir.path().join("a.tif"), dir.path().join("b.tif"));
    vimseg_ok(&[
        "predict",
        "--checkpoint",
        c,
        "--input",
        i,
        "--out",
        a.to_str().unwrap(),
    ]);
    let o = vimseg_ok(&[
        "predict",
        "--checkpoint",
        e,
        "--input",
        i,
        "--out",
        b.to_str().unwrap(),
    ]);
    assert!(text(&o).contains("exported model"), "{}", text(&o));
    assert_eq!(read_tiff(&a).unwrap(), read_tiff(&b).unwrap());
}

/// A volume predicted block by block into OME-Zarr (resumed on a rerun) and segmented block by
/// block; the commands refuse outputs that are not Zarr.
#[test]
fn predict_and_segment_a_volume_blockwise_into_zarr() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../vim-nets/tests/fixtures/torch_em_unet.pt");
    let stack = ndarray::Array3::from_shape_fn((2, 40, 56), |(z, y, x)| {
        ((z * 17 + y * 5 + x * 11) % 256) as u8
    });
    let input = dir.path().join("stack.tif");
    write_tiff(&input, stack.view(), &WriteOptions::default()).unwrap();
    let pred = dir.path().join("pred.ome.zarr");
    let seg = dir.path().join("seg.ome.zarr");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let (c, i, pr, sg) = (p(&ckpt), p(&input), p(&pred), p(&seg));
    let predict = [
        "predict",
        "--checkpoint",
        &c,
        "--input",
        &i,
        "--out",
        &pr,
        "--tile",
        "16",
        "--halo",
        "4",
    ];
    let t = text(&vimseg_ok(&predict));
    assert!(t.contains("24 blocks of 16×16 (0 done before)"), "{t}");
    let t = text(&vimseg_ok(&predict));
    assert!(t.contains("(24 done before)"), "{t}");
    assert!(pred.join("0/zarr.json").is_file() && pred.join("zarr.json").is_file());
    // Zarr v2 with OME-Zarr 0.4, pages chosen from the TIFF stack: the same values.
    let pred2 = dir.path().join("pred2.ome.zarr");
    let pr2 = p(&pred2);
    let mut v2 = predict.to_vec();
    v2[6] = &pr2;
    v2.extend(["--zarr-format", "2", "--slices", "1:2"]);
    let t = text(&vimseg_ok(&v2));
    assert!(t.contains("12 blocks of 16×16"), "{t}");
    assert!(pred2.join("0/.zarray").is_file() && pred2.join(".zattrs").is_file());
    let all = |a: &Path| {
        let a = seg_io::volume::ZarrArray::open(a).unwrap();
        let r: Vec<_> = a.shape().iter().map(|&n| 0..n).collect();
        a.read_f32(&r).unwrap()
    };
    let (one, both) = (all(&pred2.join("0")), all(&pred.join("0")));
    assert_eq!(one, both.slice(ndarray::s![.., 1..2, .., ..]).into_dyn());
    let o = vimseg(&[&v2[..], &["--subchunk", "8"]].concat());
    assert!(
        !o.status.success() && text(&o).contains("shards are a Zarr v3 feature"),
        "{}",
        text(&o)
    );
    let segment = [
        "segment",
        "--pred",
        &pr,
        "--setting",
        "livecell-boundaries",
        "--out",
        &sg,
        "--block",
        "16",
        "--halo",
        "8",
    ];
    let t = text(&vimseg_ok(&segment));
    assert!(t.contains("24 blocks of 16×16"), "{t}");
    let labels = seg_io::volume::ZarrArray::open(&seg.join("0")).unwrap();
    assert_eq!(labels.shape(), vec![2, 40, 56]);
    // Label volumes in Zarr are scored streamed, per slice and in 3-D.
    let gt =
        ndarray::Array3::from_shape_fn((2, 40, 56), |(_, y, x)| (y / 20 * 2 + x / 28 + 1) as u32);
    let gt_path = dir.path().join("gt.zarr");
    let z = seg_io::volume::ZarrArray::create(
        &gt_path,
        &[2, 40, 56],
        &[1, 16, 16],
        seg_io::volume::Element::U32,
        &["z", "y", "x"],
    )
    .unwrap();
    z.write(&[0, 0, 0], &gt.into_dyn()).unwrap();
    let g = p(&gt_path);
    let t = text(&vimseg_ok(&[
        "evaluate", "--gt", &g, "--pred", &g, "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["images"].as_array().unwrap().len(), 2, "{t}");
    assert_eq!(
        (v["mean"]["msa"].as_f64(), v["volume"]["msa"].as_f64()),
        (Some(1.0), Some(1.0)),
        "{t}"
    );
    let o = vimseg(&["evaluate", "--gt", &g, "--pred", &sg]);
    assert!(o.status.success(), "{}", text(&o));
    // Zarr in needs Zarr out; class maps are TIFF only.
    let tif = p(&dir.path().join("seg.tif"));
    for (args, needle) in [
        (
            vec![
                "segment",
                "--pred",
                &pr,
                "--setting",
                "livecell-boundaries",
                "--out",
                &tif,
            ],
            "give --out a path ending in .zarr",
        ),
        (
            vec![
                "segment",
                "--class-map",
                "--pred",
                &pr,
                "--setting",
                "livecell-boundaries",
                "--out",
                &sg,
            ],
            "--class-map takes a TIFF",
        ),
        (
            vec!["predict", "--checkpoint", &c, "--input", &pr, "--out", &tif],
            "give --out a path ending in .zarr",
        ),
    ] {
        let o = vimseg(&args);
        assert!(
            !o.status.success() && text(&o).contains(needle),
            "{args:?}: {}",
            text(&o)
        );
    }
}

/// Every chunk file under `dir`, by relative path, with its bytes.
fn chunk_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.join("c")];
    assert!(dir.join("c").is_dir(), "{}: no chunk stored", dir.display());
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path.strip_prefix(dir).unwrap().display().to_string();
                files.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// A command line and the environment variables it runs with.
type Run<'a> = (Vec<String>, Vec<(&'a str, String)>);

/// Runs `vimseg` processes side by side, each with its own environment, and waits for all.
fn run_side_by_side(runs: Vec<Run>) -> Vec<Output> {
    let children: Vec<_> = runs
        .into_iter()
        .map(|(args, env)| {
            Command::new(env!("CARGO_BIN_EXE_vimseg"))
                .args(&args)
                .env_remove("SLURM_ARRAY_TASK_ID")
                .env_remove("SLURM_ARRAY_TASK_MAX")
                .env_remove("JOB_COMPLETION_INDEX")
                .envs(env)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

#[test]
fn a_volume_runs_as_local_task_processes_with_the_one_process_result() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../vim-nets/tests/fixtures/torch_em_unet.pt");
    let stack = ndarray::Array3::from_shape_fn((3, 40, 56), |(z, y, x)| {
        ((z * 17 + y * 5 + x * 11) % 256) as u8
    });
    let input = dir.path().join("stack.tif");
    write_tiff(&input, stack.view(), &WriteOptions::default()).unwrap();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let predict = |out: &Path| -> Vec<String> {
        [
            "predict",
            "--checkpoint",
            &p(&ckpt),
            "--input",
            &p(&input),
            "--out",
            &p(out),
            "--tile",
            "16",
            "--halo",
            "4",
        ]
        .map(String::from)
        .to_vec()
    };
    let with = |base: &[String], extra: &[&str]| -> Vec<String> {
        base.iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let refs = |v: &[String]| -> Vec<String> { v.to_vec() };
    let call = |v: Vec<String>| vimseg(&v.iter().map(String::as_str).collect::<Vec<_>>());

    // One process.
    let one = dir.path().join("one.zarr");
    assert!(call(predict(&one)).status.success());

    // Plan for 3 tasks, then the three tasks as processes side by side: by --task I --of N,
    // by Slurm's array index and by Kubernetes' completion index.
    let pred = dir.path().join("pred.zarr");
    let o = call(with(&predict(&pred), &["--plan", "3"]));
    let t = text(&o);
    assert!(
        o.status.success() && t.contains("planned 36 predict blocks"),
        "{t}"
    );
    let o = call(vec!["finish".into(), p(&pred)]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("36 of 36 blocks are not done"),
        "{t}"
    );
    let outs = run_side_by_side(vec![
        (with(&predict(&pred), &["--task", "0", "--of", "3"]), vec![]),
        (
            with(&predict(&pred), &["--task"]),
            vec![("SLURM_ARRAY_TASK_ID", "1".into())],
        ),
        (
            with(&predict(&pred), &["--task"]),
            vec![("JOB_COMPLETION_INDEX", "2".into())],
        ),
    ]);
    for (i, o) in outs.iter().enumerate() {
        let t = text(o);
        assert!(
            o.status.success()
                && t.contains(&format!("task {i} of 3"))
                && t.contains("12 done now"),
            "task {i}: {t}"
        );
    }
    let t = text(&vimseg_ok(&["status", &p(&pred)]));
    assert!(t.contains("36 done, 0 failed, 0 pending"), "{t}");
    vimseg_ok(&["finish", &p(&pred)]);
    assert_eq!(chunk_files(&pred.join("0")), chunk_files(&one.join("0")));
    // Tasks outside the plan, a count that differs, an array that reaches past it, options
    // that differ from the plan's: refused.
    for (extra, env, needle) in [
        (vec!["--task", "3"], vec![], "has 3 tasks (0-2)"),
        (
            vec!["--task", "0", "--of", "4"],
            vec![],
            "4 tasks, but the plan",
        ),
        (
            vec!["--task"],
            vec![
                ("SLURM_ARRAY_TASK_ID", "0".to_string()),
                ("SLURM_ARRAY_TASK_MAX", "5".to_string()),
            ],
            "submit with --array=0-2",
        ),
        (vec!["--task"], vec![], "none of SLURM_ARRAY_TASK_ID"),
        (
            vec!["--task", "0", "--no-standardize"],
            vec![],
            "planned for a predict stage with other options",
        ),
    ] {
        let o = &run_side_by_side(vec![(with(&predict(&pred), &extra), env)])[0];
        assert!(
            !o.status.success() && text(o).contains(needle),
            "{extra:?}: {}",
            text(o)
        );
    }

    // Segmentation of a prediction of cells (foreground, boundaries): 2 tasks side by side,
    // then the finish step stitches.
    let cells_pred = dir.path().join("cells.zarr");
    let maps = ndarray::Array4::from_shape_fn((2, 3, 40, 56), |(c, z, y, x)| {
        let (cy, cx) = ((y + 3 * z) % 10, (x + 2 * z) % 12);
        let border = cy == 0 || cx == 0;
        match (c, border) {
            (0, _) => 1.0f32,
            (_, true) => 1.0,
            _ => 0.0,
        }
    });
    seg_io::volume::ZarrArray::create(
        &cells_pred,
        &[2, 3, 40, 56],
        &[2, 1, 16, 16],
        seg_io::volume::Element::F32,
        &["c", "z", "y", "x"],
    )
    .unwrap()
    .write_f32(&[0, 0, 0, 0], &maps.into_dyn())
    .unwrap();
    let segment = |out: &Path| -> Vec<String> {
        [
            "segment",
            "--pred",
            &p(&cells_pred),
            "--min-size",
            "5",
            "--setting",
            "livecell-boundaries",
            "--out",
            &p(out),
            "--block",
            "16",
            "--halo",
            "8",
        ]
        .map(String::from)
        .to_vec()
    };
    let seg_one = dir.path().join("seg-one.zarr");
    assert!(call(refs(&segment(&seg_one))).status.success());
    let labels = seg_io::volume::ZarrArray::open(&seg_one.join("0"))
        .unwrap()
        .read_labels(&[0..3, 0..40, 0..56])
        .unwrap();
    let objects: std::collections::HashSet<u32> = labels.iter().copied().collect();
    assert!(objects.len() > 40, "{} objects", objects.len());
    let seg = dir.path().join("seg.zarr");
    assert!(call(with(&segment(&seg), &["--plan", "2"]))
        .status
        .success());
    // A damaged chunk of the prediction: the blocks that read it fail, the rest are kept.
    let chunk = cells_pred.join("c/0/2/0/0");
    let good = std::fs::read(&chunk).unwrap();
    std::fs::write(&chunk, b"not a chunk").unwrap();
    let outs = run_side_by_side(vec![
        (with(&segment(&seg), &["--task", "0", "--of", "2"]), vec![]),
        (with(&segment(&seg), &["--task", "1", "--of", "2"]), vec![]),
    ]);
    let t = text(&outs[1]);
    assert!(outs[0].status.success(), "{}", text(&outs[0]));
    assert!(
        !outs[1].status.success()
            && t.contains("block(s) failed")
            && t.contains("cells.zarr: reading"),
        "{t}"
    );
    let o = call(vec!["finish".into(), p(&seg)]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("run task(s) 1 of 2 again") && t.contains("failed:"),
        "{t}"
    );
    let t = text(&vimseg_ok(&["status", &p(&seg), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["open_tasks"], serde_json::json!([1]), "{t}");
    assert!(!v["failed"].as_array().unwrap().is_empty(), "{t}");
    // Mended and rerun: only the failed blocks run; the result is the one-process result.
    std::fs::write(&chunk, good).unwrap();
    let o = call(with(&segment(&seg), &["--task", "1", "--of", "2"]));
    assert!(o.status.success(), "{}", text(&o));
    vimseg_ok(&["finish", &p(&seg)]);
    assert_eq!(chunk_files(&seg.join("0")), chunk_files(&seg_one.join("0")));
}
