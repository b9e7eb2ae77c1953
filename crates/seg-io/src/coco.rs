//! COCO instance annotations (the LIVECell format) and pycocotools-exact mask rasterisation.
//!
//! [`polygon_mask`] follows pycocotools' `rleFrPoly` rule: vertices scaled by 5 and rounded as C
//! does, edges walked like a DDA on that grid, and a pixel filled when its centre lies below an
//! odd number of boundary crossings of its column. It is not a pixel-centre point-in-polygon
//! test, and a textbook scanline fill differs from it on most polygons.

use std::collections::HashMap;
use std::path::Path;

use ndarray::Array2;
use serde::Deserialize;

use crate::{Error, Result};

/// A COCO annotation file, with only the fields LIVECell and torch-em use.
#[derive(Debug, Clone, Deserialize)]
pub struct CocoFile {
    pub images: Vec<CocoImage>,
    #[serde(deserialize_with = "list_or_map")]
    pub annotations: Vec<CocoAnnotation>,
    #[serde(default)]
    pub categories: Vec<CocoCategory>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CocoImage {
    pub id: u64,
    pub width: usize,
    pub height: usize,
    pub file_name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CocoAnnotation {
    #[serde(default)]
    pub id: u64,
    pub image_id: u64,
    #[serde(default)]
    pub category_id: u64,
    pub segmentation: Segmentation,
    #[serde(default)]
    pub area: f64,
    #[serde(default)]
    pub iscrowd: u8,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CocoCategory {
    pub id: u64,
    pub name: String,
}

/// A segmentation: polygons (flat `[x0, y0, x1, y1, …]` lists) or run-length encoding.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Segmentation {
    Polygons(Vec<Vec<f64>>),
    Rle(Rle),
}

/// COCO run-length encoding: `size` is `[height, width]`, counts column-major, starting with
/// background; either a list or COCO's compressed string.
#[derive(Debug, Clone, Deserialize)]
pub struct Rle {
    pub size: [usize; 2],
    pub counts: RleCounts,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RleCounts {
    List(Vec<u64>),
    Compressed(String),
}

/// Some exports store annotations as an object keyed by id; accept both.
fn list_or_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<CocoAnnotation>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrMap {
        List(Vec<CocoAnnotation>),
        Map(std::collections::BTreeMap<String, CocoAnnotation>),
    }
    Ok(match ListOrMap::deserialize(d)? {
        ListOrMap::List(v) => v,
        ListOrMap::Map(m) => m.into_values().collect(),
    })
}

impl CocoFile {
    /// Reads and parses a COCO JSON file.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read, [`Error::Content`] with serde's line and column if it
    /// is not valid COCO JSON (truncated, wrong types, missing fields).
    pub fn read(path: &Path) -> Result<CocoFile> {
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| Error::Content {
            path: path.to_path_buf(),
            what: format!("not a valid COCO annotation file: {e}"),
        })
    }

    /// The id of the category called `name`, if present.
    pub fn category_id(&self, name: &str) -> Option<u64> {
        self.categories
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id)
    }

    /// Annotations grouped by image id, in file order.
    pub fn annotations_by_image(&self) -> HashMap<u64, Vec<&CocoAnnotation>> {
        let mut map: HashMap<u64, Vec<&CocoAnnotation>> = HashMap::new();
        for a in &self.annotations {
            map.entry(a.image_id).or_default().push(a);
        }
        map
    }
}

/// Why an annotation cannot be rasterised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskProblem {
    /// A polygon with fewer than 3 points.
    TooFewPoints { points: usize },
    /// A first "polygon" of exactly 4 numbers: pycocotools would read the whole segmentation as
    /// bounding boxes.
    BoundingBoxStyle,
    /// An odd number of coordinates or a non-finite one.
    MalformedPolygon,
    /// An RLE whose size differs from the image or whose counts do not add up.
    BadRle(String),
    /// A coordinate more than 10^4 pixels outside the image (its rasterisation would walk
    /// an absurdly long boundary).
    OutOfRange,
}

impl std::fmt::Display for MaskProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaskProblem::TooFewPoints { points } => {
                write!(f, "a polygon has {points} point(s), fewer than 3")
            }
            MaskProblem::BoundingBoxStyle => write!(
                f,
                "bounding-box-style segmentation (a first polygon of 4 numbers)"
            ),
            MaskProblem::MalformedPolygon => write!(
                f,
                "a polygon has an odd number of coordinates or a non-finite one"
            ),
            MaskProblem::BadRle(what) => write!(f, "invalid RLE: {what}"),
            MaskProblem::OutOfRange => write!(
                f,
                "a coordinate lies more than 10^4 pixels outside the image"
            ),
        }
    }
}

