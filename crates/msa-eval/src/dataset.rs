//! Dataset-level aggregation as the paper reports it.

use crate::{Error, Result, SegmentationAccuracy};

/// Per-dataset scores: the arithmetic mean over images of each image's mSA, SA50 and SA75.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DatasetScores {
    pub n_images: usize,
    pub msa: f64,
    pub sa50: f64,
    pub sa75: f64,
}

impl DatasetScores {
    /// Aggregates per-image scores.
    ///
    /// # Errors
    /// [`Error::EmptyDataset`] for no images; [`Error::MissingThreshold`] if an image was not
    /// scored at 0.5 and 0.75.
    pub fn from_images(images: &[SegmentationAccuracy]) -> Result<DatasetScores> {
        if images.is_empty() {
            return Err(Error::EmptyDataset);
        }
        let (mut msa, mut sa50, mut sa75) = (0.0, 0.0, 0.0);
        for (index, image) in images.iter().enumerate() {
            let missing = |threshold| Error::MissingThreshold { index, threshold };
            msa += image.msa;
            sa50 += image.sa50().ok_or_else(|| missing(0.5))?;
            sa75 += image.sa75().ok_or_else(|| missing(0.75))?;
        }
        let n = images.len() as f64;
        Ok(DatasetScores {
            n_images: images.len(),
            msa: msa / n,
            sa50: sa50 / n,
            sa75: sa75 / n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mean_segmentation_accuracy, MsaOptions};
    use ndarray::array;

    #[test]
    fn empty_datasets_and_missing_thresholds_are_errors() {
        assert_eq!(DatasetScores::from_images(&[]), Err(Error::EmptyDataset));
        let a = array![[1u8]];
        let only_high = MsaOptions {
            thresholds: vec![0.9],
            ..Default::default()
        };
        let s = mean_segmentation_accuracy(a.view(), a.view(), &only_high).unwrap();
        assert!(matches!(
            DatasetScores::from_images(&[s]),
            Err(Error::MissingThreshold { index: 0, .. })
        ));
    }
}
