//! Option structs for connecting, declaring, publishing, consuming, pulling, settling and
//! moving messages, and how durations travel on the wire.

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
    /// Who to log in as, with SCRAM-SHA-256 (the password never crosses the wire). `None`
    /// logs in as the broker's client certificate user when [`TlsOptions::client_certificate`]
    /// is set (mechanism EXTERNAL), and otherwise as the broker's built-in guest, which only
    /// works from the broker's own host while no admin user exists.
    pub credentials: Option<Credentials>,
    /// How to log in; [`Mechanism::Auto`] picks from `credentials` and the client certificate.
    pub mechanism: Mechanism,
    /// Speak the protocol inside TLS (the broker's `--tls-listen` port). `None`: plain TCP.
    pub tls: Option<TlsOptions>,
}

/// How the client logs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mechanism {
    /// SCRAM-SHA-256 with [`ConnectOptions::credentials`]; without credentials, EXTERNAL when
    /// a client certificate is set, and the built-in guest otherwise.
    #[default]
    Auto,
    /// SCRAM-SHA-256: the password never crosses the wire and the broker proves it knows the
    /// user. Needs credentials.
    ScramSha256,
    /// PLAIN (RFC 4616): the password travels inside TLS, and the broker checks it. Needs
    /// credentials and TLS: without TLS the client refuses to send it.
    Plain,
    /// EXTERNAL (RFC 4422): the user named by the client certificate the broker verified
    /// (its subject CN). Needs a client certificate on a broker with `--tls-client-ca`.
    External,
}

impl Mechanism {
    /// The mechanism's name in the handshake; empty for [`Mechanism::Auto`].
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Auto => "",
            Mechanism::ScramSha256 => hopper_proto::scram::MECHANISM,
            Mechanism::Plain => "PLAIN",
            Mechanism::External => "EXTERNAL",
        }
    }
}

/// TLS settings of a connection: which broker certificate to accept, and this client's own
/// certificate for mutual TLS.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// The name the broker's certificate must be valid for, also sent as SNI: a DNS name or
    /// an IP address (usually the host connected to).
    pub server_name: String,
    /// PEM CA certificates to trust *instead of* the built-in roots (Mozilla's, compiled in
    /// from `webpki-roots`): set this for a broker whose certificate comes from a private CA.
    /// Replacing rather than adding means no public CA can vouch for a false broker. `None`:
    /// the built-in roots.
    pub ca_certificates: Option<Vec<u8>>,
    /// A certificate and key to present for mutual TLS.
    pub client_certificate: Option<ClientCertificate>,
}

impl TlsOptions {
    /// TLS to the broker named `server_name`, verified against the built-in roots.
    pub fn new(server_name: impl Into<String>) -> Self {
        TlsOptions { server_name: server_name.into(), ..TlsOptions::default() }
    }
}

/// A client certificate chain and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The certificate chain, the client's own certificate first.
    pub cert_pem: Vec<u8>,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ca = self.ca_certificates.as_ref().map(|pem| format!("{} bytes of PEM", pem.len()));
        f.debug_struct("TlsOptions")
            .field("server_name", &self.server_name)
            .field("ca_certificates", &ca.as_deref().unwrap_or("built-in roots"))
            .field("client_certificate", &self.client_certificate)
            .finish()
    }
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"***")
            .finish()
    }
}

/// A user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl Credentials {
    /// `user` with `password`.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials { user: user.into(), password: password.into() }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"***").finish()
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            client_name: concat!("hopper-client/", env!("CARGO_PKG_VERSION")).to_string(),
            heartbeat: Duration::from_secs(10),
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            connect_timeout: Duration::from_secs(10),
            credentials: None,
            mechanism: Mechanism::Auto,
            tls: None,
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
    /// Replicate the queue over the cluster's nodes (the broker must be in a cluster): a
    /// publish is confirmed once a majority of nodes holds it, and the queue survives the loss
    /// of a minority. Consumers attach at the node serving it.
    pub replicated: bool,
    /// Copies of a replicated queue; `None` = one on every node of the cluster, which is what
    /// a cluster keeps: any other number than its size is refused.
    pub replicas: Option<u32>,
    /// Queue that receives this queue's dead messages: rejected, past `max_deliveries`,
    /// expired, or pushed out by a length limit. Each arrives with a [`Death`](crate::Death)
    /// appended to its history. `None` drops dead messages (they are still audited), and so
    /// does a dead-letter queue that does not exist when the message dies: declare it first.
    pub dead_letter: Option<String>,
    /// Exchange that dead messages are published to (besides `dead_letter`, if both are set),
    /// as RabbitMQ's `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// Routing key of dead messages published to `dead_letter_exchange`; `None` keeps their
    /// own, as RabbitMQ's `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
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
    /// Most messages waiting (ready and delayed; unacknowledged deliveries do not count).
    /// `None` (or 0): unbounded. What happens past it is [`overflow`](Self::overflow).
    pub max_length: Option<u64>,
    /// Most body bytes of the waiting messages. `None` (or 0): unbounded.
    pub max_bytes: Option<u64>,
    /// What a full queue (past `max_length` or `max_bytes`) does with a new message.
    pub overflow: Overflow,
}

