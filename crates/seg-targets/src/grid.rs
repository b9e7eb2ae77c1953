//! 2-D images are handled as volumes of depth 1, so every neighbourhood operation is written once
//! for 3-D: with depth 1 the out-of-plane neighbours never exist, which gives exactly the 2-D
//! neighbourhoods (6 → 4, 26 → 8).

use ndarray::{Array, ArrayView, CowArray, Dimension};

use crate::{Error, Result};

/// Which neighbours touch: faces only, or faces, edges and corners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Connectivity {
    /// Neighbours sharing a face: 4 in 2-D, 6 in 3-D (skimage `connectivity=1`).
    #[default]
    Face,
    /// All neighbours: 8 in 2-D, 26 in 3-D (skimage `connectivity=ndim`).
    Full,
}

impl Connectivity {
    /// The neighbour offsets `(dz, dy, dx)`, without the centre.
    pub(crate) fn offsets(self) -> Vec<[isize; 3]> {
        let mut out = Vec::with_capacity(26);
        for dz in -1isize..=1 {
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let nonzero = (dz != 0) as u8 + (dy != 0) as u8 + (dx != 0) as u8;
                    let keep = match self {
                        Connectivity::Face => nonzero == 1,
                        Connectivity::Full => nonzero >= 1,
                    };
                    if keep {
                        out.push([dz, dy, dx]);
                    }
                }
            }
        }
        out
    }

    /// The offsets that come before the centre in raster order (for one-pass scans).
    pub(crate) fn backward_offsets(self) -> Vec<[isize; 3]> {
        self.offsets()
            .into_iter()
            .filter(|&[dz, dy, dx]| (dz, dy, dx) < (0, 0, 0))
            .collect()
    }
}

/// The shape of a 2-D or 3-D array as `(depth, height, width)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grid {
    pub shape: [usize; 3],
}

impl Grid {
    pub fn of(shape: &[usize]) -> Result<Grid> {
        match *shape {
            [h, w] => Ok(Grid { shape: [1, h, w] }),
            [d, h, w] => Ok(Grid { shape: [d, h, w] }),
            _ => Err(Error::Dimensionality {
                shape: shape.to_vec(),
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn strides(&self) -> [usize; 3] {
        [self.shape[1] * self.shape[2], self.shape[2], 1]
    }

    /// The linear index of the neighbour of `at` at `offset`, if it lies inside the grid.
    #[inline]
    pub fn neighbour(&self, at: [usize; 3], offset: [isize; 3]) -> Option<usize> {
        let mut index = 0;
        let strides = self.strides();
        for axis in 0..3 {
            let c = at[axis].checked_add_signed(offset[axis])?;
            if c >= self.shape[axis] {
                return None;
            }
            index += c * strides[axis];
        }
        Some(index)
    }

    /// Calls `f(linear index, [z, y, x])` for every point in raster order.
    #[inline]
    pub fn for_each(&self, mut f: impl FnMut(usize, [usize; 3])) {
        let mut i = 0;
        for z in 0..self.shape[0] {
            for y in 0..self.shape[1] {
                for x in 0..self.shape[2] {
                    f(i, [z, y, x]);
                    i += 1;
                }
            }
        }
    }
}

/// The array's elements in row-major order, borrowed when already contiguous.
pub(crate) fn contiguous<'b, T: Clone, D: Dimension>(
    a: &'b ArrayView<'_, T, D>,
) -> CowArray<'b, T, D> {
    a.as_standard_layout()
}

/// Gives a row-major buffer the dimension type of `like`.
pub(crate) fn shaped<T, U, D: Dimension>(like: &ArrayView<U, D>, data: Vec<T>) -> Array<T, D> {
    Array::from_shape_vec(like.raw_dim(), data).expect("buffer has the input's size")
}
