//! The lab's SVG figures, drawn with `plotters` into strings (the callers write them, with the
//! CSVs they come from, as one set of files: [`elra::io::write_files_in`]).
//!
//! * [`mse_vs_rank_svg`]: an App. G setting's test MSE against rank (`mse_vs_rank.svg`).
//! * [`loss_curves_svg`]: `elra fit`'s training-loss curves (`loss.svg`).

use crate::experiment::Row;
use elra::train::fit::Curve;
use elra::{ElraError, Result};
use plotters::prelude::*;
use std::fmt;

/// Lower clip of the log-scale plot: MSEs below it (exact constructions give ≈ 1e-31) are drawn
/// on the bottom edge.
pub const PLOT_FLOOR: f64 = 1e-16;

/// The SVG plot `mse_vs_rank.svg` of test MSE (log scale, clipped below at [`PLOT_FLOOR`])
/// against rank: one line per method plus the construction (a marker at every rank run), and a
/// dashed vertical line at the theorem's threshold rank (the App. G figures' layout). The legend
/// sits in the lower left, where no App. G curve goes: below the threshold no method is exact.
///
/// Errors: no rows; [`ElraError::Format`] if drawing fails.
pub fn mse_vs_rank_svg(title: &str, rows: &[Row], threshold: usize) -> Result<String> {
    if rows.is_empty() {
        return Err(ElraError::invalid("rows", "nothing to plot"));
    }
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let first_adapter = rows[0].adapter.clone();
    let mut push = |name: &str, rank: usize, v: f64| {
        if !v.is_finite() {
            return;
        }
        let p = (rank as f64, v.max(PLOT_FLOOR));
        match series.iter_mut().find(|(n, _)| n == name) {
            Some((_, pts)) => pts.push(p),
            None => series.push((name.to_string(), vec![p])),
        }
    };
    for r in rows.iter().filter(|r| r.adapter == first_adapter) {
        push("construction", r.rank, r.construction_mse);
    }
    for r in rows {
        push(&r.adapter, r.rank, r.trained_mse);
    }
    let max_rank = rows.iter().map(|r| r.rank).max().unwrap_or(1) as f64;
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(PLOT_FLOOR, f64::max);
    let ymax = 10f64.powf(ymax.log10().ceil() + 0.2);
    let e = |x: &dyn fmt::Display| ElraError::Format(format!("plotting {title}: {x}"));
    let mut out = String::new();
    let root = SVGBackend::with_string(&mut out, (720, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: test MSE vs rank"),
            ("sans-serif", 20).into_font(),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5f64..max_rank + 0.5, (PLOT_FLOOR..ymax).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_labels(max_rank as usize + 1)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("rank R (LoRA-equivalent: 2·R·D trainable entries per layer)")
        .y_desc(format!(
            "test MSE (per entry; below {PLOT_FLOOR:.0e} drawn at {PLOT_FLOOR:.0e})"
        ))
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()
        .map_err(|x| e(&x))?;
    let colors = [BLACK, BLUE, RED, GREEN, MAGENTA, CYAN];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        // A marker per rank run, so that the ranks a merged set of shards covers are visible.
        chart
            .draw_series(
                pts.iter()
                    .map(|&p| Circle::new(p, 3, c.filled()).into_dyn()),
            )
            .map_err(|x| e(&x))?;
    }
    let t = threshold as f64;
    let grey = RGBColor(110, 110, 110);
    chart
        .draw_series(DashedLineSeries::new(
            vec![(t, PLOT_FLOOR), (t, ymax)],
            8,
            5,
            grey.stroke_width(2),
        ))
        .map_err(|x| e(&x))?
        .label(format!("threshold R = {threshold}"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    drop(chart);
    drop(root);
    Ok(out)
}

/// The `elra fit` figure `loss.svg`: every method's training loss against the step, logarithmic
/// loss axis, one colour per method in the order of `curves`.
///
/// Errors: [`ElraError::Format`] if drawing fails.
pub fn loss_curves_svg(curves: &[Curve]) -> Result<String> {
    let err = |e: String| ElraError::Format(format!("plotting loss.svg: {e}"));
    let steps = curves
        .iter()
        .map(|c| c.loss.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let positive = curves
        .iter()
        .flat_map(|c| c.loss.iter().copied())
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = positive.fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        (lo * 0.8, hi * 1.25)
    } else {
        (1e-3, 1.0)
    };
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "fit: training loss (teacher–student adaptation)",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0usize..steps - 1, (lo..hi).log_scale())
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("optimiser step")
            .y_desc("training loss (MSE / CE)")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .max_light_lines(1)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let palette = [
            RGBColor(31, 119, 180),
            RGBColor(214, 39, 40),
            RGBColor(44, 160, 44),
            RGBColor(148, 103, 189),
            RGBColor(255, 127, 14),
            RGBColor(140, 86, 75),
        ];
        for (i, c) in curves.iter().enumerate() {
            let color = palette[i % palette.len()];
            chart
                .draw_series(LineSeries::new(
                    c.loss
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| v.is_finite() && **v > 0.0)
                        .map(|(t, v)| (t, *v)),
                    &color,
                ))
                .map_err(|e| err(e.to_string()))?
                .label(c.method.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(out)
}
