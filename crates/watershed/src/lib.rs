#![doc = include_str!("../README.md")]

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
