//! Blockwise prediction and segmentation of volumes of any size into OME-Zarr, in memory bounded
//! by the block, in one process or as numbered tasks on a cluster's scheduler.
//!
//! The volume (z, y, x) is cut into blocks of one slice × `block` × `block` (the 2-D models run
//! slice by slice). Each block reads its window (block + halo) from the source and writes its
//! centre as one whole chunk of the output, so no two blocks write the same chunk and no locking
//! is needed.
//!
//! A stage runs in three steps, all driven by the files in `OUT/blocks/`:
//! - plan ([`plan_predict`], [`plan_segment`]): writes `manifest.json` (the stage, its options and
//!   their hash, region, block, halo, the number of tasks) and creates the output arrays. A plan
//!   with other options is refused unless forced, which removes the old results.
//! - tasks ([`predict_task`], [`segment_task`]): task `i` of `N` runs the blocks
//!   `i·n/N .. (i+1)·n/N` and leaves a marker for each finished block; a block already marked is
//!   skipped, so reruns are idempotent. A block that fails leaves `INDEX.failed` with the error
//!   and the task goes on with its other blocks. A task refuses options whose hash differs from
//!   the plan's.
//! - finish ([`finish_predict`], [`finish_segment`]): refuses to run while blocks are missing and
//!   lists them (with the tasks to run again and the recorded failures); for segmentation it then
//!   gives each block its id offset and stitches the objects across block faces.
//!
//! [`predict_to_zarr`] and [`segment_zarr`] run the three steps in one process.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use seg_io::volume::{write_ome_zarr_group, Element, VolumeSource, ZarrArray, ZarrFormat};
use seg_train::predict::{check_tiles, predict_window, reflect_window_in, reflected_range};
use seg_train::{Predictor, TileOptions};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Options of [`predict_to_zarr`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct BlockwiseOptions {
    /// The block side (also the output chunk's), and the halo around it.
    pub block: usize,
    pub halo: usize,
    /// Standardise each window on its own (torch-em does).
    pub standardize: bool,
    pub progress: bool,
    /// Predict in training mode (fidelity checks only).
    pub train_mode: bool,
    /// Names the model in the manifest (a rerun with another model is refused).
    pub model: String,
    /// Write each output chunk (one block) as a shard of subchunks of this side (fewer reads
    /// for viewers; must divide the block); `None`: plain chunks.
    pub subchunk: Option<usize>,
    /// The output's format: Zarr v3 with OME-Zarr 0.5, or v2 with OME-Zarr 0.4.
    pub format: ZarrFormat,
}

impl Default for BlockwiseOptions {
    fn default() -> Self {
        BlockwiseOptions {
            block: 512,
            halo: 128,
            standardize: true,
            progress: false,
            train_mode: false,
            model: String::new(),
            subchunk: None,
            format: ZarrFormat::V3,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockwiseSummary {
    /// All blocks, and those found done before this run.
    pub blocks: usize,
    pub already_done: usize,
    pub seconds: f64,
    /// The output array (`OUT/0`).
    pub array: PathBuf,
}

/// Which share of a plan's blocks one process runs: task `index` of `count` runs the blocks
/// `index·n/count .. (index+1)·n/count` of the n blocks (contiguous, as even as can be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    pub index: usize,
    pub count: usize,
}

impl Task {
    /// All blocks in one process.
    pub const WHOLE: Task = Task { index: 0, count: 1 };

    /// The blocks of this task among `n`.
    pub fn blocks(&self, n: usize) -> Range<usize> {
        let count = self.count.max(1);
        self.index * n / count..(self.index + 1) * n / count
    }
}

/// The environment variables that name a task: Slurm array jobs, then Kubernetes Indexed Jobs.
pub const TASK_VARIABLES: [&str; 2] = ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"];

/// The task that `index` and `count` name for the plan in `out`: `index` `None` reads the first
/// of [`TASK_VARIABLES`] that is set (Slurm's array index, Kubernetes' completion index); the
/// number of tasks is the plan's, and a `count` given must equal it (so a resubmitted subset of
/// an array, e.g. `--array=3,5`, runs the same blocks as before).
///
/// # Errors
/// [`Error::Run`] when `out` holds no plan; [`Error::Option`] for an index outside the plan, a
/// count that differs from it, a Slurm array reaching past it, or no index given or set.
pub fn resolve_task(out: &Path, index: Option<usize>, count: Option<usize>) -> Result<Task> {
    let plan = Plan::read(out)?;
    let index = match index {
        Some(i) => i,
        None => {
            let (name, value) = TASK_VARIABLES
                .iter()
                .find_map(|&v| std::env::var(v).ok().map(|x| (v, x)))
                .ok_or_else(|| Error::Option {
                    option: "task".into(),
                    what: format!(
                        "no task index given and none of {} is set",
                        TASK_VARIABLES.join(", ")
                    ),
                })?;
            value.trim().parse().map_err(|_| Error::Option {
                option: name.into(),
                what: format!("{value:?} is not a task index"),
            })?
        }
    };
    if let Some(n) = count {
        if n != plan.tasks {
            return Err(Error::Option {
                option: "of".into(),
                what: format!(
                    "{n} tasks, but the plan in {} has {}; plan again to change it",
                    out.display(),
                    plan.tasks
                ),
            });
        }
    }
    if let Some(max) = std::env::var("SLURM_ARRAY_TASK_MAX")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        if max >= plan.tasks {
            return Err(Error::Option {
                option: "SLURM_ARRAY_TASK_MAX".into(),
                what: format!(
                    "the array reaches index {max}, but the plan in {} has {} tasks (0-{}); \
                     submit with --array=0-{}",
                    out.display(),
                    plan.tasks,
                    plan.tasks - 1,
                    plan.tasks - 1
                ),
            });
        }
    }
    if index >= plan.tasks {
        return Err(Error::Option {
            option: "task".into(),
            what: format!(
                "task {index}, but the plan in {} has {} tasks (0-{})",
                out.display(),
                plan.tasks,
                plan.tasks - 1
            ),
        });
    }
    Ok(Task {
        index,
        count: plan.tasks,
    })
}

/// A stage's plan, `OUT/blocks/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// `predict` or `segment`.
    pub stage: String,
    /// The SHA-256 (first 16 hex digits) of the stage, its options, region, block and halo.
    pub hash: String,
    pub tasks: usize,
    /// The region (z, y, x), the block side and the halo; `blocks` in all.
    pub shape: [usize; 3],
    pub block: usize,
    pub halo: usize,
    /// Slices per block (1: blocks of one slice).
    #[serde(default = "one")]
    pub block_z: usize,
    pub blocks: usize,
    /// The stage's options, as hashed.
    pub options: serde_json::Value,
}

impl Plan {
    /// The plan in the output folder `out`.
    ///
    /// # Errors
    /// [`Error::Run`] when there is none or it is damaged.
    pub fn read(out: &Path) -> Result<Plan> {
        let path = manifest_path(out);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Run {
            path: out.to_path_buf(),
            what: if e.kind() == std::io::ErrorKind::NotFound {
                "holds no blockwise plan (blocks/manifest.json): run the plan step first".into()
            } else {
                format!("{}: {e}", path.display())
            },
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Run {
            path: out.to_path_buf(),
            what: format!(
                "{} is damaged ({e}); plan again with force, or remove the folder",
                path.display()
            ),
        })
    }

    /// The block shape (z, y, x).
    pub fn grid(&self) -> [usize; 3] {
        [self.block_z.max(1), self.block, self.block]
    }

    /// The task that runs block `i`.
    pub fn task_of_block(&self, i: usize) -> usize {
        (0..self.tasks)
            .find(|&t| {
                Task {
                    index: t,
                    count: self.tasks,
                }
                .blocks(self.blocks)
                .contains(&i)
            })
            .unwrap_or(0)
    }
}

fn one() -> usize {
    1
}

/// Options of a plan step.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// The number of tasks the blocks are shared among.
    pub tasks: usize,
    /// Replace a plan of other options, removing its results.
    pub force: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            tasks: 1,
            force: false,
        }
    }
}

