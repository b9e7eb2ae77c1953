//! Adam and ReduceLROnPlateau as PyTorch defines them, with state that can be saved and
//! restored so a resumed run continues exactly.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;

/// PyTorch's `Adam` (no weight decay, no amsgrad).
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Optimizer steps taken.
    pub step: u64,
    vars: Vec<(String, Var)>,
    /// First and second moments per parameter name (created on a parameter's first gradient).
    moments: HashMap<String, (Tensor, Tensor)>,
}

impl Adam {
    /// The paper's settings: lr 1e-4, betas (0.9, 0.999), eps 1e-8.
    pub fn new(vars: Vec<(String, Var)>, lr: f64) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            vars,
            moments: HashMap::new(),
        }
    }

    /// One update: `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`,
    /// `θ ← θ − lr · m̂ / (√v̂ + eps)`. Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let (m, v) = match self.moments.get(name) {
                Some((m, v)) => (m.clone(), v.clone()),
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let (m, v) = if var.device().is_cpu() && var.dtype() == candle_core::DType::F32 {
                self.fused_cpu(var, g, &m, &v, bc1, bc2)?
            } else {
                let m = ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
                let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
                let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
                let update = ((&m / denom)? * (self.lr / bc1))?;
                var.set(&(var.as_tensor() - update)?)?;
                (m, v)
            };
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }

    /// The same update in one pass over f32 slices (the tensor version allocates ten
    /// full-size temporaries per parameter, which dominates a step of a 100M-parameter model).
    fn fused_cpu(
        &self,
        var: &Var,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        bc1: f64,
        bc2: f64,
    ) -> Result<(Tensor, Tensor)> {
        use rayon::prelude::*;
        let shape = var.shape().clone();
        let mut p: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        let g: Vec<f32> = g
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let mut m: Vec<f32> = m.flatten_all()?.to_vec1()?;
        let mut v: Vec<f32> = v.flatten_all()?.to_vec1()?;
        let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.eps as f32);
        let step = (self.lr / bc1) as f32;
        let sbc2 = bc2.sqrt() as f32;
        p.par_iter_mut()
            .zip(m.par_iter_mut())
            .zip(v.par_iter_mut())
            .zip(g.par_iter())
            .with_min_len(4096)
            .for_each(|(((p, m), v), g)| {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= step * *m / (v.sqrt() / sbc2 + eps);
            });
        let dev = var.device();
        var.set(&Tensor::from_vec(p, shape.clone(), dev)?)?;
        Ok((
            Tensor::from_vec(m, shape.clone(), dev)?,
            Tensor::from_vec(v, shape, dev)?,
        ))
    }

    /// The moments as named tensors (`m.<param>`, `v.<param>`), for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, (m, v)) in &self.moments {
            out.insert(format!("m.{name}"), m.clone());
            out.insert(format!("v.{name}"), v.clone());
        }
        out
    }

    /// Restores the moments written by [`Adam::state_tensors`].
    pub fn restore(&mut self, step: u64, lr: f64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.step = step;
        self.lr = lr;
        self.moments.clear();
        for (name, var) in &self.vars {
            match (
                tensors.get(&format!("m.{name}")),
                tensors.get(&format!("v.{name}")),
            ) {
                (Some(m), Some(v)) => {
                    if m.dims() != var.dims() || v.dims() != var.dims() {
                        return Err(crate::Error::OptimizerState {
                            key: name.clone(),
                            problem: format!(
                                "shape {:?}, the parameter's {:?}",
                                m.dims(),
                                var.dims()
                            ),
                        });
                    }
                    let dev = var.device();
                    self.moments
                        .insert(name.clone(), (m.to_device(dev)?, v.to_device(dev)?));
                }
                (None, None) => {}
                _ => {
                    return Err(crate::Error::OptimizerState {
                        key: name.clone(),
                        problem: "incomplete (one of the two moments is missing)".into(),
                    })
                }
            }
        }
        Ok(())
    }
}

/// PyTorch's `ReduceLROnPlateau(mode="min", factor, patience)` with its other defaults
/// (relative threshold 1e-4, no cooldown, min_lr 0, eps 1e-8).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReduceLrOnPlateau {
    pub factor: f64,
    pub patience: usize,
    pub threshold: f64,
    pub best: f64,
    pub bad_epochs: usize,
}

impl ReduceLrOnPlateau {
    /// The paper's settings: factor 0.9, patience 10.
    pub fn paper() -> Self {
        Self::new(0.9, 10)
    }

    pub fn new(factor: f64, patience: usize) -> Self {
        ReduceLrOnPlateau {
            factor,
            patience,
            threshold: 1e-4,
            best: f64::INFINITY,
            bad_epochs: 0,
        }
    }

    /// Records one validation value and returns the learning rate to use next.
    pub fn step(&mut self, metric: f64, lr: f64) -> f64 {
        if metric < self.best * (1.0 - self.threshold) {
            self.best = metric;
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        if self.bad_epochs > self.patience {
            self.bad_epochs = 0;
            let new = lr * self.factor;
            if lr - new > 1e-8 {
                return new;
            }
        }
        lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plateau_reduces_after_patience_bad_epochs() {
        let mut s = ReduceLrOnPlateau::new(0.5, 2);
        let mut lr = 1.0;
        for v in [1.0, 0.9, 0.9, 0.9] {
            lr = s.step(v, lr);
        }
        assert_eq!(lr, 1.0, "two bad epochs are within patience");
        lr = s.step(0.95, lr);
        assert_eq!(lr, 0.5, "the third bad epoch reduces");
        // An improvement smaller than the relative threshold counts as bad.
        let mut s = ReduceLrOnPlateau::new(0.5, 0);
        assert_eq!(s.step(1.0, 1.0), 1.0);
        assert_eq!(s.step(1.0 - 1e-6, 1.0), 0.5);
    }

    #[test]
    fn adam_first_step_moves_each_weight_by_lr_against_its_gradient() {
        let dev = candle_core::Device::Cpu;
        let w = Var::from_vec(vec![1.0f64, -2.0, 3.0], 3, &dev).unwrap();
        let loss = (w.as_tensor() * Tensor::new(&[2.0f64, -0.5, 0.0], &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut adam = Adam::new(vec![("w".into(), w.clone())], 0.1);
        adam.step(&grads).unwrap();
        let got = w.as_tensor().to_vec1::<f64>().unwrap();
        // m̂ = g, v̂ = g², so the step is lr · g / (|g| + eps); zero gradient, no step.
        assert!((got[0] - 0.9).abs() < 1e-7, "{got:?}");
        assert!((got[1] - -1.9).abs() < 1e-7, "{got:?}");
        assert_eq!(got[2], 3.0);
    }
}
