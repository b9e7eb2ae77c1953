#![doc = include_str!("../README.md")]

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
