//! `cargo xtask fuzz`: the fuzz targets of `seg_data::fuzz` for a bounded time each, with
//! cargo-fuzz (libFuzzer, nightly) where it is installed, otherwise with a built-in mutation
//! driver that runs on any toolchain. Built-in runs happen in a child process per target under
//! an address-space limit, so a panic, an abort, a runaway allocation or a hang each fail the
//! command, with the input that caused it saved under `fuzz/artifacts/<target>/`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use seg_data::fuzz::{Target, TARGETS};
use seg_data::synthetic::SplitMix64;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Targets, comma-separated (default: all): coco_json, polygon_mask, tiff_reader,
    /// hdf5_reader.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// auto (cargo fuzz where a nightly toolchain and cargo-fuzz are installed, otherwise
    /// builtin), libfuzzer or builtin.
    #[arg(long, default_value = "auto")]
    engine: String,
    /// Seed of the built-in driver's mutations (a run is reproducible from its seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Address-space limit of each target's process, MiB: a larger allocation fails the run.
    #[arg(long, default_value_t = 4096)]
    memory_mib: u64,
    /// Run one target in this process (what the built-in driver starts per target).
    #[arg(long, hide = true)]
    worker: Option<String>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn selected(args: &Args) -> anyhow::Result<Vec<&'static Target>> {
    if args.targets.is_empty() {
        return Ok(TARGETS.iter().collect());
    }
    args.targets
        .iter()
        .map(|name| {
            TARGETS.iter().find(|t| t.name == name).with_context(|| {
                let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
                format!("--targets {name:?}: no such target ({})", names.join(", "))
            })
        })
        .collect()
}

fn cargo_fuzz_available() -> bool {
    Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(name) = &args.worker {
        let target = TARGETS
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("no target {name:?}"))?;
        return worker(target, args.seconds, args.seed, &artifacts(target));
    }
    let targets = selected(args)?;
    let libfuzzer = match args.engine.as_str() {
        "auto" => cargo_fuzz_available(),
        "libfuzzer" => true,
        "builtin" => false,
        other => bail!("--engine {other:?}: expected auto, libfuzzer or builtin"),
    };
    println!(
        "fuzzing {} target(s) for {} s each with {}",
        targets.len(),
        args.seconds,
        if libfuzzer {
            "cargo fuzz (libFuzzer)"
        } else {
            "the built-in driver"
        }
    );
    let mut failed = Vec::new();
    for t in targets {
        let ok = if libfuzzer {
            run_libfuzzer(t, args)?
        } else {
            run_builtin(t, args)?
        };
        if !ok {
            failed.push(t.name);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz target(s) failed: {}; the inputs are in fuzz/artifacts/",
            failed.join(", ")
        );
    }
    Ok(())
}

fn run_libfuzzer(t: &Target, args: &Args) -> anyhow::Result<bool> {
    let status = Command::new("cargo")
        .current_dir(root().join("fuzz"))
        .args(["+nightly", "fuzz", "run", t.name, "--"])
        .env(
            seg_io::memory::LIMIT_VARIABLE,
            format!("{}M", args.memory_mib / 2),
        )
        .arg(format!("-max_total_time={}", args.seconds))
        .arg(format!("-rss_limit_mb={}", args.memory_mib))
        .status()
        .context("running cargo fuzz")?;
    Ok(status.success())
}

fn artifacts(t: &Target) -> PathBuf {
    root().join("fuzz").join("artifacts").join(t.name)
}

