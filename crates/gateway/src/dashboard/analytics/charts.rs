//! The analytics page's charts, drawn as SVG by plotters (its SVG backend only: the text is
//! written as SVG `<text>` for the browser to set in its own fonts, so no font is needed here,
//! and plotters escapes it).
//!
//! Every chart is one `<svg>` whose `id` is given by the caller. A time-series chart has one
//! `<circle>` per bucket and series (the series' colour as its fill), joined by a `<polyline>`;
//! a bar chart one `<rect>` per row in [`BAR`] (the background is a white `<rect>`).

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Colours of the series, as in the stylesheet's `--accent` and a contrasting orange.
pub const ACCENT: RGBColor = RGBColor(0x2f, 0x5f, 0xd0);
/// The second series' colour.
pub const ORANGE: RGBColor = RGBColor(0xd9, 0x73, 0x06);
/// The bars' colour.
pub const BAR: RGBColor = RGBColor(0x3b, 0x82, 0xa6);
const INK: RGBColor = RGBColor(0x1d, 0x24, 0x30);
const MUTED: RGBColor = RGBColor(0x5b, 0x65, 0x75);
const GRID: RGBColor = RGBColor(0xe6, 0xe9, 0xef);

const FONT: &str = "sans-serif";
const WIDTH: u32 = 880;
const SERIES_HEIGHT: u32 = 320;

/// A chart that could not be drawn, with plotters' reason.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the chart cannot be drawn: {0}")]
pub struct ChartError(String);

fn fail(error: impl std::fmt::Display) -> ChartError {
    ChartError(error.to_string())
}

/// One line of a time-series chart.
#[derive(Debug, Clone)]
pub struct Series<'a> {
    /// Its name, for the legend.
    pub name: &'a str,
    /// Its colour.
    pub color: RGBColor,
    /// One value per bucket.
    pub values: Vec<f64>,
}

/// A time-series chart: one point per bucket (labelled by `buckets`) and series.
#[derive(Debug, Clone)]
pub struct SeriesChart<'a> {
    /// The `id` of the `<svg>`.
    pub id: &'a str,
    /// What the chart shows, for screen readers.
    pub title: &'a str,
    /// The x axis' label.
    pub x_desc: &'a str,
    /// The y axis' label.
    pub y_desc: &'a str,
    /// The buckets' tick labels.
    pub buckets: &'a [String],
    /// The lines.
    pub series: &'a [Series<'a>],
    /// How a y tick value reads.
    pub y_format: fn(f64) -> String,
}

/// The upper end of a value axis holding `max`, with some headroom.
fn axis_max(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.12
    } else {
        1.0
    }
}

/// Marks the `<svg>` with `id`, a role and a label (all ours, so nothing to escape beyond the
/// label, which is escaped anyway).
fn tag(svg: String, id: &str, title: &str) -> String {
    let label = title
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('"', "&quot;");
    svg.replacen(
        "<svg ",
        &format!("<svg id=\"{id}\" role=\"img\" aria-label=\"{label}\" "),
        1,
    )
}

fn background(root: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), ChartError> {
    root.fill(&WHITE).map_err(fail)
}

/// Runs `draw`, turning a panic inside plotters (it has a few on edge cases) into an error: a
/// chart that cannot be drawn must not take the page down.
fn guarded(draw: impl FnOnce() -> Result<String, ChartError>) -> Result<String, ChartError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(draw))
        .unwrap_or_else(|_| Err(ChartError("plotters panicked".to_owned())))
}

/// Draws a time-series chart.
pub fn series_chart(chart: &SeriesChart<'_>) -> Result<String, ChartError> {
    guarded(|| draw_series_chart(chart))
}

