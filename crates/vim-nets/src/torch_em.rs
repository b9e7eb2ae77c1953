//! torch-em checkpoints (`best.pt`, `latest.pt`) read without Python.
//!
//! A torch-em checkpoint is `torch.save` of a dict: `model_state` (the state dict), the optimizer
//! and scheduler states, training counters and an `init` record with `model_class` and
//! `model_kwargs`, from which torch-em rebuilds the model. The file is a zip holding a pickle
//! (`data.pkl`) and one entry per tensor storage. The pickle is parsed by candle's pickle reader,
//! which interprets the opcodes into plain data and never imports or calls anything; of what it
//! yields, only tensors and plain containers in `model_state` and plain values in `init` are
//! used, and a `model_state` that refers to anything else is refused.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::Path;

use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::{Device, Tensor};

use crate::{
    Canvas, Error, Model, ModelConfig, ModelKind, NetConfig, PresetOptions, Result, VimPreset,
};

/// What a torch-em checkpoint holds that this crate uses.
#[derive(Debug)]
pub struct TorchEmCheckpoint {
    /// The state dict, on the CPU.
    pub state: BTreeMap<String, Tensor>,
    /// `init["model_class"]`, e.g. `torch_em.model.unet.UNet2d`.
    pub model_class: Option<String>,
    /// `init["model_kwargs"]` with classes written as `"module.Class"` and other objects as
    /// `"<object module.Class>"`.
    pub model_kwargs: serde_json::Map<String, serde_json::Value>,
    pub iteration: Option<i64>,
    pub epoch: Option<i64>,
}

/// Classes a state dict may refer to: tensor reconstruction and storage types.
fn allowed_in_state(module: &str, class: &str) -> bool {
    matches!(
        (module, class),
        ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_parameter")
            | ("collections", "OrderedDict")
            | ("torch", "Size")
    ) || (module == "torch" && class.ends_with("Storage"))
}

fn classes<'a>(o: &'a Object, out: &mut Vec<(&'a str, &'a str)>) {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => out.push((module_name, class_name)),
        Object::Tuple(v) | Object::List(v) => v.iter().for_each(|x| classes(x, out)),
        Object::Dict(kv) => kv.iter().for_each(|(k, v)| {
            classes(k, out);
            classes(v, out);
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            classes(callable, out);
            classes(args, out);
        }
        Object::PersistentLoad(x) => classes(x, out),
        _ => {}
    }
}

fn entry<'a>(dict: &'a [(Object, Object)], key: &str) -> Option<&'a Object> {
    dict.iter()
        .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
        .map(|(_, v)| v)
}

/// The key/value pairs of a dict, also when pickled as an `OrderedDict` reduction.
fn as_dict(o: &Object) -> Option<&[(Object, Object)]> {
    match o {
        Object::Dict(kv) => Some(kv),
        Object::Build { args, .. } | Object::Reduce { args, .. } => as_dict(args),
        _ => None,
    }
}

