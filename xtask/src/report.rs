//! The experiment report: results.json, results.md (the paper's Fig. 2 and Table 1 with our
//! numbers beside them), an SVG bar chart of mSA, and PNG panels of a few test images.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use ndarray::{Array2, Array3, Axis};
use vim_nets::ModelKind;

use crate::experiment::{Dataset, ModelResult, TestImage};

/// The paper's Fig. 2 mSA (torch-em `experiments/misc/get_vimunet_plots.py` at 33239758, as
/// recorded in the project's reference spec §1.2): (LIVECell boundaries, LIVECell distances,
/// CREMI boundaries).
pub fn paper_msa(kind: ModelKind) -> (f64, f64, f64) {
    match kind {
        ModelKind::UNet => (0.372, 0.429, 0.354),
        ModelKind::UnetrB => (0.110, 0.145, 0.285),
        ModelKind::UnetrL => (0.171, 0.157, 0.325),
        ModelKind::UnetrH => (0.216, 0.136, 0.324),
        ModelKind::VimUnetT => (0.269, 0.381, 0.518),
        ModelKind::VimUnetS => (0.274, 0.397, 0.530),
    }
}

/// The paper's Table 1 (parameters, training memory), as quoted in the reference spec §1.1.
pub fn paper_table1(kind: ModelKind) -> (&'static str, &'static str) {
    match kind {
        ModelKind::UNet => ("28M", "≤ 4 GB"),
        ModelKind::UnetrB => ("113M", "≤ 24 GB"),
        ModelKind::UnetrL => ("334M", "≤ 38 GB"),
        ModelKind::UnetrH => ("665M", "n/a"),
        ModelKind::VimUnetT => ("18M", "n/a"),
        ModelKind::VimUnetS => ("39M", "n/a"),
    }
}

fn paper_value(kind: ModelKind, setting: &str) -> f64 {
    let (b, d, c) = paper_msa(kind);
    match setting {
        "livecell-boundaries" => b,
        "livecell-distances" => d,
        _ => c,
    }
}

/// UTC `YYYYMMDD-HHMMSS`.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    seg_data::atomic::write_atomically(path, |w| {
        w.write_all(bytes).map_err(|source| seg_data::Error::Io {
            path: path.to_path_buf(),
            source,
        })
    })
    .with_context(|| format!("{}: cannot write", path.display()))
}

use std::io::Write as _;

pub fn write(
    dir: &Path,
    dataset: Dataset,
    meta: &serde_json::Value,
    results: &[ModelResult],
) -> anyhow::Result<()> {
    let json = serde_json::json!({"meta": meta, "results": results});
    write_atomic(
        &dir.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    write_atomic(
        &dir.join("results.md"),
        markdown(dataset, meta, results).as_bytes(),
    )?;
    write_atomic(&dir.join("msa.svg"), svg_chart(results).as_bytes())?;
    Ok(())
}

fn markdown(dataset: Dataset, meta: &serde_json::Value, results: &[ModelResult]) -> String {
    let mut s = String::new();
    let synthetic = meta["synthetic_data"].as_bool().unwrap_or(false);
    let _ = writeln!(
        s,
        "# ViM-UNet comparison: {} ({} profile)\n",
        dataset.name(),
        meta["profile"]["name"].as_str().unwrap_or("?")
    );
    if synthetic {
        let _ = writeln!(
            s,
            "**Data: the embedded synthetic stand-in, not the real dataset.** The scores below \
             show that the pipeline works; they are not comparable with the paper's, which come \
             from the real data with 100,000 iterations on a GPU.\n"
        );
    }
    let p = &meta["profile"];
    let _ = writeln!(
        s,
        "Commit `{}`, {} on `{}` ({} threads), seed {}, {:.0} s. Training: {} iterations, batch {}, \
         {}² patches, lr {}, features {}, canvas {}.\n",
        meta["git_commit"].as_str().unwrap_or("?"),
        meta["machine"].as_str().unwrap_or("?"),
        meta["device"].as_str().unwrap_or("?"),
        meta["threads"],
        meta["seed"],
        meta["seconds"].as_f64().unwrap_or(0.0),
        p["iterations"],
        p["batch_size"],
        p["patch"],
        p["lr"],
        p["features"],
        p["canvas"].as_u64().map_or("1024² (paper)".to_string(), |c| format!("{c}² (native)")),
    );
    let _ = writeln!(s, "## Segmentation (the paper's Fig. 2)\n");
    let _ = writeln!(
        s,
        "| method | setting | mSA (ours) | SA50 | SA75 | mSA (paper) |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|");
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            r.label,
            r.setting,
            r.msa,
            r.sa50,
            r.sa75,
            paper_value(r.model, &r.setting)
        );
    }
    let _ = writeln!(s, "\n## Efficiency (the paper's Table 1)\n");
    let _ = writeln!(
        s,
        "| method | parameters, paper config (C = 2) | paper | parameters trained here | peak training memory (RSS) | paper | inference ms / test image (median, min–max) |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    let mut seen = Vec::new();
    for r in results {
        if seen.contains(&r.model) {
            continue;
        }
        seen.push(r.model);
        let (pp, pm) = paper_table1(r.model);
        let mem = r
            .peak_train_memory_bytes
            .map_or("(reused)".to_string(), |b| {
                format!("{:.2} GB", b as f64 / 1e9)
            });
        let _ = writeln!(
            s,
            "| {} | {} | {pp} | {} | {mem} | {pm} | {:.0} ({:.0}–{:.0}) |",
            r.label,
            crate::models::group(r.parameters_paper_config),
            crate::models::group(r.parameters),
            r.inference_ms_median,
            r.inference_ms_min,
            r.inference_ms_max
        );
    }
    let _ = writeln!(
        s,
        "\nThe paper's numbers: Fig. 2 from torch-em's plotting script, Table 1 from a summary of \
         the paper (see the reference spec). Its counts are truncated and, for UNet and UNETR, \
         count the bilinear UNet and the skip-connection UNETR (28,941,698 and 113,060,034 \
         exactly), not the configurations it trained. Our inference times are from this run's \
         device; the paper's are from an A100.\n"
    );
    let _ = writeln!(s, "![mSA per method](msa.svg)\n\nPanels of test images (raw, ground truth, prediction, segmentation): `panels/`.");
    s
}

