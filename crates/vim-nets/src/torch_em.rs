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
    Canvas, DecoderConfig, Error, Model, ModelConfig, ModelKind, NetConfig, PresetOptions, Result,
    VimConfig, VimPreset,
};

/// What a torch-em checkpoint holds that this crate uses.
#[derive(Debug, Clone)]
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

/// The unpickled `data.pkl` of a PyTorch zip file (plain data: nothing is imported or run).
fn read_pickle(path: &Path) -> Result<Object> {
    let bad = |problem: String| Error::WeightsFile {
        path: path.to_path_buf(),
        problem,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(format!("not a PyTorch file (zip): {e}")))?;
    let pkl = (0..zip.len())
        .filter_map(|i| {
            zip.name_for_index(i)
                .and_then(|n| n.ok())
                .map(|n| n.into_owned())
        })
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad("not a PyTorch file: no data.pkl in the zip".into()))?;
    let reader = zip.by_name(&pkl).map_err(|e| bad(format!("{pkl}: {e}")))?;
    let mut reader = BufReader::new(reader);
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut reader)
        .map_err(|e| bad(format!("{pkl}: unreadable pickle: {e}")))?;
    stack
        .finalize()
        .map_err(|e| bad(format!("{pkl}: unreadable pickle: {e}")))
}

/// The tensors of the state dict `state_object` (the entry `key` of the file's top dict, or the
/// top object itself), after checking that it refers to tensor data only.
fn read_state(
    path: &Path,
    state_object: &Object,
    key: Option<&str>,
) -> Result<BTreeMap<String, Tensor>> {
    let bad = |problem: String| Error::WeightsFile {
        path: path.to_path_buf(),
        problem,
    };
    let what = key.unwrap_or("the state dict");
    let mut refs = Vec::new();
    classes(state_object, &mut refs);
    if let Some((m, c)) = refs.iter().find(|(m, c)| !allowed_in_state(m, c)) {
        return Err(bad(format!(
            "{what} refers to {m}.{c}, which is not tensor data; refused (nothing in the file \
             was run)"
        )));
    }
    let tensors = PthTensors::new(path, key).map_err(|e| bad(format!("reading {what}: {e}")))?;
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
        return Err(bad(format!("{what} holds no tensor")));
    }
    Ok(state)
}

