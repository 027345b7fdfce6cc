//! Messages as the broker holds them: an immutable, shared payload plus per-queue state.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::storage::Location;

/// The part of a message that never changes after publish. Shared (not copied) between the
/// queue, the unacked window and every delivery of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// Broker-assigned id, unique within the broker.
    pub id: u64,
    /// The body, sliced out of the frame it arrived in.
    pub body: Bytes,
    /// Application headers.
    pub headers: HashMap<String, String>,
    /// MIME type given by the publisher, or empty.
    pub content_type: String,
    /// Unix time in milliseconds at which the broker accepted the message.
    pub published_at_ms: u64,
}

/// A message inside one queue: a compact index entry, with the payload in memory or only on
/// disk (for a durable queue whose backlog outgrew its memory budget).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Position in the queue's arrival order; requeued messages go back to their place by it.
    pub seq: u64,
    /// Deliveries so far.
    pub delivery_count: u32,
    /// The message, when it is in memory. Always set for transient queues and for deliveries.
    pub payload: Option<Arc<Payload>>,
    /// Where the message is stored, for durable queues.
    pub location: Option<Location>,
    /// Recovered after a crash, which may have hidden a delivery: the next delivery is flagged
    /// redelivered, as AMQP's "may have been delivered before".
    pub maybe_delivered: bool,
}

impl QueuedMessage {
    /// A message held in memory only.
    pub fn transient(seq: u64, payload: Arc<Payload>) -> Self {
        QueuedMessage {
            seq,
            delivery_count: 0,
            payload: Some(payload),
            location: None,
            maybe_delivered: false,
        }
    }

    /// True when this message has been delivered before.
    pub fn redelivered(&self) -> bool {
        self.delivery_count > 1 || self.maybe_delivered
    }
}
