//! The JSON forms of a queue, a message and an audit event: one type each, used by the HTTP
//! API and by the CLI's `--json` output, so both print the same keys.
//!
//! Message ids are broker-assigned 64-bit numbers above 2^53, which JavaScript and jq cannot
//! hold exactly as JSON numbers: they are written as decimal strings (`"1843127473647616000"`).
//! Reading accepts a string or a number.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pb;

/// A queue: its counts, its settings (null when unset), alarm and read state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueJson {
    /// The queue's name.
    pub name: String,
    /// Whether its messages are kept on disk.
    pub durable: bool,
    /// Messages waiting for a consumer.
    pub ready: u64,
    /// Deliveries not yet settled.
    pub unacked: u64,
    /// Messages waiting for a publish delay or retry backoff.
    pub delayed: u64,
    /// Consumers attached now.
    pub consumers: u32,
    /// Messages published since the broker started.
    pub published: u64,
    /// Deliveries made, redeliveries included.
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries of messages that had been delivered before.
    pub redelivered: u64,
    /// Messages that died in the queue, by reason.
    pub dead_lettered: BTreeMap<String, u64>,
    /// Body bytes of the waiting messages.
    pub waiting_bytes: u64,
    /// The dead-letter queue; null when dead messages are dropped.
    pub dead_letter: Option<String>,
    /// The exchange dead messages are published to; null for none.
    pub dead_letter_exchange: Option<String>,
    /// Their routing key there; null keeps their own.
    pub dead_letter_routing_key: Option<String>,
    /// Deliveries after which a failing message dies; null for no limit.
    pub max_deliveries: Option<u32>,
    /// Retry delays in milliseconds; empty for immediate redelivery.
    pub retry_backoff_ms: Vec<u64>,
    /// Time to live of messages in milliseconds; null for none.
    pub message_ttl_ms: Option<u64>,
    /// Ack timeout in milliseconds; null for none.
    pub ack_timeout_ms: Option<u64>,
    /// Most waiting messages; null for unbounded.
    pub max_length: Option<u64>,
    /// Most waiting body bytes; null for unbounded.
    pub max_bytes: Option<u64>,
    /// What a full queue does: reject-publish or drop-head.
    pub overflow: String,
    /// Ready depth above which the alarm is raised; null for no alarm.
    pub alarm_depth: Option<u64>,
    /// Whether the alarm is raised.
    pub alarm: bool,
    /// Why stored bodies cannot be read now (delivery paused); null while reads work.
    pub read_error: Option<String>,
    /// Whether some queue dead-letters into this one.
    pub is_dead_letter_queue: bool,
    /// Whether it is replicated over the cluster's nodes.
    #[serde(default)]
    pub replicated: bool,
    /// For a replicated queue, the node serving it; null when not known or not replicated.
    #[serde(default)]
    pub served_by: Option<u64>,
}

impl From<&pb::QueueInfo> for QueueJson {
    fn from(info: &pb::QueueInfo) -> Self {
        let settings = info.settings.clone().unwrap_or_default();
        let set = |v: u64| (v > 0).then_some(v);
        QueueJson {
            name: info.name.clone(),
            durable: settings.durable,
            ready: info.ready,
            unacked: info.unacked,
            delayed: info.delayed,
            consumers: info.consumers,
            published: info.published_total,
            delivered: info.delivered_total,
            acked: info.acked_total,
            redelivered: info.redelivered_total,
            dead_lettered: info.dead_lettered_total.iter().map(|(r, n)| (r.clone(), *n)).collect(),
            waiting_bytes: info.waiting_bytes,
            dead_letter: (!settings.dead_letter.is_empty()).then_some(settings.dead_letter),
            dead_letter_exchange: (!settings.dead_letter_exchange.is_empty())
                .then_some(settings.dead_letter_exchange),
            dead_letter_routing_key: (!settings.dead_letter_routing_key.is_empty())
                .then_some(settings.dead_letter_routing_key),
            max_deliveries: (settings.max_deliveries > 0).then_some(settings.max_deliveries),
            retry_backoff_ms: settings.retry_backoff_ms,
            message_ttl_ms: set(settings.message_ttl_ms),
            ack_timeout_ms: set(settings.ack_timeout_ms),
            max_length: set(settings.max_length),
            max_bytes: set(settings.max_bytes),
            overflow: if settings.overflow.is_empty() { "reject-publish".into() } else { settings.overflow },
            alarm_depth: set(info.alarm_depth),
            alarm: info.alarm,
            read_error: (!info.read_error.is_empty()).then(|| info.read_error.clone()),
            is_dead_letter_queue: info.is_dead_letter_queue,
            replicated: settings.replicated,
            served_by: (info.served_by > 0).then_some(info.served_by),
        }
    }
}

/// A message as consumers, pulls and peeks show it. A delivery adds its `delivery_tag` (push
/// consumers) or its `receipt` (HTTP pulls); a peeked message has neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageJson {
    /// Broker-assigned id, as a decimal string.
    #[serde(with = "id_string")]
    pub message_id: u64,
    /// The queue the message was taken from.
    pub queue: String,
    /// The exchange it was published to; empty for a publish to a queue.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The body as text; bytes that are not UTF-8 become U+FFFD.
    pub body: String,
    /// Application headers, sorted by key.
    pub headers: BTreeMap<String, String>,
    /// MIME type given at publish time; empty for none.
    pub content_type: String,
    /// Unix ms at which the broker first accepted the message.
    pub published_at_ms: u64,
    /// Deliveries of the message so far.
    pub delivery_count: u32,
    /// Whether it may have been delivered before.
    pub redelivered: bool,
    /// How many times it was moved out of a queue (replayed).
    pub replay_count: u32,
    /// Its latest death; null when it never died.
    pub death: Option<DeathJson>,
    /// Its deaths, oldest first: the first and the latest ones, at most 16.
    pub deaths: Vec<DeathJson>,
    /// Deaths left out of `deaths` between the first and the latest ones; absent when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deaths_omitted: u32,
    /// The delivery's tag within its consumer (deliveries to push consumers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_tag: Option<u64>,
    /// What settles the delivery (HTTP pulls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
}

