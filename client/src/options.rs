//! Option structs for connecting, declaring, publishing, consuming, pulling and settling, and
//! how durations travel on the wire.

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

/// Settings of a queue, fixed when it is first declared. Declaring an existing queue with
/// different settings fails with `PRECONDITION_FAILED`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueOptions {
    /// Keep the queue and its messages across broker restarts.
    pub durable: bool,
    /// Queue that receives this queue's dead messages: rejected, past `max_deliveries`,
    /// expired, or pushed out by a length limit. Each arrives with a [`Death`](crate::Death)
    /// appended to its history. `None` drops dead messages (they are still audited), and so
    /// does a dead-letter queue that does not exist when the message dies: declare it first.
    pub dead_letter: Option<String>,
    /// Deliveries after which a message that keeps failing (nacked with requeue, or not acked
    /// in time) dies with reason `delivery_limit`. `None` (or 0) means no limit.
    pub max_deliveries: Option<u32>,
    /// Delays before the 1st, 2nd, ... redelivery of a failed message; the last one repeats.
    /// Empty: redeliver at once.
    pub retry_backoff: Vec<Duration>,
    /// How long a message may wait in the queue; past that it dies with reason `expired`.
    pub message_ttl: Option<Duration>,
    /// How long a consumer has to settle a delivery before the broker takes it back (as a
    /// failed delivery) and the consumer's later settle fails with
    /// [`Error::DeliveryExpired`](crate::Error::DeliveryExpired). `None`: no deadline.
    pub ack_timeout: Option<Duration>,
}

impl QueueOptions {
    /// The settings as a `QueueDeclare` carries them.
    pub(crate) fn to_wire(&self) -> pb::QueueSettings {
        pb::QueueSettings {
            durable: self.durable,
            dead_letter: self.dead_letter.clone().unwrap_or_default(),
            max_deliveries: self.max_deliveries.unwrap_or(0),
            retry_backoff_ms: self.retry_backoff.iter().copied().map(wire_ms).collect(),
            message_ttl_ms: self.message_ttl.map_or(0, wire_ms),
            ack_timeout_ms: self.ack_timeout.map_or(0, wire_ms),
            ..Default::default()
        }
    }
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
    /// Keep the message invisible to consumers for this long after the broker accepts it.
    pub delay: Option<Duration>,
    /// Time to live of this message; the sooner of this and the queue's `message_ttl`
    /// applies. An expired message dies with reason `expired`.
    pub ttl: Option<Duration>,
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
    /// Ack timeout of this consumer's deliveries, instead of the queue's `ack_timeout`.
    pub ack_timeout: Option<Duration>,
}

/// What [`Connection::get`](crate::Connection::get) pulls and for how long it hides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetOptions {
    /// Most messages to return. Default 1.
    pub count: u32,
    /// How long the pulled messages stay invisible to other consumers. Not settled by then,
    /// each returns to the queue as a failed delivery. `None`: the broker's default (30 s).
    pub visibility: Option<Duration>,
    /// Long poll: when the queue is empty, wait up to this long (the broker caps it at 20 s)
    /// for a message. `None`: answer at once.
    pub wait: Option<Duration>,
}

impl Default for GetOptions {
    fn default() -> Self {
        GetOptions { count: 1, visibility: None, wait: None }
    }
}

/// Details of a negative acknowledgement, for
/// [`Delivery::nack_with`](crate::Delivery::nack_with).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NackOptions {
    /// Why processing failed (e.g. the error message or a stack trace). The broker keeps it
    /// with the message, shows it in the message's [`Death`](crate::Death) if it dies, and in
    /// the audit trail; it keeps at most 4 KiB.
    pub error: String,
    /// With requeue: redeliver after this delay instead of the queue's retry backoff
    /// (`Some(Duration::ZERO)` redelivers at once).
    pub delay: Option<Duration>,
}

/// A duration as the protocol carries it: whole milliseconds, at least 1 for any non-zero
/// duration (0 means "not set" in most fields), saturating at `u64::MAX`.
pub(crate) fn wire_ms(duration: Duration) -> u64 {
    if duration.is_zero() {
        return 0;
    }
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
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
    fn durations_travel_in_whole_milliseconds() {
        assert_eq!(wire_ms(Duration::ZERO), 0);
        assert_eq!(wire_ms(Duration::from_micros(1)), 1);
        assert_eq!(wire_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(wire_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn default_queue_options_set_nothing_on_the_wire() {
        assert_eq!(QueueOptions::default().to_wire(), pb::QueueSettings::default());
    }

    #[test]
    fn queue_options_carry_every_setting() {
        let options = QueueOptions {
            durable: true,
            dead_letter: Some("jobs.dead".into()),
            max_deliveries: Some(5),
            retry_backoff: vec![Duration::from_secs(1), Duration::from_millis(2500)],
            message_ttl: Some(Duration::from_secs(60)),
            ack_timeout: Some(Duration::from_secs(30)),
        };
        assert_eq!(
            options.to_wire(),
            pb::QueueSettings {
                durable: true,
                dead_letter: "jobs.dead".into(),
                max_deliveries: 5,
                retry_backoff_ms: vec![1000, 2500],
                message_ttl_ms: 60_000,
                ack_timeout_ms: 30_000,
            }
        );
    }

    #[test]
    fn get_defaults_to_one_message_without_waiting() {
        let options = GetOptions::default();
        assert_eq!((options.count, options.visibility, options.wait), (1, None, None));
    }
}
