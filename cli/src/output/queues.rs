//! Queues as `hopper queue list` and `queue stats` print them: the table, the listing and the
//! JSON objects.

use std::collections::BTreeMap;
use std::time::Duration;

use hopper_client::json::QueueJson;
use hopper_client::{Overflow, QueueInfo};

use super::{listing, table, yes_no, Align};
use crate::time::{format_duration, now_ms};

/// Renders queues as `--json` prints them: one array, pretty-printed.
pub fn queues_json(queues: &[QueueInfo]) -> anyhow::Result<String> {
    let rows: Vec<QueueJson> = queues.iter().map(QueueInfo::to_json).collect();
    Ok(serde_json::to_string_pretty(&rows)?)
}

/// Renders one queue as `--json` prints it.
pub fn queue_json(queue: &QueueInfo) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(&queue.to_json())?)
}

/// Column headers of `hopper queue list`, in order.
const QUEUE_COLUMNS: [&str; 12] = [
    "NAME",
    "READY",
    "UNACKED",
    "DELAYED",
    "CONSUMERS",
    "DURABLE",
    "PUBLISHED",
    "DELIVERED",
    "ACKED",
    "REDELIVERED",
    "DLQ",
    "ALARM",
];

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
                q.delayed.to_string(),
                q.consumers.to_string(),
                yes_no(q.durable).to_string(),
                q.published_total.to_string(),
                q.delivered_total.to_string(),
                q.acked_total.to_string(),
                q.redelivered_total.to_string(),
                q.dead_letter.clone().unwrap_or_else(|| "-".to_string()),
                alarm_cell(q),
            ]
        })
        .collect();
    // Names read best left-aligned, the counters right-aligned.
    let mut align = [Align::Right; QUEUE_COLUMNS.len()];
    align[0] = Align::Left;
    align[5] = Align::Left;
    align[10] = Align::Left;
    align[11] = Align::Left;
    table(&QUEUE_COLUMNS, &align, &rows)
}

/// A queue's alarm as one cell: `ALARM >100` while raised, `>100` while armed, `-` without one.
pub fn alarm_cell(q: &QueueInfo) -> String {
    match (q.alarm_depth, q.alarm) {
        (Some(depth), true) => format!("ALARM >{depth}"),
        (Some(depth), false) => format!(">{depth}"),
        (None, true) => "ALARM".to_string(),
        (None, false) => "-".to_string(),
    }
}

/// The line `queue list` prints above its table while publishers are blocked.
pub fn blocked_line(reason: &str) -> String {
    format!("publishers are blocked: {reason}\n")
}

/// Renders one queue as `key: value` lines with the values aligned.
pub fn queue_listing(q: &QueueInfo) -> String {
    let fields = [
        ("name", q.name.clone()),
        ("durable", yes_no(q.durable).to_string()),
        ("ready", q.ready.to_string()),
        ("unacked", q.unacked.to_string()),
        ("delayed", q.delayed.to_string()),
        ("consumers", q.consumers.to_string()),
        ("published", q.published_total.to_string()),
        ("delivered", q.delivered_total.to_string()),
        ("acked", q.acked_total.to_string()),
        ("redelivered", q.redelivered_total.to_string()),
        ("dead lettered", dead_lettered(q)),
        ("dead letter", q.dead_letter.clone().unwrap_or_else(|| "-".to_string())),
        ("max deliveries", q.max_deliveries.map_or_else(|| "-".to_string(), |n| n.to_string())),
        ("retry backoff", durations(&q.retry_backoff)),
        ("message ttl", q.message_ttl.map_or_else(|| "-".to_string(), format_duration)),
        ("ack timeout", q.ack_timeout.map_or_else(|| "-".to_string(), format_duration)),
        ("max length", q.max_length.map_or_else(|| "-".to_string(), |n| n.to_string())),
        ("max bytes", q.max_bytes.map_or_else(|| "-".to_string(), |n| n.to_string())),
        ("overflow", overflow(q)),
        ("waiting bytes", q.waiting_bytes.to_string()),
        ("oldest ready", oldest_ready(q.oldest_ready_ms, now_ms())),
        ("alarm", alarm_state(q)),
        ("read error", q.read_error.clone().unwrap_or_else(|| "-".to_string())),
    ];
    listing(&fields)
}

/// The overflow mode, `-` when the queue is unbounded (it then never applies).
fn overflow(q: &QueueInfo) -> String {
    if q.max_length.is_none() && q.max_bytes.is_none() && q.overflow == Overflow::RejectPublish {
        return "-".to_string();
    }
    q.overflow.to_string()
}

