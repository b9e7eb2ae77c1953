//! File formats for biomedical segmentation data, as [`ndarray`] arrays.
//!
//! - [`tiff`]: 2-D and 3-D (multi-page) TIFF images, label images and float stacks.
//! - [`atomic`]: write a file so that it appears whole or not at all.
//! - [`synthetic`]: reproducible synthetic label images (Voronoi tilings).
//! - [`machine`]: a one-line description of the machine for benchmarks and reports.
//!
//! Every fallible function returns [`Error`], whose variants name the file and the reason.
//!
//! ```
//! use ndarray::Array3;
//! use seg_data::tiff::{read_tiff, write_tiff, Compression, WriteOptions};
//!
//! let dir = std::env::temp_dir().join(format!("seg-data-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("stack.tif");
//! // A float32 stack with two channels, written as two pages.
//! let stack = Array3::<f32>::from_shape_fn((2, 3, 4), |(c, y, x)| (c * 100 + y * 4 + x) as f32);
//! let options = WriteOptions { compression: Compression::Deflate };
//! write_tiff(&path, stack.view(), &options)?;
//! let back = read_tiff(&path)?.into_f32();
//! assert_eq!(back, stack.into_dyn());
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod atomic;
pub mod coco;
pub mod cremi;
#[cfg(feature = "download")]
pub mod download;
mod error;
pub mod hdf5;
pub mod livecell;
pub mod machine;
pub mod sampling;
pub mod synthetic;
pub mod tiff;

pub use error::{Error, Result};
