//! Conversions between wire types and the broker's domain types, kept at the edge so queues
//! never see protobuf.

use hopper_proto::pb;

use crate::error::BrokerError;
use crate::message::Death;
use crate::mover::{MoveSpec, MoveStatus};
use crate::queue::{Overflow, Queue, QueueSettings};

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
    let overflow = Overflow::parse(&settings.overflow).ok_or_else(|| {
        BrokerError::InvalidArgument(format!(
            "overflow must be reject-publish or drop-head, not '{}'",
            settings.overflow
        ))
    })?;
    Ok(QueueSettings {
        durable: settings.durable,
        max_length: settings.max_length,
        max_bytes: settings.max_bytes,
        overflow,
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
        max_length: settings.max_length,
        max_bytes: settings.max_bytes,
        overflow: settings.overflow.as_str().to_owned(),
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
        waiting_bytes: snapshot.waiting_bytes,
        oldest_ready_ms: snapshot.oldest_ready_ms,
        alarm_depth: queue.alarm_depth(),
        alarm: queue.alarm_raised(),
        read_error: snapshot.read_error,
    }
}

/// A move's status, as `MoveInfo`.
pub(super) fn move_info(status: MoveStatus) -> pb::MoveInfo {
    let (filter_key, filter_value) = status.spec.filter.unwrap_or_default();
    pb::MoveInfo {
        id: status.id,
        source: status.spec.source,
        destination: status.spec.destination,
        rate: status.spec.rate,
        limit: status.spec.limit,
        filter_key,
        filter_value,
        state: status.state.as_str().to_owned(),
        moved: status.moved,
        skipped: status.skipped,
        remaining: status.remaining,
        error: status.error,
        started_ms: status.started_ms,
        finished_ms: status.finished_ms,
    }
}

/// A move request, checked.
pub(super) fn move_spec(start: pb::MoveStart) -> Result<MoveSpec, BrokerError> {
    let filter = match (start.filter_key.is_empty(), start.filter_value) {
        (true, _) => None,
        (false, value) => Some((start.filter_key, value)),
    };
    Ok(MoveSpec {
        source: start.source,
        destination: start.destination,
        rate: start.rate,
        limit: start.limit,
        filter,
    })
}
