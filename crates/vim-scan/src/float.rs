/// The element types the kernels run in: f32 (training) and f64 (gradient checks).
pub trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    /// `exp` for the kernels' inner loops: for f32 a branch-free polynomial (relative error
    /// below 3e-7 on [−87, 88], e^−87 below) that the compiler can vectorise; for f64 the
    /// exact one.
    fn exp_kernel(self) -> Self;
    /// softplus for the kernels: branch-free and vectorisable for f32 (within 3e-7 relative of
    /// `ln(1 + eᵡ)`), exact for f64.
    fn softplus_kernel(self) -> Self;
    fn ln_1p(self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! float {
    ($t:ty, $exp_kernel:expr, $softplus_kernel:expr) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn exp_kernel(self) -> Self {
                $exp_kernel(self)
            }
            #[inline(always)]
            fn softplus_kernel(self) -> Self {
                $softplus_kernel(self)
            }
            #[inline(always)]
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
float!(f32, exp_f32, softplus_f32);
float!(f64, f64::exp, softplus::<f64>);

/// exp(x) = 2^k · e^r with k = round(x / ln 2), r = x − k·ln 2 (Cody–Waite split), e^r by a
/// degree-6 polynomial; 2^k assembled in the exponent bits. No branches, so loops over it
/// vectorise.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5·2^23 trick: plain adds, so it vectorises without SSE4.1.
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let k = shifted - SHIFTER;
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67 + r * (0.041_666_5 + r * (0.008_333_9 + r * 0.001_394_6)))));
    // 2^k from the integer that the shifted sum holds in its low mantissa bits (|k| < 2^22):
    // integer lane arithmetic, where `k as i32` (a saturating conversion) would not vectorise.
    let scale = f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(SHIFTER.to_bits())
            .wrapping_add(127)
            << 23,
    );
    p * scale
}

/// ln(1 + y) for y in [0, 1]: 2·atanh(s) with s = y / (2 + y) ≤ 1/3, by its odd series to s¹¹
/// (truncation below 1e-7 relative). No branches, so loops over it vectorise.
#[inline(always)]
fn ln_1p_unit_f32(y: f32) -> f32 {
    let s = y / (2.0 + y);
    let s2 = s * s;
    2.0 * s
        * (1.0
            + s2 * (1.0 / 3.0
                + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0))))))
}

/// softplus(x) = max(x, 0) + ln(1 + e^(−|x|)), branch-free. Above 20 this equals x to within
/// f32 rounding, as PyTorch's threshold rule does.
#[inline(always)]
fn softplus_f32(x: f32) -> f32 {
    x.max(0.0) + ln_1p_unit_f32(exp_f32(-x.abs()))
}

/// softplus with PyTorch's threshold rule: `x` above 20, else `ln(1 + eᵡ)`.
#[inline(always)]
pub(crate) fn softplus<F: Float>(x: F) -> F {
    if x > F::from_f64(20.0) {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// d softplus / dx (1 above the threshold).
#[inline(always)]
pub(crate) fn softplus_grad<F: Float>(x: F) -> F {
    if x > F::from_f64(20.0) {
        F::ONE
    } else {
        sigmoid(x)
    }
}

#[inline(always)]
pub(crate) fn sigmoid<F: Float>(x: F) -> F {
    F::ONE / (F::ONE + (F::ZERO - x).exp())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_exp_is_accurate_to_3e_7() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = f64::from(x).exp();
            let ours = f64::from(super::exp_f32(x));
            worst = worst.max(((ours - exact) / exact).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "{worst:e}");
        // Below the range it saturates at e^-87 (about 1.6e-38), which is 0 for the scan.
        assert!(super::exp_f32(-1000.0) < 2e-38);
    }

    #[test]
    fn the_kernel_softplus_is_accurate_to_5e_7() {
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let v = f64::from(x);
            let exact = v.max(0.0) + (-v.abs()).exp().ln_1p();
            let ours = f64::from(super::softplus_f32(x));
            worst = worst.max(((ours - exact) / exact).abs());
            x += 0.0071;
        }
        assert!(worst < 5e-7, "{worst:e}");
        // Far above the threshold it is the identity, as PyTorch's rule.
        assert_eq!(super::softplus_f32(30.0), 30.0);
    }
}
