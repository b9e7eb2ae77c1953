//! torch-em checkpoints read without Python. `fixtures/torch_em_unet.pt` is a checkpoint in
//! torch-em's layout (as `DefaultTrainer.save_checkpoint` writes it: counters, `model_state`,
//! Adam's `optimizer_state`, scheduler state, and an `init` record holding the model class, its
//! constructor arguments with class references, and a pickled dataset object) made by
//! `scripts/make_torch_em_checkpoint.py` from `fixtures/torch_em_unet.safetensors`;
//! `fixtures/torch_em_malicious.pt` has a `model_state` entry that would call `os.system` if
//! unpickled by Python.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use vim_nets::torch_em::read_checkpoint;
use vim_nets::{Model, ModelConfig, ModelKind, NetConfig, PresetOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The configuration of the fixture: torch-em `UNet2d(in_channels=1, out_channels=2, depth=2,
/// initial_features=4, gain=2, final_activation="Sigmoid")` with transposed-conv upsampling.
fn tiny_unet() -> ModelConfig {
    let mut c = ModelConfig::preset(ModelKind::UNet, 2, &PresetOptions::default());
    if let NetConfig::UNet(u) = &mut c.net {
        u.depth = 2;
        u.initial_features = 4;
    }
    c
}

/// A small ViM-UNet of torch-em's current variant (width 64, 2 layers, state 8, a 64² canvas,
/// decoder features 8, bilinear upsampling as `get_vimunet_model`'s default): a custom
/// configuration, which a torch-em checkpoint describes only through its state dict's shapes.
fn tiny_vim_unet() -> ModelConfig {
    let mut o = PresetOptions::default();
    o.canvas = vim_nets::Canvas::Native(64);
    o.conv_transpose = false;
    o.vim_preset = vim_nets::VimPreset::TorchEmCurrent;
    o.features = 8;
    let mut c = ModelConfig::preset(ModelKind::VimUnetT, 2, &o);
    if let NetConfig::VimUnet {
        encoder, decoder, ..
    } = &mut c.net
    {
        encoder.embed_dim = 64;
        encoder.depth = 2;
        encoder.d_state = 8;
        encoder.num_classes = 10;
        decoder.embed_dim = 64;
    }
    c.kind = None;
    c
}

/// Writes the fixtures' safetensors (run by hand, then the script).
#[test]
#[ignore]
fn write_torch_em_safetensors() {
    let m = Model::new(tiny_unet(), &Device::Cpu, 1).unwrap();
    m.save(&fixture("torch_em_unet.safetensors")).unwrap();
    let m = Model::new(tiny_vim_unet(), &Device::Cpu, 2).unwrap();
    m.save(&fixture("torch_em_vimunet.safetensors")).unwrap();
}

fn predict(m: &Model) -> Vec<f32> {
    let x: Vec<f32> = (0..32 * 32)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let x = Tensor::from_vec(x, (1, 1, 32, 32), &Device::Cpu).unwrap();
    m.forward(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn a_torch_em_checkpoint_predicts_as_its_safetensors_weights() {
    let (m, ckpt) = Model::from_torch_em(&fixture("torch_em_unet.pt"), &Device::Cpu).unwrap();
    assert_eq!(
        ckpt.model_class.as_deref(),
        Some("torch_em.model.unet.UNet2d")
    );
    assert_eq!(ckpt.iteration, Some(40));
    assert_eq!(m.config(), &tiny_unet());
    let reference = Model::from_safetensors(
        tiny_unet(),
        &fixture("torch_em_unet.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(predict(&m), predict(&reference));
}

#[test]
fn a_torch_em_vim_unet_checkpoint_predicts_as_its_safetensors_weights() {
    let (m, ckpt) = Model::from_torch_em(&fixture("torch_em_vimunet.pt"), &Device::Cpu).unwrap();
    assert_eq!(
        ckpt.model_class.as_deref(),
        Some("torch_em.model.unetr.UNETR")
    );
    assert_eq!(
        ckpt.model_kwargs["encoder"],
        "<object torch_em.model.vim.ViM>"
    );
    assert_eq!(m.config(), &tiny_vim_unet());
    let reference = Model::from_safetensors(
        tiny_vim_unet(),
        &fixture("torch_em_vimunet.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(predict(&m), predict(&reference));

    // The same weights described by torch-em's builder, get_vimunet_model (as bioimage.io
    // packages name it): the configuration still comes from the shapes, the builder's
    // arguments are checked against them.
    let mut built = ckpt.clone();
    built.model_class = Some("torch_em.model.vim.get_vimunet_model".into());
    built.model_kwargs = serde_json::json!({"out_channels": 2, "with_cls_token": true})
        .as_object()
        .unwrap()
        .clone();
    let config = built.model_config().unwrap();
    assert_eq!(config.net, m.config().net);
    built
        .model_kwargs
        .insert("model_type".into(), serde_json::json!("vim_t"));
    let e = built.model_config().unwrap_err().to_string();
    assert!(e.contains("model_type \"vim_t\" is 192 wide"), "{e}");
    built
        .model_kwargs
        .insert("with_cls_token".into(), serde_json::json!(false));
    let e = built.model_config().unwrap_err().to_string();
    assert!(e.contains("with_cls_token = false"), "{e}");
}

#[test]
fn what_is_not_tensor_data_or_not_a_checkpoint_is_refused() {
    let e = read_checkpoint(&fixture("torch_em_malicious.pt"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("torch_em_malicious.pt") && e.contains("system") && e.contains("refused"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    // A truncated zip.
    let bytes = std::fs::read(fixture("torch_em_unet.pt")).unwrap();
    let cut = dir.path().join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_checkpoint(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.pt"), "{e}");
    // Not a zip at all.
    let junk = dir.path().join("junk.pt");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let e = read_checkpoint(&junk).unwrap_err().to_string();
    assert!(e.contains("junk.pt") && e.contains("zip"), "{e}");
    // A state dict of another architecture: the strict load names what is missing.
    let ckpt = read_checkpoint(&fixture("torch_em_unet.pt")).unwrap();
    let other = Model::new(
        ModelConfig::preset(ModelKind::UNet, 2, &PresetOptions::default()),
        &Device::Cpu,
        0,
    )
    .unwrap();
    let e = other
        .params()
        .load_tensors(&ckpt.state, "torch_em_unet.pt")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("torch_em_unet.pt") && e.contains("missing"),
        "{e}"
    );
}

/// A state dict written here reads back unchanged (f32 weights and an i64 counter, a scalar
/// among them); `VIMSEG_KEEP_STATE_DICT=path` keeps the file, for checking it with
/// `torch.load(path, weights_only=True)`.
#[test]
fn written_state_dicts_read_back_unchanged() {
    use vim_nets::torch_em::{read_state_dict, write_state_dict};
    let m = Model::new(tiny_unet(), &Device::Cpu, 3).unwrap();
    let mut tensors: Vec<(String, Tensor)> = m
        .params()
        .all()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    tensors.push(("counter".into(), Tensor::new(7i64, &Device::Cpu).unwrap()));
    tensors.push((
        "long".into(),
        Tensor::new(&[[1i64, -2], [3, 1 << 40]], &Device::Cpu).unwrap(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = match std::env::var("VIMSEG_KEEP_STATE_DICT") {
        Ok(p) => PathBuf::from(p),
        Err(_) => dir.path().join("weights.pt"),
    };
    write_state_dict(&path, &tensors).unwrap();
    let back = read_state_dict(&path).unwrap();
    assert_eq!(back.len(), tensors.len());
    for (name, t) in &tensors {
        let b = &back[name];
        assert_eq!(b.dims(), t.dims(), "{name}");
        assert_eq!(b.dtype(), t.dtype(), "{name}");
        let values = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F64))
                .and_then(|t| t.to_vec1::<f64>())
                .unwrap()
        };
        assert_eq!(values(b), values(t), "{name}");
    }
    // The same weights load into the model strictly.
    let m2 = Model::new(tiny_unet(), &Device::Cpu, 4).unwrap();
    let mut state = back.clone();
    state.remove("counter");
    state.remove("long");
    m2.params().load_tensors(&state, "weights.pt").unwrap();
    assert_eq!(predict(&m), predict(&m2));
    // A bare state dict is not a torch-em checkpoint, and a checkpoint not a bare state dict.
    let e = read_checkpoint(&path).unwrap_err().to_string();
    assert!(e.contains("no model_state entry"), "{e}");
    assert!(read_state_dict(&fixture("torch_em_malicious.pt")).is_err());
}
