//! The report of a run, drawn from its history for people to read:
//!
//! - `timeline.html`: Jepsen's timeline. One column per process (clients by number, then
//!   the nemesis), time flowing down, each operation a box from its call to its return,
//!   coloured by outcome. A fault is a box in the nemesis column and a faint band across
//!   every column. Hovering over a box shows the operation.
//! - `latency.svg`: the latency of each client operation (log scale) against time.
//! - `throughput.svg`: operations completed per second, by workload.
//!
//! Both plots shade the fault windows and share one drawing of the frame (axes, ticks,
//! bands) and the legend. Every file stands alone: no scripts, fonts or URLs, so it opens
//! on a machine with no network. Records that can hold a whole run's events or elements
//! (watch streams and the final reads) are summarised, never dumped, and are left out of
//! the plots: their duration is not a latency.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::path::Path;

use anyhow::Context;
use serde_json::json;

use crate::history::{Op, Outcome, Process, Record, NEMESIS};

/// The timeline is at most this tall, however long the run: the vertical scale shrinks to fit.
const TIMELINE_HEIGHT_PX_MAX: f64 = 20_000.0;
/// The largest vertical scale of the timeline, reached by runs shorter than 20 s.
const TIMELINE_PX_PER_MS_MAX: f64 = 1.0;
/// Every process's column in the timeline is this wide, its boxes a little narrower.
const COLUMN_WIDTH_PX: usize = 130;
/// Room left of the columns for the time of each ruler line.
const GUTTER_WIDTH_PX: usize = 60;
/// Ruler lines in the timeline are at least this far apart.
const RULER_SPACING_PX_MIN: f64 = 80.0;

/// More latency points than this and the ok operations are sampled.
const LATENCY_POINTS_MAX: usize = 20_000;
/// Latencies are drawn no lower than this (1 µs), as a log scale has no zero.
const LATENCY_MS_MIN: f64 = 0.001;

/// At most this many points on a line of throughput: a run longer than this many seconds
/// (which only a corrupt history claims) is counted in wider buckets.
const THROUGHPUT_BUCKETS_MAX: u64 = 10_000;

/// The size of a plot, and where its data area lies in it; the legend goes to the right.
const SVG_WIDTH_PX: f64 = 1100.0;
const SVG_HEIGHT_PX: f64 = 560.0;
const AREA_LEFT_PX: f64 = 70.0;
const AREA_RIGHT_PX: f64 = 900.0;
const AREA_TOP_PX: f64 = 56.0;
const AREA_BOTTOM_PX: f64 = 500.0;
/// About this many ticks on an axis.
const TICKS: f64 = 10.0;

/// How a fault window is shaded in the plots; the timeline's bands are the same orange.
const FAULT_PAINT: &str = r##"fill="#ff8c00" fill-opacity="0.15""##;
/// How the plots draw grid lines.
const GRID_PAINT: &str = r##"stroke="#eee""##;
/// The colour of each workload in the plots.
const WORKLOADS: [(&str, &str); 6] = [
    ("register", "#1f77b4"),
    ("set", "#ff7f0e"),
    ("bank", "#2ca02c"),
    ("watch", "#9467bd"),
    ("lock", "#d62728"),
    ("scheduler", "#8c564b"),
];
/// The colour of legend entries that stand for every workload.
const GREY: &str = "#555";

/// Writes timeline.html, latency.svg and throughput.svg for a run into `dir`.
pub fn write_report(dir: &Path, title: &str, history: &[Record]) -> anyhow::Result<()> {
    let faults = faults(history);
    let files = [
        ("timeline.html", timeline(title, history, &faults)?),
        ("latency.svg", latency_plot(title, history, &faults)?),
        ("throughput.svg", throughput_plot(title, history, &faults)?),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// A fault window: when the nemesis began a fault and when it healed it.
struct Fault<'a> {
    begin_ns: u64,
    end_ns: u64,
    what: &'a str,
}

fn faults(history: &[Record]) -> Vec<Fault<'_>> {
    history
        .iter()
        .filter_map(|record| match &record.op {
            Op::Fault { what } => Some(Fault { begin_ns: record.call, end_ns: record.ret.max(record.call), what }),
            _ => None,
        })
        .collect()
}

/// Records whose span is not one operation's latency: a watch stream lasts until it breaks,
/// and the final reads return the whole run's elements, events or versions at once. No
/// wildcard: a new kind of operation must be placed here.
fn is_long_lived(op: &Op) -> bool {
    match op {
        Op::Watch { .. } | Op::ReadEvents { .. } | Op::ReadSet { .. } | Op::ReadFenced { .. } | Op::ReadPods { .. } => {
            true
        }
        Op::Read { .. }
        | Op::Write { .. }
        | Op::Cas { .. }
        | Op::Add { .. }
        | Op::Transfer { .. }
        | Op::ReadBank { .. }
        | Op::Acquire { .. }
        | Op::Release { .. }
        | Op::Fenced { .. }
        | Op::CreatePod { .. }
        | Op::DeletePod { .. }
        | Op::Fault { .. } => false,
    }
}

/// The operations the plots show: every client's, but for the long-lived ones.
fn plotted(history: &[Record]) -> impl Iterator<Item = &Record> {
    history.iter().filter(|record| matches!(record.process, Process::Client(_)) && !is_long_lived(&record.op))
}

