//! The paper's three training-target stacks.

use std::str::FromStr;

use ndarray::{stack, Array, ArrayView, Axis, Dimension};

use crate::boundaries::{find_boundaries, BoundaryOptions};
use crate::components::foreground;
use crate::per_object::{per_object_distances, PerObjectDistanceOptions};
use crate::{Error, Label, Result};

/// A training setting of the paper and the target channels it learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetSetting {
    /// LIVECell, boundary-based: `[foreground, boundaries]` (torch-em
    /// `BoundaryTransform(mode="thick", add_binary_target=True)`).
    LivecellBoundaries,
    /// LIVECell, distance-based: `[foreground, centre distance, boundary distance]` (torch-em
    /// `PerObjectDistanceTransform(..., min_size=25)`).
    LivecellDistances,
    /// CREMI: `[boundaries]` of the neuron ids (thick, face connectivity).
    Cremi,
}

impl TargetSetting {
    /// Every setting, in the paper's order.
    pub const ALL: [TargetSetting; 3] = [
        TargetSetting::LivecellBoundaries,
        TargetSetting::LivecellDistances,
        TargetSetting::Cremi,
    ];

    /// The command-line name, e.g. `livecell-boundaries`.
    pub fn name(self) -> &'static str {
        match self {
            TargetSetting::LivecellBoundaries => "livecell-boundaries",
            TargetSetting::LivecellDistances => "livecell-distances",
            TargetSetting::Cremi => "cremi",
        }
    }

    /// The channel names, in stack order.
    pub fn channels(self) -> &'static [&'static str] {
        match self {
            TargetSetting::LivecellBoundaries => &["foreground", "boundaries"],
            TargetSetting::LivecellDistances => {
                &["foreground", "center_distance", "boundary_distance"]
            }
            TargetSetting::Cremi => &["boundaries"],
        }
    }
}

impl FromStr for TargetSetting {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TargetSetting::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| Error::UnknownSetting(s.to_owned()))
    }
}

impl std::fmt::Display for TargetSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The float32 target stack of `setting` for an instance label image, channels first:
/// `(C, H, W)` for a 2-D image, `(C, D, H, W)` for a volume.
///
/// ```
/// use ndarray::array;
/// use seg_targets::{make_targets, TargetSetting};
///
/// let labels = array![[0u16, 1, 1], [0, 1, 1]];
/// let t = make_targets(labels.view(), TargetSetting::LivecellBoundaries)?;
/// assert_eq!(t.shape(), &[2, 2, 3]);
/// assert_eq!(t.index_axis(ndarray::Axis(0), 0), array![[0.0f32, 1.0, 1.0], [0.0, 1.0, 1.0]]);
/// # Ok::<(), seg_targets::Error>(())
/// ```
///
/// # Errors
/// [`Error::Dimensionality`] unless 2-D or 3-D.
pub fn make_targets<T: Label, D: Dimension>(
    labels: ArrayView<T, D>,
    setting: TargetSetting,
) -> Result<Array<f32, D::Larger>> {
    let as_f32 = |b: Array<bool, D>| b.mapv(|v| if v { 1.0f32 } else { 0.0 });
    let channels: Vec<Array<f32, D>> = match setting {
        TargetSetting::LivecellBoundaries => vec![
            as_f32(foreground(labels.view())),
            as_f32(find_boundaries(labels.view(), &BoundaryOptions::default())?),
        ],
        TargetSetting::LivecellDistances => {
            let d = per_object_distances(labels.view(), &PerObjectDistanceOptions::default())?;
            vec![d.foreground, d.center, d.boundary]
        }
        TargetSetting::Cremi => vec![as_f32(find_boundaries(
            labels.view(),
            &BoundaryOptions::default(),
        )?)],
    };
    let views: Vec<_> = channels.iter().map(|c| c.view()).collect();
    Ok(stack(Axis(0), &views).expect("channels share the label image's shape"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array3};

    #[test]
    fn each_setting_has_its_channels_in_order() {
        let l = array![[0u32, 1, 1, 2], [0, 1, 1, 2]];
        for setting in TargetSetting::ALL {
            let t = make_targets(l.view(), setting).unwrap();
            assert_eq!(t.shape(), &[setting.channels().len(), 2, 4], "{setting}");
            assert_eq!(setting.name().parse::<TargetSetting>().unwrap(), setting);
        }
        let cremi = make_targets(l.view(), TargetSetting::Cremi).unwrap();
        assert_eq!(
            cremi.index_axis(Axis(0), 0),
            array![[1.0f32, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
        );
        assert!("livecell".parse::<TargetSetting>().is_err());
    }

    #[test]
    fn distance_targets_drop_objects_under_25_pixels_from_the_foreground() {
        let mut l = ndarray::Array2::<u8>::zeros((10, 10));
        l.slice_mut(ndarray::s![0..5, 0..5]).fill(1); // 25 px: kept
        l.slice_mut(ndarray::s![6..10, 6..10]).fill(2); // 16 px: removed
        let t = make_targets(l.view(), TargetSetting::LivecellDistances).unwrap();
        assert_eq!(t[[0, 0, 0]], 1.0);
        assert_eq!(t[[0, 7, 7]], 0.0);
        assert_eq!(t[[1, 7, 7]], 1.0);
        // The boundary-based setting keeps every object.
        let b = make_targets(l.view(), TargetSetting::LivecellBoundaries).unwrap();
        assert_eq!(b[[0, 7, 7]], 1.0);
    }

    #[test]
    fn volumes_get_a_leading_channel_axis() {
        let l = Array3::<u16>::from_elem((2, 3, 4), 1);
        let t = make_targets(l.view(), TargetSetting::LivecellDistances).unwrap();
        assert_eq!(t.shape(), &[3, 2, 3, 4]);
    }
}
