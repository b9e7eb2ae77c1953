#![doc = include_str!("../README.md")]

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod float;
#[cfg(feature = "candle")]
mod op;
pub mod reference;

pub use float::Float;
#[cfg(feature = "candle")]
pub use op::{selective_scan, selective_scan_reversed};

/// The dimensions of a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanShape {
    pub batch: usize,
    /// E: channels (Mamba's `d_inner`).
    pub channels: usize,
    /// N: the state size per channel.
    pub state: usize,
    /// L: the sequence length.
    pub length: usize,
}

/// The inputs of a scan, as row-major slices with the shapes of [`crate`]'s documentation.
#[derive(Debug, Clone, Copy)]
pub struct ScanInputs<'a, F> {
    pub u: &'a [F],
    pub delta: &'a [F],
    pub a: &'a [F],
    pub b: &'a [F],
    pub c: &'a [F],
    pub d: Option<&'a [F]>,
    pub z: Option<&'a [F]>,
    pub delta_bias: Option<&'a [F]>,
    pub delta_softplus: bool,
    /// Scan backwards in time: `h_t = exp(Δ_t A) h_{t+1} + Δ_t B_t u_t` from `t = L − 1` down,
    /// the same as flipping every (…, L) input along L, scanning, and flipping the output
    /// back, without the copies. The backward direction of a bidirectional Mamba layer.
    pub reverse: bool,
}

/// Errors of `vim-scan`.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An input's length does not match the shape.
    #[error("{name} has {found} elements, expected {expected} for {shape:?}")]
    Length {
        name: &'static str,
        found: usize,
        expected: usize,
        shape: ScanShape,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl<F> ScanInputs<'_, F> {
    /// Checks every length against `shape`.
    pub fn check(&self, shape: ScanShape) -> Result<()> {
        let ScanShape {
            batch,
            channels,
            state,
            length,
        } = shape;
        let rows = batch * channels * length;
        let checks: [(&'static str, Option<usize>, usize); 8] = [
            ("u", Some(self.u.len()), rows),
            ("delta", Some(self.delta.len()), rows),
            ("A", Some(self.a.len()), channels * state),
            ("B", Some(self.b.len()), batch * state * length),
            ("C", Some(self.c.len()), batch * state * length),
            ("D", self.d.map(<[F]>::len), channels),
            ("z", self.z.map(<[F]>::len), rows),
            ("delta_bias", self.delta_bias.map(<[F]>::len), channels),
        ];
        for (name, found, expected) in checks {
            if let Some(found) = found {
                if found != expected {
                    return Err(Error::Length {
                        name,
                        found,
                        expected,
                        shape,
                    });
                }
            }
        }
        Ok(())
    }
}
