//! Option structs for connecting, declaring, publishing and consuming, and [`QueueInfo`], the
//! broker's description of a queue.

use std::collections::HashMap;
use std::time::Duration;

use hopper_proto::{pb, DEFAULT_MAX_FRAME_SIZE};

/// How to connect and what to ask for in the handshake.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Name shown in the broker's logs.
    pub client_name: String,
    /// Requested heartbeat interval. The broker picks the smaller non-zero of its own and this;
    /// [`Duration::ZERO`] asks for none. Default 10 s.
    pub heartbeat: Duration,
    /// Largest frame this client wants to send or receive, in bytes. The broker picks the
    /// smaller of its own and this. Default [`DEFAULT_MAX_FRAME_SIZE`].
    pub max_frame_size: u32,
    /// Limit on the TCP connect and the handshake together; [`Duration::ZERO`] waits forever.
    /// Default 10 s.
    pub connect_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            client_name: concat!("hopper-client/", env!("CARGO_PKG_VERSION")).to_string(),
            heartbeat: Duration::from_secs(10),
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl ConnectOptions {
    /// The heartbeat interval as the handshake carries it: whole milliseconds, at least 1 for
    /// any non-zero interval, saturating at `u32::MAX`.
    pub(crate) fn heartbeat_ms(&self) -> u32 {
        if self.heartbeat.is_zero() {
            return 0;
        }
        u32::try_from(self.heartbeat.as_millis()).unwrap_or(u32::MAX).max(1)
    }
}

/// Settings of a queue, fixed when it is first declared.
#[derive(Debug, Clone, Default)]
pub struct QueueOptions {
    /// Keep the queue and its messages across broker restarts.
    pub durable: bool,
}

/// Conditions on deleting a queue.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// Fail with `PRECONDITION_FAILED` instead of deleting a queue that has consumers.
    pub if_unused: bool,
    /// Fail with `PRECONDITION_FAILED` instead of deleting a queue that holds messages.
    pub if_empty: bool,
}

/// Message properties set at publish time.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Application headers, delivered unchanged.
    pub headers: HashMap<String, String>,
    /// MIME type of the body, e.g. `application/json`; empty for none.
    pub content_type: String,
}

/// How a consumer receives.
#[derive(Debug, Clone, Default)]
pub struct ConsumeOptions {
    /// Most unacknowledged deliveries outstanding for this consumer; 0 = no limit. A limit also
    /// bounds the memory the client spends on deliveries not yet taken from the stream.
    pub prefetch: u32,
    /// Label shown in the broker's logs.
    pub tag: String,
    /// Make [`Delivery::ack`](crate::Delivery::ack) and the other settle calls wait until the
    /// broker has durably recorded the settlement (one round trip each). Without it they return
    /// once the request is queued for sending, and an ack lost in a broker crash means a
    /// redelivery.
    pub confirm_settlements: bool,
}

/// A queue as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Whether the queue survives broker restarts.
    pub durable: bool,
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
}

impl From<pb::QueueInfo> for QueueInfo {
    fn from(info: pb::QueueInfo) -> Self {
        QueueInfo {
            name: info.name,
            durable: info.settings.is_some_and(|s| s.durable),
            ready: info.ready,
            unacked: info.unacked,
            consumers: info.consumers,
            published_total: info.published_total,
            delivered_total: info.delivered_total,
            acked_total: info.acked_total,
            redelivered_total: info.redelivered_total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_is_sent_in_whole_milliseconds() {
        let mut options = ConnectOptions::default();
        assert_eq!(options.heartbeat_ms(), 10_000);
        options.heartbeat = Duration::ZERO;
        assert_eq!(options.heartbeat_ms(), 0);
        options.heartbeat = Duration::from_micros(10);
        assert_eq!(options.heartbeat_ms(), 1, "a sub-millisecond interval must not turn into 'off'");
        options.heartbeat = Duration::from_secs(u64::MAX);
        assert_eq!(options.heartbeat_ms(), u32::MAX);
    }

    #[test]
    fn queue_info_reads_settings_and_counters() {
        let info = QueueInfo::from(pb::QueueInfo {
            name: "jobs".into(),
            settings: Some(pb::QueueSettings { durable: true }),
            ready: 3,
            unacked: 2,
            consumers: 1,
            published_total: 10,
            delivered_total: 7,
            acked_total: 5,
            redelivered_total: 1,
        });
        assert_eq!(info.name, "jobs");
        assert!(info.durable);
        assert_eq!((info.ready, info.unacked, info.consumers), (3, 2, 1));
        assert_eq!((info.published_total, info.delivered_total), (10, 7));
        assert_eq!((info.acked_total, info.redelivered_total), (5, 1));
    }

    #[test]
    fn missing_settings_mean_not_durable() {
        let info = QueueInfo::from(pb::QueueInfo { name: "q".into(), ..Default::default() });
        assert!(!info.durable);
    }
}
