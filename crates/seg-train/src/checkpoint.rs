//! Checkpoints: a folder with `model.safetensors` (torch-em names), `optimizer.safetensors`
//! (Adam's moments) and `checkpoint.json` (model config, iteration, optimizer and scheduler
//! state, seed, data). A folder is written beside its final name and swapped in with renames,
//! so a crash leaves either the old or the new checkpoint, never a mixture.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use vim_nets::{Model, ModelConfig};

use crate::optim::ReduceLrOnPlateau;
use crate::{Error, Result};

/// The JSON part of a checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointState {
    pub format: String,
    pub model: ModelConfig,
    /// Optimizer steps done.
    pub iteration: usize,
    /// Epochs completed (validation done).
    pub epoch: u64,
    pub lr: f64,
    pub adam_step: u64,
    pub scheduler: ReduceLrOnPlateau,
    /// The validation loss of this checkpoint's epoch and the best so far.
    pub val_loss: f64,
    pub best_val_loss: f64,
    pub seed: u64,
    /// The training options and data description the run was started with.
    pub options: serde_json::Value,
    pub data: serde_json::Value,
    /// This epoch's `validation.jsonl` line, restored by a resume when a kill came between
    /// writing the checkpoint and appending the line.
    #[serde(default)]
    pub log: Option<serde_json::Value>,
}

pub const FORMAT: &str = "vimseg-checkpoint-1";

fn io(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        problem: format!("cannot {what}: {e}"),
    }
}

/// Writes a checkpoint folder atomically at `dir`.
pub fn write(
    dir: &Path,
    model: &Model,
    optimizer: &HashMap<String, Tensor>,
    state: &CheckpointState,
) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .ok_or_else(|| Error::Checkpoint {
            path: dir.to_path_buf(),
            problem: "not a folder name".into(),
        })?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp"));
    let old = parent.join(format!(".{name}.old"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .map_err(|e| io(&tmp, "remove a stale temporary folder", e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, "create", e))?;
    model.save(&tmp.join("model.safetensors"))?;
    let cpu: HashMap<String, Tensor> = optimizer
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    if !cpu.is_empty() {
        candle_core::safetensors::save(&cpu, tmp.join("optimizer.safetensors"))?;
    }
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Checkpoint {
        path: tmp.join("checkpoint.json"),
        problem: format!("cannot serialise the state: {e}"),
    })?;
    std::fs::write(tmp.join("checkpoint.json"), json)
        .map_err(|e| io(&tmp, "write checkpoint.json", e))?;
    // Swap: dir → .old, tmp → dir, remove .old. A crash in between leaves .old, which
    // `resolve` falls back to.
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, "remove", e))?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| io(dir, "move aside", e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io(dir, "move into place", e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, "remove", e))?;
    }
    Ok(())
}

/// The folder holding checkpoint `dir`, or its previous version if a crash interrupted the
/// swap. `None` when neither exists.
pub fn resolve(dir: &Path) -> Option<PathBuf> {
    if dir.join("checkpoint.json").is_file() {
        return Some(dir.to_path_buf());
    }
    let name = dir.file_name()?.to_string_lossy().to_string();
    let old = dir
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.old"));
    old.join("checkpoint.json").is_file().then_some(old)
}

/// Reads a checkpoint's JSON.
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let found = resolve(dir).ok_or_else(|| Error::Checkpoint {
        path: dir.to_path_buf(),
        problem: "no checkpoint (checkpoint.json missing)".into(),
    })?;
    let path = found.join("checkpoint.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, "read", e))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        problem: format!("invalid checkpoint JSON: {e}"),
    })?;
    if state.format != FORMAT {
        return Err(Error::Checkpoint {
            path,
            problem: format!("format {:?}, expected {FORMAT:?}", state.format),
        });
    }
    Ok(state)
}

/// Builds the checkpoint's model on `device` and loads its weights.
pub fn load_model(dir: &Path, device: &Device) -> Result<(Model, CheckpointState)> {
    let state = read_state(dir)?;
    let found = resolve(dir).expect("read_state found it");
    let model = Model::from_safetensors(
        state.model.clone(),
        &found.join("model.safetensors"),
        device,
    )?;
    Ok((model, state))
}

/// The model of a checkpoint for prediction, from one of this crate's checkpoint folders, a
/// folder written by [`Model::export`], or a torch-em checkpoint file (`best.pt`, read without Python: [`vim_nets::torch_em`]), with a
/// one-line description of where it came from ("unet, iteration 40").
///
/// # Errors
/// Those of [`load_model`] and [`Model::from_torch_em`].
pub fn load_for_inference(path: &Path, device: &Device) -> Result<(Model, String)> {
    let torch_file = path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("pt") || e.eq_ignore_ascii_case("pth"));
    if torch_file {
        let (model, ckpt) = Model::from_torch_em(path, device)?;
        let at = ckpt
            .iteration
            .map_or_else(String::new, |i| format!(", iteration {i}"));
        let name = format!("{} (torch-em checkpoint{at})", model.config().name());
        return Ok((model, name));
    }
    if resolve(path).is_none() && path.join(vim_nets::EXPORTED_CONFIG).is_file() {
        let model = Model::load_exported(path, device)?;
        let name = format!("{} (exported model)", model.config().name());
        return Ok((model, name));
    }
    let (model, state) = load_model(path, device)?;
    let name = format!("{}, iteration {}", state.model.name(), state.iteration);
    Ok((model, name))
}

/// The optimizer moments of a checkpoint (empty before the first step).
pub fn load_optimizer(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let found = resolve(dir).ok_or_else(|| Error::Checkpoint {
        path: dir.to_path_buf(),
        problem: "no checkpoint".into(),
    })?;
    let path = found.join("optimizer.safetensors");
    if !path.exists() {
        return Ok(HashMap::new());
    }
    candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        problem: format!("unreadable optimizer state: {e}"),
    })
}