/// How long the oldest waiting message has waited, e.g. `1.5s ago`; `-` for an empty queue.
fn oldest_ready(oldest_ms: Option<u64>, now_ms: u64) -> String {
    match oldest_ms {
        Some(ms) => {
            let ms = now_ms.saturating_sub(ms);
            // Past a second, milliseconds are noise: tenths up to 10 s, then whole seconds.
            let shown = match ms {
                0..1_000 => ms,
                1_000..10_000 => ms - ms % 100,
                _ => ms - ms % 1000,
            };
            format!("{} ago", format_duration(Duration::from_millis(shown)))
        }
        None => "-".to_string(),
    }
}

/// The alarm as the listing shows it: `raised (depth > 100)`, `armed (depth > 100)` or `-`.
fn alarm_state(q: &QueueInfo) -> String {
    match (q.alarm_depth, q.alarm) {
        (Some(depth), true) => format!("raised (ready > {depth})"),
        (Some(depth), false) => format!("armed (ready > {depth})"),
        (None, true) => "raised".to_string(),
        (None, false) => "-".to_string(),
    }
}

/// The dead-message count of a queue with its reasons, e.g. `3 (delivery_limit 1, rejected 2)`.
fn dead_lettered(q: &QueueInfo) -> String {
    let by_reason: BTreeMap<&str, u64> =
        q.dead_lettered.iter().filter(|(_, n)| **n > 0).map(|(r, n)| (r.as_str(), *n)).collect();
    let total: u64 = by_reason.values().sum();
    if total == 0 {
        return "0".to_string();
    }
    let reasons: Vec<String> = by_reason.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
    format!("{total} ({})", reasons.join(", "))
}

