//! Blockwise prediction into OME-Zarr: equal to the in-memory tiled prediction bit for bit,
//! resumable after an interruption, refusing a rerun with other settings.

use std::cell::Cell;

use candle_core::{Device, Tensor};
use ndarray::{s, Array3};
use seg_io::volume::{open_image, Element, InMemory, VolumeSource, ZarrArray};
use seg_pipeline::blockwise::{predict_to_zarr, BlockwiseOptions};
use seg_train::{predict_tiled, Predictor, TileOptions};
use vim_nets::{Model, ModelConfig, ModelKind, NetConfig, PresetOptions};

fn tiny_unet() -> Model {
    let mut c = ModelConfig::preset(ModelKind::UNet, 2, &PresetOptions::default());
    if let NetConfig::UNet(u) = &mut c.net {
        u.depth = 2;
        u.initial_features = 4;
    }
    Model::new(c, &Device::Cpu, 7).unwrap()
}

fn volume() -> Array3<f32> {
    Array3::from_shape_fn((2, 70, 90), |(z, y, x)| {
        ((z * 13 + y * 7 + x * 3) % 29) as f32 * 4.0 + (y as f32 / 9.0).sin() * 20.0
    })
}

fn options() -> BlockwiseOptions {
    let mut o = BlockwiseOptions::default();
    o.block = 32;
    o.halo = 8;
    o.model = "tiny unet".into();
    o
}

/// A model that fails after `left` predictions (an interruption in the middle of a run).
struct FailAfter<'a> {
    model: &'a Model,
    left: Cell<usize>,
}

impl Predictor for FailAfter<'_> {
    fn predict(&self, x: &Tensor, train: bool) -> seg_train::Result<Tensor> {
        if self.left.get() == 0 {
            return Err(seg_train::Error::Memory("interrupted".into()));
        }
        self.left.set(self.left.get() - 1);
        self.model.predict(x, train)
    }
    fn size_multiple(&self) -> usize {
        Predictor::size_multiple(self.model)
    }
    fn max_side(&self) -> Option<usize> {
        Predictor::max_side(self.model)
    }
    fn device(&self) -> &Device {
        Predictor::device(self.model)
    }
    fn out_channels(&self) -> usize {
        Predictor::out_channels(self.model)
    }
}

/// A prediction array (c, z, y, x) holding `data`, chunked by `chunks`.
fn prediction_zarr(
    path: &std::path::Path,
    data: &ndarray::Array4<f32>,
    chunks: [usize; 4],
) -> ZarrArray {
    let array = ZarrArray::create(
        path,
        data.shape(),
        &chunks,
        Element::F32,
        &["c", "z", "y", "x"],
    )
    .unwrap();
    array
        .write_f32(&[0, 0, 0, 0], &data.clone().into_dyn())
        .unwrap();
    array
}

/// A reproducible stream of numbers below `n` (xorshift).
fn xorshift(mut state: u64) -> impl FnMut(usize) -> usize {
    move |n| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    }
}

fn read_all(path: &std::path::Path) -> ndarray::ArrayD<f32> {
    let a = ZarrArray::open(path).unwrap();
    let ranges: Vec<_> = a.shape().iter().map(|&n| 0..n).collect();
    a.read_f32(&ranges).unwrap()
}

