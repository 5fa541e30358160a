//! `postcopy plot`: a report's timeline and fault-latency histogram as one SVG.
//!
//! Three panels, one time axis for the first two:
//! 1. pages placed per second by each path (fault, stream, precopy, zero map, working set),
//!    over the phases as coloured bands;
//! 2. the share of pages present, and the connections down (recovery) if any were;
//! 3. the fault latency (touch to resumption) in log₂ buckets of microseconds.
//!
//! Drawn with plotters' SVG backend (text is left to the viewer's fonts: no font files needed).

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::dest::gauges::Phase;
use crate::stats::Bucket;
use crate::timeline::{Sample, Timeline};

/// Errors of plotting.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The report has no timeline (an older report, or a run that ended before it began).
    #[error("the report has no timeline to draw (it holds no samples)")]
    NoTimeline,
    /// Drawing failed.
    #[error("drawing the SVG: {0}")]
    Draw(String),
}

/// What a plot draws: a title, a timeline, a fault-latency histogram.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct PlotInput {
    /// The title line.
    #[serde(default)]
    pub title: String,
    /// The timeline.
    #[serde(default)]
    pub timeline: Timeline,
    /// The fault latency, log₂ buckets.
    #[serde(default)]
    pub fault_latency_histogram: Vec<Bucket>,
}

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 900;

/// The SVG of `input`.
pub fn svg(input: &PlotInput) -> Result<String, PlotError> {
    if input.timeline.samples.len() < 2 {
        return Err(PlotError::NoTimeline);
    }
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root
            .titled(&input.title, ("sans-serif", 18))
            .map_err(draw_err)?;
        let (top, rest) = root.split_vertically(400);
        let (mid, bottom) = rest.split_vertically(200);
        rates_panel(&top, &input.timeline)?;
        present_panel(&mid, &input.timeline)?;
        histogram_panel(&bottom, &input.fault_latency_histogram)?;
        root.present().map_err(draw_err)?;
    }
    Ok(out)
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// A path pages arrive by: its name, colour and running total in a sample.
type Path = (&'static str, RGBColor, fn(&Sample) -> u64);

const PATHS: [Path; 5] = [
    ("fault", RGBColor(214, 39, 40), |s| s.totals.pages_by_fault),
    ("stream", RGBColor(31, 119, 180), |s| {
        s.totals.pages_by_stream
    }),
    ("precopy", RGBColor(44, 160, 44), |s| {
        s.totals.pages_by_precopy
    }),
    ("zero map", RGBColor(148, 103, 189), |s| {
        s.totals.pages_by_zero_map
    }),
    ("working set", RGBColor(255, 127, 14), |s| {
        s.totals.pages_by_working_set
    }),
];

fn phase_color(p: Phase) -> RGBColor {
    match p {
        Phase::Connecting => RGBColor(200, 200, 200),
        Phase::Precopy => RGBColor(160, 220, 160),
        Phase::Switchover => RGBColor(250, 200, 120),
        Phase::Postcopy => RGBColor(160, 190, 240),
        Phase::Verifying => RGBColor(220, 180, 240),
        Phase::Done => RGBColor(235, 235, 235),
        Phase::Failed => RGBColor(250, 140, 140),
    }
}

fn seconds(s: &Sample) -> f64 {
    s.t_ms as f64 / 1000.0
}

/// Per-interval rates of a running total.
fn rates(t: &Timeline, total: fn(&Sample) -> u64) -> Vec<(f64, f64)> {
    t.samples
        .windows(2)
        .map(|w| {
            let dt = (w[1].t_ms.saturating_sub(w[0].t_ms)) as f64 / 1000.0;
            let d = total(&w[1]).saturating_sub(total(&w[0])) as f64;
            (seconds(&w[1]), d / dt.max(1e-3))
        })
        .collect()
}

fn rates_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, t: &Timeline) -> Result<(), PlotError> {
    let t_max = t.samples.last().map_or(1.0, seconds).max(0.1);
    let series: Vec<(Path, Vec<(f64, f64)>)> = PATHS
        .iter()
        .map(|p| (*p, rates(t, p.2)))
        .filter(|(_, r)| r.iter().any(|&(_, v)| v > 0.0))
        .collect();
    let y_max = series
        .iter()
        .flat_map(|(_, r)| r.iter().map(|&(_, v)| v))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "pages placed per second, by path (bands: phases)",
            ("sans-serif", 15),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .y_label_formatter(&|v| short_count(*v))
        .x_desc("seconds")
        .y_desc("pages/s")
        .draw()
        .map_err(draw_err)?;
    for span in t.spans() {
        let (x0, x1) = (span.start_ms as f64 / 1000.0, span.end_ms as f64 / 1000.0);
        let c = phase_color(span.phase);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x0, 0.0), (x1, y_max)],
                c.mix(0.35).filled(),
            )))
            .map_err(draw_err)?;
        if x1 - x0 < t_max * 0.06 {
            // Too narrow to name: its colour says it (see the legend of colours in the docs).
            continue;
        }
        chart
            .draw_series(std::iter::once(Text::new(
                span.phase.name(),
                (x0, y_max * 0.97),
                ("sans-serif", 12),
            )))
            .map_err(draw_err)?;
    }
    for ((name, color, _), points) in series {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(draw_err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)
}

