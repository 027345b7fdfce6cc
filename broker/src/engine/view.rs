//! The values the engine answers with: what a queue looks like, a delivered message, the
//! broker's status. Front ends turn these into frames or JSON.

use std::sync::Arc;

use crate::message::{Payload, QueuedMessage};
use crate::queue::{Queue, QueueSettings, Snapshot};

/// A queue's settings, counts and alarm state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// Its name.
    pub name: String,
    /// What it was declared with.
    pub settings: QueueSettings,
    /// Its counts and counters now.
    pub snapshot: Snapshot,
    /// Ready depth above which its alarm is raised; 0 = no alarm.
    pub alarm_depth: u64,
    /// True while the alarm is raised.
    pub alarm: bool,
    /// True when some queue dead-letters into this one.
    pub is_dead_letter_queue: bool,
    /// For a replicated queue, the node serving it, if known.
    pub served_by: Option<u64>,
}

impl QueueInfo {
    /// The view of `queue`; `is_dead_letter_queue` when some queue dead-letters into it.
    pub(super) fn of(queue: &Queue, is_dead_letter_queue: bool) -> Self {
        QueueInfo {
            name: queue.name().to_owned(),
            settings: queue.settings().clone(),
            snapshot: queue.snapshot(),
            alarm_depth: queue.alarm_depth(),
            alarm: queue.alarm_raised(),
            is_dead_letter_queue,
            served_by: None,
        }
    }
}

/// A message as a consumer (or a peek) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    /// The message: id, body, headers, deaths, ...
    pub payload: Arc<Payload>,
    /// Deliveries of it so far (this one included, for a delivery).
    pub delivery_count: u32,
    /// True when it may have been delivered before.
    pub redelivered: bool,
}

impl MessageView {
    /// The view of `message`, whose payload is `payload`.
    pub fn of(message: &QueuedMessage, payload: &Payload) -> Self {
        let payload = match &message.payload {
            Some(shared) => shared.clone(),
            None => Arc::new(payload.clone()),
        };
        MessageView { payload, delivery_count: message.delivery_count, redelivered: message.redelivered() }
    }
}

impl MessageView {
    /// About how many bytes this message takes in a frame (never less): body, headers, content
    /// type, deaths, and room for the fixed fields.
    pub fn wire_size(&self) -> usize {
        let payload = &self.payload;
        let headers: usize = payload.headers().iter().map(|(k, v)| k.len() + v.len() + 12).sum();
        let deaths: usize = payload
            .deaths()
            .iter()
            .map(|d| d.queue.len() + d.error.len() + d.reason.as_str().len() + 64)
            .sum();
        payload.body.len() + headers + payload.content_type().len() + deaths + 96
    }
}

/// One delivery to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The consumer it went to.
    pub consumer_id: u64,
    /// Its tag within that consumer.
    pub delivery_tag: u64,
    /// The message.
    pub message: MessageView,
}

/// The broker's health and flow-control readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The broker's version.
    pub version: &'static str,
    /// Time since it started.
    pub uptime_ms: u64,
    /// Open connections of the binary protocol.
    pub connections: u32,
    /// Why publishers are blocked, if they are.
    pub blocked: Option<String>,
    /// Connections held back by the block.
    pub blocked_publishers: u32,
    /// Message bytes held in memory.
    pub memory_used: u64,
    /// Memory above which publishers are blocked.
    pub memory_high_watermark: u64,
    /// Free bytes on the data directory's disk.
    pub disk_free: u64,
    /// Free disk below which publishers are blocked.
    pub disk_free_low_watermark: u64,
    /// Storage threads serving durable queues.
    pub storage_threads: u32,
    /// fsyncs of the durable logs since the start.
    pub fsyncs: u64,
    /// Segment files open for reading stored bodies.
    pub open_segment_files: u32,
    /// Why a log cannot sync (its queues refuse publishes), if one cannot.
    pub storage_error: Option<String>,
}
