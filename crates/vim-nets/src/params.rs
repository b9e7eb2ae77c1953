//! Named parameters: creation with PyTorch's initialisations from a seeded generator,
//! strict safetensors loading under torch-em's state-dict names, atomic saving.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use cpu_ops::Kernels;

use crate::{Error, Result};

/// How a parameter is initialised when a model is built from scratch.
#[derive(Debug, Clone)]
pub enum Init {
    Zeros,
    Ones,
    /// Uniform on `[lo, hi)`.
    Uniform(f64, f64),
    /// PyTorch's default for `Linear`/`Conv` weights and biases:
    /// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (kaiming-uniform with a = √5).
    FanIn(usize),
    /// timm's `trunc_normal_(std)`: normal, redrawn outside ±2 (absolute).
    TruncNormal(f64),
    /// Explicit values (row-major).
    Values(Vec<f32>),
}

/// The seeded generator of initial values and stochastic depth (candle cannot seed its CPU
/// generator): seg-data's SplitMix64.
pub use seg_data::synthetic::SplitMix64 as Rng;

/// The generator of a model built from `seed` (the seed is mixed with a constant so that seed 0
/// does not start from state 0).
pub(crate) fn model_rng(seed: u64) -> Rng {
    Rng::new(seed ^ 0x5DEE_CE66_D1CE_4E5B)
}

fn init_values(init: &Init, n: usize, rng: &mut Rng) -> Vec<f32> {
    match init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Uniform(lo, hi) => (0..n)
            .map(|_| (lo + (hi - lo) * rng.uniform()) as f32)
            .collect(),
        Init::FanIn(fan_in) => {
            let bound = 1.0 / (*fan_in.max(&1) as f64).sqrt();
            (0..n)
                .map(|_| (-bound + 2.0 * bound * rng.uniform()) as f32)
                .collect()
        }
        Init::TruncNormal(std) => (0..n)
            .map(|_| loop {
                let v = std * rng.normal();
                if v.abs() <= 2.0 {
                    break v as f32;
                }
            })
            .collect(),
        Init::Values(v) => v.clone(),
    }
}

#[derive(Debug)]
struct Entry {
    var: Var,
    trainable: bool,
}

#[derive(Debug)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    rng: Rng,
    /// No initial values: tensors are zeros (lazily allocated pages on the CPU), no random
    /// draws; for counting parameters, or for weights that are loaded right after.
    zeroed: bool,
}

/// Every tensor of a model under its torch-em state-dict name: trainable parameters and
/// buffers (BatchNorm running statistics). Cloning shares the same tensors.
#[derive(Debug, Clone)]
pub struct Params {
    inner: Arc<Mutex<Inner>>,
    device: Device,
    kernels: Kernels,
}

/// Keys that torch-em's state dicts hold but that this crate computes or does not need:
/// BatchNorm's step counters and the precomputed RoPE tables.
fn is_ignorable_key(key: &str) -> bool {
    key.ends_with(".num_batches_tracked")
        || key.ends_with("rope.freqs_cos")
        || key.ends_with("rope.freqs_sin")
}

impl Params {
    pub fn new(device: &Device, seed: u64) -> Self {
        Params {
            inner: Arc::new(Mutex::new(Inner {
                entries: BTreeMap::new(),
                rng: model_rng(seed),
                zeroed: false,
            })),
            device: device.clone(),
            kernels: Kernels::default(),
        }
    }

    /// A store whose tensors start as zeros on `device`, with no initial values drawn: for
    /// counting the parameters of large models, or for weights loaded right after (650 M
    /// values for UNETR-H would otherwise be drawn and overwritten).
    pub fn zeroed(device: &Device) -> Self {
        let p = Params::new(device, 0);
        p.lock().zeroed = true;
        p
    }

    /// The same store, with `kernels` serving the layers built from it afterwards.
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The kernels that layers built from this store use.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The root scope (no prefix).
    pub fn root(&self) -> Scope {
        Scope {
            params: self.clone(),
            prefix: String::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn create(&self, name: String, shape: &[usize], init: &Init, trainable: bool) -> Result<Var> {
        let mut inner = self.lock();
        if inner.entries.contains_key(&name) {
            return Err(Error::Config {
                option: "parameter",
                value: name,
                problem: "defined twice".into(),
            });
        }
        if inner.zeroed {
            let var = Var::zeros(shape, DType::F32, &self.device)?;
            inner.entries.insert(
                name,
                Entry {
                    var: var.clone(),
                    trainable,
                },
            );
            return Ok(var);
        }
        let n: usize = shape.iter().product();
        let values = init_values(init, n, &mut inner.rng);
        if values.len() != n {
            return Err(Error::Config {
                option: "parameter",
                value: name,
                problem: format!("{} initial values for shape {shape:?}", values.len()),
            });
        }
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, &self.device)?)?;
        inner.entries.insert(
            name,
            Entry {
                var: var.clone(),
                trainable,
            },
        );
        Ok(var)
    }

