//! The experiment report: `results.json`, `results.md` (the paper's Fig. 2 and Table 1 with our
//! numbers beside them), a bar chart of mSA (PNG and SVG, drawn with plotters; feature
//! `plots`), and PNG panels of a few test images.

use std::fmt::Write as _;
use std::path::Path;

use ndarray::{Array2, Array3, Axis};
use vim_nets::ModelKind;

use crate::datasets::{Dataset, TestImage};
use crate::picture::{panels, write_file, write_png, Panel};
use crate::system::group_digits;
use crate::{Error, Result};

/// The results of one model in one setting.
#[non_exhaustive]
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelResult {
    pub model: ModelKind,
    pub label: String,
    pub setting: String,
    pub msa: f64,
    pub sa50: f64,
    pub sa75: f64,
    pub per_image: Vec<(String, f64)>,
    /// Parameters of the model trained here and of the paper's configuration (C = 2).
    pub parameters: usize,
    pub parameters_paper_config: usize,
    pub peak_train_memory_bytes: Option<u64>,
    pub inference_ms_median: f64,
    pub inference_ms_min: f64,
    pub inference_ms_max: f64,
    pub iterations: usize,
    pub best_val_loss: f64,
    pub train_seconds: Option<f64>,
    pub reused_checkpoint: bool,
}

/// The paper's Fig. 2 mSA (torch-em's `experiments/misc/get_vimunet_plots.py` at commit 33239758,
/// whose values are hard-coded there): (LIVECell boundaries, LIVECell distances,
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

/// The paper's Table 1 (parameters, training memory), as quoted by a summary of the paper (the
/// table's counts are truncated).
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

/// Writes the report into `dir`: `results.json` (every number), `results.md` (the paper's
/// Fig. 2 and Table 1 with ours beside them) and, with the `plots` feature, the bar chart as
/// `msa.png` and `msa.svg`; each file atomically.
pub fn write(
    dir: &Path,
    dataset: Dataset,
    meta: &serde_json::Value,
    results: &[ModelResult],
    baselines: &[crate::BaselineResult],
) -> Result<()> {
    let json = serde_json::json!({"meta": meta, "results": results, "baselines": baselines});
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Input {
        path: dir.join("results.json"),
        what: format!("cannot serialise the results: {e}"),
    })?;
    write_file(&dir.join("results.json"), text.as_bytes())?;
    write_file(
        &dir.join("results.md"),
        markdown(dataset, meta, results, baselines).as_bytes(),
    )?;
    #[cfg(feature = "plots")]
    {
        write_file(&dir.join("msa.svg"), chart::svg(results)?.as_bytes())?;
        write_file(&dir.join("msa.png"), &chart::png(results)?)?;
    }
    Ok(())
}

fn markdown(
    dataset: Dataset,
    meta: &serde_json::Value,
    results: &[ModelResult],
    baselines: &[crate::BaselineResult],
) -> String {
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
    if !baselines.is_empty() {
        let _ = writeln!(
            s,
            "\n### External baselines, scored here from their class maps\n\n\
             Semantic outputs (0 background, 1 foreground, 2 boundary) through the boundary \
             recipe, as the paper scored nnU-Net and U-Mamba.\n"
        );
        let _ = writeln!(
            s,
            "| method | setting | mSA (ours) | SA50 | SA75 | mSA (paper) | outputs |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---|");
        for b in baselines {
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {:.3} | {:.3} | {} | `{}` |",
                b.label,
                b.setting,
                b.msa,
                b.sa50,
                b.sa75,
                b.paper_msa.map_or("–".to_string(), |v| format!("{v:.3}")),
                b.dir.display()
            );
        }
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
            group_digits(r.parameters_paper_config),
            group_digits(r.parameters),
            r.inference_ms_median,
            r.inference_ms_min,
            r.inference_ms_max
        );
    }
    let _ = writeln!(
        s,
        "\nThe paper's numbers: Fig. 2 from torch-em's plotting script, Table 1 from a summary of \
         the paper. Its counts are truncated and, for UNet and UNETR, \
         count the bilinear UNet and the skip-connection UNETR (28,941,698 and 113,060,034 \
         exactly), not the configurations it trained. Our inference times are from this run's \
         device; the paper's are from an A100.\n"
    );
    if cfg!(feature = "plots") {
        let _ = writeln!(s, "![mSA per method](msa.png) (also `msa.svg`)\n");
    }
    let _ = writeln!(
        s,
        "Panels of test images (raw, ground truth, prediction, segmentation): `panels/`."
    );
    s
}

