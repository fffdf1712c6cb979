//! SVG charts of a comparison (plotters): for each message size and each metric, one group
//! per connection count and in it one bar (or, on a log scale, one dot) per server.
//!
//! What keeps them honest: a failed point (✗ in the tables: errors or wrong bytes) is never
//! drawn as a value, only as a cross on the axis; the connection counts are categories, so
//! they are groups, not points on a line; each server has its own slot in a group, so none
//! hides behind another; values that span orders of magnitude get a log scale (with dots,
//! since a bar's length means nothing there); whiskers show the lowest and highest of the
//! repeated runs; and the footer says on what machine, how pinned, at which commit.

use std::path::Path;

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;

use super::report::{size_label, Metric, Point, Report};

/// How much wider the largest value must be than the smallest for a log scale.
const LOG_SCALE_SPAN: f64 = 30.0;

/// What one server shows at one connection count.
#[derive(Clone, Debug, PartialEq)]
pub enum Mark {
    /// Measured: the median of the runs, and the lowest and highest run.
    Value { median: f64, low: f64, high: f64 },
    /// The point failed (errors or wrong bytes): drawn as a cross, with no value.
    Failed,
    /// Not measured (or this metric not available there): nothing drawn.
    Missing,
}

impl Mark {
    /// The mark for `metric` at `point`.
    pub fn of(point: Option<&Point>, metric: Metric) -> Mark {
        let Some(point) = point else {
            return Mark::Missing;
        };
        if point.failed {
            return Mark::Failed;
        }
        let Some(median) = point.median.as_ref().and_then(|f| metric.value(f)) else {
            return Mark::Missing;
        };
        let runs: Vec<f64> = point
            .runs
            .iter()
            .filter_map(|run| run.figures.as_ref().and_then(|f| metric.value(f)))
            .collect();
        let low = runs.iter().copied().fold(median, f64::min);
        let high = runs.iter().copied().fold(median, f64::max);
        Mark::Value { median, low, high }
    }
}

/// One server's marks in a chart, one per connection count, and its colour.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub color: RGBColor,
    pub marks: Vec<Mark>,
}

/// The data of one chart.
#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub unit: String,
    pub conns: Vec<usize>,
    pub series: Vec<Series>,
    pub log_scale: bool,
    /// Lines under the chart: machine, pinning, runs, what a cross means.
    pub notes: Vec<String>,
}

/// Colours that stay apart from one another (Tableau 10), in server order; a server keeps
/// its colour in every chart of a report.
const COLORS: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0x79, 0x70, 0x6e),
];

fn color(index: usize) -> RGBColor {
    COLORS.get(index).copied().unwrap_or_else(|| {
        let RGBAColor(r, g, b, _) = Palette99::pick(index).to_rgba();
        RGBColor(r, g, b)
    })
}

/// The chart of `metric` at `size`-byte messages; `None` when no server has a mark.
pub fn chart(report: &Report, size: u64, metric: Metric) -> Option<Chart> {
    let conns = report.settings.conns.clone();
    let series: Vec<Series> = report
        .servers
        .iter()
        .enumerate()
        .filter(|(_, server)| server.skipped.is_none())
        .map(|(i, server)| Series {
            name: server.name.clone(),
            color: color(i),
            marks: conns
                .iter()
                .map(|&c| Mark::of(server.point(c, size), metric))
                .collect(),
        })
        .filter(|series| series.marks.iter().any(|m| *m != Mark::Missing))
        .collect();
    if series.is_empty() {
        return None;
    }
    let values: Vec<f64> = series
        .iter()
        .flat_map(|s| &s.marks)
        .flat_map(|mark| match mark {
            Mark::Value { low, high, .. } => vec![*low, *high],
            _ => Vec::new(),
        })
        .collect();
    let positive = values.iter().copied().filter(|v| *v > 0.0);
    let smallest = positive.clone().fold(f64::INFINITY, f64::min);
    let largest = positive.fold(0.0, f64::max);
    let log_scale = smallest.is_finite() && largest / smallest >= LOG_SCALE_SPAN;
    let any_failed = series.iter().any(|s| s.marks.contains(&Mark::Failed));
    Some(Chart {
        title: format!("{}, {} messages", metric.title(), size_label(size)),
        unit: metric.unit().to_string(),
        conns,
        series,
        log_scale,
        notes: notes(report, any_failed),
    })
}

