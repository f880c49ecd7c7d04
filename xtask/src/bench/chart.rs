//! `bench.png`: one small bar chart per key figure, a bar per mode and
//! placement (the median across rounds; unpinned in a lighter shade) with
//! a whisker from min to max, all with the run's first GRO setting.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{FIGURES, Figure, figure_stats};
use super::results::Results;
use super::testbed::Mode;
use super::workloads::Variant;

/// Read at run time (fonts-dejavu-core, which setup installs), so xtask
/// itself compiles on a machine without it.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT_NAME: &str = "sans-serif";

/// The panels: (workload, metric) of [`FIGURES`], and a title that fits.
const PANELS: &[(&str, &str, &str)] = &[
    ("tcp-1", "gbps", "TCP 1 stream, Gbit/s"),
    ("tcp-4", "gbps", "TCP 4 streams, Gbit/s"),
    ("udp-64", "kpps", "UDP 64 B delivered, kpps"),
    ("udp-1400", "kpps", "UDP 1400 B delivered, kpps"),
    ("rr", "rr_per_s", "TCP RR 64 B, transactions/s"),
    ("rr", "p50_us", "RR round trip p50, µs"),
    ("rr", "p99_us", "RR round trip p99, µs"),
    ("tcp-1", "cpu_s_per_gbit", "CPU cores per Gbit/s, TCP 1"),
];
const SIZE: (u32, u32) = (1800, 760);

pub fn load_font() -> Result<&'static [u8]> {
    let bytes = std::fs::read(FONT)
        .with_context(|| format!("read {FONT} (install fonts-dejavu-core: `cargo xtask setup`)"))?;
    Ok(Box::leak(bytes.into_boxed_slice()))
}

fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Bare => RGBColor(150, 150, 150),
        Mode::Routed => RGBColor(60, 110, 200),
        Mode::KernelVxlan => RGBColor(230, 140, 40),
        Mode::NetdTc => RGBColor(40, 160, 80),
        Mode::NetdXdp => RGBColor(20, 100, 50),
        Mode::EgressPlain => RGBColor(150, 90, 180),
        Mode::EgressNat => RGBColor(100, 40, 140),
        Mode::CiliumStyle => RGBColor(200, 60, 60),
    }
}

fn short_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Bare => "bare",
        Mode::Routed => "routed",
        Mode::KernelVxlan => "k-vxlan",
        Mode::NetdTc => "netd-tc",
        Mode::NetdXdp => "netd-xdp",
        Mode::EgressPlain => "egr-plain",
        Mode::EgressNat => "egr-nat",
        Mode::CiliumStyle => "cilium",
    }
}

pub fn draw(path: &Path, results: &Results, font: &'static [u8]) -> Result<()> {
    plotters::style::register_font(FONT_NAME, FontStyle::Normal, font)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw_into(&mut rgb, results)?;
    write_indexed_png(path, &rgb)
}

