/// Element types usable as instance labels (label 0 is background unless said otherwise).
pub trait Label: Copy + Ord + Send + Sync + std::fmt::Debug + 'static {
    /// The largest value of the type (used like skimage uses `np.iinfo(dtype).max`).
    const MAX: Self;
    /// The background value, 0.
    const ZERO: Self;
    /// The id as u64.
    fn to_u64(self) -> u64;
}

macro_rules! label {
    ($($t:ty),*) => {$(
        impl Label for $t {
            const MAX: Self = <$t>::MAX;
            const ZERO: Self = 0;
            #[inline]
            fn to_u64(self) -> u64 {
                self as u64
            }
        }
    )*};
}
label!(u8, u16, u32, u64, usize);

impl Label for bool {
    const MAX: Self = true;
    const ZERO: Self = false;
    #[inline]
    fn to_u64(self) -> u64 {
        self as u64
    }
}