fn svg_chart(results: &[ModelResult]) -> String {
    let mut settings: Vec<&str> = Vec::new();
    for r in results {
        if !settings.contains(&r.setting.as_str()) {
            settings.push(&r.setting);
        }
    }
    let (bar, gap, left, top, height) = (22.0, 26.0, 60.0, 40.0, 240.0);
    let per_group = results.len() / settings.len().max(1);
    let group_w = per_group as f64 * 2.0 * bar + gap;
    let width = left + settings.len() as f64 * group_w + 200.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{h:.0}" font-family="sans-serif" font-size="12">
<text x="{left}" y="20" font-size="14">mSA per method and setting (filled: ours, outlined: paper)</text>
"#,
        h = top + height + 60.0
    );
    for t in 0..=5 {
        let v = t as f64 * 0.2;
        let y = top + height * (1.0 - v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.0}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{v:.1}</text>"##,
            width - 200.0,
            left - 6.0,
            y + 4.0
        );
    }
    let colours = [
        "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
    ];
    for (g, setting) in settings.iter().enumerate() {
        let x0 = left + g as f64 * group_w + gap / 2.0;
        for (i, r) in results.iter().filter(|r| r.setting == *setting).enumerate() {
            let c = colours[ModelKind::ALL
                .iter()
                .position(|k| *k == r.model)
                .unwrap_or(0)
                % colours.len()];
            let x = x0 + i as f64 * 2.0 * bar;
            let h = height * r.msa.clamp(0.0, 1.0);
            let hp = height * paper_value(r.model, setting);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{bar}" height="{h:.1}" fill="{c}"/><rect x="{:.1}" y="{:.1}" width="{bar}" height="{hp:.1}" fill="none" stroke="{c}" stroke-width="2"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{:.2}</text>"#,
                top + height - h,
                x + bar,
                top + height - hp,
                x + bar / 2.0,
                top + height - h - 3.0,
                r.msa
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{setting}</text>"#,
            x0 + per_group as f64 * bar,
            top + height + 20.0
        );
    }
    let mut y = top;
    let mut seen = Vec::new();
    for r in results {
        if seen.contains(&r.model) {
            continue;
        }
        seen.push(r.model);
        let c = colours[ModelKind::ALL
            .iter()
            .position(|k| *k == r.model)
            .unwrap_or(0)
            % colours.len()];
        let x = width - 180.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.0}" y="{y:.0}" width="14" height="14" fill="{c}"/><text x="{:.0}" y="{:.0}">{}</text>"#,
            x + 20.0,
            y + 12.0,
            r.label
        );
        y += 22.0;
    }
    s.push_str("</svg>\n");
    s
}

/// A PNG of raw | ground truth | prediction (first channel = foreground or boundaries) |
/// segmentation.
pub fn panel(
    path: &Path,
    img: &TestImage,
    pred: &Array3<f32>,
    seg: &Array2<u32>,
) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let (h, w) = img.raw_u8.dim();
    let gap = 4;
    let cols = 4;
    let width = cols * w + (cols - 1) * gap;
    let mut rgb = vec![255u8; h * width * 3];
    let mut put = |panel: usize, y: usize, x: usize, c: [u8; 3]| {
        let i = (y * width + panel * (w + gap) + x) * 3;
        rgb[i..i + 3].copy_from_slice(&c);
    };
    let p0 = pred.index_axis(Axis(0), 0);
    for y in 0..h {
        for x in 0..w {
            let v = img.raw_u8[[y, x]];
            put(0, y, x, [v; 3]);
            put(1, y, x, colour(img.labels[[y, x]]));
            let p = (p0[[y, x]].clamp(0.0, 1.0) * 255.0) as u8;
            put(2, y, x, [p; 3]);
            put(3, y, x, colour(seg[[y, x]]));
        }
    }
    let file = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&rgb)?;
    Ok(())
}

fn colour(id: u32) -> [u8; 3] {
    if id == 0 {
        [0, 0, 0]
    } else {
        crate::data::colour(id)
    }
}
