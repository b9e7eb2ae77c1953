//! The vector path element-wise row functions run on: the same function compiled for
//! AVX-512F, for AVX2 + FMA, or as it is (loops the compiler vectorises for the baseline).

use crate::sgemm;

/// Which compiled copy of a row function runs. A value other than `Portable` names features
/// the CPU has: it is made only by [`RowPath::detect`] and [`RowPath::available`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowPath {
    Portable,
    Avx2,
    Avx512,
}

impl RowPath {
    /// The widest path this CPU has.
    pub(crate) fn detect() -> RowPath {
        if sgemm::avx512() {
            RowPath::Avx512
        } else if sgemm::simd() {
            RowPath::Avx2
        } else {
            RowPath::Portable
        }
    }

    /// Every path this CPU has, the portable one first (the tests run each).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<RowPath> {
        let mut paths = vec![RowPath::Portable];
        if sgemm::simd() {
            paths.push(RowPath::Avx2);
        }
        if sgemm::avx512() {
            paths.push(RowPath::Avx512);
        }
        paths
    }
}

/// Defines `fn $name(path: RowPath, args…)`, which calls `$inner(args…)` (an `#[inline(always)]`
/// function) compiled for `path`: AVX-512F (with AVX2 and FMA), AVX2 + FMA, or as it is.
macro_rules! row_paths {
    ($(#[$m:meta])* fn $name:ident = $inner:ident($($a:ident : $t:ty),* $(,)?) $(-> $r:ty)?;) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name(path: $crate::rowpath::RowPath, $($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn wide($($a: $t),*) $(-> $r)? {
                $inner($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn fast($($a: $t),*) $(-> $r)? {
                $inner($($a),*)
            }
            match path {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: RowPath::Avx512 is made only where the CPU has AVX-512F, AVX2 and
                // FMA (RowPath's invariant).
                $crate::rowpath::RowPath::Avx512 => unsafe { wide($($a),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: RowPath::Avx2 is made only where the CPU has AVX2 and FMA.
                $crate::rowpath::RowPath::Avx2 => unsafe { fast($($a),*) },
                _ => $inner($($a),*),
            }
        }
    };
}
