//! HDF5 access behind one small trait, so the backend can be switched: the pure-Rust
//! `hdf5-pure` (default; no system library) or, later, the C library.

use std::ops::Range;
use std::path::{Path, PathBuf};

use ndarray::{Array3, ArrayView3};

use crate::{Error, Result};

/// The element types the datasets here use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    U8,
    U16,
    U32,
    U64,
    Other,
}

/// Read access to 3-D datasets of an HDF5 file.
pub trait VolumeSource {
    /// The file, for error messages.
    fn path(&self) -> &Path;
    /// The dataset's shape.
    fn shape(&self, key: &str) -> Result<Vec<usize>>;
    /// The dataset's stored element type.
    fn element_type(&self, key: &str) -> Result<ElementType>;
    /// Slices `z` of a 3-D u8 dataset.
    fn read_u8(&self, key: &str, z: Range<usize>) -> Result<Array3<u8>>;
    /// Slices `z` of a 3-D unsigned-integer dataset, as u64.
    fn read_u64(&self, key: &str, z: Range<usize>) -> Result<Array3<u64>>;
    /// A float-array attribute of a dataset, if present.
    fn attr_f64(&self, key: &str, name: &str) -> Result<Option<Vec<f64>>>;
}

/// A missing file as an I/O error naming it.
fn require_file(path: &Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        })
    }
}

/// An error about dataset `key` of the file at `path`.
fn key_error(path: &Path, key: &str, e: impl std::fmt::Display) -> Error {
    Error::Content {
        path: path.to_path_buf(),
        what: format!("{key}: {e}"),
    }
}

/// Checks that a dataset is 3-D and that `z` lies within it; returns `(height, width)`.
fn plane_shape(
    path: &Path,
    key: &str,
    shape: &[usize],
    z: &Range<usize>,
) -> Result<(usize, usize)> {
    match *shape {
        [d, h, w] if z.start <= z.end && z.end <= d => Ok((h, w)),
        [d, _, _] => Err(key_error(
            path,
            key,
            format!("slices {z:?} outside the {d} slices"),
        )),
        _ => Err(key_error(
            path,
            key,
            format!("expected a 3-D dataset, found shape {shape:?}"),
        )),
    }
}

/// Refuses to read slices `z` of an `h × w` dataset of `element`-byte values that would not fit
/// in the memory available (a file can declare any shape).
fn check_read(
    path: &Path,
    key: &str,
    z: &Range<usize>,
    h: usize,
    w: usize,
    element: usize,
) -> Result<()> {
    crate::memory::check_allocation(
        path,
        &format!("reading slices {}..{} of {key} ({h}×{w})", z.start, z.end),
        crate::memory::product(&[z.len(), h, w, element]),
        "read fewer slices at a time (e.g. predict's --slices)",
    )
}

/// What to do about an error of the pure-Rust reader that comes from a file feature it does not
/// implement rather than from a broken file.
fn pure_backend_hint(message: &str) -> &'static str {
    if message.contains("need 18446744073709551615 bytes") {
        // What it reports for a soft link: it reads the link message as an object header.
        " (the key is probably a soft or external link, which the default reader does not \
         follow: give the link's target as the key, or use a build with the `hdf5-c` feature)"
    } else if message.contains("layout version") || message.contains("unsupported") {
        " (a storage feature of newer HDF5 versions, e.g. h5py's libver=\"latest\", that the \
         default reader does not implement: write the file with h5py's default libver, or use a \
         build with the `hdf5-c` feature and a libhdf5 as new as the writer's)"
    } else {
        ""
    }
}

/// The pure-Rust backend.
pub struct PureHdf5 {
    path: PathBuf,
    file: hdf5_pure::File,
}

impl PureHdf5 {
    /// Opens a file for reading.
    ///
    /// # Errors
    /// [`Error::Io`] if it does not exist, [`Error::Content`] if it is not a readable HDF5 file.
    pub fn open(path: &Path) -> Result<PureHdf5> {
        require_file(path)?;
        let file = hdf5_pure::File::open(path).map_err(|e| Error::Content {
            path: path.to_path_buf(),
            what: format!(
                "not a readable HDF5 file: {e}{}",
                pure_backend_hint(&e.to_string())
            ),
        })?;
        Ok(PureHdf5 {
            path: path.to_path_buf(),
            file,
        })
    }

    fn err(&self, key: &str, e: impl std::fmt::Display) -> Error {
        key_error(
            &self.path,
            key,
            format!("{e}{}", pure_backend_hint(&e.to_string())),
        )
    }

    fn dataset(&self, key: &str) -> Result<hdf5_pure::Dataset> {
        self.file.dataset(key).map_err(|e| self.err(key, e))
    }
}

impl VolumeSource for PureHdf5 {
    fn path(&self) -> &Path {
        &self.path
    }

    fn shape(&self, key: &str) -> Result<Vec<usize>> {
        let shape = self.dataset(key)?.shape().map_err(|e| self.err(key, e))?;
        Ok(shape.into_iter().map(|v| v as usize).collect())
    }

