//! The JSON forms of queues, messages, deliveries and audit events, as the CLI's `--json`
//! output and the broker's HTTP API print them: the same types, so the same keys. Message ids
//! are decimal strings (they exceed 2^53, the largest integer JavaScript reads exactly).

pub use hopper_proto::json::{AuditJson, DeathJson, MessageJson, QueueJson};

use crate::{AuditEvent, Death, Delivery, Message, QueueInfo};

impl QueueInfo {
    /// The JSON form of this queue.
    pub fn to_json(&self) -> QueueJson {
        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        QueueJson {
            name: self.name.clone(),
            durable: self.durable,
            ready: self.ready,
            unacked: self.unacked,
            delayed: self.delayed,
            consumers: self.consumers,
            published: self.published_total,
            delivered: self.delivered_total,
            acked: self.acked_total,
            redelivered: self.redelivered_total,
            dead_lettered: self.dead_lettered.iter().map(|(r, n)| (r.clone(), *n)).collect(),
            waiting_bytes: self.waiting_bytes,
            dead_letter: self.dead_letter.clone(),
            dead_letter_exchange: self.dead_letter_exchange.clone(),
            dead_letter_routing_key: self.dead_letter_routing_key.clone(),
            max_deliveries: self.max_deliveries,
            retry_backoff_ms: self.retry_backoff.iter().copied().map(millis).collect(),
            message_ttl_ms: self.message_ttl.map(millis),
            ack_timeout_ms: self.ack_timeout.map(millis),
            max_length: self.max_length,
            max_bytes: self.max_bytes,
            overflow: self.overflow.as_str().to_owned(),
            alarm_depth: self.alarm_depth,
            alarm: self.alarm,
            read_error: self.read_error.clone(),
            is_dead_letter_queue: self.is_dead_letter_queue,
            replicated: self.replicated,
            served_by: self.served_by,
        }
    }
}

impl Death {
    /// The JSON form of this death.
    pub fn to_json(&self) -> DeathJson {
        DeathJson {
            reason: self.reason.clone(),
            queue: self.queue.clone(),
            count: self.count,
            error: self.error.clone(),
            first_time: self.first_failure_ms,
            last_time: self.last_failure_ms,
            died_at: self.died_at_ms,
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
        }
    }
}

impl Message {
    /// The JSON form of this message, waiting in `queue`.
    pub fn to_json(&self, queue: &str) -> MessageJson {
        MessageJson {
            message_id: self.message_id,
            queue: queue.to_owned(),
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            body: String::from_utf8_lossy(&self.body).into_owned(),
            headers: self.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            content_type: self.content_type.clone(),
            published_at_ms: self.published_at_ms,
            delivery_count: self.delivery_count,
            redelivered: self.redelivered,
            replay_count: self.replay_count,
            death: self.deaths.last().map(Death::to_json),
            deaths: self.deaths.iter().map(Death::to_json).collect(),
            deaths_omitted: self.deaths_omitted,
            delivery_tag: None,
            receipt: None,
        }
    }
}

impl Delivery {
    /// The JSON form of this delivery: its message's, with its `delivery_tag`.
    pub fn to_json(&self) -> MessageJson {
        let message = Message {
            message_id: self.message_id,
            body: self.body.clone(),
            headers: self.headers.clone(),
            content_type: self.content_type.clone(),
            published_at_ms: self.published_at_ms,
            delivery_count: self.delivery_count,
            redelivered: self.redelivered,
            deaths: self.deaths.clone(),
            replay_count: self.replay_count,
            deaths_omitted: self.deaths_omitted,
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
        };
        MessageJson { delivery_tag: Some(self.delivery_tag), ..message.to_json(self.queue()) }
    }
}

impl AuditEvent {
    /// The JSON form of this audit event.
    pub fn to_json(&self) -> AuditJson {
        AuditJson {
            time_ms: self.time_ms,
            queue: self.queue.clone(),
            message_id: self.message_id,
            reason: self.reason.clone(),
            count: self.count,
            consumer_id: self.consumer_id,
            connection_id: self.connection_id,
            error: self.error.clone(),
            dead_letter: self.dead_letter.clone(),
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
        }
    }
}
