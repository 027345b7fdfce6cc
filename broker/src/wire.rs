//! Conversions between protobuf types and the engine's domain values, for the front ends that
//! speak them (the binary protocol, and HTTP on its way to JSON). Nothing below the front ends
//! sees protobuf.

use hopper_proto::pb;

use crate::audit::AuditEvent;
use crate::auth::SavedPermissions;
use crate::engine::{Delivery, MessageView, QueueInfo, Status, UserView};
use crate::error::BrokerError;
use crate::message::{Death, Payload};
use crate::mover::{MoveSpec, MoveStatus};
use crate::queue::ExchangeView;
use crate::routing::{Binding, Destination, ExchangeKind, ExchangeSpec};
use crate::settings::{Overflow, QueueSettings};

mod deliver;

pub use deliver::DeliverFrame;

/// A user as `UserInfo`.
pub fn user_info(user: UserView) -> pb::UserInfo {
    let p = user.permissions;
    pb::UserInfo {
        name: user.name,
        tags: user.tags,
        permissions: Some(pb::Permissions { configure: p.configure, write: p.write, read: p.read }),
    }
}

/// Permission patterns from the wire; absent means none.
pub fn permissions_from_wire(permissions: Option<pb::Permissions>) -> SavedPermissions {
    let p = permissions.unwrap_or_default();
    SavedPermissions { configure: p.configure, write: p.write, read: p.read }
}

/// The wire form of a death.
pub fn death_to_wire(death: &Death) -> pb::Death {
    pb::Death {
        queue: death.queue.clone(),
        reason: death.reason.as_str().to_owned(),
        count: death.count,
        error: death.error.clone(),
        first_failure_ms: death.first_failure_ms,
        last_failure_ms: death.last_failure_ms,
        died_at_ms: death.died_at_ms,
        exchange: death.exchange.clone(),
        routing_key: death.routing_key.clone(),
    }
}

/// Queue settings from a declare request.
pub fn settings_from_wire(settings: pb::QueueSettings) -> Result<QueueSettings, BrokerError> {
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
        dead_letter_exchange: settings.dead_letter_exchange,
        dead_letter_routing_key: settings.dead_letter_routing_key,
        max_deliveries: settings.max_deliveries,
        retry_backoff_ms: settings.retry_backoff_ms,
        message_ttl_ms: settings.message_ttl_ms,
        ack_timeout_ms: settings.ack_timeout_ms,
        replicated: settings.replicated,
        replicas: settings.replicas,
    })
}

pub fn settings_to_wire(settings: &QueueSettings) -> pb::QueueSettings {
    pb::QueueSettings {
        durable: settings.durable,
        max_length: settings.max_length,
        max_bytes: settings.max_bytes,
        overflow: settings.overflow.as_str().to_owned(),
        dead_letter: settings.dead_letter.clone(),
        dead_letter_exchange: settings.dead_letter_exchange.clone(),
        dead_letter_routing_key: settings.dead_letter_routing_key.clone(),
        max_deliveries: settings.max_deliveries,
        retry_backoff_ms: settings.retry_backoff_ms.clone(),
        message_ttl_ms: settings.message_ttl_ms,
        ack_timeout_ms: settings.ack_timeout_ms,
        replicated: settings.replicated,
        replicas: settings.replicas,
    }
}

/// A queue's settings and counts, as `QueueInfo`.
pub fn queue_info(info: QueueInfo) -> pb::QueueInfo {
    let QueueInfo { name, settings, snapshot, alarm_depth, alarm, is_dead_letter_queue, served_by } = info;
    pb::QueueInfo {
        name,
        settings: Some(settings_to_wire(&settings)),
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
        alarm_depth,
        alarm,
        read_error: snapshot.read_error,
        is_dead_letter_queue,
        served_by: served_by.unwrap_or(0),
    }
}

/// A message as consumers and peeks see it.
pub fn message(view: &MessageView) -> pb::Message {
    message_of(&view.payload, view.delivery_count, view.redelivered)
}

/// A message from its payload and delivery state.
pub fn message_of(payload: &Payload, delivery_count: u32, redelivered: bool) -> pb::Message {
    pb::Message {
        message_id: payload.id,
        body: payload.body.clone(),
        headers: payload.headers().clone(),
        content_type: payload.content_type().to_owned(),
        published_at_ms: payload.published_at_ms,
        delivery_count,
        redelivered,
        deaths: payload.deaths().iter().map(death_to_wire).collect(),
        replay_count: payload.replay_count,
        deaths_omitted: payload.deaths_omitted(),
        exchange: payload.exchange.to_string(),
        routing_key: payload.routing_key.clone(),
    }
}

/// A delivery as `Deliver`.
pub fn deliver(delivery: &Delivery) -> pb::Deliver {
    pb::Deliver {
        consumer_id: delivery.consumer_id,
        delivery_tag: delivery.delivery_tag,
        message: Some(message(&delivery.message)),
    }
}

