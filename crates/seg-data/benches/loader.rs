//! `cargo bench -p seg-data`: training-batch throughput of the CREMI pipeline (512×512 patches,
//! batch 2, boundary targets, flips, MinInstanceSampler) on synthetic EM volumes, with the
//! batch loader's worker threads against preparing the same batches on the consumer thread.

use std::sync::Arc;
use std::time::Instant;

use ndarray::{ArrayView2, Axis};
use seg_data::cremi::{read_cremi, CremiSplit};
use seg_data::sampling::{
    Augmentation, BatchLoader, ImageSource, LabelTransform, LoaderOptions, MinInstances,
    VolumeSlices,
};
use seg_data::synthetic::{write_cremi_like, EmVolumeOptions};
use seg_targets::{make_targets, TargetSetting};

fn main() {
    let dir = std::env::temp_dir().join(format!("seg-data-bench-{}", std::process::id()));
    let em = {
        let mut opts = EmVolumeOptions::default();
        opts.depth = 12;
        opts.height = 1024;
        opts.width = 1024;
        opts
    };
    let paths = write_cremi_like(&dir, &em, 1).expect("synthetic volumes");
    let volumes = paths
        .iter()
        .map(|p| read_cremi(p, CremiSplit::Train).expect("readable"))
        .collect();
    let source: Arc<dyn ImageSource> = Arc::new(VolumeSlices::new(volumes));
    let transform: LabelTransform = Arc::new(|ids: ArrayView2<u32>| {
        make_targets(ids, TargetSetting::Cremi).map_err(|e| seg_data::Error::Conversion {
            from: "labels",
            to: "targets",
            what: e.to_string(),
        })
    });
    let options = |workers| {
        let mut opts = LoaderOptions::default();
        opts.patch = (512, 512);
        opts.batch_size = 2;
        opts.seed = 1;
        opts.min_instances = Some(MinInstances::default());
        opts.augmentation = Augmentation::default();
        opts.shuffle = false;
        opts.workers = workers;
        opts
    };
    let batches = 24;
    let run = |workers: usize| {
        let start = Instant::now();
        let n = BatchLoader::epoch(source.clone(), transform.clone(), &options(workers), 0)
            .expect("loader")
            .take(batches)
            .map(|b| b.expect("batch").raw.len_of(Axis(0)))
            .sum::<usize>();
        (n, start.elapsed().as_secs_f64())
    };
    let (n1, t1) = run(1);
    let (n2, t2) = run(2);
    println!("CREMI batches (2 x 512x512, boundary targets, flips, min-instance rejection), {batches} batches, synthetic 1024x1024 slices");
    println!("machine: {}", seg_data::machine::describe());
    println!(
        "  1 worker : {:>7.1} batches/s  ({:.1} ms per batch, {n1} patches)",
        batches as f64 / t1,
        t1 * 1e3 / batches as f64
    );
    println!(
        "  2 workers: {:>7.1} batches/s  ({:.1} ms per batch, {n2} patches)  {:.2}x",
        batches as f64 / t2,
        t2 * 1e3 / batches as f64,
        t1 / t2
    );
    let _ = std::fs::remove_dir_all(dir);
}
