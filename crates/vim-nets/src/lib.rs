#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod decoder;
pub mod layers;
pub mod memory;
pub use layers::Autocast;
pub use memory::{MemoryEstimate, Pass};
pub mod params;
pub mod sam;
pub mod torch_em;
pub mod unet;
pub mod vim;

use std::path::{Path, PathBuf};

/// Which CPU kernels serve a model's convolutions and resampling
/// ([`Model::new_with_kernels`]).
pub use cpu_ops::Kernels;

use candle_core::{Device, Tensor};

pub use decoder::{DecoderConfig, UnetrDecoder};
pub use params::{Init, Params, Rng, Scope};
pub use sam::{SamConfig, SamEncoder};
pub use unet::{UNet, UNetConfig};
pub use vim::{VimConfig, VimEncoder, VimPreset};

/// Errors of `vim-nets`. Each variant names the shape, option, tensor or file at fault.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An input the model cannot take; `shape` is the input's, `problem` says what to do.
    #[error("input of shape {shape:?}: {problem}")]
    Input { shape: Vec<usize>, problem: String },
    /// A configuration value that cannot be built.
    #[error("{option} = {value}: {problem}")]
    Config {
        option: &'static str,
        value: String,
        problem: String,
    },
    /// A weights source (file or state dict) lacks tensors the model has.
    #[error("{source_name}: {count} tensor(s) missing, e.g. {}", examples.join(", "))]
    MissingTensors {
        source_name: String,
        count: usize,
        examples: Vec<String>,
    },
    /// A weights source holds tensors the model does not have.
    #[error("{source_name}: {count} unexpected tensor(s), e.g. {}", examples.join(", "))]
    UnexpectedTensors {
        source_name: String,
        count: usize,
        examples: Vec<String>,
    },
    /// A tensor of the weights has another shape or dtype than the model's.
    #[error("{source_name}: {key} {problem}")]
    Tensor {
        source_name: String,
        key: String,
        problem: String,
    },
    /// A weights file that cannot be read or written.
    #[error("{path}: {problem}")]
    WeightsFile { path: PathBuf, problem: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The architectures of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    #[serde(rename = "unet")]
    UNet,
    UnetrB,
    UnetrL,
    UnetrH,
    VimUnetT,
    VimUnetS,
}

impl ModelKind {
    pub const ALL: [ModelKind; 6] = [
        ModelKind::UNet,
        ModelKind::UnetrB,
        ModelKind::UnetrL,
        ModelKind::UnetrH,
        ModelKind::VimUnetT,
        ModelKind::VimUnetS,
    ];

    /// The command-line name (`unet`, `unetr-b`, …, `vim-unet-s`).
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::UNet => "unet",
            ModelKind::UnetrB => "unetr-b",
            ModelKind::UnetrL => "unetr-l",
            ModelKind::UnetrH => "unetr-h",
            ModelKind::VimUnetT => "vim-unet-t",
            ModelKind::VimUnetS => "vim-unet-s",
        }
    }

    /// The paper's label (`UNet`, `UNETR Base`, …).
    pub fn label(self) -> &'static str {
        match self {
            ModelKind::UNet => "UNet",
            ModelKind::UnetrB => "UNETR Base",
            ModelKind::UnetrL => "UNETR Large",
            ModelKind::UnetrH => "UNETR Huge",
            ModelKind::VimUnetT => "ViM-UNet Tiny",
            ModelKind::VimUnetS => "ViM-UNet Small",
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ModelKind::ALL
            .into_iter()
            .find(|k| k.name() == s.to_ascii_lowercase())
            .ok_or_else(|| Error::Config {
                option: "model",
                value: format!("{s:?}"),
                problem: format!(
                    "unknown model; expected one of {}",
                    ModelKind::ALL.map(|k| k.name()).join(", ")
                ),
            })
    }
}

/// The square canvas a ViT/ViM encoder sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Canvas {
    /// The paper's: every input is padded (UNETR: resized, then padded) to 1024², 64² tokens.
    Paper,
    /// A canvas of this side (a multiple of 16), position embeddings sized for it: a 512²
    /// patch then gives 1024 tokens instead of 4096.
    Native(usize),
}

impl Canvas {
    pub fn side(self) -> usize {
        match self {
            Canvas::Paper => 1024,
            Canvas::Native(s) => s,
        }
    }
}

