//! torch-em's losses on sigmoid outputs.

use candle_core::Tensor;

use crate::Result;

/// torch-em's `DiceLoss`: per channel `1 − 2·Σ p·g / max(Σ p² + Σ g², 1e-7)` with the sums
/// over batch and pixels, summed over channels. `pred`, `target`: (B, C, H, W).
pub fn dice_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.dims() != target.dims() {
        return Err(crate::Error::Shape {
            what: "dice loss prediction",
            shape: pred.dims().to_vec(),
            problem: format!("the target's shape {:?} differs", target.dims()),
        });
    }
    let c = pred.dim(1)?;
    let flat = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(0, 1)?.reshape((c, ()))?) };
    let (p, g) = (flat(pred)?, flat(target)?);
    let num = (&p * &g)?.sum(1)?;
    let den = (p.sqr()?.sum(1)? + g.sqr()?.sum(1)?)?.maximum(1e-7)?;
    let score = ((num * 2.0)? / den)?;
    Ok(score.affine(-1.0, 1.0)?.sum_all()?)
}

/// torch-em's `DiceBasedDistanceLoss(mask_distances_in_bg=True)` for `[foreground, centre
/// distance, boundary distance]`: Dice on the foreground plus Dice on each distance channel,
/// both sides multiplied by the true foreground.
pub fn distance_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.dims() != target.dims() || pred.dim(1)? != 3 {
        return Err(crate::Error::Shape {
            what: "distance loss prediction",
            shape: pred.dims().to_vec(),
            problem: format!(
                "needs 3 channels, as the target (shape {:?})",
                target.dims()
            ),
        });
    }
    let ch = |t: &Tensor, i: usize| -> Result<Tensor> { Ok(t.narrow(1, i, 1)?) };
    let mask = ch(target, 0)?;
    let mut loss = dice_loss(&ch(pred, 0)?, &mask)?;
    for i in 1..3 {
        let p = (ch(pred, i)? * &mask)?;
        let g = (ch(target, i)? * &mask)?;
        loss = (loss + dice_loss(&p, &g)?)?;
    }
    Ok(loss)
}

/// Which loss a setting trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    Dice,
    DistanceDice,
}

impl LossKind {
    pub fn compute(self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        match self {
            LossKind::Dice => dice_loss(pred, target),
            LossKind::DistanceDice => distance_loss(pred, target),
        }
    }
}
