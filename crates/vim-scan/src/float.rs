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
    fn ln_1p(self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
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
float!(f32);
float!(f64);

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
