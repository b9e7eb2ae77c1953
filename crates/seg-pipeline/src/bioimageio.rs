//! bioimage.io model packages (format 0.5): written from a model, and read back.
//!
//! A package is a zip of `rdf.yaml` (the description), the weights as a PyTorch state dict
//! (`pytorch_state_dict`, torch-em's key names), `architecture.py` (a `build` function that
//! constructs the torch-em network from its class name and constructor arguments, the form of
//! torch-em's own `init` records), a test input and the output this model gives for it
//! (`.npy`), a cover image (input | prediction) and a README; `rdf.yaml` holds the SHA-256 of
//! each file. Inputs are standardised per image (`zero_mean_unit_variance`, as `vimseg
//! predict` does). UNet, UNETR and the ViM-UNet that torch-em's `get_vimunet_model` builds are
//! written (that builder is the only way torch-em describes a ViM-UNet by arguments; other
//! ViM-UNet configurations are refused).
//!
//! Reading takes a package zip or folder of format 0.5 whose `pytorch_state_dict` weights
//! name a torch-em UNet2d, UNETR or `get_vimunet_model`, either through this `architecture.py` or as
//! `import_from: torch_em.model.unet` / `callable: UNet2d` with its arguments; the weights are
//! read without Python ([`vim_nets::torch_em::read_state_dict`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::Device;
use ndarray::{Array2, Array4, ArrayView2, Axis};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use vim_nets::torch_em::TorchEmCheckpoint;
use vim_nets::Model;

use crate::{Error, Result};

/// The description's file inside a package.
pub const RDF: &str = "rdf.yaml";
/// The format version written.
pub const FORMAT_VERSION: &str = "0.5.4";

const WEIGHTS: &str = "weights.pt";
const ARCHITECTURE: &str = "architecture.py";
const TEST_INPUT: &str = "test_input.npy";
const TEST_OUTPUT: &str = "test_output.npy";
const COVER: &str = "cover.png";
const README: &str = "README.md";
const SAMPLE_INPUT: &str = "sample_input.tif";
const SAMPLE_OUTPUT: &str = "sample_output.tif";

/// `array` as the bytes of a float32 TIFF.
fn tiff_bytes<D: ndarray::Dimension>(array: ndarray::ArrayView<f32, D>) -> Result<Vec<u8>> {
    let tmp = temporary_file(".tif")?;
    seg_io::tiff::write_tiff(tmp.path(), array, &Default::default())?;
    std::fs::read(tmp.path()).map_err(|source| Error::File {
        path: tmp.path().to_path_buf(),
        source,
    })
}

/// `architecture.py`: builds the torch-em network from the class name and arguments.
const ARCHITECTURE_SOURCE: &str = r#""""Builds a torch-em network from its class and constructor arguments.

