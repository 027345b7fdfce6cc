//! Messages as the broker holds them: an immutable, shared payload plus per-queue state.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

/// The part of a message that never changes after publish. Shared (not copied) between the
/// queue, the unacked window, every delivery of it and, for a message routed to several queues,
/// all of them. Kept to 112 bytes (128 with its reference counts): a backlog holds one per
/// message, so the rarely set parts live out of line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload {
    /// Broker-assigned id, unique within the broker; kept when the message is dead-lettered.
    pub id: u64,
    /// The body.
    pub body: Bytes,
    /// Unix time in milliseconds at which the broker first accepted the message.
    pub published_at_ms: u64,
    /// How many times the message was moved (replayed) out of a queue.
    pub replay_count: u32,
    /// The exchange it was published to; empty for the default exchange (to a queue by name).
    /// Shared with the exchange, which hands out its name to every message it routes.
    pub exchange: Arc<str>,
    /// The routing key it was published with; for the default exchange, the queue's name or
    /// empty.
    pub routing_key: String,
    /// Headers, content type and deaths; `None` while all are empty. Shared by the messages
    /// published with the same headers and content type (see [`MessageProperties`]).
    pub(crate) properties: Option<Arc<Properties>>,
    /// The id its publisher gave it so that a publish tried twice enters a replicated queue
    /// once; 0 = none. Not stored: only the replication log carries it.
    pub publish_id: u64,
}

/// The parts of a [`Payload`] most messages leave empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties {
    headers: HashMap<String, String>,
    content_type: String,
    deaths: Vec<Death>,
    deaths_omitted: u32,
}

/// The headers and content type a publisher gives a message, built once and shared: a front
/// end that sees a publisher send the same ones again (most send the same with every message)
/// hands out the same `MessageProperties`, and the messages hold one copy of them in memory,
/// not one each.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageProperties(Option<Arc<Properties>>);

impl MessageProperties {
    /// These headers and content type.
    pub fn new(headers: HashMap<String, String>, content_type: String) -> Self {
        if headers.is_empty() && content_type.is_empty() {
            return MessageProperties(None);
        }
        MessageProperties(Some(Arc::new(Properties { headers, content_type, ..Properties::default() })))
    }

    /// The headers.
    pub fn headers(&self) -> &HashMap<String, String> {
        self.0.as_ref().map_or(&NO_HEADERS, |p| &p.headers)
    }

    /// The content type, or empty.
    pub fn content_type(&self) -> &str {
        self.0.as_ref().map_or("", |p| &p.content_type)
    }
}

/// What [`Payload::headers`] lends for a message without headers.
static NO_HEADERS: std::sync::LazyLock<HashMap<String, String>> = std::sync::LazyLock::new(HashMap::new);

/// Why a message left its queue without being acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeathReason {
    /// Nacked or rejected without requeue.
    Rejected,
    /// Failed as many times as the queue's `max_deliveries` allows.
    DeliveryLimit,
    /// Its time to live ran out.
    Expired,
    /// Pushed out of a full queue (`drop-head` overflow).
    MaxLen,
    /// Its stored body failed its checksum or was cut short: the body is gone, the death
    /// record says where it was.
    Corrupt,
    /// A delivery of it would be larger than its consumer's max frame size.
    TooLarge,
}

impl DeathReason {
    /// Every reason.
    pub const ALL: [DeathReason; 6] = [
        DeathReason::Rejected,
        DeathReason::DeliveryLimit,
        DeathReason::Expired,
        DeathReason::MaxLen,
        DeathReason::Corrupt,
        DeathReason::TooLarge,
    ];

    /// The reason as shown on the wire, in the CLI and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::DeliveryLimit => "delivery_limit",
            DeathReason::Expired => "expired",
            DeathReason::MaxLen => "maxlen",
            DeathReason::Corrupt => "corrupt",
            DeathReason::TooLarge => "too_large",
        }
    }

    /// Parses [`DeathReason::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        DeathReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// One death of a message: where, why, and what its consumers said.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Death {
    /// The queue it died in.
    pub queue: String,
    /// Why.
    pub reason: DeathReason,
    /// Its delivery count in that queue.
    pub count: u32,
    /// The error text of the last failed delivery (a consumer's nack/reject reason), or empty.
    pub error: String,
    /// Unix ms of its first failed delivery in that queue (0 if it never failed).
    pub first_failure_ms: u64,
    /// Unix ms of its last failed delivery in that queue (0 if it never failed).
    pub last_failure_ms: u64,
    /// Unix ms of the death.
    pub died_at_ms: u64,
    /// The exchange the message had been published (or dead-lettered) to before it died.
    pub exchange: String,
    /// The routing key it had then.
    pub routing_key: String,
}