fn draw_series_chart(chart: &SeriesChart<'_>) -> Result<String, ChartError> {
    let n = i32::try_from(chart.buckets.len()).map_err(fail)?;
    let max = chart
        .series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0_f64, f64::max);
    let y_max = axis_max(max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, SERIES_HEIGHT)).into_drawing_area();
        background(&root)?;
        let mut plot = ChartBuilder::on(&root)
            .margin(14)
            .x_label_area_size(46)
            .y_label_area_size(84)
            .build_cartesian_2d((0..n.max(1)).into_segmented(), 0.0..y_max)
            .map_err(fail)?;
        let x_label = |value: &SegmentValue<i32>| match value {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| chart.buckets.get(i))
                .cloned()
                .unwrap_or_default(),
            SegmentValue::Last => String::new(),
        };
        let y_label = |value: &f64| (chart.y_format)(*value);
        plot.configure_mesh()
            .disable_x_mesh()
            .light_line_style(TRANSPARENT)
            .bold_line_style(GRID)
            .axis_style(MUTED)
            .x_labels(chart.buckets.len().clamp(1, 10))
            .y_labels(6)
            .x_label_formatter(&x_label)
            .y_label_formatter(&y_label)
            .x_desc(chart.x_desc)
            .y_desc(chart.y_desc)
            .label_style((FONT, 15).into_font().color(&INK))
            .axis_desc_style((FONT, 16).into_font().color(&INK))
            .draw()
            .map_err(fail)?;
        for series in chart.series {
            let points =
                || {
                    series.values.iter().enumerate().filter_map(|(i, v)| {
                        Some((SegmentValue::CenterOf(i32::try_from(i).ok()?), *v))
                    })
                };
            let color = series.color;
            plot.draw_series(LineSeries::new(points(), color.stroke_width(2)))
                .map_err(fail)?
                .label(series.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
            plot.draw_series(points().map(|point| Circle::new(point, 3, color.filled())))
                .map_err(fail)?;
        }
        if chart.series.len() > 1 {
            plot.configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.9))
                .border_style(GRID)
                .label_font((FONT, 15).into_font().color(&INK))
                .draw()
                .map_err(fail)?;
        }
        root.present().map_err(fail)?;
    }
    Ok(tag(svg, chart.id, chart.title))
}

/// One bar of a bar chart.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Its label (a model or provider name: any text, escaped by plotters).
    pub label: String,
    /// Its length.
    pub value: f64,
    /// The value as written at its end.
    pub value_label: String,
}

/// Labels longer than this are cut (with an ellipsis) on the chart; the tables show them whole.
const MAX_LABEL_CHARS: usize = 36;

fn short(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL_CHARS {
        label.to_owned()
    } else {
        let mut cut: String = label.chars().take(MAX_LABEL_CHARS - 1).collect();
        cut.push('…');
        cut
    }
}

/// Draws a horizontal bar chart, the first bar at the top.
pub fn bar_chart(
    id: &str,
    title: &str,
    x_desc: &str,
    bars: &[Bar],
    x_format: &dyn Fn(f64) -> String,
) -> Result<String, ChartError> {
    guarded(|| draw_bar_chart(id, title, x_desc, bars, x_format))
}

