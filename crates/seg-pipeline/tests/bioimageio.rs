//! bioimage.io packages written and read back.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use candle_core::Device;
use ndarray::Array2;
use seg_pipeline::bioimageio::{
    export_package, is_package, load_package, test_package, PackageOptions,
};
use vim_nets::{Model, ModelConfig, ModelKind, NetConfig, PresetOptions};

fn tiny_unet(seed: u64) -> Model {
    let mut c = ModelConfig::preset(ModelKind::UNet, 2, &PresetOptions::default());
    if let NetConfig::UNet(u) = &mut c.net {
        u.depth = 2;
        u.initial_features = 4;
    }
    Model::new(c, &Device::Cpu, seed).unwrap()
}

fn options() -> PackageOptions {
    let mut o = PackageOptions::default();
    o.authors = vec!["A. Tester".into()];
    o.maintainers = vec!["a-tester".into()];
    o.channel_names = Some(vec!["foreground".into(), "boundaries".into()]);
    o
}

fn image() -> Array2<f32> {
    Array2::from_shape_fn((32, 40), |(y, x)| ((y * 7 + x * 3) % 23) as f32 * 10.0)
}

/// The package's files, by name.
fn files(zip: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(zip).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            (f.name().unwrap().into_owned(), b)
        })
        .collect()
}

/// A copy of the package `zip` at `out` with each file passed through `change`.
fn rewrite(zip: &Path, out: &Path, change: &dyn Fn(&str, Vec<u8>) -> Vec<u8>) {
    let mut w = zip::ZipWriter::new(std::fs::File::create(out).unwrap());
    for (name, bytes) in files(zip) {
        w.start_file(name.clone(), zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(&change(&name, bytes)).unwrap();
    }
    w.finish().unwrap();
}

/// The weights' SHA-256 as rdf.yaml writes it.
fn weights_sha(f: &BTreeMap<String, Vec<u8>>) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(&f["weights.pt"])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let rdf = String::from_utf8(f["rdf.yaml"].clone()).unwrap();
    assert!(rdf.contains(&hex), "rdf.yaml holds the weights' checksum");
    hex
}

#[test]
fn a_package_written_here_reproduces_its_test_output_when_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.zip");
    let model = tiny_unet(5);
    export_package(&model, &out, image().view(), &options()).unwrap();
    assert!(is_package(&out));
    let f = files(&out);
    for name in [
        "rdf.yaml",
        "weights.pt",
        "architecture.py",
        "test_input.npy",
        "test_output.npy",
        "cover.png",
        "README.md",
        "sample_input.tif",
        "sample_output.tif",
    ] {
        assert!(f.contains_key(name), "{name} missing");
    }
    let rdf = String::from_utf8(f["rdf.yaml"].clone()).unwrap();
    assert!(rdf.contains("format_version: 0.5.4"), "{rdf}");
    assert!(
        rdf.contains("model_class: torch_em.model.unet.UNet2d"),
        "{rdf}"
    );
    assert!(rdf.contains("zero_mean_unit_variance"), "{rdf}");

    let package = load_package(&out, &Device::Cpu).unwrap();
    assert!(package.standardize);
    assert_eq!(package.model.config(), model.config());
    assert_eq!(test_package(&out, &Device::Cpu).unwrap(), 0.0);
    // The same from an unpacked folder.
    let folder = dir.path().join("unpacked");
    std::fs::create_dir(&folder).unwrap();
    for (name, bytes) in &f {
        std::fs::write(folder.join(name), bytes).unwrap();
    }
    assert!(is_package(&folder));
    assert_eq!(test_package(&folder, &Device::Cpu).unwrap(), 0.0);
    // Another model's weights (with their checksum) do not reproduce the test output.
    let other = dir.path().join("other.zip");
    export_package(&tiny_unet(6), &other, image().view(), &options()).unwrap();
    let other_files = files(&other);
    let swapped = dir.path().join("swapped.zip");
    rewrite(&out, &swapped, &|name, bytes| match name {
        "weights.pt" => other_files["weights.pt"].clone(),
        "rdf.yaml" => String::from_utf8(bytes)
            .unwrap()
            .replace(&weights_sha(&f), &weights_sha(&other_files))
            .into_bytes(),
        _ => bytes,
    });
    assert!(test_package(&swapped, &Device::Cpu).unwrap() > 1e-4);
}