    fn element_type(&self, key: &str) -> Result<ElementType> {
        use hdf5_pure::DType;
        Ok(
            match self.dataset(key)?.dtype().map_err(|e| self.err(key, e))? {
                DType::U8 => ElementType::U8,
                DType::U16 => ElementType::U16,
                DType::U32 => ElementType::U32,
                DType::U64 => ElementType::U64,
                _ => ElementType::Other,
            },
        )
    }

    fn read_u8(&self, key: &str, z: Range<usize>) -> Result<Array3<u8>> {
        if self.element_type(key)? != ElementType::U8 {
            return Err(self.err(key, "expected an 8-bit unsigned dataset"));
        }
        let (h, w) = plane_shape(&self.path, key, &self.shape(key)?, &z)?;
        check_read(&self.path, key, &z, h, w, 1)?;
        let data = self
            .dataset(key)?
            .read_u8_rows(z.start as u64, z.len() as u64)
            .map_err(|e| self.err(key, e))?;
        Array3::from_shape_vec((z.len(), h, w), data).map_err(|e| self.err(key, e))
    }

    fn read_u64(&self, key: &str, z: Range<usize>) -> Result<Array3<u64>> {
        if self.element_type(key)? == ElementType::Other {
            return Err(self.err(key, "expected an unsigned-integer dataset"));
        }
        let (h, w) = plane_shape(&self.path, key, &self.shape(key)?, &z)?;
        check_read(&self.path, key, &z, h, w, 8)?;
        let data = self
            .dataset(key)?
            .read_u64_rows(z.start as u64, z.len() as u64)
            .map_err(|e| self.err(key, e))?;
        Array3::from_shape_vec((z.len(), h, w), data).map_err(|e| self.err(key, e))
    }

    fn attr_f64(&self, key: &str, name: &str) -> Result<Option<Vec<f64>>> {
        use hdf5_pure::AttrValue;
        let attrs = self.dataset(key)?.attrs().map_err(|e| self.err(key, e))?;
        Ok(match attrs.get(name) {
            Some(AttrValue::F64Array(v)) => Some(v.clone()),
            Some(AttrValue::F64(v)) => Some(vec![*v]),
            Some(AttrValue::F32Array(v)) => Some(v.iter().map(|x| f64::from(*x)).collect()),
            _ => None,
        })
    }
}

/// The C-library backend (cargo feature `hdf5-c`): reads everything libhdf5 reads.
#[cfg(feature = "hdf5-c")]
pub struct LibHdf5 {
    path: PathBuf,
    file: hdf5::File,
}

#[cfg(feature = "hdf5-c")]
impl LibHdf5 {
    /// Opens a file for reading.
    ///
    /// # Errors
    /// [`Error::Io`] if it does not exist, [`Error::Content`] if libhdf5 cannot open it.
    pub fn open(path: &Path) -> Result<LibHdf5> {
        require_file(path)?;
        let file = hdf5::File::open(path).map_err(|e| Error::Content {
            path: path.to_path_buf(),
            what: format!("not a readable HDF5 file: {e}"),
        })?;
        Ok(LibHdf5 {
            path: path.to_path_buf(),
            file,
        })
    }

    fn err(&self, key: &str, e: impl std::fmt::Display) -> Error {
        key_error(
            &self.path,
            key,
            format!("{e}{}", pure_backend_hint(&e.to_string())),
        )
    }

    fn dataset(&self, key: &str) -> Result<hdf5::Dataset> {
        self.file.dataset(key).map_err(|e| self.err(key, e))
    }
}

#[cfg(feature = "hdf5-c")]
impl VolumeSource for LibHdf5 {
    fn path(&self) -> &Path {
        &self.path
    }

    fn shape(&self, key: &str) -> Result<Vec<usize>> {
        Ok(self.dataset(key)?.shape())
    }

    fn element_type(&self, key: &str) -> Result<ElementType> {
        use hdf5::types::{IntSize, TypeDescriptor};
        let descriptor = self
            .dataset(key)?
            .dtype()
            .and_then(|t| t.to_descriptor())
            .map_err(|e| self.err(key, e))?;
        Ok(match descriptor {
            TypeDescriptor::Unsigned(IntSize::U1) => ElementType::U8,
            TypeDescriptor::Unsigned(IntSize::U2) => ElementType::U16,
            TypeDescriptor::Unsigned(IntSize::U4) => ElementType::U32,
            TypeDescriptor::Unsigned(IntSize::U8) => ElementType::U64,
            _ => ElementType::Other,
        })
    }

    fn read_u8(&self, key: &str, z: Range<usize>) -> Result<Array3<u8>> {
        if self.element_type(key)? != ElementType::U8 {
            return Err(self.err(key, "expected an 8-bit unsigned dataset"));
        }
        let (h, w) = plane_shape(&self.path, key, &self.shape(key)?, &z)?;
        check_read(&self.path, key, &z, h, w, 1)?;
        self.dataset(key)?
            .read_slice::<u8, _, ndarray::Ix3>(ndarray::s![z.start..z.end, .., ..])
            .map_err(|e| self.err(key, e))
    }

