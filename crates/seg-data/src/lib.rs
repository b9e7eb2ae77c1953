#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]

pub mod cremi;
#[cfg(feature = "download")]
pub mod download;
mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod livecell;
pub mod machine;
pub mod sampling;
pub mod synthetic;

pub use error::{Error, Result};
