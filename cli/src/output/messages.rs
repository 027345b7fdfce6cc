//! Messages as `hopper consume`, `hopper get` and `hopper queue peek` print them, and the audit
//! trail as `hopper audit` prints it.

use std::io::Write;

use hopper_client::{AuditEvent, Delivery, Message};

use super::{table, write_json_line, Align};
use crate::time::format_unix_ms;

/// Renders peeked messages as `hopper queue peek` prints them: each body on its own line, or
/// with `json` one message object per line.
pub fn peeked(messages: &[Message], queue: &str, json: bool) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for message in messages {
        if json {
            write_json_line(&mut out, &message.to_json(queue))?;
        } else {
            out.extend_from_slice(String::from_utf8_lossy(&message.body).as_bytes());
            out.push(b'\n');
        }
    }
    Ok(String::from_utf8(out)?)
}

/// Prints one delivery as a line — its body as text, or with `json` its JSON object — and
/// flushes, so a reader sees it immediately.
pub fn write_delivery(out: &mut impl Write, delivery: &Delivery, json: bool) -> anyhow::Result<()> {
    if json {
        write_json_line(out, &delivery.to_json())?;
    } else {
        out.write_all(String::from_utf8_lossy(&delivery.body).as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
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
    use hopper_client::Death;

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
            exchange: String::new(),
            routing_key: String::new(),
        };
        assert_eq!(
            serde_json::to_value(death.to_json()).unwrap(),
            serde_json::json!({
                "reason": "delivery_limit",
                "queue": "jobs",
                "count": 5,
                "error": "boom",
                "first_time": 1,
                "last_time": 2,
                "died_at": 3,
                "exchange": "",
                "routing_key": ""
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
            exchange: String::new(),
            routing_key: String::new(),
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
                exchange: String::new(),
                routing_key: String::new(),
            }],
            replay_count: 2,
            deaths_omitted: 0,
            exchange: String::new(),
            routing_key: String::new(),
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
                "exchange",
                "headers",
                "message_id",
                "published_at_ms",
                "queue",
                "redelivered",
                "replay_count",
                "routing_key"
            ]
        );
        assert_eq!((value["queue"].as_str(), value["replay_count"].as_u64()), (Some("jobs.dead"), Some(2)));
        assert_eq!(value["death"]["reason"], "expired");
        assert_eq!(peeked(&[], "q", true).unwrap(), "");
    }

    #[test]
    fn audit_json_uses_the_wire_field_names() {
        let value = serde_json::to_value(event(9, "boom", None).to_json()).unwrap();
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
                "exchange",
                "message_id",
                "queue",
                "reason",
                "routing_key",
                "time_ms"
            ]
        );
        assert_eq!(value["dead_letter"], serde_json::Value::Null);
        assert_eq!(value["message_id"], "9", "ids are strings");
    }
}