fn draw_into(rgb: &mut [u8], results: &Results) -> Result<()> {
    let root = BitMapBackend::with_buffer(rgb, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let m = &results.meta.machine;
    let primary = results.primary();
    let placements: Vec<Variant> = results
        .variants()
        .into_iter()
        .filter(|v| v.gro == primary.gro)
        .collect();
    let title = format!(
        "netd vs kernel VXLAN, routing, bare — {} × {}, kernel {}, {} rounds × {} s, GRO {}; bar: median ({}), whisker: min–max",
        m.cores,
        m.cpu_model,
        m.kernel,
        results.meta.rounds.max(1),
        results.meta.seconds,
        primary.gro.name(),
        placements
            .iter()
            .enumerate()
            .map(|(i, v)| format!(
                "{} {}",
                if i == 0 { "dark" } else { "light" },
                v.placement.name()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (head, body) = root.split_vertically(36);
    head.draw_text(&title, &(FONT_NAME, 16).into_font().color(&BLACK), (12, 10))
        .map_err(err)?;
    let bars: Vec<(Mode, Variant, bool)> = results
        .modes
        .iter()
        .flat_map(|m| {
            placements
                .iter()
                .enumerate()
                .map(move |(i, v)| (m.mode, *v, i > 0))
        })
        .collect();
    for (area, (workload, metric, title)) in body.split_evenly((2, 4)).iter().zip(PANELS) {
        let Some(f) = FIGURES
            .iter()
            .find(|f| f.workload == *workload && f.metric == *metric)
        else {
            continue;
        };
        panel(area, results, &bars, f, title)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotters: {e:?}")
}

/// A bar per (mode, variant); `light` for every placement after the first.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    results: &Results,
    bars: &[(Mode, Variant, bool)],
    f: &Figure,
    title: &str,
) -> Result<()> {
    let stats: Vec<_> = bars
        .iter()
        .map(|&(m, v, _)| figure_stats(results, m, f, v))
        .collect();
    let top = stats
        .iter()
        .flatten()
        .map(|s| s.max)
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.2;
    // A segmented 0..k range has k + 1 slots.
    let last = (bars.len() as u32).saturating_sub(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT_NAME, 14))
        .margin(8)
        .x_label_area_size(22)
        .y_label_area_size(46)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .y_labels(6)
        .x_labels(bars.len())
        .x_label_formatter(&|x| match x {
            // One label per mode, under its first bar.
            SegmentValue::CenterOf(i) => bars
                .get(*i as usize)
                .filter(|(_, _, light)| !light)
                .map_or("", |(m, _, _)| short_name(*m))
                .to_string(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| axis_label(*v))
        .label_style((FONT_NAME, 11))
        .draw()
        .map_err(err)?;
    for (i, ((mode, _, light), st)) in bars.iter().zip(&stats).enumerate() {
        let Some(st) = st else { continue };
        let i = i as u32;
        let c = if *light {
            lighter(color(*mode))
        } else {
            color(*mode)
        };
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), st.median),
            ],
            c.filled(),
        );
        bar.set_margin(0, 0, 3, 3);
        chart.draw_series(std::iter::once(bar)).map_err(err)?;
        let whisker = PathElement::new(
            vec![
                (SegmentValue::CenterOf(i), st.min),
                (SegmentValue::CenterOf(i), st.max),
            ],
            BLACK.stroke_width(2),
        );
        chart.draw_series(std::iter::once(whisker)).map_err(err)?;
        let label = Text::new(
            value_label(st.median),
            (
                SegmentValue::CenterOf(i),
                st.max.max(st.median) + top * 0.02,
            ),
            (FONT_NAME, 9)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        );
        chart.draw_series(std::iter::once(label)).map_err(err)?;
    }
    Ok(())
}

/// Halfway to white.
fn lighter(c: RGBColor) -> RGBColor {
    let up = |x: u8| x + (255 - x) / 2;
    RGBColor(up(c.0), up(c.1), up(c.2))
}

/// Tick labels without needless decimals: 20000, 2.5, 0.05.
fn axis_label(v: f64) -> String {
    if v == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn value_label(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// An 8-bit palette PNG: a few times smaller than RGB for a chart of flat
/// colours.
fn write_indexed_png(path: &Path, rgb: &[u8]) -> Result<()> {
    let (palette, indices) = quantize(rgb);
    let file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    let mut encoder = png::Encoder::new(file, SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(palette.concat());
    encoder.set_compression(png::Compression::Best);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&indices)?;
    writer.finish()?;
    Ok(())
}

/// At most 256 colours: the most frequent exactly, any others (faint
/// anti-aliasing shades) mapped to the nearest of those.
fn quantize(rgb: &[u8]) -> (Vec<[u8; 3]>, Vec<u8>) {
    let mut counts: HashMap<[u8; 3], usize> = HashMap::new();
    for px in rgb.chunks_exact(3) {
        *counts.entry([px[0], px[1], px[2]]).or_default() += 1;
    }
    let mut by_count: Vec<([u8; 3], usize)> = counts.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let palette: Vec<[u8; 3]> = by_count.iter().take(256).map(|(c, _)| *c).collect();
    let index: HashMap<[u8; 3], u8> = by_count
        .iter()
        .map(|(c, _)| (*c, nearest(&palette, *c)))
        .collect();
    let indices = rgb
        .chunks_exact(3)
        .map(|px| index[&[px[0], px[1], px[2]]])
        .collect();
    (palette, indices)
}

fn nearest(palette: &[[u8; 3]], c: [u8; 3]) -> u8 {
    let dist = |p: &[u8; 3]| -> i32 {
        (0..3)
            .map(|i| (i32::from(p[i]) - i32::from(c[i])).pow(2))
            .sum()
    };
    (0..palette.len())
        .min_by_key(|&i| dist(&palette[i]))
        .unwrap_or(0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_keeps_few_colours_exact_and_maps_the_rest() {
        let mut rgb = Vec::new();
        for i in 0..300u32 {
            // 300 distinct greys, white the most frequent.
            let g = (i % 256) as u8;
            rgb.extend_from_slice(&[g, g, if i < 256 { g } else { 1 }]);
        }
        rgb.extend_from_slice(&[255; 30]);
        let (palette, indices) = quantize(&rgb);
        assert_eq!(palette.len(), 256);
        assert_eq!(palette[0], [255, 255, 255]);
        assert_eq!(indices.len(), rgb.len() / 3);
        assert_eq!(
            palette[indices[indices.len() - 1] as usize],
            [255, 255, 255]
        );
    }
}