fn present_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, t: &Timeline) -> Result<(), PlotError> {
    let t_max = t.samples.last().map_or(1.0, seconds).max(0.1);
    let total = t.pages_total.max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "pages present (%), connections down (red)",
            ("sans-serif", 15),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..101.0)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("seconds")
        .y_desc("% present")
        .draw()
        .map_err(draw_err)?;
    let present = t
        .samples
        .iter()
        .map(|s| (seconds(s), s.pages_present as f64 * 100.0 / total));
    chart
        .draw_series(LineSeries::new(present, BLACK.stroke_width(2)))
        .map_err(draw_err)?;
    let down = t
        .samples
        .iter()
        .filter(|s| s.totals.links_down > 0)
        .map(|s| {
            let x = seconds(s);
            let w = t.interval_ms as f64 / 1000.0;
            Rectangle::new([(x - w, 0.0), (x, 100.0)], RED.mix(0.3).filled())
        });
    chart.draw_series(down).map_err(draw_err)?;
    Ok(())
}

fn histogram_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    buckets: &[Bucket],
) -> Result<(), PlotError> {
    let n = buckets.len().max(1) as u32;
    let max = buckets.iter().map(|b| b.count).max().unwrap_or(0).max(1);
    let faults: u64 = buckets.iter().map(|b| b.count).sum();
    let caption = format!("fault latency, touch to resumption ({faults} faults)");
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0u32..n).into_segmented(), 0u64..max + max / 10 + 1)
        .map_err(draw_err)?;
    let label = |v: &SegmentValue<u32>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => buckets
            .get(*i as usize)
            .map_or(String::new(), |b| format!("≤{}", short_us(b.le_us))),
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(buckets.len().max(1))
        .x_label_formatter(&label)
        .x_desc("microseconds (log₂ buckets)")
        .y_desc("faults")
        .draw()
        .map_err(draw_err)?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style(RGBColor(31, 119, 180).filled())
                .margin(2)
                .data(buckets.iter().enumerate().map(|(i, b)| (i as u32, b.count))),
        )
        .map_err(draw_err)?;
    Ok(())
}

/// `1500000.0` → "1.5M", `2500.0` → "2.5k".
fn short_count(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.0}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// `1024` → "1ms", `64` → "64us".
fn short_us(us: u64) -> String {
    match us {
        0..=999 => format!("{us}us"),
        1000..=999_999 => format!("{}ms", us / 1000),
        _ => format!("{}s", us / 1_000_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dest::gauges::Totals;

    fn input() -> PlotInput {
        let mut t = Timeline {
            interval_ms: 100,
            pages_total: 1000,
            page_bytes: 4096,
            samples: Vec::new(),
        };
        for i in 0..20u64 {
            let phase = if i < 5 {
                Phase::Precopy
            } else {
                Phase::Postcopy
            };
            t.samples.push(Sample {
                t_ms: i * 100,
                phase,
                pages_present: i * 50,
                totals: Totals {
                    pages_by_precopy: i.min(5) * 50,
                    pages_by_stream: i.saturating_sub(5) * 40,
                    pages_by_fault: i.saturating_sub(5) * 10,
                    links_down: u64::from(i == 12),
                    ..Totals::default()
                },
            });
        }
        PlotInput {
            title: "a test migration".into(),
            timeline: t,
            fault_latency_histogram: vec![
                Bucket {
                    le_us: 64,
                    count: 3,
                },
                Bucket {
                    le_us: 128,
                    count: 10,
                },
                Bucket {
                    le_us: 256,
                    count: 1,
                },
            ],
        }
    }

    #[test]
    fn the_svg_holds_the_panels_the_phases_and_the_paths() {
        let svg = svg(&input()).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        for text in [
            "a test migration",
            "precopy",
            "postcopy",
            "stream",
            "fault",
            "≤128us",
            "14 faults",
        ] {
            assert!(svg.contains(text), "no {text:?} in the SVG");
        }
    }

    #[test]
    fn a_report_without_samples_is_refused() {
        assert!(matches!(
            svg(&PlotInput::default()),
            Err(PlotError::NoTimeline)
        ));
    }
}
