//! Reports of load runs ([`LoadReport`]s, e.g. "without peering" and "with peering"): JSON,
//! an SVG plot and a plain-text table for the terminal.
//!
//! The plot has one column per run and three charts in each, on the same time axis:
//! requests/s by server (successful answers, plus a `failed` line), success rate, and
//! p50/p99 latency (log scale: an overloaded origin goes from milliseconds to seconds).

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use plotters::{
    coord::Shift,
    prelude::{
        BLACK, BLUE, ChartBuilder, DrawingArea, DrawingAreaErrorKind, GREEN, IntoDrawingArea,
        IntoLogRange, LineSeries, MAGENTA, PathElement, RED, RGBColor, SVGBackend,
        SeriesLabelPosition, ShapeStyle, WHITE,
    },
    style::Color,
};
use serde::Serialize;

use crate::loadgen::{Bucket, LoadReport};

/// At most this many runs side by side.
pub const MAX_RUNS: usize = 4;
/// The series names in the plot besides the server names.
pub const FAILED_SERIES: &str = "failed";
/// Requests started per second (the crowd as offered, whoever answered).
pub const OFFERED_SERIES: &str = "offered";
pub const SUCCESS_SERIES: &str = "success rate";
pub const P50_SERIES: &str = "p50";
pub const P99_SERIES: &str = "p99";

/// Errors of writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("a report needs at least one run")]
    NoRuns,
    #[error("a report shows at most {MAX_RUNS} runs, not {0}")]
    TooManyRuns(usize),
    #[error("two runs are labelled {0:?}")]
    DuplicateLabel(String),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding the JSON report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("plotting {path}: {source}")]
    Plot {
        path: PathBuf,
        source: DrawingAreaErrorKind<std::io::Error>,
    },
}

/// One labelled run of a report.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Run<'a> {
    pub label: &'a str,
    pub report: &'a LoadReport,
}

impl<'a> Run<'a> {
    pub fn new(label: &'a str, report: &'a LoadReport) -> Self {
        Self { label, report }
    }
}

fn check(runs: &[Run<'_>]) -> Result<(), ReportError> {
    if runs.is_empty() {
        return Err(ReportError::NoRuns);
    }
    if runs.len() > MAX_RUNS {
        return Err(ReportError::TooManyRuns(runs.len()));
    }
    let mut seen = BTreeSet::new();
    for run in runs {
        if !seen.insert(run.label) {
            return Err(ReportError::DuplicateLabel(run.label.to_owned()));
        }
    }
    Ok(())
}

fn create_parent(path: &Path) -> Result<(), ReportError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            fs::create_dir_all(dir).map_err(|source| ReportError::Write {
                path: dir.to_owned(),
                source,
            })
        }
        _ => Ok(()),
    }
}

/// `{"runs": [{"label": ..., "report": {...}}, ...]}` (see [`LoadReport`]).
pub fn to_json(runs: &[Run<'_>]) -> Result<String, ReportError> {
    check(runs)?;
    #[derive(Serialize)]
    struct Doc<'a> {
        runs: &'a [Run<'a>],
    }
    Ok(serde_json::to_string_pretty(&Doc { runs })?)
}

