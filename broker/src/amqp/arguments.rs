//! The arguments of AMQP declares, as Hopper settings: RabbitMQ's `x-` queue arguments and
//! Hopper's own under `x-hopper-`. An argument Hopper cannot honour is refused
//! (PRECONDITION_FAILED), never ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use amq_protocol::types::{AMQPValue, FieldTable};

use crate::error::BrokerError;
use crate::routing::ExchangeKind;
use crate::settings::{Overflow, QueueSettings};

/// What a `queue.declare` asks for: the queue's settings, and the time after which it is
/// deleted unused (`x-expires`), which the AMQP listener keeps.
#[derive(Debug)]
pub struct Declared {
    pub settings: QueueSettings,
    pub expires: Option<Duration>,
}

/// The settings `queue.declare` asks for.
pub fn queue_settings(durable: bool, arguments: &FieldTable) -> Result<Declared, BrokerError> {
    let mut settings = QueueSettings { durable, ..QueueSettings::default() };
    let mut expires = None;
    for (name, value) in arguments.inner() {
        let name = name.as_str();
        let refused = |why: &str| BrokerError::InvalidArgument(format!("argument {name}: {why}"));
        let number = || whole(value).ok_or_else(|| refused("expected a non-negative whole number"));
        match name {
            "x-message-ttl" => settings.message_ttl_ms = number()?,
            "x-expires" => match number()? {
                0 => return Err(refused("must be at least 1 ms")),
                ms => expires = Some(Duration::from_millis(crate::settings::check_duration(name, ms)?)),
            },
            "x-max-length" => settings.max_length = number()?,
            "x-max-length-bytes" => settings.max_bytes = number()?,
            "x-delivery-limit" => {
                settings.max_deliveries = u32::try_from(number()?).map_err(|_| refused("too large"))?;
            }
            "x-dead-letter-exchange" => {
                settings.dead_letter_exchange = string(value).ok_or_else(|| refused("expected a string"))?
            }
            "x-dead-letter-routing-key" => {
                settings.dead_letter_routing_key =
                    string(value).ok_or_else(|| refused("expected a string"))?;
            }
            "x-overflow" => {
                let text = string(value).ok_or_else(|| refused("expected a string"))?;
                settings.overflow =
                    Overflow::parse(&text).ok_or_else(|| refused("expected reject-publish or drop-head"))?;
            }
            "x-queue-type" => match string(value).as_deref() {
                Some("classic") => {}
                Some("quorum") => settings.replicated = true,
                _ => return Err(refused("expected classic or quorum")),
            },
            "x-hopper-dead-letter" => {
                settings.dead_letter = string(value).ok_or_else(|| refused("expected a queue name"))?
            }
            "x-hopper-ack-timeout" => settings.ack_timeout_ms = number()?,
            "x-hopper-retry-backoff" => {
                let text = string(value).ok_or_else(|| refused("expected delays in ms, comma-separated"))?;
                settings.retry_backoff_ms = text
                    .split(',')
                    .map(|part| part.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| refused("expected delays in ms, comma-separated"))?;
            }
            _ => return Err(refused("not supported by Hopper")),
        }
    }
    // RabbitMQ's default exchange as the dead-letter exchange: the routing key names the queue.
    let default_exchange =
        arguments.inner().get("x-dead-letter-exchange").and_then(string).as_deref() == Some("");
    if default_exchange {
        if settings.dead_letter_routing_key.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "argument x-dead-letter-exchange: the default exchange ('') needs x-dead-letter-routing-key, \
                 the queue the dead go to"
                    .into(),
            ));
        }
        settings.dead_letter = std::mem::take(&mut settings.dead_letter_routing_key);
    }
    settings.validate()?;
    Ok(Declared { settings, expires })
}

/// Refuses the arguments of an `exchange.declare` other than `alternate-exchange`.
pub fn exchange_arguments(arguments: &FieldTable) -> Result<(), BrokerError> {
    match arguments.inner().keys().find(|name| name.as_str() != "alternate-exchange") {
        Some(name) => {
            Err(BrokerError::InvalidArgument(format!("argument {}: not supported by Hopper", name.as_str())))
        }
        None => Ok(()),
    }
}

/// The exchange type `kind` names.
pub fn exchange_kind(kind: &str) -> Result<ExchangeKind, BrokerError> {
    ExchangeKind::parse(kind).ok_or_else(|| {
        BrokerError::InvalidArgument(format!(
            "exchange type '{kind}': expected direct, fanout, topic or headers"
        ))
    })
}

/// The string argument `name`, if present.
pub fn text(arguments: &FieldTable, name: &str) -> Option<String> {
    arguments.inner().iter().find(|(key, _)| key.as_str() == name).and_then(|(_, value)| string(value))
}

/// Every argument as text (a headers exchange's binding: the headers to match and `x-match`).
pub fn table_text(arguments: &FieldTable) -> BTreeMap<String, String> {
    arguments
        .inner()
        .iter()
        .map(|(key, value)| {
            (
                key.as_str().to_owned(),
                string(value)
                    .unwrap_or_else(|| whole(value).map_or_else(|| format!("{value:?}"), |n| n.to_string())),
            )
        })
        .collect()
}

fn string(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn whole(value: &AMQPValue) -> Option<u64> {
    match *value {
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(n)),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(n)),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(n)),
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        AMQPValue::Timestamp(n) => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert((*key).into(), value.clone());
        }
        table
    }

    #[test]
    fn rabbitmq_arguments_become_hopper_settings() {
        let arguments = table(&[
            ("x-message-ttl", AMQPValue::LongInt(60_000)),
            ("x-dead-letter-exchange", AMQPValue::LongString("dlx".into())),
            ("x-max-length", AMQPValue::LongLongInt(10)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
            ("x-delivery-limit", AMQPValue::ShortInt(5)),
            ("x-hopper-retry-backoff", AMQPValue::LongString("100, 1000".into())),
            ("x-expires", AMQPValue::LongInt(1800)),
        ]);
        let Declared { settings, expires } = queue_settings(true, &arguments).unwrap();
        assert_eq!(expires, Some(Duration::from_millis(1800)));
        assert!(settings.durable);
        assert_eq!(settings.message_ttl_ms, 60_000);
        assert_eq!(settings.dead_letter_exchange, "dlx");
        assert_eq!((settings.max_length, settings.max_deliveries), (10, 5));
        assert_eq!(settings.retry_backoff_ms, [100, 1000]);

        let to_queue = table(&[
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            ("x-dead-letter-routing-key", AMQPValue::LongString("jobs.dead".into())),
        ]);
        let settings = queue_settings(false, &to_queue).unwrap().settings;
        assert_eq!(
            (settings.dead_letter.as_str(), settings.dead_letter_exchange.as_str()),
            ("jobs.dead", "")
        );
    }

    #[test]
    fn what_hopper_cannot_honour_is_refused_by_name() {
        for (name, value) in [
            ("x-expires", AMQPValue::LongInt(0)),
            ("x-expires", AMQPValue::LongLongInt(i64::MAX)),
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            ("x-max-priority", AMQPValue::ShortShortUInt(10)),
            ("x-message-ttl", AMQPValue::LongInt(-1)),
            ("x-queue-type", AMQPValue::LongString("stream".into())),
            ("x-overflow", AMQPValue::LongString("reject-publish-dlx".into())),
        ] {
            let err = queue_settings(false, &table(&[(name, value)])).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
        assert!(exchange_kind("x-consistent-hash").is_err());
        assert_eq!(exchange_kind("topic").unwrap(), ExchangeKind::Topic);
    }
}