/// The mask of a segmentation on a `height × width` image, as pycocotools' `annToMask`: the
/// union of the polygons' masks, or the decoded RLE.
pub fn segmentation_mask(
    seg: &Segmentation,
    height: usize,
    width: usize,
) -> std::result::Result<Array2<bool>, MaskProblem> {
    match seg {
        Segmentation::Polygons(polygons) => {
            if polygons.first().is_some_and(|p| p.len() == 4) {
                return Err(MaskProblem::BoundingBoxStyle);
            }
            let mut mask = Array2::from_elem((height, width), false);
            for p in polygons {
                if p.len() % 2 != 0 || p.iter().any(|v| !v.is_finite()) {
                    return Err(MaskProblem::MalformedPolygon);
                }
                if p.len() < 6 {
                    return Err(MaskProblem::TooFewPoints {
                        points: p.len() / 2,
                    });
                }
                let limit = 1e4 + height.max(width) as f64;
                if p.iter().any(|v| v.abs() > limit) {
                    return Err(MaskProblem::OutOfRange);
                }
                let part = polygon_mask(p, height, width);
                mask.zip_mut_with(&part, |m, q| *m |= *q);
            }
            Ok(mask)
        }
        Segmentation::Rle(rle) => {
            if rle.size != [height, width] {
                return Err(MaskProblem::BadRle(format!(
                    "size {:?} but the image is {height}x{width}",
                    rle.size
                )));
            }
            let counts = match &rle.counts {
                RleCounts::List(c) => c.clone(),
                RleCounts::Compressed(s) => decompress_counts(s).map_err(MaskProblem::BadRle)?,
            };
            decode_rle(&counts, height, width).map_err(MaskProblem::BadRle)
        }
    }
}

/// Rasterises one polygon (flat `[x0, y0, x1, y1, …]`, pixel units) exactly as pycocotools'
/// `rleFrPoly` + decode does.
pub fn polygon_mask(xy: &[f64], height: usize, width: usize) -> Array2<bool> {
    let counts = polygon_rle(xy, height, width);
    decode_rle(&counts, height, width).expect("rleFrPoly produces consistent counts")
}

/// pycocotools' `rleFrPoly`: column-major run lengths, starting with a run of background.
fn polygon_rle(xy: &[f64], height: usize, width: usize) -> Vec<u64> {
    const SCALE: f64 = 5.0;
    let k = xy.len() / 2;
    // C's `(int)(scale * v + .5)` truncates toward zero, as `as i64` does.
    let mut x: Vec<i64> = (0..k).map(|j| (SCALE * xy[2 * j] + 0.5) as i64).collect();
    let mut y: Vec<i64> = (0..k)
        .map(|j| (SCALE * xy[2 * j + 1] + 0.5) as i64)
        .collect();
    if k > 0 {
        x.push(x[0]);
        y.push(y[0]);
    }
    // Walk the dense boundary points on the upsampled grid and record, between consecutive
    // points, the crossings of pixel-column centres (downsampled). Points are streamed: only the
    // previous one is kept.
    let (h, w) = (height as f64, width as f64);
    let mut a: Vec<u64> = Vec::new();
    let mut previous: Option<(i64, i64)> = None;
    let mut visit = |u: i64, v: i64| {
        if let Some((pu, pv)) = previous {
            if u != pu {
                let xd = (if u < pu { u } else { u - 1 }) as f64;
                let xd = (xd + 0.5) / SCALE - 0.5;
                if xd.floor() == xd && xd >= 0.0 && xd <= w - 1.0 {
                    let yd = ((v.min(pv) as f64 + 0.5) / SCALE - 0.5)
                        .clamp(0.0, h)
                        .ceil();
                    a.push(xd as u64 * height as u64 + yd as u64);
                }
            }
        }
        previous = Some((u, v));
    };
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
        let dx = (xe - xs).abs();
        let dy = (ys - ye).abs();
        let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        if dx >= dy {
            let s = if dx == 0 {
                0.0
            } else {
                (ye - ys) as f64 / dx as f64
            };
            for d in 0..=dx {
                let t = if flip { dx - d } else { d };
                visit(t + xs, (ys as f64 + s * t as f64 + 0.5) as i64);
            }
        } else {
            let s = (xe - xs) as f64 / dy as f64;
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                visit((xs as f64 + s * t as f64 + 0.5) as i64, t + ys);
            }
        }
    }
    a.push((height * width) as u64);
    a.sort_unstable();
    let mut previous = 0;
    for value in a.iter_mut() {
        let t = *value;
        *value -= previous;
        previous = t;
    }
    // Merge zero-length runs: a run of 0 joins its neighbours.
    let mut b: Vec<u64> = Vec::with_capacity(a.len());
    let mut j = 0;
    b.push(a[j]);
    j += 1;
    while j < a.len() {
        if a[j] > 0 {
            b.push(a[j]);
            j += 1;
        } else {
            j += 1;
            if j < a.len() {
                *b.last_mut().expect("b starts non-empty") += a[j];
                j += 1;
            }
        }
    }
    b
}

/// Decodes column-major RLE counts into a `height × width` mask.
fn decode_rle(
    counts: &[u64],
    height: usize,
    width: usize,
) -> std::result::Result<Array2<bool>, String> {
    let total: u64 = counts.iter().sum();
    if total != (height * width) as u64 {
        return Err(format!(
            "counts add up to {total}, the image has {} pixels",
            height * width
        ));
    }
    // Fill column-major, then view as (height, width).
    let mut flat = vec![false; height * width];
    let mut at = 0usize;
    for (i, &c) in counts.iter().enumerate() {
        let c = c as usize;
        if i % 2 == 1 {
            flat[at..at + c].iter_mut().for_each(|p| *p = true);
        }
        at += c;
    }
    let by_column = Array2::from_shape_vec((width, height), flat).expect("sizes checked");
    Ok(by_column.reversed_axes().as_standard_layout().into_owned())
}

