//! SVG charts of a comparison (plotters): for each message size and each metric, the metric
//! against the number of connections, one line per server.

use std::path::Path;

use plotters::prelude::*;

use super::report::{size_label, Metric, Report};

/// One line of a chart: a server's values, by position in the sweep's connection counts.
struct Series {
    name: String,
    points: Vec<(usize, f64)>,
}

/// Writes every chart into `dir`; returns their file names.
pub fn write_all(report: &Report, dir: &Path) -> anyhow::Result<Vec<String>> {
    let conns = &report.settings.conns;
    let mut files = Vec::new();
    for &size in &report.settings.sizes {
        for metric in Metric::ALL {
            let series: Vec<Series> = report
                .servers
                .iter()
                .filter(|server| server.skipped.is_none())
                .map(|server| Series {
                    name: server.name.clone(),
                    points: conns
                        .iter()
                        .enumerate()
                        .filter_map(|(i, &c)| {
                            let figures = server.point(c, size)?.median.as_ref()?;
                            Some((i, metric.value(figures)?))
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
            draw(&dir.join(&file), &title, metric.unit(), conns, &series)?;
            files.push(file);
        }
    }
    Ok(files)
}

/// Draws one chart: value against connections, a line and dots per series. The sweep's
/// connection counts are usually spaced by factors (1, 50, 500), so each gets an equal step
/// on the axis, labelled with its count: the effect of a log scale, with exact labels.
fn draw(
    path: &Path,
    title: &str,
    unit: &str,
    conns: &[usize],
    series: &[Series],
) -> anyhow::Result<()> {
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let at = |i: usize| SegmentValue::CenterOf(i as i32);

    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((0..conns.len() as i32 - 1).into_segmented(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc(unit)
        .disable_x_mesh()
        .x_labels(conns.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| conns.get(i))
                .map_or(String::new(), ToString::to_string),
            _ => String::new(),
        })
        .y_label_formatter(&|y| axis_label(*y))
        .draw()?;
    for (i, line) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<_> = line.points.iter().map(|&(x, y)| (at(x), y)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(line.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|point| Circle::new(point, 4, color.filled())),
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

    #[test]
    fn a_single_point_sweep_still_charts() {
        let dir = std::env::temp_dir().join(format!("multiecho-chart1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut report = super::super::report::tests::synthetic();
        report.settings.conns = vec![50];
        let files = write_all(&report, &dir).unwrap();
        assert_eq!(files.len(), 4);
        let svg = std::fs::read_to_string(dir.join(&files[0])).unwrap();
        assert!(svg.contains("<circle"), "{svg}");
        assert!(svg.contains("\n50\n"), "{svg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