/// Failed deliveries of a message in its current queue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Failure {
    /// Unix ms of the first failed delivery.
    pub first_ms: u64,
    /// Unix ms of the latest failed delivery.
    pub last_ms: u64,
    /// What the consumer said about the latest failure, up to 4 KiB.
    pub error: String,
    /// The consumer that held the message at its latest failure.
    pub consumer_id: u64,
    /// That consumer's connection.
    pub connection_id: u64,
}

/// A message inside one queue: a compact index entry, with the payload in memory or only on
/// disk (for a durable queue whose backlog outgrew its memory budget).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Position in the queue's arrival order; requeued messages go back to their place by it.
    pub seq: u64,
    /// Deliveries so far.
    pub delivery_count: u32,
    /// Its size as [`Payload::size`] counts it (known even when the body is only on disk).
    pub size: u32,
    /// Recovered after a crash, which may have hidden a delivery: the next delivery is flagged
    /// redelivered, as AMQP's "may have been delivered before".
    pub maybe_delivered: bool,

    /// The message, when it is in memory. Always set for transient queues and for deliveries.
    pub payload: Option<Arc<Payload>>,
    /// Where the message is stored, for durable queues.
    pub location: Option<Location>,
    /// Expiry, due time and failures: rare, so kept out of line (one pointer for the many
    /// messages that have none; the index of a large backlog stays small).
    pub(crate) extra: Option<Box<Extra>>,
}

/// The rarely set parts of a [`QueuedMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Extra {
    expires_at_ms: u64,
    due_ms: u64,
    failure: Option<Failure>,
}

/// Most deaths a message keeps: the first, and the latest ones. A message that cycles (A
/// dead-letters to B, B back to A, or a move-and-reject loop) does not grow without bound.
pub const MAX_DEATHS: usize = 16;

impl Payload {
    /// Application headers.
    pub fn headers(&self) -> &HashMap<String, String> {
        self.properties.as_ref().map_or(&NO_HEADERS, |p| &p.headers)
    }

    /// MIME type given by the publisher, or empty.
    pub fn content_type(&self) -> &str {
        self.properties.as_ref().map_or("", |p| &p.content_type)
    }

    /// Its deaths, oldest first (empty for a message that never died): the first and the
    /// latest ones, at most [`MAX_DEATHS`] in all.
    pub fn deaths(&self) -> &[Death] {
        self.properties.as_ref().map_or(&[], |p| &p.deaths)
    }

    /// Deaths left out between the first and the latest ones kept.
    pub fn deaths_omitted(&self) -> u32 {
        self.properties.as_ref().map_or(0, |p| p.deaths_omitted)
    }

    /// This payload with these headers and content type.
    pub fn with_properties(self, headers: HashMap<String, String>, content_type: String) -> Self {
        self.with_shared_properties(MessageProperties::new(headers, content_type))
    }

    /// This payload with `properties`, shared with the other messages that have them.
    pub fn with_shared_properties(mut self, properties: MessageProperties) -> Self {
        let deaths = self.properties.take().filter(|p| !p.deaths.is_empty() || p.deaths_omitted > 0);
        self.properties = properties.0;
        match deaths {
            Some(deaths) => self.with_deaths(deaths.deaths.clone(), deaths.deaths_omitted),
            None => self,
        }
    }

    /// The shared properties this payload holds, if any: the same allocation for every
    /// message that shares them.
    pub fn properties_ptr(&self) -> Option<&Arc<Properties>> {
        self.properties.as_ref()
    }