#[test]
fn bad_packages_and_options_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.zip");
    let model = tiny_unet(1);
    let mut no_author = options();
    no_author.authors.clear();
    let e = export_package(&model, &out, image().view(), &no_author).unwrap_err();
    assert!(e.to_string().contains("at least one author"), "{e}");
    let mut bad_maintainer = options();
    bad_maintainer.maintainers = vec!["not a user!".into()];
    let e = export_package(&model, &out, image().view(), &bad_maintainer).unwrap_err();
    assert!(e.to_string().contains("not a GitHub user name"), "{e}");
    let odd = Array2::<f32>::zeros((30, 32));
    let e = export_package(&model, &out, odd.view(), &options()).unwrap_err();
    assert!(e.to_string().contains("multiples of 4"), "{e}");
    let vim = Model::new(
        ModelConfig::preset(ModelKind::VimUnetT, 2, &{
            let mut o = PresetOptions::default();
            o.canvas = vim_nets::Canvas::Native(32);
            o
        }),
        &Device::Cpu,
        0,
    )
    .unwrap();
    let e = export_package(&vim, &out, image().view(), &options()).unwrap_err();
    assert!(
        e.to_string().contains("only through") && e.to_string().contains("get_vimunet_model"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written on an error");

    export_package(&model, &out, image().view(), &options()).unwrap();
    let case = |name: &str, change: &dyn Fn(&str, Vec<u8>) -> Vec<u8>, expected: &str| {
        let p = dir.path().join(format!("{name}.zip"));
        rewrite(&out, &p, change);
        let e = load_package(&p, &Device::Cpu)
            .err()
            .expect(name)
            .to_string();
        assert!(e.contains(expected), "{name}: {e}");
        assert!(
            e.contains(&p.display().to_string()),
            "{name} names the file: {e}"
        );
    };
    let yaml = |f: fn(String) -> String| {
        move |name: &str, bytes: Vec<u8>| {
            if name == "rdf.yaml" {
                f(String::from_utf8(bytes).unwrap()).into_bytes()
            } else {
                bytes
            }
        }
    };
    case(
        "version",
        &yaml(|t| t.replace("format_version: 0.5.4", "format_version: 0.9.0")),
        "format_version \"0.9.0\" is not read",
    );
    case(
        "old-version",
        &yaml(|t| t.replace("format_version: 0.5.4", "format_version: 0.4.10")),
        "format_version \"0.4.10\" is not read",
    );
    case(
        "not-yaml",
        &yaml(|_| "type: [model\n".into()),
        "rdf.yaml does not parse",
    );
    case(
        "sha",
        &|name, mut bytes| {
            if name == "weights.pt" {
                let n = bytes.len();
                bytes[n - 200] ^= 1;
            }
            bytes
        },
        "SHA-256",
    );
    case(
        "class",
        &yaml(|t| t.replace("torch_em.model.unet.UNet2d", "my.Net")),
        "my.Net",
    );
    case(
        "preprocessing",
        &yaml(|t| t.replace("zero_mean_unit_variance", "scale_range")),
        "preprocessing \"scale_range\" is not applied",
    );
    case(
        "postprocessing",
        &yaml(|t| {
            // The output's keys are indented by two spaces whether `id` comes first or not.
            t.replace(
                "id: prediction\n",
                "id: prediction\n  postprocessing:\n  - id: binarize\n    kwargs:\n      \
                 threshold: 0.5\n",
            )
        }),
        "output postprocessing \"binarize\" is not applied",
    );
    case(
        "no-weights",
        &yaml(|t| t.replace("pytorch_state_dict:", "onnx:")),
        "no pytorch_state_dict weights (the package has: onnx)",
    );
    let not_zip = dir.path().join("junk.zip");
    std::fs::write(&not_zip, b"PK not really").unwrap();
    assert!(!is_package(&not_zip));
    let e = load_package(&not_zip, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a bioimage.io package"), "{e}");
}

/// A ViM-UNet as torch-em's get_vimunet_model builds it (ViM-T, the current encoder) goes out as a
/// package that names that builder, and comes back with the same configuration and outputs.
#[test]
fn a_vim_unet_package_names_torch_ems_builder_and_reads_back() {
    let mut o = PresetOptions::default();
    o.vim_preset = vim_nets::VimPreset::TorchEmCurrent;
    o.conv_transpose = false;
    let config = ModelConfig::preset(ModelKind::VimUnetT, 2, &o);
    let model = Model::new(config.clone(), &Device::Cpu, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vim.zip");
    let image = Array2::from_shape_fn((32, 48), |(y, x)| ((y * 5 + x * 3) % 19) as f32);
    export_package(&model, &out, image.view(), &options()).unwrap();
    let f = files(&out);
    let rdf = String::from_utf8(f["rdf.yaml"].clone()).unwrap();
    assert!(
        rdf.contains("model_class: torch_em.model.vim.get_vimunet_model")
            && rdf.contains("model_type: vim_t")
            && rdf.contains("with_cls_token: true")
            && rdf.contains("github_user: a-tester"),
        "{rdf}"
    );
    let loaded = load_package(&out, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config().net, config.net);
    assert_eq!(loaded.model.config().kind, Some(ModelKind::VimUnetT));
    // Every parameter comes back bit for bit (a prediction at the 1024 canvas costs about half
    // a minute on two cores; the test output check is exercised on the UNet packages).
    let theirs = loaded.model.params().all();
    let ours = model.params().all();
    assert_eq!(theirs.len(), ours.len());
    for ((ka, a), (kb, b)) in ours.iter().zip(theirs.iter()) {
        assert_eq!(ka, kb);
        let (a, b) = (a.as_tensor(), b.as_tensor());
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{ka}");
    }
}