    /// The trainable parameters, by name.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.lock()
            .entries
            .iter()
            .filter(|(_, e)| e.trainable)
            .map(|(k, e)| (k.clone(), e.var.clone()))
            .collect()
    }

    /// Every tensor (parameters and buffers), by name.
    pub fn all(&self) -> Vec<(String, Var)> {
        self.lock()
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), e.var.clone()))
            .collect()
    }

    /// The number of trainable elements (what PyTorch's `sum(p.numel() for p in
    /// model.parameters())` reports).
    pub fn count(&self) -> usize {
        self.lock()
            .entries
            .values()
            .filter(|e| e.trainable)
            .map(|e| e.var.elem_count())
            .sum()
    }

    /// Replaces every tensor by the one of the same name in `tensors`. Strict: a missing
    /// key, a shape mismatch or an unknown key (other than BatchNorm's step counters and
    /// the RoPE tables, which are computed) is an error naming the key.
    pub fn load_tensors(&self, tensors: &BTreeMap<String, Tensor>, source: &str) -> Result<()> {
        let inner = self.lock();
        let mut missing = Vec::new();
        for name in inner.entries.keys() {
            if !tensors.contains_key(name) {
                missing.push(name.clone());
            }
        }
        if !missing.is_empty() {
            return Err(Error::MissingTensors {
                source_name: source.to_string(),
                count: missing.len(),
                examples: missing.into_iter().take(5).collect(),
            });
        }
        for (name, entry) in &inner.entries {
            let t = &tensors[name];
            if t.dims() != entry.var.dims() {
                return Err(Error::Tensor {
                    source_name: source.to_string(),
                    key: name.clone(),
                    problem: format!(
                        "has shape {:?}, the model expects {:?}",
                        t.dims(),
                        entry.var.dims()
                    ),
                });
            }
        }
        let unexpected: Vec<&String> = tensors
            .keys()
            .filter(|k| !inner.entries.contains_key(*k) && !is_ignorable_key(k))
            .collect();
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedTensors {
                source_name: source.to_string(),
                count: unexpected.len(),
                examples: unexpected.into_iter().take(5).cloned().collect(),
            });
        }
        // Every tensor is checked before any is set, so a bad file leaves the model as it was.
        for name in inner.entries.keys() {
            let t = &tensors[name];
            if !t.dtype().is_float() {
                return Err(Error::Tensor {
                    source_name: source.to_string(),
                    key: name.clone(),
                    problem: format!("has dtype {:?}, expected a float", t.dtype()),
                });
            }
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let bad = values.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(Error::Tensor {
                    source_name: source.to_string(),
                    key: name.clone(),
                    problem: format!(
                        "holds {bad} non-finite value(s) (NaN or ±inf) of {}: the weights are \
                         broken",
                        values.len()
                    ),
                });
            }
        }
        for (name, entry) in &inner.entries {
            let t = &tensors[name];
            let t = t
                .to_dtype(entry.var.dtype())?
                .to_device(&self.device)?
                .contiguous()?;
            entry.var.set(&t)?;
        }
        Ok(())
    }

    /// Loads a safetensors file (a torch-em state dict exported with `scripts/torch_to_safetensors.py`
    /// or a file written by [`Params::save`]).
    pub fn load(&self, path: &Path) -> Result<()> {
        if !path.exists() {
            return Err(Error::WeightsFile {
                path: path.to_path_buf(),
                problem: "no such file".into(),
            });
        }
        let tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::WeightsFile {
                path: path.to_path_buf(),
                problem: format!("not a readable safetensors file: {e}"),
            })?;
        let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
        self.load_tensors(&tensors, &path.display().to_string())
    }

    /// Writes every tensor as safetensors, atomically (`seg_io::atomic`: temporary file,
    /// fsync, rename), so a crash leaves the previous file or the new one, never a torn one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .all()
            .into_iter()
            .map(|(k, v)| Ok((k, v.as_tensor().to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, t)| (k, t)), None).map_err(|e| {
                Error::WeightsFile {
                    path: path.to_path_buf(),
                    problem: format!("cannot serialise: {e}"),
                }
            })?;
        seg_io::atomic::write_atomically(path, |w| {
            use std::io::Write;
            w.write_all(&bytes).map_err(|source| seg_io::Error::Io {
                path: path.to_path_buf(),
                source,
            })
        })
        .map_err(|e| Error::WeightsFile {
            path: path.to_path_buf(),
            problem: format!("cannot write: {e}"),
        })
    }
}

/// A prefix inside [`Params`] (PyTorch's module path).
#[derive(Debug, Clone)]
pub struct Scope {
    params: Params,
    prefix: String,
}

impl Scope {
    /// The sub-scope `name` (`encoder` → `encoder.blocks` → …).
    pub fn pp(&self, name: impl std::fmt::Display) -> Scope {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Scope {
            params: self.params.clone(),
            prefix,
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A trainable parameter.
    pub fn param(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        Ok(self
            .params
            .create(self.full(name), shape, &init, true)?
            .as_tensor()
            .clone())
    }

    /// A buffer (saved and loaded, never trained), returned as a `Var` so it can be updated.
    pub fn buffer(&self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        self.params.create(self.full(name), shape, &init, false)
    }

    pub fn device(&self) -> &Device {
        &self.params.device
    }

    /// The kernels that serve the convolutions of layers built in this scope.
    pub fn kernels(&self) -> Kernels {
        self.params.kernels
    }

    pub fn dtype(&self) -> DType {
        DType::F32
    }

    /// Draws from the model's generator (used by initialisations that need extra draws).
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut Rng) -> T) -> T {
        f(&mut self.params.lock().rng)
    }
}