/// What a bounded queue does with a publish that would exceed its `max_length` or `max_bytes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// Refuse the publish: its confirm fails with `RESOURCE_LIMIT` ("queue 'q' is full
    /// (...)") and nothing is stored.
    #[default]
    RejectPublish,
    /// Accept the publish; the oldest waiting messages die with reason `maxlen` (and go to the
    /// dead-letter queue, if the queue has one).
    DropHead,
}

impl Overflow {
    /// The name the protocol (and the CLI) uses: `reject-publish` or `drop-head`.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::RejectPublish => "reject-publish",
            Overflow::DropHead => "drop-head",
        }
    }

    /// The overflow named `name` on the wire; "" is the default. `None` for a name this client
    /// does not know.
    pub fn from_wire(name: &str) -> Option<Overflow> {
        match name {
            "" | "reject-publish" => Some(Overflow::RejectPublish),
            "drop-head" => Some(Overflow::DropHead),
            _ => None,
        }
    }

    /// The wire value: empty for the default, so that a declaration without limits sets
    /// nothing.
    fn to_wire(self) -> String {
        match self {
            Overflow::RejectPublish => String::new(),
            other => other.as_str().to_string(),
        }
    }
}

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl QueueOptions {
    /// The settings as a `QueueDeclare` carries them.
    pub(crate) fn to_wire(&self) -> pb::QueueSettings {
        pb::QueueSettings {
            durable: self.durable,
            dead_letter: self.dead_letter.clone().unwrap_or_default(),
            dead_letter_exchange: self.dead_letter_exchange.clone().unwrap_or_default(),
            dead_letter_routing_key: self.dead_letter_routing_key.clone().unwrap_or_default(),
            max_deliveries: self.max_deliveries.unwrap_or(0),
            retry_backoff_ms: self.retry_backoff.iter().copied().map(wire_ms).collect(),
            message_ttl_ms: self.message_ttl.map_or(0, wire_ms),
            ack_timeout_ms: self.ack_timeout.map_or(0, wire_ms),
            max_length: self.max_length.unwrap_or(0),
            max_bytes: self.max_bytes.unwrap_or(0),
            overflow: self.overflow.to_wire(),
            replicated: self.replicated,
            replicas: self.replicas.unwrap_or(0),
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
    /// Through an exchange ([`Connection::publish_to`](crate::Connection::publish_to)): when no
    /// queue takes the message, the broker returns it and the confirm fails with `NO_ROUTE`,
    /// instead of dropping it.
    pub mandatory: bool,
    /// An id for this message, unique among the publisher's messages (0 = none). A replicated
    /// queue that still holds a message published with this id takes a publish with it again
    /// (a retry after a lost connection) without adding a copy. [`crate::Recovering::publish`]
    /// gives each message one by itself.
    pub publish_id: u64,
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
    /// Take at most this many deliveries, then receive nothing more (the consumer stays
    /// subscribed until cancelled, so its deliveries can still be settled). Lets a client that
    /// wants exactly N messages stop without the broker pushing more into freed window slots.
    pub limit: Option<u64>,
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

/// What [`Connection::start_move`](crate::Connection::start_move) moves, where, and how fast.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveOptions {
    /// Queue to take waiting messages from, head first (typically a dead-letter queue).
    pub source: String,
    /// Queue to put them in. `None`: each message goes back to the queue it last died in;
    /// messages that never died, or whose queue no longer exists, are skipped and stay.
    pub destination: Option<String>,
    /// Most messages per second, spaced evenly. `None` (or 0): as fast as possible.
    pub rate: Option<u32>,
    /// Stop after this many messages. `None` (or 0): move all that match.
    pub limit: Option<u64>,
    /// Only messages whose header `.0` equals `.1`; for the keys `reason`, `queue`, `error`
    /// and `count`, the field of the message's latest death (e.g. `("reason", "expired")`).
    pub filter: Option<(String, String)>,
    /// With no destination: send each message back through the exchange and routing key it
    /// had when it died (to every queue they route to now), instead of to the queue it died in.
    pub through_exchange: bool,
}

impl MoveOptions {
    /// The request as the wire carries it.
    pub(crate) fn to_wire(&self) -> pb::MoveStart {
        let (filter_key, filter_value) = self.filter.clone().unwrap_or_default();
        pb::MoveStart {
            source: self.source.clone(),
            destination: self.destination.clone().unwrap_or_default(),
            rate: self.rate.unwrap_or(0),
            limit: self.limit.unwrap_or(0),
            filter_key,
            filter_value,
            through_exchange: self.through_exchange,
        }
    }
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
    fn tls_options_never_print_keys() {
        let tls = TlsOptions {
            ca_certificates: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
            client_certificate: Some(ClientCertificate {
                cert_pem: b"cert".to_vec(),
                key_pem: b"SECRET KEY".to_vec(),
            }),
            ..TlsOptions::new("mq.internal")
        };
        let text = format!("{tls:?}");
        assert!(text.contains("mq.internal") && text.contains("27 bytes of PEM"), "{text}");
        assert!(!text.contains("SECRET") && !text.contains("83, 69"), "{text}");
        assert!(format!("{:?}", TlsOptions::new("h")).contains("built-in roots"));
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
            dead_letter_exchange: Some("dead".into()),
            dead_letter_routing_key: Some("jobs".into()),
            max_deliveries: Some(5),
            retry_backoff: vec![Duration::from_secs(1), Duration::from_millis(2500)],
            message_ttl: Some(Duration::from_secs(60)),
            ack_timeout: Some(Duration::from_secs(30)),
            max_length: Some(1000),
            max_bytes: Some(1 << 20),
            overflow: Overflow::DropHead,
            replicated: true,
            replicas: Some(3),
        };
        assert_eq!(
            options.to_wire(),
            pb::QueueSettings {
                durable: true,
                dead_letter: "jobs.dead".into(),
                dead_letter_exchange: "dead".into(),
                dead_letter_routing_key: "jobs".into(),
                max_deliveries: 5,
                retry_backoff_ms: vec![1000, 2500],
                message_ttl_ms: 60_000,
                ack_timeout_ms: 30_000,
                max_length: 1000,
                max_bytes: 1 << 20,
                overflow: "drop-head".into(),
                replicated: true,
                replicas: 3,
            }
        );
    }

    #[test]
    fn overflow_names_round_trip() {
        for overflow in [Overflow::RejectPublish, Overflow::DropHead] {
            assert_eq!(Overflow::from_wire(overflow.as_str()), Some(overflow));
            assert_eq!(overflow.to_string(), overflow.as_str());
        }
        assert_eq!(Overflow::from_wire(""), Some(Overflow::RejectPublish), "empty is the default");
        assert_eq!(Overflow::from_wire("drop-tail"), None);
    }

    #[test]
    fn move_options_fill_the_request() {
        assert_eq!(
            MoveOptions { source: "jobs.dead".into(), ..Default::default() }.to_wire(),
            pb::MoveStart { source: "jobs.dead".into(), ..Default::default() }
        );
        let options = MoveOptions {
            source: "jobs.dead".into(),
            destination: Some("jobs".into()),
            rate: Some(50),
            limit: Some(10),
            filter: Some(("reason".into(), "expired".into())),
            through_exchange: true,
        };
        assert_eq!(
            options.to_wire(),
            pb::MoveStart {
                source: "jobs.dead".into(),
                destination: "jobs".into(),
                rate: 50,
                limit: 10,
                filter_key: "reason".into(),
                filter_value: "expired".into(),
                through_exchange: true,
            }
        );
    }

    #[test]
    fn get_defaults_to_one_message_without_waiting() {
        let options = GetOptions::default();
        assert_eq!((options.count, options.visibility, options.wait), (1, None, None));
    }
}
