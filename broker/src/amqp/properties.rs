//! AMQP message properties, kept on a Hopper message: `content-type` as its content type, the
//! `headers` table as its headers (values as text), and every other property as a header named
//! `amqp-<property>` (`amqp-reply-to`, `amqp-correlation-id`, ...), so that a Hopper consumer
//! sees them and an AMQP consumer gets them back as properties. A table with values other than
//! strings (numbers, booleans, void, arrays, tables) is also kept whole, encoded, in the header
//! `amqp-headers`, so an AMQP consumer gets every value back with its type.

use std::collections::HashMap;

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use base64::Engine as _;

/// The header keeping a typed headers table whole: its AMQP encoding, in base64.
const TYPED_HEADERS: &str = "amqp-headers";

use crate::message::Payload;

/// The properties kept as `amqp-` headers, as (header, read, write).
type Property =
    (&'static str, fn(&AMQPProperties) -> Option<String>, fn(AMQPProperties, &str) -> AMQPProperties);

fn short(value: &Option<ShortString>) -> Option<String> {
    value.as_ref().map(|s| s.as_str().to_owned())
}

/// A number property as text, written without the formatting machinery: one is on nearly
/// every message (the delivery mode of a persistent one).
fn number(value: Option<impl itoa::Integer>) -> Option<String> {
    value.map(|n| itoa::Buffer::new().format(n).to_owned())
}

const PROPERTIES: [Property; 11] = [
    ("amqp-content-encoding", |p| short(p.content_encoding()), |p, v| p.with_content_encoding(v.into())),
    (
        "amqp-delivery-mode",
        |p| number(*p.delivery_mode()),
        |p, v| match v.parse() {
            Ok(mode) => p.with_delivery_mode(mode),
            Err(_) => p,
        },
    ),
    (
        "amqp-priority",
        |p| number(*p.priority()),
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
        |p| number(*p.timestamp()),
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
    if let Some(table) = properties.headers().as_ref().filter(|table| !all_strings(table)) {
        headers.insert(TYPED_HEADERS.to_owned(), encode_table(table));
    }
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
    let mut table =
        payload.headers().get(TYPED_HEADERS).and_then(|encoded| decode_table(encoded)).unwrap_or_default();
    for (name, value) in payload.headers() {
        match PROPERTIES.iter().find(|(property, _, _)| property == name) {
            Some((_, _, write)) => properties = write(properties, value),
            // The typed value, if the table was kept whole, wins over its text.
            None if name == TYPED_HEADERS || table.inner().contains_key(name.as_str()) => {}
            None => {
                table.insert(name.as_str().into(), AMQPValue::LongString(value.as_str().into()));
            }
        }
    }
    let deaths = payload.deaths();
    if let (Some(first), Some(last)) = (deaths.first(), deaths.last()) {
        table.insert("x-death".into(), AMQPValue::FieldArray(x_death(deaths).into()));
        for (prefix, death) in [("x-first-death", first), ("x-last-death", last)] {
            for (field, value) in [
                ("queue", death.queue.as_str()),
                ("reason", death.reason.as_str()),
                ("exchange", death.exchange.as_str()),
            ] {
                let value = AMQPValue::LongString(value.into());
                table.insert(format!("{prefix}-{field}").into(), value);
            }
        }
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

/// A header value as text: strings as they are, void as nothing, arrays and tables as JSON,
/// anything else written out.
fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Void => String::new(),
        other => json(other).to_string(),
    }
}

/// A header value as JSON.
fn json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(n) => Value::from(*n),
        AMQPValue::Double(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Void => Value::Null,
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => Value::from(text(value)),
        AMQPValue::FieldArray(items) => Value::Array(items.as_slice().iter().map(json).collect()),
        AMQPValue::FieldTable(table) => {
            Value::Object(table.inner().iter().map(|(k, v)| (k.as_str().to_owned(), json(v))).collect())
        }
        other => Value::from(format!("{other:?}")),
    }
}

/// True if every value of `table` is a string: its text is all of it.
fn all_strings(table: &FieldTable) -> bool {
    table.inner().values().all(|value| matches!(value, AMQPValue::LongString(_) | AMQPValue::ShortString(_)))
}

/// `table` in its AMQP encoding, in base64.
fn encode_table(table: &FieldTable) -> String {
    let context = amq_protocol::types::generation::gen_field_table(table)(Vec::new().into());
    let bytes = context.map(|context| context.write).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The table `encoded` holds, if it reads.
fn decode_table(encoded: &str) -> Option<FieldTable> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let (rest, table) = amq_protocol::types::parsing::parse_field_table(bytes.as_slice()).ok()?;
    rest.is_empty().then_some(table)
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
        assert!(!table.inner().contains_key(&ShortString::from(TYPED_HEADERS)));
        assert_eq!(table.inner().get("attempt"), Some(&AMQPValue::LongInt(3)), "its type kept");
    }

    #[test]
    fn typed_headers_come_back_typed_and_read_as_text_meanwhile() {
        let mut inner = FieldTable::default();
        inner.insert("k".into(), AMQPValue::LongString("v".into()));
        let mut table = FieldTable::default();
        table.insert("none".into(), AMQPValue::Void);
        table.insert("flag".into(), AMQPValue::Boolean(true));
        table.insert(
            "list".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongInt(1), AMQPValue::LongString("a".into())].into()),
        );
        table.insert("table".into(), AMQPValue::FieldTable(inner));
        let (headers, _) = from_amqp(&AMQPProperties::default().with_headers(table.clone()));
        assert_eq!((headers["none"].as_str(), headers["flag"].as_str()), ("", "true"));
        assert_eq!((headers["list"].as_str(), headers["table"].as_str()), (r#"[1,"a"]"#, r#"{"k":"v"}"#));
        // A Hopper client adds a header on the way: it comes as a string beside the typed ones.
        let mut headers = headers;
        headers.insert("added".into(), "by hopper".into());
        let back = to_amqp(&Payload::default().with_properties(headers, String::new()));
        let mut expected = table;
        expected.insert("added".into(), AMQPValue::LongString("by hopper".into()));
        assert_eq!(back.headers().as_ref(), Some(&expected));

        let (strings, _) = from_amqp(&AMQPProperties::default().with_headers(expected.clone()));
        assert!(strings.contains_key(TYPED_HEADERS));
        let mut plain = FieldTable::default();
        plain.insert("only".into(), AMQPValue::LongString("text".into()));
        let (strings, _) = from_amqp(&AMQPProperties::default().with_headers(plain));
        assert!(!strings.contains_key(TYPED_HEADERS), "a table of strings is its text");
    }
}
