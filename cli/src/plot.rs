//! Figures of a `compare` / `bench` report, as PNG and SVG, shaped like the
//! papers' figures:
//! - `decode-sweep`: decode tokens/s and attention time per step against the
//!   batch size, one panel per context length, one line per backend (the
//!   vAttention paper's decode figure);
//! - `hybrid-sweep`: attention time of a hybrid step and the speedup over the
//!   first backend, one panel per prefill chunk, a bar per backend and case
//!   (the POD-Attention paper's sweep);
//! - `serve`: throughput, TTFT and time between tokens (p50 / p99);
//! - `memory`: requests running at once before the first preemption.
//!
//! Text is drawn with a font compiled into the binary (Ubuntu Light, from
//! `epaint_default_fonts`), so no system font library is needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// Bars or lines over categories.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Lines,
    Bars,
}

/// One chart: categories on x, a series per backend.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub categories: Vec<String>,
    /// (backend, value per category; `None` where it has none).
    pub series: Vec<(String, Vec<Option<f64>>)>,
    pub kind: Kind,
}

/// Panels on a grid of `cols` columns, written as `<name>.png` and `<name>.svg`.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub title: String,
    pub cols: usize,
    pub panels: Vec<Panel>,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];
const FONT: &str = "sans-serif";

fn register_font() -> anyhow::Result<()> {
    static LOADED: OnceLock<bool> = OnceLock::new();
    let ok = *LOADED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the built-in plot font did not load"))
    }
}

/// `4096` -> `4K`, `1536` -> `1.5K`, `12` -> `12`.
fn short(n: u64) -> String {
    match n {
        n if n >= 1024 && n % 1024 == 0 => format!("{}K", n / 1024),
        n if n >= 1024 && n % 512 == 0 => format!("{:.1}K", n as f64 / 1024.0),
        n => n.to_string(),
    }
}

