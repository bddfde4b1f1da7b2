//! `--svg`: the timeline as a line chart a person can read at a glance during a drill: one line
//! of answers per second for each node and a red one for errors per second.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::LoadError;
use super::report::Report;

const SIZE: (u32, u32) = (1000, 560);
/// The column right of the plot that holds the legend, and the longest name it shows whole.
const LEGEND_WIDTH: u32 = 170;
const LEGEND_CHARS: usize = 18;
/// Node lines: Tableau 10 without its red, so red always means errors.
const NODE_COLOURS: [RGBColor; 9] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0xba, 0xb0, 0xac),
];
/// The balancers' lines (several `--url`s): greys, dashed, apart from the nodes' colours.
const BALANCER_COLOURS: [RGBColor; 3] = [
    RGBColor(0x33, 0x33, 0x33),
    RGBColor(0x88, 0x88, 0x88),
    RGBColor(0xbb, 0xbb, 0xbb),
];
const ERROR_COLOUR: RGBColor = RGBColor(0xd6, 0x00, 0x00);
/// Up to this many seconds every point also gets a dot, so short runs do not look like
/// nothing was drawn.
const DOTS_UP_TO: usize = 60;

/// Writes the timeline of `report` to `path` as an SVG line chart titled `title`.
pub(super) fn write_svg(report: &Report, path: &Path, title: &str) -> Result<(), LoadError> {
    draw(report, path, title).map_err(|source| LoadError::Chart {
        path: path.to_owned(),
        source,
    })
}

/// Second `s` counts what ended in `[s, s + 1)`, so its point sits in the middle: a node
/// killed at 3 s shows its drop around x = 3, not a second early.
fn mid(second: u64) -> f64 {
    second as f64 + 0.5
}

type DrawResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn draw(report: &Report, path: &Path, title: &str) -> DrawResult {
    let timeline = &report.timeline;
    let seconds = timeline.len().max(1) as f64;
    let peak = timeline
        .iter()
        .flat_map(|s| {
            s.nodes
                .values()
                .chain(&s.balancers)
                .copied()
                .chain([s.errors.total])
        })
        .max()
        .unwrap_or(0);
    // 10 % headroom so the highest line does not run along the frame.
    let y_max = (peak + peak / 10).max(1);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let below_title = root.titled(title, ("sans-serif", 24))?;
    // The legend gets its own column so it never hides a line.
    let (plot, legend) = below_title.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot)
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..seconds, 0u64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("responses per second")
        .x_label_formatter(&|x| {
            if x.fract() == 0.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.1}")
            }
        })
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()?;

    let dots = if timeline.len() <= DOTS_UP_TO { 3 } else { 0 };
    let mut entries = Vec::with_capacity(report.nodes.len() + 1);
    for (i, node) in report.nodes.keys().enumerate() {
        let colour = NODE_COLOURS[i % NODE_COLOURS.len()];
        let points = timeline
            .iter()
            .map(|s| (mid(s.second), s.nodes.get(node).copied().unwrap_or(0)));
        chart.draw_series(LineSeries::new(points, colour.stroke_width(2)).point_size(dots))?;
        entries.push((node.as_str(), colour));
    }
    // Errors last, so the red line is on top where it crosses others.
    // With several `--url`s, a dashed grey line per balancer: who carried the traffic when.
    let balancers = report
        .failover
        .as_ref()
        .map_or(&[][..], |f| &f.balancers[..]);
    let mut labels = Vec::with_capacity(balancers.len());
    // Named by letter in `--url` order (A for the first), as the HA drill names them.
    for i in 0..balancers.len() {
        let colour = BALANCER_COLOURS[i % BALANCER_COLOURS.len()];
        let points: Vec<(f64, u64)> = timeline
            .iter()
            .map(|s| (mid(s.second), s.balancers.get(i).copied().unwrap_or(0)))
            .collect();
        chart.draw_series(DashedLineSeries::new(points, 6, 4, colour.stroke_width(2)))?;
        let letter = char::from(b'A' + (i % 26) as u8);
        labels.push((format!("balancer {letter}"), colour));
    }
    entries.extend(
        labels
            .iter()
            .map(|(label, colour)| (label.as_str(), *colour)),
    );
    let errors = timeline.iter().map(|s| (mid(s.second), s.errors.total));
    chart.draw_series(LineSeries::new(errors, ERROR_COLOUR.stroke_width(2)).point_size(dots))?;
    entries.push(("errors", ERROR_COLOUR));
    draw_legend(&legend, &entries)?;

    root.present()?;
    Ok(())
}

fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    entries: &[(&str, RGBColor)],
) -> DrawResult {
    const TOP: i32 = 24;
    const LINE: i32 = 20;
    let (_, height) = area.dim_in_pixel();
    let fits = usize::try_from((height as i32 - TOP - LINE) / LINE)
        .unwrap_or(0)
        .max(1);
    // Errors always show; nodes that do not fit are summed up in one line above them.
    let (nodes, errors) = entries.split_at(entries.len() - 1);
    let shown = if nodes.len() < fits {
        nodes.len()
    } else {
        fits.saturating_sub(2)
    };
    let mut y = TOP;
    for (name, colour) in &nodes[..shown] {
        legend_entry(area, name, *colour, y)?;
        y += LINE;
    }
    if shown < nodes.len() {
        legend_text(area, format!("+{} more nodes", nodes.len() - shown), y)?;
        y += LINE;
    }
    for (name, colour) in errors {
        legend_entry(area, name, *colour, y)?;
    }
    Ok(())
}

/// A short stroke of the line's colour, then its name, centred on `y`.
fn legend_entry(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    name: &str,
    colour: RGBColor,
    y: i32,
) -> DrawResult {
    area.draw(&PathElement::new([(4, y), (28, y)], colour.stroke_width(3)))?;
    legend_text(area, short(name), y)
}

/// A legend label right of where the strokes are, centred on `y`.
fn legend_text(area: &DrawingArea<SVGBackend<'_>, Shift>, label: String, y: i32) -> DrawResult {
    let font = ("sans-serif", 14).into_font();
    area.draw(&Text::new(label, (34, y - 8), font))?;
    Ok(())
}

/// A legend label: a long node name loses its middle, so both the kind of name and the part
/// that tells nodes apart (usually the end: an address, a number) stay readable.
fn short(name: &str) -> String {
    let count = name.chars().count();
    if count <= LEGEND_CHARS {
        return name.to_owned();
    }
    // A third for the start, the rest for the end, which is where nodes usually differ.
    let head = LEGEND_CHARS / 3;
    let tail = LEGEND_CHARS - 1 - head;
    let mut label: String = name.chars().take(head).collect();
    label.push('…');
    label.extend(name.chars().skip(count - tail));
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_legend_names_lose_their_middle() {
        assert_eq!(short("web-1"), "web-1");
        assert_eq!(short("127.0.0.1:9001"), "127.0.0.1:9001");
        let cut = short("client-address-127.0.0.10");
        assert_eq!(cut, "client…-127.0.0.10");
        assert_eq!(cut.chars().count(), LEGEND_CHARS);
    }
}
