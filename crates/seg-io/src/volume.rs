//! Volumes read and written box by box: the interface the blockwise stages work through, so
//! that an image or volume larger than memory is never held whole.
//!
//! A volume is (z, y, x); a 2-D image is a volume of one slice, a prediction (c, z, y, x). Zarr
//! arrays (v3 and v2) are read and written chunk-wise with `zarrs` on the filesystem; an image
//! already in memory (a TIFF, an HDF5 dataset) is a [`VolumeSource`] too.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array3, ArrayD, IxDyn};
use zarrs::array::{data_type, Array, ArraySubset};
use zarrs::filesystem::FilesystemStore;

use crate::{Error, Result};

/// A (z, y, x) volume a box can be read from, as f32.
pub trait VolumeSource: Send + Sync {
    /// (z, y, x).
    fn shape(&self) -> [usize; 3];
    /// The box `z × y × x` (ranges inside [`VolumeSource::shape`]).
    ///
    /// # Errors
    /// A box outside the volume; read and decode errors naming the source.
    fn read_box(&self, z: Range<usize>, y: Range<usize>, x: Range<usize>) -> Result<Array3<f32>>;
    /// Where it comes from, for messages.
    fn describe(&self) -> String;
}

fn check_box(what: &str, shape: &[usize], ranges: &[Range<usize>]) -> Result<()> {
    let inside = ranges.len() == shape.len()
        && ranges
            .iter()
            .zip(shape)
            .all(|(r, &n)| r.start < r.end && r.end <= n);
    if inside {
        Ok(())
    } else {
        Err(Error::Zarr {
            path: PathBuf::from(what),
            what: format!("the box {ranges:?} is not inside the array of shape {shape:?}"),
        })
    }
}

/// A volume held in memory.
pub struct InMemory {
    pub data: Array3<f32>,
    pub name: String,
}

impl VolumeSource for InMemory {
    fn shape(&self) -> [usize; 3] {
        let (z, y, x) = self.data.dim();
        [z, y, x]
    }

    fn read_box(&self, z: Range<usize>, y: Range<usize>, x: Range<usize>) -> Result<Array3<f32>> {
        check_box(
            &self.name,
            &self.shape(),
            &[z.clone(), y.clone(), x.clone()],
        )?;
        Ok(self.data.slice(ndarray::s![z, y, x]).to_owned())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// The element types this crate writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    F32,
    U32,
    U64,
}

/// The Zarr format an output is written in, with its OME-Zarr version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZarrFormat {
    /// Zarr v3 with OME-Zarr 0.5 (zstd chunks; shards possible).
    #[default]
    V3,
    /// Zarr v2 with OME-Zarr 0.4 (blosc-lz4 chunks, `/`-separated chunk keys), for readers
    /// that do not know v3 yet (Fiji's n5-zarr, older napari and zarr-python).
    V2,
}

impl ZarrFormat {
    /// 2 or 3.
    pub fn number(self) -> u8 {
        match self {
            ZarrFormat::V3 => 3,
            ZarrFormat::V2 => 2,
        }
    }
}

impl std::str::FromStr for ZarrFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "3" | "v3" => Ok(ZarrFormat::V3),
            "2" | "v2" => Ok(ZarrFormat::V2),
            other => Err(format!("Zarr format `{other}`: 2 or 3")),
        }
    }
}

/// A Zarr array on the filesystem: `path` is the array's folder (holding `zarr.json`, or
/// `.zarray` for Zarr v2).
pub struct ZarrArray {
    array: Array<FilesystemStore>,
    path: PathBuf,
}

fn zarr_error(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |what| Error::Zarr {
        path: path.to_path_buf(),
        what,
    }
}