/// The backends that were measured: (name, results).
fn measured(report: &Value) -> Vec<(String, &Value)> {
    report["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["agrees"] != false && !r["results"].is_null())
        .map(|r| (r["backend"].as_str().unwrap_or("?").to_string(), &r["results"]))
        .collect()
}

/// Sorted distinct values of `key` over the cells of every backend.
fn axis(rows: &[(String, &Value)], key: &str) -> Vec<u64> {
    let mut v: Vec<u64> = rows
        .iter()
        .flat_map(|(_, r)| r.as_array().into_iter().flatten())
        .filter_map(|c| c[key].as_u64())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The figures a report calls for (none when no backend was measured).
pub fn figures(report: &Value) -> Vec<Figure> {
    let rows = measured(report);
    if rows.is_empty() {
        return Vec::new();
    }
    let tool = report["tool"].as_str().unwrap_or("vpod");
    let head = format!(
        "{} on {} ({})",
        report["model"].as_str().unwrap_or("?"),
        report["device"].as_str().unwrap_or("?"),
        report["dtype"].as_str().unwrap_or("?")
    );
    let get = |c: &Value, k: &str| c.get(k).and_then(Value::as_f64);
    match report["workload"].as_str().unwrap_or("") {
        "decode-sweep" => {
            let batches = axis(&rows, "batch");
            let contexts = axis(&rows, "context");
            let mut panels = Vec::new();
            for (key, y) in [
                ("decode_tokens_per_s", "decode tokens/s"),
                ("attention_ms_per_step", "attention ms per step"),
            ] {
                for &ctx in &contexts {
                    let series = rows
                        .iter()
                        .map(|(b, r)| {
                            let cell = |batch: u64| {
                                r.as_array().into_iter().flatten().find(|c| {
                                    c["batch"].as_u64() == Some(batch) && c["context"].as_u64() == Some(ctx)
                                })
                            };
                            (
                                b.clone(),
                                batches
                                    .iter()
                                    .map(|&n| cell(n).and_then(|c| get(c, key)))
                                    .collect(),
                            )
                        })
                        .collect();
                    panels.push(Panel {
                        title: format!("context {}", short(ctx)),
                        x_desc: "batch size".into(),
                        y_desc: y.into(),
                        categories: batches.iter().map(|b| b.to_string()).collect(),
                        series,
                        kind: Kind::Lines,
                    });
                }
            }
            vec![Figure {
                name: "decode-sweep".into(),
                title: format!("{tool}: decode, {head}"),
                cols: contexts.len().max(1),
                panels,
            }]
        }
        "hybrid-sweep" => {
            let chunks = axis(&rows, "chunk");
            let batches = axis(&rows, "batch");
            let contexts = axis(&rows, "context");
            let cases: Vec<(u64, u64)> = batches
                .iter()
                .flat_map(|&b| contexts.iter().map(move |&c| (b, c)))
                .collect();
            let value = |r: &Value, chunk: u64, (b, c): (u64, u64)| {
                r.as_array()
                    .into_iter()
                    .flatten()
                    .find(|x| {
                        x["chunk"].as_u64() == Some(chunk)
                            && x["batch"].as_u64() == Some(b)
                            && x["context"].as_u64() == Some(c)
                    })
                    .and_then(|x| get(x, "attention_ms_per_step"))
                    .filter(|&v| v > 0.0)
            };
            let categories: Vec<String> = cases.iter().map(|&(b, c)| format!("{b}@{}", short(c))).collect();
            let mut panels = Vec::new();
            for &chunk in &chunks {
                panels.push(Panel {
                    title: format!("chunk {chunk}: attention time of a hybrid step"),
                    x_desc: "decodes @ context".into(),
                    y_desc: "ms per step".into(),
                    categories: categories.clone(),
                    series: rows
                        .iter()
                        .map(|(b, r)| (b.clone(), cases.iter().map(|&k| value(r, chunk, k)).collect()))
                        .collect(),
                    kind: Kind::Bars,
                });
            }
            if rows.len() > 1 {
                let base = rows[0].1;
                for &chunk in &chunks {
                    panels.push(Panel {
                        title: format!("chunk {chunk}: speedup over {}", rows[0].0),
                        x_desc: "decodes @ context".into(),
                        y_desc: "speedup (x)".into(),
                        categories: categories.clone(),
                        series: rows
                            .iter()
                            .map(|(b, r)| {
                                let s = cases
                                    .iter()
                                    .map(|&k| Some(value(base, chunk, k)? / value(r, chunk, k)?))
                                    .collect();
                                (b.clone(), s)
                            })
                            .collect(),
                        kind: Kind::Bars,
                    });
                }
            }
            vec![Figure {
                name: "hybrid-sweep".into(),
                title: format!("{tool}: hybrid steps, {head}"),
                cols: chunks.len().max(1),
                panels,
            }]
        }
        "serve" => {
            let series = |keys: &[&str]| -> Vec<(String, Vec<Option<f64>>)> {
                rows.iter()
                    .map(|(b, r)| (b.clone(), keys.iter().map(|k| get(r, k)).collect()))
                    .collect()
            };
            let bars = |title: &str, y: &str, categories: &[&str], keys: &[&str]| Panel {
                title: title.into(),
                x_desc: String::new(),
                y_desc: y.into(),
                categories: categories.iter().map(|s| s.to_string()).collect(),
                series: series(keys),
                kind: Kind::Bars,
            };
            vec![Figure {
                name: "serve".into(),
                title: format!("{tool}: serving, {head}"),
                cols: 4,
                panels: vec![
                    bars("throughput", "tokens/s", &["tokens/s"], &["tokens_per_s"]),
                    bars(
                        "throughput",
                        "requests/min",
                        &["requests/min"],
                        &["requests_per_min"],
                    ),
                    bars(
                        "time to first token",
                        "ms",
                        &["p50", "p99"],
                        &["ttft_ms_p50", "ttft_ms_p99"],
                    ),
                    bars(
                        "time between tokens",
                        "ms",
                        &["p50", "p99"],
                        &["tbt_ms_p50", "tbt_ms_p99"],
                    ),
                ],
            }]
        }
        "memory" => {
            let series = |key: &str| -> Vec<(String, Vec<Option<f64>>)> {
                rows.iter().map(|(b, r)| (b.clone(), vec![get(r, key)])).collect()
            };
            vec![Figure {
                name: "memory".into(),
                title: format!(
                    "{tool}: KV memory {}, {head}",
                    report["kv_memory"].as_u64().map_or("default".into(), |b| format!(
                        "{:.1} MiB",
                        b as f64 / (1 << 20) as f64
                    ))
                ),
                cols: 2,
                panels: vec![
                    Panel {
                        title: "requests at once before the first preemption".into(),
                        x_desc: String::new(),
                        y_desc: "requests".into(),
                        categories: vec!["concurrent".into()],
                        series: series("max_concurrent_before_preemption"),
                        kind: Kind::Bars,
                    },
                    Panel {
                        title: "preemptions over the run".into(),
                        x_desc: String::new(),
                        y_desc: "preemptions".into(),
                        categories: vec!["preemptions".into()],
                        series: series("preemptions"),
                        kind: Kind::Bars,
                    },
                ],
            }]
        }
        _ => Vec::new(),
    }
}

/// Writes every figure of `report` into `dir` as PNG and SVG; returns the paths.
pub fn write_figures(report: &Value, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    register_font()?;
    let mut written = Vec::new();
    for f in figures(report) {
        let size = figure_size(&f);
        let png = dir.join(format!("{}.png", f.name));
        let svg = dir.join(format!("{}.svg", f.name));
        save(BitMapBackend::new(&png, size).into_drawing_area(), &f, &png)?;
        save(SVGBackend::new(&svg, size).into_drawing_area(), &f, &svg)?;
        written.extend([png, svg]);
    }
    Ok(written)
}

/// Title line and legend line above the panels.
const TITLE_H: u32 = 64;

/// Draws `f` on `root` and writes it to `path` (the backend's file).
fn save<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, f: &Figure, path: &Path) -> anyhow::Result<()> {
    draw(&root, f).with_context(|| format!("drawing {}", path.display()))?;
    root.present()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))
}