Arguments that name a torch-em class ("torch_em.model.unetr.SingleDeconv2DBlock") are passed
as that class, as torch-em's own checkpoints record them.
"""

import importlib


def _resolve(value):
    if isinstance(value, str) and value.startswith("torch_em.") and value.count(".") >= 2:
        module, name = value.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)
    return value


def build(model_class, **model_kwargs):
    return _resolve(model_class)(**{k: _resolve(v) for k, v in model_kwargs.items()})
"#;

/// What a package says about its model beyond the network.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct PackageOptions {
    pub name: String,
    pub description: String,
    /// At least one.
    pub authors: Vec<String>,
    /// GitHub user names of the people who answer for the package (the bioimage.io model zoo
    /// asks for at least one).
    pub maintainers: Vec<String>,
    /// An SPDX identifier.
    pub license: String,
    pub tags: Vec<String>,
    /// One name per output channel (default `channel0`, …).
    pub channel_names: Option<Vec<String>>,
    /// Where the weights came from, for the README.
    pub source: String,
}

impl Default for PackageOptions {
    fn default() -> Self {
        PackageOptions {
            name: "vimseg model".into(),
            description: "A segmentation network trained with vimseg.".into(),
            authors: Vec::new(),
            maintainers: Vec::new(),
            license: "CC-BY-4.0".into(),
            tags: vec!["segmentation".into(), "instance-segmentation".into()],
            channel_names: None,
            source: String::new(),
        }
    }
}

/// A package read back: the model, whether its input is standardised first, and its
/// description's name.
pub struct Package {
    pub model: Model,
    pub standardize: bool,
    pub name: String,
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A little-endian f32 array as `.npy` (format 1.0).
fn npy_f32(shape: &[usize], values: impl Iterator<Item = f32>) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}{}), }}",
        dims.join(", "),
        if shape.len() == 1 { "," } else { "" }
    );
    // Magic (6) + version (2) + length (2) + header + newline, a multiple of 64.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    values.for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

/// Reads a little-endian f32 `.npy` (C order) as (shape, values).
fn read_npy_f32(bytes: &[u8], name: &str) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    let bad = |what: &str| format!("{name}: {what}");
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unknown .npy version")),
    };
    let header = bytes
        .get(start..start + len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("expected little-endian float32 in C order"));
    }
    let shape_text = header
        .split("'shape':")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .map(|r| r.trim().trim_start_matches('('))
        .ok_or_else(|| bad("no shape in the header"))?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("unreadable shape")))
        .collect::<std::result::Result<_, _>>()?;
    let data = &bytes[start + len..];
    let n: usize = shape.iter().product();
    if data.len() != n * 4 {
        return Err(bad(&format!(
            "{} data bytes for shape {shape:?}",
            data.len()
        )));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, values))
}

/// The model's prediction for `image` as the package's runner makes it: standardised, one
/// forward pass. (C, H, W).
fn package_prediction(model: &Model, image: ArrayView2<f32>) -> Result<ndarray::Array3<f32>> {
    let mut x = image.to_owned();
    seg_data::sampling::standardize(&mut x);
    Ok(seg_train::predict_image(model, x.view())?)
}

/// A temporary file (the PyTorch and TIFF readers and writers take paths), removed when
/// dropped.
fn temporary_file(suffix: &str) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .suffix(suffix)
        .tempfile()
        .map_err(|source| Error::File {
            path: std::env::temp_dir(),
            source,
        })
}

/// Writes `model` as a bioimage.io package zip at `out` (atomically), with `test_image` (whose
/// sides must be multiples of the model's size multiple) as its test input.
///
/// # Errors
/// [`Error::Option`] for missing authors, a ViM-UNet that torch-em's `get_vimunet_model` does not
/// build, or a test image of the wrong size; prediction and write errors.
pub fn export_package(
    model: &Model,
    out: &Path,
    test_image: ArrayView2<f32>,
    opts: &PackageOptions,
) -> Result<()> {
    let option = |option: &str, what: String| Error::Option {
        option: option.into(),
        what,
    };
    if opts.authors.iter().all(|a| a.trim().is_empty()) {
        return Err(option(
            "authors",
            "a bioimage.io package names at least one author".into(),
        ));
    }
    if let Some(bad) = opts.maintainers.iter().find(|u| {
        u.is_empty()
            || u.len() > 39
            || u.starts_with('-')
            || !u.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    }) {
        return Err(option(
            "maintainer",
            format!("{bad:?} is not a GitHub user name (letters, digits, hyphens; at most 39)"),
        ));
    }
    let (class, kwargs) = model.config().torch_em_init()?;
    let m = model.size_multiple();
    let (h, w) = test_image.dim();
    if h == 0 || w == 0 || !h.is_multiple_of(m) || !w.is_multiple_of(m) {
        return Err(option(
            "test image",
            format!("{h}×{w}: the sides must be positive multiples of {m}"),
        ));
    }
    let prediction = package_prediction(model, test_image)?;
    let channels = prediction.dim().0;
    let names = opts
        .channel_names
        .clone()
        .unwrap_or_else(|| (0..channels).map(|c| format!("channel{c}")).collect());
    if names.len() != channels {
        return Err(option(
            "channel names",
            format!("{} names for {channels} output channels", names.len()),
        ));
    }

    // The files, then their description.
    let weights_path = temporary_file(".pt")?;
    let tensors: Vec<(String, candle_core::Tensor)> = model
        .params()
        .all()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .chain(batch_counters(model))
        .collect();
    vim_nets::torch_em::write_state_dict(weights_path.path(), &tensors)?;
    let weights = std::fs::read(weights_path.path()).map_err(|source| Error::File {
        path: weights_path.path().to_path_buf(),
        source,
    })?;
    let test_input = npy_f32(&[1, 1, h, w], test_image.iter().copied());
    let test_output = npy_f32(&[1, channels, h, w], prediction.iter().copied());
    // The same tensors as images, the package's FAIR sample tensors.
    let sample_input = tiff_bytes(test_image)?;
    let sample_output = tiff_bytes(prediction.view())?;
    let boundary = prediction
        .index_axis(Axis(0), channels.min(2) - 1)
        .to_owned();
    let cover = crate::picture::png_bytes(&crate::picture::panels(
        &[
            crate::picture::Panel::Grey(crate::picture::grey_u8(&test_image.to_owned()).view()),
            crate::picture::Panel::Grey(
                boundary
                    .mapv(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                    .view(),
            ),
        ],
        4,
    ))?;
    let mut readme = readme(opts, &class, &names);
    if let Some(side) = model.max_side() {
        readme.push_str(&format!(
            "\n## Size\n\nThe network takes images of at most {side}×{side} pixels (its canvas); \
             larger images are predicted in tiles (`vimseg predict --tile`).\n"
        ));
    }
    if class.contains(".vim.") {
        readme.push_str(
            "\n## Requirements\n\nBuilding this network in Python needs torch-em with the \
             Vision Mamba package (`vim`, on `mamba-ssm`, whose selective-scan kernels need a CUDA \
             GPU). vimseg runs it on CPU or GPU without Python.\n",
        );
    }
    let architecture = ARCHITECTURE_SOURCE.as_bytes();

    let mut model_kwargs = kwargs;
    model_kwargs.insert("model_class".into(), Value::from(class.clone()));
    let space = |id: &str| json!({"type": "space", "id": id, "size": {"min": m, "step": m}});
    let same =
        |id: &str| json!({"type": "space", "id": id, "size": {"tensor_id": "raw", "axis_id": id}});
    let rdf = json!({
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": opts.name,
        "description": opts.description,
        "authors": opts.authors.iter().map(|a| json!({"name": a})).collect::<Vec<_>>(),
        "cite": [{
            "text": "Archit and Pape, ViM-UNet: Vision Mamba for Biomedical Segmentation, MIDL 2024",
            "doi": "10.48550/arXiv.2404.07705",
        }],
        "maintainers": opts
            .maintainers
            .iter()
            .map(|u| json!({"github_user": u}))
            .collect::<Vec<_>>(),
        "license": opts.license,
        "tags": opts.tags,
        "documentation": README,
        "covers": [COVER],
        "inputs": [{
            "id": "raw",
            "description": "a grey image",
            "axes": [
                {"type": "batch"},
                {"type": "channel", "channel_names": ["raw"]},
                space("y"),
                space("x"),
            ],
            "test_tensor": {"source": TEST_INPUT, "sha256": sha256(&test_input)},
            "sample_tensor": {"source": SAMPLE_INPUT, "sha256": sha256(&sample_input)},
            "data": {"type": "float32"},
            "preprocessing": [{
                "id": "zero_mean_unit_variance",
                "kwargs": {"axes": ["channel", "y", "x"], "eps": 1e-7},
            }],
        }],
        "outputs": [{
            "id": "prediction",
            "description": "per-pixel maps, one channel each",
            "axes": [
                {"type": "batch"},
                {"type": "channel", "channel_names": names},
                same("y"),
                same("x"),
            ],
            "test_tensor": {"source": TEST_OUTPUT, "sha256": sha256(&test_output)},
            "sample_tensor": {"source": SAMPLE_OUTPUT, "sha256": sha256(&sample_output)},
            "data": {"type": "float32"},
        }],
        "weights": {
            "pytorch_state_dict": {
                "source": WEIGHTS,
                "sha256": sha256(&weights),
                "architecture": {
                    "source": ARCHITECTURE,
                    "sha256": sha256(architecture),
                    "callable": "build",
                    "kwargs": model_kwargs,
                },
                "pytorch_version": "2.5",
            },
        },
    });
    let rdf = serde_yaml_ng::to_string(&rdf).map_err(|e| option("rdf.yaml", e.to_string()))?;

    let files: [(&str, &[u8]); 9] = [
        (RDF, rdf.as_bytes()),
        (WEIGHTS, &weights),
        (ARCHITECTURE, architecture),
        (TEST_INPUT, &test_input),
        (TEST_OUTPUT, &test_output),
        (COVER, &cover),
        (README, readme.as_bytes()),
        (SAMPLE_INPUT, &sample_input),
        (SAMPLE_OUTPUT, &sample_output),
    ];
    seg_io::atomic::write_atomically(out, |w| {
        let io = |e: zip::result::ZipError| seg_io::Error::Write {
            path: out.to_path_buf(),
            what: e.to_string(),
        };
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true);
        // The weights (float32 bits, already a zip) barely compress: stored, not deflated.
        let stored = options.compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in files {
            let options = if name == WEIGHTS { stored } else { options };
            zip.start_file(name, options).map_err(io)?;
            zip.write_all(bytes).map_err(|e| seg_io::Error::Write {
                path: out.to_path_buf(),
                what: e.to_string(),
            })?;
        }
        let bytes = zip.finish().map_err(io)?.into_inner();
        w.write_all(&bytes).map_err(|e| seg_io::Error::Write {
            path: out.to_path_buf(),
            what: e.to_string(),
        })
    })?;
    Ok(())
}

/// torch's BatchNorm layers carry a `num_batches_tracked` counter that a strict state-dict load
/// requires; this crate does not count batches, so each is written as 0 (it only matters for
/// BatchNorm without momentum, which torch-em does not use).
fn batch_counters(model: &Model) -> Vec<(String, candle_core::Tensor)> {
    model
        .params()
        .all()
        .iter()
        .filter_map(|(k, _)| k.strip_suffix(".running_mean"))
        .filter_map(|layer| {
            candle_core::Tensor::new(0i64, &Device::Cpu)
                .ok()
                .map(|t| (format!("{layer}.num_batches_tracked"), t))
        })
        .collect()
}

fn readme(opts: &PackageOptions, class: &str, names: &[String]) -> String {
    format!(
        "# {name}\n\n{description}\n\n## Network\n\n`{class}` from torch-em, built by \
         `architecture.py` from the arguments in `rdf.yaml`; weights in `{WEIGHTS}` \
         (PyTorch state dict){source}.\n\n## Input and output\n\nA grey image, standardised \
         per image (zero mean, unit variance); per-pixel output channels: {channels}. \
         Instances follow from these maps by seeded watershed (vimseg `segment`).\n\n\
         ## Validation\n\nThe test output is this model's prediction for the test input, \
         made by vimseg when the package was written; `vimseg predict --checkpoint \
         <package.zip>` reproduces it.\n",
        name = opts.name,
        description = opts.description,
        source = if opts.source.is_empty() {
            String::new()
        } else {
            format!(", from {}", opts.source)
        },
        channels = names.join(", "),
    )
}

/// The files of a package zip or folder.
enum Source {
    Zip(zip::ZipArchive<std::fs::File>),
    Folder(PathBuf),
}

impl Source {
    fn read(&mut self, package: &Path, name: &str) -> Result<Vec<u8>> {
        let missing = |what: String| Error::Input {
            path: package.to_path_buf(),
            what,
        };
        match self {
            Source::Zip(z) => {
                let mut f = z
                    .by_name(name)
                    .map_err(|e| missing(format!("{name}: {e}")))?;
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)
                    .map_err(|e| missing(format!("{name}: {e}")))?;
                Ok(bytes)
            }
            Source::Folder(dir) => {
                std::fs::read(dir.join(name)).map_err(|e| missing(format!("{name}: {e}")))
            }
        }
    }
}

/// Whether `path` is a bioimage.io package: a zip holding `rdf.yaml`, a folder holding it, or
/// an `rdf.yaml` itself.
pub fn is_package(path: &Path) -> bool {
    if path.is_dir() {
        return path.join(RDF).is_file();
    }
    if path.file_name().is_some_and(|n| n == RDF) {
        return true;
    }
    std::fs::File::open(path)
        .ok()
        .and_then(|f| zip::ZipArchive::new(f).ok())
        .is_some_and(|z| z.index_for_name(RDF).is_some())
}

/// Reads a package (zip, folder, or its `rdf.yaml`) onto `device`.
///
/// # Errors
/// [`Error::Input`] naming the package for an unreadable description, another format version
/// or type, no `pytorch_state_dict` weights, an architecture other than torch-em's UNet2d and
/// UNETR, a checksum that does not match, or preprocessing this crate does not apply; the
/// weights' and the strict load's errors.
pub fn load_package(path: &Path, device: &Device) -> Result<Package> {
    let (mut source, rdf) = open_package(path)?;
    load_from(path, &mut source, &rdf, device)
}

/// The files of the package at `path` (zip, folder, or its `rdf.yaml`) and its description.
fn open_package(path: &Path) -> Result<(Source, Value)> {
    let bad = |what: String| Error::Input {
        path: path.to_path_buf(),
        what,
    };
    let mut source = if path.is_dir() {
        Source::Folder(path.to_path_buf())
    } else if path.file_name().is_some_and(|n| n == RDF) {
        Source::Folder(path.parent().unwrap_or(Path::new(".")).to_path_buf())
    } else {
        let file = std::fs::File::open(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        Source::Zip(
            zip::ZipArchive::new(file)
                .map_err(|e| bad(format!("not a bioimage.io package (zip): {e}")))?,
        )
    };
    let text = source.read(path, RDF)?;
    let rdf: Value =
        serde_yaml_ng::from_slice(&text).map_err(|e| bad(format!("{RDF} does not parse: {e}")))?;
    Ok((source, rdf))
}

/// [`load_package`] from the opened package.
fn load_from(path: &Path, source: &mut Source, rdf: &Value, device: &Device) -> Result<Package> {
    let bad = |what: String| Error::Input {
        path: path.to_path_buf(),
        what,
    };
    let field = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let version = field(rdf, "format_version").unwrap_or_default();
    if !version.starts_with("0.5.") {
        return Err(bad(format!(
            "{RDF}: format_version {version:?} is not read (format 0.5.x model packages are; \
             bioimageio.spec's `update_format` converts older ones)"
        )));
    }
    if field(rdf, "type").as_deref() != Some("model") {
        return Err(bad(format!(
            "{RDF}: type {:?} is not a model",
            field(rdf, "type").unwrap_or_default()
        )));
    }
    let name = field(rdf, "name").unwrap_or_default();
    let weights = rdf.get("weights").cloned().unwrap_or(Value::Null);
    let Some(entry) = weights.get("pytorch_state_dict") else {
        let formats: Vec<String> = weights
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        return Err(bad(format!(
            "{RDF}: no pytorch_state_dict weights (the package has: {})",
            formats.join(", ")
        )));
    };
    let arch = entry.get("architecture").cloned().unwrap_or(Value::Null);
    let mut kwargs = arch
        .get("kwargs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let class = match (field(&arch, "import_from"), field(&arch, "callable")) {
        (Some(module), Some(callable)) => format!("{module}.{callable}"),
        (None, Some(callable)) if callable == "build" => match kwargs.remove("model_class") {
            Some(Value::String(c)) => c,
            _ => {
                return Err(bad(format!(
                    "{RDF}: build() without a model_class argument"
                )))
            }
        },
        _ => {
            return Err(bad(format!(
                "{RDF}: the architecture is not torch-em's UNet2d or UNETR (callable {:?})",
                field(&arch, "callable").unwrap_or_default()
            )))
        }
    };
    let weights_name = field(entry, "source").unwrap_or_default();
    let bytes = source.read(path, &weights_name)?;
    if let Some(expected) = field(entry, "sha256") {
        if sha256(&bytes) != expected {
            return Err(bad(format!(
                "{weights_name}: SHA-256 {} differs from rdf.yaml's {expected}",
                sha256(&bytes)
            )));
        }
    }
    // The weights are read from a file (the PyTorch reader takes a path).
    let tmp = temporary_file(".pt")?;
    std::fs::write(tmp.path(), &bytes).map_err(|source| Error::File {
        path: tmp.path().to_path_buf(),
        source,
    })?;
    let mut state = vim_nets::torch_em::read_state_dict(tmp.path())?;
    state.retain(|k, _| !k.ends_with(".num_batches_tracked"));
    let checkpoint = TorchEmCheckpoint {
        state,
        model_class: Some(class),
        model_kwargs: kwargs,
        iteration: None,
        epoch: None,
    };
    let config = checkpoint
        .model_config()
        .map_err(|e| bad(format!("{RDF}: {e}")))?;
    let model = Model::new(config, device, 0)?;
    model.params().load_tensors(
        &checkpoint.state,
        &format!("{}: {weights_name}", path.display()),
    )?;
    let preprocessing = rdf
        .pointer("/inputs/0/preprocessing")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut standardize = false;
    for step in &preprocessing {
        match field(step, "id").as_deref() {
            Some("zero_mean_unit_variance") => standardize = true,
            Some("ensure_dtype") => {}
            other => {
                return Err(bad(format!(
                    "{RDF}: input preprocessing {:?} is not applied here (supported: \
                     zero_mean_unit_variance, ensure_dtype)",
                    other.unwrap_or_default()
                )))
            }
        }
    }
    let postprocessing = rdf
        .pointer("/outputs/0/postprocessing")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for step in &postprocessing {
        if field(step, "id").as_deref() != Some("ensure_dtype") {
            return Err(bad(format!(
                "{RDF}: output postprocessing {:?} is not applied here (supported: none, \
                 ensure_dtype)",
                field(step, "id").unwrap_or_default()
            )));
        }
    }
    Ok(Package {
        model,
        standardize,
        name,
    })
}

/// A model to predict with, from a checkpoint folder, an exported folder, a torch-em `.pt`
/// ([`seg_train::checkpoint::load_for_inference`]) or a bioimage.io package.
pub struct Loaded {
    pub model: Model,
    /// What a package declares about standardising its input; `None` for the other forms.
    pub standardize: Option<bool>,
}

/// Loads any form [`Loaded`] names, with a one-line description of where it came from.
///
/// # Errors
/// Those of [`load_package`] and [`seg_train::checkpoint::load_for_inference`].
pub fn load_for_inference(path: &Path, device: &Device) -> Result<(Loaded, String)> {
    if is_package(path) {
        let p = load_package(path, device)?;
        let source = format!(
            "{} (bioimage.io package {:?})",
            p.model.config().name(),
            p.name
        );
        return Ok((
            Loaded {
                model: p.model,
                standardize: Some(p.standardize),
            },
            source,
        ));
    }
    let (model, source) = seg_train::checkpoint::load_for_inference(path, device)?;
    Ok((
        Loaded {
            model,
            standardize: None,
        },
        source,
    ))
}

/// The default test input of a package: a synthetic 256×256 EM image (grey levels 0–255).
pub fn default_test_image() -> Array2<f32> {
    let mut o = seg_data::synthetic::EmVolumeOptions::default();
    o.depth = 1;
    o.height = 256;
    o.width = 256;
    let (raw, _) = seg_data::synthetic::em_volume(&o, 0);
    raw.index_axis(Axis(0), 0).mapv(f32::from)
}

/// Checks a package's test output: the model's prediction for the test input, as the package
/// says to make it. Returns the largest absolute difference.
///
/// # Errors
/// Unreadable test tensors and prediction errors.
pub fn test_package(path: &Path, device: &Device) -> Result<f32> {
    let (mut source, rdf) = open_package(path)?;
    let package = load_from(path, &mut source, &rdf, device)?;
    let bad = |what: String| Error::Input {
        path: path.to_path_buf(),
        what,
    };
    let mut tensor = |pointer: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let name = rdf
            .pointer(pointer)
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("{RDF}: no {pointer}")))?
            .to_string();
        read_npy_f32(&source.read(path, &name)?, &name).map_err(bad)
    };
    let (in_shape, input) = tensor("/inputs/0/test_tensor/source")?;
    let (out_shape, expected) = tensor("/outputs/0/test_tensor/source")?;
    let [1, 1, h, w] = in_shape[..] else {
        return Err(bad(format!(
            "test input of shape {in_shape:?}: expected (1, 1, H, W)"
        )));
    };
    let image = Array2::from_shape_vec((h, w), input).map_err(|e| bad(e.to_string()))?;
    let prediction = if package.standardize {
        package_prediction(&package.model, image.view())?
    } else {
        seg_train::predict_image(&package.model, image.view())?
    };
    let expected = Array4::from_shape_vec(
        <[usize; 4]>::try_from(out_shape.as_slice())
            .map_err(|_| bad(format!("test output of shape {out_shape:?}")))?,
        expected,
    )
    .map_err(|e| bad(e.to_string()))?;
    let expected = expected.index_axis(Axis(0), 0);
    if expected.dim() != prediction.dim() {
        return Err(bad(format!(
            "test output {:?} but the model gives {:?}",
            expected.dim(),
            prediction.dim()
        )));
    }
    Ok(expected
        .iter()
        .zip(prediction.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max))
}