    fn read_u64(&self, key: &str, z: Range<usize>) -> Result<Array3<u64>> {
        if self.element_type(key)? == ElementType::Other {
            return Err(self.err(key, "expected an unsigned-integer dataset"));
        }
        let (h, w) = plane_shape(&self.path, key, &self.shape(key)?, &z)?;
        check_read(&self.path, key, &z, h, w, 8)?;
        self.dataset(key)?
            .read_slice::<u64, _, ndarray::Ix3>(ndarray::s![z.start..z.end, .., ..])
            .map_err(|e| self.err(key, e))
    }

    fn attr_f64(&self, key: &str, name: &str) -> Result<Option<Vec<f64>>> {
        let ds = self.dataset(key)?;
        if !ds
            .attr_names()
            .map_err(|e| self.err(key, e))?
            .iter()
            .any(|n| n == name)
        {
            return Ok(None);
        }
        let attr = ds.attr(name).map_err(|e| self.err(key, e))?;
        Ok(attr.read_raw::<f64>().ok())
    }
}

/// One dataset to write with [`write_volumes`].
pub enum VolumeData<'a> {
    U8(ArrayView3<'a, u8>),
    U64(ArrayView3<'a, u64>),
}

/// Writes 3-D datasets at slash-separated keys (groups are created), chunked `(1, 64, 64)` and
/// gzip-compressed (level 4) like the CREMI files, each with an optional `resolution` attribute;
/// atomically.
///
/// # Errors
/// [`Error::Content`] for an invalid key, [`Error::Io`] if writing fails.
pub fn write_volumes(path: &Path, volumes: &[(&str, VolumeData, Option<[f64; 3]>)]) -> Result<()> {
    use hdf5_pure::FileBuilder;

    /// Datasets and sub-groups below one group, by name.
    #[derive(Default)]
    struct Node {
        datasets: Vec<usize>,
        groups: std::collections::BTreeMap<String, Node>,
    }
    let mut root = Node::default();
    for (i, (key, _, _)) in volumes.iter().enumerate() {
        let parts: Vec<&str> = key.split('/').filter(|p| !p.is_empty()).collect();
        let Some((_, parents)) = parts.split_last() else {
            return Err(Error::Content {
                path: path.to_path_buf(),
                what: format!("invalid dataset key {key:?}"),
            });
        };
        let mut node = &mut root;
        for p in parents {
            node = node.groups.entry((*p).to_owned()).or_default();
        }
        node.datasets.push(i);
    }
    let leaf = |i: usize| {
        volumes[i]
            .0
            .rsplit('/')
            .next()
            .unwrap_or(volumes[i].0)
            .to_owned()
    };
    fn fill(ds: &mut hdf5_pure::DatasetBuilder, data: &VolumeData, resolution: &Option<[f64; 3]>) {
        let (d, h, w) = match data {
            VolumeData::U8(a) => {
                ds.with_data(a.as_standard_layout().as_slice().expect("standard layout"));
                a.dim()
            }
            VolumeData::U64(a) => {
                ds.with_data(a.as_standard_layout().as_slice().expect("standard layout"));
                a.dim()
            }
        };
        let shape = [d as u64, h as u64, w as u64];
        let chunks = [1, 64.min(h.max(1)) as u64, 64.min(w.max(1)) as u64];
        ds.with_shape(&shape).with_chunks(&chunks).with_deflate(4);
        if let Some(r) = resolution {
            ds.set_attr("resolution", hdf5_pure::AttrValue::F64Array(r.to_vec()));
        }
    }
    fn build_group(
        g: &mut hdf5_pure::GroupBuilder,
        node: &Node,
        volumes: &[(&str, VolumeData, Option<[f64; 3]>)],
        leaf: &dyn Fn(usize) -> String,
    ) {
        for &i in &node.datasets {
            fill(g.create_dataset(&leaf(i)), &volumes[i].1, &volumes[i].2);
        }
        for (name, child) in &node.groups {
            let mut sub = g.create_group(name);
            build_group(&mut sub, child, volumes, leaf);
            g.add_group(sub.finish());
        }
    }
    let mut builder = FileBuilder::new();
    for &i in &root.datasets {
        fill(
            builder.create_dataset(&leaf(i)),
            &volumes[i].1,
            &volumes[i].2,
        );
    }
    for (name, child) in &root.groups {
        let mut g = builder.create_group(name);
        build_group(&mut g, child, volumes, &leaf);
        builder.add_group(g.finish());
    }
    let bytes = builder.finish().map_err(|e| Error::Content {
        path: path.to_path_buf(),
        what: format!("cannot encode HDF5: {e}"),
    })?;
    crate::atomic::write_atomically(path, |w| {
        use std::io::Write;
        w.write_all(&bytes).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    })
}
