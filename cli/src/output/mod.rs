//! Everything the CLI prints: aligned tables, `key: value` listings, and the JSON objects
//! behind `--json`. Queues are in [`queues`], messages and audit events in [`messages`], broker
//! status, moves and events in [`ops`], and `hopper top`'s frame in [`top`].

mod messages;
mod ops;
mod queues;
mod top;

use std::io::Write;

use serde::Serialize;

pub use messages::{audit_table, peeked, write_delivery};
pub use ops::{
    event_line, move_destination, move_summary, moves_json, moves_table, status_listing, EventJson,
    StatusJson,
};
pub use queues::{blocked_line, queue_json, queue_listing, queue_table, queues_json};
pub use top::{top_frame, TopFrame};

/// Writes one value as a single line of JSON.
pub fn write_json_line(out: &mut impl Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Renders `key: value` lines, padding keys so the values line up.
pub fn listing(fields: &[(&str, String)]) -> String {
    let width = fields.iter().map(|(key, _)| key.chars().count()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in fields {
        let label = format!("{key}:");
        out.push_str(&format!("{label:<width$} {value}\n", width = width));
    }
    out
}

/// How a table column is aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Pad on the right.
    Left,
    /// Pad on the left; for numbers.
    Right,
}

/// Renders a table: columns separated by two spaces, each as wide as its widest cell, no
/// trailing spaces.
pub fn table(headers: &[&str], align: &[Align], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_cells: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_cells).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            match align.get(i).copied().unwrap_or(Align::Left) {
                Align::Left => {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The result of `hopper bench`; `--json` prints it as one object with exactly these keys.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchReport {
    /// Confirmed publishes per second, over the time until the last confirm.
    pub publish_rate: f64,
    /// Deliveries per second, over the time until the last delivery; 0 without consumers.
    pub consume_rate: f64,
    /// Median end-to-end latency in microseconds.
    pub p50_us: u64,
    /// 99th percentile end-to-end latency in microseconds.
    pub p99_us: u64,
    /// 99.9th percentile end-to-end latency in microseconds.
    pub p999_us: u64,
    /// Largest end-to-end latency in microseconds.
    pub max_us: u64,
    /// Messages published and confirmed.
    pub sent: u64,
    /// Messages delivered to the consumers.
    pub received: u64,
    /// Seconds from the first publish until the last delivery (or the last confirm, if later).
    pub elapsed_s: f64,
    /// Body size in bytes.
    pub size: u64,
    /// Prefetch of each consumer.
    pub prefetch: u32,
    /// Producer connections.
    pub producers: u32,
    /// Consumer connections.
    pub consumers: u32,
    /// Peak resident memory of the `--rss-pid` process during the run, in MiB; only with
    /// `--rss-pid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_mb: Option<f64>,
    /// CPU seconds the `--rss-pid` process used during the run; only with `--rss-pid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_cpu_s: Option<f64>,
    /// Publish delay of every message (`--delay`), in ms; latencies are then lateness.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Most unacked deliveries seen by the depth samples; only with `--sample-every`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unacked: Option<u64>,
    /// The queue's depth over time; only with `--sample-every`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub depth: Vec<crate::bench_watch::DepthSample>,
}

/// Renders a bench report as `key: value` lines.
pub fn bench_listing(r: &BenchReport) -> String {
    let latency = if r.received == 0 {
        "-".to_string()
    } else {
        format!("p50 {}  p99 {}  p99.9 {}  max {} (µs)", r.p50_us, r.p99_us, r.p999_us, r.max_us)
    };
    let mut fields = vec![
        (
            "sent",
            format!(
                "{} messages of {} bytes ({} {})",
                r.sent,
                r.size,
                r.producers,
                plural(r.producers, "producer")
            ),
        ),
        (
            "received",
            format!(
                "{} messages ({} {}, prefetch {})",
                r.received,
                r.consumers,
                plural(r.consumers, "consumer"),
                r.prefetch
            ),
        ),
        ("publish rate", format!("{:.0} msg/s", r.publish_rate)),
        ("consume rate", format!("{:.0} msg/s", r.consume_rate)),
        ("latency", latency),
        ("elapsed", format!("{:.2} s", r.elapsed_s)),
    ];
    if let Some(rss) = r.broker_rss_mb {
        fields.push(("broker rss", format!("peak {rss:.1} MB")));
    }
    if let Some(cpu) = r.broker_cpu_s {
        fields.push(("broker cpu", format!("{cpu:.2} s")));
    }
    if let Some(delay) = r.delay_ms {
        fields.push(("delay", format!("{delay} ms (latency is lateness past the due time)")));
    }
    if let Some(max) = r.max_unacked {
        fields.push(("max unacked", max.to_string()));
    }
    let mut text = listing(&fields);
    if !r.depth.is_empty() {
        text.push_str("depth:\n       t     ready   unacked   delayed\n");
        for s in &r.depth {
            text.push_str(&format!(
                "{:>7.1}s {:>9} {:>9} {:>9}\n",
                s.t_ms as f64 / 1000.0,
                s.ready,
                s.unacked,
                s.delayed
            ));
        }
    }
    text
}

/// `noun` or `nouns`, to agree with a count.
fn plural(count: u32, noun: &str) -> String {
    if count == 1 {
        noun.to_string()
    } else {
        format!("{noun}s")
    }
}

/// `yes` or `no`, for boolean columns.
pub fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_under_their_headers() {
        let text = table(
            &["NAME", "N"],
            &[Align::Left, Align::Right],
            &[vec!["a".into(), "1000".into()], vec!["longer".into(), "7".into()]],
        );
        assert_eq!(text, "NAME       N\na       1000\nlonger     7\n");
    }

    #[test]
    fn listing_aligns_values() {
        let text = listing(&[("a", "1".into()), ("long", "2".into())]);
        assert_eq!(text, "a:    1\nlong: 2\n");
    }

    #[test]
    fn bench_report_json_has_exactly_the_documented_keys() {
        let report = BenchReport {
            publish_rate: 1000.5,
            consume_rate: 999.0,
            p50_us: 1,
            p99_us: 2,
            p999_us: 3,
            max_us: 4,
            sent: 10,
            received: 10,
            elapsed_s: 0.01,
            size: 256,
            prefetch: 100,
            producers: 1,
            consumers: 2,
            broker_rss_mb: None,
            broker_cpu_s: None,
            delay_ms: None,
            max_unacked: None,
            depth: Vec::new(),
        };
        let value = serde_json::to_value(&report).unwrap();
        let mut keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut expected = [
            "publish_rate",
            "consume_rate",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "sent",
            "received",
            "elapsed_s",
            "size",
            "prefetch",
            "producers",
            "consumers",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        let text = bench_listing(&report);
        assert!(
            text.contains("publish rate: 1000 msg/s") || text.contains("publish rate: 1001 msg/s"),
            "{text}"
        );
        assert!(text.contains("p99 2"), "{text}");
        assert!(text.contains("(2 consumers, prefetch 100)"), "{text}");
    }

    #[test]
    fn json_line_ends_with_a_newline() {
        let mut out = Vec::new();
        write_json_line(&mut out, &serde_json::json!({"k": 1})).unwrap();
        assert_eq!(out, b"{\"k\":1}\n");
    }
}