/// What one task did.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSummary {
    pub task: Task,
    /// The task's blocks, those found done before, those done now.
    pub blocks: Range<usize>,
    pub already_done: usize,
    pub done: usize,
    /// Blocks that failed, with their errors (also left as `blocks/INDEX.failed`).
    pub failed: Vec<(usize, String)>,
    pub seconds: f64,
}

/// A stage before it is planned: what its hash covers.
struct Stage {
    name: &'static str,
    shape: [usize; 3],
    block: usize,
    halo: usize,
    /// Slices per block (in the options' hash where it is not 1).
    block_z: usize,
    options: serde_json::Value,
    /// The output arrays a forced re-plan removes.
    outputs: &'static [&'static str],
}

impl Stage {
    fn hash(&self) -> String {
        use sha2::Digest;
        let text = serde_json::json!({
            "stage": self.name,
            "shape": self.shape,
            "block": self.block,
            "halo": self.halo,
            "options": self.options,
        })
        .to_string();
        let digest = sha2::Sha256::digest(text.as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    fn blocks(&self) -> Vec<Block> {
        blocks(self.shape, [self.block_z, self.block, self.block])
    }
}

fn manifest_path(out: &Path) -> PathBuf {
    out.join("blocks").join("manifest.json")
}

/// Writes the plan of `stage` for `opts.tasks` tasks, or keeps an equal one (updating its
/// number of tasks). Returns the plan and whether earlier results were removed or none existed.
fn write_plan(out: &Path, stage: &Stage, opts: &PlanOptions) -> Result<Plan> {
    if opts.tasks == 0 {
        return Err(Error::Option {
            option: "tasks".into(),
            what: "must be at least 1".into(),
        });
    }
    if stage.block == 0 {
        return Err(Error::Option {
            option: "block".into(),
            what: "must be positive".into(),
        });
    }
    let hash = stage.hash();
    let markers = out.join("blocks");
    if manifest_path(out).exists() {
        let old = Plan::read(out);
        let same = matches!(&old, Ok(p) if p.hash == hash && p.stage == stage.name);
        if !same {
            if !opts.force {
                let what = match old {
                    Ok(p) => format!(
                        "holds a blockwise {} run with other settings (hash {}, these give {hash}: \
                         {}); remove it, choose another output, or plan again with force",
                        p.stage, p.hash, p.options
                    ),
                    Err(e) => e.to_string(),
                };
                return Err(Error::Run {
                    path: out.to_path_buf(),
                    what,
                });
            }
            for name in std::iter::once("blocks").chain(stage.outputs.iter().copied()) {
                let path = out.join(name);
                if path.exists() {
                    std::fs::remove_dir_all(&path).map_err(file_error(&path))?;
                }
            }
        }
    }
    std::fs::create_dir_all(&markers).map_err(file_error(&markers))?;
    let plan = Plan {
        stage: stage.name.into(),
        hash,
        tasks: opts.tasks,
        shape: stage.shape,
        block: stage.block,
        halo: stage.halo,
        block_z: stage.block_z,
        blocks: stage.blocks().len(),
        options: stage.options.clone(),
    };
    if Plan::read(out).ok().as_ref() != Some(&plan) {
        let text = serde_json::to_string_pretty(&plan).unwrap_or_default();
        crate::picture::write_file(&manifest_path(out), text.as_bytes())?;
    }
    Ok(plan)
}

/// The plan in `out`, which must be of `stage` with its options.
fn check_plan(out: &Path, stage: &Stage) -> Result<Plan> {
    let plan = Plan::read(out)?;
    let hash = stage.hash();
    if plan.stage != stage.name || plan.hash != hash {
        return Err(Error::Run {
            path: out.to_path_buf(),
            what: format!(
                "was planned for a {} stage with other options (hash {}: {}); these options \
                 give {hash}: run the tasks with the plan's options, or plan again with force",
                plan.stage, plan.hash, plan.options
            ),
        });
    }
    Ok(plan)
}

/// Runs `work` on the blocks of `task` not yet marked done, one after another (a model's
/// forward pass is parallel inside), writing each block's marker (the bytes `work` returns)
/// after it; with `keep_going` a failing block leaves its error in `INDEX.failed` and the
/// others still run, otherwise the first error is returned.
fn run_blocks(
    out: &Path,
    plan: &Plan,
    task: Task,
    keep_going: bool,
    bar: &ProgressBar,
    marker: impl Fn(usize) -> PathBuf,
    mut work: impl FnMut(&Block) -> Result<Vec<u8>>,
) -> Result<TaskSummary> {
    let started = Instant::now();
    let (range, all) = task_blocks(out, plan, task)?;
    let outcomes = all
        .iter()
        .map(|b| run_block(out, b, keep_going, bar, &marker, &mut work))
        .collect::<Result<Vec<_>>>()?;
    Ok(summarize(task, range, outcomes, bar, started))
}

/// [`run_blocks`] with the blocks on rayon's threads: each writes only its own chunks and files.
fn run_blocks_parallel(
    out: &Path,
    plan: &Plan,
    task: Task,
    keep_going: bool,
    bar: &ProgressBar,
    marker: impl Fn(usize) -> PathBuf + Sync,
    work: impl Fn(&Block) -> Result<Vec<u8>> + Sync,
) -> Result<TaskSummary> {
    use rayon::prelude::*;
    let started = Instant::now();
    let (range, all) = task_blocks(out, plan, task)?;
    let outcomes = all
        .par_iter()
        .map(|b| run_block(out, b, keep_going, bar, &marker, &mut |b| work(b)))
        .collect::<Result<Vec<_>>>()?;
    Ok(summarize(task, range, outcomes, bar, started))
}

/// The blocks of `task` of `plan`, and their index range.
fn task_blocks(out: &Path, plan: &Plan, task: Task) -> Result<(Range<usize>, Vec<Block>)> {
    if task.count != plan.tasks || task.index >= plan.tasks {
        return Err(Error::Option {
            option: "task".into(),
            what: format!(
                "task {} of {}, but the plan in {} has {} tasks",
                task.index,
                task.count,
                out.display(),
                plan.tasks
            ),
        });
    }
    let all = blocks(plan.shape, plan.grid());
    let range = task.blocks(all.len());
    Ok((range.clone(), all[range].to_vec()))
}

/// What became of one block.
enum Outcome {
    Skipped,
    Done,
    Failed(usize, String),
}

fn run_block(
    out: &Path,
    b: &Block,
    keep_going: bool,
    bar: &ProgressBar,
    marker: &dyn Fn(usize) -> PathBuf,
    work: &mut dyn FnMut(&Block) -> Result<Vec<u8>>,
) -> Result<Outcome> {
    let failed = out.join("blocks").join(format!("{}.failed", b.index));
    if marker(b.index).exists() {
        bar.inc(1);
        return Ok(Outcome::Skipped);
    }
    let outcome = match work(b) {
        Ok(bytes) => {
            crate::picture::write_file(&marker(b.index), &bytes)?;
            let _ = std::fs::remove_file(&failed);
            Outcome::Done
        }
        Err(e) if keep_going => {
            let text = e.to_string();
            crate::picture::write_file(&failed, text.as_bytes())?;
            Outcome::Failed(b.index, text)
        }
        Err(e) => return Err(e),
    };
    bar.inc(1);
    Ok(outcome)
}

fn summarize(
    task: Task,
    range: Range<usize>,
    outcomes: Vec<Outcome>,
    bar: &ProgressBar,
    started: Instant,
) -> TaskSummary {
    let mut summary = TaskSummary {
        task,
        blocks: range,
        already_done: 0,
        done: 0,
        failed: Vec::new(),
        seconds: 0.0,
    };
    for o in outcomes {
        match o {
            Outcome::Skipped => summary.already_done += 1,
            Outcome::Done => summary.done += 1,
            Outcome::Failed(i, text) => summary.failed.push((i, text)),
        }
    }
    bar.finish_and_clear();
    summary.seconds = started.elapsed().as_secs_f64();
    summary
}

/// Refuses to finish while blocks are missing: names them, the tasks that run them and the
/// failures recorded.
fn check_complete(out: &Path, plan: &Plan, marker: impl Fn(usize) -> PathBuf) -> Result<()> {
    let missing: Vec<usize> = (0..plan.blocks).filter(|&i| !marker(i).exists()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut tasks: Vec<usize> = missing.iter().map(|&i| plan.task_of_block(i)).collect();
    tasks.dedup();
    let mut failures = String::new();
    for &i in &missing {
        let path = out.join("blocks").join(format!("{i}.failed"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            failures.push_str(&format!("\n  block {i} failed: {}", text.trim()));
        }
    }
    Err(Error::Run {
        path: out.to_path_buf(),
        what: format!(
            "{} of {} blocks are not done (blocks {}); run task(s) {} of {} again, then finish{failures}",
            missing.len(),
            plan.blocks,
            ranges(&missing),
            ranges(&tasks),
            plan.tasks
        ),
    })
}

/// Where a planned stage stands: blocks done, failed (with their errors) and not yet run.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub plan: Plan,
    pub done: usize,
    pub failed: Vec<(usize, String)>,
    /// Blocks neither done nor failed, and the tasks that still have blocks to run.
    pub pending: usize,
    pub open_tasks: Vec<usize>,
}

fn marker_of<'a>(out: &'a Path, stage: &str) -> Result<Box<dyn Fn(usize) -> PathBuf + 'a>> {
    match stage {
        "predict" => Ok(Box::new(predict_marker(out))),
        "segment" => Ok(Box::new(segment_marker(out))),
        other => Err(Error::Run {
            path: out.to_path_buf(),
            what: format!("holds a plan of an unknown stage {other:?}"),
        }),
    }
}

/// The progress of the stage planned in `out`, from its markers.
///
/// # Errors
/// [`Error::Run`] when `out` holds no plan or a damaged one.
pub fn progress(out: &Path) -> Result<Progress> {
    let plan = Plan::read(out)?;
    let marker = marker_of(out, &plan.stage)?;
    let mut p = Progress {
        done: 0,
        failed: Vec::new(),
        pending: 0,
        open_tasks: Vec::new(),
        plan: plan.clone(),
    };
    for i in 0..plan.blocks {
        if marker(i).exists() {
            p.done += 1;
            continue;
        }
        let failed = out.join("blocks").join(format!("{i}.failed"));
        match std::fs::read_to_string(&failed) {
            Ok(text) => p.failed.push((i, text.trim().to_string())),
            Err(_) => p.pending += 1,
        }
        let t = plan.task_of_block(i);
        if p.open_tasks.last() != Some(&t) {
            p.open_tasks.push(t);
        }
    }
    Ok(p)
}

/// The finish step of whichever stage `out` holds ([`finish_predict`] or [`finish_segment`]).
///
/// # Errors
/// As those.
pub fn finish(out: &Path) -> Result<BlockwiseSummary> {
    match Plan::read(out)?.stage.as_str() {
        "segment" => finish_segment(out),
        _ => finish_predict(out),
    }
}

/// `0, 3-5, 9` for [0, 3, 4, 5, 9] (sorted input), at most 12 runs then `…`.
fn ranges(v: &[usize]) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in v {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => runs.push((i, i)),
        }
    }
    let mut parts: Vec<String> = runs
        .iter()
        .take(12)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    if runs.len() > 12 {
        parts.push("…".into());
    }
    parts.join(", ")
}

