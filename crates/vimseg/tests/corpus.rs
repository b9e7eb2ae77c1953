//! The bad-input corpus: files and misuses under `tests/corpus/`, each with the error it must
//! give (`tests/corpus/cases.tsv`). Every case must exit with a failure status and a message
//! containing the expected text, never panic or abort, never write its output, and never
//! change an input.
//!
//! The corpus files are written by `cargo test -p vimseg --test corpus -- --ignored
//! write_corpus_files` and kept in the repository.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{Array2, Array3};
use seg_io::tiff::{write_tiff, WriteOptions};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// Runs vimseg; leading `NAME=value` arguments are set in its environment instead.
fn vimseg(args: &[String]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vimseg"));
    let mut rest = args;
    while let Some((name, value)) = rest.first().and_then(|a| a.split_once('=')) {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            break;
        }
        command.env(name, value);
        rest = &rest[1..];
    }
    command.args(rest).output().expect("the vimseg binary runs")
}

/// (Re)writes the corpus files. Ignored: run it by hand when the corpus grows.
#[test]
#[ignore]
fn write_corpus_files() {
    let dir = corpus();
    std::fs::create_dir_all(&dir).unwrap();
    let opts = WriteOptions::default();
    std::fs::write(dir.join("not-a-tiff.tif"), b"hello, this is not an image\n").unwrap();
    std::fs::write(dir.join("empty.tif"), b"").unwrap();
    // A valid TIFF cut after its header and directory: the pixel strips are missing.
    let image = Array2::from_shape_fn((64, 64), |(y, x)| ((y * 3 + x * 5) % 251) as u8);
    let whole = dir.join("image.tif");
    write_tiff(&whole, image.view(), &opts).unwrap();
    let bytes = std::fs::read(&whole).unwrap();
    let head = bytes.len().min(300);
    std::fs::write(dir.join("truncated.tif"), &bytes[..head]).unwrap();
    // Two-channel predictions (livecell-boundaries): fine, with a NaN, with an infinity.
    let good = Array3::from_shape_fn((2, 16, 16), |(c, y, x)| {
        if c == 0 {
            0.9
        } else {
            ((x + y) % 7) as f32 / 7.0
        }
    });
    write_tiff(dir.join("prediction.tif"), good.view(), &opts).unwrap();
    let mut nan = good.clone();
    nan[[1, 3, 4]] = f32::NAN;
    write_tiff(dir.join("nan-prediction.tif"), nan.view(), &opts).unwrap();
    let mut inf = good.clone();
    inf[[0, 5, 6]] = f32::INFINITY;
    write_tiff(dir.join("inf-prediction.tif"), inf.view(), &opts).unwrap();
    let distances = Array3::from_shape_fn((3, 16, 16), |(c, y, x)| match c {
        0 => 0.9,
        _ => ((x * y) % 5) as f32 / 5.0,
    });
    write_tiff(dir.join("distances.tif"), distances.view(), &opts).unwrap();
    // A float image with a NaN, alone (predict) and as a training pair.
    let mut nan_image = Array2::from_shape_fn((64, 64), |(y, x)| (y + x) as f32);
    nan_image[[10, 20]] = f32::NAN;
    write_tiff(dir.join("nan-image.tif"), nan_image.view(), &opts).unwrap();
    let mut pair_labels = Array2::<u16>::zeros((64, 64));
    pair_labels.slice_mut(ndarray::s![4..30, 4..30]).fill(1);
    pair_labels.slice_mut(ndarray::s![34..60, 30..60]).fill(2);
    // train/ and val/ folders of one image and its labels each.
    let pair_folder = |name: &str, image: &dyn Fn(&Path) -> seg_io::Result<()>| {
        for split in ["train", "val"] {
            let base = dir.join(name).join(split);
            for sub in ["images", "labels"] {
                std::fs::create_dir_all(base.join(sub)).unwrap();
            }
            image(&base.join("images/a.tif")).unwrap();
            write_tiff(base.join("labels/a.tif"), pair_labels.view(), &opts).unwrap();
        }
    };
    pair_folder("nan-train", &|p| write_tiff(p, nan_image.view(), &opts));
    // A valid training pair, for the cases refused before training starts.
    pair_folder("tiny-train", &|p| write_tiff(p, image.view(), &opts));
    // Labels that are fine, for the option cases.
    let mut labels = Array2::<u16>::zeros((32, 32));
    labels.slice_mut(ndarray::s![2..14, 2..14]).fill(1);
    labels.slice_mut(ndarray::s![16..30, 10..28]).fill(2);
    write_tiff(dir.join("labels.tif"), labels.view(), &opts).unwrap();
    // HDF5: a raw volume with no slices, and a file that is not HDF5.
    let empty = Array3::<u8>::zeros((0, 64, 64));
    seg_io::hdf5::write_volumes(
        &dir.join("zero-slices.h5"),
        &[(
            "volumes/raw",
            seg_io::hdf5::VolumeData::U8(empty.view()),
            None,
        )],
    )
    .unwrap();
    std::fs::write(
        dir.join("not-hdf5.h5"),
        b"\x89HDF\r\n\x1a\nbut nothing else",
    )
    .unwrap();
    // A LIVECell root whose annotation file is not JSON.
    std::fs::create_dir_all(dir.join("livecell-corrupt")).unwrap();
    std::fs::write(
        dir.join("livecell-corrupt/train.json"),
        b"{\"images\": [{\"id\": 1, \"file_name\": ",
    )
    .unwrap();
}