impl MessageJson {
    /// The JSON form of `message`, taken from `queue`.
    pub fn new(message: &pb::Message, queue: &str) -> Self {
        MessageJson {
            message_id: message.message_id,
            queue: queue.to_owned(),
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            body: String::from_utf8_lossy(&message.body).into_owned(),
            headers: message.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            content_type: message.content_type.clone(),
            published_at_ms: message.published_at_ms,
            delivery_count: message.delivery_count,
            redelivered: message.redelivered,
            replay_count: message.replay_count,
            death: message.deaths.last().map(DeathJson::from),
            deaths: message.deaths.iter().map(DeathJson::from).collect(),
            deaths_omitted: message.deaths_omitted,
            delivery_tag: None,
            receipt: None,
        }
    }
}

/// One death of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeathJson {
    /// Why it died: rejected, delivery_limit, expired, maxlen or corrupt.
    pub reason: String,
    /// The queue it died in.
    pub queue: String,
    /// Its delivery count in that queue.
    pub count: u32,
    /// The error text of its last failed delivery, or empty.
    pub error: String,
    /// Unix ms of its first failed delivery there (0 if none).
    pub first_time: u64,
    /// Unix ms of its last failed delivery there (0 if none).
    pub last_time: u64,
    /// Unix ms at which it died.
    pub died_at: u64,
    /// The exchange it had been published to then; empty for a publish to a queue.
    pub exchange: String,
    /// Its routing key then.
    pub routing_key: String,
}

impl From<&pb::Death> for DeathJson {
    fn from(death: &pb::Death) -> Self {
        DeathJson {
            reason: death.reason.clone(),
            queue: death.queue.clone(),
            count: death.count,
            error: death.error.clone(),
            first_time: death.first_failure_ms,
            last_time: death.last_failure_ms,
            died_at: death.died_at_ms,
            exchange: death.exchange.clone(),
            routing_key: death.routing_key.clone(),
        }
    }
}

/// One death from the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditJson {
    /// Unix ms at which the message died.
    pub time_ms: u64,
    /// The queue it died in.
    pub queue: String,
    /// The message's id, as a decimal string.
    #[serde(with = "id_string")]
    pub message_id: u64,
    /// Why: rejected, delivery_limit, expired, maxlen or corrupt.
    pub reason: String,
    /// Its delivery count in that queue.
    pub count: u32,
    /// The consumer of its last failed delivery (0 if none).
    pub consumer_id: u64,
    /// That consumer's connection (0 if none).
    pub connection_id: u64,
    /// The error text of its last failed delivery, or empty.
    pub error: String,
    /// Where it was moved; null when it was dropped.
    pub dead_letter: Option<String>,
    /// The exchange it had been published to; empty for a publish to a queue.
    #[serde(default)]
    pub exchange: String,
    /// Its routing key.
    #[serde(default)]
    pub routing_key: String,
}

impl From<&pb::AuditEvent> for AuditJson {
    fn from(event: &pb::AuditEvent) -> Self {
        AuditJson {
            time_ms: event.time_ms,
            queue: event.queue.clone(),
            message_id: event.message_id,
            reason: event.reason.clone(),
            count: event.count,
            consumer_id: event.consumer_id,
            connection_id: event.connection_id,
            error: event.error.clone(),
            dead_letter: (!event.dead_letter.is_empty()).then(|| event.dead_letter.clone()),
            exchange: event.exchange.clone(),
            routing_key: event.routing_key.clone(),
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A u64 written as a decimal string, read from a string or a number.
pub mod id_string {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `id` as a string.
    pub fn serialize<S: Serializer>(id: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(id)
    }

    /// Reads a string or a number.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Id {
            Text(String),
            Number(u64),
        }
        match Id::deserialize(deserializer)? {
            Id::Text(text) => text.parse().map_err(serde::de::Error::custom),
            Id::Number(number) => Ok(number),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_strings_both_ways() {
        let message = pb::Message { message_id: 1_843_127_473_647_616_001, ..Default::default() };
        let json = serde_json::to_value(MessageJson::new(&message, "q")).unwrap();
        assert_eq!(json["message_id"], "1843127473647616001");
        assert!(json.get("delivery_tag").is_none() && json.get("receipt").is_none());
        let back: MessageJson = serde_json::from_value(json).unwrap();
        assert_eq!(back.message_id, 1_843_127_473_647_616_001);
        let mut old = serde_json::to_value(AuditJson::from(&pb::AuditEvent::default())).unwrap();
        old["message_id"] = serde_json::json!(42);
        assert_eq!(serde_json::from_value::<AuditJson>(old).unwrap().message_id, 42);
    }

    #[test]
    fn unset_settings_are_null() {
        let json = serde_json::to_value(QueueJson::from(&pb::QueueInfo::default())).unwrap();
        for key in ["dead_letter", "max_deliveries", "message_ttl_ms", "alarm_depth", "read_error"] {
            assert!(json[key].is_null(), "{key}");
        }
        assert_eq!(json["overflow"], "reject-publish");
    }
}