/// One block: slice `z`, rows and columns starting at `y`, `x`.
#[derive(Debug, Clone, Copy)]
struct Block {
    index: usize,
    z: usize,
    y: usize,
    x: usize,
}

fn blocks(shape: [usize; 3], block: [usize; 3]) -> Vec<Block> {
    let mut v = Vec::new();
    for z in (0..shape[0]).step_by(block[0].max(1)) {
        for y in (0..shape[1]).step_by(block[1].max(1)) {
            for x in (0..shape[2]).step_by(block[2].max(1)) {
                v.push(Block {
                    index: v.len(),
                    z,
                    y,
                    x,
                });
            }
        }
    }
    v
}

fn file_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the array `out/name`, or checks that the one there has this shape and these chunks.
fn ensure_array(
    out: &Path,
    name: &str,
    shape: &[usize],
    chunks: &[usize],
    element: Element,
    axes: &[&str],
) -> Result<()> {
    let path = out.join(name);
    if !path.exists() {
        ZarrArray::create(&path, shape, chunks, element, axes)?;
        return Ok(());
    }
    check_array(out, name, shape, chunks)
}

/// How an output array is laid out.
struct Output {
    subchunk: Option<usize>,
    format: ZarrFormat,
}

impl Output {
    fn of(options: &serde_json::Value) -> Output {
        Output {
            subchunk: options["subchunk"].as_u64().map(|s| s as usize),
            format: match options["zarr_format"].as_u64() {
                Some(2) => ZarrFormat::V2,
                _ => ZarrFormat::V3,
            },
        }
    }
}

/// Creates `out/name` with `chunks` in `layout.format`, sharded into subchunks of side
/// `layout.subchunk` over the last two axes when given.
fn create_output(
    out: &Path,
    name: &str,
    shape: &[usize],
    chunks: &[usize],
    layout: &Output,
    element: Element,
    axes: &[&str],
) -> Result<ZarrArray> {
    let path = out.join(name);
    Ok(match layout.subchunk {
        None => ZarrArray::create_as(layout.format, &path, shape, chunks, element, axes)?,
        Some(s) => {
            let mut sub = chunks.to_vec();
            let n = sub.len();
            sub[n - 2] = s;
            sub[n - 1] = s;
            ZarrArray::create_sharded(&path, shape, chunks, &sub, element, axes)?
        }
    })
}

fn check_subchunk(subchunk: Option<usize>, block: usize, format: ZarrFormat) -> Result<()> {
    match subchunk {
        Some(s) if s == 0 || !block.is_multiple_of(s) => Err(Error::Option {
            option: "subchunk".into(),
            what: format!("{s} does not divide the block {block}"),
        }),
        Some(_) if format == ZarrFormat::V2 => Err(Error::Option {
            option: "subchunk".into(),
            what: "shards are a Zarr v3 feature; Zarr v2 outputs have plain chunks".into(),
        }),
        _ => Ok(()),
    }
}

/// Refuses an existing `out/name` of another shape or chunks.
fn check_array(out: &Path, name: &str, shape: &[usize], chunks: &[usize]) -> Result<()> {
    let path = out.join(name);
    let array = ZarrArray::open(&path)?;
    if array.shape() != shape || array.chunks() != chunks {
        return Err(Error::Run {
            path: out.to_path_buf(),
            what: format!(
                "its array `{name}` has shape {:?} and chunks {:?}, this run needs {shape:?} and \
                 {chunks:?}; remove it or choose another output",
                array.shape(),
                array.chunks()
            ),
        });
    }
    Ok(())
}

