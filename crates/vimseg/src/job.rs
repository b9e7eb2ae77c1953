//! The blockwise stages as numbered tasks (Slurm array jobs, Kubernetes Indexed Jobs, or N local
//! processes): the options `predict` and `segment` share for a Zarr output, and the `finish` and
//! `status` commands. The steps themselves are `seg_pipeline::blockwise`'s.

use std::path::{Path, PathBuf};

use anyhow::bail;
use seg_pipeline::blockwise::{self, Plan, PlanOptions, Task, TaskSummary};

/// How a blockwise stage runs: whole in this process (the default), or as plan, tasks and
/// finish (docs/cluster.md).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct JobArgs {
    /// Write the plan for N tasks into the output folder (manifest, empty arrays) and stop; then
    /// run the tasks with --task and the `finish` command.
    #[arg(long, value_name = "N", value_parser = crate::args::at_least_one, conflicts_with = "task")]
    plan: Option<usize>,
    /// With --plan: replace a plan of other options, removing its results.
    #[arg(long, requires = "plan")]
    force: bool,
    /// Run task I of the plan only (its blocks not yet done). Without a value: the index in
    /// SLURM_ARRAY_TASK_ID, or JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs). The options must
    /// be the plan's (their hash is checked).
    #[arg(long, value_name = "I", num_args = 0..=1, default_missing_value = "env")]
    task: Option<String>,
    /// With --task: the number of tasks, checked against the plan's.
    #[arg(long, value_name = "N", requires = "task")]
    of: Option<usize>,
}

/// The step `JobArgs` asks for.
pub enum Step {
    Whole,
    Plan(PlanOptions),
    Task(Task),
}

impl JobArgs {
    /// The step, with a task's index resolved against the plan in `out`.
    pub fn step(&self, out: &Path) -> anyhow::Result<Step> {
        if let Some(n) = self.plan {
            let mut p = PlanOptions::default();
            p.tasks = n;
            p.force = self.force;
            return Ok(Step::Plan(p));
        }
        let Some(task) = &self.task else {
            return Ok(Step::Whole);
        };
        let index = if task == "env" {
            None
        } else {
            match task.trim().parse::<usize>() {
                Ok(i) => Some(i),
                Err(_) => bail!("--task {task:?}: expected a task index (0, 1, …)"),
            }
        };
        Ok(Step::Task(blockwise::resolve_task(out, index, self.of)?))
    }

    /// Whether a Zarr output is asked for through these options alone.
    pub fn any(&self) -> bool {
        self.plan.is_some() || self.task.is_some()
    }
}

/// Prints a plan and what to run next.
pub fn print_plan(out: &Path, plan: &Plan) {
    println!(
        "{}: planned {} {} blocks of {b}×{b} (halo {}) for {} task(s), options hash {}",
        out.display(),
        plan.blocks,
        plan.stage,
        plan.halo,
        plan.tasks,
        plan.hash,
        b = plan.block
    );
    println!(
        "next: the same command with --task I for I in 0..{} (or --task in a Slurm array \
         0-{}), then `vimseg finish {}`",
        plan.tasks,
        plan.tasks - 1,
        out.display()
    );
}

/// Prints what a task did; an error (non-zero exit, so the scheduler records the task as
/// failed) when a block failed.
pub fn report(out: &Path, s: &TaskSummary) -> anyhow::Result<()> {
    println!(
        "{}: task {} of {}: blocks {}..{}: {} done now, {} done before, {} failed, {:.1} s",
        out.display(),
        s.task.index,
        s.task.count,
        s.blocks.start,
        s.blocks.end,
        s.done,
        s.already_done,
        s.failed.len(),
        s.seconds
    );
    if let Some((block, error)) = s.failed.first() {
        bail!(
            "task {} of {}: {} block(s) failed, the first (block {block}): {error}; the other \
             blocks are kept, run the task again once the cause is mended",
            s.task.index,
            s.task.count,
            s.failed.len()
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct FinishArgs {
    /// The output folder of a planned `predict` or `segment` (a .zarr group).
    out: PathBuf,
}

/// `vimseg finish OUT`: the stage's finish step once all tasks are done.
pub fn finish(args: &FinishArgs) -> anyhow::Result<()> {
    let s = blockwise::finish(&args.out)?;
    let plan = Plan::read(&args.out)?;
    println!(
        "{}: {} finished: all {} blocks done → {} ({:.1} s)",
        args.out.display(),
        plan.stage,
        s.blocks,
        s.array.display(),
        s.seconds
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The output folder of a planned `predict` or `segment`.
    out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// `vimseg status OUT`: blocks done, failed and pending, and the tasks still to run.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    use std::fmt::Write;
    let p = blockwise::progress(&args.out)?;
    let mut text = String::new();
    if args.json {
        let failed: Vec<_> = p
            .failed
            .iter()
            .map(|(b, e)| serde_json::json!({"block": b, "error": e}))
            .collect();
        let v = serde_json::json!({
            "stage": p.plan.stage,
            "hash": p.plan.hash,
            "blocks": p.plan.blocks,
            "tasks": p.plan.tasks,
            "done": p.done,
            "failed": failed,
            "pending": p.pending,
            "open_tasks": p.open_tasks,
        });
        writeln!(text, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            text,
            "{}: {} plan {} — {} blocks in {} task(s): {} done, {} failed, {} pending",
            args.out.display(),
            p.plan.stage,
            p.plan.hash,
            p.plan.blocks,
            p.plan.tasks,
            p.done,
            p.failed.len(),
            p.pending
        )?;
        for (block, error) in p.failed.iter().take(20) {
            writeln!(text, "  block {block} failed: {error}")?;
        }
        if p.open_tasks.is_empty() {
            writeln!(
                text,
                "  every block is done: run `vimseg finish {}`",
                args.out.display()
            )?;
        } else {
            let list: Vec<String> = p.open_tasks.iter().map(|t| t.to_string()).collect();
            writeln!(text, "  tasks to run: {}", list.join(","))?;
        }
    }
    print_all(&text)
}

/// Prints `text`; a reader that stops early (`vimseg status | head`) is not an error.
fn print_all(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
