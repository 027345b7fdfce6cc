//! What the broker reports: [`QueueInfo`] (a queue's settings and counters), [`Death`] (one
//! entry of a dead-lettered message's history), [`AuditEvent`] (one entry of the audit trail of
//! dead messages) and [`BrokerStatus`] (the broker's health and flow-control state).

use std::collections::HashMap;
use std::time::Duration;

use hopper_proto::pb;

use crate::options::Overflow;

/// A queue as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Whether the queue survives broker restarts.
    pub durable: bool,
    /// Whether the queue is replicated over the cluster's nodes.
    pub replicated: bool,
    /// For a replicated queue, the node serving it (consumers attach there), if known.
    pub served_by: Option<u64>,
    /// Messages waiting for a consumer.
    pub ready: u64,
    /// Messages delivered and not yet acknowledged.
    pub unacked: u64,
    /// Consumers attached now.
    pub consumers: u32,
    /// Messages published to the queue since it was created.
    pub published_total: u64,
    /// Deliveries made, redeliveries included.
    pub delivered_total: u64,
    /// Deliveries acknowledged.
    pub acked_total: u64,
    /// Deliveries of messages that had been delivered before.
    pub redelivered_total: u64,
    /// Messages waiting for a publish delay or a retry backoff to pass.
    pub delayed: u64,
    /// Messages that died in this queue, by reason (`rejected`, `delivery_limit`, `expired`,
    /// `maxlen`). Reasons with no deaths may be missing.
    pub dead_lettered: HashMap<String, u64>,
    /// Queue that receives this queue's dead messages; `None` when they are dropped.
    pub dead_letter: Option<String>,
    /// Exchange that this queue's dead messages are published to, if any.
    pub dead_letter_exchange: Option<String>,
    /// Routing key they are published with; `None` keeps their own.
    pub dead_letter_routing_key: Option<String>,
    /// Deliveries after which a failing message dies; `None` for no limit.
    pub max_deliveries: Option<u32>,
    /// Delays before the 1st, 2nd, ... redelivery of a failed message; the last one repeats.
    pub retry_backoff: Vec<Duration>,
    /// Time to live of the queue's messages; `None` for no limit.
    pub message_ttl: Option<Duration>,
    /// Time a consumer has to settle a delivery; `None` for no deadline.
    pub ack_timeout: Option<Duration>,
    /// Most waiting messages; `None` for unbounded.
    pub max_length: Option<u64>,
    /// Most body bytes of the waiting messages; `None` for unbounded.
    pub max_bytes: Option<u64>,
    /// What the queue does with a publish once it is full.
    pub overflow: Overflow,
    /// Body bytes of the waiting (ready and delayed) messages.
    pub waiting_bytes: u64,
    /// Unix time in milliseconds at which the oldest waiting message entered the queue;
    /// `None` when the queue is empty (or the broker does not know).
    pub oldest_ready_ms: Option<u64>,
    /// Ready depth above which the queue's alarm is raised; `None` when it has no alarm.
    pub alarm_depth: Option<u64>,
    /// True while the depth alarm is raised.
    pub alarm: bool,
    /// Why stored message bodies cannot be read right now; while set, delivery from the queue
    /// is paused and retried (no message is dropped). `None` while reads work.
    pub read_error: Option<String>,
    /// True when some queue dead-letters into this one.
    pub is_dead_letter_queue: bool,
}

impl From<pb::QueueInfo> for QueueInfo {
    fn from(info: pb::QueueInfo) -> Self {
        let settings = info.settings.unwrap_or_default();
        QueueInfo {
            name: info.name,
            durable: settings.durable,
            replicated: settings.replicated,
            served_by: non_zero(info.served_by),
            ready: info.ready,
            unacked: info.unacked,
            consumers: info.consumers,
            published_total: info.published_total,
            delivered_total: info.delivered_total,
            acked_total: info.acked_total,
            redelivered_total: info.redelivered_total,
            delayed: info.delayed,
            dead_lettered: info.dead_lettered_total,
            dead_letter: non_empty(settings.dead_letter),
            dead_letter_exchange: non_empty(settings.dead_letter_exchange),
            dead_letter_routing_key: non_empty(settings.dead_letter_routing_key),
            max_deliveries: (settings.max_deliveries > 0).then_some(settings.max_deliveries),
            retry_backoff: settings.retry_backoff_ms.into_iter().map(Duration::from_millis).collect(),
            message_ttl: millis(settings.message_ttl_ms),
            ack_timeout: millis(settings.ack_timeout_ms),
            max_length: non_zero(settings.max_length),
            max_bytes: non_zero(settings.max_bytes),
            // A mode this client does not know yet is shown as the default rather than
            // failing the whole description.
            overflow: Overflow::from_wire(&settings.overflow).unwrap_or_default(),
            waiting_bytes: info.waiting_bytes,
            oldest_ready_ms: non_zero(info.oldest_ready_ms),
            alarm_depth: non_zero(info.alarm_depth),
            alarm: info.alarm,
            read_error: non_empty(info.read_error),
            is_dead_letter_queue: info.is_dead_letter_queue,
        }
    }
}