fn predict_stage(input: &dyn VolumeSource, opts: &BlockwiseOptions) -> Result<Stage> {
    let shape = input.shape();
    if shape.contains(&0) {
        return Err(Error::Input {
            path: PathBuf::from(input.describe()),
            what: format!("nothing to predict: shape {shape:?}"),
        });
    }
    Ok(Stage {
        name: "predict",
        shape,
        block: opts.block,
        halo: opts.halo,
        block_z: 1,
        options: serde_json::json!({
            "input": input.describe(),
            "standardize": opts.standardize,
            "train_mode": opts.train_mode,
            "model": opts.model,
            "subchunk": opts.subchunk,
            "zarr_format": opts.format.number(),
        }),
        outputs: &["0"],
    })
}

fn tile_options(opts: &BlockwiseOptions) -> TileOptions {
    let mut tile = TileOptions::default();
    tile.block = (opts.block, opts.block);
    tile.halo = (opts.halo, opts.halo);
    tile.standardize = opts.standardize;
    tile.train_mode = opts.train_mode;
    tile
}

/// Plans the blockwise prediction of `input` with `model` into the OME-Zarr group `out` (array
/// `0`: (c, z, y, x) f32, chunks (c, 1, block, block)) for `plan.tasks` tasks, and creates the
/// output array. An equal plan is kept with its finished blocks.
///
/// # Errors
/// [`Error::Run`] when `out` holds a plan with other options (unless forced) or an array of
/// another shape; [`Error::Option`] for block and halo that do not fit the volume or the model.
pub fn plan_predict(
    model: &dyn Predictor,
    input: &dyn VolumeSource,
    out: &Path,
    opts: &BlockwiseOptions,
    plan: &PlanOptions,
) -> Result<Plan> {
    let stage = predict_stage(input, opts)?;
    let [depth, h, w] = stage.shape;
    check_tiles(model, (h, w), &tile_options(opts))?;
    check_subchunk(opts.subchunk, opts.block, opts.format)?;
    let written = write_plan(out, &stage, plan)?;
    let c = model.out_channels();
    let (shape, chunks) = ([c, depth, h, w], [c, 1, opts.block, opts.block]);
    if out.join("0").exists() {
        check_array(out, "0", &shape, &chunks)?;
    } else {
        let axes = ["c", "z", "y", "x"];
        write_ome_zarr_group(out, &axes, "prediction", opts.format, false)?;
        create_output(
            out,
            "0",
            &shape,
            &chunks,
            &Output::of(&stage.options),
            Element::F32,
            &axes,
        )?;
    }
    Ok(written)
}

/// Runs task `task` of the prediction planned in `out` (see [`plan_predict`]; the options must
/// be the plan's). A block that fails is recorded and the task goes on.
///
/// # Errors
/// [`Error::Run`] for a missing plan or one of other options; write errors of markers.
pub fn predict_task(
    model: &dyn Predictor,
    input: &dyn VolumeSource,
    out: &Path,
    opts: &BlockwiseOptions,
    task: Task,
) -> Result<TaskSummary> {
    run_predict(model, input, out, opts, task, true)
}

fn run_predict(
    model: &dyn Predictor,
    input: &dyn VolumeSource,
    out: &Path,
    opts: &BlockwiseOptions,
    task: Task,
    keep_going: bool,
) -> Result<TaskSummary> {
    let stage = predict_stage(input, opts)?;
    let plan = check_plan(out, &stage)?;
    let [_, h, w] = plan.shape;
    let tile = tile_options(opts);
    let zarr = ZarrArray::open(&out.join("0"))?;
    let started = Instant::now();
    let mut voxels = 0usize;
    let bar = progress_bar(opts.progress, task.blocks(plan.blocks).len(), "predict");
    let marker = predict_marker(out);
    run_blocks(out, &plan, task, keep_going, &bar, marker, |b| {
        let (th, tw) = ((h - b.y).min(opts.block), (w - b.x).min(opts.block));
        let (y0, x0) = (
            b.y as isize - opts.halo as isize,
            b.x as isize - opts.halo as isize,
        );
        let (wh, ww) = (th + 2 * opts.halo, tw + 2 * opts.halo);
        let rows = reflected_range(y0, wh, h);
        let cols = reflected_range(x0, ww, w);
        let part = input.read_box(b.z..b.z + 1, rows.clone(), cols.clone())?;
        let window = reflect_window_in(
            part.index_axis(ndarray::Axis(0), 0),
            (rows.start, cols.start),
            (h, w),
            y0,
            x0,
            wh,
            ww,
        );
        let pred = predict_window(model, window, &tile)?;
        let centre = pred
            .slice(ndarray::s![
                ..,
                opts.halo..opts.halo + th,
                opts.halo..opts.halo + tw
            ])
            .to_owned()
            .insert_axis(ndarray::Axis(1))
            .into_dyn();
        if centre.shape()[0] != zarr.shape()[0] {
            return Err(Error::Run {
                path: out.to_path_buf(),
                what: format!(
                    "the model gives {} channels, the planned array holds {}",
                    centre.shape()[0],
                    zarr.shape()[0]
                ),
            });
        }
        zarr.write_f32(&[0, b.z, b.y, b.x], &centre)?;
        voxels += th * tw;
        let rate = voxels as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{rate:.0}"));
        Ok(Vec::new())
    })
}

/// The finish step of a prediction: checks that every block is done.
///
/// # Errors
/// [`Error::Run`] when `out` holds no prediction plan, or listing the blocks not done, the tasks
/// to run again and the failures recorded.
pub fn finish_predict(out: &Path) -> Result<BlockwiseSummary> {
    let plan = Plan::read(out)?;
    if plan.stage != "predict" {
        return Err(Error::Run {
            path: out.to_path_buf(),
            what: format!("holds a {} plan, not a prediction", plan.stage),
        });
    }
    check_complete(out, &plan, predict_marker(out))?;
    Ok(BlockwiseSummary {
        blocks: plan.blocks,
        already_done: plan.blocks,
        seconds: 0.0,
        array: out.join("0"),
    })
}

/// Predicts `input` with `model` block by block into the OME-Zarr group `out` in this process
/// (plan, all blocks, finish), resuming a run interrupted there. Each block is predicted exactly
/// as [`seg_train::predict_tiled`] predicts the same tile (same window, same per-window
/// standardisation), so the result equals the in-memory tiled prediction bit for bit.
///
/// # Errors
/// As [`plan_predict`]; the first block's read, prediction or write error.
pub fn predict_to_zarr(
    model: &dyn Predictor,
    input: &dyn VolumeSource,
    out: &Path,
    opts: &BlockwiseOptions,
) -> Result<BlockwiseSummary> {
    let started = Instant::now();
    let plan = plan_predict(model, input, out, opts, &whole_plan(out))?;
    let mut already_done = 0;
    for index in 0..plan.tasks {
        let task = Task {
            index,
            count: plan.tasks,
        };
        already_done += run_predict(model, input, out, opts, task, false)?.already_done;
    }
    finish_predict(out)?;
    Ok(BlockwiseSummary {
        blocks: plan.blocks,
        already_done,
        seconds: started.elapsed().as_secs_f64(),
        array: out.join("0"),
    })
}

/// A one-process run keeps the plan's number of tasks and runs them all.
fn whole_plan(out: &Path) -> PlanOptions {
    let mut p = PlanOptions::default();
    if let Ok(plan) = Plan::read(out) {
        p.tasks = plan.tasks;
    }
    p
}

