//! Training targets from instance label images, exactly as torch-em computes them for the
//! ViM-UNet paper's experiments, plus the label utilities they are built from.
//!
//! - [`foreground`], [`find_boundaries`] (scikit-image semantics: thick, inner, outer; face or
//!   full connectivity),
//! - [`per_object_distances`]: normalised centre and boundary distances per object (torch-em's
//!   `PerObjectDistanceTransform`),
//! - [`distance_transform`]: exact Euclidean distance transform,
//! - [`connected_components`], [`relabel_sequential`], [`remove_small_objects`],
//! - [`make_targets`]: the three target stacks of the paper ([`TargetSetting`]).
//!
//! Every image function takes an `ndarray` view, 2-D `(height, width)` or 3-D
//! `(depth, height, width)`, plus an options struct whose `Default` is the reference behaviour,
//! and returns new arrays of the same dimensionality. Label images may be any unsigned integer
//! type (or `bool`), see [`Label`]. The crate has no dependency on a deep-learning framework.
//!
//! ```
//! use ndarray::array;
//! use seg_targets::{make_targets, TargetSetting};
//!
//! // Two touching cells on background.
//! let labels = array![
//!     [0u16, 0, 0, 0, 0, 0],
//!     [0, 1, 1, 2, 2, 0],
//!     [0, 1, 1, 2, 2, 0],
//!     [0, 0, 0, 0, 0, 0],
//! ];
//! let targets = make_targets(labels.view(), TargetSetting::LivecellBoundaries)?;
//! let (fg, bd) = (targets.index_axis(ndarray::Axis(0), 0), targets.index_axis(ndarray::Axis(0), 1));
//! assert_eq!(fg.sum(), 8.0);
//! assert_eq!(bd[[1, 2]], 1.0); // both sides of the contact are boundary
//! assert_eq!(bd[[0, 0]], 0.0);
//! # Ok::<(), seg_targets::Error>(())
//! ```

mod boundaries;
mod components;
mod edt;
mod error;
mod grid;
mod label;
mod per_object;
mod stacks;

pub use boundaries::{find_boundaries, BoundaryMode, BoundaryOptions};
pub use components::{connected_components, foreground, relabel_sequential, remove_small_objects};
pub use edt::{distance_transform, distance_transform_sampled};
pub use error::{Error, Result};
pub use grid::Connectivity;
pub use label::Label;
pub use per_object::{per_object_distances, PerObjectDistanceOptions, PerObjectDistances};
pub use stacks::{make_targets, TargetSetting};
