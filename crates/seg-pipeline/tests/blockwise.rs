//! Blockwise prediction into OME-Zarr: equal to the in-memory tiled prediction bit for bit,
//! resumable after an interruption, refusing a rerun with other settings.

use std::cell::Cell;

use candle_core::{Device, Tensor};
use ndarray::{s, Array3};
use seg_io::volume::{open_image, Element, InMemory, VolumeSource, ZarrArray};
use seg_pipeline::blockwise::{predict_to_zarr, BlockwiseOptions};
use seg_train::{predict_tiled, Predictor, TileOptions};
use vim_nets::{Model, ModelConfig, ModelKind, NetConfig, PresetOptions};

fn tiny_unet() -> Model {
    let mut c = ModelConfig::preset(ModelKind::UNet, 2, &PresetOptions::default());
    if let NetConfig::UNet(u) = &mut c.net {
        u.depth = 2;
        u.initial_features = 4;
    }
    Model::new(c, &Device::Cpu, 7).unwrap()
}

fn volume() -> Array3<f32> {
    Array3::from_shape_fn((2, 70, 90), |(z, y, x)| {
        ((z * 13 + y * 7 + x * 3) % 29) as f32 * 4.0 + (y as f32 / 9.0).sin() * 20.0
    })
}

fn options() -> BlockwiseOptions {
    let mut o = BlockwiseOptions::default();
    o.block = 32;
    o.halo = 8;
    o.model = "tiny unet".into();
    o
}

/// A model that fails after `left` predictions (an interruption in the middle of a run).
struct FailAfter<'a> {
    model: &'a Model,
    left: Cell<usize>,
}

impl Predictor for FailAfter<'_> {
    fn predict(&self, x: &Tensor, train: bool) -> seg_train::Result<Tensor> {
        if self.left.get() == 0 {
            return Err(seg_train::Error::Memory("interrupted".into()));
        }
        self.left.set(self.left.get() - 1);
        self.model.predict(x, train)
    }
    fn size_multiple(&self) -> usize {
        Predictor::size_multiple(self.model)
    }
    fn max_side(&self) -> Option<usize> {
        Predictor::max_side(self.model)
    }
    fn device(&self) -> &Device {
        Predictor::device(self.model)
    }
}

fn read_all(path: &std::path::Path) -> ndarray::ArrayD<f32> {
    let a = ZarrArray::open(path).unwrap();
    let ranges: Vec<_> = a.shape().iter().map(|&n| 0..n).collect();
    a.read_f32(&ranges).unwrap()
}

#[test]
fn blockwise_prediction_equals_the_tiled_prediction_and_resumes() {
    let model = tiny_unet();
    let data = volume();
    let input = InMemory {
        data: data.clone(),
        name: "volume".into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pred.ome.zarr");
    let summary = predict_to_zarr(&model, &input, &out, &options()).unwrap();
    assert_eq!((summary.blocks, summary.already_done), (2 * 3 * 3, 0));
    let got = read_all(&summary.array);
    assert_eq!(got.shape(), &[2, 2, 70, 90]);
    let mut tile = TileOptions::default();
    tile.block = (32, 32);
    tile.halo = (8, 8);
    for z in 0..2 {
        let expected = predict_tiled(&model, data.index_axis(ndarray::Axis(0), z), &tile).unwrap();
        let slice = got.slice(s![.., z, .., ..]);
        assert_eq!(slice, expected.view(), "slice {z}");
    }
    // OME-Zarr metadata beside the array.
    let meta = std::fs::read_to_string(out.join("zarr.json")).unwrap();
    assert!(meta.contains("\"multiscales\"") && meta.contains("\"version\": \"0.5\""));

    // Interrupted after 5 blocks, then resumed: the same result, the first 5 not redone.
    let out2 = dir.path().join("resumed.ome.zarr");
    let failing = FailAfter {
        model: &model,
        left: Cell::new(5),
    };
    let e = predict_to_zarr(&failing, &input, &out2, &options()).unwrap_err();
    assert!(e.to_string().contains("interrupted"), "{e}");
    let summary = predict_to_zarr(&model, &input, &out2, &options()).unwrap();
    assert_eq!(summary.already_done, 5);
    assert_eq!(read_all(&summary.array), got);
    // Everything done: nothing is predicted again.
    let never = FailAfter {
        model: &model,
        left: Cell::new(0),
    };
    let summary = predict_to_zarr(&never, &input, &out2, &options()).unwrap();
    assert_eq!(summary.already_done, summary.blocks);

    // Another block size into the same output is refused.
    let mut other = options();
    other.block = 16;
    let e = predict_to_zarr(&model, &input, &out2, &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other settings"), "{e}");
}

#[test]
fn a_zarr_input_gives_the_same_prediction_as_the_volume_in_memory() {
    let model = tiny_unet();
    let data = volume();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("raw.zarr");
    let raw = ZarrArray::create(
        &source,
        &[2, 70, 90],
        &[1, 16, 16],
        Element::F32,
        &["z", "y", "x"],
    )
    .unwrap();
    raw.write_f32(&[0, 0, 0], &data.clone().into_dyn()).unwrap();
    let opened = open_image(&source).unwrap();
    assert_eq!(VolumeSource::shape(&opened), [2, 70, 90]);
    let from_zarr =
        predict_to_zarr(&model, &opened, &dir.path().join("a.zarr"), &options()).unwrap();
    let in_memory = InMemory {
        data,
        name: "volume".into(),
    };
    let from_memory =
        predict_to_zarr(&model, &in_memory, &dir.path().join("b.zarr"), &options()).unwrap();
    assert_eq!(read_all(&from_zarr.array), read_all(&from_memory.array));
    // Errors name the array: a box outside it, a folder without an array.
    let e = opened
        .read_box(0..1, 60..80, 0..10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not inside the array"), "{e}");
    let e = open_image(dir.path()).err().unwrap().to_string();
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
}
