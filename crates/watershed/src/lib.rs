//! Seeded watershed and the instance post-processing recipes of the ViM-UNet paper.
//!
//! - [`seeded_watershed`]: flood a 2-D or 3-D f32 height map from markers, optionally inside a
//!   mask, label for label as scikit-image's `watershed` (including its tie order).
//! - [`watershed_from_boundaries`], [`watershed_from_distances`]: torch-em's two recipes, with
//!   option structs whose `Default` is the paper's values.
//! - [`seeds_from_mask`], [`size_filter`], [`gaussian_smoothing`]: their building blocks.
//!
//! No deep-learning framework is involved; inputs and outputs are `ndarray` arrays.
//!
//! ```
//! use ndarray::{array, Array2};
//! use watershed::{watershed_from_boundaries, BoundaryRecipe};
//!
//! // Two cells separated by a boundary line, on background.
//! let mut fg = Array2::<f32>::zeros((6, 9));
//! fg.slice_mut(ndarray::s![1..5, 1..8]).fill(1.0);
//! let mut bd = Array2::<f32>::zeros((6, 9));
//! bd.slice_mut(ndarray::s![1..5, 4]).fill(1.0);
//! let recipe = BoundaryRecipe { min_size: 5, ..Default::default() };
//! let seg = watershed_from_boundaries(bd.view(), Some(fg.view()), &recipe)?;
//! assert_eq!(seg[[2, 2]], 1);
//! assert_eq!(seg[[2, 6]], 2);
//! assert_eq!(seg[[0, 0]], 0);
//! # Ok::<(), watershed::Error>(())
//! ```

mod error;
mod flood;
mod recipes;
mod smoothing;

pub use error::{Error, Result};
pub use flood::{seeded_watershed, Flooding, MarkerOrder, WatershedOptions};
pub use recipes::{
    seeds_from_mask, size_filter, watershed_from_boundaries, watershed_from_distances,
    BoundaryRecipe, DistanceRecipe,
};
pub use seg_targets::Connectivity;
pub use smoothing::gaussian_smoothing;