/// The footer of every chart of `report`.
fn notes(report: &Report, any_failed: bool) -> Vec<String> {
    let env = &report.environment;
    let settings = &report.settings;
    let pinned = |what: &str, cpus: &Option<String>| match cpus {
        Some(cpus) => format!("{what} pinned to CPU {cpus}"),
        None => format!("{what} NOT pinned"),
    };
    let commit = match (&env.commit, env.tree_dirty) {
        (Some(commit), Some(true)) => format!("commit {} with uncommitted changes", short(commit)),
        (Some(commit), _) => format!("commit {}", short(commit)),
        (None, _) => "commit not recorded".to_string(),
    };
    let mut notes = vec![
        format!(
            "{}, {} cores usable, {}; {}, {}; {}, {}",
            env.cpu_model,
            env.cores,
            env.kernel,
            pinned("server", &settings.server_cpus),
            pinned("load generator", &settings.client_cpus),
            env.date,
            commit
        ),
        if settings.repeat > 1 {
            format!(
                "Median of {} runs per point ({} s each); whiskers: the lowest and the highest run.",
                settings.repeat, settings.duration_secs
            )
        } else {
            format!(
                "One run per point ({} s): no range to show, and differences may be noise.",
                settings.duration_secs
            )
        },
    ];
    if any_failed {
        notes.push(
            "✗ on the axis: the point failed (errors or wrong bytes, see report.md); its value \
             is not drawn."
                .to_string(),
        );
    }
    let skipped: Vec<&str> = report
        .servers
        .iter()
        .filter(|s| s.skipped.is_some())
        .map(|s| s.name.as_str())
        .collect();
    if !skipped.is_empty() {
        notes.push(format!(
            "Not shown, could not run here: {}.",
            skipped.join(", ")
        ));
    }
    notes
}

/// The first 12 hex digits of a commit.
fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// Writes every chart into `dir`; returns their file names.
pub fn write_all(report: &Report, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    for &size in &report.settings.sizes {
        for metric in Metric::shown(&report.settings) {
            let Some(chart) = chart(report, size, metric) else {
                continue;
            };
            let file = format!("{}_{size}B.svg", metric.slug());
            draw(&dir.join(&file), &chart)?;
            files.push(file);
        }
    }
    Ok(files)
}

/// The value axis: from `lo` to `hi` in plotted units (log10 of the value on a log scale),
/// with labelled and light grid lines.
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl Axis {
    fn new(chart: &Chart) -> Axis {
        let values = chart
            .series
            .iter()
            .flat_map(|s| &s.marks)
            .filter_map(|m| match m {
                Mark::Value { low, high, .. } => Some((*low, *high)),
                _ => None,
            });
        if chart.log_scale {
            let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
            for (low, high) in values {
                if low > 0.0 {
                    lo = lo.min(low);
                }
                hi = hi.max(high);
            }
            // A little room beyond the extremes, not whole empty decades.
            let lo = (lo / 1.5).log10();
            let hi = (hi * 1.5).log10();
            // Labels at each decade, and at 2 and 5 times it when there are few decades.
            let labelled: &[i32] = if hi - lo < 4.0 { &[1, 2, 5] } else { &[1] };
            let (mut bold, mut light) = (Vec::new(), Vec::new());
            for decade in (lo.floor() as i32)..=(hi.ceil() as i32) {
                for multiple in 1..10 {
                    let y = (f64::from(multiple) * 10f64.powi(decade)).log10();
                    if y < lo || y > hi {
                        continue;
                    }
                    if labelled.contains(&multiple) {
                        bold.push(y);
                    } else {
                        light.push(y);
                    }
                }
            }
            Axis {
                log: true,
                lo,
                hi,
                bold,
                light,
            }
        } else {
            let high = values.map(|(_, high)| high).fold(0.0, f64::max);
            let high = if high > 0.0 { high * 1.1 } else { 1.0 };
            let step = nice_step(high / 5.0);
            let steps = (high / step).ceil() as usize;
            let bold = (0..=steps).map(|i| i as f64 * step).collect();
            let light = (0..steps).map(|i| (i as f64 + 0.5) * step).collect();
            Axis {
                log: false,
                lo: 0.0,
                hi: steps as f64 * step,
                bold,
                light,
            }
        }
    }

    /// Where `value` is drawn.
    fn at(&self, value: f64) -> f64 {
        if self.log {
            value.max(f64::MIN_POSITIVE).log10().max(self.lo)
        } else {
            value
        }
    }

    /// The value a plotted position stands for.
    fn value(&self, plotted: f64) -> f64 {
        if self.log {
            10f64.powf(plotted)
        } else {
            plotted
        }
    }

    fn range(&self) -> Ticks {
        Ticks {
            range: self.lo..self.hi,
            bold: self.bold.clone(),
            light: self.light.clone(),
        }
    }
}