impl ZarrArray {
    /// Opens an existing array (Zarr v3 or v2).
    ///
    /// # Errors
    /// [`Error::Zarr`] naming the folder when it holds no array or its metadata does not parse.
    pub fn open(path: &Path) -> Result<Self> {
        let err = zarr_error(path);
        if !path.join("zarr.json").is_file() && !path.join(".zarray").is_file() {
            return Err(err(
                "no Zarr array here (neither zarr.json nor .zarray)".into()
            ));
        }
        let store = Arc::new(FilesystemStore::new(path).map_err(|e| err(e.to_string()))?);
        let array = Array::open(store, "/").map_err(|e| err(format!("unreadable array: {e}")))?;
        let a = ZarrArray {
            array,
            path: path.to_path_buf(),
        };
        // A chunk is decoded whole: its declared size must fit.
        let chunk: Vec<usize> = a.chunks();
        crate::memory::check_allocation(
            path,
            &format!("one chunk of {chunk:?}"),
            crate::memory::product(&chunk).and_then(|n| n.checked_mul(8)),
            "the array's chunks are larger than this machine can decode",
        )?;
        Ok(a)
    }

    /// Creates a Zarr v3 array of `shape`, chunked by `chunks`, zstd-compressed, with the axis
    /// names `dimensions`; an existing array there is replaced.
    ///
    /// # Errors
    /// [`Error::Zarr`] for a chunk shape with a zero or of another rank, and write errors.
    pub fn create(
        path: &Path,
        shape: &[usize],
        chunks: &[usize],
        element: Element,
        dimensions: &[&str],
    ) -> Result<Self> {
        Self::create_with(path, shape, chunks, None, element, dimensions)
    }

    /// [`ZarrArray::create`] in the format `format`. A v2 array (`.zarray`, little-endian,
    /// C order, blosc-lz4 with byte shuffle, `/`-separated chunk keys as OME-Zarr 0.4 asks)
    /// names its axes in `.zattrs` (`_ARRAY_DIMENSIONS`).
    ///
    /// # Errors
    /// As [`ZarrArray::create`].
    pub fn create_as(
        format: ZarrFormat,
        path: &Path,
        shape: &[usize],
        chunks: &[usize],
        element: Element,
        dimensions: &[&str],
    ) -> Result<Self> {
        match format {
            ZarrFormat::V3 => Self::create(path, shape, chunks, element, dimensions),
            ZarrFormat::V2 => Self::create_v2(path, shape, chunks, element, dimensions),
        }
    }

