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
    moments: HashMap<String, Moments>,
}

/// One parameter's first and second moments: tensors on the parameter's device, or, for an
/// f32 parameter on the CPU, buffers that the fused update rewrites in place.
enum Moments {
    Tensors(Tensor, Tensor),
    Cpu(Vec<f32>, Vec<f32>),
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
        let update = Update {
            b1: self.beta1 as f32,
            b2: self.beta2 as f32,
            eps: self.eps as f32,
            step: (self.lr / bc1) as f32,
            sbc2: bc2.sqrt() as f32,
        };
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let fused = var.device().is_cpu()
                && var.dtype() == candle_core::DType::F32
                && g.dtype() == candle_core::DType::F32;
            let moments = match self.moments.remove(name) {
                Some(m) => m,
                None if fused => {
                    let n = var.elem_count();
                    Moments::Cpu(vec![0.0; n], vec![0.0; n])
                }
                None => Moments::Tensors(g.zeros_like()?, g.zeros_like()?),
            };
            let moments = match moments {
                Moments::Cpu(mut m, mut v) if fused => {
                    let op = InPlace {
                        update,
                        moments: std::sync::Mutex::new((&mut m, &mut v)),
                    };
                    var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                    Moments::Cpu(m, v)
                }
                other => {
                    let (m, v) = other.tensors(var)?;
                    let m = ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
                    let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
                    let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
                    let update = ((&m / denom)? * (self.lr / bc1))?;
                    var.set(&(var.as_tensor() - update)?)?;
                    Moments::Tensors(m, v)
                }
            };
            self.moments.insert(name.clone(), moments);
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<param>`, `v.<param>`), for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, var) in &self.vars {
            let Some(moments) = self.moments.get(name) else {
                continue;
            };
            // A CPU buffer of the parameter's own size always makes a tensor of its shape.
            if let Ok((m, v)) = moments.tensors(var) {
                out.insert(format!("m.{name}"), m);
                out.insert(format!("v.{name}"), v);
            }
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
                    let moments = if dev.is_cpu() && var.dtype() == candle_core::DType::F32 {
                        let flat = |t: &Tensor| -> Result<Vec<f32>> {
                            Ok(t.to_dtype(candle_core::DType::F32)?
                                .flatten_all()?
                                .to_vec1()?)
                        };
                        Moments::Cpu(flat(m)?, flat(v)?)
                    } else {
                        Moments::Tensors(m.to_device(dev)?, v.to_device(dev)?)
                    };
                    self.moments.insert(name.clone(), moments);
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

impl Moments {
    /// The moments as tensors of the parameter's shape, on its device.
    fn tensors(&self, var: &Var) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Tensors(m, v) => (m.clone(), v.clone()),
            Moments::Cpu(m, v) => {
                let t = |x: &[f32]| Tensor::from_slice(x, var.shape(), var.device());
                (t(m)?, t(v)?)
            }
        })
    }
}

/// Adam's constants for one step: `step` = lr / (1 − β1ᵗ), `sbc2` = √(1 − β2ᵗ).
#[derive(Clone, Copy)]
struct Update {
    b1: f32,
    b2: f32,
    eps: f32,
    step: f32,
    sbc2: f32,
}

/// The update of an f32 CPU parameter in one pass over its values, its gradient and its
/// moments, all rewritten in place: no copies of the parameter or the moments are made (a
/// composed update allocates ten full-size temporaries per parameter, which dominates a
/// step of a 100M-parameter model).
struct InPlace<'a> {
    update: Update,
    moments: std::sync::Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
}

impl candle_core::InplaceOp2 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "adam"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        use rayon::prelude::*;
        let (p, g) = match (s1, l1.contiguous_offsets(), s2, l2.contiguous_offsets()) {
            (CpuStorage::F32(p), Some((a, b)), CpuStorage::F32(g), Some((c, d))) => {
                (&mut p[a..b], &g[c..d])
            }
            _ => candle_core::bail!("adam: expected a contiguous f32 parameter and gradient"),
        };
        let mut guard = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        let (m, v) = &mut *guard;
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!(
                "adam: {} values, {} gradients, moments of {} and {}",
                p.len(),
                g.len(),
                m.len(),
                v.len()
            );
        }
        let Update {
            b1,
            b2,
            eps,
            step,
            sbc2,
        } = self.update;
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= step * *m / (v.sqrt() / sbc2 + eps);
                }
            });
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

    /// The f32 CPU update written in place equals Adam's formula (worked in f64 here) over
    /// several steps, on more values than one parallel chunk; and an optimizer restored from
    /// its state tensors continues exactly as the original does.
    #[test]
    fn in_place_update_follows_the_formula_and_resumes_exactly() {
        let dev = candle_core::Device::Cpu;
        let n = 40_000;
        let init: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let grad = |k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 13 + k * 7) % 29) as f32 - 14.0) / (3.0 + k as f32))
                .collect()
        };
        let grads_of = |w: &Var, k: usize| {
            let c = Tensor::from_vec(grad(k), (200, 200), &dev).unwrap();
            (w.as_tensor() * c)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let w = Var::from_vec(init.clone(), (200, 200), &dev).unwrap();
        let mut adam = Adam::new(vec![("w".into(), w.clone())], 0.01);
        let mut p: Vec<f64> = init.iter().map(|&x| x as f64).collect();
        let (mut m, mut v) = (vec![0.0f64; n], vec![0.0f64; n]);
        for k in 1..=3 {
            adam.step(&grads_of(&w, k)).unwrap();
            let (bc1, bc2) = (1.0 - 0.9f64.powi(k as i32), 1.0 - 0.999f64.powi(k as i32));
            for (i, g) in grad(k).into_iter().enumerate() {
                let g = g as f64;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                p[i] -= 0.01 * (m[i] / bc1) / ((v[i] / bc2).sqrt() + 1e-8);
            }
        }
        let got = w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let worst = got
            .iter()
            .zip(&p)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "largest difference {worst}");
        let moved = got.iter().zip(&init).filter(|(a, b)| a != b).count();
        assert!(moved > n / 2, "only {moved} of {n} values moved");

        let w2 = Var::from_tensor(&w.as_tensor().copy().unwrap()).unwrap();
        let mut resumed = Adam::new(vec![("w".into(), w2.clone())], 0.5);
        resumed.restore(3, 0.01, &adam.state_tensors()).unwrap();
        adam.step(&grads_of(&w, 4)).unwrap();
        resumed.step(&grads_of(&w2, 4)).unwrap();
        let (a, b) = (
            w.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            w2.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        assert_eq!(a, b);
    }
}