/// Writes [`to_json`] to `path` (creating its directory).
pub fn write_json(path: &Path, runs: &[Run<'_>]) -> Result<(), ReportError> {
    let json = to_json(runs)?;
    create_parent(path)?;
    fs::write(path, json + "\n").map_err(|source| ReportError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Every server that answered in any run, in name order (so colours match across runs).
fn servers(runs: &[Run<'_>]) -> Vec<String> {
    runs.iter()
        .flat_map(|r| r.report.servers.keys().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Consecutive points of a series with gaps (seconds without a value) as separate lines.
fn segments(points: impl Iterator<Item = (f64, Option<f64>)>) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for (x, y) in points {
        match (y, out.last_mut()) {
            (Some(y), Some(last)) => last.push((x, y)),
            (None, Some(last)) if !last.is_empty() => out.push(Vec::new()),
            _ => {}
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type PlotResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// Draws the lines of one series (label on the first piece only, so the legend names it
/// once; an empty series still gets its legend entry).
fn draw_series<'a, CT>(
    chart: &mut plotters::chart::ChartContext<'a, SVGBackend<'a>, CT>,
    name: &str,
    style: ShapeStyle,
    pieces: Vec<Vec<(f64, f64)>>,
) -> PlotResult
where
    CT: plotters::coord::CoordTranslate<From = (f64, f64)>,
{
    let mut pieces = pieces.into_iter();
    let first = pieces.next().unwrap_or_default();
    chart
        .draw_series(LineSeries::new(first, style))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    for piece in pieces {
        chart.draw_series(LineSeries::new(piece, style))?;
    }
    Ok(())
}

fn x_of(b: &Bucket) -> f64 {
    b.second as f64
}

/// Distinct colours for servers (the "tab10" set without its red, which the `failed` line
/// uses, and its grey, which `offered` uses).
const SERVER_COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const OFFERED_COLOR: RGBColor = RGBColor(127, 127, 127);

fn server_color(index: usize) -> RGBColor {
    SERVER_COLORS
        .get(index % SERVER_COLORS.len())
        .copied()
        .unwrap_or(BLACK)
}

fn plot_run(
    areas: &[Area<'_>],
    run: &Run<'_>,
    servers: &[String],
    x_max: f64,
    rate_max: f64,
    latency: (f64, f64),
) -> PlotResult {
    let [rate_area, success_area, latency_area] = areas else {
        return Err(DrawingAreaErrorKind::LayoutError);
    };
    let series = &run.report.series;
    let caption = |what: &str| format!("{}: {what}", run.label);
    let font = ("sans-serif", 16);

    let mut chart = ChartBuilder::on(rate_area)
        .caption(caption("requests/s by server"), font)
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..rate_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("requests/s")
        .draw()?;
    let offered = series.iter().map(|b| (x_of(b), Some(b.started as f64)));
    draw_series(
        &mut chart,
        OFFERED_SERIES,
        ShapeStyle::from(OFFERED_COLOR).stroke_width(1),
        segments(offered),
    )?;
    for (i, server) in servers.iter().enumerate() {
        let style = ShapeStyle::from(server_color(i)).stroke_width(2);
        let points = series.iter().map(|b| {
            (
                x_of(b),
                Some(b.by_server.get(server).copied().unwrap_or(0) as f64),
            )
        });
        draw_series(&mut chart, server, style, segments(points))?;
    }
    let failed = series.iter().map(|b| (x_of(b), Some(b.failures() as f64)));
    draw_series(
        &mut chart,
        FAILED_SERIES,
        ShapeStyle::from(RED).stroke_width(2),
        segments(failed),
    )?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    let mut chart = ChartBuilder::on(success_area)
        .caption(caption("success rate"), font)
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..105f64)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("% of completed")
        .draw()?;
    let success = series
        .iter()
        .map(|b| (x_of(b), b.success_rate().map(|r| r * 100.0)));
    draw_series(
        &mut chart,
        SUCCESS_SERIES,
        ShapeStyle::from(GREEN).stroke_width(2),
        segments(success),
    )?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    let mut chart = ChartBuilder::on(latency_area)
        .caption(caption("latency of successes"), font)
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, (latency.0..latency.1).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms (log)")
        .draw()?;
    let clamp = |v: Option<f64>| v.map(|v| v.max(latency.0));
    let p50 = series.iter().map(|b| (x_of(b), clamp(b.p50_ms)));
    draw_series(
        &mut chart,
        P50_SERIES,
        ShapeStyle::from(BLUE).stroke_width(2),
        segments(p50),
    )?;
    let p99 = series.iter().map(|b| (x_of(b), clamp(b.p99_ms)));
    draw_series(
        &mut chart,
        P99_SERIES,
        ShapeStyle::from(MAGENTA).stroke_width(2),
        segments(p99),
    )?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn plot(path: &Path, runs: &[Run<'_>]) -> PlotResult {
    let servers = servers(runs);
    let buckets = || runs.iter().flat_map(|r| r.report.series.iter());
    let x_max = buckets().map(|b| b.second + 1).max().unwrap_or(1) as f64;
    let rate_max = buckets()
        .flat_map(|b| {
            b.by_server
                .values()
                .copied()
                .chain([b.failures(), b.started])
        })
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.15;
    // Whole decades, at least three (plotters labels a short log axis densely): from the
    // decade below the fastest median (at least 0.1 ms) to the one above the slowest p99.
    let slowest = buckets().filter_map(|b| b.p99_ms).fold(1.0f64, f64::max);
    let latency_max = 10f64.powf((slowest * 1.2).log10().ceil());
    let fastest = buckets()
        .filter_map(|b| b.p50_ms)
        .fold(f64::INFINITY, f64::min);
    let latency_min = if fastest.is_finite() && fastest > 0.1 {
        10f64.powf(fastest.log10().floor())
    } else {
        0.1
    }
    .min(latency_max / 1000.0);
    let width = 640 * runs.len() as u32;
    let root = SVGBackend::new(path, (width, 960)).into_drawing_area();
    root.fill(&WHITE)?;
    let cells = root.split_evenly((3, runs.len()));
    // split_evenly fills row by row: cell (row, col) = cells[row * columns + col].
    for (col, run) in runs.iter().enumerate() {
        let column: Vec<Area<'_>> = (0..3)
            .filter_map(|row| cells.get(row * runs.len() + col).cloned())
            .collect();
        plot_run(
            &column,
            run,
            &servers,
            x_max,
            rate_max,
            (latency_min, latency_max),
        )?;
    }
    root.present()
}

/// Writes the SVG plot of `runs` (side by side) to `path` (creating its directory).
pub fn write_svg(path: &Path, runs: &[Run<'_>]) -> Result<(), ReportError> {
    check(runs)?;
    create_parent(path)?;
    plot(path, runs).map_err(|source| ReportError::Plot {
        path: path.to_owned(),
        source,
    })
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// A plain-text table of the runs: one row per run with totals, success rate, latency
/// percentiles, failures by kind and answers by server.
pub fn summary_table(runs: &[Run<'_>]) -> String {
    let label_width = runs
        .iter()
        .map(|r| r.label.chars().count())
        .chain([3])
        .max()
        .unwrap_or(3);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<label_width$}  {:>9}  {:>9}  {:>8}  {:>8}  {:>8}  {:>9}  {:>9}  failures / served by",
        "run", "requests", "succeeded", "success", "p50 ms", "p99 ms", "max ms", "lag ms"
    );
    for run in runs {
        let r = run.report;
        let _ = writeln!(
            out,
            "{:<label_width$}  {:>9}  {:>9}  {:>7.2}%  {:>8}  {:>8}  {:>9}  {:>9.1}  {}",
            run.label,
            r.completed,
            r.succeeded,
            r.success_rate * 100.0,
            ms(r.latency.p50_ms),
            ms(r.latency.p99_ms),
            ms(r.latency.max_ms),
            r.max_start_lag_ms,
            failures_text(&r.failed),
        );
        let served: Vec<String> = r
            .servers
            .iter()
            .map(|(name, t)| format!("{name}={}", t.served))
            .collect();
        let _ = writeln!(
            out,
            "{:<label_width$}  {:>78}  {}",
            "",
            "",
            if served.is_empty() {
                "(no answers)".to_owned()
            } else {
                served.join(" ")
            }
        );
    }
    out
}

fn failures_text(failed: &std::collections::BTreeMap<String, u64>) -> String {
    if failed.is_empty() {
        return "no failures".to_owned();
    }
    failed
        .iter()
        .map(|(kind, n)| format!("{kind}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line for a live terminal view of a run: the second, requests started and
/// completed, success rate, latency and answers by server.
pub fn live_line(bucket: &Bucket) -> String {
    let servers: Vec<String> = bucket
        .by_server
        .iter()
        .map(|(name, n)| format!("{name} {n}/s"))
        .collect();
    let failures = bucket.failures();
    format!(
        "t={:>3}s  started {:>5}/s  done {:>5}/s  ok {:>6}  p50 {:>7} ms  p99 {:>7} ms  in flight {:>5}  {}{}",
        bucket.second,
        bucket.started,
        bucket.completed,
        bucket
            .success_rate()
            .map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0)),
        ms(bucket.p50_ms),
        ms(bucket.p99_ms),
        bucket.in_flight,
        servers.join("  "),
        if failures > 0 {
            format!("  failed {failures}/s ({})", failures_text(&bucket.failed))
        } else {
            String::new()
        }
    )
}
