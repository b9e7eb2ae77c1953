//! Allocation checks: a size read from a file or given by a user is compared with the memory
//! the machine has available before anything is allocated, so that an absurd size is an error
//! naming the file and the figures instead of an allocation abort.

use std::path::Path;

use crate::{Error, Result};

/// The environment variable that caps the memory this process may count on (bytes, or with a
/// `K`, `M`, `G` or `T` suffix in binary units, e.g. `12G`): for a share of a machine that its
/// scheduler does not enforce, or to try what a smaller machine would refuse.
pub const LIMIT_VARIABLE: &str = "VIMSEG_MEMORY_LIMIT";

/// Memory available to new allocations: the system's `MemAvailable` (`/proc/meminfo`), less
/// where the process's cgroup (a container, a Slurm job) allows less, and at most
/// [`LIMIT_VARIABLE`] where it is set and valid; `None` where nothing says.
pub fn available_bytes() -> Option<u64> {
    let system = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    [system, cgroup_available(), env_limit().ok().flatten()]
        .into_iter()
        .flatten()
        .min()
}

/// [`LIMIT_VARIABLE`]: `Ok(None)` when unset, an error naming the variable when it does not
/// parse (a command line checks it once at the start; [`available_bytes`] ignores such a value).
pub fn env_limit() -> std::result::Result<Option<u64>, String> {
    match std::env::var(LIMIT_VARIABLE) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{LIMIT_VARIABLE}: not valid text")),
        Ok(v) => parse_size(&v).map(Some).ok_or_else(|| {
            format!(
                "{LIMIT_VARIABLE}={v:?}: expected a number of bytes, optionally with a K, M, G \
                 or T suffix (e.g. 12G)"
            )
        }),
    }
}

/// `12G`, `512M`, `1.5T`, `1073741824`: binary units; `None` for anything else.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (number, unit) = match t.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return None,
    };
    let value: f64 = number.trim().parse().ok()?;
    let bytes = value * (1u64 << shift) as f64;
    (value.is_finite() && value > 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// The room left under the process's cgroup memory limit (v2 `memory.max`, v1
/// `memory.limit_in_bytes`), where it has one.
fn cgroup_available() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = Path::new("/sys/fs/cgroup");
    let mut candidates = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim().trim_start_matches('/');
        if controllers.is_empty() {
            for dir in [root.join(path), root.to_path_buf()] {
                candidates.push((dir.join("memory.max"), dir.join("memory.current")));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            for dir in [root.join("memory").join(path), root.join("memory")] {
                candidates.push((
                    dir.join("memory.limit_in_bytes"),
                    dir.join("memory.usage_in_bytes"),
                ));
            }
        }
    }
    let read = |p: &Path| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    candidates
        .iter()
        .find_map(|(max, current)| Some(read(max)?.saturating_sub(read(current)?)))
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
    match shortfall(what, bytes, hint) {
        None => Ok(()),
        Some(what) => Err(Error::TooLarge {
            path: path.to_path_buf(),
            what,
        }),
    }
}

/// `None` when `bytes` (`None`: the size overflows) fit in the memory available, otherwise the
/// message: what needs how much, what is available, and `hint`.
pub fn shortfall(what: &str, bytes: Option<u128>, hint: &str) -> Option<String> {
    let available = available_bytes();
    let too_large = match (bytes, available) {
        (None, _) => true,
        (Some(b), Some(a)) => b > u128::from(a),
        (Some(b), None) => b > u128::from(u64::MAX),
    };
    too_large.then(|| {
        let needed = bytes.map_or_else(|| "more than 2^128 bytes".into(), human);
        let available = available.map_or_else(|| "unknown".into(), |a| human(a.into()));
        format!(
            "{what} needs {needed}, more than the {available} this machine has available; {hint}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("12G"), Some(12 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("1.5K"), Some(1536));
        assert_eq!(parse_size("2T"), Some(2 << 40));
        for bad in ["", "G", "12X", "-1G", "0", "NaN", "1e30T", "twelve"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

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