/// Options of [`segment_zarr`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentOptions {
    /// The block side (also the output chunk's), and the halo around it. Defaults 1024 and 64:
    /// each window floods at most 1.27× its block's area (512 with 128 would flood 2.25×).
    pub block: usize,
    pub halo: usize,
    pub progress: bool,
    /// Write each chunk of the labels (one block) as a shard of subchunks of this side (must
    /// divide the block); `None`: plain chunks.
    pub subchunk: Option<usize>,
    /// The labels' element type.
    pub labels: LabelWidth,
    /// 3-D: blocks of this many slices (with `halo_z` slices around), segmented with the 3-D
    /// seeded watershed (CREMI's boundary setting) and stitched across all six faces. `None`:
    /// slice by slice in 2-D, as the paper scores CREMI.
    pub block_z: Option<usize>,
    pub halo_z: usize,
    /// The output's format: Zarr v3 with OME-Zarr 0.5, or v2 with OME-Zarr 0.4.
    pub format: ZarrFormat,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            block: 1024,
            halo: 64,
            progress: false,
            subchunk: None,
            labels: LabelWidth::Auto,
            block_z: None,
            halo_z: 0,
            format: ZarrFormat::V3,
        }
    }
}

/// The element type of a segmentation's labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelWidth {
    /// u32, or u64 when the volume holds more objects than u32 ids can name.
    Auto,
    /// Always u64 (as CREMI's ground truth stores its ids).
    U64,
}

/// Union-find over global object ids.
struct Merges(std::collections::HashMap<u64, u64>);

impl Merges {
    fn root(&mut self, a: u64) -> u64 {
        let mut r = a;
        while let Some(&p) = self.0.get(&r) {
            if p == r {
                break;
            }
            r = p;
        }
        // Path compression.
        let mut x = a;
        while x != r {
            let next = self.0.get(&x).copied().unwrap_or(r);
            self.0.insert(x, r);
            x = next;
        }
        r
    }

    fn union(&mut self, a: u64, b: u64) {
        let (ra, rb) = (self.root(a), self.root(b));
        if ra != rb {
            let (lo, hi) = (ra.min(rb), ra.max(rb));
            self.0.insert(hi, lo);
        }
    }
}

/// The first bytes of a window file (format 2: the halo only).
const WINDOW_MAGIC: &[u8; 8] = b"VSWIN002";

