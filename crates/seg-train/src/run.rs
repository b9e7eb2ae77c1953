//! Run folders: `latest/` and `best/` checkpoints and the `validation.jsonl` log, what a folder
//! holds, how a run starts or continues in it, and how its log is kept consistent with its
//! checkpoints.
//!
//! Every epoch's log line is stored in the checkpoint written for that epoch before it is
//! appended to the log, so a process killed between the two loses nothing: resuming restores
//! the line from the checkpoint.

use std::path::{Path, PathBuf};

use crate::checkpoint::{self, CheckpointState};
use crate::train::TrainOptions;
use crate::{Error, Result};

/// How [`crate::train`] treats what its run folder already holds.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Start {
    /// A new run. A folder holding anything of a run (checkpoints, a log, the temporary
    /// folders of an interrupted checkpoint write) is refused and left as it is.
    #[default]
    New,
    /// Continue the run in the folder exactly from its latest checkpoint; an empty folder starts
    /// a new run. The stored training options and data description must equal the new ones,
    /// except the iteration budget, the loader's worker count, the progress bar and activation
    /// checkpointing, which may change between calls.
    Resume,
    /// Like [`Start::Resume`], but continue under the new options and data when they differ.
    ResumeAnyway,
}

/// The files of a run folder.
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub latest: PathBuf,
    pub best: PathBuf,
    pub log: PathBuf,
}

impl RunPaths {
    pub fn new(out: &Path) -> Self {
        RunPaths {
            latest: out.join("latest"),
            best: out.join("best"),
            log: out.join("validation.jsonl"),
        }
    }
}

/// What a run folder holds.
#[derive(Debug, Clone)]
pub struct RunContents {
    /// The latest checkpoint (or its previous version after an interrupted swap) and its state.
    pub latest: Option<(PathBuf, CheckpointState)>,
    pub best: Option<(PathBuf, CheckpointState)>,
    /// Lines in `validation.jsonl`, if it exists.
    pub log_lines: Option<usize>,
    /// Temporary and previous checkpoint folders left by an interrupted write.
    pub leftovers: Vec<PathBuf>,
}