/// A node's view of its cluster as `ClusterStatusOk`.
pub fn cluster_status(status: crate::cluster::ClusterStatus) -> pb::ClusterStatusOk {
    let members = status.members.into_iter().map(|member| pb::ClusterMember {
        id: member.id,
        addr: member.addr,
        voter: member.voter,
        leader: member.leader,
        lag_known: member.lag.is_some(),
        lag: member.lag.unwrap_or(0),
        client_addr: member.client_addr.unwrap_or_default(),
    });
    pb::ClusterStatusOk {
        node_id: status.node_id,
        state: status.state,
        term: status.term,
        leader: status.leader.unwrap_or(0),
        last_log_index: status.last_log_index,
        last_applied: status.last_applied,
        members: members.collect(),
        queue_leaders: status.queue_leaders.iter().map(|leader| leader.unwrap_or(0)).collect(),
    }
}

/// The broker's status as `BrokerStatusOk`.
pub fn status(status: Status) -> pb::BrokerStatusOk {
    pb::BrokerStatusOk {
        version: status.version.into(),
        uptime_ms: status.uptime_ms,
        connections: status.connections,
        blocked: status.blocked.is_some(),
        blocked_reason: status.blocked.unwrap_or_default(),
        blocked_publishers: status.blocked_publishers,
        memory_used: status.memory_used,
        memory_high_watermark: status.memory_high_watermark,
        disk_free: status.disk_free,
        disk_free_low_watermark: status.disk_free_low_watermark,
        storage_threads: status.storage_threads,
        fsyncs: status.fsyncs,
        open_segment_files: status.open_segment_files,
        storage_error: status.storage_error.unwrap_or_default(),
    }
}

/// One death from the audit trail as `AuditEvent`.
pub fn audit_event(event: AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        time_ms: event.time_ms,
        queue: event.queue,
        message_id: event.message_id,
        reason: event.reason,
        count: event.count,
        consumer_id: event.consumer_id,
        connection_id: event.connection_id,
        error: event.error,
        dead_letter: event.dead_letter,
        exchange: event.exchange,
        routing_key: event.routing_key,
    }
}

/// A move's status, as `MoveInfo`.
pub fn move_info(status: MoveStatus) -> pb::MoveInfo {
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
        through_exchange: status.spec.through_exchange,
    }
}

/// A move request, checked.
pub fn move_spec(start: pb::MoveStart) -> Result<MoveSpec, BrokerError> {
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
        through_exchange: start.through_exchange,
    })
}

/// An exchange as `ExchangeInfo`.
pub fn exchange_info(view: ExchangeView) -> pb::ExchangeInfo {
    pb::ExchangeInfo {
        name: view.spec.name,
        kind: view.spec.kind.as_str().to_owned(),
        durable: view.spec.durable,
        alternate: view.spec.alternate.unwrap_or_default(),
        bindings: view.bindings as u32,
        published_total: view.published,
        unroutable_total: view.unroutable,
        returned_total: view.returned,
    }
}

/// An exchange declaration, checked.
pub fn exchange_spec(declare: &pb::ExchangeDeclare) -> Result<ExchangeSpec, BrokerError> {
    let kind = ExchangeKind::parse(&declare.kind).ok_or_else(|| {
        BrokerError::InvalidArgument(format!(
            "exchange kind must be direct, fanout, topic or headers, not '{}'",
            declare.kind
        ))
    })?;
    Ok(ExchangeSpec {
        name: declare.name.clone(),
        kind,
        durable: declare.durable,
        alternate: (!declare.alternate.is_empty()).then(|| declare.alternate.clone()),
    })
}

/// A binding request: its source exchange and the binding.
pub fn binding_from_wire(binding: Option<pb::Binding>) -> Result<(String, Binding), BrokerError> {
    let binding = binding.ok_or_else(|| BrokerError::InvalidArgument("the binding is missing".into()))?;
    let destination = match binding.destination_kind.as_str() {
        "" | "queue" => Destination::Queue(binding.destination),
        "exchange" => Destination::Exchange(binding.destination),
        other => {
            return Err(BrokerError::InvalidArgument(format!(
                "a binding leads to a queue or an exchange, not '{other}'"
            )))
        }
    };
    if binding.source.is_empty() {
        return Err(BrokerError::InvalidArgument("the default exchange takes no bindings".into()));
    }
    let arguments = binding.arguments.into_iter().collect();
    Ok((binding.source, Binding { destination, key: binding.routing_key, arguments }))
}

/// A binding as `Binding`.
pub fn binding_to_wire(source: String, binding: Binding) -> pb::Binding {
    let (destination, destination_kind) = match binding.destination {
        Destination::Queue(name) => (name, "queue"),
        Destination::Exchange(name) => (name, "exchange"),
    };
    pb::Binding {
        source,
        destination,
        destination_kind: destination_kind.to_owned(),
        routing_key: binding.key,
        arguments: binding.arguments.into_iter().collect(),
    }
}
