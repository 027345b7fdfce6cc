//! Messages as `hopper consume`, `hopper get` and `hopper queue peek` print them, and the audit
//! trail as `hopper audit` prints it.

use std::collections::BTreeMap;
use std::io::Write;

use hopper_client::{AuditEvent, Death, Delivery, Message};
use serde::Serialize;

use super::{table, write_json_line, Align};
use crate::time::format_unix_ms;

/// A delivery as `hopper consume --json` prints it, one object per line: the keys of
/// [`MessageJson`] plus the delivery's tag.
#[derive(Debug, Serialize)]
pub struct DeliveryJson<'a> {
    /// The message's keys.
    #[serde(flatten)]
    pub message: MessageJson<'a>,
    /// The delivery's tag within its consumer.
    pub delivery_tag: u64,
}

/// A message as `hopper queue peek --json` prints it (and, with `delivery_tag` added, as
/// `hopper consume --json` and `hopper get --json` do).
#[derive(Debug, Serialize)]
pub struct MessageJson<'a> {
    /// The body as text; bytes that are not UTF-8 become U+FFFD.
    pub body: std::borrow::Cow<'a, str>,
    /// Application headers, sorted by key so output is stable.
    pub headers: BTreeMap<&'a str, &'a str>,
    /// Whether the message was delivered before.
    pub redelivered: bool,
    /// Deliveries of this message so far.
    pub delivery_count: u32,
    /// The queue the message waits in.
    pub queue: &'a str,
    /// Broker-assigned message id.
    pub message_id: u64,
    /// MIME type given at publish time; empty for none.
    pub content_type: &'a str,
    /// Unix time in milliseconds at which the broker accepted the message.
    pub published_at_ms: u64,
    /// The message's latest death; null when it never died.
    pub death: Option<DeathJson<'a>>,
    /// Every death of the message, oldest first.
    pub deaths: Vec<DeathJson<'a>>,
    /// How many times the message was moved out of a queue (replayed).
    pub replay_count: u32,
}

impl<'a> MessageJson<'a> {
    /// The JSON form of `message`, waiting in `queue`.
    pub fn new(message: &'a Message, queue: &'a str) -> Self {
        MessageJson {
            body: String::from_utf8_lossy(&message.body),
            headers: message.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            redelivered: message.redelivered,
            delivery_count: message.delivery_count,
            queue,
            message_id: message.message_id,
            content_type: &message.content_type,
            published_at_ms: message.published_at_ms,
            death: message.deaths.last().map(DeathJson::from),
            deaths: message.deaths.iter().map(DeathJson::from).collect(),
            replay_count: message.replay_count,
        }
    }
}

/// Renders peeked messages as `hopper queue peek` prints them: each body on its own line, or
/// with `json` one [`MessageJson`] per line.
pub fn peeked(messages: &[Message], queue: &str, json: bool) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for message in messages {
        if json {
            write_json_line(&mut out, &MessageJson::new(message, queue))?;
        } else {
            out.extend_from_slice(String::from_utf8_lossy(&message.body).as_bytes());
            out.push(b'\n');
        }
    }
    Ok(String::from_utf8(out)?)
}

/// One death of a message as the `death` and `deaths` keys of a delivery print it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DeathJson<'a> {
    /// Why it died: rejected, delivery_limit, expired, maxlen or corrupt.
    pub reason: &'a str,
    /// The queue it died in.
    pub queue: &'a str,
    /// Its delivery count in that queue.
    pub count: u32,
    /// The error text of its last failed delivery, or empty.
    pub error: &'a str,
    /// Unix ms of its first failed delivery there (0 if none).
    pub first_time: u64,
    /// Unix ms of its last failed delivery there (0 if none).
    pub last_time: u64,
    /// Unix ms at which it died.
    pub died_at: u64,
}