/// COCO's compressed RLE string (6 bits per character, continuation bit 0x20, sign bit 0x10,
/// counts after the second stored as differences to the count two before).
fn decompress_counts(s: &str) -> std::result::Result<Vec<u64>, String> {
    let bytes = s.as_bytes();
    let mut counts: Vec<i64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let (mut x, mut k, mut more) = (0i64, 0u32, true);
        while more {
            let c = *bytes.get(p).ok_or("truncated count")? as i64 - 48;
            if !(0..64).contains(&c) || k > 60 {
                return Err(format!("invalid character at {p}"));
            }
            x |= (c & 0x1f) << (5 * k);
            more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more && c & 0x10 != 0 {
                x |= -1i64 << (5 * k);
            }
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2];
        }
        counts.push(x);
    }
    counts
        .into_iter()
        .map(|c| u64::try_from(c).map_err(|_| format!("negative count {c}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_rows(m: &Array2<bool>) -> Vec<String> {
        m.rows()
            .into_iter()
            .map(|r| r.iter().map(|b| if *b { '#' } else { '.' }).collect())
            .collect()
    }

    // The expected masks below were produced by pycocotools 2.0.11 with
    // `decode(merge(frPyObjects(polygons, 6, 8)))`.
    #[test]
    fn an_axis_aligned_rectangle_excludes_its_far_edges() {
        let m = polygon_mask(&[1.0, 1.0, 6.0, 1.0, 6.0, 4.0, 1.0, 4.0], 6, 8);
        assert_eq!(
            as_rows(&m),
            vec!["........", ".#####..", ".#####..", ".#####..", "........", "........"]
        );
    }

    #[test]
    fn a_slanted_triangle_matches_pycocotools() {
        let m = polygon_mask(&[0.5, 0.5, 5.2, 1.7, 2.9, 4.6], 6, 8);
        assert_eq!(
            as_rows(&m),
            vec!["........", ".###....", "..###...", "..##....", "........", "........"]
        );
    }

    #[test]
    fn polygons_are_clipped_to_the_image_and_parts_are_united() {
        let seg = Segmentation::Polygons(vec![
            vec![-3.0, -3.0, 2.0, -3.0, 2.0, 2.0, -3.0, 2.0],
            vec![5.0, 3.0, 9.5, 3.0, 9.5, 7.5, 5.0, 7.5],
        ]);
        let m = segmentation_mask(&seg, 6, 8).unwrap();
        assert_eq!(
            as_rows(&m),
            vec!["##......", "##......", "........", ".....###", ".....###", ".....###"]
        );
    }

    #[test]
    fn degenerate_segmentations_are_reported_not_rasterised() {
        let bbox = Segmentation::Polygons(vec![vec![1.0, 1.0, 3.0, 3.0]]);
        assert_eq!(
            segmentation_mask(&bbox, 6, 8),
            Err(MaskProblem::BoundingBoxStyle)
        );
        let two = Segmentation::Polygons(vec![
            vec![1.0, 1.0, 3.0, 3.0, 4.0, 4.0],
            vec![1.0, 2.0, 3.0, 4.0],
        ]);
        assert_eq!(
            segmentation_mask(&two, 6, 8),
            Err(MaskProblem::TooFewPoints { points: 2 })
        );
        let odd = Segmentation::Polygons(vec![vec![1.0, 1.0, 3.0, 3.0, 4.0, 4.0, 5.0]]);
        assert_eq!(
            segmentation_mask(&odd, 6, 8),
            Err(MaskProblem::MalformedPolygon)
        );
        let far = Segmentation::Polygons(vec![vec![1.0, 1.0, 3e9, 3.0, 4.0, 4.0]]);
        assert_eq!(segmentation_mask(&far, 6, 8), Err(MaskProblem::OutOfRange));
    }

    #[test]
    fn compressed_counts_decode() {
        // pycocotools: encode() of a 3x3 mask with only the centre set gives b"414".
        assert_eq!(decompress_counts("414").unwrap(), vec![4, 1, 4]);
        let rle = Segmentation::Rle(Rle {
            size: [3, 3],
            counts: RleCounts::Compressed("414".into()),
        });
        assert_eq!(
            as_rows(&segmentation_mask(&rle, 3, 3).unwrap()),
            vec!["...", ".#.", "..."]
        );
        assert!(decompress_counts("4\u{7f}").is_err());
    }

    #[test]
    fn rle_decoding_is_column_major() {
        let m = decode_rle(&[1, 2, 3], 2, 3).unwrap();
        assert_eq!(as_rows(&m), vec![".#.", "#.."]);
        assert!(decode_rle(&[1, 2], 2, 3).is_err());
    }
}