/// The architecture and its hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetConfig {
    #[serde(rename = "unet")]
    UNet(UNetConfig),
    Unetr {
        encoder: SamConfig,
        decoder: DecoderConfig,
        /// Resize the longest side to the canvas (torch-em's default for UNETR).
        resize_input: bool,
        canvas: Canvas,
    },
    VimUnet {
        encoder: VimConfig,
        decoder: DecoderConfig,
        canvas: Canvas,
    },
}

/// A complete model description (stored with every checkpoint).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// The preset it came from, if any.
    pub kind: Option<ModelKind>,
    pub net: NetConfig,
}

/// The options of [`ModelConfig::preset`]; the defaults are the paper's runs.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PresetOptions {
    pub canvas: Canvas,
    /// UNETR: use the encoder's intermediate maps (torch-em's default; the paper's runs: off).
    pub skip_connections: bool,
    /// Transposed-conv upsampling (the paper's runs) or bilinear + 1×1 conv.
    pub conv_transpose: bool,
    pub vim_preset: VimPreset,
    pub sigmoid: bool,
    /// The UNet's initial features and the UNETR/ViM decoder's (torch-em: 64 for both). Smaller
    /// values make the conv parts cheaper for CPU runs; the encoders keep the paper's sizes.
    pub features: usize,
}

impl Default for PresetOptions {
    fn default() -> Self {
        PresetOptions {
            canvas: Canvas::Paper,
            skip_connections: false,
            conv_transpose: true,
            vim_preset: VimPreset::Paper,
            sigmoid: true,
            features: 64,
        }
    }
}

impl ModelConfig {
    /// The paper's configuration of `kind` with `out_channels` outputs.
    pub fn preset(kind: ModelKind, out_channels: usize, opts: &PresetOptions) -> Self {
        let decoder = |embed_dim: usize, skips: bool| DecoderConfig {
            embed_dim,
            in_chans: 3,
            out_channels,
            initial_features: opts.features,
            skip_connections: skips,
            conv_transpose: opts.conv_transpose,
            sigmoid: opts.sigmoid,
        };
        let sam = |encoder: SamConfig| NetConfig::Unetr {
            decoder: decoder(encoder.embed_dim, opts.skip_connections),
            encoder,
            resize_input: true,
            canvas: opts.canvas,
        };
        let vim = |encoder: VimConfig| NetConfig::VimUnet {
            decoder: decoder(encoder.embed_dim, false),
            encoder,
            canvas: opts.canvas,
        };
        let net = match kind {
            ModelKind::UNet => NetConfig::UNet(UNetConfig {
                in_channels: 1,
                out_channels,
                depth: 4,
                initial_features: opts.features,
                gain: 2,
                conv_transpose: opts.conv_transpose,
                sigmoid: opts.sigmoid,
            }),
            ModelKind::UnetrB => sam(SamConfig::vit_b()),
            ModelKind::UnetrL => sam(SamConfig::vit_l()),
            ModelKind::UnetrH => sam(SamConfig::vit_h()),
            ModelKind::VimUnetT => vim(VimConfig::tiny(opts.vim_preset)),
            ModelKind::VimUnetS => vim(VimConfig::small(opts.vim_preset)),
        };
        ModelConfig {
            kind: Some(kind),
            net,
        }
    }

    /// The number of trainable parameters, without drawing initial values.
    pub fn parameter_count(&self) -> Result<usize> {
        Ok(Model::build(self.clone(), Params::zeroed(&Device::Cpu))?.parameter_count())
    }

    pub fn out_channels(&self) -> usize {
        match &self.net {
            NetConfig::UNet(c) => c.out_channels,
            NetConfig::Unetr { decoder, .. } | NetConfig::VimUnet { decoder, .. } => {
                decoder.out_channels
            }
        }
    }

    /// A short display name.
    pub fn name(&self) -> String {
        match self.kind {
            Some(k) => k.name().to_string(),
            None => match &self.net {
                NetConfig::UNet(_) => "unet (custom)".into(),
                NetConfig::Unetr { .. } => "unetr (custom)".into(),
                NetConfig::VimUnet { .. } => "vim-unet (custom)".into(),
            },
        }
    }
}

#[derive(Debug)]
enum Net {
    UNet(UNet),
    Unetr {
        encoder: SamEncoder,
        decoder: UnetrDecoder,
        resize_input: bool,
        canvas: usize,
    },
    VimUnet {
        encoder: VimEncoder,
        decoder: UnetrDecoder,
        canvas: usize,
    },
}