/// A block's window segmentation kept for the stitching: its origin (z, y, x), its shape, the
/// box of the block's core inside it, and the labels outside the core (the halo, in raster
/// order), which is all the stitching reads; the core is in `local`.
fn write_window(
    path: &Path,
    origin: [usize; 3],
    labels: &ndarray::Array3<u32>,
    core: [Range<usize>; 3],
) -> Result<()> {
    let (d, h, w) = labels.dim();
    let head = [
        origin[0],
        origin[1],
        origin[2],
        d,
        h,
        w,
        core[0].start,
        core[0].end,
        core[1].start,
        core[1].end,
        core[2].start,
        core[2].end,
    ];
    let halo = d * h * w - core.iter().map(|r| r.len()).product::<usize>();
    let mut bytes = vec![0u8; 8 + 8 * head.len() + 4 * halo];
    let (magic, rest) = bytes.split_at_mut(8);
    magic.copy_from_slice(WINDOW_MAGIC);
    let (top, body) = rest.split_at_mut(8 * head.len());
    for (dst, v) in top.chunks_exact_mut(8).zip(head) {
        dst.copy_from_slice(&(v as u64).to_le_bytes());
    }
    let mut out = body.chunks_exact_mut(4);
    for ((z, y, x), v) in labels.indexed_iter() {
        if !(core[0].contains(&z) && core[1].contains(&y) && core[2].contains(&x)) {
            if let Some(dst) = out.next() {
                dst.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    crate::picture::write_file(path, &bytes)
}

/// A window written by [`write_window`]: its origin and labels (0 in the core).
type Window = ([usize; 3], ndarray::Array3<u32>);

fn read_window(path: &Path) -> Result<Window> {
    let bytes = std::fs::read(path).map_err(file_error(path))?;
    let bad = || Error::Input {
        path: path.to_path_buf(),
        what: "a block's window file is damaged or of an older version; remove its marker and \
               run its task again"
            .into(),
    };
    if bytes.get(..8) != Some(&WINDOW_MAGIC[..]) {
        return Err(bad());
    }
    let word = |i: usize| -> Option<usize> {
        Some(u64::from_le_bytes(bytes.get(8 + 8 * i..16 + 8 * i)?.try_into().ok()?) as usize)
    };
    let mut head = [0usize; 12];
    for (i, v) in head.iter_mut().enumerate() {
        *v = word(i).ok_or_else(bad)?;
    }
    let [z0, y0, x0, d, h, w, cz0, cz1, cy0, cy1, cx0, cx1] = head;
    let core = [cz0..cz1, cy0..cy1, cx0..cx1];
    let n = d
        .checked_mul(h)
        .and_then(|n| n.checked_mul(w))
        .ok_or_else(bad)?;
    if core
        .iter()
        .zip([d, h, w])
        .any(|(r, m)| r.start > r.end || r.end > m)
    {
        return Err(bad());
    }
    let halo = n - core.iter().map(|r| r.len()).product::<usize>();
    let body = bytes.get(8 + 8 * head.len()..).ok_or_else(bad)?;
    if body.len() != halo.checked_mul(4).ok_or_else(bad)? {
        return Err(bad());
    }
    let mut values = body
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let mut labels = ndarray::Array3::zeros((d, h, w));
    for ((z, y, x), v) in labels.indexed_iter_mut() {
        if !(core[0].contains(&z) && core[1].contains(&y) && core[2].contains(&x)) {
            *v = values.next().ok_or_else(bad)?;
        }
    }
    Ok(([z0, y0, x0], labels))
}

fn segment_stage(
    pred: &ZarrArray,
    setting: seg_targets::TargetSetting,
    recipes: &crate::Recipes,
    opts: &SegmentOptions,
) -> Result<Stage> {
    let shape = pred.shape();
    let [c, depth, h, w] = shape[..] else {
        return Err(Error::Input {
            path: pred.path().to_path_buf(),
            what: format!("a prediction is (c, z, y, x); this array has shape {shape:?}"),
        });
    };
    if let Some(bz) = opts.block_z {
        if bz == 0 {
            return Err(Error::Option {
                option: "block_z".into(),
                what: "must be positive".into(),
            });
        }
        if setting != seg_targets::TargetSetting::Cremi {
            return Err(Error::Option {
                option: "block_z".into(),
                what: format!(
                    "3-D segmentation is the CREMI boundary recipe; {setting} is segmented per \
                     slice"
                ),
            });
        }
        if c != 1 {
            return Err(Error::Input {
                path: pred.path().to_path_buf(),
                what: format!(
                    "3-D segmentation floods one boundary map; this prediction has {c} channels"
                ),
            });
        }
    }
    let mut options = serde_json::json!({
        "prediction": pred.path().display().to_string(),
        "channels": c,
        "setting": setting.to_string(),
        "recipes": format!("{recipes:?}"),
        "subchunk": opts.subchunk,
        "zarr_format": opts.format.number(),
        "labels": format!("{:?}", opts.labels),
    });
    if let Some(bz) = opts.block_z {
        options["three_d"] = serde_json::json!({"block_z": bz, "halo_z": opts.halo_z});
    }
    Ok(Stage {
        name: "segment",
        shape: [depth, h, w],
        block: opts.block,
        halo: opts.halo,
        block_z: opts.block_z.unwrap_or(1),
        options,
        outputs: &["local", "0"],
    })
}

fn predict_marker(out: &Path) -> impl Fn(usize) -> PathBuf + '_ {
    move |i| out.join("blocks").join(i.to_string())
}

fn segment_marker(out: &Path) -> impl Fn(usize) -> PathBuf + '_ {
    move |i| out.join("blocks").join(format!("{i}.max"))
}

fn window_file(out: &Path, i: usize) -> PathBuf {
    out.join("blocks").join(format!("{i}.window"))
}

/// Plans the blockwise segmentation of the prediction array `pred` (c, z, y, x) into the
/// OME-Zarr group `out` for `plan.tasks` tasks (see [`segment_zarr`]), and creates the array of
/// block-local labels `out/local`.
///
/// # Errors
/// [`Error::Run`] for an output holding a plan of other options (unless forced) or arrays of
/// other shapes; [`Error::Input`] for a prediction that is not (c, z, y, x).
pub fn plan_segment(
    pred: &ZarrArray,
    setting: seg_targets::TargetSetting,
    recipes: &crate::Recipes,
    out: &Path,
    opts: &SegmentOptions,
    plan: &PlanOptions,
) -> Result<Plan> {
    check_subchunk(opts.subchunk, opts.block, opts.format)?;
    let stage = segment_stage(pred, setting, recipes, opts)?;
    let written = write_plan(out, &stage, plan)?;
    ensure_array(
        out,
        "local",
        &stage.shape,
        &[stage.block_z, opts.block, opts.block],
        Element::U32,
        &["z", "y", "x"],
    )?;
    Ok(written)
}

/// Runs task `task` of the segmentation planned in `out` (see [`plan_segment`]; the options must
/// be the plan's). A block that fails is recorded and the task goes on.
///
/// # Errors
/// [`Error::Run`] for a missing plan or one of other options; write errors of markers.
pub fn segment_task(
    pred: &ZarrArray,
    setting: seg_targets::TargetSetting,
    recipes: &crate::Recipes,
    out: &Path,
    opts: &SegmentOptions,
    task: Task,
) -> Result<TaskSummary> {
    run_segment(pred, setting, recipes, out, opts, task, true)
}

fn run_segment(
    pred: &ZarrArray,
    setting: seg_targets::TargetSetting,
    recipes: &crate::Recipes,
    out: &Path,
    opts: &SegmentOptions,
    task: Task,
    keep_going: bool,
) -> Result<TaskSummary> {
    let stage = segment_stage(pred, setting, recipes, opts)?;
    let plan = check_plan(out, &stage)?;
    let c = pred.shape()[0];
    let [depth, h, w] = plan.shape;
    let three_d = opts.block_z.is_some();
    let (bz, hz) = (plan.grid()[0], if three_d { opts.halo_z } else { 0 });
    let local = ZarrArray::open(&out.join("local"))?;
    let bar = progress_bar(opts.progress, task.blocks(plan.blocks).len(), "segment");
    run_blocks_parallel(
        out,
        &plan,
        task,
        keep_going,
        &bar,
        segment_marker(out),
        |b| {
            let (tz, th, tw) = (
                (depth - b.z).min(bz),
                (h - b.y).min(opts.block),
                (w - b.x).min(opts.block),
            );
            let zs = b.z.saturating_sub(hz)..(b.z + tz + hz).min(depth);
            let rows = b.y.saturating_sub(opts.halo)..(b.y + th + opts.halo).min(h);
            let cols = b.x.saturating_sub(opts.halo)..(b.x + tw + opts.halo).min(w);
            let window = pred
                .read_f32(&[0..c, zs.clone(), rows.clone(), cols.clone()])?
                .into_shape_with_order((c, zs.len(), rows.len(), cols.len()))
                .map_err(|e| Error::Input {
                    path: pred.path().to_path_buf(),
                    what: e.to_string(),
                })?;
            let labels = if three_d {
                watershed::watershed_from_boundaries(
                    window.index_axis(ndarray::Axis(0), 0),
                    None,
                    &recipes.boundaries,
                )?
            } else {
                crate::segment(window.index_axis(ndarray::Axis(1), 0), setting, recipes)?
                    .insert_axis(ndarray::Axis(0))
            };
            let (cz, cy, cx) = (b.z - zs.start, b.y - rows.start, b.x - cols.start);
            let core = labels.slice(ndarray::s![cz..cz + tz, cy..cy + th, cx..cx + tw]);
            // Block-local ids 1..=n in order of first appearance in the core (a table over the
            // window's ids, which count its seeds); ids only in the halo become 0.
            let top = labels.iter().copied().max().unwrap_or(0) as usize;
            let mut ids = vec![0u32; top + 1];
            let mut n = 0u32;
            let core = core.mapv(|v| {
                let id = &mut ids[v as usize];
                if v != 0 && *id == 0 {
                    n += 1;
                    *id = n;
                }
                *id
            });
            let window_labels = labels.mapv(|v| ids[v as usize]);
            local.write(&[b.z, b.y, b.x], &core.into_dyn())?;
            write_window(
                &window_file(out, b.index),
                [zs.start, rows.start, cols.start],
                &window_labels,
                [cz..cz + tz, cy..cy + th, cx..cx + tw],
            )?;
            Ok(n.to_string().into_bytes())
        },
    )
}

/// The finish step of a segmentation: after every block is done, gives each block an id offset
/// (the sum of the ids before it), merges the objects that the overlaps decide are one (see
/// [`segment_zarr`]) with a union-find, and writes consecutive ids into `out/0`: u32, or u64
/// when asked for ([`LabelWidth::U64`]) or when there are more objects than u32 ids name. It
/// reads only the block results, so it can be rerun whole.
///
/// # Errors
/// [`Error::Run`] when `out` holds no segmentation plan, listing the blocks not done, the tasks
/// to run again and the failures recorded; read and write errors.
pub fn finish_segment(out: &Path) -> Result<BlockwiseSummary> {
    use rayon::prelude::*;
    let started = Instant::now();
    let plan = Plan::read(out)?;
    if plan.stage != "segment" {
        return Err(Error::Run {
            path: out.to_path_buf(),
            what: format!("holds a {} plan, not a segmentation", plan.stage),
        });
    }
    let marker = segment_marker(out);
    check_complete(out, &plan, &marker)?;
    let [depth, h, w] = plan.shape;
    let block = plan.block;
    let grid = plan.grid();
    let all = blocks(plan.shape, grid);
    let three_d = plan.options.get("three_d").is_some();
    let local = ZarrArray::open(&out.join("local"))?;
    let mut offsets = Vec::with_capacity(all.len());
    let mut total: u64 = 0;
    for b in &all {
        offsets.push(total);
        let path = marker(b.index);
        let text = std::fs::read_to_string(&path).map_err(file_error(&path))?;
        total += text.trim().parse::<u64>().map_err(|_| Error::Input {
            path: path.clone(),
            what: "a block marker is damaged; remove it and run its task again".into(),
        })?;
    }
    // Neighbours across the x, y and (in 3-D) z faces; 2-D slices are never joined in z.
    let (nz, ny, nx) = (
        depth.div_ceil(grid[0]),
        h.div_ceil(grid[1]),
        w.div_ceil(grid[2]),
    );
    // Each block's window is read once and matched against all its neighbours' centres (both
    // directions of every face are covered, as each side matches its own window), in parallel.
    let pairs = all
        .par_iter()
        .map(|b| -> Result<Vec<(u64, u64)>> {
            let (iz, iy, ix) = (b.index / (ny * nx), b.index / nx % ny, b.index % nx);
            let neighbours = [
                (ix + 1 < nx).then(|| b.index + 1),
                (ix > 0).then(|| b.index - 1),
                (iy + 1 < ny).then(|| b.index + nx),
                (iy > 0).then(|| b.index - nx),
                (three_d && iz + 1 < nz).then(|| b.index + nx * ny),
                (three_d && iz > 0).then(|| b.index - nx * ny),
            ];
            let window = read_window(&window_file(out, b.index))?;
            let mut pairs = Vec::new();
            for n in neighbours.into_iter().flatten() {
                for (a, bb) in matches(&window, &all[n], &local, grid)? {
                    pairs.push((offsets[b.index] + a, offsets[n] + bb));
                }
            }
            Ok(pairs)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut merges = Merges(std::collections::HashMap::new());
    for (a, b) in pairs.into_iter().flatten() {
        merges.union(a, b);
    }
    // Consecutive final ids, in order of the roots.
    let roots: Vec<u64> = (0..=total).map(|g| merges.root(g)).collect();
    let mut distinct: Vec<u64> = roots[1..].to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let wide = plan.options["labels"].as_str() == Some("U64") || distinct.len() > u32::MAX as usize;
    let rank: std::collections::HashMap<u64, u64> = distinct
        .iter()
        .enumerate()
        .map(|(i, &r)| (r, i as u64 + 1))
        .collect();
    let final_id: Vec<u64> = roots
        .iter()
        .enumerate()
        .map(|(g, r)| if g == 0 { 0 } else { rank[r] })
        .collect();
    let array_path = out.join("0");
    let layout = Output::of(&plan.options);
    write_ome_zarr_group(out, &["z", "y", "x"], "segmentation", layout.format, true)?;
    let labels = create_output(
        out,
        "0",
        &[depth, h, w],
        &grid,
        &layout,
        if wide { Element::U64 } else { Element::U32 },
        &["z", "y", "x"],
    )?;
    all.par_iter().try_for_each(|b| -> Result<()> {
        let (tz, th, tw) = (
            (depth - b.z).min(grid[0]),
            (h - b.y).min(block),
            (w - b.x).min(block),
        );
        let core = local.read_labels(&[b.z..b.z + tz, b.y..b.y + th, b.x..b.x + tw])?;
        // A block's local ids run from 1 to its marker's count; a larger one means a damaged
        // chunk of `local`.
        let count = offsets.get(b.index + 1).copied().unwrap_or(total) - offsets[b.index];
        if let Some(v) = core.iter().find(|&&v| u64::from(v) > count) {
            return Err(Error::Input {
                path: out.join("local"),
                what: format!(
                    "block {} holds id {v} but its marker counts {count} objects: the block's \
                     results are damaged; remove blocks/{}.max and run its task again",
                    b.index, b.index
                ),
            });
        }
        let relabelled = core.mapv(|v| {
            if v == 0 {
                0
            } else {
                final_id[(offsets[b.index] + u64::from(v)) as usize]
            }
        });
        if wide {
            labels.write(&[b.z, b.y, b.x], &relabelled)?;
        } else {
            // Every id fits: there are at most u32::MAX of them.
            labels.write(&[b.z, b.y, b.x], &relabelled.mapv(|v| v as u32))?;
        }
        Ok(())
    })?;
    Ok(BlockwiseSummary {
        blocks: all.len(),
        already_done: all.len(),
        seconds: started.elapsed().as_secs_f64(),
        array: array_path,
    })
}

/// Segments the prediction array `pred` (c, z, y, x), slice by slice as the paper scores CREMI,
/// block by block into the OME-Zarr group `out` (array `0`: u32 labels (z, y, x), one chunk per
/// block), with object ids consistent across block borders, in this process (plan, all blocks,
/// finish).
///
/// Each block segments its window (block + halo, cut at the volume's border) with the setting's
/// recipe and keeps its centre with block-local ids; the window's labels are kept for the
/// stitching. The finish step gives each block an id offset (the sum of the ids before it),
/// merges the objects that the overlaps decide are one (see below) with a union-find, and
/// writes consecutive ids. Overlap rule, for two neighbouring blocks A and B: in the part of A's
/// halo that is B's centre, an object b of B and the object a of A's window that covers most of
/// b there are one object when a covers more than half of b's pixels there and b more than half
/// of a's; both directions are checked. Objects that, with their seeds, fit inside a block plus
/// halo get the same pixels as the whole-slice segmentation (tested, up to relabelling).
///
/// Resumable: the per-block stage leaves markers in `out/blocks/`; the finish step reruns
/// whole (it only reads the block results).
///
/// # Errors
/// [`Error::Run`] for an output holding other settings, [`Error::Option`] for a prediction
/// whose channels do not fit the setting; read, segmentation and write errors.
pub fn segment_zarr(
    pred: &ZarrArray,
    setting: seg_targets::TargetSetting,
    recipes: &crate::Recipes,
    out: &Path,
    opts: &SegmentOptions,
) -> Result<BlockwiseSummary> {
    let started = Instant::now();
    let plan = plan_segment(pred, setting, recipes, out, opts, &whole_plan(out))?;
    let mut already_done = 0;
    for index in 0..plan.tasks {
        let task = Task {
            index,
            count: plan.tasks,
        };
        already_done += run_segment(pred, setting, recipes, out, opts, task, false)?.already_done;
    }
    let s = finish_segment(out)?;
    Ok(BlockwiseSummary {
        blocks: plan.blocks,
        already_done,
        seconds: started.elapsed().as_secs_f64(),
        array: s.array,
    })
}

/// Pairs (id in `from`'s window, id in `to`'s centre) that the overlap rule makes one object,
/// from the part of `from`'s window that is `to`'s centre.
fn matches(
    from: &Window,
    to: &Block,
    local: &ZarrArray,
    grid: [usize; 3],
) -> Result<Vec<(u64, u64)>> {
    let ([wz, wy, wx], window) = from;
    let (wd, wh, ww) = window.dim();
    let shape = local.shape();
    let (d, h, w) = (shape[0], shape[1], shape[2]);
    let (tz, th, tw) = (
        (d - to.z).min(grid[0]),
        (h - to.y).min(grid[1]),
        (w - to.x).min(grid[2]),
    );
    let zs = (*wz).max(to.z)..(wz + wd).min(to.z + tz);
    let rows = (*wy).max(to.y)..(wy + wh).min(to.y + th);
    let cols = (*wx).max(to.x)..(wx + ww).min(to.x + tw);
    if zs.is_empty() || rows.is_empty() || cols.is_empty() {
        return Ok(Vec::new());
    }
    let theirs = local.read_labels(&[zs.clone(), rows.clone(), cols.clone()])?;
    // Both sides hold block-local ids 1..=n: sizes in tables, pair counts by runs of equal
    // pairs (neighbouring pixels mostly share both ids).
    let mine = window.slice(ndarray::s![
        zs.start - wz..zs.end - wz,
        rows.start - wy..rows.end - wy,
        cols.start - wx..cols.end - wx
    ]);
    let table = |top: Option<u32>| vec![0usize; top.unwrap_or(0) as usize + 1];
    let mut size_a = table(mine.iter().copied().max());
    let mut size_b = table(theirs.iter().copied().max());
    let mut pairs: std::collections::HashMap<(u32, u32), usize> = Default::default();
    let mut run = ((0u32, 0u32), 0usize);
    for (&a, &b) in mine.iter().zip(theirs.iter()) {
        size_a[a as usize] += 1;
        size_b[b as usize] += 1;
        if a != 0 && b != 0 {
            if run.0 == (a, b) {
                run.1 += 1;
            } else {
                if run.1 > 0 {
                    *pairs.entry(run.0).or_default() += run.1;
                }
                run = ((a, b), 1);
            }
        }
    }
    if run.1 > 0 {
        *pairs.entry(run.0).or_default() += run.1;
    }
    Ok(pairs
        .into_iter()
        .filter(|&((a, b), n)| 2 * n > size_a[a as usize] && 2 * n > size_b[b as usize])
        .map(|((a, b), _)| (u64::from(a), u64::from(b)))
        .collect())
}

fn progress_bar(show: bool, len: usize, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "  {what} {{bar:30}} {{pos}}/{{len}} blocks {{elapsed}} ({{msg}} voxels/s)"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// A segmentation volume scored against its ground truth: per slice (as the paper scores
/// CREMI) and as one 3-D volume.
#[derive(Debug, Clone)]
pub struct VolumeScores {
    pub slices: Vec<msa_eval::SegmentationAccuracy>,
    pub volume: msa_eval::SegmentationAccuracy,
    /// Sorted runs of 3-D overlap pairs written to disk because they did not fit in
    /// [`EvaluateOptions::pairs_in_memory`] (0 when the table fit).
    pub pair_runs: usize,
}

/// Options of [`evaluate_zarr`].
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    /// Side of the boxes read at once: one slice × `block` × `block` of each array.
    pub block: usize,
    /// Thresholds and ignore label.
    pub msa: msa_eval::MsaOptions,
    /// Overlap pairs of the 3-D score held in memory per sort (32 bytes each: 16 MiB by
    /// default); past it they are sorted into run files and merged when the volume is read.
    pub pairs_in_memory: usize,
    /// Folder of those run files (removed afterwards); `None`: the system's temporary folder
    /// (`TMPDIR`).
    pub temp_dir: Option<PathBuf>,
}

impl Default for EvaluateOptions {
    fn default() -> Self {
        EvaluateOptions {
            block: 1024,
            msa: msa_eval::MsaOptions::default(),
            pairs_in_memory: 1 << 19,
            temp_dir: None,
        }
    }
}

/// Scores `seg` against `gt` ((z, y, x) or (y, x) label arrays of the same shape), reading
/// boxes of one slice × `block` × `block`: neither volume is held, and memory is bounded by
/// the block, one slice's overlap table and [`EvaluateOptions::pairs_in_memory`], whatever the
/// depth and the number of objects. Per slice the mSA of that slice's objects; for the volume
/// the mSA of the 3-D objects.
///
/// The 3-D score is computed in three passes over the volume's overlap pairs: the pairs,
/// summed over slices, sorted by segment (giving each segment's size), then sorted by
/// ground-truth object (giving its size, and so each pair's IoU), then tallied with
/// [`msa_eval::PairTally`]. Each sort stays in memory when the pairs fit and goes through
/// sorted run files otherwise.
///
/// # Errors
/// [`Error::Input`] for shapes that differ or are not volumes; read errors (ids above 2³²
/// are refused); [`Error::File`] for the run files; [`msa_eval::Error`] for bad options.
pub fn evaluate_zarr(
    seg: &ZarrArray,
    gt: &ZarrArray,
    options: &EvaluateOptions,
) -> Result<VolumeScores> {
    use std::collections::HashMap;
    let (s, g) = (seg.shape(), gt.shape());
    let volume_shape = |shape: &[usize]| match *shape {
        [y, x] => Some((1, y, x)),
        [z, y, x] => Some((z, y, x)),
        _ => None,
    };
    let (Some((depth, h, w)), true) = (volume_shape(&s), s == g) else {
        return Err(Error::Input {
            path: seg.path().to_path_buf(),
            what: format!(
                "a segmentation of shape {s:?} against ground truth {} of shape {g:?}: expected \
                 two (z, y, x) or (y, x) label arrays of the same shape",
                gt.path().display()
            ),
        });
    };
    // Checked before any slice is read.
    let mut tally = msa_eval::PairTally::new(&options.msa)?;
    let block = options.block.max(1);
    let read = |a: &ZarrArray, z: usize, y: std::ops::Range<usize>, x: std::ops::Range<usize>| {
        if a.shape().len() == 2 {
            a.read_labels(&[y, x])
        } else {
            a.read_labels(&[z..z + 1, y, x])
        }
    };
    let temp = options.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    // Pass 1: (segment, gt, overlap) summed over the slices.
    let mut by_seg = crate::pair_table::PairTable::new(options.pairs_in_memory, &temp);
    let mut slices = Vec::with_capacity(depth);
    for z in 0..depth {
        let mut slice: HashMap<(u64, u64), u64> = HashMap::new();
        for y in (0..h).step_by(block) {
            for x in (0..w).step_by(block) {
                let (ys, xs) = (y..(y + block).min(h), x..(x + block).min(w));
                let a = read(seg, z, ys.clone(), xs.clone())?;
                let b = read(gt, z, ys, xs)?;
                let table = msa_eval::Overlap::new(a.view(), b.view())?;
                for (p, g, n) in table.counts() {
                    *slice.entry((p, g)).or_default() += n;
                }
            }
        }
        let table = msa_eval::Overlap::from_counts(
            slice.into_iter().map(|((p, g), n)| (p, g, n)).collect(),
        )?;
        for (p, g, n) in table.counts() {
            by_seg.push([p, g, n, 0])?;
        }
        slices.push(msa_eval::mean_segmentation_accuracy_of(
            &table,
            &options.msa,
        )?);
    }
    let ignore = options.msa.ignore_label;
    // Pass 2: each segment's size, carried into a table sorted by ground-truth object.
    let mut by_gt = crate::pair_table::PairTable::new(options.pairs_in_memory, &temp);
    let mut n_pred = 0usize;
    by_seg.for_each_with_group_total(|[p, g, n, _], size, first| {
        n_pred += usize::from(first && Some(p) != ignore);
        by_gt.push([g, p, n, size])
    })?;
    let mut pair_runs = by_seg.runs_written();
    drop(by_seg);
    // Pass 3: each ground-truth object's size, so each pair's IoU, tallied.
    let mut n_true = 0usize;
    by_gt.for_each_with_group_total(|[g, p, n, pred_size], gt_size, first| {
        n_true += usize::from(first && Some(g) != ignore);
        tally.add(msa_eval::SizedPair {
            pred: p,
            gt: g,
            overlap: n,
            pred_size,
            gt_size,
        });
        Ok(())
    })?;
    pair_runs += by_gt.runs_written();
    Ok(VolumeScores {
        slices,
        volume: tally.finish(n_pred, n_true),
        pair_runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_share_the_blocks_exactly_once_and_evenly() {
        for n in [0, 1, 5, 17, 100] {
            for count in 1..9 {
                let mut seen = vec![0; n];
                for index in 0..count {
                    let r = Task { index, count }.blocks(n);
                    assert!(r.len() <= n.div_ceil(count) && r.len() >= n / count);
                    r.for_each(|i| seen[i] += 1);
                }
                assert!(seen.iter().all(|&s| s == 1), "{n} blocks, {count} tasks");
            }
        }
    }

    #[test]
    fn block_lists_are_written_as_runs() {
        assert_eq!(ranges(&[0, 3, 4, 5, 9]), "0, 3-5, 9");
        assert_eq!(ranges(&[]), "");
        let many: Vec<usize> = (0..40).step_by(2).collect();
        assert!(ranges(&many).ends_with("22, …"), "{}", ranges(&many));
    }
}
