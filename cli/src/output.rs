//! Everything the CLI prints about queues and deliveries: aligned tables, `key: value`
//! listings, and the JSON objects behind `--json`.

use std::collections::BTreeMap;
use std::io::Write;

use hopper_client::{Delivery, QueueInfo};
use serde::Serialize;

/// A queue as `--json` prints it. The key set is part of the CLI's interface.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct QueueJson<'a> {
    /// The queue's name.
    pub name: &'a str,
    /// Whether the queue survives broker restarts.
    pub durable: bool,
    /// Messages waiting for a consumer.
    pub ready: u64,
    /// Messages delivered and not yet acknowledged.
    pub unacked: u64,
    /// Consumers attached now.
    pub consumers: u32,
    /// Messages published since the queue was created.
    pub published: u64,
    /// Deliveries made, redeliveries included.
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries of messages that had been delivered before.
    pub redelivered: u64,
}

impl<'a> From<&'a QueueInfo> for QueueJson<'a> {
    fn from(info: &'a QueueInfo) -> Self {
        QueueJson {
            name: &info.name,
            durable: info.durable,
            ready: info.ready,
            unacked: info.unacked,
            consumers: info.consumers,
            published: info.published_total,
            delivered: info.delivered_total,
            acked: info.acked_total,
            redelivered: info.redelivered_total,
        }
    }
}

/// A delivery as `hopper consume --json` prints it, one object per line.
#[derive(Debug, Serialize)]
pub struct DeliveryJson<'a> {
    /// The body as text; bytes that are not UTF-8 become U+FFFD.
    pub body: std::borrow::Cow<'a, str>,
    /// Application headers, sorted by key so output is stable.
    pub headers: BTreeMap<&'a str, &'a str>,
    /// Whether the message was delivered before.
    pub redelivered: bool,
    /// Deliveries of this message so far, this one included.
    pub delivery_count: u32,
    /// The queue the message came from.
    pub queue: &'a str,
    /// Broker-assigned message id.
    pub message_id: u64,
    /// MIME type given at publish time; empty for none.
    pub content_type: &'a str,
    /// Unix time in milliseconds at which the broker accepted the message.
    pub published_at_ms: u64,
    /// The delivery's tag within its consumer.
    pub delivery_tag: u64,
}

impl<'a> From<&'a Delivery> for DeliveryJson<'a> {
    fn from(delivery: &'a Delivery) -> Self {
        DeliveryJson {
            body: String::from_utf8_lossy(&delivery.body),
            headers: delivery.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            redelivered: delivery.redelivered,
            delivery_count: delivery.delivery_count,
            queue: delivery.queue(),
            message_id: delivery.message_id,
            content_type: &delivery.content_type,
            published_at_ms: delivery.published_at_ms,
            delivery_tag: delivery.delivery_tag,
        }
    }
}

/// Writes one value as a single line of JSON.
pub fn write_json_line(out: &mut impl Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Renders queues as `--json` prints them: one array, pretty-printed.
pub fn queues_json(queues: &[QueueInfo]) -> anyhow::Result<String> {
    let rows: Vec<QueueJson<'_>> = queues.iter().map(QueueJson::from).collect();
    Ok(serde_json::to_string_pretty(&rows)?)
}

/// Renders one queue as `--json` prints it.
pub fn queue_json(queue: &QueueInfo) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(&QueueJson::from(queue))?)
}

/// Column headers of `hopper queue list`, in order.
const QUEUE_COLUMNS: [&str; 9] =
    ["NAME", "READY", "UNACKED", "CONSUMERS", "DURABLE", "PUBLISHED", "DELIVERED", "ACKED", "REDELIVERED"];