/// A built model: its configuration, its parameters and the forward pass.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    params: Params,
    net: Net,
    /// Whether training forwards checkpoint their blocks (see [`checkpoint`]).
    checkpoint: std::sync::atomic::AtomicBool,
    stash: Option<checkpoint::Stash>,
}

fn check_canvas(side: usize, patch: usize) -> Result<usize> {
    if side == 0 || !side.is_multiple_of(patch) {
        return Err(Error::Config {
            option: "canvas",
            value: side.to_string(),
            problem: format!("not a positive multiple of the patch size {patch}"),
        });
    }
    Ok(side / patch)
}

impl Model {
    /// Builds `config` with fresh parameters initialised as torch-em does, from `seed`.
    pub fn new(config: ModelConfig, device: &Device, seed: u64) -> Result<Self> {
        Model::build(config, Params::new(device, seed))
    }

    /// [`Model::new`] with `kernels` serving its convolutions and resampling (the default,
    /// [`Kernels::Auto`], is the fastest measured; the others are for benchmarks and checks).
    pub fn new_with_kernels(
        config: ModelConfig,
        device: &Device,
        seed: u64,
        kernels: Kernels,
    ) -> Result<Self> {
        Model::build(config, Params::new(device, seed).with_kernels(kernels))
    }

    fn build(config: ModelConfig, params: Params) -> Result<Self> {
        let features = match &config.net {
            NetConfig::UNet(c) => c.initial_features,
            NetConfig::Unetr { decoder, .. } | NetConfig::VimUnet { decoder, .. } => {
                decoder.initial_features
            }
        };
        if features == 0 {
            return Err(Error::Config {
                option: "features",
                value: "0".into(),
                problem: "the initial features must be at least 1".into(),
            });
        }
        let s = params.root();
        let net = match &config.net {
            NetConfig::UNet(c) => {
                if c.depth == 0 {
                    return Err(Error::Config {
                        option: "depth",
                        value: "0".into(),
                        problem: "a UNet needs depth ≥ 1".into(),
                    });
                }
                Net::UNet(UNet::new(&s, c)?)
            }
            NetConfig::Unetr {
                encoder,
                decoder,
                resize_input,
                canvas,
            } => {
                let grid = check_canvas(canvas.side(), encoder.patch_size)?;
                Net::Unetr {
                    encoder: SamEncoder::new(&s.pp("encoder"), encoder, decoder.in_chans, grid)?,
                    decoder: UnetrDecoder::new(&s, decoder)?,
                    resize_input: *resize_input,
                    canvas: canvas.side(),
                }
            }
            NetConfig::VimUnet {
                encoder,
                decoder,
                canvas,
            } => {
                let grid = check_canvas(canvas.side(), encoder.patch_size)?;
                Net::VimUnet {
                    encoder: VimEncoder::new(&s.pp("encoder"), encoder, decoder.in_chans, grid)?,
                    decoder: UnetrDecoder::new(&s, decoder)?,
                    canvas: canvas.side(),
                }
            }
        };
        let stash = params
            .trainable()
            .first()
            .map(|(_, v)| checkpoint::Stash::new(v.as_tensor().clone()));
        Ok(Model {
            config,
            params,
            net,
            checkpoint: Default::default(),
            stash,
        })
    }