/// A PNG of raw | ground truth | prediction (first channel: foreground or boundaries) |
/// segmentation, written atomically.
pub fn panel(path: &Path, img: &TestImage, pred: &Array3<f32>, seg: &Array2<u32>) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(crate::error::file_error(parent))?;
    }
    let p0 = pred
        .index_axis(Axis(0), 0)
        .mapv(|p| (p.clamp(0.0, 1.0) * 255.0) as u8);
    let rgb = panels(
        &[
            Panel::Grey(img.raw_u8.view()),
            Panel::Labels(img.labels.view()),
            Panel::Grey(p0.view()),
            Panel::Labels(seg.view()),
        ],
        4,
    );
    write_png(path, &rgb)
}

/// The bar chart of mSA per method and setting.
#[cfg(feature = "plots")]
pub mod chart {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    use vim_nets::ModelKind;

    use super::paper_value;
    use super::ModelResult;
    use crate::picture::png_bytes;
    use crate::{Error, Result};

    /// The settings in the order they first appear.
    fn settings_of(results: &[ModelResult]) -> Vec<&str> {
        let mut settings: Vec<&str> = Vec::new();
        for r in results {
            if !settings.contains(&r.setting.as_str()) {
                settings.push(&r.setting);
            }
        }
        settings
    }

    /// plotters' drawing errors as the pipeline's.
    fn drawing<E: std::fmt::Display>(e: E) -> Error {
        Error::Chart(e.to_string())
    }

    pub(crate) const CHART_SIZE: (u32, u32) = (960, 520);
    const COLOURS: [(u8, u8, u8); 6] = [
        (0x4e, 0x79, 0xa7),
        (0xf2, 0x8e, 0x2b),
        (0x59, 0xa1, 0x4f),
        (0xe1, 0x57, 0x59),
        (0x76, 0xb7, 0xb2),
        (0xb0, 0x7a, 0xa1),
    ];

    pub(crate) fn model_colour(kind: ModelKind) -> RGBColor {
        let i = ModelKind::ALL.iter().position(|k| *k == kind).unwrap_or(0) % COLOURS.len();
        let (r, g, b) = COLOURS[i];
        RGBColor(r, g, b)
    }