#[test]
fn blockwise_prediction_equals_the_tiled_prediction_and_resumes() {
    let model = tiny_unet();
    let data = volume();
    let input = InMemory {
        data: data.clone(),
        name: "volume".into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pred.ome.zarr");
    let summary = predict_to_zarr(&model, &input, &out, &options()).unwrap();
    assert_eq!((summary.blocks, summary.already_done), (2 * 3 * 3, 0));
    let got = read_all(&summary.array);
    assert_eq!(got.shape(), &[2, 2, 70, 90]);
    let mut tile = TileOptions::default();
    tile.block = (32, 32);
    tile.halo = (8, 8);
    for z in 0..2 {
        let expected = predict_tiled(&model, data.index_axis(ndarray::Axis(0), z), &tile).unwrap();
        let slice = got.slice(s![.., z, .., ..]);
        assert_eq!(slice, expected.view(), "slice {z}");
    }
    // OME-Zarr metadata beside the array.
    let meta = std::fs::read_to_string(out.join("zarr.json")).unwrap();
    assert!(meta.contains("\"multiscales\"") && meta.contains("\"version\": \"0.5\""));

    // Interrupted after 5 blocks, then resumed: the same result, the first 5 not redone.
    let out2 = dir.path().join("resumed.ome.zarr");
    let failing = FailAfter {
        model: &model,
        left: Cell::new(5),
    };
    let e = predict_to_zarr(&failing, &input, &out2, &options()).unwrap_err();
    assert!(e.to_string().contains("interrupted"), "{e}");
    let summary = predict_to_zarr(&model, &input, &out2, &options()).unwrap();
    assert_eq!(summary.already_done, 5);
    assert_eq!(read_all(&summary.array), got);
    // Everything done: nothing is predicted again.
    let never = FailAfter {
        model: &model,
        left: Cell::new(0),
    };
    let summary = predict_to_zarr(&never, &input, &out2, &options()).unwrap();
    assert_eq!(summary.already_done, summary.blocks);

    // Another block size into the same output is refused.
    let mut other = options();
    other.block = 16;
    let e = predict_to_zarr(&model, &input, &out2, &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other settings"), "{e}");
}

#[test]
fn a_zarr_input_gives_the_same_prediction_as_the_volume_in_memory() {
    let model = tiny_unet();
    let data = volume();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("raw.zarr");
    let raw = ZarrArray::create(
        &source,
        &[2, 70, 90],
        &[1, 16, 16],
        Element::F32,
        &["z", "y", "x"],
    )
    .unwrap();
    raw.write_f32(&[0, 0, 0], &data.clone().into_dyn()).unwrap();
    let opened = open_image(&source).unwrap();
    assert_eq!(VolumeSource::shape(&opened), [2, 70, 90]);
    let from_zarr =
        predict_to_zarr(&model, &opened, &dir.path().join("a.zarr"), &options()).unwrap();
    let in_memory = InMemory {
        data,
        name: "volume".into(),
    };
    let from_memory =
        predict_to_zarr(&model, &in_memory, &dir.path().join("b.zarr"), &options()).unwrap();
    assert_eq!(read_all(&from_zarr.array), read_all(&from_memory.array));
    // Errors name the array: a box outside it, a folder without an array.
    let e = opened
        .read_box(0..1, 60..80, 0..10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not inside the array"), "{e}");
    let e = open_image(dir.path()).err().unwrap().to_string();
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
}

/// A CREMI-style boundary map (c = 1) of small cells (rectangles of 9–15 px, boundaries 1 on
/// the cells' borders, 0 inside) and the cells.
fn cells(depth: usize, h: usize, w: usize) -> (ndarray::Array4<f32>, Array3<u32>) {
    let mut labels = Array3::<u32>::zeros((depth, h, w));
    let cut = |n: usize, seed: usize| {
        let mut v = vec![0];
        let mut at = 0;
        let mut k = seed;
        while at < n {
            k = (k * 1103515245 + 12345) % 2147483648;
            at = (at + 9 + k % 7).min(n);
            v.push(at);
        }
        v
    };
    let mut id = 0;
    for z in 0..depth {
        let ys = cut(h, 7 + z);
        let xs = cut(w, 11 + 3 * z);
        for yy in ys.windows(2) {
            for xx in xs.windows(2) {
                id += 1;
                labels.slice_mut(s![z, yy[0]..yy[1], xx[0]..xx[1]]).fill(id);
            }
        }
    }
    let pred = ndarray::Array4::from_shape_fn((1, depth, h, w), |(_, z, y, x)| {
        let l = labels[[z, y, x]];
        let differs = |yy: usize, xx: usize| labels[[z, yy, xx]] != l;
        let border = (y > 0 && differs(y - 1, x))
            || (x > 0 && differs(y, x - 1))
            || (y + 1 < h && differs(y + 1, x))
            || (x + 1 < w && differs(y, x + 1));
        if border {
            1.0
        } else {
            0.0
        }
    });
    (pred, labels)
}

/// Whether `a` and `b` are the same partition (a one-to-one map between their ids, 0 to 0).
fn same_partition(a: ndarray::ArrayView2<u32>, b: ndarray::ArrayView2<u32>) -> bool {
    let mut ab = std::collections::HashMap::new();
    let mut ba = std::collections::HashMap::new();
    a.iter().zip(b.iter()).all(|(&x, &y)| {
        *ab.entry(x).or_insert(y) == y && *ba.entry(y).or_insert(x) == x && ((x == 0) == (y == 0))
    })
}

#[test]
fn blockwise_segmentation_equals_the_whole_slice_segmentation() {
    use seg_pipeline::blockwise::{segment_zarr, SegmentOptions};
    use seg_targets::TargetSetting;
    let (pred, _) = cells(2, 100, 90);
    let dir = tempfile::tempdir().unwrap();
    let pred_path = dir.path().join("pred.zarr");
    let array = prediction_zarr(&pred_path, &pred, [1, 1, 32, 32]);
    let recipes = seg_pipeline::Recipes::default();
    let mut opts = SegmentOptions::default();
    opts.block = 32;
    opts.halo = 24;
    let out = dir.path().join("seg.ome.zarr");
    let summary = segment_zarr(&array, TargetSetting::Cremi, &recipes, &out, &opts).unwrap();
    assert_eq!(summary.blocks, 2 * 4 * 3);
    let got = ZarrArray::open(&summary.array)
        .unwrap()
        .read_labels(&[0..2, 0..100, 0..90])
        .unwrap()
        .into_dimensionality::<ndarray::Ix3>()
        .unwrap();
    let mut ids = std::collections::HashSet::new();
    for z in 0..2 {
        let whole = seg_pipeline::segment(
            pred.slice(s![.., z, .., ..]),
            TargetSetting::Cremi,
            &recipes,
        )
        .unwrap();
        assert!(whole.iter().any(|&v| v > 0));
        assert!(
            same_partition(got.index_axis(ndarray::Axis(0), z), whole.view()),
            "slice {z} differs from the whole-slice segmentation"
        );
        ids.extend(got.index_axis(ndarray::Axis(0), z).iter().copied());
    }
    // Ids are unique across slices and consecutive.
    let max = *ids.iter().max().unwrap();
    assert_eq!(ids.len() as u32, max + u32::from(ids.contains(&0)));

    // Resumed after losing some blocks' results: the same labels.
    for i in [0, 5, 13] {
        std::fs::remove_file(out.join("blocks").join(format!("{i}.max"))).unwrap();
    }
    let again = segment_zarr(&array, TargetSetting::Cremi, &recipes, &out, &opts).unwrap();
    assert_eq!(again.already_done, summary.blocks - 3);
    let got_again = ZarrArray::open(&again.array)
        .unwrap()
        .read_labels(&[0..2, 0..100, 0..90])
        .unwrap();
    assert_eq!(got_again, got.clone().into_dyn());
    // Other block shapes and halos (each halo at least the largest cell) give the same.
    for (block, halo) in [(16, 16), (24, 20), (40, 16), (48, 32), (100, 16)] {
        let mut o = SegmentOptions::default();
        o.block = block;
        o.halo = halo;
        let out = dir.path().join(format!("seg-{block}-{halo}.zarr"));
        let s = segment_zarr(&array, TargetSetting::Cremi, &recipes, &out, &o).unwrap();
        let other = ZarrArray::open(&s.array)
            .unwrap()
            .read_labels(&[0..2, 0..100, 0..90])
            .unwrap()
            .into_dimensionality::<ndarray::Ix3>()
            .unwrap();
        for z in 0..2 {
            assert!(
                same_partition(
                    other.index_axis(ndarray::Axis(0), z),
                    got.index_axis(ndarray::Axis(0), z)
                ),
                "block {block}, halo {halo}, slice {z}"
            );
        }
    }
    // Other settings into the same output are refused.
    opts.halo = 8;
    let e = segment_zarr(&array, TargetSetting::Cremi, &recipes, &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other settings"), "{e}");
}

/// Scores streamed box by box equal the scores of the whole arrays, per slice and in 3-D, with
/// the 3-D overlap table in memory and spilled to run files.
#[test]
fn streamed_scores_equal_the_scores_of_the_whole_volume() {
    use seg_pipeline::blockwise::{evaluate_zarr, EvaluateOptions};
    let (_, gt) = cells(3, 50, 40);
    // A segmentation with errors: some cells merged with their right neighbour, a slice shifted.
    let seg = Array3::from_shape_fn((3, 50, 40), |(z, y, x)| {
        let x = if z == 2 { (x + 2).min(39) } else { x };
        let l = gt[[z, y, x]];
        if l % 4 == 0 && x + 14 < 40 {
            gt[[z, y, x + 14]]
        } else {
            l
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, a: &Array3<u32>| {
        let z = ZarrArray::create(
            &dir.path().join(name),
            &[3, 50, 40],
            &[1, 16, 16],
            Element::U32,
            &["z", "y", "x"],
        )
        .unwrap();
        z.write(&[0, 0, 0], &a.clone().into_dyn()).unwrap();
        z
    };
    let (s, g) = (write("seg.zarr", &seg), write("gt.zarr", &gt));
    let options = msa_eval::MsaOptions::default();
    let mut eo = EvaluateOptions::default();
    eo.block = 16;
    let scores = evaluate_zarr(&s, &g, &eo).unwrap();
    assert_eq!(scores.pair_runs, 0);
    // A budget of 8 pairs: both sorts go through run files, removed afterwards.
    let runs = tempfile::tempdir().unwrap();
    eo.pairs_in_memory = 8;
    eo.temp_dir = Some(runs.path().to_path_buf());
    let spilled = evaluate_zarr(&s, &g, &eo).unwrap();
    assert!(spilled.pair_runs > 10, "{} runs", spilled.pair_runs);
    assert_eq!(std::fs::read_dir(runs.path()).unwrap().count(), 0);
    assert_eq!(spilled.volume, scores.volume);
    assert_eq!(spilled.slices, scores.slices);
    for z in 0..3 {
        let whole = msa_eval::mean_segmentation_accuracy(
            seg.index_axis(ndarray::Axis(0), z),
            gt.index_axis(ndarray::Axis(0), z),
            &options,
        )
        .unwrap();
        assert_eq!(scores.slices[z], whole, "slice {z}");
    }
    let whole = msa_eval::mean_segmentation_accuracy(seg.view(), gt.view(), &options).unwrap();
    assert_eq!(scores.volume, whole);
    assert!(whole.msa > 0.1 && whole.msa < 0.95, "{whole:?}");
    // Arrays of other shapes are refused with both named.
    let other = ZarrArray::create(
        &dir.path().join("o.zarr"),
        &[3, 50, 41],
        &[1, 16, 16],
        Element::U32,
        &["z", "y", "x"],
    )
    .unwrap();
    let e = evaluate_zarr(&other, &g, &eo).unwrap_err().to_string();
    assert!(e.contains("o.zarr") && e.contains("gt.zarr"), "{e}");
}

fn read_labels_all(path: &std::path::Path) -> ndarray::ArrayD<u32> {
    let a = ZarrArray::open(path).unwrap();
    let ranges: Vec<_> = a.shape().iter().map(|&n| 0..n).collect();
    a.read_labels(&ranges).unwrap()
}

#[test]
fn tasks_in_any_order_give_the_one_process_prediction_and_report_failed_blocks() {
    use seg_pipeline::blockwise::{finish_predict, plan_predict, predict_task, PlanOptions, Task};
    let model = tiny_unet();
    let input = InMemory {
        data: volume(),
        name: "volume".into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let single = predict_to_zarr(&model, &input, &dir.path().join("one.zarr"), &options()).unwrap();

    let out = dir.path().join("tasks.zarr");
    let mut plan_opts = PlanOptions::default();
    plan_opts.tasks = 4;
    let plan = plan_predict(&model, &input, &out, &options(), &plan_opts).unwrap();
    assert_eq!(
        (plan.blocks, plan.tasks, plan.stage.as_str()),
        (18, 4, "predict")
    );
    let task = |index| Task { index, count: 4 };
    // Task 3 runs; task 1 fails after two of its blocks and goes on with the others.
    let s = predict_task(&model, &input, &out, &options(), task(3)).unwrap();
    assert_eq!((s.blocks.clone(), s.done, s.failed.len()), (13..18, 5, 0));
    let failing = FailAfter {
        model: &model,
        left: Cell::new(2),
    };
    let s = predict_task(&failing, &input, &out, &options(), task(1)).unwrap();
    assert_eq!((s.blocks.clone(), s.done), (4..9, 2));
    assert_eq!(s.failed.iter().map(|f| f.0).collect::<Vec<_>>(), [6, 7, 8]);
    assert!(s.failed[0].1.contains("interrupted"), "{:?}", s.failed);
    // Finish refuses, naming the blocks missing, their tasks and the failures recorded.
    let e = finish_predict(&out).unwrap_err().to_string();
    assert!(
        e.contains("11 of 18 blocks are not done (blocks 0-3, 6-12)")
            && e.contains("run task(s) 0-2 of 4 again")
            && e.contains("block 6 failed:")
            && e.contains("interrupted"),
        "{e}"
    );
    // Another task's options are refused by the plan's hash.
    let mut other = options();
    other.standardize = false;
    let e = predict_task(&model, &input, &out, &other, task(0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("planned for a predict stage with other options"),
        "{e}"
    );
    // A task of another count is refused.
    let e = predict_task(
        &model,
        &input,
        &out,
        &options(),
        Task { index: 0, count: 2 },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("has 4 tasks"), "{e}");
    for i in [2, 0, 1, 1, 3] {
        let s = predict_task(&model, &input, &out, &options(), task(i)).unwrap();
        assert!(s.failed.is_empty());
    }
    assert!(!out.join("blocks").join("6.failed").exists());
    finish_predict(&out).unwrap();
    assert_eq!(read_all(&out.join("0")), read_all(&single.array));

    // Planning again with the same options keeps the results (and may change the count).
    plan_opts.tasks = 2;
    plan_predict(&model, &input, &out, &options(), &plan_opts).unwrap();
    let s = predict_task(
        &model,
        &input,
        &out,
        &options(),
        Task { index: 1, count: 2 },
    )
    .unwrap();
    assert_eq!((s.already_done, s.done), (9, 0));
    // Other options: refused, unless forced, which starts afresh.
    let e = plan_predict(&model, &input, &out, &other, &plan_opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other settings") && e.contains("force"), "{e}");
    plan_opts.force = true;
    plan_predict(&model, &input, &out, &other, &plan_opts).unwrap();
    let s = predict_task(&model, &input, &out, &other, Task { index: 0, count: 2 }).unwrap();
    assert_eq!((s.already_done, s.done), (0, 9));
}

#[test]
fn segmentation_tasks_and_finish_give_the_one_process_labels() {
    use seg_pipeline::blockwise::{
        finish_segment, plan_segment, segment_task, segment_zarr, PlanOptions, SegmentOptions, Task,
    };
    use seg_targets::TargetSetting;
    let (pred, _) = cells(3, 100, 90);
    let dir = tempfile::tempdir().unwrap();
    let array = prediction_zarr(&dir.path().join("pred.zarr"), &pred, [1, 1, 32, 32]);
    let recipes = seg_pipeline::Recipes::default();
    let mut opts = SegmentOptions::default();
    opts.block = 32;
    opts.halo = 24;
    let single = segment_zarr(
        &array,
        TargetSetting::Cremi,
        &recipes,
        &dir.path().join("one.zarr"),
        &opts,
    )
    .unwrap();
    let expected = read_labels_all(&single.array);
    assert!(expected.iter().any(|&v| v > 0));

    let out = dir.path().join("tasks.zarr");
    let mut plan_opts = PlanOptions::default();
    plan_opts.tasks = 5;
    let plan = plan_segment(
        &array,
        TargetSetting::Cremi,
        &recipes,
        &out,
        &opts,
        &plan_opts,
    )
    .unwrap();
    assert_eq!(plan.blocks, 3 * 4 * 3);
    for i in [4, 1, 3] {
        let s = segment_task(
            &array,
            TargetSetting::Cremi,
            &recipes,
            &out,
            &opts,
            Task { index: i, count: 5 },
        )
        .unwrap();
        assert!(s.failed.is_empty() && s.done > 0);
    }
    let e = finish_segment(&out).unwrap_err().to_string();
    assert!(e.contains("run task(s) 0, 2 of 5 again"), "{e}");
    for i in [2, 0] {
        segment_task(
            &array,
            TargetSetting::Cremi,
            &recipes,
            &out,
            &opts,
            Task { index: i, count: 5 },
        )
        .unwrap();
    }
    let s = finish_segment(&out).unwrap();
    assert_eq!(read_labels_all(&s.array), expected, "not voxel for voxel");
    // The finish step reruns whole with the same result.
    let s = finish_segment(&out).unwrap();
    assert_eq!(read_labels_all(&s.array), expected);
    // A damaged chunk of block-local labels (an id beyond its block's count) is named, not a
    // panic.
    ZarrArray::open(&out.join("local"))
        .unwrap()
        .write(
            &[0, 0, 0],
            &ndarray::Array3::<u32>::from_elem((1, 2, 2), 999_999).into_dyn(),
        )
        .unwrap();
    let e = finish_segment(&out).unwrap_err().to_string();
    assert!(
        e.contains("block 0 holds id 999999 but its marker counts"),
        "{e}"
    );
    // A prediction plan is not finished as a segmentation.
    let e = seg_pipeline::blockwise::finish_predict(&out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a prediction"), "{e}");
}

/// On synthetic EM slices larger than a block (2 × 2048², the default block 1024 and halo 64),
/// the blockwise segmentation of a boundary map scores mSA ≥ 0.99 against the whole-slice
/// segmentation of the same map (the figure in docs/volumes.md).
#[test]
fn blockwise_segmentation_of_em_slices_matches_the_whole_slices() {
    use seg_pipeline::blockwise::{segment_zarr, SegmentOptions};
    use seg_targets::TargetSetting;
    let mut o = seg_data::synthetic::EmVolumeOptions::default();
    o.depth = 2;
    o.height = 2048;
    o.width = 2048;
    let (_, labels) = seg_data::synthetic::em_volume(&o, 5);
    // The ground truth's (thick) boundaries as the boundary map.
    let edges = seg_targets::find_boundaries(labels.view(), &Default::default()).unwrap();
    let map = edges
        .mapv(|b| if b { 1.0f32 } else { 0.0 })
        .insert_axis(ndarray::Axis(0));
    let dir = tempfile::tempdir().unwrap();
    let array = prediction_zarr(&dir.path().join("pred.zarr"), &map, [1, 1, 512, 512]);
    let recipes = seg_pipeline::Recipes::default();
    let s = segment_zarr(
        &array,
        TargetSetting::Cremi,
        &recipes,
        &dir.path().join("seg.zarr"),
        &SegmentOptions::default(),
    )
    .unwrap();
    assert_eq!(s.blocks, 2 * 4);
    let got = read_labels_all(&s.array);
    for z in 0..2 {
        let whole =
            seg_pipeline::segment(map.slice(s![.., z, .., ..]), TargetSetting::Cremi, &recipes)
                .unwrap();
        let blockwise = got.slice(s![z, .., ..]);
        let score = msa_eval::mean_segmentation_accuracy(
            blockwise,
            whole.view(),
            &msa_eval::MsaOptions::default(),
        )
        .unwrap();
        eprintln!(
            "slice {z}: mSA {:.4} of {} blockwise objects against {} whole-slice objects",
            score.msa, score.n_pred, score.n_true
        );
        assert!(score.n_true > 500, "{} objects", score.n_true);
        assert!(score.msa >= 0.99, "slice {z}: mSA {}", score.msa);
    }
}

/// An HDF5 dataset read one slice at a time predicts as the same slices held in memory.
#[test]
fn an_hdf5_input_read_slice_by_slice_predicts_as_in_memory() {
    use seg_io::hdf5::{write_volumes, VolumeData};
    use seg_pipeline::predict::Hdf5Slices;
    let model = tiny_unet();
    let raw = Array3::from_shape_fn((4, 70, 90), |(z, y, x)| {
        ((z * 31 + y * 7 + x * 3) % 251) as u8
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.h5");
    write_volumes(&path, &[("volumes/raw", VolumeData::U8(raw.view()), None)]).unwrap();
    let h5 = Hdf5Slices::open(&path, "volumes/raw", Some(1..3)).unwrap();
    assert_eq!(VolumeSource::shape(&h5), [2, 70, 90]);
    let from_h5 = predict_to_zarr(&model, &h5, &dir.path().join("a.zarr"), &options()).unwrap();
    let in_memory = InMemory {
        data: raw.slice(s![1..3, .., ..]).mapv(f32::from),
        name: "raw".into(),
    };
    let from_memory =
        predict_to_zarr(&model, &in_memory, &dir.path().join("b.zarr"), &options()).unwrap();
    assert_eq!(read_all(&from_h5.array), read_all(&from_memory.array));
    let e = h5.read_box(0..3, 0..10, 0..10).unwrap_err().to_string();
    assert!(e.contains("not inside volumes/raw"), "{e}");
    let e = Hdf5Slices::open(&path, "volumes/raw", Some(3..6))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("3:6 is not a non-empty range of the 4 slices"),
        "{e}"
    );
}

/// Files below `dir` (recursively).
fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}

/// Sharded outputs (one shard per block, subchunks inside) hold the same values as plain ones.
#[test]
fn sharded_outputs_hold_the_same_values_in_one_file_per_block() {
    use seg_pipeline::blockwise::{segment_zarr, SegmentOptions};
    use seg_targets::TargetSetting;
    let model = tiny_unet();
    let input = InMemory {
        data: volume(),
        name: "volume".into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let plain = predict_to_zarr(&model, &input, &dir.path().join("a.zarr"), &options()).unwrap();
    let mut o = options();
    o.subchunk = Some(16);
    let sharded = predict_to_zarr(&model, &input, &dir.path().join("b.zarr"), &o).unwrap();
    assert_eq!(read_all(&sharded.array), read_all(&plain.array));
    let meta = std::fs::read_to_string(sharded.array.join("zarr.json")).unwrap();
    assert!(meta.contains("sharding_indexed"), "{meta}");
    assert_eq!(count_files(&sharded.array.join("c")), sharded.blocks);
    o.subchunk = Some(12);
    let e = predict_to_zarr(&model, &input, &dir.path().join("c.zarr"), &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("12 does not divide the block 32"), "{e}");

    let (pred, _) = cells(2, 100, 90);
    let array = prediction_zarr(&dir.path().join("pred.zarr"), &pred, [1, 1, 32, 32]);
    let recipes = seg_pipeline::Recipes::default();
    let mut so = SegmentOptions::default();
    so.block = 32;
    so.halo = 24;
    let a = segment_zarr(
        &array,
        TargetSetting::Cremi,
        &recipes,
        &dir.path().join("s1.zarr"),
        &so,
    )
    .unwrap();
    so.subchunk = Some(8);
    let b = segment_zarr(
        &array,
        TargetSetting::Cremi,
        &recipes,
        &dir.path().join("s2.zarr"),
        &so,
    )
    .unwrap();
    assert_eq!(read_labels_all(&b.array), read_labels_all(&a.array));
    let meta = std::fs::read_to_string(b.array.join("zarr.json")).unwrap();
    assert!(meta.contains("sharding_indexed"), "{meta}");
    assert!(meta.contains("\"uint32\""), "{meta}");
    // u64 labels, as CREMI stores its ids: the same ids.
    so.labels = seg_pipeline::blockwise::LabelWidth::U64;
    let c = segment_zarr(
        &array,
        TargetSetting::Cremi,
        &recipes,
        &dir.path().join("s3.zarr"),
        &so,
    )
    .unwrap();
    let meta = std::fs::read_to_string(c.array.join("zarr.json")).unwrap();
    assert!(meta.contains("\"uint64\""), "{meta}");
    assert_eq!(read_labels_all(&c.array), read_labels_all(&a.array));
}

/// Zarr v2 outputs with OME-Zarr 0.4 metadata (for readers that do not know v3) hold the same
/// values as v3 ones; the segmentation is marked as a label image in both; v2 has no shards.
#[test]
fn zarr_v2_outputs_hold_the_same_values_as_v3_with_ome_zarr_0_4_metadata() {
    use seg_io::volume::{open_array, ZarrFormat};
    use seg_pipeline::blockwise::{segment_zarr, SegmentOptions};
    use seg_targets::TargetSetting;
    let json = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    };
    let model = tiny_unet();
    let input = InMemory {
        data: volume(),
        name: "volume".into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let v3 = predict_to_zarr(&model, &input, &dir.path().join("a.zarr"), &options()).unwrap();
    let mut o = options();
    o.format = ZarrFormat::V2;
    let v2 = predict_to_zarr(&model, &input, &dir.path().join("b.zarr"), &o).unwrap();
    assert_eq!(read_all(&v2.array), read_all(&v3.array));
    assert_eq!(ZarrArray::open(&v2.array).unwrap().format(), ZarrFormat::V2);
    let zarray = json(v2.array.join(".zarray"));
    assert_eq!(zarray["zarr_format"], 2);
    assert_eq!(zarray["dtype"], "<f4");
    assert_eq!(zarray["dimension_separator"], "/");
    assert_eq!(zarray["compressor"]["id"], "blosc");
    assert!(!v2.array.join("zarr.json").exists());
    // Chunk keys are `/`-separated: (c, z, y, x) = (0, 1, 2, 0) is the file 0/1/2/0.
    assert!(v2.array.join("0/1/2/0").is_file());
    let attrs = json(dir.path().join("b.zarr/.zattrs"));
    assert_eq!(attrs["multiscales"][0]["version"], "0.4");
    assert_eq!(attrs["multiscales"][0]["axes"][0]["type"], "channel");
    assert_eq!(attrs["multiscales"][0]["datasets"][0]["path"], "0");
    assert!(attrs.get("image-label").is_none());
    assert_eq!(json(dir.path().join("b.zarr/.zgroup"))["zarr_format"], 2);
    // The group opens as its array, as a v3 group does.
    assert_eq!(
        open_array(&dir.path().join("b.zarr")).unwrap().format(),
        ZarrFormat::V2
    );
    o.subchunk = Some(16);
    let e = predict_to_zarr(&model, &input, &dir.path().join("c.zarr"), &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shards are a Zarr v3 feature"), "{e}");

    let (pred, _) = cells(2, 100, 90);
    let array = prediction_zarr(&dir.path().join("pred.zarr"), &pred, [1, 1, 32, 32]);
    let recipes = seg_pipeline::Recipes::default();
    let mut so = SegmentOptions::default();
    so.block = 32;
    so.halo = 24;
    let a = segment_zarr(
        &array,
        TargetSetting::Cremi,
        &recipes,
        &dir.path().join("s3.zarr"),
        &so,
    )
    .unwrap();
    so.format = ZarrFormat::V2;
    let b = segment_zarr(
        &array,
        TargetSetting::Cremi,
        &recipes,
        &dir.path().join("s2.zarr"),
        &so,
    )
    .unwrap();
    assert_eq!(read_labels_all(&b.array), read_labels_all(&a.array));
    assert_eq!(json(b.array.join(".zarray"))["dtype"], "<u4");
    let attrs = json(dir.path().join("s2.zarr/.zattrs"));
    assert_eq!(attrs["image-label"]["version"], "0.4");
    assert_eq!(attrs["multiscales"][0]["axes"][0]["name"], "z");
    let v3_group = json(dir.path().join("s3.zarr/zarr.json"));
    assert_eq!(v3_group["attributes"]["ome"]["version"], "0.5");
    assert_eq!(
        v3_group["attributes"]["ome"]["image-label"]["version"],
        "0.5"
    );
    // u64 labels in v2 too.
    so.labels = seg_pipeline::blockwise::LabelWidth::U64;
    let c = segment_zarr(
        &array,
        TargetSetting::Cremi,
        &recipes,
        &dir.path().join("s4.zarr"),
        &so,
    )
    .unwrap();
    assert_eq!(json(c.array.join(".zarray"))["dtype"], "<u8");
    assert_eq!(read_labels_all(&c.array), read_labels_all(&a.array));
}

/// Property: for random block sides and halos (every halo at least the largest cell), random
/// volume sizes and cell layouts, the blockwise labels are the whole-slice labels up to
/// relabelling: no object is split by a block border and none is merged across one.
#[test]
fn random_blocks_and_halos_never_split_or_merge_objects() {
    use seg_pipeline::blockwise::{segment_zarr, SegmentOptions};
    use seg_targets::TargetSetting;
    let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
    let recipes = seg_pipeline::Recipes::default();
    let dir = tempfile::tempdir().unwrap();
    for case in 0..10 {
        let (h, w) = (40 + next(80), 40 + next(80));
        let (pred, _) = cells(1, h, w);
        let array = prediction_zarr(
            &dir.path().join(format!("pred-{case}.zarr")),
            &pred,
            [1, 1, 16, 16],
        );
        let mut o = SegmentOptions::default();
        o.block = 8 + next(60);
        o.halo = 16 + next(24);
        let out = dir.path().join(format!("seg-{case}.zarr"));
        let s = segment_zarr(&array, TargetSetting::Cremi, &recipes, &out, &o).unwrap();
        let got = read_labels_all(&s.array);
        let whole = seg_pipeline::segment(
            pred.slice(s![.., 0, .., ..]),
            TargetSetting::Cremi,
            &recipes,
        )
        .unwrap();
        assert!(
            same_partition(
                got.index_axis(ndarray::Axis(0), 0)
                    .into_dimensionality()
                    .unwrap(),
                whole.view()
            ),
            "case {case}: {h}×{w}, block {}, halo {}",
            o.block,
            o.halo
        );
    }
}

/// Cuboid cells of 9–15 voxels per side filling a (d, h, w) volume, and their thick 3-D
/// boundaries as a CREMI-style boundary map (c = 1).
fn cuboids(d: usize, h: usize, w: usize, seed: usize) -> ndarray::Array4<f32> {
    let cut = |n: usize, seed: usize| {
        let mut v = vec![0];
        let (mut at, mut k) = (0, seed);
        while at < n {
            k = (k * 1103515245 + 12345) % 2147483648;
            at = (at + 9 + k % 7).min(n);
            v.push(at);
        }
        v
    };
    let (zs, ys, xs) = (cut(d, seed), cut(h, seed + 1), cut(w, seed + 2));
    let index = |cuts: &[usize], v: usize| cuts.windows(2).position(|c| v < c[1]).unwrap_or(0);
    let labels = Array3::from_shape_fn((d, h, w), |(z, y, x)| {
        let (a, b, c) = (index(&zs, z), index(&ys, y), index(&xs, x));
        (1 + (a * ys.len() + b) * xs.len() + c) as u32
    });
    seg_targets::find_boundaries(labels.view(), &Default::default())
        .unwrap()
        .mapv(|b| if b { 1.0f32 } else { 0.0 })
        .insert_axis(ndarray::Axis(0))
}

/// 3-D blockwise segmentation (blocks of several slices, halos in z too, stitched across all six
/// faces) equals the 3-D watershed of the whole volume up to relabelling, for fixed and random
/// block shapes and halos (each halo at least the largest cell).
#[test]
fn blockwise_3d_segmentation_equals_the_whole_volume_segmentation() {
    use seg_pipeline::blockwise::{segment_zarr, SegmentOptions};
    use seg_targets::TargetSetting;
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
    let recipes = seg_pipeline::Recipes::default();
    let dir = tempfile::tempdir().unwrap();
    for case in 0..5 {
        let (d, h, w) = (24 + next(20), 30 + next(30), 30 + next(30));
        let map = cuboids(d, h, w, 3 + case);
        let array = prediction_zarr(
            &dir.path().join(format!("pred-{case}.zarr")),
            &map,
            [1, 8, 16, 16],
        );
        let mut o = SegmentOptions::default();
        (o.block, o.halo) = if case == 0 {
            (16, 16)
        } else {
            (8 + next(20), 16 + next(8))
        };
        o.block_z = Some(if case == 0 { 8 } else { 4 + next(12) });
        o.halo_z = 16 + next(8);
        let out = dir.path().join(format!("seg-{case}.zarr"));
        let s = segment_zarr(&array, TargetSetting::Cremi, &recipes, &out, &o).unwrap();
        let got = read_labels_all(&s.array)
            .into_dimensionality::<ndarray::Ix3>()
            .unwrap();
        let whole = watershed::watershed_from_boundaries(
            map.index_axis(ndarray::Axis(0), 0),
            None,
            &recipes.boundaries,
        )
        .unwrap();
        let objects: std::collections::HashSet<u32> = whole.iter().copied().collect();
        assert!(objects.len() > 20, "case {case}: {} objects", objects.len());
        let flat = |a: &Array3<u32>| {
            a.view()
                .into_shape_with_order(d * h * w)
                .unwrap()
                .to_owned()
        };
        assert!(
            same_partition(
                flat(&got).insert_axis(ndarray::Axis(0)).view(),
                flat(&whole).insert_axis(ndarray::Axis(0)).view()
            ),
            "case {case}: {d}×{h}×{w}, block {:?}×{}, halo {}×{}",
            o.block_z,
            o.block,
            o.halo_z,
            o.halo
        );
    }
    // 3-D is the CREMI boundary recipe only.
    let mut o = SegmentOptions::default();
    o.block_z = Some(4);
    let array = ZarrArray::create(
        &dir.path().join("two.zarr"),
        &[2, 4, 16, 16],
        &[2, 1, 16, 16],
        Element::F32,
        &["c", "z", "y", "x"],
    )
    .unwrap();
    let e = segment_zarr(
        &array,
        TargetSetting::LivecellBoundaries,
        &recipes,
        &dir.path().join("x.zarr"),
        &o,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("3-D segmentation is the CREMI boundary recipe"),
        "{e}"
    );
    let e = segment_zarr(
        &array,
        TargetSetting::Cremi,
        &recipes,
        &dir.path().join("y.zarr"),
        &o,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("this prediction has 2 channels"), "{e}");
}