/// The workload's place in [`WORKLOADS`]; `None` for the nemesis.
fn workload_index(op: &Op) -> Option<usize> {
    WORKLOADS.iter().position(|(name, _)| *name == op.workload())
}

/// The last moment anything in the history happened, in ns since the run started.
fn run_end_ns(history: &[Record]) -> u64 {
    history.iter().map(|record| record.call.max(record.ret)).max().unwrap_or(0)
}

/// The run's length in whole seconds, rounded up, and at least one: the plots' time axis.
fn run_seconds(history: &[Record]) -> u64 {
    run_end_ns(history).div_ceil(1_000_000_000).max(1)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "ok",
        Outcome::Fail => "fail",
        Outcome::Info => "info",
    }
}

/// `text` made safe inside HTML or XML, in text and in quoted attributes. XML forbids most
/// control characters even as references, and a key could hold one: they become U+FFFD.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            '\t' | '\n' | '\r' => escaped.push(c),
            c if c.is_control() => escaped.push('\u{fffd}'),
            c => escaped.push(c),
        }
    }
    escaped
}

/// `value` with at most three decimals and no trailing zeros: 0.001, 2.5, 40.
fn number(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The smallest of 1, 2 and 5 times a power of ten that is at least `least`: a step
/// between ticks people read easily.
fn round_step(least: f64) -> f64 {
    let magnitude = 10f64.powf(least.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|mantissa| mantissa * magnitude).find(|step| *step >= least).unwrap_or(least)
}

/// 0, `step`, 2 × `step`, … up to `max`.
fn multiples(step: f64, max: f64) -> impl Iterator<Item = f64> {
    (0u32..).map(move |i| f64::from(i) * step).take_while(move |value| *value <= max * (1.0 + 1e-9))
}

// ---------------------------------------------------------------------------------------
// timeline.html

const TIMELINE_CSS: &str = "\
body{font:13px sans-serif;margin:12px;color:#222}
table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ccc;padding:2px 8px}
td{text-align:right}
.key span{display:inline-block;padding:1px 8px;margin-right:8px;border:1px solid #999}
.heads{position:sticky;top:0;height:18px;background:#fff;border-bottom:1px solid #999;z-index:1}
.t{position:relative}
.head,.op{position:absolute;overflow:hidden;white-space:nowrap;box-sizing:border-box}
.head{font-weight:bold;text-align:center;line-height:18px}
.op{font-size:10px;line-height:11px;padding:0 2px;border:1px solid rgba(0,0,0,.2)}
.ok{background:#b3f3b5}
.fail{background:#f3b3b3}
.info{background:#ffe08a}
.band{position:absolute;background:rgba(255,140,0,.12)}
.band-key{background:rgba(255,140,0,.3)}
.tick{position:absolute;left:0;border-top:1px solid #eee;font-size:10px;color:#888}
";

/// The vertical scale of a run that ended at `end_ms`: as large as allowed, but small
/// enough that the whole run fits in the largest height.
fn timeline_px_per_ms(end_ms: f64) -> f64 {
    if end_ms <= 0.0 {
        return TIMELINE_PX_PER_MS_MAX;
    }
    (TIMELINE_HEIGHT_PX_MAX / end_ms).min(TIMELINE_PX_PER_MS_MAX)
}

fn process_name(process: Process) -> String {
    match process {
        Process::Client(number) => number.to_string(),
        Process::Nemesis(_) => "nemesis".to_string(),
    }
}

/// The timeline page. Every box carries only its position in `style`; the rest is in
/// classes, as a run has tens of thousands of boxes.
fn timeline(title: &str, history: &[Record], faults: &[Fault]) -> anyhow::Result<String> {
    let mut processes: BTreeSet<Process> = history.iter().map(|record| record.process).collect();
    processes.insert(NEMESIS);
    // Process orders clients by number, then the nemesis.
    let columns: BTreeMap<Process, usize> = processes.into_iter().zip(0..).collect();
    let end_ms = ms(run_end_ns(history));
    let px_per_ms = timeline_px_per_ms(end_ms);
    let px = |ns: u64| (ms(ns) * px_per_ms).round() as u64;

    let mut out = String::with_capacity(8192 + history.len() * 320);
    timeline_head(&mut out, title, history, &columns, px_per_ms)?;
    writeln!(out, r#"<div class="t" style="height:{}px">"#, px(run_end_ns(history)) + 20)?;
    let step_ms = round_step(RULER_SPACING_PX_MIN / px_per_ms);
    for tick_ms in multiples(step_ms, end_ms) {
        let top = (tick_ms * px_per_ms).round();
        writeln!(out, r#"<div class="tick" style="top:{top}px">{} s</div>"#, number(tick_ms / 1000.0))?;
    }
    for fault in faults {
        let top = px(fault.begin_ns);
        let height = px(fault.end_ns).saturating_sub(top).max(1);
        let tooltip = format!("{}\n{} ms to {} ms", fault.what, number(ms(fault.begin_ns)), number(ms(fault.end_ns)));
        writeln!(
            out,
            r#"<div class="band" style="top:{top}px;height:{height}px" title="{}"></div>"#,
            escape(&tooltip)
        )?;
    }
    for record in history {
        let top = px(record.call);
        let height = px(record.ret).saturating_sub(top).max(1);
        writeln!(
            out,
            r#"<div class="op {} c{}" style="top:{top}px;height:{height}px" title="{}">{}</div>"#,
            outcome_name(record.outcome),
            columns[&record.process],
            escape(&tooltip(record)?),
            escape(&label(&record.op)),
        )?;
    }
    out.push_str("</div>\n</body>\n</html>\n");
    Ok(out)
}

/// The page up to the timeline: the style (with each column's place), the title, the
/// counts, the legend and the column headings.
fn timeline_head(
    out: &mut String,
    title: &str,
    history: &[Record],
    columns: &BTreeMap<Process, usize>,
    px_per_ms: f64,
) -> fmt::Result {
    let title = escape(title);
    writeln!(out, "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n<style>")?;
    out.push_str(TIMELINE_CSS);
    let columns_px = columns.len() * COLUMN_WIDTH_PX;
    writeln!(out, ".head,.op{{width:{}px}}", COLUMN_WIDTH_PX - 6)?;
    writeln!(out, ".t,.heads,.tick{{width:{}px}}", GUTTER_WIDTH_PX + columns_px)?;
    writeln!(out, ".band{{left:{GUTTER_WIDTH_PX}px;width:{columns_px}px}}")?;
    for column in columns.values() {
        writeln!(out, ".c{column}{{left:{}px}}", GUTTER_WIDTH_PX + column * COLUMN_WIDTH_PX)?;
    }
    writeln!(out, "</style>\n</head>\n<body>\n<h1>{title}</h1>")?;

    let mut counts: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    for record in history {
        let outcome = match record.outcome {
            Outcome::Ok => 0,
            Outcome::Fail => 1,
            Outcome::Info => 2,
        };
        counts.entry(record.op.workload()).or_default()[outcome] += 1;
    }
    out.push_str("<table>\n<tr><th>workload</th><th>ok</th><th>fail</th><th>info</th><th>all</th></tr>\n");
    let mut totals = [0; 3];
    for (workload, [ok, fail, info]) in &counts {
        writeln!(
            out,
            "<tr><th>{workload}</th><td>{ok}</td><td>{fail}</td><td>{info}</td><td>{}</td></tr>",
            ok + fail + info
        )?;
        totals = [totals[0] + ok, totals[1] + fail, totals[2] + info];
    }
    let [ok, fail, info] = totals;
    writeln!(
        out,
        "<tr><th>all</th><td>{ok}</td><td>{fail}</td><td>{info}</td><td>{}</td></tr>\n</table>",
        history.len()
    )?;

    out.push_str(
        r#"<p class="key"><span class="ok">ok: it happened</span><span class="fail">fail: it did not happen</span>"#,
    );
    out.push_str(
        r#"<span class="info">info: unknown, it may have happened</span><span class="band-key">fault window</span>"#,
    );
    out.push_str("</p>\n");
    writeln!(
        out,
        "<p>Time flows down from the start of the run; 1 px is {} ms. A box runs from an operation's call to its \
         return (for info: to when its client gave up). Hover over a box for the operation.</p>",
        number(1.0 / px_per_ms),
    )?;
    out.push_str("<div class=\"heads\">");
    for (process, column) in columns {
        write!(out, r#"<div class="head c{column}">{}</div>"#, process_name(*process))?;
    }
    out.push_str("</div>\n");
    Ok(())
}

/// A box's tooltip: who, what, when, and the operation as JSON.
fn tooltip(record: &Record) -> serde_json::Result<String> {
    Ok(format!(
        "process {}\nworkload {}, f {}, type {}\ncall {} ms, return {} ms, took {} ms\n{}",
        process_name(record.process),
        record.op.workload(),
        record.op.name(),
        outcome_name(record.outcome),
        number(ms(record.call)),
        number(ms(record.ret)),
        number(ms(record.ret.saturating_sub(record.call))),
        op_json(&record.op)?,
    ))
}

/// The operation as JSON. Watch streams and the final reads are summarised by their
/// sizes and revisions: one can hold every event of the run.
fn op_json(op: &Op) -> serde_json::Result<String> {
    let summary = match op {
        Op::Watch { plane, from, events } => {
            json!({ "f": op.name(), "plane": plane, "from": from, "events": brief(events, |event| event.revision) })
        }
        Op::ReadEvents { from, events } => {
            json!({ "f": op.name(), "from": from, "events": brief(events, |event| event.revision) })
        }
        Op::ReadSet { elements } => json!({ "f": op.name(), "elements": elements.len() }),
        Op::ReadFenced { versions } => {
            json!({ "f": op.name(), "versions": brief(versions, |version| version.revision) })
        }
        Op::ReadPods { node_cpu_milli, events } => {
            json!({ "f": op.name(), "nodes": node_cpu_milli.len(), "events": brief(events, |event| event.revision) })
        }
        _ => return serde_json::to_string(op),
    };
    serde_json::to_string(&summary)
}

/// A list that can hold the whole run, in brief: how long it is, and the revisions of its
/// first and last items.
fn brief<T>(items: &[T], revision: impl Fn(&T) -> i64) -> serde_json::Value {
    json!({
        "count": items.len(),
        "first_revision": items.first().map(&revision),
        "last_revision": items.last().map(&revision),
    })
}

/// The text in a box: the operation's name and what it read or wrote, in brief. A ✗ marks
/// a conditional write that was refused.
fn label(op: &Op) -> String {
    let refused = |succeeded: bool| if succeeded { "" } else { " ✗" };
    match op {
        Op::Read { key, value: Some(value) } => format!("read {key}={value}"),
        Op::Read { key, value: None } => format!("read {key}=nil"),
        Op::Write { key, value } => format!("write {key}={value}"),
        Op::Cas { key, expected, new, succeeded } => format!("cas {key} {expected}→{new}{}", refused(*succeeded)),
        Op::Add { element } => format!("add {element}"),
        Op::ReadSet { elements } => format!("read-set {} elements", elements.len()),
        Op::Transfer { from, to, amount, succeeded } => format!("transfer {amount} {from}→{to}{}", refused(*succeeded)),
        // Summed wide, so that no balances read back can overflow the sum.
        Op::ReadBank { balances, .. } => {
            format!("read-bank total {}", balances.iter().map(|balance| i128::from(*balance)).sum::<i128>())
        }
        Op::Watch { plane, events, .. } => format!("watch plane {plane}: {} events", events.len()),
        Op::ReadEvents { events, .. } => format!("read-events {} events", events.len()),
        Op::Acquire { token } => format!("acquire {token}"),
        Op::Release { token } => format!("release {token}"),
        Op::Fenced { token, seq, succeeded } => format!("fenced {token}#{seq}{}", refused(*succeeded)),
        Op::ReadFenced { versions } => format!("read-fenced {} versions", versions.len()),
        Op::CreatePod { name, cpu_milli } => format!("create-pod {name} {cpu_milli}m"),
        Op::DeletePod { name } => format!("delete-pod {name}"),
        Op::ReadPods { events, .. } => format!("read-pods {} events", events.len()),
        Op::Fault { what } => what.clone(),
    }
}

// ---------------------------------------------------------------------------------------
// The plots' shared frame and legend

/// How a plot's y axis maps values to heights.
enum Scale {
    /// From 0 to `max`, a whole number of `step`s.
    Linear { max: f64, step: f64 },
    /// From 10^`low` to 10^`high`.
    Log { low: i32, high: i32 },
}

impl Scale {
    /// A linear scale from 0 to a round number at or above `max` (and at least 1).
    fn linear(max: f64) -> Scale {
        let max = max.max(1.0);
        let step = round_step(max / TICKS);
        Scale::Linear { max: (max / step).ceil() * step, step }
    }

    /// A log scale over whole decades that hold every value (1 to 10 when there is none).
    /// Values must be positive.
    fn log(values: impl Iterator<Item = f64>) -> Scale {
        let (min, max) = values.fold((f64::INFINITY, 0.0f64), |(min, max), value| (min.min(value), max.max(value)));
        if !min.is_finite() {
            return Scale::Log { low: 0, high: 1 };
        }
        // The slack keeps a value of exactly 10^n, computed a hair off, in decade n.
        let low = (min.log10() + 1e-9).floor() as i32;
        let high = ((max.log10() - 1e-9).ceil() as i32).max(low + 1);
        Scale::Log { low, high }
    }

    /// Where `value` lies between the bottom (0) and the top (1).
    fn fraction(&self, value: f64) -> f64 {
        let fraction = match self {
            Scale::Linear { max, .. } => value / max,
            Scale::Log { low, high } => (value.log10() - f64::from(*low)) / f64::from(high - low),
        };
        fraction.clamp(0.0, 1.0)
    }

    /// The values to tick: round multiples, or every decade (with 2 and 5 when there are
    /// few decades, so that a narrow range still has several).
    fn ticks(&self) -> Vec<f64> {
        match self {
            Scale::Linear { max, step } => multiples(*step, *max).collect(),
            Scale::Log { low, high } => {
                let mantissas: &[f64] = if high - low <= 3 { &[1.0, 2.0, 5.0] } else { &[1.0] };
                let top = 10f64.powi(*high) * (1.0 + 1e-9);
                (*low..=*high)
                    .flat_map(|exponent| mantissas.iter().map(move |mantissa| mantissa * 10f64.powi(exponent)))
                    .filter(|value| *value <= top)
                    .collect()
            }
        }
    }
}

/// The axes of a plot: seconds since the run started across, `y` up.
struct Frame {
    seconds: f64,
    y: Scale,
}

impl Frame {
    fn x(&self, seconds: f64) -> f64 {
        AREA_LEFT_PX + (seconds / self.seconds).clamp(0.0, 1.0) * (AREA_RIGHT_PX - AREA_LEFT_PX)
    }

    fn y(&self, value: f64) -> f64 {
        AREA_BOTTOM_PX - self.y.fraction(value) * (AREA_BOTTOM_PX - AREA_TOP_PX)
    }

    /// Opens the image and draws all but the data: title and caption, grid lines, ticks
    /// and their labels, the fault windows, the axes and their names.
    fn open(&self, out: &mut String, title: &str, caption: &str, y_name: &str, faults: &[Fault]) -> fmt::Result {
        let size = format!(r#"width="{SVG_WIDTH_PX}" height="{SVG_HEIGHT_PX}""#);
        writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" {size} viewBox="0 0 {SVG_WIDTH_PX} {SVG_HEIGHT_PX}""#
        )?;
        writeln!(out, r#"  font-family="sans-serif" font-size="12">"#)?;
        let title = escape(title);
        writeln!(out, "<title>{title}</title>")?;
        writeln!(out, r##"<rect {size} fill="#fff"/>"##)?;
        writeln!(out, r#"<text x="{AREA_LEFT_PX}" y="22" font-size="16">{title}</text>"#)?;
        writeln!(out, r##"<text x="{AREA_LEFT_PX}" y="42" fill="#555">{}</text>"##, escape(caption))?;

        for second in multiples(round_step(self.seconds / TICKS), self.seconds) {
            let x = self.x(second);
            writeln!(out, r#"<line x1="{x:.1}" y1="{AREA_TOP_PX}" x2="{x:.1}" y2="{AREA_BOTTOM_PX}" {GRID_PAINT}/>"#)?;
            let label_y = AREA_BOTTOM_PX + 16.0;
            writeln!(out, r#"<text x="{x:.1}" y="{label_y}" text-anchor="middle">{}</text>"#, number(second))?;
        }
        for value in self.y.ticks() {
            let y = self.y(value);
            writeln!(out, r#"<line x1="{AREA_LEFT_PX}" y1="{y:.1}" x2="{AREA_RIGHT_PX}" y2="{y:.1}" {GRID_PAINT}/>"#)?;
            let label_x = AREA_LEFT_PX - 6.0;
            writeln!(out, r#"<text x="{label_x}" y="{:.1}" text-anchor="end">{}</text>"#, y + 4.0, number(value))?;
        }
        for (i, fault) in faults.iter().enumerate() {
            let left = self.x(seconds(fault.begin_ns));
            let width = (self.x(seconds(fault.end_ns)) - left).max(1.0);
            // Three rows of labels, so that the labels of faults close together overlap less.
            let label_y = AREA_TOP_PX + 11.0 + 12.0 * (i % 3) as f64;
            let what = escape(fault.what);
            let height = AREA_BOTTOM_PX - AREA_TOP_PX;
            writeln!(out, r#"<g class="fault"><title>{what}</title>"#)?;
            writeln!(
                out,
                r#"<rect x="{left:.1}" y="{AREA_TOP_PX}" width="{width:.1}" height="{height}" {FAULT_PAINT}/>"#
            )?;
            writeln!(
                out,
                r##"<text x="{:.1}" y="{label_y}" font-size="10" fill="#a35200">{what}</text></g>"##,
                left + 2.0
            )?;
        }

        writeln!(
            out,
            r##"<path d="M{AREA_LEFT_PX} {AREA_TOP_PX}V{AREA_BOTTOM_PX}H{AREA_RIGHT_PX}" fill="none" stroke="#000"/>"##
        )?;
        writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">time since the run started (s)</text>"#,
            (AREA_LEFT_PX + AREA_RIGHT_PX) / 2.0,
            AREA_BOTTOM_PX + 36.0,
        )?;
        writeln!(
            out,
            r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (AREA_TOP_PX + AREA_BOTTOM_PX) / 2.0,
            escape(y_name),
        )
    }
}

/// How a plot marks one operation, by its outcome.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Marker {
    /// ok: a filled dot.
    Dot,
    /// fail: a cross.
    Cross,
    /// info: a ring, as it may yet have happened.
    Ring,
}

impl Marker {
    /// In drawing order: the many oks underneath, the rare info operations on top.
    const ALL: [Marker; 3] = [Marker::Dot, Marker::Cross, Marker::Ring];

    fn of(outcome: Outcome) -> Marker {
        match outcome {
            Outcome::Ok => Marker::Dot,
            Outcome::Fail => Marker::Cross,
            Outcome::Info => Marker::Ring,
        }
    }

    /// The attributes of a path of these markers in `colour`.
    fn paint(self, colour: &str) -> String {
        match self {
            Marker::Dot => format!(r#"fill="{colour}" fill-opacity="0.6""#),
            Marker::Cross | Marker::Ring => format!(r#"fill="none" stroke="{colour}""#),
        }
    }

    /// Appends the marker centred on (`x`, `y`) to the path data `d`: a circle as two arcs,
    /// or a cross as two strokes.
    fn trace(self, d: &mut String, x: f64, y: f64) -> fmt::Result {
        let radius = match self {
            Marker::Dot => 1.8,
            Marker::Cross => return write!(d, "M{:.1} {:.1}l6 6m0 -6l-6 6", x - 3.0, y - 3.0),
            Marker::Ring => 3.0,
        };
        let diameter = 2.0 * radius;
        write!(
            d,
            "M{:.1} {y:.1}a{radius} {radius} 0 1 0 {diameter} 0a{radius} {radius} 0 1 0 -{diameter} 0",
            x - radius
        )
    }
}

/// The attributes of a line of throughput in `colour`.
fn line_paint(colour: &str, dashed: bool) -> String {
    let dash = if dashed { r#" stroke-dasharray="5 3""# } else { "" };
    format!(r#"fill="none" stroke="{colour}" stroke-width="1.5"{dash}"#)
}

/// What a legend entry shows beside its label.
enum Sample {
    Marker(Marker, &'static str),
    /// A line in a colour, dashed or not.
    Line(&'static str, bool),
    /// A fault window.
    Band,
}

/// Draws the legend right of the data area, one entry a row.
fn legend(out: &mut String, entries: &[(Sample, &str)]) -> fmt::Result {
    let x = AREA_RIGHT_PX + 24.0;
    for (i, (sample, label)) in entries.iter().enumerate() {
        let y = AREA_TOP_PX + 10.0 + 20.0 * i as f64;
        match sample {
            Sample::Marker(marker, colour) => {
                let mut d = String::new();
                marker.trace(&mut d, x + 8.0, y)?;
                writeln!(out, r#"<path d="{d}" {}/>"#, marker.paint(colour))?;
            }
            Sample::Line(colour, dashed) => writeln!(
                out,
                r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" {}/>"#,
                x + 16.0,
                line_paint(colour, *dashed)
            )?,
            Sample::Band => writeln!(out, r#"<rect x="{x}" y="{}" width="16" height="12" {FAULT_PAINT}/>"#, y - 6.0)?,
        }
        writeln!(out, r#"<text x="{}" y="{}">{}</text>"#, x + 24.0, y + 4.0, escape(label))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// latency.svg

/// One client operation in the latency plot.
struct Point {
    workload: usize,
    marker: Marker,
    time_s: f64,
    latency_ms: f64,
}

/// Every plotted operation: ok and fail at their call, info when the client gave up.
fn latency_points(history: &[Record]) -> Vec<Point> {
    plotted(history)
        .filter_map(|record| {
            let at = if record.outcome == Outcome::Info { record.ret } else { record.call };
            Some(Point {
                workload: workload_index(&record.op)?,
                marker: Marker::of(record.outcome),
                time_s: seconds(at),
                latency_ms: ms(record.ret.saturating_sub(record.call)).max(LATENCY_MS_MIN),
            })
        })
        .collect()
}

/// SplitMix64's finaliser: a fixed, well-mixed hash of `n`.
fn mix(n: u64) -> u64 {
    let mut n = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    n = (n ^ (n >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    n = (n ^ (n >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    n ^ (n >> 31)
}

/// Keeps every fail and info point, and about as many ok points as fit under
/// [`LATENCY_POINTS_MAX`]. Which oks stay depends on a hash of their place among the oks,
/// so the choice is the same every time and follows no pattern of the clients' turns.
fn downsample(points: Vec<Point>) -> Vec<Point> {
    if points.len() <= LATENCY_POINTS_MAX {
        return points;
    }
    let oks = points.iter().filter(|point| point.marker == Marker::Dot).count() as u64;
    let room = LATENCY_POINTS_MAX.saturating_sub(points.len() - oks as usize) as u64;
    let mut ok_number = 0;
    points
        .into_iter()
        .filter(|point| {
            if point.marker != Marker::Dot {
                return true;
            }
            ok_number += 1;
            mix(ok_number) % oks < room
        })
        .collect()
}

fn latency_plot(title: &str, history: &[Record], faults: &[Fault]) -> anyhow::Result<String> {
    let all = latency_points(history);
    let oks = all.iter().filter(|point| point.marker == Marker::Dot).count();
    let points = downsample(all);
    let oks_drawn = points.iter().filter(|point| point.marker == Marker::Dot).count();
    let frame =
        Frame { seconds: run_seconds(history) as f64, y: Scale::log(points.iter().map(|point| point.latency_ms)) };
    let mut caption =
        "Client operations: ok and fail at their call, info when the client gave up. Watches and final reads left out."
            .to_string();
    if oks_drawn < oks {
        write!(caption, " {oks_drawn} of {oks} ok operations drawn.")?;
    }

    let mut out = String::with_capacity(4096 + points.len() * 48);
    frame.open(&mut out, &format!("{title}: latency"), &caption, "latency (ms)", faults)?;
    for marker in Marker::ALL {
        for (workload, (_, colour)) in WORKLOADS.iter().enumerate() {
            let mut d = String::new();
            for point in points.iter().filter(|point| point.marker == marker && point.workload == workload) {
                marker.trace(&mut d, frame.x(point.time_s), frame.y(point.latency_ms))?;
            }
            if !d.is_empty() {
                writeln!(out, r#"<path d="{d}" {}/>"#, marker.paint(colour))?;
            }
        }
    }

    let mut entries: Vec<(Sample, &str)> = WORKLOADS
        .iter()
        .enumerate()
        .filter(|(workload, _)| points.iter().any(|point| point.workload == *workload))
        .map(|(_, (name, colour))| (Sample::Marker(Marker::Dot, colour), *name))
        .collect();
    entries.extend([
        (Sample::Marker(Marker::Dot, GREY), "ok"),
        (Sample::Marker(Marker::Cross, GREY), "fail"),
        (Sample::Marker(Marker::Ring, GREY), "info (gave up)"),
        (Sample::Band, "fault"),
    ]);
    legend(&mut out, &entries)?;
    out.push_str("</svg>\n");
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// throughput.svg

fn throughput_plot(title: &str, history: &[Record], faults: &[Fault]) -> anyhow::Result<String> {
    let run_secs = run_seconds(history);
    let bucket_secs = run_secs.div_ceil(THROUGHPUT_BUCKETS_MAX);
    let buckets = run_secs.div_ceil(bucket_secs) as usize;
    // By workload, then ok (0) or fail and info (1), then bucket: operations that returned.
    let mut counts = vec![[vec![0u32; buckets], vec![0u32; buckets]]; WORKLOADS.len()];
    for record in plotted(history) {
        let Some(workload) = workload_index(&record.op) else { continue };
        let bucket = ((record.ret / 1_000_000_000 / bucket_secs) as usize).min(buckets - 1);
        counts[workload][usize::from(record.outcome != Outcome::Ok)][bucket] += 1;
    }
    let rate = |count: u32| f64::from(count) / bucket_secs as f64;
    let max = counts.iter().flatten().flatten().copied().max().unwrap_or(0);
    let frame = Frame { seconds: (buckets as u64 * bucket_secs) as f64, y: Scale::linear(rate(max)) };
    let per = if bucket_secs == 1 { "each second".to_string() } else { format!("each {bucket_secs} s, per second") };
    let caption = format!("Client operations that returned in {per}. Watches and final reads left out.");

    let mut out = String::with_capacity(4096 + buckets * WORKLOADS.len() * 24);
    frame.open(&mut out, &format!("{title}: throughput"), &caption, "operations per second", faults)?;
    let mut entries = Vec::new();
    for ((name, colour), lines) in WORKLOADS.iter().zip(&counts) {
        if lines.iter().flatten().all(|count| *count == 0) {
            continue;
        }
        entries.push((Sample::Line(colour, false), *name));
        for (per_bucket, dashed) in lines.iter().zip([false, true]) {
            if per_bucket.iter().all(|count| *count == 0) {
                continue;
            }
            let mut points = String::new();
            for (bucket, count) in per_bucket.iter().enumerate() {
                // Each bucket's rate is drawn at its middle.
                let x = frame.x((bucket as f64 + 0.5) * bucket_secs as f64);
                write!(points, "{x:.1},{:.1} ", frame.y(rate(*count)))?;
            }
            writeln!(out, r#"<polyline points="{}" {}/>"#, points.trim_end(), line_paint(colour, dashed))?;
        }
    }
    entries.extend([
        (Sample::Line(GREY, false), "ok"),
        (Sample::Line(GREY, true), "fail or info"),
        (Sample::Band, "fault"),
    ]);
    legend(&mut out, &entries)?;
    out.push_str("</svg>\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::WatchEvent;

    fn record(process: Process, outcome: Outcome, call_ms: u64, ret_ms: u64, op: Op) -> Record {
        Record { process, outcome, call: call_ms * 1_000_000, ret: ret_ms * 1_000_000, op }
    }

    /// Three clients doing register and set operations of every outcome, a watcher, a
    /// final read, and one partition from 1 s to 2.5 s.
    fn small_history() -> Vec<Record> {
        let write = |value| Op::Write { key: "r1".into(), value };
        let add = |element: &str| Op::Add { element: element.into() };
        let events = (0..50)
            .map(|i| WatchEvent { revision: 5 + i, key: format!("jepsen/event-{i}"), value: Some("v".into()) })
            .collect();
        vec![
            record(Process::Client(0), Outcome::Ok, 0, 5, write(1)),
            record(Process::Client(1), Outcome::Ok, 2, 9, Op::Read { key: "r1".into(), value: Some(1) }),
            record(
                Process::Client(0),
                Outcome::Fail,
                10,
                11,
                Op::Cas { key: "r1".into(), expected: 2, new: 3, succeeded: false },
            ),
            record(Process::Client(2), Outcome::Info, 1200, 2200, write(2)),
            record(Process::Client(1), Outcome::Ok, 1500, 1510, add("e1")),
            record(Process::Client(1), Outcome::Fail, 1600, 1601, add("e2")),
            record(Process::Client(0), Outcome::Info, 2300, 3300, add("e3")),
            record(NEMESIS, Outcome::Info, 1000, 2500, Op::Fault { what: "partition <n1> & n2".into() }),
            record(Process::Client(3), Outcome::Ok, 0, 3400, Op::Watch { plane: 1, from: 5, events }),
            record(
                Process::Client(4),
                Outcome::Ok,
                3500,
                3600,
                Op::ReadSet { elements: vec!["e1".into(), "e3".into()] },
            ),
        ]
    }

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    /// Fails unless every element opened in `xml` is closed, in order, and nothing is left
    /// after the root closes.
    fn assert_balanced(xml: &str) {
        let mut open: Vec<&str> = Vec::new();
        let mut rest = xml;
        while let Some(start) = rest.find('<') {
            let end = start + rest[start..].find('>').expect("a tag is closed");
            let tag = &rest[start + 1..end];
            let name = tag.trim_start_matches('/').split([' ', '/']).next().unwrap();
            if tag.starts_with('/') {
                assert_eq!(open.pop(), Some(name), "</{name}> closes the wrong element");
            } else if !tag.ends_with('/') {
                open.push(name);
            }
            rest = &rest[end + 1..];
            if open.is_empty() {
                assert!(rest.trim().is_empty(), "text after the root: {rest}");
            }
        }
        assert!(open.is_empty(), "never closed: {open:?}");
    }

    #[test]
    #[should_panic(expected = "closes the wrong element")]
    fn the_balance_check_catches_a_stray_tag() {
        assert_balanced("<svg><g><path d=\"M0 0\"/></svg>");
    }

    #[test]
    fn report_draws_every_operation_and_the_fault() {
        let dir = tempfile::tempdir().unwrap();
        let history = small_history();
        write_report(dir.path(), "run <1>", &history).unwrap();

        let html = read(dir.path(), "timeline.html");
        assert_eq!(html.matches(r#"<div class="op "#).count(), history.len(), "{html}");
        assert_eq!(html.matches(r#"<div class="band""#).count(), 1, "{html}");
        assert!(html.contains("<h1>run &lt;1&gt;</h1>"), "{html}");
        assert!(html.contains(">partition &lt;n1&gt; &amp; n2</div>"), "{html}");
        assert!(!html.contains("<n1>"), "{html}");
        // The clients in order, then the nemesis.
        assert!(html.contains(r#"<div class="head c4">4</div><div class="head c5">nemesis</div>"#), "{html}");
        assert!(html.contains(">cas r1 2→3 ✗</div>"), "{html}");
        // The watch is summarised: its count and revisions, not its events.
        assert!(html.contains(">watch plane 1: 50 events</div>"), "{html}");
        let summary =
            "&quot;events&quot;:{&quot;count&quot;:50,&quot;first_revision&quot;:5,&quot;last_revision&quot;:54}";
        assert!(html.contains(summary), "{html}");
        assert!(!html.contains("jepsen/event-"), "{html}");

        for name in ["latency.svg", "throughput.svg"] {
            let svg = read(dir.path(), name);
            assert!(svg.starts_with("<svg"), "{name}: {svg}");
            assert!(svg.trim_end().ends_with("</svg>"), "{name}: {svg}");
            assert_balanced(&svg);
            assert_eq!(svg.matches(r#"<g class="fault">"#).count(), 1, "{name}: {svg}");
            assert!(svg.contains(">partition &lt;n1&gt; &amp; n2</text>"), "{name}: {svg}");
            assert!(!svg.contains("<n1>"), "{name}: {svg}");
            assert!(svg.contains("run &lt;1&gt;"), "{name}: {svg}");
        }
        let latency = read(dir.path(), "latency.svg");
        // Register and set markers of each outcome, and no watch or final read.
        assert_eq!(latency.matches("<path d=").count(), 6 + 1 + 5, "{latency}");
        let throughput = read(dir.path(), "throughput.svg");
        // An ok and a fail-or-info line for each workload.
        assert_eq!(throughput.matches("<polyline").count(), 4, "{throughput}");
    }

    #[test]
    fn a_script_in_a_key_comes_out_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let key = "<script>alert(\"x\")</script>";
        let history = vec![
            record(Process::Client(0), Outcome::Ok, 0, 3, Op::Write { key: key.into(), value: 1 }),
            record(NEMESIS, Outcome::Info, 1, 2, Op::Fault { what: key.into() }),
        ];
        write_report(dir.path(), key, &history).unwrap();
        for name in ["timeline.html", "latency.svg", "throughput.svg"] {
            let text = read(dir.path(), name);
            assert!(!text.contains("<script"), "{name}: {text}");
            assert!(text.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"), "{name}: {text}");
        }
        let html = read(dir.path(), "timeline.html");
        assert!(html.contains("&quot;key&quot;:&quot;&lt;script&gt;alert(\\&quot;x\\&quot;)"), "{html}");
    }

    #[test]
    fn latency_keeps_every_info_and_samples_the_oks() {
        let mut history: Vec<Record> = (0..30_000)
            .map(|i| {
                record(Process::Client(i % 8), Outcome::Ok, i as u64, i as u64 + 2, Op::Add { element: i.to_string() })
            })
            .collect();
        history.extend(
            (0..500)
                .map(|i| record(Process::Client(9), Outcome::Info, i, i + 1000, Op::Add { element: String::new() })),
        );
        let points = downsample(latency_points(&history));
        assert_eq!(points.iter().filter(|point| point.marker == Marker::Ring).count(), 500);
        let oks = points.iter().filter(|point| point.marker == Marker::Dot).count();
        assert!((18_500..=20_500).contains(&oks), "{oks} oks drawn");

        let svg = latency_plot("many", &history, &[]).unwrap();
        assert!(svg.len() < 3_000_000, "{} bytes", svg.len());
        assert!(svg.contains(&format!(" {oks} of 30000 ok operations drawn.")), "{}", &svg[..2000]);
    }

    #[test]
    fn a_corrupt_return_time_does_not_blow_up_the_plots() {
        let dir = tempfile::tempdir().unwrap();
        let history = vec![
            record(Process::Client(0), Outcome::Ok, 0, 3, Op::Add { element: "a".into() }),
            Record {
                process: Process::Client(1),
                outcome: Outcome::Info,
                call: 0,
                ret: u64::MAX,
                op: Op::Release { token: 1 },
            },
        ];
        write_report(dir.path(), "corrupt", &history).unwrap();
        let throughput = read(dir.path(), "throughput.svg");
        assert!(throughput.len() < 1_000_000, "{} bytes", throughput.len());
        assert!(throughput.contains(" s, per second."), "{throughput}");
        assert!(read(dir.path(), "timeline.html").len() < 100_000);
    }

    #[test]
    fn an_hour_fits_the_timeline_and_a_microsecond_still_shows() {
        let history = vec![
            Record {
                process: Process::Client(0),
                outcome: Outcome::Ok,
                call: 0,
                ret: 1_000,
                op: Op::Add { element: "a".into() },
            },
            record(Process::Client(0), Outcome::Ok, 3_599_000, 3_600_000, Op::Add { element: "b".into() }),
        ];
        let html = timeline("hour", &history, &[]).unwrap();
        let height: f64 =
            html.split(r#"<div class="t" style="height:"#).nth(1).unwrap().split("px").next().unwrap().parse().unwrap();
        assert!(height <= TIMELINE_HEIGHT_PX_MAX + 20.0, "{height} px");
        assert!(html.contains(r#"style="top:0px;height:1px""#), "{html}");
    }
}
