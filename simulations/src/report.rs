//! The run report: a Markdown summary with SVG plots a person can look at.

use std::fmt::Write as _;
use std::path::Path;

use crate::world::{Outcome, summary};
use crate::{Scenario, SimError};

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A cumulative distribution as an SVG line plot (x in hours).
fn cdf_svg(title: &str, series: &[(&str, &str, &[f64])]) -> String {
    let (w, h, pad) = (640.0, 360.0, 50.0);
    let max_x = series
        .iter()
        .flat_map(|(_, _, v)| v.iter())
        .fold(1.0f64, |m, x| m.max(*x / 3600.0));
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" text-anchor="middle" font-size="14">{title}</text>
<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">hours after the write</text>
<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">share of writes arrived</text>
"#,
        w / 2.0,
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        w / 2.0,
        h - 10.0,
        h / 2.0,
        h / 2.0
    );
    for k in 0..=4 {
        let x = pad + (w - 2.0 * pad) * f64::from(k) / 4.0;
        let y = h - pad - (h - 2.0 * pad) * f64::from(k) / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{x}" y="{}" text-anchor="middle">{:.0}</text><text x="{}" y="{}" text-anchor="end">{:.2}</text>"#,
            h - pad + 15.0,
            max_x * f64::from(k) / 4.0,
            pad - 5.0,
            y + 4.0,
            f64::from(k) / 4.0
        );
    }
    for (i, (label, color, values)) in series.iter().enumerate() {
        let mut v: Vec<f64> = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        // At most ~400 points: the plot looks the same and the file stays small.
        let step = (v.len() / 400).max(1);
        let points: Vec<String> = v
            .iter()
            .enumerate()
            .filter(|(k, _)| k % step == 0 || *k + 1 == v.len())
            .map(|(k, x)| {
                format!(
                    "{:.1},{:.1}",
                    pad + (w - 2.0 * pad) * (x / 3600.0) / max_x,
                    h - pad - (h - 2.0 * pad) * (k as f64 + 1.0) / n
                )
            })
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/><text x="{}" y="{}" fill="{color}">{label} (n = {})</text>"#,
            points.join(" "),
            w - pad - 200.0,
            h - pad - 20.0 - 16.0 * i as f64,
            v.len()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Bytes per device-day as a histogram on a log scale: one bin per half decade (1 B … the
/// largest value) plus one for days with nothing sent, one bar per series side by side, the
/// height the share of that series' device-days (so officers and hubs compare although there are
/// twenty times more officers).
fn bytes_svg(title: &str, series: &[(&str, &str, &[u64])]) -> String {
    let (w, h, pad) = (720.0, 380.0, 60.0);
    let max = series
        .iter()
        .flat_map(|(_, _, v)| v.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(10) as f64;
    // Bin 0: nothing sent; bin k ≥ 1: [10^((k-1)/2), 10^(k/2)).
    let bins = (max.log10() * 2.0).ceil() as usize + 1;
    let bin = |v: u64| {
        if v == 0 {
            0
        } else {
            ((v as f64).log10() * 2.0).floor() as usize + 1
        }
    };
    let shares: Vec<Vec<f64>> = series
        .iter()
        .map(|(_, _, values)| {
            let mut counts = vec![0usize; bins + 1];
            for v in values.iter() {
                counts[bin(*v).min(bins)] += 1;
            }
            let n = values.len().max(1) as f64;
            counts.iter().map(|c| *c as f64 / n).collect()
        })
        .collect();
    let top = shares.iter().flatten().copied().fold(0.01f64, f64::max);
    let slots = bins + 1;
    let bw = (w - 2.0 * pad) / slots as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" text-anchor="middle" font-size="14">{title}</text>
<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">bytes sent in a day (log scale; "0": nothing)</text>
<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">share of device-days</text>
<text x="{}" y="{}" text-anchor="end">{:.0}%</text>
<text x="{}" y="{}" text-anchor="end">0%</text>
"#,
        w / 2.0,
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        w / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0,
        pad - 5.0,
        pad + 4.0,
        top * 100.0,
        pad - 5.0,
        h - pad
    );
    let label = |k: usize| -> String {
        if k == 0 {
            return "0".into();
        }
        let v = 10f64.powf((k - 1) as f64 / 2.0);
        match v {
            v if v >= 1e6 => format!("{:.0}M", v / 1e6),
            v if v >= 1e3 => format!("{:.0}k", v / 1e3),
            v => format!("{v:.0}"),
        }
    };
    for k in 0..slots {
        if k == 0 || k % 2 == 1 {
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                pad + bw * k as f64 + if k == 0 { bw / 2.0 } else { 0.0 },
                h - pad + 15.0,
                label(k)
            );
        }
    }
    let n = series.len().max(1) as f64;
    for (i, ((name, color, values), share)) in series.iter().zip(&shares).enumerate() {
        for (k, s) in share.iter().enumerate() {
            let bh = (h - 2.0 * pad) * s / top;
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{color}"/>"#,
                pad + bw * k as f64 + bw * 0.9 * i as f64 / n,
                h - pad - bh,
                bw * 0.9 / n
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{color}" text-anchor="end">{name} ({} device-days)</text>"#,
            w - pad,
            pad + 16.0 * i as f64,
            values.len()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Writes `report.md`, `latency.svg` and `bytes.svg` into `dir`.
pub fn write(dir: &Path, sc: &Scenario, o: &Outcome) -> Result<(), SimError> {
    let err = |e: std::io::Error| SimError::Report(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut central = o.latency_central.clone();
    central.sort_by(f64::total_cmp);
    let mut village = o.latency_village.clone();
    village.sort_by(f64::total_cmp);
    std::fs::write(
        dir.join("latency.svg"),
        cdf_svg(
            "Time from a write to its arrival",
            &[
                ("at central", "#c0392b", &central),
                ("at the village's other officers", "#27ae60", &village),
            ],
        ),
    )
    .map_err(err)?;
    std::fs::write(
        dir.join("bytes.svg"),
        bytes_svg(
            "Bytes sent per device per day, by role",
            &[
                ("officers' phones", "#4a7bb7", &o.bytes_per_device_day),
                ("hubs", "#e67e22", &o.bytes_per_hub_day),
            ],
        ),
    )
    .map_err(err)?;
    let mut bytes = o.bytes_per_device_day.clone();
    bytes.sort_unstable();
    let hours = |v: &[f64], q: f64| quantile(v, q) / 3600.0;
    let mut md = format!(
        "# Simulation report: {} (seed {})\n\n{} hubs × {} officers ({} devices with central), {} days; run in {:.1} s.\n\n",
        sc.name,
        o.seed,
        sc.hubs,
        sc.officers_per_hub,
        sc.hubs * (sc.officers_per_hub + 1) + 1,
        sc.days,
        o.seconds
    );
    md.push_str(if o.passed() {
        "**Every invariant held.**\n\n"
    } else {
        "**Invariants violated:**\n\n"
    });
    for v in &o.violations {
        let _ = writeln!(md, "- {v}");
    }
    md.push_str("| figure | value |\n|---|---|\n");
    for (k, v) in summary(o) {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(
        md,
        "| latency to central: median / 90% / max | {:.1} / {:.1} / {:.1} h ({} writes arrived) |",
        hours(&central, 0.5),
        hours(&central, 0.9),
        hours(&central, 1.0),
        central.len()
    );
    let _ = writeln!(
        md,
        "| latency to the village's other officers: median / 90% / max | {:.1} / {:.1} / {:.1} h ({} arrivals) |",
        hours(&village, 0.5),
        hours(&village, 0.9),
        hours(&village, 1.0),
        village.len()
    );
    let _ = writeln!(
        md,
        "| bytes per device per day: median / 90% / max | {} / {} / {} |",
        bytes.get(bytes.len() / 2).copied().unwrap_or(0),
        bytes.get(bytes.len() * 9 / 10).copied().unwrap_or(0),
        bytes.last().copied().unwrap_or(0)
    );
    let mut hub_bytes = o.bytes_per_hub_day.clone();
    hub_bytes.sort_unstable();
    let _ = writeln!(
        md,
        "| bytes per hub per day: median / 90% / max | {} / {} / {} |",
        hub_bytes.get(hub_bytes.len() / 2).copied().unwrap_or(0),
        hub_bytes
            .get(hub_bytes.len() * 9 / 10)
            .copied()
            .unwrap_or(0),
        hub_bytes.last().copied().unwrap_or(0)
    );
    let _ = writeln!(md, "| trace | `{}` |", o.trace);
    md.push_str("\n![latency](latency.svg)\n\n![bytes per device per day](bytes.svg)\n");
    std::fs::write(dir.join("report.md"), md).map_err(err)?;
    Ok(())
}