    /// Builds `config` and loads its weights from a safetensors file (strict).
    /// No initial values are drawn.
    pub fn from_safetensors(config: ModelConfig, path: &Path, device: &Device) -> Result<Self> {
        let model = Model::build(config, Params::zeroed(device))?;
        model.params.load(path)?;
        Ok(model)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn params(&self) -> &Params {
        &self.params
    }
    /// The number of trainable parameters (unused encoder neck/head included, as torch-em counts).
    pub fn parameter_count(&self) -> usize {
        self.params.count()
    }
    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// Input sizes must be multiples of this (the UNet's 2^depth; the ViT/ViM models pad
    /// internally to their canvas).
    pub fn size_multiple(&self) -> usize {
        match &self.config.net {
            NetConfig::UNet(c) => 1 << c.depth,
            _ => 1,
        }
    }

    /// The largest input side a ViM-UNet accepts (its canvas); None for models without a limit.
    pub fn max_side(&self) -> Option<usize> {
        match &self.net {
            Net::VimUnet { canvas, .. } => Some(*canvas),
            _ => None,
        }
    }

    /// torch-em's UNETR pre-processing: grey → 3 channels, optional longest-side resize, zero
    /// pad to the canvas. Returns the padded input and the size before padding.
    fn preprocess(
        &self,
        x: &Tensor,
        canvas: usize,
        resize: bool,
    ) -> Result<(Tensor, (usize, usize))> {
        let (b, c, h, w) = x.dims4()?;
        let x = match c {
            1 => x.broadcast_as((b, 3, h, w))?.contiguous()?,
            3 => x.clone(),
            _ => {
                return Err(Error::Input {
                    shape: x.dims().to_vec(),
                    problem: format!("the ViT/ViM models take 1 or 3 input channels, got {c}"),
                })
            }
        };
        let x = if resize {
            let scale = canvas as f64 / h.max(w) as f64;
            let nh = (h as f64 * scale + 0.5) as usize;
            let nw = (w as f64 * scale + 0.5) as usize;
            layers::resize_bilinear(&x, nh, nw, true, self.params.kernels())?
        } else {
            if h > canvas || w > canvas {
                return Err(Error::Input {
                    shape: x.dims().to_vec(),
                    problem: format!(
                        "{h}×{w} is larger than the model's {canvas}×{canvas} canvas: predict it \
                         in tiles"
                    ),
                });
            }
            x
        };
        let (_, _, nh, nw) = x.dims4()?;
        let x = x
            .pad_with_zeros(2, 0, canvas - nh)?
            .pad_with_zeros(3, 0, canvas - nw)?;
        Ok((x, (nh, nw)))
    }

    fn postprocess(
        &self,
        y: &Tensor,
        size: (usize, usize),
        original: (usize, usize),
    ) -> Result<Tensor> {
        let y = y.narrow(2, 0, size.0)?.narrow(3, 0, size.1)?;
        layers::resize_bilinear(&y, original.0, original.1, false, self.params.kernels())
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let dims = x.dims();
        if dims.len() != 4 {
            return Err(Error::Input {
                shape: dims.to_vec(),
                problem: "expected (batch, channels, height, width)".into(),
            });
        }
        if dims.contains(&0) {
            return Err(Error::Input {
                shape: dims.to_vec(),
                problem: "the input is empty".into(),
            });
        }
        Ok(())
    }

    /// The encoder's map (B, D, g, g) for a ViT/ViM model (after pre-processing).
    pub fn encode(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let _no_grad = (!train).then(layers::NoGrad::new);
        self.check_input(x)?;
        match &self.net {
            Net::UNet(_) => Err(Error::Config {
                option: "model",
                value: "unet".into(),
                problem: "a UNet has no separate encoder map".into(),
            }),
            Net::Unetr {
                encoder,
                resize_input,
                canvas,
                ..
            } => Ok(encoder
                .forward(&self.preprocess(x, *canvas, *resize_input)?.0)?
                .0),
            Net::VimUnet {
                encoder, canvas, ..
            } => encoder.forward(&self.preprocess(x, *canvas, false)?.0, train),
        }
    }

    /// Activation checkpointing: with `on`, training forwards of UNETR and ViM-UNet keep only
    /// the input and output of each encoder block and decoder deconv block and recompute the
    /// block's inside in the backward pass (less memory, about one more forward's time; the UNet is
    /// not checkpointed, see `forward`). Gradients are taken with [`Model::backward`].
    pub fn set_checkpoint_activations(&self, on: bool) {
        self.checkpoint
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn checkpoint_activations(&self) -> bool {
        self.checkpoint.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The gradients of `loss` (a scalar computed from this model's training forward), the
    /// checkpointed blocks' parameters included, detached from the forward graph (so dropping
    /// the loss frees the activations; see [`checkpoint::detached`]). The same values as
    /// `loss.backward()`.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        if let Some(stash) = &self.stash {
            drop(stash.take());
        }
        let mut grads = checkpoint::detached(loss.backward()?);
        if let Some(stash) = &self.stash {
            grads.extend(stash.take())?;
        }
        Ok(grads)
    }

    /// (B, C_in, H, W) → (B, C_out, H, W). `train` selects training behaviour (batch
    /// statistics in BatchNorm, stochastic depth); prediction uses `false`.
    ///
    /// With `train = false` no gradient graph is recorded (as under PyTorch's `no_grad`):
    /// intermediates are freed as the forward goes, which is what makes 1024² inference fit in
    /// memory. Train mode records the graph for [`Model::backward`].
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let _no_grad = (!train).then(layers::NoGrad::new);
        self.check_input(x)?;
        if let Some(stash) = self.stash.as_ref().filter(|s| !s.is_empty()) {
            drop(stash.take());
            return Err(Error::Config {
                option: "checkpoint_activations",
                value: "true".into(),
                problem: "the gradients of the checkpointed blocks from the last backward pass \
                          were not collected (they are discarded now): take gradients with \
                          Model::backward"
                    .into(),
            });
        }
        let _segments = checkpoint::Segments::set(self.stash.clone().filter(|_| train));
        let stash = self
            .stash
            .as_ref()
            .filter(|_| train && self.checkpoint_activations());
        let (_, _, h, w) = x.dims4()?;
        // Under layers::Autocast the network runs in the compute dtype; the output is f32.
        let x = &x.to_dtype(layers::compute_dtype())?;
        let y = match &self.net {
            // The UNet's conv blocks keep only their input, middle and output already:
            // checkpointing them measured a higher peak (the recomputation's transients) and a
            // quarter more time per step (`cargo xtask bench models --checkpointing`), so the
            // model does not checkpoint them.
            Net::UNet(u) => u.forward(x),
            Net::Unetr {
                encoder,
                decoder,
                resize_input,
                canvas,
            } => {
                let (input, size) = self.preprocess(x, *canvas, *resize_input)?;
                checkpoint::stage("input on the canvas");
                let (z12, inter) = encoder.forward_checkpointed(&input, stash)?;
                let y = decoder.forward_checkpointed(&z12, &inter, &input, train, stash)?;
                self.postprocess(&y, size, (h, w))
            }
            Net::VimUnet {
                encoder,
                decoder,
                canvas,
            } => {
                let (input, size) = self.preprocess(x, *canvas, false)?;
                checkpoint::stage("input on the canvas");
                let z12 = encoder.forward_checkpointed(&input, train, stash)?;
                let y = decoder.forward_checkpointed(&z12, &[], &input, train, stash)?;
                self.postprocess(&y, size, (h, w))
            }
        }?;
        let y = y.to_dtype(candle_core::DType::F32)?;
        checkpoint::stage("output");
        Ok(y)
    }

    /// Restarts the generator of stochastic depth (the only random draw in a forward pass)
    /// from `seed`; a trainer that reseeds every step makes resumed runs repeat exactly.
    pub fn reseed(&self, seed: u64) {
        if let Net::VimUnet { encoder, .. } = &self.net {
            encoder.reseed(seed);
        }
    }

    /// Saves every tensor (torch-em names) as safetensors, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.params.save(path)
    }

