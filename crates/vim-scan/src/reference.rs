//! A plain sequential implementation in f64, written to mirror the equations rather than to be
//! fast; the tests compare the kernels against it. A reversed scan walks `t` from `L − 1` down.

use crate::float::{sigmoid, softplus};
use crate::{Result, ScanInputs, ScanShape};

/// The scan's output, computed sequentially in f64 (inputs converted from f32 or f64).
pub fn selective_scan<F: crate::Float>(
    shape: ScanShape,
    inputs: &ScanInputs<F>,
) -> Result<Vec<f64>> {
    inputs.check(shape)?;
    let ScanShape {
        batch,
        channels,
        state,
        length,
    } = shape;
    let x = |s: &[F], i: usize| s[i].to_f64();
    let mut out = vec![0.0; batch * channels * length];
    for b in 0..batch {
        for e in 0..channels {
            let mut h = vec![0.0f64; state];
            for step in 0..length {
                let t = if inputs.reverse {
                    length - 1 - step
                } else {
                    step
                };
                let row = (b * channels + e) * length + t;
                let mut dt = x(inputs.delta, row) + inputs.delta_bias.map_or(0.0, |s| x(s, e));
                if inputs.delta_softplus {
                    dt = softplus(dt);
                }
                let u = x(inputs.u, row);
                let mut y = 0.0;
                for (n, hn) in h.iter_mut().enumerate() {
                    let bc = (b * state + n) * length + t;
                    *hn = (dt * x(inputs.a, e * state + n)).exp() * *hn + dt * x(inputs.b, bc) * u;
                    y += x(inputs.c, bc) * *hn;
                }
                y += inputs.d.map_or(0.0, |s| x(s, e)) * u;
                if let Some(z) = inputs.z {
                    let zv = x(z, row);
                    y *= zv * sigmoid(zv);
                }
                out[row] = y;
            }
        }
    }
    Ok(out)
}