impl RunContents {
    /// Looks at the run folder `out` (which need not exist).
    ///
    /// # Errors
    /// A checkpoint whose `checkpoint.json` is unreadable, and an unreadable log.
    pub fn inspect(out: &Path) -> Result<RunContents> {
        let paths = RunPaths::new(out);
        let state = |dir: &Path| -> Result<Option<(PathBuf, CheckpointState)>> {
            match checkpoint::resolve(dir) {
                Some(found) => Ok(Some((found, checkpoint::read_state(dir)?))),
                None => Ok(None),
            }
        };
        let log_lines = match std::fs::read_to_string(&paths.log) {
            Ok(text) => Some(text.lines().filter(|l| !l.trim().is_empty()).count()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Error::Checkpoint {
                    path: paths.log,
                    problem: format!("cannot read: {e}"),
                })
            }
        };
        let mut leftovers = Vec::new();
        for name in [".latest.tmp", ".latest.old", ".best.tmp", ".best.old"] {
            let p = out.join(name);
            if p.exists() {
                leftovers.push(p);
            }
        }
        Ok(RunContents {
            latest: state(&paths.latest)?,
            best: state(&paths.best)?,
            log_lines,
            leftovers,
        })
    }

    /// Whether the folder holds nothing of a run.
    pub fn is_empty(&self) -> bool {
        self.latest.is_none()
            && self.best.is_none()
            && self.log_lines.is_none()
            && self.leftovers.is_empty()
    }

    /// What the folder holds, for messages: "latest/ at iteration 190 (epoch 19), best/ at
    /// iteration 180 (validation loss 0.0805), validation.jsonl with 19 lines".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        if let Some((p, s)) = &self.latest {
            parts.push(format!(
                "{}/ at iteration {} (epoch {})",
                name(p),
                s.iteration,
                s.epoch
            ));
        }
        if let Some((p, s)) = &self.best {
            parts.push(format!(
                "{}/ at iteration {} (validation loss {:.4})",
                name(p),
                s.iteration,
                s.val_loss
            ));
        }
        if let Some(n) = self.log_lines {
            parts.push(format!("validation.jsonl with {n} line(s)"));
        }
        for p in &self.leftovers {
            parts.push(format!("{}/", name(p)));
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The differences between the training options and data a run was started with (`state`, read
/// from the checkpoint folder `checkpoint`)
/// and new ones that matter for an exact continuation, as "name: old → new" lines. The
/// iteration budget, workers, progress and activation checkpointing are not compared.
///
/// # Errors
/// Stored options that are not training options.
pub fn resume_differences(
    checkpoint: &Path,
    state: &CheckpointState,
    options: &TrainOptions,
    data: &serde_json::Value,
) -> Result<Vec<String>> {
    const FREE: [&str; 4] = [
        "iterations",
        "workers",
        "progress",
        "checkpoint_activations",
    ];
    // Through the type, so fields added later with defaults compare as their default.
    let stored: TrainOptions =
        serde_json::from_value(state.options.clone()).map_err(|e| Error::Checkpoint {
            path: checkpoint.join("checkpoint.json"),
            problem: format!("stored training options are unreadable: {e}"),
        })?;
    let as_map = |o: &TrainOptions| match serde_json::to_value(o) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (old, new) = (as_map(&stored), as_map(options));
    let mut out = Vec::new();
    for (key, value) in &new {
        if FREE.contains(&key.as_str()) {
            continue;
        }
        let before = old.get(key).unwrap_or(&serde_json::Value::Null);
        if before != value {
            out.push(format!("{key}: {before} → {value}"));
        }
    }
    if &state.data != data {
        out.push(format!("data: {} → {}", state.data, data));
    }
    Ok(out)
}

/// The epoch of a log line, if it has one.
fn line_epoch(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("epoch")?
        .as_u64()
}

/// Makes `validation.jsonl` agree with the checkpoint a run resumes from: lines of later epochs
/// (from a run that went past the checkpoint, whose epochs will be run again) are dropped and
/// the checkpoint's own line is added when a kill came between writing the checkpoint and
/// appending the line. The log is rewritten atomically, and only when it changes.
///
/// # Errors
/// The log cannot be read or written.
pub fn reconcile_log(log: &Path, state: &CheckpointState) -> Result<()> {
    let io = |e: std::io::Error, what: &str| Error::Checkpoint {
        path: log.to_path_buf(),
        problem: format!("cannot {what}: {e}"),
    };
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e, "read")),
    };
    let mut kept: Vec<&str> = Vec::new();
    let mut has_own = false;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match line_epoch(line) {
            Some(e) if e > state.epoch => continue,
            Some(e) if e == state.epoch => {
                if has_own {
                    continue;
                }
                has_own = true;
            }
            _ => {}
        }
        kept.push(line);
    }
    let own = state.log.as_ref().map(|l| l.to_string());
    if !has_own {
        if let Some(own) = &own {
            kept.push(own);
        }
    }
    let mut new_text = kept.join("\n");
    if !new_text.is_empty() {
        new_text.push('\n');
    }
    if new_text == text {
        return Ok(());
    }
    let tmp = log.with_file_name(".validation.jsonl.tmp");
    std::fs::write(&tmp, &new_text).map_err(|e| io(e, "write"))?;
    std::fs::rename(&tmp, log).map_err(|e| io(e, "replace"))
}

/// Moves the run folder `out` aside to the first free `out.previous-N` beside it, so that a
/// fresh run can start in `out` without destroying the old one. Returns the new place; `None`
/// when `out` does not exist.
///
/// # Errors
/// Another process holds the folder, or the rename fails.
pub fn set_aside(out: &Path) -> Result<Option<PathBuf>> {
    if !out.exists() {
        return Ok(None);
    }
    let lock = seg_io::lock::FolderLock::acquire(out)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Checkpoint {
            path: out.to_path_buf(),
            problem: "not a folder name".into(),
        })?;
    let mut n = 1;
    let target = loop {
        let t = out.with_file_name(format!("{name}.previous-{n}"));
        if !t.exists() {
            break t;
        }
        n += 1;
    };
    std::fs::rename(out, &target).map_err(|e| Error::Checkpoint {
        path: out.to_path_buf(),
        problem: format!("cannot move aside to {}: {e}", target.display()),
    })?;
    drop(lock);
    Ok(Some(target))
}