impl<'a> From<&'a Death> for DeathJson<'a> {
    fn from(death: &'a Death) -> Self {
        DeathJson {
            reason: &death.reason,
            queue: &death.queue,
            count: death.count,
            error: &death.error,
            first_time: death.first_failure_ms,
            last_time: death.last_failure_ms,
            died_at: death.died_at_ms,
        }
    }
}

impl<'a> From<&'a Delivery> for DeliveryJson<'a> {
    fn from(delivery: &'a Delivery) -> Self {
        let message = MessageJson {
            body: String::from_utf8_lossy(&delivery.body),
            headers: delivery.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            redelivered: delivery.redelivered,
            delivery_count: delivery.delivery_count,
            queue: delivery.queue(),
            message_id: delivery.message_id,
            content_type: &delivery.content_type,
            published_at_ms: delivery.published_at_ms,
            death: delivery.deaths.last().map(DeathJson::from),
            deaths: delivery.deaths.iter().map(DeathJson::from).collect(),
            replay_count: delivery.replay_count,
        };
        DeliveryJson { message, delivery_tag: delivery.delivery_tag }
    }
}

/// Prints one delivery as a line — its body as text, or with `json` a [`DeliveryJson`] — and
/// flushes, so a reader sees it immediately.
pub fn write_delivery(out: &mut impl Write, delivery: &Delivery, json: bool) -> anyhow::Result<()> {
    if json {
        write_json_line(out, &DeliveryJson::from(delivery))?;
    } else {
        out.write_all(String::from_utf8_lossy(&delivery.body).as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// An audit event as `hopper audit --json` prints it: the wire's field names.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AuditJson<'a> {
    /// Unix ms at which the message died.
    pub time_ms: u64,
    /// The queue it died in.
    pub queue: &'a str,
    /// The message's id.
    pub message_id: u64,
    /// Why: rejected, delivery_limit, expired, maxlen or corrupt.
    pub reason: &'a str,
    /// Its delivery count in that queue.
    pub count: u32,
    /// The consumer of its last failed delivery (0 if none).
    pub consumer_id: u64,
    /// That consumer's connection (0 if none).
    pub connection_id: u64,
    /// The error text of its last failed delivery, or empty.
    pub error: &'a str,
    /// Where it was moved; null when it was dropped.
    pub dead_letter: Option<&'a str>,
}

impl<'a> From<&'a AuditEvent> for AuditJson<'a> {
    fn from(event: &'a AuditEvent) -> Self {
        AuditJson {
            time_ms: event.time_ms,
            queue: &event.queue,
            message_id: event.message_id,
            reason: &event.reason,
            count: event.count,
            consumer_id: event.consumer_id,
            connection_id: event.connection_id,
            error: &event.error,
            dead_letter: event.dead_letter.as_deref(),
        }
    }
}

/// Longest error text a table cell shows; the JSON output has all of it.
const MAX_ERROR_CELL: usize = 60;

/// Renders audit events as an aligned table, in the order given.
pub fn audit_table(events: &[AuditEvent]) -> String {
    const COLUMNS: [&str; 7] = ["TIME", "QUEUE", "MESSAGE_ID", "REASON", "COUNT", "ERROR", "DLQ"];
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                format_unix_ms(e.time_ms),
                e.queue.clone(),
                e.message_id.to_string(),
                e.reason.clone(),
                e.count.to_string(),
                error_cell(&e.error),
                e.dead_letter.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    let mut align = [Align::Left; COLUMNS.len()];
    align[2] = Align::Right;
    align[4] = Align::Right;
    table(&COLUMNS, &align, &rows)
}

/// An error text fit for one table cell: its first line, shortened, `-` when empty.
fn error_cell(error: &str) -> String {
    let line = error.lines().next().unwrap_or("").trim_end();
    if line.is_empty() {
        return "-".to_string();
    }
    let shortened = line.chars().count() > MAX_ERROR_CELL || line.len() < error.trim_end().len();
    let mut cell: String = line.chars().take(MAX_ERROR_CELL).collect();
    if shortened {
        cell.push('…');
    }
    cell
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn death_json_uses_the_documented_keys() {
        let death = Death {
            queue: "jobs".into(),
            reason: "delivery_limit".into(),
            count: 5,
            error: "boom".into(),
            first_failure_ms: 1,
            last_failure_ms: 2,
            died_at_ms: 3,
        };
        assert_eq!(
            serde_json::to_value(DeathJson::from(&death)).unwrap(),
            serde_json::json!({
                "reason": "delivery_limit",
                "queue": "jobs",
                "count": 5,
                "error": "boom",
                "first_time": 1,
                "last_time": 2,
                "died_at": 3
            })
        );
    }

    fn event(message_id: u64, error: &str, dead_letter: Option<&str>) -> AuditEvent {
        AuditEvent {
            time_ms: 1_700_000_000_123,
            queue: "jobs".into(),
            message_id,
            reason: "rejected".into(),
            count: 2,
            consumer_id: 7,
            connection_id: 3,
            error: error.into(),
            dead_letter: dead_letter.map(str::to_string),
        }
    }

    #[test]
    fn audit_table_shows_one_line_per_event() {
        let long = "x".repeat(100);
        let text = audit_table(&[
            event(1, "bad json\n  at line 1", Some("jobs.dead")),
            event(22, "", None),
            event(3, &long, None),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(
            lines[0].starts_with("TIME                      QUEUE  MESSAGE_ID  REASON    COUNT  ERROR"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with("2023-11-14T22:13:20.123Z  jobs            1  rejected      2  bad json…"),
            "{}",
            lines[1]
        );
        assert!(lines[1].ends_with("jobs.dead"), "{}", lines[1]);
        assert!(lines[2].contains(" -  ") && lines[2].ends_with(" -"), "{}", lines[2]);
        assert!(lines[3].contains(&format!("{}…", "x".repeat(MAX_ERROR_CELL))), "{}", lines[3]);
        assert_eq!(audit_table(&[]).lines().count(), 1);
    }

    #[test]
    fn peeked_messages_print_like_deliveries_without_a_tag() {
        let message = Message {
            message_id: 9,
            body: bytes::Bytes::from_static(b"hello"),
            headers: [("k".to_string(), "v".to_string())].into(),
            content_type: String::new(),
            published_at_ms: 1,
            delivery_count: 0,
            redelivered: false,
            deaths: vec![Death {
                queue: "jobs".into(),
                reason: "expired".into(),
                count: 0,
                error: String::new(),
                first_failure_ms: 0,
                last_failure_ms: 0,
                died_at_ms: 5,
            }],
            replay_count: 2,
        };
        assert_eq!(peeked(std::slice::from_ref(&message), "jobs.dead", false).unwrap(), "hello\n");
        let line = peeked(std::slice::from_ref(&message), "jobs.dead", true).unwrap();
        assert!(line.ends_with('\n') && line.lines().count() == 1, "{line}");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        let mut keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "body",
                "content_type",
                "death",
                "deaths",
                "delivery_count",
                "headers",
                "message_id",
                "published_at_ms",
                "queue",
                "redelivered",
                "replay_count"
            ]
        );
        assert_eq!((value["queue"].as_str(), value["replay_count"].as_u64()), (Some("jobs.dead"), Some(2)));
        assert_eq!(value["death"]["reason"], "expired");
        assert_eq!(peeked(&[], "q", true).unwrap(), "");
    }

    #[test]
    fn audit_json_uses_the_wire_field_names() {
        let value = serde_json::to_value(AuditJson::from(&event(9, "boom", None))).unwrap();
        let mut keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "connection_id",
                "consumer_id",
                "count",
                "dead_letter",
                "error",
                "message_id",
                "queue",
                "reason",
                "time_ms"
            ]
        );
        assert_eq!(value["dead_letter"], serde_json::Value::Null);
    }
}