/// One time a message died: where, why, and what its consumer last said. A message that went
/// through dead-letter queues carries one per death, oldest first
/// ([`Delivery::deaths`](crate::Delivery::deaths)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// The queue the message died in.
    pub queue: String,
    /// Why: `rejected`, `delivery_limit`, `expired`, `maxlen` or `corrupt`.
    pub reason: String,
    /// Its delivery count in that queue.
    pub count: u32,
    /// The error text of its last failed delivery (from a nack or reject), or empty.
    pub error: String,
    /// Unix time in milliseconds of its first failed delivery there (0 if none failed).
    pub first_failure_ms: u64,
    /// Unix time in milliseconds of its last failed delivery there (0 if none failed).
    pub last_failure_ms: u64,
    /// Unix time in milliseconds at which it died.
    pub died_at_ms: u64,
    /// The exchange the message had been published (or dead-lettered) to when it died;
    /// empty for a publish to a queue.
    pub exchange: String,
    /// Its routing key then.
    pub routing_key: String,
}

impl From<pb::Death> for Death {
    fn from(death: pb::Death) -> Self {
        Death {
            queue: death.queue,
            reason: death.reason,
            count: death.count,
            error: death.error,
            first_failure_ms: death.first_failure_ms,
            last_failure_ms: death.last_failure_ms,
            died_at_ms: death.died_at_ms,
            exchange: death.exchange,
            routing_key: death.routing_key,
        }
    }
}

/// One entry of the broker's audit trail: a message died (and was dead-lettered or dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Unix time in milliseconds at which the message died.
    pub time_ms: u64,
    /// The queue the message died in.
    pub queue: String,
    /// The message's broker-assigned id.
    pub message_id: u64,
    /// Why: `rejected`, `delivery_limit`, `expired`, `maxlen` or `corrupt`.
    pub reason: String,
    /// Its delivery count in that queue.
    pub count: u32,
    /// The consumer of its last failed delivery (0 if none).
    pub consumer_id: u64,
    /// The broker's id of that consumer's connection (0 if none).
    pub connection_id: u64,
    /// The error text of its last failed delivery, or empty.
    pub error: String,
    /// The queue it was moved to; `None` when it was dropped.
    pub dead_letter: Option<String>,
    /// The exchange it had been published to; empty for a publish to a queue.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
}

impl From<pb::AuditEvent> for AuditEvent {
    fn from(event: pb::AuditEvent) -> Self {
        AuditEvent {
            time_ms: event.time_ms,
            queue: event.queue,
            message_id: event.message_id,
            reason: event.reason,
            count: event.count,
            consumer_id: event.consumer_id,
            connection_id: event.connection_id,
            error: event.error,
            dead_letter: non_empty(event.dead_letter),
            exchange: event.exchange,
            routing_key: event.routing_key,
        }
    }
}

/// The broker's health and flow-control state ([`Connection::status`](crate::Connection::status)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStatus {
    /// The broker's version.
    pub version: String,
    /// How long the broker has been running.
    pub uptime: Duration,
    /// Client connections open now.
    pub connections: u32,
    /// `Some(reason)` while publishers are blocked (a memory or disk watermark is crossed).
    pub blocked: Option<String>,
    /// Connections currently held back by the block.
    pub blocked_publishers: u32,
    /// Message bytes the broker holds in memory.
    pub memory_used: u64,
    /// The memory high watermark: above it, publishers are blocked.
    pub memory_high_watermark: u64,
    /// Free bytes on the disk of the broker's data directory.
    pub disk_free: u64,
    /// The disk free low watermark: below it, publishers are blocked.
    pub disk_free_low_watermark: u64,
    /// Storage threads serving durable queues.
    pub storage_threads: u32,
    /// fsyncs of the durable logs since the broker started.
    pub fsyncs: u64,
    /// Segment files the broker holds open for reading stored bodies.
    pub open_segment_files: u32,
    /// `Some(error)` while a durable log cannot sync; its queues refuse publishes meanwhile.
    pub storage_error: Option<String>,
}