fn panel_size(p: &Panel) -> (u32, u32) {
    let per_category = match p.kind {
        Kind::Lines => 70,
        Kind::Bars => (p.series.len() as u32 * 12 + 20).max(64),
    };
    ((p.categories.len() as u32 * per_category + 110).max(420), 360)
}

fn figure_size(f: &Figure) -> (u32, u32) {
    let cols = f.cols.max(1);
    let rows = f.panels.len().div_ceil(cols).max(1) as u32;
    let w = f.panels.iter().map(|p| panel_size(p).0).max().unwrap_or(420);
    let h = f.panels.iter().map(|p| panel_size(p).1).max().unwrap_or(360);
    (w * cols as u32, h * rows + TITLE_H)
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, f: &Figure) -> anyhow::Result<()> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(e)?;
    let (top, body) = root.split_vertically(TITLE_H);
    let top = top.titled(&f.title, (FONT, 20)).map_err(e)?;
    // One legend for the figure: every panel has the same series, in order.
    let names: Vec<&str> = f
        .panels
        .first()
        .map(|p| p.series.iter().map(|(n, _)| n.as_str()).collect())
        .unwrap_or_default();
    let label = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let mut x = 60;
    for (i, name) in names.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        top.draw(&Rectangle::new([(x, 4), (x + 16, 18)], color.filled()))
            .map_err(e)?;
        top.draw(&Text::new(name.to_string(), (x + 22, 11), label.clone()))
            .map_err(e)?;
        x += 22 + 8 * name.len() as i32 + 28;
    }
    let cols = f.cols.max(1);
    let rows = f.panels.len().div_ceil(cols).max(1);
    for (area, p) in body.split_evenly((rows, cols)).iter().zip(&f.panels) {
        draw_panel(root, area, p).map_err(e)?;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    area: &DrawingArea<DB, Shift>,
    p: &Panel,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let n = p.categories.len().max(1);
    let ymax = p
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .fold(0.0f64, |m, &v| m.max(v));
    let ymax = if ymax > 0.0 { ymax * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT, 15))
        .margin(8)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..n as f64, 0.0..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(6)
        .y_label_formatter(&|v| number(*v))
        .x_desc(p.x_desc.as_str())
        .y_desc(p.y_desc.as_str())
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .draw()?;
    // Category names under the axis, centred on each group.
    let style = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, c) in p.categories.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(c.clone(), (x, y + 6), style.clone()))?;
    }
    let k = p.series.len().max(1) as f64;
    for (s, (_, values)) in p.series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        match p.kind {
            Kind::Bars => {
                let width = 0.8 / k;
                chart.draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                    let x0 = i as f64 + 0.1 + s as f64 * width;
                    v.map(|v| Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled()))
                }))?;
            }
            Kind::Lines => {
                let points: Vec<(f64, f64)> = values
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| v.map(|v| (i as f64 + 0.5, v)))
                    .collect();
                chart.draw_series(points.iter().map(|&pt| Circle::new(pt, 3, color.filled())))?;
                chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
            }
        }
    }
    Ok(())
}

