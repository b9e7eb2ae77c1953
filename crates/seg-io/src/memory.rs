//! Allocation checks: a size read from a file or given by a user is compared with the memory
//! the machine has available before anything is allocated, so that an absurd size is an error
//! naming the file and the figures instead of an allocation abort.

use std::path::Path;

use crate::{Error, Result};

/// Memory available to new allocations (`MemAvailable` of `/proc/meminfo`); `None` where the
/// system does not say.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes as GiB with two decimals, or as bytes below one MiB.
pub fn human(bytes: u128) -> String {
    if bytes < 1 << 20 {
        format!("{bytes} bytes")
    } else {
        format!("{:.2} GiB", bytes as f64 / f64::from(1u32 << 30))
    }
}

/// The product of `factors` in bytes, `None` when it does not fit in 128 bits.
pub fn product(factors: &[usize]) -> Option<u128> {
    factors
        .iter()
        .try_fold(1u128, |acc, &f| acc.checked_mul(f as u128))
}

/// Refuses to allocate `bytes` (`None`: the size overflows) for `what` when it is more than the
/// memory available; `hint` says what to do instead.
///
/// # Errors
/// [`Error::TooLarge`] naming `path`, `what`, the size and the available memory.
pub fn check_allocation(path: &Path, what: &str, bytes: Option<u128>, hint: &str) -> Result<()> {
    let available = available_bytes();
    let too_large = match (bytes, available) {
        (None, _) => true,
        (Some(b), Some(a)) => b > u128::from(a),
        (Some(b), None) => b > u128::from(u64::MAX),
    };
    if too_large {
        let needed = bytes.map_or_else(|| "more than 2^128 bytes".into(), human);
        let available = available.map_or_else(|| "unknown".into(), |a| human(a.into()));
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            what: format!(
                "{what} needs {needed}, more than the {available} this machine has available; \
                 {hint}"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_the_machine_are_refused_with_the_figures() {
        let p = Path::new("v.h5");
        assert!(check_allocation(p, "a slice", Some(1 << 20), "").is_ok());
        let e = check_allocation(
            p,
            "reading x",
            product(&[100_000, 100_000, 100_000]),
            "use less",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("v.h5") && e.contains("reading x") && e.contains("931322.57 GiB"),
            "{e}"
        );
        assert!(e.contains("use less"), "{e}");
        let e = check_allocation(p, "y", product(&[usize::MAX, usize::MAX, 4]), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 2^128"), "{e}");
    }
}
