//! The experimental setting: which targets a model learns, how many output channels it has,
//! and how its prediction becomes instances. One [`TargetSetting`] decides all three.

use ndarray::{Array2, ArrayView3, Axis};
use seg_targets::TargetSetting;
use watershed::{
    watershed_from_boundaries, watershed_from_distances, BoundaryRecipe, DistanceRecipe,
};

use crate::{Error, Result};

/// The model's output channels in `setting`, in the order of its targets
/// ([`TargetSetting::channels`]).
pub fn out_channels(setting: TargetSetting) -> usize {
    setting.channels().len()
}

/// The post-processing recipes of the settings; the defaults are the paper's (torch-em's).
#[non_exhaustive]
#[derive(Debug, Clone, Default)]
pub struct Recipes {
    /// CREMI and LIVECell boundaries: seeded watershed on the boundary map.
    pub boundaries: BoundaryRecipe,
    /// LIVECell distances: seeds from the centre and boundary distances.
    pub distances: DistanceRecipe,
}

/// The prediction stack of a semantic class map as nnU-Net and U-Mamba write them (argmax labels:
/// 0 background, 1 foreground, 2 boundary), as the paper scored those baselines (vimunet-
/// benchmarking's `evaluate_models.py`): LIVECell boundaries takes foreground = (class == 1) and
/// boundaries = (class == 2) as 0/1 maps; CREMI takes the map itself as boundaries (0/1). Feed the
/// result to [`segment`].
///
/// # Errors
/// [`Error::Option`] for the distance setting (no class-map form) and for a class the setting
/// does not have, naming the value and its position.
pub fn class_map_prediction(
    classes: ndarray::ArrayView2<u32>,
    setting: TargetSetting,
) -> Result<ndarray::Array3<f32>> {
    let highest = match setting {
        TargetSetting::Cremi => 1,
        TargetSetting::LivecellBoundaries => 2,
        TargetSetting::LivecellDistances => {
            return Err(Error::Option {
                option: "setting".into(),
                what: "class maps (nnU-Net, U-Mamba) are scored in the boundary settings only"
                    .into(),
            })
        }
    };
    if let Some(((y, x), v)) = classes.indexed_iter().find(|(_, v)| **v > highest) {
        return Err(Error::Option {
            option: "class map".into(),
            what: format!(
                "class {v} at (y, x) = ({y}, {x}); {setting} class maps hold 0…{highest} (0 \
                 background, 1 {})",
                if highest == 2 {
                    "foreground, 2 boundary"
                } else {
                    "boundary"
                }
            ),
        });
    }
    let (h, w) = classes.dim();
    let is = |c: u32| classes.mapv(move |v| f32::from(u8::from(v == c)));
    Ok(match setting {
        TargetSetting::Cremi => is(1).into_shape_with_order((1, h, w)),
        _ => ndarray::stack(Axis(0), &[is(1).view(), is(2).view()])
            .map(|a| a.into_shape_with_order((2, h, w)).expect("two maps")),
    }
    .expect("shapes of the class map"))
}

/// Instances from a prediction stack (channels first, in the order of the setting's targets):
/// the paper's post-processing for `setting`.
///
/// # Errors
/// [`Error::Option`] when the stack has another channel count than the setting's; the
/// watershed's errors (NaN in a map, mismatched shapes).
pub fn segment(
    pred: ArrayView3<f32>,
    setting: TargetSetting,
    recipes: &Recipes,
) -> Result<Array2<u32>> {
    let want = out_channels(setting);
    if pred.dim().0 != want {
        return Err(Error::Option {
            option: "setting".into(),
            what: format!(
                "{setting} needs {want} channel(s) [{}], the prediction has {} (shape {:?})",
                setting.channels().join(", "),
                pred.dim().0,
                pred.shape()
            ),
        });
    }
    let ch = |i: usize| pred.index_axis(Axis(0), i);
    Ok(match setting {
        TargetSetting::Cremi => watershed_from_boundaries(ch(0), None, &recipes.boundaries)?,
        TargetSetting::LivecellBoundaries => {
            watershed_from_boundaries(ch(1), Some(ch(0)), &recipes.boundaries)?
        }
        TargetSetting::LivecellDistances => {
            watershed_from_distances(ch(1), ch(2), ch(0), &recipes.distances)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn class_maps_become_the_settings_maps_and_foreign_classes_are_named() {
        let classes = ndarray::arr2(&[[0u32, 1, 2], [2, 1, 0]]);
        let p = class_map_prediction(classes.view(), TargetSetting::LivecellBoundaries).unwrap();
        assert_eq!(p.shape(), &[2, 2, 3]);
        assert_eq!(
            p.iter().copied().collect::<Vec<f32>>(),
            vec![0., 1., 0., 0., 1., 0., 0., 0., 1., 1., 0., 0.]
        );
        let e = class_map_prediction(classes.view(), TargetSetting::Cremi)
            .unwrap_err()
            .to_string();
        assert!(e.contains("class 2 at (y, x) = (0, 2)"), "{e}");
        let bd = ndarray::arr2(&[[0u32, 1]]);
        let p = class_map_prediction(bd.view(), TargetSetting::Cremi).unwrap();
        assert_eq!(p.iter().copied().collect::<Vec<f32>>(), vec![0., 1.]);
        assert!(class_map_prediction(bd.view(), TargetSetting::LivecellDistances).is_err());
    }

    #[test]
    fn a_stack_with_the_wrong_channel_count_is_an_error_naming_the_setting() {
        let pred = Array3::<f32>::zeros((2, 8, 8));
        let err = segment(
            pred.view(),
            TargetSetting::LivecellDistances,
            &Recipes::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("livecell-distances needs 3 channel(s)"),
            "{err}"
        );
    }

    /// Two foreground squares separated by a boundary line give two objects in the boundary
    /// setting, whose channels are [foreground, boundaries].
    #[test]
    fn the_boundary_setting_reads_foreground_then_boundaries() {
        let mut pred = Array3::<f32>::zeros((2, 16, 32));
        pred.slice_mut(ndarray::s![0, 2..14, 2..30]).fill(1.0);
        pred.slice_mut(ndarray::s![1, .., 15..17]).fill(1.0);
        let seg = segment(
            pred.view(),
            TargetSetting::LivecellBoundaries,
            &Recipes::default(),
        )
        .unwrap();
        assert_eq!(seg.iter().copied().max(), Some(2));
        assert_eq!(seg[[0, 0]], 0);
        assert_ne!(seg[[8, 5]], seg[[8, 26]]);
        assert_eq!(out_channels(TargetSetting::Cremi), 1);
    }
}