/// Durations as a flag would take them, e.g. `1s,5s,30s`; `-` for none.
fn durations(list: &[Duration]) -> String {
    if list.is_empty() {
        return "-".to_string();
    }
    list.iter().map(|d| format_duration(*d)).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

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
            delayed: 4,
            ..QueueInfo::default()
        }
    }

    fn failing(name: &str) -> QueueInfo {
        QueueInfo {
            dead_lettered: HashMap::from([("rejected".to_string(), 2), ("delivery_limit".to_string(), 1)]),
            dead_letter: Some(format!("{name}.dead")),
            max_deliveries: Some(5),
            retry_backoff: vec![Duration::from_secs(1), Duration::from_millis(1500), Duration::from_secs(60)],
            message_ttl: Some(Duration::from_secs(3600)),
            ack_timeout: Some(Duration::from_secs(30)),
            ..info(name, 1, true)
        }
    }

    #[test]
    fn queue_table_has_a_header_and_sorted_rows() {
        let text = queue_table(&[info("zeta", 3, true), info("alpha", 12345, false)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME   READY  UNACKED  DELAYED  CONSUMERS  DURABLE"), "{}", lines[0]);
        assert!(lines[0].ends_with("REDELIVERED  DLQ  ALARM"), "{}", lines[0]);
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
                "ack_timeout_ms",
                "acked",
                "alarm",
                "alarm_depth",
                "consumers",
                "dead_letter",
                "dead_letter_exchange",
                "dead_letter_routing_key",
                "dead_lettered",
                "delayed",
                "delivered",
                "durable",
                "is_dead_letter_queue",
                "max_bytes",
                "max_deliveries",
                "max_length",
                "message_ttl_ms",
                "name",
                "overflow",
                "published",
                "read_error",
                "ready",
                "redelivered",
                "replicated",
                "retry_backoff_ms",
                "served_by",
                "unacked",
                "waiting_bytes"
            ]
        );
        assert_eq!(object["overflow"], "reject-publish");
        assert_eq!(object["alarm"], false);
        assert_eq!(object["waiting_bytes"], 0);
        assert_eq!(object["durable"], serde_json::Value::Bool(true));
        assert_eq!(object["ready"], serde_json::json!(3));
        assert_eq!(object["published"], serde_json::json!(10));
        assert_eq!(object["delayed"], serde_json::json!(4));
        for unset in [
            "dead_letter",
            "dead_letter_exchange",
            "dead_letter_routing_key",
            "max_deliveries",
            "message_ttl_ms",
            "ack_timeout_ms",
            "max_length",
            "max_bytes",
            "alarm_depth",
            "read_error",
        ] {
            assert_eq!(object[unset], serde_json::Value::Null, "{unset}");
        }
        assert_eq!(object["retry_backoff_ms"], serde_json::json!([]));
        assert_eq!(object["dead_lettered"], serde_json::json!({}));
    }

    #[test]
    fn queue_json_shows_failure_settings_and_deaths() {
        let value: serde_json::Value = serde_json::from_str(&queue_json(&failing("jobs")).unwrap()).unwrap();
        assert_eq!(value["dead_letter"], "jobs.dead");
        assert_eq!(value["max_deliveries"], 5);
        assert_eq!(value["retry_backoff_ms"], serde_json::json!([1000, 1500, 60000]));
        assert_eq!(
            (value["message_ttl_ms"].as_u64(), value["ack_timeout_ms"].as_u64()),
            (Some(3_600_000), Some(30_000))
        );
        assert_eq!(value["dead_lettered"], serde_json::json!({"delivery_limit": 1, "rejected": 2}));
    }

    #[test]
    fn queue_table_names_the_dead_letter_queue() {
        let text = queue_table(&[failing("jobs"), info("plain", 0, false)]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("jobs "), "{}", lines[1]);
        assert!(lines[1].ends_with("  jobs.dead  -"), "{}", lines[1]);
        assert!(lines[2].ends_with("  -          -"), "{}", lines[2]);
    }

    fn bounded(name: &str) -> QueueInfo {
        QueueInfo {
            max_length: Some(7),
            max_bytes: Some(4096),
            overflow: Overflow::DropHead,
            waiting_bytes: 35,
            alarm_depth: Some(100),
            alarm: true,
            ..info(name, 101, false)
        }
    }

    #[test]
    fn queue_table_shows_the_alarm() {
        let armed = QueueInfo { alarm_depth: Some(5), ..info("armed", 1, false) };
        let text = queue_table(&[bounded("hot"), armed, info("plain", 0, false)]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("  ALARM"), "{}", lines[0]);
        assert!(lines[1].starts_with("armed ") && lines[1].ends_with("  >5"), "{}", lines[1]);
        assert!(lines[2].starts_with("hot ") && lines[2].ends_with("  ALARM >100"), "{}", lines[2]);
        assert!(lines[3].ends_with("  -"), "{}", lines[3]);
        assert_eq!(blocked_line("memory"), "publishers are blocked: memory\n");
    }

    #[test]
    fn queue_json_shows_limits_and_alarm() {
        let value: serde_json::Value = serde_json::from_str(&queue_json(&bounded("q")).unwrap()).unwrap();
        assert_eq!((value["max_length"].as_u64(), value["max_bytes"].as_u64()), (Some(7), Some(4096)));
        assert_eq!(value["overflow"], "drop-head");
        assert_eq!((value["waiting_bytes"].as_u64(), value["alarm_depth"].as_u64()), (Some(35), Some(100)));
        assert_eq!(value["alarm"], true);
    }

    #[test]
    fn queue_listing_shows_limits_and_alarm() {
        let text = queue_listing(&bounded("q"));
        for line in [
            "max length:     7",
            "max bytes:      4096",
            "overflow:       drop-head",
            "waiting bytes:  35",
            "oldest ready:   -",
            "alarm:          raised (ready > 100)",
        ] {
            assert!(text.lines().any(|l| l == line), "missing '{line}' in\n{text}");
        }
        let plain = queue_listing(&info("q", 0, false));
        for line in ["max length:     -", "overflow:       -", "alarm:          -"] {
            assert!(plain.lines().any(|l| l == line), "missing '{line}' in\n{plain}");
        }
    }

    #[test]
    fn oldest_ready_is_an_age() {
        assert_eq!(oldest_ready(None, 10_000), "-");
        assert_eq!(oldest_ready(Some(8_500), 10_000), "1.5s ago");
        assert_eq!(oldest_ready(Some(8_345), 10_000), "1.6s ago");
        assert_eq!(oldest_ready(Some(0), 35_552), "35s ago");
        assert_eq!(oldest_ready(Some(9_750), 10_000), "250ms ago");
        assert_eq!(oldest_ready(Some(0), 90_250), "90s ago");
        assert_eq!(oldest_ready(Some(20_000), 10_000), "0s ago", "a clock behind the broker's is no error");
    }

    #[test]
    fn queue_listing_shows_failure_settings() {
        let text = queue_listing(&failing("jobs"));
        for line in [
            "delayed:        4",
            "dead lettered:  3 (delivery_limit 1, rejected 2)",
            "dead letter:    jobs.dead",
            "max deliveries: 5",
            "retry backoff:  1s,1.5s,1m",
            "message ttl:    1h",
            "ack timeout:    30s",
        ] {
            assert!(text.lines().any(|l| l == line), "missing '{line}' in\n{text}");
        }
        let plain = queue_listing(&info("q", 0, false));
        for line in ["dead lettered:  0", "dead letter:    -", "retry backoff:  -", "ack timeout:    -"] {
            assert!(plain.lines().any(|l| l == line), "missing '{line}' in\n{plain}");
        }
    }

    #[test]
    fn queues_json_is_an_array() {
        let value: serde_json::Value =
            serde_json::from_str(&queues_json(&[info("a", 1, false), info("b", 2, false)]).unwrap()).unwrap();
        assert_eq!(value.as_array().map(Vec::len), Some(2));
        let empty: serde_json::Value = serde_json::from_str(&queues_json(&[]).unwrap()).unwrap();
        assert_eq!(empty, serde_json::json!([]));
    }
}
