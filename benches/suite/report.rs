//! What a run produces: the results as JSON, `benchmarks.md`, and a latency-distribution
//! chart (SVG, drawn here: no plotting dependency for a few polylines).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::stats::Summary;

/// A whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub generated_at: String,
    pub machine: Machine,
    pub database: String,
    pub profile: &'static str,
    pub smoke: bool,
    pub commit: Option<String>,
    pub scenarios: Vec<Scenario>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0.0);
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// One scenario's outcome.
#[derive(Debug, Default, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub title: &'static str,
    /// How it was measured, in a sentence or three.
    pub method: String,
    pub rows: Vec<Row>,
    /// Latency samples for the chart.
    pub series: Vec<Series>,
    pub notes: Vec<String>,
    /// Why it did not run, when it did not.
    pub skipped: Option<String>,
    pub seconds: f64,
}

/// A figure, its same-run reference, and its target.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    pub reference: Option<f64>,
    pub reference_label: Option<String>,
    pub target: Option<Target>,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    AtMost,
    AtLeast,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Target {
    pub op: Op,
    pub value: f64,
}

impl Row {
    pub fn new(metric: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Self {
            metric: metric.into(),
            value,
            unit,
            reference: None,
            reference_label: None,
            target: None,
            met: None,
        }
    }

    pub fn reference(mut self, label: impl Into<String>, value: f64) -> Self {
        self.reference = Some(value);
        self.reference_label = Some(label.into());
        self
    }

    pub fn at_most(self, value: f64) -> Self {
        self.target(Op::AtMost, value)
    }

    pub fn at_least(self, value: f64) -> Self {
        self.target(Op::AtLeast, value)
    }

    fn target(mut self, op: Op, value: f64) -> Self {
        self.met = Some(match op {
            Op::AtMost => self.value <= value,
            Op::AtLeast => self.value >= value,
        });
        self.target = Some(Target { op, value });
        self
    }
}

/// Latency samples of one measured path, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub summary: Summary,
    #[serde(skip)]
    pub samples: Vec<f64>,
}

impl Series {
    pub fn new(name: impl Into<String>, samples: Vec<f64>) -> Self {
        Self {
            name: name.into(),
            summary: Summary::of(&samples),
            samples,
        }
    }
}

fn fmt_value(v: f64, unit: &str) -> String {
    let n = if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    match unit {
        "" => n,
        "×" => format!("{n}×"),
        u => format!("{n} {u}"),
    }
}

fn fmt_target(row: &Row) -> String {
    match row.target {
        None => "—".into(),
        Some(Target { op, value }) => {
            let sign = match op {
                Op::AtMost => "≤",
                Op::AtLeast => "≥",
            };
            format!("{sign} {}", fmt_value(value, row.unit))
        }
    }
}

/// Writes `results.json`, `benchmarks.md` and `benchmarks-latency.svg` into `dir`.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("benchmarks.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join("benchmarks-latency.svg"), chart(report))?;
    std::fs::write(dir.join("benchmarks.md"), markdown(report))?;
    Ok(())
}

/// The console summary.
pub fn print(scenario: &Scenario) {
    println!("== {} ({:.1} s)", scenario.title, scenario.seconds);
    if let Some(why) = &scenario.skipped {
        println!("   skipped: {why}");
    }
    for row in &scenario.rows {
        let reference = match (&row.reference_label, row.reference) {
            (Some(l), Some(v)) => format!("  [{l}: {}]", fmt_value(v, row.unit)),
            _ => String::new(),
        };
        let met = match row.met {
            Some(true) => "  ✓",
            Some(false) => "  ✗",
            None => "",
        };
        println!(
            "   {:<52} {:>14}{reference}  target {}{met}",
            row.metric,
            fmt_value(row.value, row.unit),
            fmt_target(row)
        );
    }
    for s in &scenario.series {
        println!("   {:<52} {}", s.name, s.summary.line());
    }
    for n in &scenario.notes {
        println!("   note: {n}");
    }
}

fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo bench --bench suite` on {} ({} build{}{}). Every figure sits beside \
         its reference, measured in the same run on the same machine. Do not edit by hand: \
         rerun the suite.\n",
        r.generated_at,
        r.profile,
        if r.smoke { ", **smoke sizes**" } else { "" },
        r.commit
            .as_deref()
            .map(|c| format!(", commit `{c}`"))
            .unwrap_or_default(),
    );
    let _ = writeln!(
        md,
        "**Machine:** {} — {} cores, {} GiB RAM, Linux {}. **Database:** PostgreSQL at {}, \
         default settings.\n",
        r.machine.cpu, r.machine.cores, r.machine.memory_gib, r.machine.kernel, r.database
    );
    let _ = writeln!(md, "## Reproduce\n");
    let _ = writeln!(
        md,
        "```sh\ncargo bench --bench suite                      # every scenario; rewrites docs/benchmarks*\n\
         cargo bench --bench suite -- queue overhead    # some of them\n\
         cargo bench --bench suite -- --smoke --out /tmp/b  # small sizes (what CI runs)\n```\n"
    );
    let _ = writeln!(
        md,
        "The suite starts its own stack for each scenario: a fresh database on the local \
         PostgreSQL (`DATABASE_URL`, else 127.0.0.1:5432, else an embedded cluster) and \
         `hotplex up` (or `serve`) as a child process, with the fake agent \
         (`hotplex fake-agent`) unless the scenario says otherwise. Latencies are \
         nearest-rank percentiles over every sample.\n"
    );
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "| scenario | metric | hotplex | reference (same run) | target | met |\n|---|---|---|---|---|---|"
    );
    for s in &r.scenarios {
        if let Some(why) = &s.skipped {
            let _ = writeln!(md, "| {} | skipped: {why} | | | | |", s.name);
        }
        for row in &s.rows {
            let reference = match (&row.reference_label, row.reference) {
                (Some(l), Some(v)) => format!("{} ({l})", fmt_value(v, row.unit)),
                _ => "—".into(),
            };
            let met = match row.met {
                Some(true) => "✓",
                Some(false) => "✗",
                None => "",
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                s.name,
                row.metric,
                fmt_value(row.value, row.unit),
                reference,
                fmt_target(row),
                met
            );
        }
    }
    let _ = writeln!(
        md,
        "\n## Latency distribution\n\n![latency CDF](benchmarks-latency.svg)\n\n\
         Each curve is the share of samples (y) at or below a latency (x, log scale).\n"
    );
    for s in &r.scenarios {
        let _ = writeln!(md, "## {} (`{}`)\n", s.title, s.name);
        let _ = writeln!(md, "{}\n", s.method);
        if !s.series.is_empty() {
            let _ = writeln!(
                md,
                "| series | n | p50 | p95 | p99 | max |\n|---|---|---|---|---|---|"
            );
            for x in &s.series {
                let m = &x.summary;
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
                    x.name, m.n, m.p50, m.p95, m.p99, m.max
                );
            }
            let _ = writeln!(md);
        }
        for n in &s.notes {
            let _ = writeln!(md, "- {n}");
        }
        if !s.notes.is_empty() {
            let _ = writeln!(md);
        }
    }
    md
}

const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

/// A CDF of every series on one log-scaled latency axis.
fn chart(r: &Report) -> String {
    let series: Vec<(&str, &Series)> = r
        .scenarios
        .iter()
        .flat_map(|s| s.series.iter().map(move |x| (s.name, x)))
        .filter(|(_, x)| !x.samples.is_empty())
        .collect();
    if series.is_empty() {
        return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"480\" height=\"40\">\
                <text x=\"10\" y=\"25\" font-family=\"sans-serif\">no latency series in this run</text></svg>\n"
            .into();
    }
    let (w, h, left, right, top, bottom) = (960.0, 560.0, 70.0, 330.0, 30.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let all = series.iter().flat_map(|(_, x)| x.samples.iter().copied());
    let lo = all.clone().fold(f64::INFINITY, f64::min).max(0.01);
    let hi = all.fold(0.0_f64, f64::max).max(lo * 10.0);
    // Whole decades, at least one, so the axis loop below always ends.
    let lx0 = lo.log10().floor();
    let lx1 = hi.log10().ceil().max(lx0 + 1.0);
    let x = |ms: f64| left + (ms.max(lo).log10() - lx0) / (lx1 - lx0) * pw;
    let y = |q: f64| top + (1.0 - q) * ph;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="18" font-size="14">hotplex benchmarks: latency CDF ({}), {}</text>
"#,
        r.profile, r.generated_at
    );
    let mut decade = lx0;
    while decade <= lx1 {
        let ms = 10f64.powf(decade);
        let px = x(ms);
        let label = if ms < 1.0 {
            format!("{ms} ms")
        } else {
            format!("{ms:.0} ms")
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            top + ph,
            top + ph + 18.0
        );
        decade += 1.0;
    }
    for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
        let py = y(q);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">p{}</text>"##,
            left + pw,
            left - 6.0,
            py + 4.0,
            (q * 100.0).round()
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    for (i, (scenario, s)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut v = s.samples.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let points: String = v
            .iter()
            .enumerate()
            .map(|(k, ms)| format!("{:.1},{:.1} ", x(*ms), y((k + 1) as f64 / n)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{points}"/>"#
        );
        let ly = top + 14.0 + i as f64 * 18.0;
        let lx = left + pw + 14.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{ly:.1}">{scenario}: {} (p50 {:.2} ms)</text>"#,
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            lx + 24.0,
            xml_escape(&s.name),
            s.summary.p50
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