/// A tiny UNet checkpoint trained for two iterations on TIFF pairs, and a copy of it whose
/// weights hold a NaN.
fn checkpoints(dir: &Path) -> (PathBuf, PathBuf) {
    let (raw, ids) = seg_data::synthetic::em_volume(
        &{
            let mut o = seg_data::synthetic::EmVolumeOptions::default();
            o.depth = 2;
            o.height = 48;
            o.width = 48;
            o
        },
        3,
    );
    let opts = WriteOptions::default();
    for (split, z) in [("train", 0), ("val", 1)] {
        for sub in ["images", "labels"] {
            std::fs::create_dir_all(dir.join("data").join(split).join(sub)).unwrap();
        }
        let name = format!("s{z}.tif");
        write_tiff(
            dir.join("data").join(split).join("images").join(&name),
            raw.index_axis(ndarray::Axis(0), z),
            &opts,
        )
        .unwrap();
        let l = ids.index_axis(ndarray::Axis(0), z).mapv(|v| v as u32);
        write_tiff(
            dir.join("data").join(split).join("labels").join(&name),
            l.view(),
            &opts,
        )
        .unwrap();
    }
    let run = dir.join("run");
    let args: Vec<String> = ["train", "--model", "unet", "--setting", "cremi", "--data"]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.join("data").display().to_string()])
        .chain(
            [
                "--iterations",
                "2",
                "--patch",
                "32",
                "--features",
                "4",
                "--epoch-length",
                "2",
                "--val-batches",
                "1",
                "--out",
            ]
            .iter()
            .map(|s| s.to_string()),
        )
        .chain([run.display().to_string()])
        .collect();
    let o = vimseg(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let good = run.join("latest");
    let bad = dir.join("nan-checkpoint");
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["checkpoint.json", "optimizer.safetensors"] {
        std::fs::copy(good.join(f), bad.join(f)).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(good.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let key = tensors
        .keys()
        .find(|k| k.ends_with(".weight"))
        .unwrap()
        .clone();
    let t = &tensors[&key];
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[0] = f32::NAN;
    let poisoned = candle_core::Tensor::from_vec(v, t.dims(), &candle_core::Device::Cpu).unwrap();
    tensors.insert(key, poisoned);
    candle_core::safetensors::save(&tensors, bad.join("model.safetensors")).unwrap();
    (good, bad)
}

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn no_input_of_the_corpus_panics_succeeds_or_writes_its_output() {
    let work = tempfile::tempdir().unwrap();
    // The cases run on a copy, so that a regression cannot damage the kept corpus.
    let c = work.path().join("corpus");
    std::fs::create_dir_all(&c).unwrap();
    for (path, bytes) in snapshot(&corpus()) {
        let rel = path.strip_prefix(corpus()).unwrap();
        std::fs::create_dir_all(c.join(rel).parent().unwrap()).unwrap();
        std::fs::write(c.join(rel), bytes).unwrap();
    }
    let (ckpt, nan_ckpt) = checkpoints(work.path());
    let before = snapshot(&c);
    let t = work.path().join("t");
    std::fs::create_dir_all(&t).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vim-nets/tests/fixtures");
    let cases = std::fs::read_to_string(corpus().join("cases.tsv")).unwrap();
    let mut ran = 0;
    for line in cases.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(
            fields.len(),
            3,
            "case line {line:?}: name, arguments, expected"
        );
        let (name, args, expected) = (fields[0], fields[1], fields[2]);
        let fill = |s: &str| {
            s.replace("{c}", &c.display().to_string())
                .replace("{t}", &t.display().to_string())
                .replace("{ckpt}", &ckpt.display().to_string())
                .replace("{nan_ckpt}", &nan_ckpt.display().to_string())
                .replace("{fixtures}", &fixtures.display().to_string())
        };
        let args: Vec<String> = args.split(' ').map(fill).collect();
        let o = vimseg(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: exit 0\n{stderr}");
        // 1: an error the program reports; 2: an argument clap refuses. 101 is a panic; a
        // signal (abort) has no code.
        assert!(
            matches!(o.status.code(), Some(1) | Some(2)),
            "{name}: status {:?}\n{stderr}",
            o.status
        );
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(
            stderr.contains(&fill(expected)),
            "{name}: expected {expected:?} in\n{stderr}"
        );
        assert!(
            !t.join("out.tif").exists(),
            "{name}: wrote an output despite the error"
        );
        ran += 1;
    }
    eprintln!("{ran} cases");
    assert!(ran >= 20, "only {ran} cases");
    assert_eq!(snapshot(&c), before, "an input of the corpus was changed");
}
