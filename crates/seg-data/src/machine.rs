//! A one-line description of the machine, for benchmark output and experiment reports.

/// The CPU model, the number of logical CPUs and the operating system, e.g.
/// `"AMD EPYC, 2 logical CPUs, linux x86_64"`.
pub fn describe() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "{model}, {cpus} logical CPU{}, {} {}",
        if cpus == 1 { "" } else { "s" },
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_description_names_cpus_and_platform() {
        let d = super::describe();
        assert!(
            d.contains("logical CPU") && d.contains(std::env::consts::ARCH),
            "{d}"
        );
    }
}