/// An axis number without trailing zeros: `3000`, `2.5`, `0.125`.
fn number(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(workload: &str, results: [Value; 2]) -> Value {
        let [a, b] = results;
        json!({
            "tool": "vpod cli compare", "model": "m", "device": "cpu", "dtype": "f32",
            "workload": workload,
            "backends": [
                {"backend": "vattention", "agrees": true, "results": a},
                {"backend": "paged:16", "agrees": true, "results": b},
                {"backend": "broken", "agrees": false, "results": null},
            ],
        })
    }

    #[test]
    fn decode_sweep_panels_per_context_and_metric() {
        let cell = |b: u64, c: u64, t: f64| json!({"batch": b, "context": c, "decode_tokens_per_s": t, "attention_ms_per_step": 1.0 / t});
        let r = report(
            "decode-sweep",
            [
                json!([cell(1, 4096, 10.0), cell(4, 4096, 30.0), cell(1, 16384, 8.0)]),
                json!([cell(1, 4096, 9.0), cell(4, 4096, 20.0)]),
            ],
        );
        let f = figures(&r);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].panels.len(), 4, "2 metrics x 2 contexts");
        assert_eq!(f[0].cols, 2);
        let p = &f[0].panels[1];
        assert_eq!(p.title, "context 16K");
        assert_eq!(p.categories, ["1", "4"]);
        assert_eq!(p.series.len(), 2, "the disagreeing backend is not plotted");
        assert_eq!(p.series[0].1, [Some(8.0), None]);
        assert_eq!(p.series[1].1, [None, None]);
    }

    #[test]
    fn hybrid_sweep_speedup_over_the_first_backend() {
        let cell = |chunk: u64, ms: f64| json!({"chunk": chunk, "batch": 8, "context": 4096, "attention_ms_per_step": ms});
        let r = report(
            "hybrid-sweep",
            [
                json!([cell(512, 2.0), cell(1024, 3.0)]),
                json!([cell(512, 4.0), cell(1024, 3.0)]),
            ],
        );
        let f = &figures(&r)[0];
        assert_eq!(f.panels.len(), 4);
        assert_eq!(f.panels[0].categories, ["8@4K"]);
        let speedup = &f.panels[2];
        assert!(speedup.title.contains("speedup over vattention"));
        assert_eq!(speedup.series[1].1, [Some(0.5)]);
        assert_eq!(f.panels[3].series[1].1, [Some(1.0)]);
    }

    #[test]
    fn writes_png_and_svg_for_every_workload() {
        let dir = tempfile::tempdir().unwrap();
        let serve = |t: f64| {
            json!({"tokens_per_s": t, "requests_per_min": t / 2.0, "ttft_ms_p50": 5.0, "ttft_ms_p99": 9.0,
                   "tbt_ms_p50": 1.0, "tbt_ms_p99": 2.0})
        };
        let mem = |n: u64| json!({"max_concurrent_before_preemption": n, "preemptions": 3});
        for (w, a, b) in [("serve", serve(100.0), serve(80.0)), ("memory", mem(8), mem(5))] {
            let paths = write_figures(&report(w, [a, b]), dir.path()).unwrap();
            assert_eq!(paths.len(), 2);
            let png = std::fs::read(&paths[0]).unwrap();
            assert_eq!(&png[..4], b"\x89PNG");
            let svg = std::fs::read_to_string(&paths[1]).unwrap();
            assert!(svg.contains("<svg") && svg.contains("paged:16"), "{w}");
        }
        assert_eq!(short(1536), "1.5K");
        assert_eq!(short(100), "100");
    }
}