    /// This payload with these deaths, `omitted` of them left out (recovery).
    pub fn with_deaths(mut self, deaths: Vec<Death>, omitted: u32) -> Self {
        if !deaths.is_empty() || omitted > 0 || self.properties.is_some() {
            // Its own copy: the headers may be shared with messages that did not die.
            let properties = Arc::make_mut(self.properties.get_or_insert_with(Arc::default));
            properties.deaths = deaths;
            properties.deaths_omitted = omitted;
        }
        self
    }

    /// This payload with one more death: kept are the first and the latest [`MAX_DEATHS`] − 1,
    /// and a count of those left out.
    pub fn with_death(&self, death: Death) -> Payload {
        let current = self.deaths();
        let mut deaths = Vec::with_capacity((current.len() + 1).min(MAX_DEATHS));
        let mut omitted = self.deaths_omitted();
        if current.len() < MAX_DEATHS {
            deaths.extend_from_slice(current);
        } else {
            deaths.push(current[0].clone());
            let latest = &current[current.len() - (MAX_DEATHS - 2)..];
            deaths.extend_from_slice(latest);
            omitted = omitted.saturating_add((current.len() - 1 - latest.len()) as u32);
        }
        deaths.push(death);
        self.clone().with_deaths(deaths, omitted)
    }

    /// Bytes of the message that a client sent or a death added: body, header keys and values,
    /// content type, and the text of its deaths. What `max_bytes`, `waiting_bytes` and the
    /// memory watermark count, so large headers cannot slip past them.
    pub fn size(&self) -> usize {
        let Some(properties) = &self.properties else { return self.body.len() };
        let headers: usize = properties.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        let deaths: usize =
            properties.deaths.iter().map(|d| d.queue.len() + d.error.len() + DEATH_FIXED_BYTES).sum();
        self.body.len() + headers + properties.content_type.len() + deaths
    }
}

/// Bytes counted for a death besides its texts: its reason, counters and times.
const DEATH_FIXED_BYTES: usize = 48;

/// Memory one queued message takes besides its payload: its index entry. Counted against the
/// memory watermark.
pub const INDEX_ENTRY_BYTES: u64 = std::mem::size_of::<QueuedMessage>() as u64;

impl QueuedMessage {
    /// A new message held in memory only.
    pub fn transient(seq: u64, payload: Arc<Payload>) -> Self {
        QueuedMessage {
            seq,
            delivery_count: 0,
            size: u32::try_from(payload.size()).unwrap_or(u32::MAX),
            maybe_delivered: false,
            payload: Some(payload),
            location: None,
            extra: None,
        }
    }

    /// A message known only by where it is stored (recovered from disk).
    pub fn stored(seq: u64, delivery_count: u32, size: u32, location: Location) -> Self {
        QueuedMessage {
            seq,
            delivery_count,
            size,
            maybe_delivered: false,
            payload: None,
            location: Some(location),
            extra: None,
        }
    }

    /// True when this message has been delivered before.
    pub fn redelivered(&self) -> bool {
        self.delivery_count > 1 || self.maybe_delivered
    }

    /// True when its time to live has run out at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        let expires = self.expires_at_ms();
        expires != 0 && expires <= now_ms
    }

    /// Unix ms after which the message expires; 0 = never.
    pub fn expires_at_ms(&self) -> u64 {
        self.extra.as_ref().map_or(0, |e| e.expires_at_ms)
    }

    /// While delayed: Unix ms at which it becomes ready. While delivered: its ack deadline.
    /// 0 = none.
    pub fn due_ms(&self) -> u64 {
        self.extra.as_ref().map_or(0, |e| e.due_ms)
    }

    /// Its failed deliveries so far, if any.
    pub fn failure(&self) -> Option<&Failure> {
        self.extra.as_ref().and_then(|e| e.failure.as_ref())
    }

    /// Sets the expiry (0 = never).
    pub fn set_expires_at_ms(&mut self, expires_at_ms: u64) {
        if expires_at_ms != 0 || self.extra.is_some() {
            self.extra_mut().expires_at_ms = expires_at_ms;
        }
    }

    /// Sets the due time (0 = none).
    pub fn set_due_ms(&mut self, due_ms: u64) {
        if due_ms != 0 || self.extra.is_some() {
            self.extra_mut().due_ms = due_ms;
        }
    }

    /// The failure record, started at `now_ms` if there was none.
    pub fn failure_mut(&mut self, now_ms: u64) -> &mut Failure {
        self.extra_mut().failure.get_or_insert_with(|| Failure { first_ms: now_ms, ..Failure::default() })
    }

    /// Sets every rare part at once (recovery).
    pub fn with_extra(mut self, expires_at_ms: u64, due_ms: u64, failure: Option<Failure>) -> Self {
        if expires_at_ms != 0 || due_ms != 0 || failure.is_some() {
            self.extra = Some(Box::new(Extra { expires_at_ms, due_ms, failure }));
        }
        self
    }

    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }
}

