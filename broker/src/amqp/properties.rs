//! AMQP message properties, kept on a Hopper message: `content-type` as its content type, the
//! `headers` table as its headers (values as text), and every other property as a header named
//! `amqp-<property>` (`amqp-reply-to`, `amqp-correlation-id`, ...), so that a Hopper consumer
//! sees them and an AMQP consumer gets them back as properties.

use std::collections::HashMap;

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

use crate::message::Payload;

/// The properties kept as `amqp-` headers, as (header, read, write).
type Property =
    (&'static str, fn(&AMQPProperties) -> Option<String>, fn(AMQPProperties, &str) -> AMQPProperties);

fn short(value: &Option<ShortString>) -> Option<String> {
    value.as_ref().map(|s| s.as_str().to_owned())
}

const PROPERTIES: [Property; 11] = [
    ("amqp-content-encoding", |p| short(p.content_encoding()), |p, v| p.with_content_encoding(v.into())),
    (
        "amqp-delivery-mode",
        |p| p.delivery_mode().map(|m| m.to_string()),
        |p, v| match v.parse() {
            Ok(mode) => p.with_delivery_mode(mode),
            Err(_) => p,
        },
    ),
    (
        "amqp-priority",
        |p| p.priority().map(|m| m.to_string()),
        |p, v| match v.parse() {
            Ok(priority) => p.with_priority(priority),
            Err(_) => p,
        },
    ),
    ("amqp-correlation-id", |p| short(p.correlation_id()), |p, v| p.with_correlation_id(v.into())),
    ("amqp-reply-to", |p| short(p.reply_to()), |p, v| p.with_reply_to(v.into())),
    ("amqp-expiration", |p| short(p.expiration()), |p, v| p.with_expiration(v.into())),
    ("amqp-message-id", |p| short(p.message_id()), |p, v| p.with_message_id(v.into())),
    (
        "amqp-timestamp",
        |p| p.timestamp().map(|t| t.to_string()),
        |p, v| match v.parse() {
            Ok(timestamp) => p.with_timestamp(timestamp),
            Err(_) => p,
        },
    ),
    ("amqp-type", |p| short(p.kind()), |p, v| p.with_type(v.into())),
    ("amqp-user-id", |p| short(p.user_id()), |p, v| p.with_user_id(v.into())),
    ("amqp-app-id", |p| short(p.app_id()), |p, v| p.with_app_id(v.into())),
];

/// A published message's headers and content type, from its AMQP properties.
pub fn from_amqp(properties: &AMQPProperties) -> (HashMap<String, String>, String) {
    let mut headers: HashMap<String, String> = properties
        .headers()
        .as_ref()
        .map(|table| table.inner().iter().map(|(k, v)| (k.as_str().to_owned(), text(v))).collect())
        .unwrap_or_default();
    for (name, read, _) in PROPERTIES {
        if let Some(value) = read(properties) {
            headers.insert(name.to_owned(), value);
        }
    }
    (headers, short(properties.content_type()).unwrap_or_default())
}

/// The AMQP properties of a message, for delivery to an AMQP consumer.
pub fn to_amqp(payload: &Payload) -> AMQPProperties {
    let mut properties = AMQPProperties::default();
    if !payload.content_type().is_empty() {
        properties = properties.with_content_type(payload.content_type().into());
    }
    let mut table = FieldTable::default();
    for (name, value) in payload.headers() {
        match PROPERTIES.iter().find(|(property, _, _)| property == name) {
            Some((_, _, write)) => properties = write(properties, value),
            None => {
                table.insert(name.as_str().into(), AMQPValue::LongString(value.as_str().into()));
            }
        }
    }
    if !payload.deaths().is_empty() {
        table.insert("x-death".into(), AMQPValue::FieldArray(x_death(payload.deaths()).into()));
    }
    if !table.inner().is_empty() {
        properties = properties.with_headers(table);
    }
    properties
}

/// RabbitMQ's `x-death` header for a message's deaths: one table per queue and reason, the
/// latest first, with how many times it died so, when last (Unix seconds), and the exchange and
/// routing key it had then.
fn x_death(deaths: &[crate::message::Death]) -> Vec<AMQPValue> {
    let mut rows: Vec<(&crate::message::Death, u64)> = Vec::new();
    for death in deaths.iter().rev() {
        match rows.iter_mut().find(|(row, _)| row.queue == death.queue && row.reason == death.reason) {
            Some((_, count)) => *count += 1,
            None => rows.push((death, 1)),
        }
    }
    rows.into_iter()
        .map(|(death, count)| {
            let mut row = FieldTable::default();
            row.insert("count".into(), AMQPValue::LongLongInt(i64::try_from(count).unwrap_or(i64::MAX)));
            row.insert("reason".into(), AMQPValue::LongString(death.reason.as_str().into()));
            row.insert("queue".into(), AMQPValue::LongString(death.queue.as_str().into()));
            row.insert("time".into(), AMQPValue::Timestamp(death.died_at_ms / 1000));
            row.insert("exchange".into(), AMQPValue::LongString(death.exchange.as_str().into()));
            let keys = vec![AMQPValue::LongString(death.routing_key.as_str().into())];
            row.insert("routing-keys".into(), AMQPValue::FieldArray(keys.into()));
            AMQPValue::FieldTable(row)
        })
        .collect()
}

/// A header value as text: strings as they are, numbers and booleans written out, anything
/// else (tables, arrays, bytes) in its debug form.
fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_survive_a_trip_through_a_hopper_message() {
        let mut table = FieldTable::default();
        table.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        table.insert("attempt".into(), AMQPValue::LongInt(3));
        let sent = AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to("amq.gen-1".into())
            .with_correlation_id("c-9".into())
            .with_delivery_mode(2)
            .with_timestamp(1_700_000_000)
            .with_headers(table);
        let (headers, content_type) = from_amqp(&sent);
        assert_eq!(content_type, "application/json");
        assert_eq!(headers["amqp-reply-to"], "amq.gen-1");
        assert_eq!(headers["attempt"], "3");
        let payload = Payload::default().with_properties(headers, content_type);
        let back = to_amqp(&payload);
        assert_eq!(back.reply_to().as_ref().map(|s| s.as_str()), Some("amq.gen-1"));
        assert_eq!(back.correlation_id().as_ref().map(|s| s.as_str()), Some("c-9"));
        assert_eq!(*back.delivery_mode(), Some(2));
        assert_eq!(*back.timestamp(), Some(1_700_000_000));
        let table = back.headers().as_ref().unwrap();
        assert!(table.inner().contains_key(&ShortString::from("tenant")));
        assert!(!table.inner().contains_key(&ShortString::from("amqp-reply-to")));
    }
}
