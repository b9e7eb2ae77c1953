//! Memory checks before a training run or a prediction starts: the model's estimate
//! ([`vim_nets::memory`]) against the memory the machine has available
//! ([`seg_io::memory::available_bytes`]), with the estimates under the options that would
//! need less.

use std::path::Path;

use seg_io::memory::{human, shortfall};
use vim_nets::{Canvas, Model, ModelConfig, NetConfig, Pass};

use crate::{Error, Result, TrainOptions};

/// The canvas of a ViT/ViM model, `None` for a UNet.
fn canvas(config: &ModelConfig) -> Option<Canvas> {
    match &config.net {
        NetConfig::UNet(_) => None,
        NetConfig::Unetr { canvas, .. } | NetConfig::VimUnet { canvas, .. } => Some(*canvas),
    }
}

fn with_canvas(config: &ModelConfig, side: usize) -> ModelConfig {
    let mut c = config.clone();
    match &mut c.net {
        NetConfig::UNet(_) => {}
        NetConfig::Unetr { canvas, .. } | NetConfig::VimUnet { canvas, .. } => {
            *canvas = Canvas::Native(side)
        }
    }
    c
}

/// Refuses a training run whose step is estimated to need more memory than is available; the
/// error (naming `out`) gives the estimate, its parts, the available memory, and the estimates
/// with a smaller batch, activation checkpointing or a native canvas where those differ.
///
/// # Errors
/// [`seg_io::Error::TooLarge`] when the step does not fit.
pub fn check_training(model: &Model, o: &TrainOptions, out: &Path) -> Result<()> {
    let config = model.config();
    let parameters = model.parameter_count();
    let (h, w) = o.patch;
    let estimate = |config: &ModelConfig, batch: usize, checkpoint_activations: bool| {
        config.memory_estimate(
            parameters,
            batch,
            h,
            w,
            Pass::Training {
                checkpoint_activations,
            },
        )
    };
    let e = estimate(config, o.batch_size, o.checkpoint_activations);
    let mut alternatives = Vec::new();
    if o.batch_size > 1 {
        alternatives.push((
            "--batch 1".to_string(),
            estimate(config, 1, o.checkpoint_activations),
        ));
    }
    if let Some(c) = canvas(config) {
        if !o.checkpoint_activations {
            alternatives.push((
                "--checkpoint-activations".into(),
                estimate(config, o.batch_size, true),
            ));
        }
        let native = h.max(w).div_ceil(16) * 16;
        if c.side() > native {
            alternatives.push((
                format!("--canvas native ({native}²)"),
                estimate(
                    &with_canvas(config, native),
                    o.batch_size,
                    o.checkpoint_activations,
                ),
            ));
        }
    }
    let canvas_text = canvas(config)
        .map(|c| format!(" on the {0}×{0} canvas", c.side()))
        .unwrap_or_default();
    let what = format!(
        "a training step of {} (batch {}, {h}×{w} patches{canvas_text}; estimate: weights, \
         gradients and Adam {}, activations {})",
        config.name(),
        o.batch_size,
        human(e.parameters.into()),
        human(e.activations.into()),
    );
    let less: Vec<String> = alternatives
        .iter()
        .filter(|(_, a)| a.total() < e.total())
        .map(|(option, a)| format!("{option} {}", human(a.total().into())))
        .collect();
    let hint = if less.is_empty() {
        "train on a machine with more memory".to_string()
    } else {
        format!("estimates with less: {}", less.join(", "))
    };
    match shortfall(&what, Some(e.total().into()), &hint) {
        None => Ok(()),
        Some(what) => Err(Error::Io(seg_io::Error::TooLarge {
            path: out.to_path_buf(),
            what,
        })),
    }
}

/// Refuses a forward pass of `model` on `batch` images of `height` × `width` estimated to need
/// more memory than is available.
///
/// # Errors
/// [`Error::Memory`] with the estimate and the available memory.
pub fn check_inference(model: &Model, batch: usize, height: usize, width: usize) -> Result<()> {
    let e = model.memory_estimate(batch, height, width, Pass::Inference);
    let what = format!(
        "predicting {batch} image(s) of {height}×{width} with {}{}",
        model.config().name(),
        canvas(model.config())
            .map(|c| format!(" on its {0}×{0} canvas", c.side()))
            .unwrap_or_default()
    );
    let hint = match canvas(model.config()) {
        None => "predict in smaller tiles (--tile)",
        Some(_) => {
            "the canvas is fixed when the model is trained: predict on a machine with more \
             memory, or use a model trained with --canvas native"
        }
    };
    match shortfall(&what, Some(e.total().into()), hint) {
        None => Ok(()),
        Some(message) => Err(Error::Memory(message)),
    }
}