/// Longest error text kept with a failed delivery.
pub const MAX_ERROR_BYTES: usize = 4096;

/// Cuts `error` to at most [`MAX_ERROR_BYTES`] on a character boundary.
pub fn clip_error(mut error: String) -> String {
    if error.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
    }
    error
}

/// Where a record lives. Kept to 12 bytes: one is held in memory per stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    segment: u32,
    offset: u32,
    len: u32,
}

impl Location {
    /// The record at `offset` of segment `segment`, `len` bytes long. Segments are at most
    /// 4 GiB and their ids fit 32 bits (the configuration caps `segment_bytes`).
    pub fn new(segment: u64, offset: u64, len: u32) -> Self {
        debug_assert!(segment <= u64::from(u32::MAX) && offset <= u64::from(u32::MAX));
        Location { segment: segment as u32, offset: offset as u32, len }
    }

    /// Segment id.
    pub fn segment(&self) -> u64 {
        self.segment.into()
    }

    /// Byte offset of the record's header in the segment file.
    pub fn offset(&self) -> u64 {
        self.offset.into()
    }

    /// Total bytes of the record, header included.
    pub fn bytes(&self) -> u32 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_share_their_properties_until_one_dies() {
        let properties =
            MessageProperties::new([("tenant".into(), "acme".into())].into(), "text/plain".into());
        let first = Payload::default().with_shared_properties(properties.clone());
        let second = Payload { id: 2, ..Payload::default() }.with_shared_properties(properties);
        assert!(Arc::ptr_eq(first.properties_ptr().unwrap(), second.properties_ptr().unwrap()));
        let dead = second.with_death(death(1));
        assert_eq!(dead.deaths().len(), 1);
        assert_eq!((dead.headers()["tenant"].as_str(), dead.content_type()), ("acme", "text/plain"));
        assert!(first.deaths().is_empty() && second.deaths().is_empty(), "the others did not die");
        let replaced = dead.with_shared_properties(MessageProperties::default());
        assert!(replaced.headers().is_empty());
        assert_eq!(replaced.deaths().len(), 1, "new headers keep its deaths");
        assert!(MessageProperties::new(HashMap::new(), String::new()) == MessageProperties::default());
    }

    fn death(n: u64) -> Death {
        Death {
            queue: format!("q{n}"),
            reason: DeathReason::Rejected,
            count: 1,
            error: "x".repeat(100),
            first_failure_ms: n,
            last_failure_ms: n,
            died_at_ms: n,
            exchange: String::new(),
            routing_key: String::new(),
        }
    }

    #[test]
    fn a_cycling_message_keeps_its_first_and_latest_deaths_and_a_count() {
        let mut payload = Payload::default();
        for n in 0..1000 {
            payload = payload.with_death(death(n));
            assert!(payload.deaths().len() <= MAX_DEATHS);
        }
        let times: Vec<u64> = payload.deaths().iter().map(|d| d.died_at_ms).collect();
        let mut expected = vec![0];
        expected.extend(1000 - (MAX_DEATHS as u64 - 1)..1000);
        assert_eq!(times, expected, "the first death and the latest ones");
        assert_eq!(payload.deaths_omitted() as usize, 1000 - MAX_DEATHS);
        assert!(payload.size() < 4096, "bounded: {}", payload.size());
    }

    #[test]
    fn a_payload_fits_its_size_class() {
        assert!(std::mem::size_of::<Payload>() <= 112, "{} bytes", std::mem::size_of::<Payload>());
    }
}
