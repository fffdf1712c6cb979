//! SVG charts of a comparison (plotters): for each message size and each metric, the metric
//! against the number of connections (log scale), one line per server.

use std::path::Path;

use plotters::prelude::*;

use super::report::{size_label, Metric, Report};

/// One line of a chart: a server's (connections, value) points.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Writes every chart into `dir`; returns their file names.
pub fn write_all(report: &Report, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    for &size in &report.settings.sizes {
        for metric in Metric::ALL {
            let series: Vec<Series> = report
                .servers
                .iter()
                .filter(|server| server.skipped.is_none())
                .map(|server| Series {
                    name: server.name.clone(),
                    points: report
                        .settings
                        .conns
                        .iter()
                        .filter_map(|&conns| {
                            let figures = server.point(conns, size)?.median.as_ref()?;
                            Some((conns as f64, metric.value(figures)?))
                        })
                        .collect(),
                })
                .filter(|series| !series.points.is_empty())
                .collect();
            if series.is_empty() {
                continue;
            }
            let file = format!("{}_{size}B.svg", metric.slug());
            let title = format!("{}, {} messages", metric.title(), size_label(size));
            draw(&dir.join(&file), &title, metric.unit(), &series)?;
            files.push(file);
        }
    }
    Ok(files)
}

/// Draws one chart: value against connections (log scale), a line and dots per series.
fn draw(path: &Path, title: &str, unit: &str, series: &[Series]) -> anyhow::Result<()> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_min = all().map(|p| p.0).fold(f64::INFINITY, f64::min).max(1.0);
    let x_max = all().map(|p| p.0).fold(0.0, f64::max).max(x_min);
    let y_max = all().map(|p| p.1).fold(0.0, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };

    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((x_min / 1.5..x_max * 1.5).log_scale(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc(unit)
        .x_label_formatter(&|x| format!("{}", x.round()))
        .y_label_formatter(&|y| axis_label(*y))
        .draw()?;
    for (i, line) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(line.points.clone(), color.stroke_width(2)))?
            .label(line.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            line.points
                .iter()
                .map(|&point| Circle::new(point, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
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
        _ => trim(format!("{value:.2}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn writes_a_chart_per_size_and_metric() {
        let dir = std::env::temp_dir().join(format!("multiecho-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = write_all(&super::super::report::tests::synthetic(), &dir).unwrap();
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
            // Both servers that ran are in the legend; the skipped one is not drawn.
            assert!(svg.contains("thread") && svg.contains("pool"), "{file}");
            assert!(!svg.contains("uring"), "{file}");
            assert!(svg.contains("<polyline"), "{file}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
