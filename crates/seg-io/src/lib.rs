#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]

pub mod atomic;
pub mod coco;
mod error;
pub mod hdf5;
pub mod lock;
pub mod memory;
pub mod tiff;
pub mod volume;

pub use error::{Error, Result};