fn run_builtin(t: &Target, args: &Args) -> anyhow::Result<bool> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let dir = artifacts(t);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    // The shell applies the address-space limit, then becomes the worker.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v "$1" && shift && exec "$@""#)
        .arg("sh")
        .arg((args.memory_mib * 1024).to_string())
        .arg(&exe)
        .args(["fuzz", "--worker", t.name, "--seconds"])
        // The library's allocation checks refuse what the address-space limit would abort.
        .env(
            seg_io::memory::LIMIT_VARIABLE,
            format!("{}M", args.memory_mib / 2),
        )
        .arg(args.seconds.to_string())
        .arg("--seed")
        .arg(args.seed.to_string())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the fuzz worker")?;
    let limit = Duration::from_secs(args.seconds + 60);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let last = dir.join("last-input");
    let outcome = match status {
        Some(s) if s.success() => return Ok(true),
        Some(s) => format!("ended with {s}"),
        None => format!("hung (no end after {} s)", limit.as_secs()),
    };
    let kept = dir.join(format!("crash-builtin-seed{}", args.seed));
    if last.exists() {
        std::fs::rename(&last, &kept)?;
    }
    println!(
        "  {}: {outcome}; the input is {}",
        t.name,
        if kept.exists() {
            kept.display().to_string()
        } else {
            "unknown".into()
        }
    );
    Ok(false)
}

/// Values that break size arithmetic: zero, one, signed and unsigned extremes.
const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    u64::MAX,
];

/// One to eight random edits of `input`: bit flips, interesting bytes and words, truncation,
/// deletion, duplication and insertion of ranges, and splices of another input.
fn mutate(input: &[u8], other: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        if b.is_empty() {
            b.push(rng.next_u64() as u8);
            continue;
        }
        let at = rng.below(b.len());
        match rng.below(9) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = rng.next_u64() as u8,
            2 => b[at] = INTERESTING[rng.below(5)] as u8,
            3 => {
                let width = [2, 4, 8][rng.below(3)];
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let be = rng.below(2) == 0;
                for i in 0..width.min(b.len() - at) {
                    b[at + i] = if be { v[width - 1 - i] } else { v[i] };
                }
            }
            4 => b.truncate(at),
            5 => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                b.drain(at..end);
            }
            6 => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                let copy = b[at..end].to_vec();
                let to = rng.below(b.len() + 1);
                b.splice(to..to, copy);
            }
            7 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                b.splice(at..at, bytes);
            }
            _ => {
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let end = (from + 1 + rng.below(256)).min(other.len());
                    let to = at.min(b.len());
                    b.truncate(to);
                    b.extend_from_slice(&other[from..end]);
                }
            }
        }
    }
    b
}

/// Runs `t` on mutated inputs for `seconds`, writing each input to `dir/last-input` before
/// running it (the parent keeps it when the run dies). A panic fails the run here.
fn worker(t: &Target, seconds: u64, seed: u64, dir: &Path) -> anyhow::Result<()> {
    let mut rng = SplitMix64::new(seed ^ t.name.bytes().map(u64::from).sum::<u64>());
    let mut pool = (t.seeds)();
    if pool.is_empty() {
        bail!("{}: no seed input", t.name);
    }
    let last = dir.join("last-input");
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let mut runs = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let base = &pool[rng.below(pool.len())];
        let other = &pool[rng.below(pool.len())];
        let input = mutate(base, other, &mut rng);
        let mut f = std::fs::File::create(&last)?;
        f.write_all(&input)?;
        drop(f);
        if std::panic::catch_unwind(|| (t.run)(&input)).is_err() {
            let kept = dir.join(format!("crash-builtin-seed{seed}"));
            std::fs::rename(&last, &kept)?;
            bail!(
                "{}: panicked on input {} (run {runs})",
                t.name,
                kept.display()
            );
        }
        runs += 1;
        // Without coverage feedback, keeping some mutants lets edits accumulate.
        if runs.is_multiple_of(32) {
            if pool.len() < 256 {
                pool.push(input);
            } else {
                let i = rng.below(pool.len());
                pool[i] = input;
            }
        }
    }
    let _ = std::fs::remove_file(&last);
    seg_data::fuzz::remove_scratch();
    println!("  {}: {runs} inputs, no failure", t.name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_reproducible_and_change_the_input() {
        let input: Vec<u8> = (0..100).collect();
        let (mut a, mut b) = (SplitMix64::new(5), SplitMix64::new(5));
        let mut changed = 0;
        for _ in 0..200 {
            let x = mutate(&input, &input, &mut a);
            assert_eq!(x, mutate(&input, &input, &mut b));
            changed += usize::from(x != input);
        }
        assert!(changed > 190, "{changed}");
    }
}
