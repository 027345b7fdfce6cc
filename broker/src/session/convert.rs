//! Conversions between wire types and the broker's domain types, kept at the edge so queues
//! never see protobuf.

use hopper_proto::pb;

use crate::error::BrokerError;
use crate::message::Death;
use crate::queue::{Queue, QueueSettings};

/// The wire form of a death.
pub(crate) fn death_to_wire(death: &Death) -> pb::Death {
    pb::Death {
        queue: death.queue.clone(),
        reason: death.reason.as_str().to_owned(),
        count: death.count,
        error: death.error.clone(),
        first_failure_ms: death.first_failure_ms,
        last_failure_ms: death.last_failure_ms,
        died_at_ms: death.died_at_ms,
    }
}

/// Queue settings from a declare request.
pub(super) fn settings_from_wire(settings: pb::QueueSettings) -> Result<QueueSettings, BrokerError> {
    if settings.retry_backoff_ms.len() > 64 {
        return Err(BrokerError::InvalidArgument("retry_backoff_ms takes at most 64 delays".into()));
    }
    Ok(QueueSettings {
        durable: settings.durable,
        dead_letter: settings.dead_letter,
        max_deliveries: settings.max_deliveries,
        retry_backoff_ms: settings.retry_backoff_ms,
        message_ttl_ms: settings.message_ttl_ms,
        ack_timeout_ms: settings.ack_timeout_ms,
    })
}

fn settings_to_wire(settings: &QueueSettings) -> pb::QueueSettings {
    pb::QueueSettings {
        durable: settings.durable,
        dead_letter: settings.dead_letter.clone(),
        max_deliveries: settings.max_deliveries,
        retry_backoff_ms: settings.retry_backoff_ms.clone(),
        message_ttl_ms: settings.message_ttl_ms,
        ack_timeout_ms: settings.ack_timeout_ms,
    }
}

/// A queue's settings and counts, as `QueueInfo`.
pub(super) fn queue_info(queue: &Queue) -> pb::QueueInfo {
    let snapshot = queue.snapshot();
    pb::QueueInfo {
        name: queue.name().to_owned(),
        settings: Some(settings_to_wire(queue.settings())),
        ready: snapshot.ready,
        unacked: snapshot.unacked,
        consumers: snapshot.consumers,
        published_total: snapshot.counters.published,
        delivered_total: snapshot.counters.delivered,
        acked_total: snapshot.counters.acked,
        redelivered_total: snapshot.counters.redelivered,
        delayed: snapshot.delayed,
        dead_lettered_total: snapshot
            .counters
            .dead
            .iter()
            .map(|(reason, count)| (reason.as_str().to_owned(), *count))
            .collect(),
    }
}
