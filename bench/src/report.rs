//! The run's results as Markdown, JSON and one SVG bar chart per scenario.
//!
//! The charts are written directly as SVG (bars, labels, values): a few dozen lines
//! instead of a plotting library and its font stack.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use crate::run::Scenario;

/// Where and on what the run happened.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `uname -srm`.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// CPUs online.
    pub cpus: usize,
    /// When (UTC, from `date`).
    pub date: String,
}

impl Machine {
    /// This machine, now.
    pub fn here() -> Self {
        let sh = |cmd: &str| {
            std::process::Command::new("sh")
                .args(["-c", cmd])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        Machine {
            kernel: sh("uname -srm"),
            cpu: sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            date: sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        }
    }
}

/// Writes `results.md`, `results.json` and `<scenario>.svg` into `dir`.
pub fn write(dir: &Path, machine: &Machine, scenarios: &[Scenario]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.md"), markdown(machine, scenarios))?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "machine": machine,
            "scenarios": scenarios,
        }))?,
    )?;
    for scenario in scenarios {
        std::fs::write(dir.join(format!("{}.svg", scenario.id)), svg(scenario))?;
    }
    Ok(())
}

/// The Markdown report: one table per scenario, paths as rows.
pub fn markdown(machine: &Machine, scenarios: &[Scenario]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Bench results\n\n{} · {} × {} · {}\n",
        machine.kernel, machine.cpus, machine.cpu, machine.date
    );
    for s in scenarios {
        let _ = writeln!(md, "## {}\n\n{}\n", s.title, s.method);
        let _ = write!(md, "| path |");
        for (_, heading) in &s.columns {
            let _ = write!(md, " {heading} |");
        }
        let _ = write!(md, "\n|---|");
        for _ in &s.columns {
            let _ = write!(md, "---:|");
        }
        md.push('\n');
        for row in &s.rows {
            let _ = write!(md, "| {} |", row.path.name());
            match &row.error {
                Some(e) => {
                    let _ = write!(md, " not measured: {} |", one_line(e));
                    for _ in 1..s.columns.len() {
                        md.push_str(" |");
                    }
                }
                None => {
                    for (key, _) in &s.columns {
                        match row.figures.get(key) {
                            Some(v) => {
                                let _ = write!(md, " {} |", number(*v));
                            }
                            None => md.push_str(" – |"),
                        }
                    }
                }
            }
            md.push('\n');
        }
        let _ = writeln!(md, "\n![{}]({}.svg)\n", s.title, s.id);
    }
    md
}

fn one_line(text: &str) -> String {
    let mut line = text.lines().next().unwrap_or_default().replace('|', "/");
    if line.len() > 160 {
        let mut end = 160;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

/// A figure with sensible precision.
fn number(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A horizontal bar chart of the scenario's chart figure, one bar per measured path.
pub fn svg(s: &Scenario) -> String {
    let heading = s
        .columns
        .iter()
        .find(|(k, _)| *k == s.chart)
        .map_or(s.chart.as_str(), |(_, h)| h.as_str());
    let bars: Vec<(&str, Option<f64>)> = s
        .rows
        .iter()
        .map(|r| (r.path.name(), r.figures.get(&s.chart).copied()))
        .collect();
    let max = bars
        .iter()
        .filter_map(|(_, v)| *v)
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let (label_w, bar_w, row_h, top) = (150.0, 420.0, 26.0, 40.0);
    let width = label_w + bar_w + 90.0;
    let height = top + row_h * bars.len() as f64 + 10.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}: {}</text>\n",
        escape(&s.title),
        escape(heading)
    );
    for (i, (name, value)) in bars.iter().enumerate() {
        let y = top + row_h * i as f64;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            label_w - 8.0,
            y + 17.0,
            escape(name)
        );
        match value {
            Some(v) => {
                let w = (v / max * bar_w).max(1.0);
                let fill = if name.starts_with("ours") {
                    "#d9480f"
                } else {
                    "#1c7ed6"
                };
                let _ = writeln!(
                    svg,
                    "<rect x=\"{label_w}\" y=\"{}\" width=\"{w:.1}\" height=\"{}\" fill=\"{fill}\"/>\
                     <text x=\"{:.1}\" y=\"{}\">{}</text>",
                    y + 4.0,
                    row_h - 8.0,
                    label_w + w + 6.0,
                    y + 17.0,
                    number(*v)
                );
            }
            None => {
                let _ = writeln!(
                    svg,
                    "<text x=\"{label_w}\" y=\"{}\" fill=\"#868e96\">not measured</text>",
                    y + 17.0
                );
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{paths::PathKind, run::Row};

    fn sample() -> Scenario {
        Scenario {
            id: "latency".into(),
            title: "Latency <64 B>".into(),
            method: "m".into(),
            columns: vec![("p50_us".into(), "p50 µs".into())],
            chart: "p50_us".into(),
            rows: vec![
                Row {
                    path: PathKind::Direct,
                    figures: BTreeMap::from([("p50_us".into(), 40.0)]),
                    error: None,
                },
                Row {
                    path: PathKind::Ours,
                    figures: BTreeMap::from([("p50_us".into(), 180.5)]),
                    error: None,
                },
                Row {
                    path: PathKind::Bore,
                    figures: BTreeMap::new(),
                    error: Some("bore: cargo install bore-cli failed | x".into()),
                },
            ],
        }
    }

    #[test]
    fn the_table_has_every_path_and_says_why_one_is_missing() {
        let md = markdown(
            &Machine {
                kernel: "Linux".into(),
                cpu: "cpu".into(),
                cpus: 2,
                date: "d".into(),
            },
            &[sample()],
        );
        assert!(md.contains("| direct TCP | 40 |"), "{md}");
        assert!(md.contains("| ours (QUIC) | 180 |"), "{md}");
        assert!(
            md.contains("| bore | not measured: bore: cargo install bore-cli failed / x |"),
            "{md}"
        );
    }

    #[test]
    fn bars_scale_to_the_largest_value_and_text_is_escaped() {
        let svg = svg(&sample());
        assert!(svg.contains("Latency &lt;64 B&gt;"), "{svg}");
        assert!(svg.contains("width=\"420.0\""), "{svg}"); // the largest bar is full width
        assert!(svg.contains("width=\"93.1\""), "{svg}"); // 40 / 180.5 of it
        assert!(svg.contains("not measured"), "{svg}");
    }
}
