//! PNG line charts of training metrics (the loss curve, zero-shot accuracy over training).
//!
//! Drawn with `plotters` into an RGB buffer and encoded with the `image` crate the model
//! already uses (plotters' own encoder would pull in a second, older `image`). Text is set
//! in DejaVu Sans, embedded below and registered with plotters' `ab_glyph` font table, so
//! no system font is ever read: `data/DejaVuSans-subset.ttf` is DejaVu Sans 2.37 (Debian
//! `fonts-dejavu-core`) cut down to Latin, Greek, punctuation and maths symbols with
//! `pyftsubset` (the exact command and the licence are in `data/LICENSE-DejaVu`).

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// One line: its legend name and (x, y) points.
#[derive(Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// The embedded font (≈70 KB), registered once as plotters' "sans-serif" family, the family
/// that its captions, tick labels and legends use unless told otherwise.
const FONT: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/DejaVuSans-subset.ttf"));
const FAMILY: &str = "sans-serif";

/// Below this size there is no room for the axes, labels and legend.
const MIN_WIDTH: u32 = 160;
const MIN_HEIGHT: u32 = 120;

/// A series with fewer points than this also gets a marker at each point.
const MARKER_BELOW: usize = 30;

/// Tableau's ten categorical colours (matplotlib's default cycle); further series get
/// golden-angle hues so that any number of series stay distinct.
const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

fn series_color(i: usize) -> RGBColor {
    match PALETTE.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b),
        None => {
            // Golden-angle hues, alternately dark and light, past the ten fixed colours.
            let k = i - PALETTE.len();
            let hue = (k as f64 * 0.618_033_988_75 + 0.05).fract();
            let lightness = if k.is_multiple_of(2) { 0.32 } else { 0.58 };
            let (r, g, b) = HSLColor(hue, 0.75, lightness).rgb();
            RGBColor(r, g, b)
        }
    }
}

fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok()) {
        Ok(())
    } else {
        Err("the embedded chart font could not be parsed".to_string())
    }
}

/// Writes `text` into `image` with its top-left corner at `at`, `px` pixels high, in `colour`
/// (labels on the mask and edge pictures).
pub fn draw_text(
    image: &mut image::RgbImage,
    text: &str,
    at: (i32, i32),
    px: f64,
    colour: [u8; 3],
) -> Result<(), String> {
    ensure_font()?;
    let (w, h) = image.dimensions();
    let root = BitMapBackend::with_buffer(image.as_mut(), (w, h)).into_drawing_area();
    let style = (FAMILY, px).into_font().color(&RGBColor(colour[0], colour[1], colour[2]));
    root.draw_text(text, &style, at).map_err(|e| format!("drawing text: {e}"))?;
    root.present().map_err(|e| format!("drawing text: {e}"))
}