fn to_json(o: &Object) -> serde_json::Value {
    use serde_json::Value;
    match o {
        Object::Int(i) => Value::from(*i),
        Object::Long(i) => Value::from(*i),
        Object::Float(f) => Value::from(*f),
        Object::Unicode(s) => Value::from(s.clone()),
        Object::Bool(b) => Value::from(*b),
        Object::None => Value::Null,
        Object::Tuple(v) | Object::List(v) => Value::Array(v.iter().map(to_json).collect()),
        Object::Dict(kv) => Value::Object(
            kv.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Object::Unicode(s) => s.clone(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Object::Class {
            module_name,
            class_name,
        } => Value::from(format!("{module_name}.{class_name}")),
        other => {
            let mut found = Vec::new();
            classes(other, &mut found);
            let name = found
                .first()
                .map(|(m, c)| format!("{m}.{c}"))
                .unwrap_or_else(|| "unknown".into());
            Value::from(format!("<object {name}>"))
        }
    }
}

fn integer(o: Option<&Object>) -> Option<i64> {
    match o? {
        Object::Int(i) => Some(i64::from(*i)),
        Object::Long(i) => Some(*i),
        _ => None,
    }
}

/// Reads a torch-em checkpoint.
///
/// # Errors
/// [`Error::WeightsFile`] for a file that is not a readable PyTorch zip, has no `model_state`
/// dict, or whose state dict refers to anything other than tensors (nothing in it is run).
pub fn read_checkpoint(path: &Path) -> Result<TorchEmCheckpoint> {
    let bad = |problem: String| Error::WeightsFile {
        path: path.to_path_buf(),
        problem,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(format!("not a PyTorch checkpoint (zip): {e}")))?;
    let pkl = (0..zip.len())
        .filter_map(|i| {
            zip.name_for_index(i)
                .and_then(|n| n.ok())
                .map(|n| n.into_owned())
        })
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad("not a PyTorch checkpoint: no data.pkl in the zip".into()))?;
    let object = {
        let reader = zip.by_name(&pkl).map_err(|e| bad(format!("{pkl}: {e}")))?;
        let mut reader = BufReader::new(reader);
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut reader)
            .map_err(|e| bad(format!("{pkl}: unreadable pickle: {e}")))?;
        stack
            .finalize()
            .map_err(|e| bad(format!("{pkl}: unreadable pickle: {e}")))?
    };
    let top = as_dict(&object).ok_or_else(|| {
        bad("the checkpoint is not a dict (torch-em saves a dict with model_state)".into())
    })?;
    let state_object = entry(top, "model_state").ok_or_else(|| {
        bad(
            "no model_state entry: not a torch-em checkpoint (a bare state dict can be \
             converted with scripts/torch_to_safetensors.py)"
                .into(),
        )
    })?;
    let mut refs = Vec::new();
    classes(state_object, &mut refs);
    if let Some((m, c)) = refs.iter().find(|(m, c)| !allowed_in_state(m, c)) {
        return Err(bad(format!(
            "model_state refers to {m}.{c}, which is not tensor data; refused (nothing in the \
             file was run)"
        )));
    }
    let tensors = PthTensors::new(path, Some("model_state"))
        .map_err(|e| bad(format!("reading model_state: {e}")))?;
    let mut state = BTreeMap::new();
    let mut names: Vec<String> = tensors.tensor_infos().keys().cloned().collect();
    names.sort();
    for name in names {
        let t = tensors
            .get(&name)
            .map_err(|e| bad(format!("tensor {name}: {e}")))?
            .ok_or_else(|| bad(format!("tensor {name}: missing")))?;
        state.insert(name, t);
    }
    if state.is_empty() {
        return Err(bad("model_state holds no tensor".into()));
    }
    let init = entry(top, "init").and_then(as_dict);
    let model_class = init
        .and_then(|d| entry(d, "model_class"))
        .and_then(|o| match o {
            Object::Unicode(s) => Some(s.clone()),
            _ => None,
        });
    let model_kwargs = match init.and_then(|d| entry(d, "model_kwargs")).map(to_json) {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    Ok(TorchEmCheckpoint {
        state,
        model_class,
        model_kwargs,
        iteration: integer(entry(top, "iteration")),
        epoch: integer(entry(top, "epoch")),
    })
}

impl TorchEmCheckpoint {
    /// The model configuration of the checkpoint's `init` record: torch-em's `UNet2d`, and
    /// `UNETR` with a SAM ViT-B/L/H encoder given by name.
    ///
    /// # Errors
    /// [`Error::Config`] for a missing record, another class or options this crate does not
    /// implement, naming them.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let err = |what: String| Error::Config {
            option: "torch-em init",
            value: self.model_class.clone().unwrap_or_else(|| "none".into()),
            problem: what,
        };
        let class = self.model_class.as_deref().ok_or_else(|| {
            err("the checkpoint has no init.model_class to rebuild the model from".into())
        })?;
        let kw = &self.model_kwargs;
        let int = |k: &str, default: usize| -> Result<usize> {
            match kw.get(k) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|v| v as usize)
                    .ok_or_else(|| err(format!("{class}: {k} = {v} is not a count"))),
            }
        };
        let boolean =
            |k: &str, default: bool| kw.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
        let sigmoid = match kw.get("final_activation") {
            None | Some(serde_json::Value::Null) => false,
            Some(v) if v.as_str() == Some("Sigmoid") => true,
            Some(v) => {
                return Err(err(format!(
                    "{class}: final_activation {v} (supported: \"Sigmoid\" or none)"
                )))
            }
        };
        let short = class.rsplit('.').next().unwrap_or(class);
        match short {
            "UNet2d" => {
                let sampler = kw
                    .get("sampler_impl")
                    .and_then(|v| v.as_str())
                    .unwrap_or("torch_em.model.unet.Upsampler2d");
                let conv_transpose = sampler.contains("Deconv");
                if !conv_transpose && !sampler.ends_with("Upsampler2d") {
                    return Err(err(format!("{class}: sampler_impl {sampler}")));
                }
                let o = PresetOptions {
                    sigmoid,
                    conv_transpose,
                    ..PresetOptions::default()
                };
                let mut c = ModelConfig::preset(ModelKind::UNet, int("out_channels", 1)?, &o);
                if let NetConfig::UNet(u) = &mut c.net {
                    u.in_channels = int("in_channels", 1)?;
                    u.depth = int("depth", 4)?;
                    u.initial_features = int("initial_features", 32)?;
                    u.gain = int("gain", 2)?;
                }
                Ok(c)
            }
            "UNETR"
                if kw
                    .get("encoder")
                    .and_then(|v| v.as_str())
                    .is_some_and(|e| e.starts_with("<object") && e.contains("ViM")) =>
            {
                // torch-em's get_vimunet_model: the encoder is a module object, so its size,
                // variant and canvas are read from the state dict's shapes.
                let dims = |k: &str| self.state.get(k).map(|t| t.dims().to_vec());
                let kind = match dims("encoder.patch_embed.proj.weight").map(|d| d[0]) {
                    Some(192) => ModelKind::VimUnetT,
                    Some(384) => ModelKind::VimUnetS,
                    other => {
                        return Err(err(format!(
                            "{class} with a ViM encoder of width {other:?} (supported: 192, \
                             ViM-T, and 384, ViM-S)"
                        )))
                    }
                };
                let vim_preset = if self.state.contains_key("encoder.rope.freqs_cos") {
                    VimPreset::Paper
                } else {
                    VimPreset::TorchEmCurrent
                };
                let tokens = dims("encoder.pos_embed").map_or(0, |d| d[1].saturating_sub(1));
                let side = (tokens as f64).sqrt().round() as usize;
                if side * side != tokens || side == 0 {
                    return Err(err(format!(
                        "{class}: encoder.pos_embed of {tokens} patch tokens is not a square grid"
                    )));
                }
                let o = PresetOptions {
                    sigmoid,
                    conv_transpose: boolean("use_conv_transpose", false),
                    skip_connections: boolean("use_skip_connection", true),
                    vim_preset,
                    canvas: if side * 16 == 1024 {
                        Canvas::Paper
                    } else {
                        Canvas::Native(side * 16)
                    },
                    ..PresetOptions::default()
                };
                Ok(ModelConfig::preset(kind, int("out_channels", 1)?, &o))
            }
            "UNETR" => {
                let backbone = kw.get("backbone").and_then(|v| v.as_str()).unwrap_or("sam");
                let encoder = kw
                    .get("encoder")
                    .and_then(|v| v.as_str())
                    .unwrap_or("vit_b");
                let kind = match (backbone, encoder) {
                    ("sam", "vit_b") => ModelKind::UnetrB,
                    ("sam", "vit_l") => ModelKind::UnetrL,
                    ("sam", "vit_h") => ModelKind::UnetrH,
                    _ => {
                        return Err(err(format!(
                            "{class}: backbone {backbone:?} with encoder {encoder:?} (supported: \
                             sam with vit_b, vit_l or vit_h)"
                        )))
                    }
                };
                let img_size = int("img_size", 1024)?;
                let o = PresetOptions {
                    sigmoid,
                    conv_transpose: boolean("use_conv_transpose", false),
                    skip_connections: boolean("use_skip_connection", true),
                    features: int("initial_features", 64)?,
                    canvas: if img_size == 1024 {
                        Canvas::Paper
                    } else {
                        Canvas::Native(img_size)
                    },
                    ..PresetOptions::default()
                };
                Ok(ModelConfig::preset(kind, int("out_channels", 1)?, &o))
            }
            _ => Err(err(format!(
                "model class {class} is not read from checkpoints yet (supported: torch-em's \
                 UNet2d and UNETR with a SAM ViT encoder)"
            ))),
        }
    }
}

