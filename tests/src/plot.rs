//! SVG line plots for the benchmark report.

use std::path::Path;

use plotters::prelude::*;

/// One line per series of (x, y) points; `log_x` for a logarithmic x axis.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    log_x: bool,
    series: &[(&str, Vec<(f64, f64)>)],
) {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).expect("plot background");
    let points = series.iter().flat_map(|(_, v)| v.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for (x, y) in points {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    if x0 >= x1 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let colors = [
        BLUE,
        RED,
        GREEN,
        MAGENTA,
        BLACK,
        CYAN,
        RGBColor(230, 140, 0),
    ];
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .draw()
                .expect("axes");
            for (i, (name, v)) in series.iter().enumerate() {
                let c = colors[i % colors.len()];
                chart
                    .draw_series(LineSeries::new(v.iter().copied(), c.stroke_width(2)))
                    .expect("series")
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                    });
                chart
                    .draw_series(v.iter().map(|p| Circle::new(*p, 3, c.filled())))
                    .expect("points");
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .expect("legend");
        }};
    }
    if log_x {
        draw!(
            b.build_cartesian_2d((x0..x1).log_scale(), 0f64..y1)
                .expect("chart")
        );
    } else {
        draw!(b.build_cartesian_2d(x0..x1, 0f64..y1).expect("chart"));
    }
    root.present().expect("writing the plot");
}