/// The finite runs of a series: a NaN or infinite point breaks the line rather than being
/// bridged over.
fn finite_runs(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for &(x, y) in points {
        if x.is_finite() && y.is_finite() {
            run.push((x, y));
        } else if !run.is_empty() {
            runs.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// `[lo, hi]` made fit for an axis: a range too narrow to tell from rounding noise (all
/// values equal, say) is opened around its value, `pad` (a fraction of the span) is added on
/// both sides, and the ends are kept within ±`f64::MAX` / 4 so the span stays finite.
fn axis_range(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    const LIMIT: f64 = f64::MAX / 4.0;
    let mag = lo.abs().max(hi.abs());
    let span = hi - lo;
    let (lo, hi) = if !span.is_finite() {
        (lo, hi)
    } else if span > mag * 1e-12 && span > 1e-200 {
        (lo - span * pad, hi + span * pad)
    } else {
        let half = if mag < 1e-200 { 1.0 } else { mag * 0.05 };
        (lo - half, hi + half)
    };
    (lo.max(-LIMIT), hi.min(LIMIT))
}

/// How the tick labels of one axis are written: fixed decimals enough for the tick spacing,
/// or exponent notation when the values are very large or very small.
struct TickFormat {
    step: f64,
    /// The largest magnitude among the ticks.
    max: f64,
    exponent: bool,
}

impl TickFormat {
    /// The format for the ticks plotters puts on `lo..hi` when asked for at most `n`.
    fn new(lo: f64, hi: f64, n: usize) -> Self {
        let ticks = RangedCoordf64::from(lo..hi).key_points(n);
        let step = ticks.windows(2).map(|w| w[1] - w[0]).fold(f64::INFINITY, f64::min);
        let step = if step.is_finite() && step > 0.0 { step } else { (hi - lo).abs() };
        let max = ticks.iter().fold(0f64, |m, v| m.max(v.abs()));
        Self { step, max, exponent: max >= 1e7 || (max > 0.0 && max < 1e-3) }
    }

    fn label(&self, v: f64) -> String {
        // The step's leading decimal place: 0.05 → -2, 20 → 1 (the 1e-9 keeps log10(1000),
        // which comes out a hair under 3, at 3).
        let step_digits = (self.step.log10() + 1e-9).floor();
        if v.abs() < self.step * 1e-6 {
            return "0".to_string();
        }
        if self.exponent {
            // One exponent for the whole axis (that of the largest tick), so labels line up:
            // 1.0e-4, 0.8e-4, …
            let exp = (self.max.log10() + 1e-9).floor();
            let prec = (exp - step_digits).clamp(0.0, 12.0) as usize;
            return format!("{:.prec$}e{}", v / 10f64.powf(exp), exp as i32);
        }
        let decimals = (-step_digits).clamp(0.0, 9.0) as usize;
        format!("{v:.decimals$}")
    }
}

/// Where the legend covers the fewest data: counts samples along every line in each corner
/// box of `box_w` × `box_h` (fractions of the plotting area).
fn legend_corner(
    runs: &[Vec<Vec<(f64, f64)>>],
    x: (f64, f64),
    y: (f64, f64),
    box_w: f64,
    box_h: f64,
) -> SeriesLabelPosition {
    use SeriesLabelPosition::{LowerLeft, LowerRight, UpperLeft, UpperRight};
    let norm = |(px, py): (f64, f64)| ((px - x.0) / (x.1 - x.0), (py - y.0) / (y.1 - y.0));
    let mut counts = [0usize; 4]; // UpperRight, UpperLeft, LowerRight, LowerLeft
    let mut count = |(u, v): (f64, f64)| {
        let right = u >= 1.0 - box_w;
        let left = u <= box_w;
        let top = v >= 1.0 - box_h;
        let bottom = v <= box_h;
        for (i, hit) in [top && right, top && left, bottom && right, bottom && left].into_iter().enumerate() {
            counts[i] += usize::from(hit);
        }
    };
    for run in runs.iter().flatten() {
        let mut prev = None;
        for &p in run {
            let (u, v) = norm(p);
            if let Some((pu, pv)) = prev {
                const SAMPLES: usize = 16;
                for k in 1..SAMPLES {
                    let t = k as f64 / SAMPLES as f64;
                    count((pu + (u - pu) * t, pv + (v - pv) * t));
                }
            }
            count((u, v));
            prev = Some((u, v));
        }
    }
    let best = (0..4).min_by_key(|&i| counts[i]).unwrap_or(0);
    [UpperRight, UpperLeft, LowerRight, LowerLeft][best].clone()
}

/// Draws the series as lines (with markers when a series has < 30 points) on one chart with
/// axes, ticks with numeric labels, axis labels, a title and a legend; writes a PNG of
/// width × height pixels. Err(String) naming the path on I/O failure, or if there is nothing to plot.
///
/// A NaN or infinite point is left out and breaks its line; a series with no finite point is
/// left out of the chart and the legend. The y axis gets 5% headroom, and an axis whose values
/// are all equal is opened around them. The legend goes in the emptiest corner. Sizes under
/// 160 × 120 are an error.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> Result<(), String> {
    let fail = |what: &str| format!("chart {}: {what}", path.display());
    let buf = render(title, x_label, y_label, series, (width, height), false).map_err(|e| fail(&e))?;
    save(path, &buf, width, height)
}

/// One chart per entry of `charts` (title, series), stacked top to bottom, each `width` ×
/// `height` with its legend right of the plot, outside the data (so that no line hides under
/// it): `zeroshot.png`, one chart per data set. Errors as [`line_chart`]'s.
pub fn stacked_line_charts(
    path: &Path,
    charts: &[(String, Vec<Series>)],
    x_label: &str,
    y_label: &str,
    width: u32,
    height: u32,
) -> Result<(), String> {
    let fail = |what: &str| format!("chart {}: {what}", path.display());
    let mut buf = Vec::new();
    for (title, series) in charts {
        buf.extend(render(title, x_label, y_label, series, (width, height), true).map_err(|e| fail(&e))?);
    }
    if charts.is_empty() {
        return Err(fail("nothing to plot (no chart)"));
    }
    save(path, &buf, width, height * charts.len() as u32)
}

fn save(path: &Path, buf: &[u8], width: u32, height: u32) -> Result<(), String> {
    image::save_buffer_with_format(path, buf, width, height, image::ExtendedColorType::Rgb8, image::ImageFormat::Png)
        .map_err(|e| format!("chart {}: writing the PNG failed: {e}", path.display()))
}

/// The RGB pixels of one chart (see [`line_chart`]); the legend right of the plot when
/// `legend_right`, else in the emptiest corner. Errors say what is wrong, without the path.
fn render(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    (width, height): (u32, u32),
    legend_right: bool,
) -> Result<Vec<u8>, String> {
    let fail = |what: &str| what.to_string();

    let runs: Vec<Vec<Vec<(f64, f64)>>> = series.iter().map(|s| finite_runs(&s.points)).collect();
    let markers: Vec<bool> = runs.iter().map(|r| r.iter().map(Vec::len).sum::<usize>() < MARKER_BELOW).collect();
    let mut finite = runs.iter().flatten().flatten().peekable();
    if finite.peek().is_none() {
        return Err(fail("nothing to plot (no series with a finite point)"));
    }
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in finite {
        x_lo = x_lo.min(x);
        x_hi = x_hi.max(x);
        y_lo = y_lo.min(y);
        y_hi = y_hi.max(y);
    }
    // Lines run edge to edge in x; markers get a little room so they are not cut in half.
    let x_pad = if markers.iter().zip(&runs).any(|(&m, r)| m && !r.is_empty()) { 0.02 } else { 0.0 };
    let (x_lo, x_hi) = axis_range(x_lo, x_hi, x_pad);
    let (y_lo, y_hi) = axis_range(y_lo, y_hi, 0.05);

    if width < MIN_WIDTH || height < MIN_HEIGHT {
        return Err(fail(&format!("{width}×{height} is too small for a chart (at least {MIN_WIDTH}×{MIN_HEIGHT})")));
    }
    let len = (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(3))
        .ok_or_else(|| fail(&format!("{width}×{height} is too large")))?;
    ensure_font().map_err(|e| fail(&e))?;

    // Text, lines and margins follow the smaller side, so small and large charts both read well.
    let unit = (width.min(height) as f64 / 600.0).clamp(0.75, 3.0);
    let px = |v: f64| (v * unit).round() as u32;
    let font_px = px(16.0);
    let label_font = (FAMILY, font_px as f64);
    let margin = px(14.0);
    let caption = px(22.0);
    let x_area = 3 * font_px + px(6.0);

    let mut buf = vec![255u8; len];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        let draw_err = |e: &dyn std::fmt::Display| fail(&format!("drawing failed: {e}"));
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let text_w = |s: &str| root.estimate_text_size(s, &label_font.into_text_style(&root)).map_or(0, |(w, _)| w);
        let stroke = px(2.0).max(1);
        let radius = px(3.5).max(2) as i32;
        let sample = px(28.0) as i32;
        // The series with a finite point, by index: those the legend lists.
        let listed: Vec<usize> = (0..series.len()).filter(|&i| !runs[i].is_empty()).collect();
        let legend_w = listed.iter().map(|&i| text_w(&series[i].name)).max().unwrap_or(0) + sample as u32 + 4 * font_px;
        let right = if legend_right { legend_w } else { 0 };

        // Tick counts that leave room for the labels: a y tick every 2 em, an x tick every 5.
        let plot_h = height.saturating_sub(x_area + caption + 3 * margin).max(1);
        let n_y = ((plot_h / (font_px * 2).max(1)) as usize).clamp(2, 10);
        let y_fmt = TickFormat::new(y_lo, y_hi, n_y);
        let y_ticks = RangedCoordf64::from(y_lo..y_hi).key_points(n_y);
        let y_tick_w = y_ticks.iter().map(|&v| text_w(&y_fmt.label(v))).max().unwrap_or(0);
        let y_area = y_tick_w + 2 * font_px + px(10.0);
        let plot_w = width.saturating_sub(y_area + 2 * margin + right).max(1);
        let n_x = ((plot_w / (font_px * 5).max(1)) as usize).clamp(2, 10);
        let x_fmt = TickFormat::new(x_lo, x_hi, n_x);
        let x_label_fn = |v: &f64| x_fmt.label(*v);
        // Room on the right for half of the last x label, which is centred on its tick.
        let x_ticks = RangedCoordf64::from(x_lo..x_hi).key_points(n_x);
        let last_x_w = x_ticks.last().map_or(0, |&v| text_w(&x_fmt.label(v)));
        let y_label_fn = |v: &f64| y_fmt.label(*v);

        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, caption as f64))
            .margin(margin)
            .margin_right(margin.max(last_x_w / 2 + px(4.0)) + right)
            .x_label_area_size(x_area)
            .y_label_area_size(y_area)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
            .map_err(|e| draw_err(&e))?;
        chart
            .configure_mesh()
            .x_labels(n_x)
            .y_labels(n_y)
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(label_font)
            .axis_desc_style(label_font)
            .x_label_formatter(&x_label_fn)
            .y_label_formatter(&y_label_fn)
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(205, 205, 205))
            .draw()
            .map_err(|e| draw_err(&e))?;

        for (i, ((s, runs), &marked)) in series.iter().zip(&runs).zip(&markers).enumerate() {
            if runs.is_empty() {
                continue;
            }
            let color = series_color(i);
            let line = color.stroke_width(stroke);
            chart
                .draw_series(runs.iter().map(|run| PathElement::new(run.clone(), line)))
                .map_err(|e| draw_err(&e))?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    let dot = if marked { color.filled() } else { TRANSPARENT.filled() };
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (sample, 0)], line)
                        + Circle::new((sample / 2, 0), radius, dot)
                });
            if marked {
                chart
                    .draw_series(runs.iter().flatten().map(|&p| Circle::new(p, radius, color.filled())))
                    .map_err(|e| draw_err(&e))?;
            }
        }

        let row_h = font_px + px(10.0);
        if legend_right {
            // A column right of the plot, from its top: line (and marker) sample, then the name.
            let x0 = width.saturating_sub(legend_w) as i32 + px(8.0) as i32;
            for (k, &i) in listed.iter().enumerate() {
                let y = (caption + 2 * margin + font_px + k as u32 * row_h) as i32;
                let color = series_color(i);
                root.draw(&PathElement::new(vec![(x0, y), (x0 + sample, y)], color.stroke_width(stroke)))
                    .map_err(|e| draw_err(&e))?;
                if markers[i] {
                    root.draw(&Circle::new((x0 + sample / 2, y), radius, color.filled())).map_err(|e| draw_err(&e))?;
                }
                let at = (x0 + sample + px(6.0) as i32, y - font_px as i32 / 2);
                root.draw_text(&series[i].name, &label_font.into_text_style(&root), at).map_err(|e| draw_err(&e))?;
            }
        } else {
            // The legend goes in the corner the lines leave most empty.
            let legend_h = listed.len() as u32 * row_h + 2 * font_px;
            let corner = legend_corner(
                &runs,
                (x_lo, x_hi),
                (y_lo, y_hi),
                legend_w as f64 / plot_w as f64,
                legend_h as f64 / plot_h as f64,
            );
            chart
                .configure_series_labels()
                .label_font(label_font)
                .legend_area_size(sample as u32 + px(8.0))
                .margin(px(12.0))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .position(corner)
                .draw()
                .map_err(|e| draw_err(&e))?;
        }
        root.present().map_err(|e| draw_err(&e))?;
    }

    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_series() -> Vec<Series> {
        vec![
            Series {
                name: "train loss".into(),
                points: (0..200).map(|i| (i as f64, 5.0 * (-(i as f64) / 60.0).exp() + 0.3)).collect(),
            },
            Series {
                name: "val loss".into(),
                points: (0..10).map(|i| (i as f64 * 20.0, 5.2 * (-(i as f64) / 3.2).exp() + 0.5)).collect(),
            },
        ]
    }

    #[test]
    fn writes_png_with_both_series_colours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        line_chart(&path, "Loss", "step", "loss", &two_series(), 640, 480).unwrap();

        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 480));
        let first = *img.get_pixel(0, 0);
        assert!(img.pixels().any(|p| *p != first), "chart is a single colour");
        for i in 0..2 {
            let RGBColor(r, g, b) = series_color(i);
            let n = img.pixels().filter(|p| p.0 == [r, g, b]).count();
            assert!(n > 50, "series {i} colour ({r}, {g}, {b}) found on {n} pixels");
        }
    }

    #[test]
    fn stacked_charts_keep_their_legends_outside_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zeroshot.png");
        let charts = [("a".to_string(), two_series()), ("b".to_string(), two_series()[..1].to_vec())];
        stacked_line_charts(&path, &charts, "epoch", "top-1", 640, 360).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 720));
        // Each chart: its lines left, and right of the plot (the last 200 px: the names are
        // short) a legend column with the colours of its series, and only those.
        let legend_x = 640 - 200;
        for (chart, n) in [(0u32, 2usize), (1, 1)] {
            for i in 0..2 {
                let RGBColor(r, g, b) = series_color(i);
                let count = |xs: std::ops::Range<u32>| {
                    xs.flat_map(|x| (chart * 360..(chart + 1) * 360).map(move |y| (x, y)))
                        .filter(|&(x, y)| img.get_pixel(x, y).0 == [r, g, b])
                        .count()
                };
                assert_eq!(count(legend_x..640) > 0, i < n, "chart {chart}, series {i} in the legend");
                assert_eq!(count(0..legend_x) > 50, i < n, "chart {chart}, series {i} drawn");
            }
        }
    }

    #[test]
    fn empty_series_list_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.png");
        assert!(line_chart(&path, "t", "x", "y", &[], 320, 240).is_err());
        let no_points = [Series { name: "none".into(), points: vec![] }];
        assert!(line_chart(&path, "t", "x", "y", &no_points, 320, 240).is_err());
        assert!(line_chart(&path, "t", "x", "y", &two_series(), 100, 50).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("chart.png");
        let err = line_chart(&path, "t", "x", "y", &two_series(), 320, 240).unwrap_err();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn degenerate_inputs_still_draw() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("single", vec![(3.0, 0.25)]),
            ("flat", vec![(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)]),
            ("zeros", vec![(0.0, 0.0), (5.0, 0.0)]),
            ("gaps", vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, f64::INFINITY), (f64::NAN, 2.0), (3.0, 0.5)]),
        ];
        for (name, points) in cases {
            let path = dir.path().join(format!("{name}.png"));
            let series = [Series { name: name.into(), points }];
            line_chart(&path, name, "x", "y", &series, 320, 240).unwrap();
            let img = image::open(&path).unwrap().to_rgb8();
            let RGBColor(r, g, b) = series_color(0);
            assert!(img.pixels().any(|p| p.0 == [r, g, b]), "{name}: series not drawn");
        }
        let all_nan = [Series { name: "nan".into(), points: vec![(f64::NAN, 1.0), (1.0, f64::NAN)] }];
        assert!(line_chart(&dir.path().join("nan.png"), "t", "x", "y", &all_nan, 320, 240).is_err());
    }

    #[test]
    fn axis_ranges_are_never_empty() {
        assert_eq!(axis_range(0.0, 0.0, 0.05), (-1.0, 1.0));
        let (lo, hi) = axis_range(0.42, 0.42, 0.05);
        assert!(lo < 0.42 && 0.42 < hi && (hi - lo - 0.042).abs() < 1e-12);
        assert_eq!(axis_range(0.0, 10.0, 0.05), (-0.5, 10.5));
        assert_eq!(axis_range(0.0, 10.0, 0.0), (0.0, 10.0));
        let (lo, hi) = axis_range(-f64::MAX, f64::MAX, 0.05);
        assert!((hi - lo).is_finite() && lo < hi);
    }

    #[test]
    fn palette_is_distinct() {
        let colors: Vec<_> = (0..40)
            .map(|i| {
                let RGBColor(r, g, b) = series_color(i);
                (r, g, b)
            })
            .collect();
        for (i, a) in colors.iter().enumerate() {
            assert!(!colors[..i].contains(a), "colour {i} repeats");
        }
    }

    #[test]
    fn tick_labels() {
        let f = TickFormat::new(0.0, 1.0, 10);
        assert_eq!([0.0, 0.3, 1.0].map(|v| f.label(v)), ["0", "0.3", "1.0"].map(String::from));
        assert_eq!(f.label(-1e-17), "0");
        let f = TickFormat::new(0.0, 0.3, 10);
        assert_eq!(f.label(0.25), "0.25");
        let f = TickFormat::new(0.0, 20000.0, 10);
        assert_eq!(f.label(14000.0), "14000");
        let f = TickFormat::new(0.0, 1.05e-4, 10);
        assert_eq!(f.label(1e-4), "1.0e-4");
        assert_eq!(f.label(8e-5), "0.8e-4");
        let f = TickFormat::new(0.0, 1e8, 10);
        assert_eq!(f.label(2e7), "0.2e8");
        let f = TickFormat::new(-3.0, -1.0, 10);
        assert_eq!(f.label(-2.5), "-2.5");
    }

    #[test]
    fn legend_avoids_the_data() {
        let rising = vec![vec![(0..50).map(|i| (i as f64, 1.0 - (-(i as f64) / 5.0).exp())).collect()]];
        let pos = legend_corner(&rising, (0.0, 49.0), (0.0, 1.0), 0.3, 0.2);
        assert!(matches!(pos, SeriesLabelPosition::LowerRight), "{pos:?}");
        let falling = vec![vec![(0..50).map(|i| (i as f64, 1.0 / (1.0 + i as f64))).collect()]];
        let pos = legend_corner(&falling, (0.0, 49.0), (0.0, 1.0), 0.3, 0.2);
        assert!(matches!(pos, SeriesLabelPosition::UpperRight), "{pos:?}");
    }
}