impl From<pb::BrokerStatusOk> for BrokerStatus {
    fn from(status: pb::BrokerStatusOk) -> Self {
        BrokerStatus {
            version: status.version,
            uptime: Duration::from_millis(status.uptime_ms),
            connections: status.connections,
            blocked: status.blocked.then(|| block_reason(status.blocked_reason)),
            blocked_publishers: status.blocked_publishers,
            memory_used: status.memory_used,
            memory_high_watermark: status.memory_high_watermark,
            disk_free: status.disk_free,
            disk_free_low_watermark: status.disk_free_low_watermark,
            storage_threads: status.storage_threads,
            fsyncs: status.fsyncs,
            open_segment_files: status.open_segment_files,
            storage_error: Some(status.storage_error).filter(|e| !e.is_empty()),
        }
    }
}

/// A node's view of its cluster ([`Connection::cluster_status`](crate::Connection::cluster_status)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node_id: u64,
    /// Its Raft role: `leader`, `follower`, `candidate` or `learner`.
    pub state: String,
    /// The current Raft term.
    pub term: u64,
    /// The leader the node knows of; `None` during an election or without a majority.
    pub leader: Option<u64>,
    /// Index of the newest entry in the node's metadata log.
    pub last_log_index: u64,
    /// Index of the newest entry the node has applied.
    pub last_applied: u64,
    /// Every member of the cluster.
    pub members: Vec<ClusterMember>,
    /// The leader of each queue group, in group order: the node serving that group's
    /// replicated queues, if known (a queue's own is [`QueueInfo::served_by`]).
    pub queue_leaders: Vec<Option<u64>>,
}

/// One member in a [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMember {
    /// Its node id.
    pub id: u64,
    /// Its cluster address.
    pub addr: String,
    /// The address clients reach it at, once it has told the cluster.
    pub client_addr: Option<String>,
    /// A voter; `false` for a learner still catching up.
    pub voter: bool,
    /// The leader.
    pub leader: bool,
    /// Entries it is behind the leader; known only when the answering node leads.
    pub lag: Option<u64>,
}

impl From<pb::ClusterStatusOk> for ClusterStatus {
    fn from(status: pb::ClusterStatusOk) -> Self {
        let members = status.members.into_iter().map(|member| ClusterMember {
            id: member.id,
            addr: member.addr,
            client_addr: (!member.client_addr.is_empty()).then_some(member.client_addr),
            voter: member.voter,
            leader: member.leader,
            lag: member.lag_known.then_some(member.lag),
        });
        ClusterStatus {
            node_id: status.node_id,
            state: status.state,
            term: status.term,
            leader: non_zero(status.leader),
            last_log_index: status.last_log_index,
            last_applied: status.last_applied,
            members: members.collect(),
            queue_leaders: status.queue_leaders.into_iter().map(non_zero).collect(),
        }
    }
}

/// The reason of a block, never empty: a block is worth explaining even when the broker did not.
pub(crate) fn block_reason(reason: String) -> String {
    if reason.is_empty() {
        "no reason given".to_string()
    } else {
        reason
    }
}

/// `None` for the wire's "not set" (0) number.
fn non_zero(value: u64) -> Option<u64> {
    (value > 0).then_some(value)
}

