//! What a queue is declared with: its settings as stored in the catalogue, and the failure and
//! bound rules its state machine applies. Below both `queue` and `storage`, which each use them.

use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

/// Longest duration any request may name (TTL, delay, ack timeout, visibility, extension,
/// retry backoff): 2^32 − 1 ms, about 49.7 days, as RabbitMQ's limit on message TTLs. Longer
/// ones are refused with INVALID_ARGUMENT rather than silently shortened.
pub const MAX_DURATION_MS: u64 = u32::MAX as u64;

/// Most retry backoff steps a queue may name.
pub const MAX_BACKOFF_STEPS: usize = 64;

/// Refuses a duration above [`MAX_DURATION_MS`], naming the field and the limit.
pub fn check_duration(what: &str, ms: u64) -> Result<u64, BrokerError> {
    if ms > MAX_DURATION_MS {
        return Err(BrokerError::InvalidArgument(format!(
            "{what} must be at most {MAX_DURATION_MS} ms (about 49.7 days), got {ms}"
        )));
    }
    Ok(ms)
}

/// Properties fixed when a queue is declared. Zero / empty means "not set".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueSettings {
    /// Messages are kept on disk and the queue survives restarts.
    pub durable: bool,
    /// Queue that receives this queue's dead messages.
    pub dead_letter: String,
    /// Exchange that dead messages are published to (besides `dead_letter`, if both are set).
    pub dead_letter_exchange: String,
    /// Routing key of dead messages published to `dead_letter_exchange`; empty keeps their own.
    pub dead_letter_routing_key: String,
    /// Deliveries after which a failing message dies with `delivery_limit`.
    pub max_deliveries: u32,
    /// Delays before the 1st, 2nd, ... redelivery of a nacked message; the last repeats.
    pub retry_backoff_ms: Vec<u64>,
    /// Time to live of every message from when it enters the queue.
    pub message_ttl_ms: u64,
    /// Time a consumer has to settle a delivery before it is taken back.
    pub ack_timeout_ms: u64,
    /// Most waiting (ready + delayed) messages.
    pub max_length: u64,
    /// Most body bytes of waiting messages.
    pub max_bytes: u64,
    /// What a full queue does with a new message.
    pub overflow: Overflow,
    /// Replicated over the cluster's nodes through Raft: a publish is confirmed once a
    /// majority holds it, and the queue survives the loss of a minority of nodes.
    pub replicated: bool,
    /// Copies asked for at declare; 0 = one on every node, the only layout a cluster keeps
    /// (checked, then cleared, at declare).
    pub replicas: u32,
}

impl QueueSettings {
    /// Refuses settings outside the documented limits.
    pub fn validate(&self) -> Result<(), BrokerError> {
        check_duration("message_ttl_ms", self.message_ttl_ms)?;
        check_duration("ack_timeout_ms", self.ack_timeout_ms)?;
        if self.retry_backoff_ms.len() > MAX_BACKOFF_STEPS {
            return Err(BrokerError::InvalidArgument(format!(
                "retry_backoff_ms takes at most {MAX_BACKOFF_STEPS} delays, got {}",
                self.retry_backoff_ms.len()
            )));
        }
        for &delay in &self.retry_backoff_ms {
            check_duration("each retry_backoff_ms delay", delay)?;
        }
        Ok(())
    }

    /// The failure rules these settings describe.
    pub fn policy(&self) -> Policy {
        Policy {
            max_deliveries: self.max_deliveries,
            retry_backoff_ms: self.retry_backoff_ms.clone(),
            message_ttl_ms: self.message_ttl_ms,
            ack_timeout_ms: self.ack_timeout_ms,
            max_length: self.max_length,
            max_bytes: self.max_bytes,
            overflow: self.overflow,
        }
    }
}

impl std::fmt::Display for QueueSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "durable={}", self.durable)?;
        if !self.dead_letter_exchange.is_empty() {
            write!(f, " dead_letter_exchange={}", self.dead_letter_exchange)?;
            if !self.dead_letter_routing_key.is_empty() {
                write!(f, " dead_letter_routing_key={}", self.dead_letter_routing_key)?;
            }
        }
        if !self.dead_letter.is_empty() {
            write!(f, " dead_letter={}", self.dead_letter)?;
        }
        if self.max_deliveries > 0 {
            write!(f, " max_deliveries={}", self.max_deliveries)?;
        }
        if !self.retry_backoff_ms.is_empty() {
            write!(f, " retry_backoff_ms={:?}", self.retry_backoff_ms)?;
        }
        if self.message_ttl_ms > 0 {
            write!(f, " message_ttl_ms={}", self.message_ttl_ms)?;
        }
        if self.ack_timeout_ms > 0 {
            write!(f, " ack_timeout_ms={}", self.ack_timeout_ms)?;
        }
        if self.max_length > 0 {
            write!(f, " max_length={}", self.max_length)?;
        }
        if self.max_bytes > 0 {
            write!(f, " max_bytes={}", self.max_bytes)?;
        }
        if self.max_length > 0 || self.max_bytes > 0 {
            write!(f, " overflow={}", self.overflow.as_str())?;
        }
        Ok(())
    }
}

/// A queue's failure-handling arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Deliveries after which a failing message dies with `delivery_limit`; 0 = no limit.
    pub max_deliveries: u32,
    /// Delays before the 1st, 2nd, ... redelivery of a nacked message; the last one repeats.
    pub retry_backoff_ms: Vec<u64>,
    /// Time to live of every message from when it enters the queue; 0 = none.
    pub message_ttl_ms: u64,
    /// Time a consumer has to settle a delivery before it is taken back; 0 = none.
    pub ack_timeout_ms: u64,
    /// Most waiting (ready + delayed) messages; 0 = unbounded.
    pub max_length: u64,
    /// Most body bytes of waiting messages; 0 = unbounded.
    pub max_bytes: u64,
    /// What a new message meets when the queue is full.
    pub overflow: Overflow,
}

/// What a full queue does with a new message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Refuse it: the publisher gets a negative confirm.
    #[default]
    RejectPublish,
    /// Accept it; the oldest waiting messages die with reason `maxlen`.
    DropHead,
}

impl Overflow {
    /// The policy's name in flags and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::RejectPublish => "reject-publish",
            Overflow::DropHead => "drop-head",
        }
    }

    /// Parses a name; empty means the default.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "reject-publish" => Some(Overflow::RejectPublish),
            "drop-head" => Some(Overflow::DropHead),
            _ => None,
        }
    }
}