    /// Loads weights (strict: every tensor, right shapes, no unknown keys).
    pub fn load(&self, path: &Path) -> Result<()> {
        self.params.load(path)
    }

    /// Writes the model for use outside a training run: `dir/model.safetensors` (torch-em's
    /// state-dict names) and `dir/config.json` (its [`ModelConfig`]), each atomically; read back
    /// with [`Model::load_exported`].
    ///
    /// # Errors
    /// [`Error::WeightsFile`] when a file cannot be written.
    pub fn export(&self, dir: &Path) -> Result<()> {
        let fail = |path: &Path, e: &dyn std::fmt::Display| Error::WeightsFile {
            path: path.to_path_buf(),
            problem: format!("cannot write: {e}"),
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(dir, &e))?;
        self.save(&dir.join(EXPORTED_WEIGHTS))?;
        let json = serde_json::to_string_pretty(&self.config).map_err(|e| fail(dir, &e))?;
        let path = dir.join(EXPORTED_CONFIG);
        seg_io::atomic::write_atomically(&path, |w| {
            use std::io::Write;
            w.write_all(json.as_bytes())
                .map_err(|source| seg_io::Error::Io {
                    path: path.clone(),
                    source,
                })
        })
        .map_err(|e| fail(&path, &e))
    }

    /// Reads a model written by [`Model::export`].
    ///
    /// # Errors
    /// [`Error::WeightsFile`] for a missing or invalid `config.json`, and the strict load's errors.
    pub fn load_exported(dir: &Path, device: &Device) -> Result<Model> {
        let path = dir.join(EXPORTED_CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::WeightsFile {
            path: path.clone(),
            problem: format!("cannot read: {e}"),
        })?;
        let config: ModelConfig = serde_json::from_str(&text).map_err(|e| Error::WeightsFile {
            path: path.clone(),
            problem: format!("not a model configuration: {e}"),
        })?;
        Model::from_safetensors(config, &dir.join(EXPORTED_WEIGHTS), device)
    }
}

/// The weights file of an exported model folder.
pub const EXPORTED_WEIGHTS: &str = "model.safetensors";
/// The configuration file of an exported model folder.
pub const EXPORTED_CONFIG: &str = "config.json";
