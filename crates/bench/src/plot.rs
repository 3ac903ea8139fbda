//! Throughput and latency over time, drawn to SVG: answers per second above, latency
//! percentiles per second (log scale) below. SVG needs no font library: text is left to the
//! viewer.

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::prelude::*;

use crate::report::BenchResult;

const WIDTH_PX: u32 = 960;
const HEIGHT_PX: u32 = 720;

pub fn draw(result: &BenchResult, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    draw_svg(result, path).map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))
}

fn draw_svg(result: &BenchResult, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(HEIGHT_PX / 2);
    // Seconds past the run's duration hold only the answers still in flight at the deadline:
    // a partial second that would read as a collapse.
    let full = if result.config.duration_s > 0 { result.config.duration_s as usize } else { usize::MAX };
    let rows = &result.timeline[..result.timeline.len().min(full)];
    let x_max = (rows.len().max(1)) as f64;
    let main = if result.scenario == "ceiling" { "healthz" } else { "claims" };
    let title = format!(
        "hongbao bench {} ({}, store {}, concurrency {})",
        result.scenario, result.mode, result.store, result.config.concurrency
    );

    let y_max = rows.iter().map(|r| r.handled_per_s.max(r.ok_per_s)).max().unwrap_or(1).max(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(&title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(format!("{main} per second"))
        .y_label_formatter(&|v| crate::report::thousands(*v))
        .draw()?;
    // Each second's figure is drawn at its middle.
    let series = |f: fn(&crate::report::Second) -> u64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r.t_s as f64 + 0.5, f(r) as f64)).collect()
    };
    let ok_label = if result.scenario == "ceiling" { "answered" } else { "paid" };
    chart
        .draw_series(LineSeries::new(series(|r| r.ok_per_s), BLUE.stroke_width(2)))?
        .label(ok_label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if rows.iter().any(|r| r.handled_per_s != r.ok_per_s) {
        chart
            .draw_series(LineSeries::new(series(|r| r.handled_per_s), GREEN.stroke_width(2)))?
            .label("handled (paid + turned away)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    }
    if rows.iter().any(|r| r.refused_per_s + r.errors_per_s > 0) {
        chart
            .draw_series(LineSeries::new(series(|r| r.refused_per_s + r.errors_per_s), RED.stroke_width(2)))?
            .label("refused or failed")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;

    let lat_ms = |us: u64| (us.max(1) as f64) / 1000.0;
    let lat_max = rows.iter().map(|r| lat_ms(r.latency_us_max)).fold(1.0, f64::max) * 1.5;
    let lat_min = rows
        .iter()
        .filter(|r| r.latency_us_p50 > 0)
        .map(|r| lat_ms(r.latency_us_p50))
        .fold(f64::INFINITY, f64::min)
        .min(lat_max / 10.0)
        .max(0.001)
        / 1.5;
    let mut chart = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..x_max, (lat_min..lat_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(format!("{main} latency, ms (log)"))
        .y_label_formatter(&|v| if *v >= 1.0 { format!("{v:.0}") } else { format!("{v:.2}") })
        .draw()?;
    let with_answers: Vec<&crate::report::Second> = rows.iter().filter(|r| r.latency_us_max > 0).collect();
    let lat_series = |f: fn(&crate::report::Second) -> u64| -> Vec<(f64, f64)> {
        with_answers.iter().map(|r| (r.t_s as f64 + 0.5, lat_ms(f(r)))).collect()
    };
    let colors = [(BLUE, "p50"), (MAGENTA, "p99"), (RED, "max")];
    let getters: [fn(&crate::report::Second) -> u64; 3] =
        [|r| r.latency_us_p50, |r| r.latency_us_p99, |r| r.latency_us_max];
    for ((color, name), get) in colors.into_iter().zip(getters) {
        chart
            .draw_series(LineSeries::new(lat_series(get), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