impl Model {
    /// Builds the model of a torch-em checkpoint on `device` and loads its state dict strictly.
    ///
    /// # Errors
    /// Those of [`read_checkpoint`] and [`TorchEmCheckpoint::model_config`], and a state dict
    /// that does not fit the model (the first mismatching key named).
    pub fn from_torch_em(path: &Path, device: &Device) -> Result<(Model, TorchEmCheckpoint)> {
        let checkpoint = read_checkpoint(path)?;
        let config = checkpoint.model_config()?;
        let model = Model::new(config, device, 0)?;
        model
            .params()
            .load_tensors(&checkpoint.state, &path.display().to_string())?;
        Ok((model, checkpoint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(class: &str, kwargs: serde_json::Value) -> TorchEmCheckpoint {
        TorchEmCheckpoint {
            state: BTreeMap::new(),
            model_class: Some(class.into()),
            model_kwargs: kwargs.as_object().cloned().unwrap_or_default(),
            iteration: None,
            epoch: None,
        }
    }

    #[test]
    fn init_records_map_to_the_presets_they_describe() {
        let unetr = record(
            "torch_em.model.unetr.UNETR",
            json!({"img_size": 1024, "backbone": "sam", "encoder": "vit_l", "out_channels": 3,
                   "final_activation": "Sigmoid", "use_skip_connection": false,
                   "use_conv_transpose": true}),
        );
        let expected = ModelConfig::preset(ModelKind::UnetrL, 3, &PresetOptions::default());
        assert_eq!(unetr.model_config().unwrap(), expected);
        // torch-em's UNet2d defaults: bilinear sampler, 32 features, no activation.
        let unet = record("torch_em.model.unet.UNet2d", json!({"out_channels": 2}));
        match unet.model_config().unwrap().net {
            NetConfig::UNet(u) => {
                assert!(!u.conv_transpose && !u.sigmoid);
                assert_eq!((u.depth, u.initial_features, u.in_channels), (4, 32, 1));
            }
            other => panic!("{other:?}"),
        }
        // torch-em's get_vimunet_model: the encoder object, its size and canvas from the state.
        let mut vim = record(
            "torch_em.model.unetr.UNETR",
            json!({"encoder": "<object torch_em.model.vim.ViM>", "out_channels": 2,
                   "final_activation": "Sigmoid", "use_skip_connection": false,
                   "use_conv_transpose": false, "resize_input": false}),
        );
        let zeros =
            |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
        vim.state.insert(
            "encoder.patch_embed.proj.weight".into(),
            zeros(&[192, 3, 16, 16]),
        );
        vim.state
            .insert("encoder.pos_embed".into(), zeros(&[1, 4097, 192]));
        vim.state
            .insert("encoder.rope.freqs_cos".into(), zeros(&[1]));
        let o = PresetOptions {
            conv_transpose: false,
            ..PresetOptions::default()
        };
        assert_eq!(
            vim.model_config().unwrap(),
            ModelConfig::preset(ModelKind::VimUnetT, 2, &o)
        );
        vim.state.remove("encoder.rope.freqs_cos");
        vim.state
            .insert("encoder.pos_embed".into(), zeros(&[1, 1025, 192]));
        let o = PresetOptions {
            conv_transpose: false,
            vim_preset: VimPreset::TorchEmCurrent,
            canvas: Canvas::Native(512),
            ..PresetOptions::default()
        };
        assert_eq!(
            vim.model_config().unwrap(),
            ModelConfig::preset(ModelKind::VimUnetT, 2, &o)
        );
        for (class, kwargs, needle) in [
            ("torch_em.model.unet.UNet3d", json!({}), "UNet3d"),
            (
                "torch_em.model.unetr.UNETR",
                json!({"backbone": "dinov2"}),
                "dinov2",
            ),
            (
                "torch_em.model.unet.UNet2d",
                json!({"final_activation": "Softmax"}),
                "Softmax",
            ),
            (
                "torch_em.model.unet.UNet2d",
                json!({"depth": "four"}),
                "depth",
            ),
        ] {
            let e = record(class, kwargs)
                .model_config()
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