fn draw_bar_chart(
    id: &str,
    title: &str,
    x_desc: &str,
    bars: &[Bar],
    x_format: &dyn Fn(f64) -> String,
) -> Result<String, ChartError> {
    let n = i32::try_from(bars.len()).map_err(fail)?;
    let labels: Vec<String> = bars.iter().map(|bar| short(&bar.label)).collect();
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let label_area = u32::try_from(longest * 8 + 24)
        .map_err(fail)?
        .clamp(70, 320);
    let height = 90 + 34 * u32::try_from(bars.len().max(1)).map_err(fail)?;
    let max = bars.iter().map(|bar| bar.value).fold(0.0_f64, f64::max);
    // Room at the right for the value written after the longest bar.
    let x_max = axis_max(max) * 1.2;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        background(&root)?;
        let mut plot = ChartBuilder::on(&root)
            .margin(14)
            .x_label_area_size(46)
            .y_label_area_size(label_area)
            .build_cartesian_2d(0.0..x_max, (0..n.max(1)).into_segmented())
            .map_err(fail)?;
        // Row `i` of `bars` sits at `n - 1 - i`, so the first is at the top.
        let y_label = |value: &SegmentValue<i32>| match value {
            SegmentValue::CenterOf(at) => usize::try_from(n - 1 - at)
                .ok()
                .and_then(|i| labels.get(i))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        };
        let x_label = |value: &f64| x_format(*value);
        plot.configure_mesh()
            .disable_y_mesh()
            .light_line_style(TRANSPARENT)
            .bold_line_style(GRID)
            .axis_style(MUTED)
            .y_labels(bars.len().max(1))
            .x_labels(6)
            .y_label_formatter(&y_label)
            .x_label_formatter(&x_label)
            .x_desc(x_desc)
            .label_style((FONT, 15).into_font().color(&INK))
            .axis_desc_style((FONT, 16).into_font().color(&INK))
            .draw()
            .map_err(fail)?;
        let value_style = TextStyle::from((FONT, 15).into_font())
            .color(&INK)
            .pos(Pos::new(HPos::Left, VPos::Center));
        for (i, bar) in bars.iter().enumerate() {
            let at = n - 1 - i32::try_from(i).map_err(fail)?;
            let mut rect = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(at)),
                    (bar.value, SegmentValue::Exact(at + 1)),
                ],
                BAR.filled(),
            );
            rect.set_margin(6, 6, 0, 0);
            plot.draw_series(std::iter::once(rect)).map_err(fail)?;
            plot.draw_series(std::iter::once(
                EmptyElement::at((bar.value, SegmentValue::CenterOf(at)))
                    + Text::new(bar.value_label.clone(), (6, 0), value_style.clone()),
            ))
            .map_err(fail)?;
        }
        root.present().map_err(fail)?;
    }
    Ok(tag(svg, id, title))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(svg: &str, needle: &str) -> usize {
        svg.matches(needle).count()
    }

    #[test]
    fn a_series_chart_has_one_point_per_bucket_and_series() {
        let buckets: Vec<String> = (1..=30).map(|d| format!("Nov {d}")).collect();
        let series = [
            Series {
                name: "Input tokens",
                color: ACCENT,
                values: (0..30).map(f64::from).collect(),
            },
            Series {
                name: "Output tokens",
                color: ORANGE,
                values: (0..30).map(|v| f64::from(v) * 2.0).collect(),
            },
        ];
        let svg = series_chart(&SeriesChart {
            id: "tokens-chart",
            title: "Tokens",
            x_desc: "Day (UTC)",
            y_desc: "Tokens",
            buckets: &buckets,
            series: &series,
            y_format: |v| format!("{v}"),
        })
        .unwrap();
        assert!(
            svg.starts_with("<svg id=\"tokens-chart\" role=\"img\""),
            "{svg}"
        );
        assert_eq!(count(&svg, "<circle"), 60, "{svg}");
        assert_eq!(count(&svg, "fill=\"#2F5FD0\""), 30, "{svg}");
        assert!(
            svg.contains(">Day (UTC)<") || svg.contains("Day (UTC)\n"),
            "{svg}"
        );
        assert!(svg.contains("Nov 1\n"), "{svg}");
    }

    #[test]
    fn edge_cases_draw() {
        for (n, value) in [(1, 0.0), (1, 5.0), (1_000, 0.0), (1_000, 9.2e9), (7, 1e-9)] {
            let buckets: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
            let series = [Series {
                name: "Cost",
                color: ACCENT,
                values: (0..n)
                    .map(|i| if i % 2 == 0 { value } else { 0.0 })
                    .collect(),
            }];
            let svg = series_chart(&SeriesChart {
                id: "c",
                title: "Cost",
                x_desc: "Day",
                y_desc: "USD",
                buckets: &buckets,
                series: &series,
                y_format: |v| format!("{v}"),
            })
            .unwrap();
            assert_eq!(count(&svg, "<circle"), n, "{n} {value}");
            let bars: Vec<Bar> = (0..n.min(10))
                .map(|i| Bar {
                    label: format!("m{i}"),
                    value: value / (i as f64 + 1.0),
                    value_label: String::new(),
                })
                .collect();
            let svg = bar_chart("b", "Cost", "USD", &bars, &|v| format!("{v}")).unwrap();
            assert_eq!(count(&svg, "fill=\"#3B82A6\""), bars.len(), "{n} {value}");
        }
    }

    #[test]
    fn bar_labels_are_escaped() {
        let bars = [
            Bar {
                label: "openai/<script>alert(1)</script>".into(),
                value: 2.0,
                value_label: "$2.00".into(),
            },
            Bar {
                label: "anthropic/claude".into(),
                value: 1.0,
                value_label: "$1.00".into(),
            },
        ];
        let svg = bar_chart("model-chart", "Cost", "Cost (USD)", &bars, &|v| {
            format!("{v}")
        })
        .unwrap();
        assert!(!svg.contains("<script"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"), "{svg}");
    }
}