    fn create_v2(
        path: &Path,
        shape: &[usize],
        chunks: &[usize],
        element: Element,
        dimensions: &[&str],
    ) -> Result<Self> {
        let err = zarr_error(path);
        check_layout(path, shape, chunks, dimensions)?;
        let dtype = match element {
            Element::F32 => "<f4",
            Element::U32 => "<u4",
            Element::U64 => "<u8",
        };
        let meta = serde_json::json!({
            "zarr_format": 2,
            "shape": shape,
            "chunks": chunks,
            "dtype": dtype,
            "compressor": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0},
            "fill_value": 0,
            "order": "C",
            "filters": null,
            "dimension_separator": "/",
            "attributes": {"_ARRAY_DIMENSIONS": dimensions},
        });
        let meta: zarrs::array::ArrayMetadataV2 =
            serde_json::from_value(meta).map_err(|e| err(format!("v2 metadata: {e}")))?;
        std::fs::create_dir_all(path).map_err(|e| err(format!("cannot create: {e}")))?;
        // An array of another format there would be read instead of this one.
        let _ = std::fs::remove_file(path.join("zarr.json"));
        let store = Arc::new(FilesystemStore::new(path).map_err(|e| err(e.to_string()))?);
        let array = Array::new_with_metadata(store, "/", zarrs::array::ArrayMetadata::V2(meta))
            .map_err(|e| err(e.to_string()))?;
        Self::stored(array, path)
    }

    /// A new array, its metadata written.
    fn stored(array: Array<FilesystemStore>, path: &Path) -> Result<Self> {
        array
            .store_metadata()
            .map_err(|e| zarr_error(path)(format!("cannot write metadata: {e}")))?;
        Ok(ZarrArray {
            array,
            path: path.to_path_buf(),
        })
    }

    /// Zarr v2 or v3.
    pub fn format(&self) -> ZarrFormat {
        if self.path.join(".zarray").is_file() {
            ZarrFormat::V2
        } else {
            ZarrFormat::V3
        }
    }

    /// [`ZarrArray::create`] with each chunk a shard (`sharding_indexed`) of `subchunks`-shaped
    /// subchunks: one file per chunk, while readers (and viewers) decode only the subchunks they
    /// need. Each chunk side must be a multiple of the subchunk's.
    ///
    /// # Errors
    /// As [`ZarrArray::create`], and for subchunks that do not divide the chunks.
    pub fn create_sharded(
        path: &Path,
        shape: &[usize],
        chunks: &[usize],
        subchunks: &[usize],
        element: Element,
        dimensions: &[&str],
    ) -> Result<Self> {
        let err = zarr_error(path);
        let divides = subchunks.len() == chunks.len()
            && subchunks
                .iter()
                .zip(chunks)
                .all(|(&s, &c)| s > 0 && c.is_multiple_of(s));
        if !divides {
            return Err(err(format!(
                "subchunks {subchunks:?} do not divide the chunks (shards) {chunks:?}"
            )));
        }
        Self::create_with(path, shape, chunks, Some(subchunks), element, dimensions)
    }

    fn create_with(
        path: &Path,
        shape: &[usize],
        chunks: &[usize],
        subchunks: Option<&[usize]>,
        element: Element,
        dimensions: &[&str],
    ) -> Result<Self> {
        let err = zarr_error(path);
        check_layout(path, shape, chunks, dimensions)?;
        std::fs::create_dir_all(path).map_err(|e| err(format!("cannot create: {e}")))?;
        // An array of another format there would be read instead of this one.
        for f in [".zarray", ".zattrs"] {
            let _ = std::fs::remove_file(path.join(f));
        }
        let store = Arc::new(FilesystemStore::new(path).map_err(|e| err(e.to_string()))?);
        let (dtype, fill) = match element {
            Element::F32 => (data_type::float32(), zarrs::array::FillValue::from(0f32)),
            Element::U32 => (data_type::uint32(), zarrs::array::FillValue::from(0u32)),
            Element::U64 => (data_type::uint64(), zarrs::array::FillValue::from(0u64)),
        };
        let u64s = |v: &[usize]| v.iter().map(|&n| n as u64).collect::<Vec<_>>();
        // zstd level 3, no checksum.
        let zstd = zarrs::array::codec::ZstdCodec::new(3, false);
        let array = zarrs::array::ArrayBuilder::new(u64s(shape), u64s(chunks), dtype, fill)
            .bytes_to_bytes_codecs(vec![Arc::new(zstd)])
            .subchunk_shape(subchunks.map(u64s))
            .dimension_names(Some(
                dimensions
                    .iter()
                    .map(|d| Some(d.to_string()))
                    .collect::<Vec<_>>(),
            ))
            .build(store, "/")
            .map_err(|e| err(e.to_string()))?;
        Self::stored(array, path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn shape(&self) -> Vec<usize> {
        self.array.shape().iter().map(|&n| n as usize).collect()
    }

    /// The chunk shape (of the first chunk; this crate writes regular grids).
    pub fn chunks(&self) -> Vec<usize> {
        self.array
            .chunk_shape(&vec![0; self.array.dimensionality()])
            .map(|c| c.iter().map(|n| n.get() as usize).collect())
            .unwrap_or_default()
    }

    fn subset(&self, ranges: &[Range<usize>]) -> Result<ArraySubset> {
        check_box(&self.path.display().to_string(), &self.shape(), ranges)?;
        let lengths: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        crate::memory::check_allocation(
            &self.path,
            &format!("a box of {lengths:?}"),
            crate::memory::product(&lengths).and_then(|n| n.checked_mul(8)),
            "read smaller boxes (blocks)",
        )?;
        Ok(ArraySubset::new_with_ranges(
            &ranges
                .iter()
                .map(|r| r.start as u64..r.end as u64)
                .collect::<Vec<_>>(),
        ))
    }

    /// The box `ranges` decoded as `T` (the array's element type).
    fn retrieve<T: zarrs::array::ElementOwned>(&self, ranges: &[Range<usize>]) -> Result<Vec<T>> {
        let subset = self.subset(ranges)?;
        self.array
            .retrieve_array_subset::<Vec<T>>(&subset)
            .map_err(|e| zarr_error(&self.path)(format!("reading {ranges:?}: {e}")))
    }

    fn shaped<T>(&self, ranges: &[Range<usize>], values: Vec<T>) -> Result<ArrayD<T>> {
        let shape: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        ArrayD::from_shape_vec(IxDyn(&shape), values)
            .map_err(|e| zarr_error(&self.path)(e.to_string()))
    }

    /// Reads a box as f32 (u8, u16 and f32 arrays; other types are refused).
    ///
    /// # Errors
    /// [`Error::Zarr`] for a box outside the array, another element type, or a chunk that does
    /// not decode.
    pub fn read_f32(&self, ranges: &[Range<usize>]) -> Result<ArrayD<f32>> {
        let dt = self.array.data_type();
        let values: Vec<f32> = if *dt == data_type::float32() {
            self.retrieve(ranges)?
        } else if *dt == data_type::uint8() {
            self.retrieve::<u8>(ranges)?
                .into_iter()
                .map(f32::from)
                .collect()
        } else if *dt == data_type::uint16() {
            self.retrieve::<u16>(ranges)?
                .into_iter()
                .map(f32::from)
                .collect()
        } else {
            return Err(zarr_error(&self.path)(format!(
                "element type {dt}: images are read as uint8, uint16 or float32"
            )));
        };
        self.shaped(ranges, values)
    }

    /// Reads a box of labels (uint8/16/32/64; u64 ids above u32 are refused, never truncated).
    ///
    /// # Errors
    /// As [`ZarrArray::read_f32`], and ids that do not fit in 32 bits.
    pub fn read_labels(&self, ranges: &[Range<usize>]) -> Result<ArrayD<u32>> {
        let err = zarr_error(&self.path);
        let dt = self.array.data_type();
        let values: Vec<u32> = if *dt == data_type::uint32() {
            self.retrieve(ranges)?
        } else if *dt == data_type::uint64() {
            self.retrieve::<u64>(ranges)?
                .into_iter()
                .map(|id| {
                    u32::try_from(id).map_err(|_| {
                        err(format!(
                            "label id {id} does not fit in 32 bits; refused, not truncated"
                        ))
                    })
                })
                .collect::<Result<_>>()?
        } else if *dt == data_type::uint16() {
            self.retrieve::<u16>(ranges)?
                .into_iter()
                .map(u32::from)
                .collect()
        } else if *dt == data_type::uint8() {
            self.retrieve::<u8>(ranges)?
                .into_iter()
                .map(u32::from)
                .collect()
        } else {
            return Err(err(format!(
                "element type {dt}: labels are read as unsigned integers"
            )));
        };
        self.shaped(ranges, values)
    }

    /// Writes a box of values of the array's element type (f32, u32 or u64).
    ///
    /// # Errors
    /// [`Error::Zarr`] for a box outside the array, another element type or a failed write.
    pub fn write<T: zarrs::array::Element + Copy>(
        &self,
        start: &[usize],
        values: &ArrayD<T>,
    ) -> Result<()> {
        let ranges: Vec<Range<usize>> = start
            .iter()
            .zip(values.shape())
            .map(|(&s, &n)| s..s + n)
            .collect();
        let subset = self.subset(&ranges)?;
        let data: Vec<T> = values.iter().copied().collect();
        self.array
            .store_array_subset(&subset, data)
            .map_err(|e| zarr_error(&self.path)(format!("writing {ranges:?}: {e}")))
    }

    /// [`ZarrArray::write`] of f32 values.
    ///
    /// # Errors
    /// As [`ZarrArray::write`].
    pub fn write_f32(&self, start: &[usize], values: &ArrayD<f32>) -> Result<()> {
        self.write(start, values)
    }
}

fn check_layout(path: &Path, shape: &[usize], chunks: &[usize], dimensions: &[&str]) -> Result<()> {
    if chunks.len() != shape.len() || chunks.contains(&0) || dimensions.len() != shape.len() {
        return Err(zarr_error(path)(format!(
            "chunks {chunks:?} and axes {dimensions:?} for an array of shape {shape:?}"
        )));
    }
    Ok(())
}

/// Whether an array of `shape` is a grey volume: (y, x), (z, y, x), or (1, z, y, x) (one
/// channel, as OME-Zarr's czyx images hold it).
fn volume_shape(shape: &[usize]) -> Option<[usize; 3]> {
    match *shape {
        [y, x] => Some([1, y, x]),
        [z, y, x] | [1, z, y, x] => Some([z, y, x]),
        _ => None,
    }
}

/// A grey (z, y, x) Zarr array (also (y, x) and (1, z, y, x)) as a [`VolumeSource`]; build it
/// with [`open_image`], which checks the shape.
impl VolumeSource for ZarrArray {
    fn shape(&self) -> [usize; 3] {
        volume_shape(&ZarrArray::shape(self)).unwrap_or([0, 0, 0])
    }

    fn read_box(&self, z: Range<usize>, y: Range<usize>, x: Range<usize>) -> Result<Array3<f32>> {
        let shape = ZarrArray::shape(self);
        let dims = (z.len(), y.len(), x.len());
        let ranges = match shape.len() {
            4 => vec![0..1, z, y, x],
            3 => vec![z, y, x],
            2 if z == (0..1) => vec![y, x],
            _ => {
                return Err(Error::Zarr {
                    path: self.path.clone(),
                    what: format!(
                        "the box z {z:?} of an array of shape {shape:?}: not a grey volume"
                    ),
                })
            }
        };
        let v = self.read_f32(&ranges)?;
        v.into_shape_with_order(dims).map_err(|e| Error::Zarr {
            path: self.path.clone(),
            what: e.to_string(),
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Writes OME-Zarr metadata into the group folder `group` whose array `0` holds the image: one
/// scale, the axes `axes` (`c` a channel axis, others space), unit scale. `format` V3 writes
/// OME-Zarr 0.5 (`zarr.json`), V2 OME-Zarr 0.4 (`.zgroup` and `.zattrs`). `labels` marks the
/// image as a label image (`image-label`), so viewers (napari's OME-Zarr reader, say) show it as
/// labels.
///
/// # Errors
/// [`Error::Zarr`] when the group metadata cannot be written.
pub fn write_ome_zarr_group(
    group: &Path,
    axes: &[&str],
    name: &str,
    format: ZarrFormat,
    labels: bool,
) -> Result<()> {
    let err = zarr_error(group);
    let axes_json: Vec<serde_json::Value> = axes
        .iter()
        .map(|a| match *a {
            "c" => serde_json::json!({"name": "c", "type": "channel"}),
            other => serde_json::json!({"name": other, "type": "space"}),
        })
        .collect();
    let version = match format {
        ZarrFormat::V3 => "0.5",
        ZarrFormat::V2 => "0.4",
    };
    let mut multiscale = serde_json::json!({
        "name": name,
        "axes": axes_json,
        "datasets": [{
            "path": "0",
            "coordinateTransformations": [{"type": "scale", "scale": vec![1.0; axes.len()]}],
        }],
    });
    let mut ome = serde_json::Map::new();
    if format == ZarrFormat::V2 {
        // 0.4 names its version in each multiscale; 0.5 once, beside them.
        multiscale["version"] = version.into();
    } else {
        ome.insert("version".into(), version.into());
    }
    ome.insert("multiscales".into(), serde_json::json!([multiscale]));
    if labels {
        ome.insert(
            "image-label".into(),
            serde_json::json!({"version": version}),
        );
    }
    std::fs::create_dir_all(group).map_err(|e| err(format!("cannot create: {e}")))?;
    let files: Vec<(&str, serde_json::Value)> = match format {
        ZarrFormat::V3 => vec![(
            "zarr.json",
            serde_json::json!({"zarr_format": 3, "node_type": "group", "attributes": {"ome": ome}}),
        )],
        ZarrFormat::V2 => vec![
            (".zgroup", serde_json::json!({"zarr_format": 2})),
            (".zattrs", serde_json::Value::Object(ome)),
        ],
    };
    // A group of the other format there would be read instead of this one.
    let stale: &[&str] = match format {
        ZarrFormat::V3 => &[".zgroup", ".zattrs"],
        ZarrFormat::V2 => &["zarr.json"],
    };
    for f in stale {
        let _ = std::fs::remove_file(group.join(f));
    }
    for (file, value) in files {
        let text = serde_json::to_string_pretty(&value).map_err(|e| err(e.to_string()))?;
        crate::atomic::write_atomically(&group.join(file), |w| {
            use std::io::Write;
            w.write_all(text.as_bytes()).map_err(|e| Error::Write {
                path: group.join(file),
                what: e.to_string(),
            })
        })?;
    }
    Ok(())
}

/// Whether `path` is a Zarr array or group (v2 or v3).
pub fn is_zarr(path: &Path) -> bool {
    [".zarray", ".zgroup", "zarr.json"]
        .iter()
        .any(|f| path.join(f).is_file())
}

/// The grey image array of an OME-Zarr group (its first multiscale's first dataset), or `path`
/// itself when it is an array: (y, x), (z, y, x) or (1, z, y, x).
///
/// # Errors
/// [`Error::Zarr`] when `path` is neither an array nor an OME-Zarr group with a dataset, or the
/// array has another shape.
pub fn open_image(path: &Path) -> Result<ZarrArray> {
    let array = open_array(path)?;
    let shape = ZarrArray::shape(&array);
    if volume_shape(&shape).is_none() {
        return Err(Error::Zarr {
            path: array.path.clone(),
            what: format!(
                "shape {shape:?} is not a grey image or volume ((y, x), (z, y, x) or (1, z, y, \
                 x)); a multi-channel array (a prediction, say) is not an image to predict"
            ),
        });
    }
    Ok(array)
}

/// An array folder, or the first dataset of an OME-Zarr group's first multiscale (a prediction
/// or label group as this crate writes them), of any shape.
///
/// # Errors
/// [`Error::Zarr`] when `path` is neither an array nor an OME-Zarr group with a dataset.
pub fn open_array(path: &Path) -> Result<ZarrArray> {
    if path.join(".zarray").is_file() {
        return ZarrArray::open(path);
    }
    let meta = std::fs::read_to_string(path.join("zarr.json"))
        .or_else(|_| std::fs::read_to_string(path.join(".zattrs")))
        .map_err(|e| zarr_error(path)(format!("no Zarr metadata: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&meta)
        .map_err(|e| zarr_error(path)(format!("metadata does not parse: {e}")))?;
    if v["node_type"] == "array" {
        return ZarrArray::open(path);
    }
    let multiscales = v
        .pointer("/attributes/ome/multiscales")
        .or_else(|| v.pointer("/multiscales"));
    let dataset = multiscales
        .and_then(|m| m.pointer("/0/datasets/0/path"))
        .and_then(|p| p.as_str())
        .ok_or_else(|| {
            zarr_error(path)("a group without OME-Zarr multiscales: name its array's folder".into())
        })?;
    ZarrArray::open(&path.join(dataset))
}