    /// The embedded DejaVu Sans is the chart's only font, so the PNG needs no system fonts.
    fn register_font() -> Result<()> {
        static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let ok = *DONE.get_or_init(|| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
                .is_ok()
        });
        if !ok {
            return Err(Error::Chart(
                "the embedded chart font could not be read".into(),
            ));
        }
        Ok(())
    }

    /// The bar chart of mSA per method and setting: ours filled, the paper's outlined beside it.
    fn draw_chart<DB: DrawingBackend>(
        root: DrawingArea<DB, plotters::coord::Shift>,
        results: &[ModelResult],
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        register_font()?;
        root.fill(&WHITE).map_err(drawing)?;
        let settings = settings_of(results);
        let per_group = settings
            .iter()
            .map(|s| results.iter().filter(|r| r.setting == *s).count())
            .max()
            .unwrap_or(1);
        // Each model takes two bar widths (ours, paper); groups are separated by one.
        let group_w = (2 * per_group + 1) as f64;
        let x_max = settings.len().max(1) as f64 * group_w;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "mSA per method and setting (filled: ours, outlined: paper)",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..x_max, 0f64..1.05f64)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(0)
            .x_label_formatter(&|_| String::new())
            .y_desc("mSA")
            .y_label_formatter(&|v| format!("{v:.1}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(drawing)?;
        let value_style = TextStyle::from(("sans-serif", 12).into_font())
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        let mut legend_done: Vec<ModelKind> = Vec::new();
        for (g, setting) in settings.iter().enumerate() {
            let x0 = g as f64 * group_w + 0.5;
            for (i, r) in results.iter().filter(|r| r.setting == *setting).enumerate() {
                let c = model_colour(r.model);
                let x = x0 + 2.0 * i as f64;
                let ours = r.msa.clamp(0.0, 1.0);
                let paper = paper_value(r.model, setting);
                let bars = vec![
                    Rectangle::new([(x, 0.0), (x + 0.9, ours)], c.filled()),
                    Rectangle::new([(x + 0.95, 0.0), (x + 1.85, paper)], c.stroke_width(2)),
                ];
                let series = chart.draw_series(bars).map_err(drawing)?;
                if !legend_done.contains(&r.model) {
                    legend_done.push(r.model);
                    series.label(r.label.clone()).legend(move |(lx, ly)| {
                        Rectangle::new([(lx, ly - 6), (lx + 14, ly + 6)], c.filled())
                    });
                }
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{ours:.2}"),
                        (x + 0.45, ours + 0.01),
                        value_style.clone(),
                    )))
                    .map_err(drawing)?;
            }
            // The setting's name under its group, in pixel coordinates of the whole image.
            let centre = x0 + per_group as f64 - 0.5;
            let (px, py) = chart.backend_coord(&(centre, 0.0));
            root.draw(&Text::new(
                setting.to_string(),
                (px, py + 10),
                TextStyle::from(("sans-serif", 15).into_font())
                    .pos(Pos::new(HPos::Center, VPos::Top)),
            ))
            .map_err(drawing)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(drawing)?;
        root.present().map_err(drawing)?;
        Ok(())
    }

    /// The chart as SVG text.
    pub fn svg(results: &[ModelResult]) -> Result<String> {
        let mut s = String::new();
        {
            let root = SVGBackend::with_string(&mut s, CHART_SIZE).into_drawing_area();
            draw_chart(root, results)?;
        }
        Ok(s)
    }

    /// The chart as PNG bytes.
    pub fn png(results: &[ModelResult]) -> Result<Vec<u8>> {
        let (w, h) = CHART_SIZE;
        let mut rgb = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, CHART_SIZE).into_drawing_area();
            draw_chart(root, results)?;
        }
        let rgb = ndarray::Array3::from_shape_vec((h as usize, w as usize, 3), rgb)
            .map_err(|e| Error::Chart(e.to_string()))?;
        png_bytes(&rgb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(model: ModelKind, setting: &str, msa: f64) -> ModelResult {
        ModelResult {
            model,
            label: model.label().to_string(),
            setting: setting.to_string(),
            msa,
            sa50: msa,
            sa75: msa,
            per_image: Vec::new(),
            parameters: 1,
            parameters_paper_config: 1,
            peak_train_memory_bytes: None,
            inference_ms_median: 1.0,
            inference_ms_min: 1.0,
            inference_ms_max: 1.0,
            iterations: 1,
            best_val_loss: 0.5,
            train_seconds: None,
            reused_checkpoint: false,
        }
    }

    fn results() -> Vec<ModelResult> {
        let mut v = Vec::new();
        for (setting, base) in [("livecell-boundaries", 0.4), ("livecell-distances", 0.45)] {
            for (i, kind) in [ModelKind::UNet, ModelKind::UnetrB, ModelKind::VimUnetT]
                .into_iter()
                .enumerate()
            {
                v.push(result(kind, setting, base + 0.05 * i as f64));
            }
        }
        v
    }

    /// The markdown holds each result beside the paper's number for its model and setting.
    #[test]
    fn the_markdown_puts_ours_beside_the_papers_numbers() {
        let meta = serde_json::json!({"profile": {"name": "quick"}, "synthetic_data": true});
        let md = markdown(Dataset::Livecell, &meta, &results(), &[]);
        assert!(md.contains("embedded synthetic stand-in"));
        assert!(!md.contains("External baselines"));
        // UNet, livecell-distances: ours 0.450, the paper's Fig. 2 value 0.429.
        assert!(
            md.contains("| UNet | livecell-distances | 0.450 | 0.450 | 0.450 | 0.429 |"),
            "{md}"
        );
        assert!(md.contains("| ViM-UNet Tiny | livecell-boundaries | 0.500 |"));
        let baseline = crate::BaselineResult {
            name: "umamba-enc".into(),
            label: "U-Mamba Enc".into(),
            setting: "livecell-boundaries".into(),
            msa: 0.25,
            sa50: 0.5,
            sa75: 0.125,
            per_image: Vec::new(),
            paper_msa: Some(0.230),
            dir: "out/umamba".into(),
        };
        let md = markdown(Dataset::Livecell, &meta, &results(), &[baseline]);
        assert!(
            md.contains(
                "| U-Mamba Enc | livecell-boundaries | 0.250 | 0.500 | 0.125 | 0.230 | \
                 `out/umamba` |"
            ),
            "{md}"
        );
    }

    #[cfg(feature = "plots")]
    #[test]
    fn the_bar_chart_is_drawn_as_png_and_svg() {
        let results = results();
        let bytes = chart::png(&results).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes))
            .read_info()
            .unwrap();
        let mut rgb = vec![0u8; reader.output_buffer_size()];
        let info = reader.next_frame(&mut rgb).unwrap();
        assert_eq!((info.width, info.height), chart::CHART_SIZE);
        let count = |c: plotters::style::RGBColor| {
            rgb.chunks_exact(3)
                .filter(|p| p[0] == c.0 && p[1] == c.1 && p[2] == c.2)
                .count()
        };
        // Every model's filled bars: about 40 px wide and msa × 420 px high, twice.
        for r in &results[..3] {
            let px = count(chart::model_colour(r.model));
            assert!(
                px > 2 * 30 * 150,
                "{}: only {px} pixels of its colour",
                r.label
            );
        }
        // Text was rendered (the embedded font): dark anti-aliased pixels exist.
        let dark = rgb
            .chunks_exact(3)
            .filter(|p| p.iter().all(|&v| v < 80))
            .count();
        assert!(dark > 500, "{dark} dark pixels: no text?");
        let svg = chart::svg(&results).unwrap();
        for needle in [
            "<svg",
            "UNet",
            "ViM-UNet Tiny",
            "livecell-distances",
            "0.55",
        ] {
            assert!(svg.contains(needle), "the SVG lacks {needle:?}");
        }
    }
}