/// Renders queues as an aligned table with a header row, sorted by name.
pub fn queue_table(queues: &[QueueInfo]) -> String {
    let mut sorted: Vec<&QueueInfo> = queues.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let rows: Vec<Vec<String>> = sorted
        .iter()
        .map(|q| {
            vec![
                q.name.clone(),
                q.ready.to_string(),
                q.unacked.to_string(),
                q.consumers.to_string(),
                yes_no(q.durable).to_string(),
                q.published_total.to_string(),
                q.delivered_total.to_string(),
                q.acked_total.to_string(),
                q.redelivered_total.to_string(),
            ]
        })
        .collect();
    // The name column reads best left-aligned, the counters right-aligned.
    let mut align = [Align::Right; QUEUE_COLUMNS.len()];
    align[0] = Align::Left;
    align[4] = Align::Left;
    table(&QUEUE_COLUMNS, &align, &rows)
}

/// Renders one queue as `key: value` lines with the values aligned.
pub fn queue_listing(q: &QueueInfo) -> String {
    let fields = [
        ("name", q.name.clone()),
        ("durable", yes_no(q.durable).to_string()),
        ("ready", q.ready.to_string()),
        ("unacked", q.unacked.to_string()),
        ("consumers", q.consumers.to_string()),
        ("published", q.published_total.to_string()),
        ("delivered", q.delivered_total.to_string()),
        ("acked", q.acked_total.to_string()),
        ("redelivered", q.redelivered_total.to_string()),
    ];
    listing(&fields)
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
    listing(&fields)
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
fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, ready: u64, durable: bool) -> QueueInfo {
        QueueInfo {
            name: name.to_string(),
            durable,
            ready,
            unacked: 2,
            consumers: 1,
            published_total: 10,
            delivered_total: 7,
            acked_total: 5,
            redelivered_total: 1,
        }
    }

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
    fn queue_table_has_a_header_and_sorted_rows() {
        let text = queue_table(&[info("zeta", 3, true), info("alpha", 12345, false)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME   READY  UNACKED  CONSUMERS  DURABLE"), "{}", lines[0]);
        assert!(lines[1].starts_with("alpha  12345"), "{}", lines[1]);
        assert!(lines[2].starts_with("zeta       3"), "{}", lines[2]);
        // Every line is as wide as the header except where trailing spaces were trimmed.
        assert!(lines.iter().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn empty_queue_table_is_just_the_header() {
        assert_eq!(queue_table(&[]).lines().count(), 1);
    }

    #[test]
    fn queue_json_has_exactly_the_documented_keys() {
        let value: serde_json::Value =
            serde_json::from_str(&queue_json(&info("q", 3, true)).unwrap()).unwrap();
        let object = value.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "acked",
                "consumers",
                "delivered",
                "durable",
                "name",
                "published",
                "ready",
                "redelivered",
                "unacked"
            ]
        );
        assert_eq!(object["durable"], serde_json::Value::Bool(true));
        assert_eq!(object["ready"], serde_json::json!(3));
        assert_eq!(object["published"], serde_json::json!(10));
    }

    #[test]
    fn queues_json_is_an_array() {
        let value: serde_json::Value =
            serde_json::from_str(&queues_json(&[info("a", 1, false), info("b", 2, false)]).unwrap()).unwrap();
        assert_eq!(value.as_array().map(Vec::len), Some(2));
        let empty: serde_json::Value = serde_json::from_str(&queues_json(&[]).unwrap()).unwrap();
        assert_eq!(empty, serde_json::json!([]));
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
        assert!(!text.contains("broker rss"), "{text}");

        let with_rss = BenchReport { broker_rss_mb: Some(123.4), ..report };
        let value = serde_json::to_value(&with_rss).unwrap();
        assert_eq!(value["broker_rss_mb"], serde_json::json!(123.4));
        assert_eq!(value.as_object().unwrap().len(), expected.len() + 1);
        assert!(
            bench_listing(&with_rss).contains("broker rss:   peak 123.4 MB"),
            "{}",
            bench_listing(&with_rss)
        );
    }

    #[test]
    fn json_line_ends_with_a_newline() {
        let mut out = Vec::new();
        write_json_line(&mut out, &serde_json::json!({"k": 1})).unwrap();
        assert_eq!(out, b"{\"k\":1}\n");
    }
}