/// `None` for the wire's "not set" (empty) string.
fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// `None` for the wire's "not set" (0) duration.
fn millis(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_info_reads_settings_and_counters() {
        let info = QueueInfo::from(pb::QueueInfo {
            name: "jobs".into(),
            settings: Some(pb::QueueSettings {
                durable: true,
                dead_letter: "jobs.dead".into(),
                max_deliveries: 5,
                retry_backoff_ms: vec![1000, 5000],
                message_ttl_ms: 60_000,
                ack_timeout_ms: 0,
                max_length: 100,
                max_bytes: 0,
                overflow: "drop-head".into(),
                ..Default::default()
            }),
            ready: 3,
            unacked: 2,
            consumers: 1,
            published_total: 10,
            delivered_total: 7,
            acked_total: 5,
            redelivered_total: 1,
            delayed: 4,
            dead_lettered_total: HashMap::from([("rejected".to_string(), 2)]),
            waiting_bytes: 700,
            oldest_ready_ms: 1_700_000_000_000,
            alarm_depth: 5,
            alarm: true,
            read_error: "Too many open files (os error 24)".into(),
            is_dead_letter_queue: false,
            served_by: 0,
        });
        assert_eq!(info.name, "jobs");
        assert!(info.durable);
        assert_eq!((info.ready, info.unacked, info.consumers, info.delayed), (3, 2, 1, 4));
        assert_eq!((info.published_total, info.delivered_total), (10, 7));
        assert_eq!((info.acked_total, info.redelivered_total), (5, 1));
        assert_eq!(info.dead_lettered.get("rejected"), Some(&2));
        assert_eq!(info.dead_letter.as_deref(), Some("jobs.dead"));
        assert_eq!(info.max_deliveries, Some(5));
        assert_eq!(info.retry_backoff, [Duration::from_secs(1), Duration::from_secs(5)]);
        assert_eq!(info.message_ttl, Some(Duration::from_secs(60)));
        assert_eq!(info.ack_timeout, None, "0 means not set");
        assert_eq!((info.max_length, info.max_bytes, info.overflow), (Some(100), None, Overflow::DropHead));
        assert_eq!((info.waiting_bytes, info.oldest_ready_ms), (700, Some(1_700_000_000_000)));
        assert_eq!((info.alarm_depth, info.alarm), (Some(5), true));
        assert_eq!(info.read_error.as_deref(), Some("Too many open files (os error 24)"));
    }

    #[test]
    fn missing_settings_mean_defaults() {
        let info = QueueInfo::from(pb::QueueInfo { name: "q".into(), ..Default::default() });
        assert!(!info.durable);
        assert_eq!((info.dead_letter, info.max_deliveries), (None, None));
        assert!(info.retry_backoff.is_empty() && info.dead_lettered.is_empty());
        assert_eq!((info.message_ttl, info.ack_timeout), (None, None));
        assert_eq!((info.max_length, info.max_bytes, info.overflow), (None, None, Overflow::RejectPublish));
        assert_eq!((info.oldest_ready_ms, info.alarm_depth, info.alarm), (None, None, false));
    }

    #[test]
    fn unknown_overflow_reads_as_the_default() {
        let settings = pb::QueueSettings { overflow: "drop-tail".into(), ..Default::default() };
        let info = QueueInfo::from(pb::QueueInfo { settings: Some(settings), ..Default::default() });
        assert_eq!(info.overflow, Overflow::RejectPublish);
    }

    #[test]
    fn broker_status_reads_the_block() {
        let status = BrokerStatus::from(pb::BrokerStatusOk {
            version: "0.1.0".into(),
            uptime_ms: 1500,
            connections: 3,
            blocked: true,
            blocked_reason: "memory high watermark".into(),
            blocked_publishers: 1,
            memory_used: 200,
            memory_high_watermark: 100,
            disk_free: 10,
            disk_free_low_watermark: 5,
            ..Default::default()
        });
        assert_eq!(status.uptime, Duration::from_millis(1500));
        assert_eq!(status.blocked.as_deref(), Some("memory high watermark"));
        assert_eq!((status.connections, status.blocked_publishers), (3, 1));
        let unexplained = BrokerStatus::from(pb::BrokerStatusOk { blocked: true, ..Default::default() });
        assert_eq!(unexplained.blocked.as_deref(), Some("no reason given"));
        let free =
            BrokerStatus::from(pb::BrokerStatusOk { blocked_reason: "stale".into(), ..Default::default() });
        assert_eq!(free.blocked, None, "the reason only counts while blocked");
    }

    #[test]
    fn audit_event_without_a_dead_letter_queue_was_dropped() {
        let event = AuditEvent::from(pb::AuditEvent {
            time_ms: 1,
            queue: "q".into(),
            message_id: 9,
            reason: "rejected".into(),
            count: 1,
            consumer_id: 3,
            connection_id: 4,
            error: "bad".into(),
            dead_letter: String::new(),
            exchange: "work".into(),
            routing_key: "job".into(),
        });
        assert_eq!((event.exchange.as_str(), event.routing_key.as_str()), ("work", "job"));
        assert_eq!(event.dead_letter, None);
        assert_eq!((event.message_id, event.reason.as_str(), event.error.as_str()), (9, "rejected", "bad"));
        let moved = AuditEvent::from(pb::AuditEvent { dead_letter: "q.dead".into(), ..Default::default() });
        assert_eq!(moved.dead_letter.as_deref(), Some("q.dead"));
    }
}
