#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]

pub mod baselines;
pub mod bioimageio;
pub mod blockwise;
pub mod datasets;
mod error;
pub mod experiment;
mod pair_table;
pub mod picture;
pub mod predict;
pub mod report;
pub mod setting;
pub mod system;

pub use baselines::{Baseline, BaselineResult};
pub use datasets::{Dataset, Splits, TestImage};
pub use error::{Context, Error, Result};
pub use experiment::{
    run_experiment, run_model, Event, ExperimentOptions, ExperimentReport, Profile, ProfileName,
};
pub use report::ModelResult;
pub use setting::{class_map_prediction, out_channels, segment, Recipes};