/// A linear axis whose grid lines are where we say (plotters' own `WithKeyPoints` offers
/// no value formatter for `f64`).
struct Ticks {
    range: Range<f64>,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl Ranged for Ticks {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn map(&self, value: &f64, (from, to): (i32, i32)) -> i32 {
        let share = (value - self.range.start) / (self.range.end - self.range.start);
        from + (share * f64::from(to - from)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

/// 1, 2 or 5 times a power of ten, at least `rough`.
fn nice_step(rough: f64) -> f64 {
    let power = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|step| *step >= rough)
        .unwrap_or(10.0 * power)
}

/// The width of a connection-count group, as a share of the space between groups.
const GROUP_WIDTH: f64 = 0.8;

/// Draws one chart: groups of bars or dots, whiskers, crosses for failed points, the legend
/// at the right and the notes underneath.
pub fn draw(path: &Path, chart: &Chart) -> anyhow::Result<()> {
    const WIDTH: u32 = 1000;
    const LEGEND: u32 = 150;
    let footer = 22 + 16 * chart.notes.len() as u32;
    let height = 520 + footer;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, footer_area) = root.split_vertically(height - footer);
    let (plot_area, legend_area) = upper.split_horizontally(WIDTH - LEGEND);

    let axis = Axis::new(chart);
    let groups = chart.conns.len();
    let servers = chart.series.len();
    let slot = GROUP_WIDTH / servers as f64;
    let slot_center = |group: usize, server: usize| {
        group as f64 - GROUP_WIDTH / 2.0 + slot * (server as f64 + 0.5)
    };
    let x_range = Ticks {
        range: -0.5..groups as f64 - 0.5,
        bold: (0..groups).map(|g| g as f64).collect(),
        light: Vec::new(),
    };
    let mut plot = ChartBuilder::on(&plot_area)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range, axis.range())?;
    let conns = &chart.conns;
    let y_desc = if axis.log {
        format!("{} (log scale)", chart.unit)
    } else {
        chart.unit.clone()
    };
    plot.configure_mesh()
        .x_desc("connections")
        .y_desc(y_desc)
        .disable_x_mesh()
        .x_label_formatter(&|x| {
            let group = x.round();
            if (x - group).abs() > 1e-6 || group < 0.0 {
                return String::new();
            }
            conns
                .get(group as usize)
                .map_or(String::new(), ToString::to_string)
        })
        .y_label_formatter(&|y| axis_label(axis.value(*y)))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()?;

    let floor = axis.lo;
    let whisker = BLACK.stroke_width(1);
    for (server, series) in chart.series.iter().enumerate() {
        for (group, mark) in series.marks.iter().enumerate() {
            let x = slot_center(group, server);
            match *mark {
                Mark::Value { median, low, high } => {
                    let y = axis.at(median);
                    // Bars first, whiskers over them; on a log scale, the dot over its
                    // whisker so that a narrow range does not hide it.
                    if !axis.log {
                        let half = slot * 0.42;
                        plot.draw_series([Rectangle::new(
                            [(x - half, floor), (x + half, y)],
                            series.color.filled(),
                        )])?;
                    }
                    if high > low {
                        let (y0, y1) = (axis.at(low), axis.at(high));
                        let cap = slot * 0.2;
                        plot.draw_series([
                            PathElement::new(vec![(x, y0), (x, y1)], whisker),
                            PathElement::new(vec![(x - cap, y0), (x + cap, y0)], whisker),
                            PathElement::new(vec![(x - cap, y1), (x + cap, y1)], whisker),
                        ])?;
                    }
                    if axis.log {
                        plot.draw_series([Circle::new((x, y), 5, series.color.filled())])?;
                    }
                }
                Mark::Failed => {
                    // On the axis, not at a value: the run's figures are not data.
                    let y = floor + (axis.hi - axis.lo) * 0.025;
                    plot.draw_series([Cross::new((x, y), 6, series.color.stroke_width(3))])?;
                }
                Mark::Missing => {}
            }
        }
    }

    // The legend, in the right margin where it covers nothing.
    let font = ("sans-serif", 15).into_font();
    for (i, series) in chart.series.iter().enumerate() {
        let y = 60 + 24 * i as i32;
        legend_area.draw(&Rectangle::new(
            [(8, y - 7), (26, y + 7)],
            series.color.filled(),
        ))?;
        legend_area.draw(&Text::new(
            series.name.clone(),
            (34, y - 8),
            font.clone().color(&BLACK),
        ))?;
    }
    if chart.series.iter().any(|s| s.marks.contains(&Mark::Failed)) {
        let y = 60 + 24 * chart.series.len() as i32 + 10;
        legend_area.draw(&Cross::new((17, y), 6, BLACK.stroke_width(3)))?;
        legend_area.draw(&Text::new(
            "failed",
            (34, y - 8),
            font.clone().color(&BLACK),
        ))?;
    }

    let note_font = ("sans-serif", 13)
        .into_font()
        .color(&RGBColor(0x33, 0x33, 0x33));
    for (i, note) in chart.notes.iter().enumerate() {
        footer_area.draw(&Text::new(
            note.clone(),
            (20, 6 + 16 * i as i32),
            note_font.clone(),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// A value-axis label: `250`, `2.5`, `40k`, `1.2M`.
fn axis_label(value: f64) -> String {
    let trim = |text: String| {
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            text
        }
    };
    match value.abs() {
        v if v >= 1e6 => trim(format!("{:.2}", value / 1e6)) + "M",
        v if v >= 1e4 => trim(format!("{:.1}", value / 1e3)) + "k",
        v if v >= 100.0 => format!("{value:.0}"),
        v if v >= 0.01 || v == 0.0 => trim(format!("{value:.2}")),
        _ => format!("{value:.0e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::report::{tests::synthetic, Figures, Run};
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("multiecho-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn axis_labels() {
        assert_eq!(axis_label(0.0), "0");
        assert_eq!(axis_label(2.5), "2.5");
        assert_eq!(axis_label(250.0), "250");
        assert_eq!(axis_label(4000.0), "4000");
        assert_eq!(axis_label(40_000.0), "40k");
        assert_eq!(axis_label(1_250_000.0), "1.25M");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.5), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(38_000.0), 50_000.0);
    }

    #[test]
    fn writes_a_chart_per_size_and_metric() {
        let dir = temp_dir("charts");
        let files = write_all(&synthetic(), &dir).unwrap();
        assert_eq!(
            files,
            [
                "round_trips_64B.svg",
                "p99_latency_64B.svg",
                "cpu_per_round_trip_64B.svg",
                "peak_rss_64B.svg"
            ]
        );
        for file in &files {
            let svg = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(
                svg.starts_with("<svg"),
                "{file}: {}",
                &svg[..svg.len().min(200)]
            );
            // Both servers that ran are in the legend; the skipped one is named as such.
            assert!(
                svg.contains("\nthread\n") && svg.contains("\npool\n"),
                "{file}"
            );
            assert!(
                svg.contains("Not shown, could not run here: uring."),
                "{file}"
            );
            assert!(svg.contains("server pinned to CPU 0"), "{file}");
            assert!(svg.contains("load generator NOT pinned"), "{file}");
            assert!(svg.contains("Test CPU, 2 cores usable"), "{file}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The hex colour plotters writes for `color`.
    fn hex(color: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", color.0, color.1, color.2)
    }

    /// In the synthetic report, pool's point at 50 connections failed, though its run left
    /// figures (10 round trips/s): it must be a cross, not a bar or dot at that value.
    #[test]
    fn a_failed_point_is_not_drawn_as_data() {
        let report = synthetic();
        let chart = chart(&report, 64, Metric::RoundTripsPerSec).unwrap();
        let pool = chart.series.iter().find(|s| s.name == "pool").unwrap();
        assert!(
            matches!(pool.marks[0], Mark::Value { .. }),
            "{:?}",
            pool.marks
        );
        assert_eq!(pool.marks[1], Mark::Failed);

        let dir = temp_dir("chart-failed");
        let path = dir.join("chart.svg");
        draw(&path, &chart).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let fill = format!("fill=\"{}\"", hex(pool.color));
        let stroke = format!("stroke=\"{}\"", hex(pool.color));
        // pool's bars: one for the point that ran, one for its legend swatch; none at 50.
        assert_eq!(svg.matches(&fill).count(), 2, "{svg}");
        // Its failed point is a cross (two strokes) in pool's colour.
        assert_eq!(svg.matches(&stroke).count(), 2, "{svg}");
        assert!(svg.contains("its value is not drawn"), "{svg}");
        // Its failed figure, 10/s, is not even on the axis.
        assert!(!svg.contains("\n10\n"), "{svg}");
    }

    #[test]
    fn values_spanning_orders_of_magnitude_get_a_log_scale() {
        let mut report = synthetic();
        // thread's peak RSS: 4 MiB at 1 connection, 640 MiB at 50.
        report.servers[0].points[1]
            .median
            .as_mut()
            .unwrap()
            .peak_rss_kib = Some(640.0 * 1024.0);
        let chart = chart(&report, 64, Metric::PeakRss).unwrap();
        assert!(chart.log_scale);
        let linear = super::chart(&synthetic(), 64, Metric::PeakRss).unwrap();
        assert!(!linear.log_scale);
        let dir = temp_dir("chart-log");
        let path = dir.join("chart.svg");
        draw(&path, &chart).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.contains("(log scale)"), "{svg}");
        assert!(
            svg.contains("<circle"),
            "dots, not bars, on a log scale: {svg}"
        );
    }

    #[test]
    fn repeated_runs_give_whiskers_from_the_lowest_to_the_highest() {
        let mut report = synthetic();
        let run = |rps: f64| Run {
            figures: Some(Figures {
                round_trips_per_sec: rps,
                ..Figures::default()
            }),
            failure: None,
        };
        report.servers[0].points[0] =
            Point::from_runs(1, 64, vec![run(90.0), run(100.0), run(130.0)]);
        let chart = chart(&report, 64, Metric::RoundTripsPerSec).unwrap();
        assert_eq!(
            chart.series[0].marks[0],
            Mark::Value {
                median: 100.0,
                low: 90.0,
                high: 130.0
            }
        );
    }

    #[test]
    fn a_single_point_sweep_still_charts() {
        let dir = temp_dir("chart1");
        let mut report = synthetic();
        report.settings.conns = vec![50];
        let files = write_all(&report, &dir).unwrap();
        assert_eq!(files.len(), 4);
        let svg = std::fs::read_to_string(dir.join(&files[0])).unwrap();
        assert!(svg.contains("<rect"), "{svg}");
        assert!(svg.contains("\n50\n"), "{svg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