/// Reads a bare state dict (`torch.save(model.state_dict(), path)`, the `pytorch_state_dict`
/// weights of a bioimage.io package).
///
/// # Errors
/// [`Error::WeightsFile`] for a file that is not a readable PyTorch zip or whose pickle refers
/// to anything other than tensors (nothing in it is run).
pub fn read_state_dict(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let object = read_pickle(path)?;
    if as_dict(&object).is_none() {
        return Err(Error::WeightsFile {
            path: path.to_path_buf(),
            problem: "not a state dict (the pickle holds no dict)".into(),
        });
    }
    read_state(path, &object, None)
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
    let object = read_pickle(path)?;
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
    let state = read_state(path, state_object, Some("model_state"))?;
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
        // torch-em's get_vimunet_model(out_channels, model_type, with_cls_token) always ends in
        // a sigmoid and always has the class token.
        let vim_builder = short == "get_vimunet_model";
        let sigmoid = sigmoid || vim_builder;
        if vim_builder {
            if kw.get("with_cls_token").and_then(|v| v.as_bool()) == Some(false) {
                return Err(err(format!(
                    "{class}: with_cls_token = false (a ViM encoder without a class token is \
                     not built here)"
                )));
            }
            if let Some(t) = kw.get("model_type") {
                let width = match t.as_str() {
                    Some("vim_t") => 192,
                    Some("vim_s") => 384,
                    Some("vim_b") => 768,
                    _ => return Err(err(format!("{class}: model_type {t}"))),
                };
                let found = self
                    .state
                    .get("encoder.patch_embed.proj.weight")
                    .map(|t| t.dims()[0]);
                if found.is_some_and(|d| d != width) {
                    return Err(err(format!(
                        "{class}: model_type {t} is {width} wide, the weights are {} wide",
                        found.unwrap_or(0)
                    )));
                }
            }
        }
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
            "UNETR" | "get_vimunet_model"
                if vim_builder
                    || kw
                        .get("encoder")
                        .and_then(|v| v.as_str())
                        .is_some_and(|e| e.starts_with("<object") && e.contains("ViM")) =>
            {
                // torch-em's get_vimunet_model: the encoder is a module object, so every size
                // (width, depth, state, convolution, canvas), the variant and the decoder's
                // features are read from the state dict's shapes.
                let dims = |k: &str| {
                    self.state.get(k).map(|t| t.dims().to_vec()).ok_or_else(|| {
                        err(format!(
                            "{class} with a ViM encoder: the state dict has no {k}"
                        ))
                    })
                };
                let embed = dims("encoder.patch_embed.proj.weight")?;
                let (d, patch) = (embed[0], embed[2]);
                let depth = (0..)
                    .take_while(|i| {
                        self.state
                            .contains_key(&format!("encoder.layers.{i}.norm.weight"))
                    })
                    .count();
                let a_log = dims("encoder.layers.0.mixer.A_log")?;
                let conv = dims("encoder.layers.0.mixer.conv1d.weight")?;
                let out_conv = dims("out_conv.weight")?;
                if d == 0 || depth == 0 || a_log[0] % d != 0 {
                    return Err(err(format!(
                        "{class}: a ViM encoder of width {d}, {depth} layers and inner width {} \
                         is not a Vision Mamba this crate builds",
                        a_log[0]
                    )));
                }
                let vim_preset = if self.state.contains_key("encoder.rope.freqs_cos") {
                    VimPreset::Paper
                } else {
                    VimPreset::TorchEmCurrent
                };
                let tokens = dims("encoder.pos_embed")?[1].saturating_sub(1);
                let side = (tokens as f64).sqrt().round() as usize;
                if side * side != tokens || side == 0 {
                    return Err(err(format!(
                        "{class}: encoder.pos_embed of {tokens} patch tokens is not a square grid"
                    )));
                }
                let mut encoder = VimConfig::tiny(vim_preset);
                encoder.embed_dim = d;
                encoder.patch_size = patch;
                encoder.depth = depth;
                encoder.d_state = a_log[1];
                encoder.expand = a_log[0] / d;
                encoder.d_conv = conv[2];
                if let Ok(head) = dims("encoder.head.weight") {
                    encoder.num_classes = head[0];
                }
                let canvas = if side * patch == 1024 {
                    Canvas::Paper
                } else {
                    Canvas::Native(side * patch)
                };
                let decoder = DecoderConfig {
                    embed_dim: d,
                    in_chans: 3,
                    out_channels: out_conv[0],
                    initial_features: out_conv[1],
                    skip_connections: false,
                    conv_transpose: self.state.contains_key("deconv_out.block.weight"),
                    sigmoid,
                };
                let net = NetConfig::VimUnet {
                    encoder,
                    decoder,
                    canvas,
                };
                // A preset's configuration is named as that preset.
                let kind = [ModelKind::VimUnetT, ModelKind::VimUnetS]
                    .into_iter()
                    .find(|&k| {
                        let o = PresetOptions {
                            sigmoid,
                            conv_transpose: self.state.contains_key("deconv_out.block.weight"),
                            vim_preset,
                            canvas,
                            features: out_conv[1],
                            ..PresetOptions::default()
                        };
                        ModelConfig::preset(k, out_conv[0], &o).net == net
                    });
                Ok(ModelConfig { kind, net })
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

impl ModelConfig {
    /// The torch-em class and constructor arguments that build this model, in the form of
    /// torch-em's `init` record (classes as `"module.Class"` strings), so that
    /// [`TorchEmCheckpoint::model_config`] maps them back to this configuration.
    ///
    /// # Errors
    /// [`Error::Config`] for a ViM-UNet: torch-em builds it from an encoder object, which no
    /// constructor argument describes.
    pub fn torch_em_init(&self) -> Result<(String, serde_json::Map<String, serde_json::Value>)> {
        use serde_json::json;
        let activation = |sigmoid: bool| {
            if sigmoid {
                json!("Sigmoid")
            } else {
                json!(null)
            }
        };
        let (class, kwargs) = match &self.net {
            NetConfig::UNet(u) => (
                "torch_em.model.unet.UNet2d",
                json!({
                    "in_channels": u.in_channels,
                    "out_channels": u.out_channels,
                    "depth": u.depth,
                    "initial_features": u.initial_features,
                    "gain": u.gain,
                    "final_activation": activation(u.sigmoid),
                    "sampler_impl": if u.conv_transpose {
                        "torch_em.model.unetr.SingleDeconv2DBlock"
                    } else {
                        "torch_em.model.unet.Upsampler2d"
                    },
                }),
            ),
            NetConfig::Unetr {
                encoder,
                decoder,
                resize_input,
                canvas,
            } => {
                let size = match self.kind {
                    Some(ModelKind::UnetrB) => "vit_b",
                    Some(ModelKind::UnetrL) => "vit_l",
                    Some(ModelKind::UnetrH) => "vit_h",
                    _ if *encoder == crate::SamConfig::vit_b() => "vit_b",
                    _ if *encoder == crate::SamConfig::vit_l() => "vit_l",
                    _ if *encoder == crate::SamConfig::vit_h() => "vit_h",
                    _ => {
                        return Err(Error::Config {
                            option: "encoder",
                            value: format!("{encoder:?}"),
                            problem: "only SAM's vit_b, vit_l and vit_h have a torch-em name"
                                .into(),
                        })
                    }
                };
                let grid = canvas.side() / encoder.patch_size;
                if grid < encoder.window_size {
                    return Err(Error::Config {
                        option: "canvas",
                        value: canvas.side().to_string(),
                        problem: format!(
                            "a {grid}×{grid} token grid is smaller than SAM's {0}×{0} attention \
                             windows, which this crate shrinks to the grid and torch-em does not: \
                             torch-em cannot build this model (a canvas of at least {1} can)",
                            encoder.window_size,
                            encoder.window_size * encoder.patch_size
                        ),
                    });
                }
                (
                    "torch_em.model.unetr.UNETR",
                    json!({
                        "img_size": canvas.side(),
                        "backbone": "sam",
                        "encoder": size,
                        "out_channels": decoder.out_channels,
                        "resize_input": resize_input,
                        "use_skip_connection": decoder.skip_connections,
                        "use_conv_transpose": decoder.conv_transpose,
                        "final_activation": activation(decoder.sigmoid),
                        "initial_features": decoder.initial_features,
                    }),
                )
            }
            NetConfig::VimUnet { decoder, .. } => {
                // torch-em describes a ViM-UNet by its builder, get_vimunet_model, which makes
                // one configuration per size: the current encoder (middle class token, no
                // RoPE), a 1024 canvas, 64 decoder features, bilinear upsampling, a sigmoid.
                let o = PresetOptions {
                    canvas: Canvas::Paper,
                    skip_connections: false,
                    conv_transpose: false,
                    vim_preset: VimPreset::TorchEmCurrent,
                    sigmoid: true,
                    features: 64,
                };
                let model_type = [
                    (ModelKind::VimUnetT, "vim_t"),
                    (ModelKind::VimUnetS, "vim_s"),
                ]
                .into_iter()
                .find(|&(k, _)| ModelConfig::preset(k, decoder.out_channels, &o).net == self.net)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::Config {
                    option: "model",
                    value: self.name(),
                    problem: "torch-em describes a ViM-UNet only through \
                                  get_vimunet_model(out_channels, model_type, with_cls_token), \
                                  which builds ViM-UNet T or S with torch-em's current encoder \
                                  (vim preset torch-em), a 1024 canvas, 64 decoder features, \
                                  bilinear upsampling and a sigmoid; this model differs, so \
                                  export it as safetensors + config.json instead"
                        .into(),
                })?;
                (
                    "torch_em.model.vim.get_vimunet_model",
                    json!({
                        "out_channels": decoder.out_channels,
                        "model_type": model_type,
                        "with_cls_token": true,
                    }),
                )
            }
        };
        let serde_json::Value::Object(kwargs) = kwargs else {
            unreachable!("a JSON object literal")
        };
        Ok((class.to_string(), kwargs))
    }
}

/// Pickle opcodes of protocol 2, as `torch.save` writes them.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const REDUCE: u8 = b'R';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const BINPERSID: u8 = b'Q';
    pub const NEWFALSE: u8 = 0x89;
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

fn pickle_str(out: &mut Vec<u8>, s: &str) {
    out.push(op::BINUNICODE);
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pickle_int(out: &mut Vec<u8>, v: usize) {
    match i32::try_from(v) {
        Ok(i) => {
            out.push(op::BININT);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Err(_) => {
            out.push(op::LONG1);
            out.push(8);
            out.extend_from_slice(&(v as i64).to_le_bytes());
        }
    }
}

fn pickle_global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(op::GLOBAL);
    out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
}

fn pickle_ints(out: &mut Vec<u8>, v: &[usize]) {
    out.push(op::MARK);
    v.iter().for_each(|&i| pickle_int(out, i));
    out.push(op::TUPLE);
}

/// Writes `tensors` as a PyTorch state dict (`torch.save(state_dict)`'s zip layout: a protocol 2
/// pickle of an `OrderedDict` of `_rebuild_tensor_v2` calls and one stored, 64-byte aligned
/// entry per storage), atomically; `torch.load(path, weights_only=True)` reads it. f32 and i64
/// tensors only.
///
/// # Errors
/// [`Error::WeightsFile`] for another dtype or a failed write.
pub fn write_state_dict(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    use candle_core::DType;
    let bad = |problem: String| Error::WeightsFile {
        path: path.to_path_buf(),
        problem,
    };
    let mut pkl = vec![op::PROTO, 2];
    pickle_global(&mut pkl, "collections", "OrderedDict");
    pkl.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE, op::MARK]);
    let mut storages: Vec<Vec<u8>> = Vec::new();
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let (storage, bytes) = match t.dtype() {
            DType::F32 => (
                "FloatStorage",
                t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            DType::I64 => (
                "LongStorage",
                t.flatten_all()?
                    .to_vec1::<i64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => {
                return Err(bad(format!(
                    "tensor {name}: dtype {other:?} is not written"
                )))
            }
        };
        let dims = t.dims();
        let strides: Vec<usize> = (0..dims.len())
            .map(|i| dims[i + 1..].iter().product())
            .collect();
        pickle_str(&mut pkl, name);
        pickle_global(&mut pkl, "torch._utils", "_rebuild_tensor_v2");
        pkl.push(op::MARK);
        // The storage: a persistent id ('storage', class, key, location, numel).
        pkl.push(op::MARK);
        pickle_str(&mut pkl, "storage");
        pickle_global(&mut pkl, "torch", storage);
        pickle_str(&mut pkl, &storages.len().to_string());
        pickle_str(&mut pkl, "cpu");
        pickle_int(&mut pkl, t.elem_count());
        pkl.extend_from_slice(&[op::TUPLE, op::BINPERSID]);
        pickle_int(&mut pkl, 0);
        pickle_ints(&mut pkl, dims);
        pickle_ints(&mut pkl, &strides);
        pkl.push(op::NEWFALSE);
        pickle_global(&mut pkl, "collections", "OrderedDict");
        pkl.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE, op::TUPLE, op::REDUCE]);
        storages.push(bytes);
    }
    pkl.extend_from_slice(&[op::SETITEMS, op::STOP]);
    let archive = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && s.is_ascii())
        .unwrap_or("archive")
        .to_string();
    seg_io::atomic::write_atomically(path, |w| {
        use std::io::Write;
        let io = |e: zip::result::ZipError| seg_io::Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        };
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(true);
        let mut entry = |name: String, bytes: &[u8]| -> seg_io::Result<()> {
            zip.start_file(name, stored).map_err(io)?;
            zip.write_all(bytes).map_err(|source| seg_io::Error::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        entry(format!("{archive}/data.pkl"), &pkl)?;
        entry(format!("{archive}/byteorder"), b"little")?;
        for (i, bytes) in storages.iter().enumerate() {
            entry(format!("{archive}/data/{i}"), bytes)?;
        }
        entry(format!("{archive}/version"), b"3\n")?;
        let bytes = zip.finish().map_err(io)?.into_inner();
        w.write_all(&bytes).map_err(|source| seg_io::Error::Io {
            path: path.to_path_buf(),
            source,
        })
    })
    .map_err(|e| bad(format!("cannot write: {e}")))
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
    fn init_records_written_map_back_to_the_same_configuration() {
        for kind in [ModelKind::UNet, ModelKind::UnetrB, ModelKind::UnetrH] {
            for conv_transpose in [false, true] {
                let o = PresetOptions {
                    conv_transpose,
                    features: 16,
                    canvas: Canvas::Native(256),
                    ..PresetOptions::default()
                };
                let config = ModelConfig::preset(kind, 3, &o);
                let (class, kwargs) = config.torch_em_init().unwrap();
                let mut r = record(&class, serde_json::Value::Object(kwargs));
                r.state = BTreeMap::new();
                assert_eq!(r.model_config().unwrap(), config, "{kind:?}");
            }
        }
        // The paper's ViM-UNet (RoPE, transposed convolutions) has no torch-em description by
        // arguments; the one get_vimunet_model builds has.
        let vim = ModelConfig::preset(ModelKind::VimUnetT, 2, &PresetOptions::default());
        let e = vim.torch_em_init().unwrap_err().to_string();
        assert!(e.contains("only through get_vimunet_model"), "{e}");
        let current = PresetOptions {
            vim_preset: VimPreset::TorchEmCurrent,
            conv_transpose: false,
            ..PresetOptions::default()
        };
        let (class, kwargs) = ModelConfig::preset(ModelKind::VimUnetS, 2, &current)
            .torch_em_init()
            .unwrap();
        assert_eq!(class, "torch_em.model.vim.get_vimunet_model");
        assert_eq!(
            serde_json::Value::Object(kwargs),
            json!({"out_channels": 2, "model_type": "vim_s", "with_cls_token": true})
        );
        let small = ModelConfig::preset(
            ModelKind::UnetrB,
            2,
            &PresetOptions {
                canvas: Canvas::Native(64),
                ..PresetOptions::default()
            },
        );
        let e = small.torch_em_init().unwrap_err().to_string();
        assert!(e.contains("a canvas of at least 224"), "{e}");
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
        // torch-em's get_vimunet_model: the encoder object; every size, the variant, the canvas
        // and the decoder from the state dict's shapes.
        let state_of = |config: &ModelConfig| -> BTreeMap<String, Tensor> {
            let m = Model::build(config.clone(), crate::Params::zeroed(&Device::Cpu)).unwrap();
            m.params()
                .all()
                .into_iter()
                .map(|(k, v)| (k, v.as_tensor().clone()))
                .collect()
        };
        let vim_record = |config: &ModelConfig| {
            let mut r = record(
                "torch_em.model.unetr.UNETR",
                json!({"encoder": "<object torch_em.model.vim.ViM>", "out_channels": 2,
                       "final_activation": "Sigmoid", "use_skip_connection": false,
                       "resize_input": false}),
            );
            r.state = state_of(config);
            r
        };
        for (kind, preset, canvas, conv_transpose) in [
            (ModelKind::VimUnetT, VimPreset::Paper, Canvas::Paper, false),
            (ModelKind::VimUnetT, VimPreset::Paper, Canvas::Paper, true),
            (
                ModelKind::VimUnetT,
                VimPreset::TorchEmCurrent,
                Canvas::Native(512),
                false,
            ),
            (
                ModelKind::VimUnetS,
                VimPreset::TorchEmCurrent,
                Canvas::Native(256),
                true,
            ),
        ] {
            let o = PresetOptions {
                conv_transpose,
                vim_preset: preset,
                canvas,
                ..PresetOptions::default()
            };
            let config = ModelConfig::preset(kind, 2, &o);
            let mut r = vim_record(&config);
            if preset == VimPreset::Paper {
                // The paper's code stores its RoPE tables (computed here, not parameters).
                let t = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
                r.state.insert("encoder.rope.freqs_cos".into(), t);
            }
            assert_eq!(r.model_config().unwrap(), config);
        }
        // A ViM of another size (torch-em's vim_b, or a small one) is a custom configuration.
        let mut small = ModelConfig::preset(ModelKind::VimUnetT, 2, &PresetOptions::default());
        if let NetConfig::VimUnet {
            encoder,
            decoder,
            canvas,
        } = &mut small.net
        {
            encoder.preset = VimPreset::TorchEmCurrent;
            encoder.embed_dim = 64;
            encoder.depth = 2;
            encoder.d_state = 8;
            encoder.num_classes = 10;
            decoder.embed_dim = 64;
            decoder.initial_features = 8;
            *canvas = Canvas::Native(64);
        }
        small.kind = None;
        assert_eq!(vim_record(&small).model_config().unwrap(), small);
        let mut broken = vim_record(&small);
        broken.state.remove("encoder.layers.0.mixer.A_log");
        let e = broken.model_config().unwrap_err().to_string();
        assert!(e.contains("no encoder.layers.0.mixer.A_log"), "{e}");
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
