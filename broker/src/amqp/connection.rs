//! One AMQP 0-9-1 connection: the handshake (protocol header, start, tune, open), then the
//! methods of its channels, each turned into one engine call and its answer back into frames.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, ProtocolVersion};
use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use super::codec::{encode, push_frame, FrameCodec, FrameError, Inbound, PROTOCOL_HEADER};
use super::confirms::Confirms;
use super::shared::{ReplyConsumer, Shared, REPLY_TO};
use super::sink::{content, content_frames, AmqpSink, Tags};
use super::{arguments, properties};
use crate::engine::{Caller, ConsumeOptions, DeliveryRef, Engine, NackOptions, NewMessage, Pull, Route};
use crate::error::BrokerError;
use crate::message::MessageProperties;
use crate::outbox::Outbox;
use crate::queue::Confirm;
use crate::routing::{Binding, Destination, ExchangeSpec};

/// The largest frame either side may send; the client may ask for less.
pub const FRAME_MAX: u32 = 128 * 1024;
/// Channels per connection.
const CHANNEL_MAX: u16 = 2047;
/// Heartbeat proposed to clients, in seconds.
const HEARTBEAT_S: u16 = 60;
/// Deliveries of a no-ack consumer on their way to being acked.
const NO_ACK_WINDOW: u32 = 1000;
/// Time a client gets for each step of the handshake.
const HANDSHAKE_STEP: Duration = Duration::from_secs(10);
/// Frames handled in one go once one has come, when more are read already: some 340
/// publishes of three frames, about what one read of 64 KiB brings.
const BURST: usize = 1024;
/// Body bytes of publishes held back while publishers are blocked; beyond them the
/// connection is not read until the block lifts.
const MAX_HELD_BYTES: usize = 1024 * 1024;

/// AMQP reply codes.
mod code {
    pub const NO_ROUTE: u16 = 312;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

/// Why a method failed, and what fails with it.
enum Failure {
    /// The channel closes with this code and text; the connection goes on.
    Channel(u16, String),
    /// The connection closes.
    Connection(u16, String),
}

impl From<BrokerError> for Failure {
    fn from(err: BrokerError) -> Self {
        let code = match &err {
            BrokerError::NotFound(_) => code::NOT_FOUND,
            BrokerError::AccessRefused(_) | BrokerError::Unauthenticated(_) => code::ACCESS_REFUSED,
            BrokerError::PreconditionFailed(_)
            | BrokerError::InvalidArgument(_)
            | BrokerError::ResourceLimit(_)
            | BrokerError::NoRoute(_) => code::PRECONDITION_FAILED,
            BrokerError::NotAllowed(_) | BrokerError::ServedElsewhere { .. } => code::RESOURCE_LOCKED,
            BrokerError::ProtocolViolation(_) => {
                return Failure::Connection(code::COMMAND_INVALID, err.to_string())
            }
            BrokerError::Internal(_) => return Failure::Connection(code::INTERNAL_ERROR, err.to_string()),
        };
        Failure::Channel(code, err.to_string())
    }
}

/// A publish whose content has not all arrived yet.
struct Incoming {
    method: basic::Publish,
    /// Boxed as it was read: it is some 300 bytes.
    header: Option<Box<AMQPContentHeader>>,
    /// The body of one frame, as it was read.
    body: Bytes,
    /// The body of several frames, gathered.
    gathered: Vec<u8>,
}

impl Incoming {
    fn new(method: basic::Publish) -> Self {
        Incoming { method, header: None, body: Bytes::new(), gathered: Vec::new() }
    }

    /// Adds the bytes of a body frame: a body in one frame, the usual case, is taken as it is.
    fn add_body(&mut self, part: Bytes) {
        if self.body.is_empty() && self.gathered.is_empty() {
            self.body = part;
            return;
        }
        if self.gathered.is_empty() {
            let size = self.header.as_ref().map_or(0, |header| header.body_size as usize);
            self.gathered.reserve(size);
            self.gathered.extend_from_slice(&std::mem::take(&mut self.body));
        }
        self.gathered.extend_from_slice(&part);
    }

    /// Body bytes so far.
    fn body_len(&self) -> usize {
        self.body.len() + self.gathered.len()
    }

    fn into_parts(self) -> (basic::Publish, Option<Box<AMQPContentHeader>>, Bytes) {
        let body = if self.gathered.is_empty() { self.body } else { Bytes::from(self.gathered) };
        (self.method, self.header, body)
    }
}

/// One open channel.
#[derive(Default)]
struct Channel {
    tags: Arc<Mutex<Tags>>,
    /// `basic.qos`: the prefetch of the channel's next consumers (0 = none).
    prefetch: u16,
    /// Its consumers: consumer tag → consumer id.
    consumers: HashMap<String, u64>,
    /// Consumers the client cancelled that still hold deliveries: as in RabbitMQ, the channel
    /// may settle those, and they return to their queue only if the channel closes first.
    stopped: HashSet<u64>,
    /// Its no-ack consumers.
    no_ack: HashSet<u64>,
    /// Its direct reply-to consumer: the token its replies are addressed by, and its tag.
    reply: Option<(String, String)>,
    incoming: Option<Incoming>,
    /// In confirm mode: where its publishes are numbered and answered.
    confirms: Option<Arc<Confirms>>,
    /// Closed by the broker: frames are ignored until the client's `channel.close-ok`.
    closing: bool,
    /// The properties of its latest publish, as read and as kept: the next publish with the
    /// same ones shares them.
    last_properties: Option<Box<(basic::AMQPProperties, MessageProperties)>>,
}

impl Channel {
    /// The Hopper headers and content type of a publish with `amqp` properties.
    fn properties_of(&mut self, amqp: &basic::AMQPProperties) -> MessageProperties {
        match &self.last_properties {
            Some(last) if last.0 == *amqp => last.1.clone(),
            _ => {
                let (headers, content_type) = properties::from_amqp(amqp);
                let properties = MessageProperties::new(headers, content_type);
                self.last_properties = Some(Box::new((amqp.clone(), properties.clone())));
                properties
            }
        }
    }
}

/// What the handshake settled.
pub(super) struct Opened {
    pub user: String,
    pub frame_max: usize,
    /// Seconds between heartbeats; 0 = none.
    pub heartbeat: u16,
    /// The client understands `connection.blocked`.
    pub notify_blocked: bool,
}

/// A logged-in connection.
pub(super) struct Connection {
    engine: Arc<Engine>,
    shared: Arc<Shared>,
    conn_id: u64,
    caller: Caller,
    outbox: Arc<Outbox>,
    frame_max: usize,
    heartbeat: u16,
    notify_blocked: bool,
    channels: HashMap<u16, Channel, foldhash::fast::RandomState>,
    next_consumer_tag: u64,
    /// Where no-ack consumers send their deliveries (consumer id, tag) for the connection to
    /// ack them, and where it takes them.
    auto_ack_tx: mpsc::UnboundedSender<(u64, u64)>,
    auto_ack_rx: mpsc::UnboundedReceiver<(u64, u64)>,
    /// Queues this connection declared `exclusive`: deleted when it closes.
    exclusive: Vec<String>,
    /// Queues this connection declared `auto-delete`.
    auto_delete: HashSet<String>,
    /// Its consumers of those: deleting the queue is tried when one is cancelled.
    auto_delete_consumers: HashMap<u64, String>,
    /// The connection has published: it is blocked with the other publishers.
    publisher: bool,
    /// Publishers are blocked and this connection is held back (counted by the engine).
    holding: bool,
    /// Publishes that completed while held back, in order, and their body bytes.
    held: VecDeque<(u16, Incoming)>,
    held_bytes: usize,
    /// Acks read but not yet handed to their queues: (channel, consumer, tag, multiple).
    pending_acks: Vec<(u16, u64, u64, bool)>,
    /// Notified when a channel in confirm mode has acks waiting to be sent.
    confirms_due: Arc<Notify>,
}

/// Reads the handshake from `frames` and logs the client in; `None` (after telling the client
/// why, if it can) when it fails. `certificate_user` is the user a verified client certificate
/// names (TLS), who may log in with EXTERNAL.
pub(super) async fn handshake<R: AsyncRead + Unpin>(
    engine: &Arc<Engine>,
    frames: &mut FramedRead<R, FrameCodec>,
    outbox: &Arc<Outbox>,
    peer: SocketAddr,
    certificate_user: Option<&str>,
) -> Option<Opened> {
    match next_frame(frames).await {
        Some(AMQPFrame::ProtocolHeader(version)) if version == ProtocolVersion::amqp_0_9_1() => {}
        _ => {
            // The version this broker speaks, as the specification asks.
            outbox.push_bytes(PROTOCOL_HEADER);
            return None;
        }
    }
    let mut server_properties = FieldTable::default();
    server_properties.insert("product".into(), AMQPValue::LongString("Hopper".into()));
    server_properties.insert("version".into(), AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()));
    let mut capabilities = FieldTable::default();
    for capability in [
        "publisher_confirms",
        "consumer_cancel_notify",
        "basic.nack",
        "per_consumer_qos",
        "connection.blocked",
        "exchange_exchange_bindings",
        "authentication_failure_close",
        "direct_reply_to",
    ] {
        capabilities.insert(capability.into(), AMQPValue::Boolean(true));
    }
    server_properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    let mechanisms = match certificate_user {
        Some(_) => "PLAIN AMQPLAIN EXTERNAL",
        None => "PLAIN AMQPLAIN",
    };
    let start = connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties,
        mechanisms: mechanisms.into(),
        locales: "en_US".into(),
    };
    send(outbox, 0, AMQPClass::Connection(connection::AMQPMethod::Start(start)));
    let Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)))) =
        next_frame(frames).await
    else {
        return None;
    };
    let refuse = |text: String| {
        close_connection(outbox, code::ACCESS_REFUSED, &text);
        None
    };
    let user = match login(engine, &start_ok, peer, certificate_user).await {
        Ok(user) => user,
        Err(err) => return refuse(err.to_string()),
    };
    let tune = connection::Tune { channel_max: CHANNEL_MAX, frame_max: FRAME_MAX, heartbeat: HEARTBEAT_S };
    send(outbox, 0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune)));
    let Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)))) =
        next_frame(frames).await
    else {
        return None;
    };
    let Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Open(open)))) =
        next_frame(frames).await
    else {
        return None;
    };
    if open.virtual_host.as_str() != "/" {
        close_connection(
            outbox,
            code::NOT_ALLOWED,
            &format!("vhost '{}' does not exist; Hopper serves '/' only", open.virtual_host.as_str()),
        );
        return None;
    }
    send(outbox, 0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})));
    let frame_max = match tune_ok.frame_max {
        0 => FRAME_MAX,
        asked => asked.clamp(4096, FRAME_MAX),
    };
    frames.decoder_mut().set_max(frame_max as usize);
    let notify_blocked = matches!(
        start_ok.client_properties.inner().get("capabilities"),
        Some(AMQPValue::FieldTable(capabilities))
            if matches!(capabilities.inner().get("connection.blocked"), Some(AMQPValue::Boolean(true)))
    );
    Some(Opened { user, frame_max: frame_max as usize, heartbeat: tune_ok.heartbeat, notify_blocked })
}

/// Checks the credentials of `start-ok`: PLAIN (authzid NUL user NUL password), AMQPLAIN (a
/// table with LOGIN and PASSWORD), or EXTERNAL (the user of a verified client certificate).
async fn login(
    engine: &Engine,
    start_ok: &connection::StartOk,
    peer: SocketAddr,
    certificate_user: Option<&str>,
) -> Result<String, BrokerError> {
    let refused = |text: &str| BrokerError::Unauthenticated(text.to_owned());
    let response = start_ok.response.as_bytes();
    let (user, password) = match start_ok.mechanism.as_str() {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let (Some(_), Some(user), Some(password), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(refused("a PLAIN response is authzid NUL user NUL password"));
            };
            (String::from_utf8_lossy(user).into_owned(), String::from_utf8_lossy(password).into_owned())
        }
        "AMQPLAIN" => {
            let table = amqplain_table(response)
                .ok_or_else(|| refused("an AMQPLAIN response is a field table with LOGIN and PASSWORD"))?;
            let field = |name: &str| match table.inner().get(name) {
                Some(AMQPValue::LongString(text)) => {
                    Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
                }
                Some(AMQPValue::ShortString(text)) => Some(text.as_str().to_owned()),
                _ => None,
            };
            match (field("LOGIN"), field("PASSWORD")) {
                (Some(user), Some(password)) => (user, password),
                _ => return Err(refused("an AMQPLAIN response is a field table with LOGIN and PASSWORD")),
            }
        }
        "EXTERNAL" if certificate_user.is_some() => {
            let user = certificate_user.expect("checked above");
            return match engine.users().login_account(user, peer.ip()) {
                Ok(Some(account)) => Ok(account.name.clone()),
                Ok(None) => Err(BrokerError::Unauthenticated(format!(
                    "the client certificate names user '{user}', who does not exist on this broker"
                ))),
                Err(err) => Err(err),
            };
        }
        other => {
            let offered =
                if certificate_user.is_some() { "PLAIN, AMQPLAIN or EXTERNAL" } else { "PLAIN or AMQPLAIN" };
            return Err(BrokerError::Unauthenticated(format!(
                "mechanism {other} is not offered; use {offered}"
            )));
        }
    };
    engine.users().check_password(&user, &password, peer.ip()).await?;
    Ok(user)
}

/// An AMQPLAIN response: a field table's entries, without the table's length.
fn amqplain_table(response: &[u8]) -> Option<FieldTable> {
    let mut framed = u32::try_from(response.len()).ok()?.to_be_bytes().to_vec();
    framed.extend_from_slice(response);
    let (rest, table) = amq_protocol::types::parsing::parse_field_table(framed.as_slice()).ok()?;
    rest.is_empty().then_some(table)
}

impl Connection {
    /// A connection that opened as `opened`.
    pub(super) fn new(
        engine: Arc<Engine>,
        shared: Arc<Shared>,
        conn_id: u64,
        opened: &Opened,
        outbox: Arc<Outbox>,
    ) -> Self {
        let (auto_ack_tx, auto_ack_rx) = mpsc::unbounded_channel();
        Connection {
            engine,
            shared,
            conn_id,
            caller: Caller::connection(conn_id, &opened.user),
            outbox,
            frame_max: opened.frame_max,
            heartbeat: opened.heartbeat,
            notify_blocked: opened.notify_blocked,
            channels: HashMap::default(),
            next_consumer_tag: 0,
            auto_ack_tx,
            auto_ack_rx,
            exclusive: Vec::new(),
            auto_delete: HashSet::new(),
            auto_delete_consumers: HashMap::new(),
            publisher: false,
            holding: false,
            held: VecDeque::new(),
            held_bytes: 0,
            pending_acks: Vec::new(),
            confirms_due: Arc::new(Notify::new()),
        }
    }

    /// Serves frames until the client closes, the connection fails or the broker stops.
    /// `resume` is notified by the writer when it drained the outbox or gave up.
    pub(super) async fn serve<R: AsyncRead + Unpin>(
        &mut self,
        frames: &mut FramedRead<R, FrameCodec>,
        mut shutdown: watch::Receiver<bool>,
        resume: &Notify,
    ) {
        // Heartbeats go out at half the agreed interval; a client silent for two intervals
        // is gone.
        let period = (self.heartbeat > 0).then(|| Duration::from_secs(u64::from(self.heartbeat)));
        let mut heartbeat = tokio::time::interval(period.map_or(Duration::from_secs(3600), |p| p / 2));
        heartbeat.reset();
        let mut last_seen = Instant::now();
        let mut flow_changes = self.engine.flow_changes();
        let outbox = self.outbox.clone();
        let confirms_due = self.confirms_due.clone();
        loop {
            self.apply_flow();
            // Frames are not read while the client does not read what it is sent, nor while
            // too much of what it published is held back.
            let room = outbox.has_room();
            let reading = room && self.held_bytes < MAX_HELD_BYTES;
            let frame = tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    close_connection(&outbox, code::CONNECTION_FORCED, "the broker is shutting down");
                    return;
                }
                _ = resume.notified() => {
                    if outbox.is_closed() {
                        tracing::info!("the client stopped reading or the connection broke; closing");
                        return;
                    }
                    if outbox.take_stalled() {
                        self.engine.redispatch(self.consumer_ids());
                    }
                    continue;
                }
                _ = flow_changes.changed() => continue,
                _ = confirms_due.notified() => {
                    self.flush_confirms();
                    continue;
                }
                Some(first) = self.auto_ack_rx.recv() => {
                    self.auto_ack(first);
                    continue;
                }
                _ = outbox.wait_for_room(), if !room => {
                    // Silence while the client was not read does not count against it.
                    last_seen = Instant::now();
                    continue;
                }
                frame = frames.next(), if reading => frame,
                _ = heartbeat.tick(), if period.is_some() => {
                    let period = period.expect("ticks only with heartbeats");
                    if reading && last_seen.elapsed() > period * 2 {
                        tracing::info!(heartbeat_s = self.heartbeat, "client missed two heartbeats; closing");
                        close_connection(&outbox, code::CONNECTION_FORCED, "missed heartbeats from client");
                        return;
                    }
                    outbox.push_bytes(&encode(&AMQPFrame::Heartbeat));
                    continue;
                }
            };
            last_seen = Instant::now();
            if !self.handle(frame).await {
                return;
            }
            // The frames already read are handled at once, without a trip through the select
            // above; their acks go to the queues together.
            let mut handled = 1;
            while handled < BURST && outbox.has_room() && self.held_bytes < MAX_HELD_BYTES {
                let Some(frame) = frames.next().now_or_never() else { break };
                if !self.handle(frame).await {
                    return;
                }
                handled += 1;
            }
            if !self.flush_acks() {
                return;
            }
        }
    }

    /// Handles what the frame reader gave; false once the connection is done.
    async fn handle(&mut self, frame: Option<Result<Inbound, FrameError>>) -> bool {
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(FrameError::Io(err))) => {
                tracing::info!(error = %err, "connection lost");
                return false;
            }
            Some(Err(err)) => {
                close_connection(&self.outbox, code::FRAME_ERROR, &err.to_string());
                return false;
            }
            None => return false,
        };
        if let Some(id) = self.fast_channel(&frame) {
            return self.fast(id, frame);
        }
        // What comes after acks must find them settled (a cancel, a nack, a close).
        if !self.flush_acks() {
            return false;
        }
        let result = self.frame(frame.into_frame()).await;
        self.failed(result)
    }

    /// Acts on how a frame went: a channel error closes the channel, a connection error the
    /// connection. False once the connection is done.
    fn failed(&mut self, result: Result<bool, (u16, Failure)>) -> bool {
        match result {
            Ok(go_on) => go_on,
            Err((channel, Failure::Channel(code, text))) if channel != 0 => {
                self.close_channel(channel, code, &text);
                true
            }
            Err((_, Failure::Channel(code, text) | Failure::Connection(code, text))) => {
                close_connection(&self.outbox, code, &text);
                false
            }
        }
    }

    /// Hands the acks read so far to their queues: those of one consumer in one call, in
    /// order. False once the connection is done.
    fn flush_acks(&mut self) -> bool {
        if self.pending_acks.is_empty() {
            return true;
        }
        let mut pending = std::mem::take(&mut self.pending_acks);
        let mut result = Ok(true);
        while let Some(&(channel, consumer_id, _, _)) = pending.first() {
            let (mine, rest): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|&(c, consumer, _, _)| (c, consumer) == (channel, consumer_id));
            pending = rest;
            let acks: Vec<(u64, bool)> = mine.iter().map(|&(_, _, tag, multiple)| (tag, multiple)).collect();
            let failure = match self.engine.ack_all(&self.caller, consumer_id, &acks) {
                Ok(each) => each.into_iter().find_map(Result::err),
                Err(err) => Some(err),
            };
            if let Some(err) = failure {
                if self.channels.contains_key(&channel) && result.is_ok() {
                    result = Err((channel, Failure::from(err)));
                }
            }
        }
        self.pending_acks = pending;
        self.failed(result)
    }

    /// Follows the broker's publisher block: a publishing connection is told (if it
    /// understands `connection.blocked`) and its publishes are held back until the block
    /// lifts, while its acks and other methods are still served, so a worker that consumes
    /// and publishes on one connection can drain what blocks it.
    fn apply_flow(&mut self) {
        let block = if self.publisher { self.engine.publishers_blocked() } else { None };
        if block.is_some() != self.holding {
            self.holding = block.is_some();
            self.engine.hold_publisher(self.holding);
            if self.notify_blocked {
                let method = match block {
                    Some(reason) => connection::AMQPMethod::Blocked(connection::Blocked {
                        reason: truncate(&reason).into(),
                    }),
                    None => connection::AMQPMethod::Unblocked(connection::Unblocked {}),
                };
                send(&self.outbox, 0, AMQPClass::Connection(method));
            }
        }
        if !self.holding {
            while let Some((id, incoming)) = self.held.pop_front() {
                if self.channels.get(&id).is_some_and(|channel| !channel.closing) {
                    if let Err(failure) = self.publish(id, incoming) {
                        match failure {
                            Failure::Channel(code, text) => self.close_channel(id, code, &text),
                            Failure::Connection(code, text) => close_connection(&self.outbox, code, &text),
                        }
                    }
                }
            }
            self.held_bytes = 0;
        }
    }

    /// Every consumer of the connection.
    fn consumer_ids(&self) -> Vec<u64> {
        let channels = self.channels.values();
        channels.flat_map(|channel| channel.consumers.values().chain(&channel.stopped).copied()).collect()
    }

    /// Acks the deliveries of no-ack consumers that are waiting, `first` and the rest: one ack
    /// per consumer, of its latest delivery and every one before.
    fn auto_ack(&mut self, first: (u64, u64)) {
        let mut latest: HashMap<u64, u64> = HashMap::new();
        let mut next = Some(first);
        while let Some((consumer_id, tag)) = next {
            let entry = latest.entry(consumer_id).or_insert(tag);
            *entry = (*entry).max(tag);
            next = self.auto_ack_rx.try_recv().ok();
        }
        for (consumer_id, delivery_tag) in latest {
            // A consumer cancelled meanwhile took its deliveries back already.
            let _ = self.engine.ack(&self.caller, DeliveryRef::Tag { consumer_id, delivery_tag }, true, None);
        }
    }

    /// Sends the publish confirms waiting on every channel.
    fn flush_confirms(&self) {
        for confirms in self.channels.values().filter_map(|channel| channel.confirms.as_ref()) {
            confirms.flush();
        }
    }

    /// Cancels every consumer of the connection (it is going away) and deletes its exclusive
    /// queues, and the auto-delete queues it consumed from that nobody else does. Done before
    /// the `connection.close-ok` of a client's close, so they are gone once it is closed; done
    /// again, to no effect, after.
    pub(super) async fn release(&mut self) {
        // Acks the client sent before it went count, and confirms due go out.
        self.flush_acks();
        self.flush_confirms();
        let consumers = self.consumer_ids();
        self.engine.release_connection(&self.caller, consumers.iter().copied());
        for channel in std::mem::take(&mut self.channels).into_values() {
            if let Some((token, _)) = channel.reply {
                self.shared.remove_reply_consumer(&token);
            }
        }
        let mut doomed = Vec::new();
        for consumer_id in consumers {
            self.shared.consumer_gone(consumer_id);
            if let Some(queue) = self.auto_delete_consumers.remove(&consumer_id) {
                doomed.push((queue, true));
            }
        }
        doomed.extend(std::mem::take(&mut self.exclusive).into_iter().map(|queue| (queue, false)));
        for (queue, if_unused) in doomed {
            delete_quietly(&self.engine, &self.caller, &queue, if_unused).await;
        }
        // Only now: until its queues are gone, others are refused them (405), never given them.
        self.shared.release_exclusive(self.conn_id);
        if self.holding {
            self.holding = false;
            self.engine.hold_publisher(false);
        }
    }

    /// Consumer `consumer_id` of this connection was cancelled: its queue goes if it was
    /// declared `auto-delete` and has no consumer left.
    fn cancelled(&mut self, consumer_id: u64) {
        self.shared.consumer_gone(consumer_id);
        if let Some(queue) = self.auto_delete_consumers.remove(&consumer_id) {
            let (engine, caller) = (self.engine.clone(), self.caller.clone());
            tokio::spawn(async move { delete_quietly(&engine, &caller, &queue, true).await });
        }
    }

    /// Handles one frame; false once the connection is closed.
    async fn frame(&mut self, frame: AMQPFrame) -> Result<bool, (u16, Failure)> {
        match frame {
            AMQPFrame::Heartbeat => Ok(true),
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
                self.release().await;
                send(
                    &self.outbox,
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Ok(false)
            }
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => Ok(false),
            AMQPFrame::Method(channel, AMQPClass::Channel(channel::AMQPMethod::Open(_))) => {
                if channel == 0 || channel > CHANNEL_MAX || self.channels.contains_key(&channel) {
                    let text = format!("channel {channel} cannot be opened (already open, or out of range)");
                    return Err((0, Failure::Connection(code::CHANNEL_ERROR, text)));
                }
                self.channels.insert(channel, Channel::default());
                send(
                    &self.outbox,
                    channel,
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                );
                Ok(true)
            }
            AMQPFrame::Method(id, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))) => {
                self.drop_channel(id);
                Ok(true)
            }
            AMQPFrame::Method(id, AMQPClass::Channel(channel::AMQPMethod::Close(_))) => {
                self.drop_channel(id);
                self.held.retain(|(channel, _)| *channel != id);
                send(&self.outbox, id, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})));
                Ok(true)
            }
            frame => {
                let id = frame.channel_id();
                let Some(channel) = self.channels.get(&id) else {
                    let text = format!("channel {id} is not open");
                    return Err((0, Failure::Connection(code::CHANNEL_ERROR, text)));
                };
                if channel.closing {
                    return Ok(true);
                }
                self.on_channel(id, frame).await.map(|()| true).map_err(|failure| (id, failure))
            }
        }
    }

    async fn on_channel(&mut self, id: u16, frame: AMQPFrame) -> Result<(), Failure> {
        match frame {
            AMQPFrame::Method(_, method) => {
                if self.channels[&id].incoming.is_some() {
                    return Err(Failure::Connection(
                        code::UNEXPECTED_FRAME,
                        "a method came before the content of a publish".into(),
                    ));
                }
                self.method(id, method).await
            }
            AMQPFrame::Header(_, header) => self.on_header(id, Box::new(header)),
            AMQPFrame::Body(_, bytes) => self.on_body(id, Bytes::from(bytes)),
            other => Err(Failure::Connection(code::UNEXPECTED_FRAME, format!("unexpected frame {other:?}"))),
        }
    }

    /// The channel of `frame` if it is one of a publish or an ack on an open channel: most of
    /// the traffic, handled by [`Connection::fast`] without the general (async) path.
    fn fast_channel(&self, frame: &Inbound) -> Option<u16> {
        let id = match frame {
            Inbound::Publish(id, _) | Inbound::Header(id, _) | Inbound::Body(id, _) | Inbound::Ack(id, _) => {
                *id
            }
            Inbound::Frame(_) => return None,
        };
        self.channels.get(&id).is_some_and(|channel| !channel.closing).then_some(id)
    }

    /// Handles a frame [`Connection::fast_channel`] chose; false once the connection is done.
    fn fast(&mut self, id: u16, frame: Inbound) -> bool {
        let result = match frame {
            Inbound::Header(_, header) => self.on_header(id, header),
            Inbound::Body(_, bytes) => self.on_body(id, bytes),
            Inbound::Ack(_, ack) => self.on_ack(id, ack),
            Inbound::Publish(_, publish) => self.on_publish(id, publish),
            Inbound::Frame(_) => unreachable!("fast_channel chose it"),
        };
        self.failed(result.map(|()| true).map_err(|failure| (id, failure)))
    }

    /// `basic.publish`: its content comes next.
    fn on_publish(&mut self, id: u16, publish: basic::Publish) -> Result<(), Failure> {
        if publish.immediate {
            return Err(Failure::Connection(code::NOT_IMPLEMENTED, "immediate=true is not supported".into()));
        }
        let channel = self.channel(id);
        if channel.incoming.is_some() {
            return Err(Failure::Connection(
                code::UNEXPECTED_FRAME,
                "a method came before the content of a publish".into(),
            ));
        }
        channel.incoming = Some(Incoming::new(publish));
        Ok(())
    }

    fn on_header(&mut self, id: u16, header: Box<AMQPContentHeader>) -> Result<(), Failure> {
        // The largest message Hopper's own protocol carries; the body is not gathered past it.
        let max = u64::from(self.engine.config().max_frame_size);
        if header.body_size > max {
            self.channel(id).incoming = None;
            let text = format!(
                "message size {} is larger than the broker's maximum of {max} bytes",
                header.body_size
            );
            return Err(Failure::Channel(code::PRECONDITION_FAILED, text));
        }
        let channel = self.channel(id);
        let Some(incoming) = channel.incoming.as_mut().filter(|i| i.header.is_none()) else {
            return Err(Failure::Connection(
                code::UNEXPECTED_FRAME,
                "a content header without a publish".into(),
            ));
        };
        incoming.header = Some(header);
        self.publish_if_complete(id)
    }

    fn on_body(&mut self, id: u16, bytes: Bytes) -> Result<(), Failure> {
        let channel = self.channel(id);
        let Some(incoming) = channel.incoming.as_mut().filter(|i| i.header.is_some()) else {
            return Err(Failure::Connection(
                code::UNEXPECTED_FRAME,
                "a content body without a header".into(),
            ));
        };
        incoming.add_body(bytes);
        self.publish_if_complete(id)
    }

    /// `basic.ack`: handed to the queues with the other acks read with it (`flush_acks`).
    fn on_ack(&mut self, id: u16, ack: basic::Ack) -> Result<(), Failure> {
        if self.channel(id).incoming.is_some() {
            return Err(Failure::Connection(
                code::UNEXPECTED_FRAME,
                "a method came before the content of a publish".into(),
            ));
        }
        for (consumer_id, delivery_tag, multiple) in self.settled(id, ack.delivery_tag, ack.multiple)? {
            self.pending_acks.push((id, consumer_id, delivery_tag, multiple));
        }
        self.end_stopped(id);
        Ok(())
    }

    fn channel(&mut self, id: u16) -> &mut Channel {
        self.channels.get_mut(&id).expect("the channel was checked to be open")
    }

    async fn method(&mut self, id: u16, method: AMQPClass) -> Result<(), Failure> {
        let engine = self.engine.clone();
        let caller = self.caller.clone();
        match method {
            AMQPClass::Basic(basic::AMQPMethod::Publish(publish)) => self.on_publish(id, publish)?,
            AMQPClass::Basic(basic::AMQPMethod::Get(get)) => self.get(id, get).await?,
            AMQPClass::Basic(basic::AMQPMethod::Qos(qos)) => {
                // Per consumer, with `global` too (as for RabbitMQ's quorum queues): the channel's
                // consumers take the new limit, those it starts later too. (RabbitMQ leaves
                // running consumers as they are; kombu, Celery's client, expects them to change.)
                let channel = self.channel(id);
                channel.prefetch = qos.prefetch_count;
                let acking: Vec<u64> =
                    channel.consumers.values().copied().filter(|c| !channel.no_ack.contains(c)).collect();
                for consumer_id in acking {
                    engine.set_prefetch(&caller, consumer_id, u32::from(qos.prefetch_count))?;
                }
                send(&self.outbox, id, AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
            }
            AMQPClass::Basic(basic::AMQPMethod::Consume(consume)) => self.consume(id, consume)?,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
                let tag = cancel.consumer_tag.as_str().to_owned();
                let channel = self.channel(id);
                if channel.reply.as_ref().is_some_and(|(_, reply_tag)| *reply_tag == tag) {
                    let (token, _) = channel.reply.take().expect("checked above");
                    self.shared.remove_reply_consumer(&token);
                } else if let Some(consumer_id) = self.channel(id).consumers.remove(&tag) {
                    engine.stop(&caller, consumer_id)?;
                    let channel = self.channel(id);
                    channel.tags.lock().stop(consumer_id);
                    channel.stopped.insert(consumer_id);
                    // Its auto-delete queue goes once it is done with (`end_stopped`).
                    self.shared.consumer_gone(consumer_id);
                }
                if !cancel.nowait {
                    let ok = basic::CancelOk { consumer_tag: tag.into() };
                    send(&self.outbox, id, AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok)));
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => self.on_ack(id, ack)?,
            AMQPClass::Basic(basic::AMQPMethod::Nack(nack)) => {
                for (consumer_id, delivery_tag, multiple) in
                    self.settled(id, nack.delivery_tag, nack.multiple)?
                {
                    let options = NackOptions { multiple, requeue: nack.requeue, ..NackOptions::default() };
                    engine.nack(&caller, DeliveryRef::Tag { consumer_id, delivery_tag }, options, None)?;
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Reject(reject)) => {
                for (consumer_id, delivery_tag, _) in self.settled(id, reject.delivery_tag, false)? {
                    let options = NackOptions { requeue: reject.requeue, ..NackOptions::default() };
                    engine.nack(&caller, DeliveryRef::Tag { consumer_id, delivery_tag }, options, None)?;
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Recover(recover)) => {
                if !recover.requeue {
                    return Err(requeue_false());
                }
                // Before the redeliveries, as RabbitMQ does: clients drop what they were sent
                // before the recover-ok.
                send(&self.outbox, id, AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})));
                self.recover(id, true)?;
            }
            AMQPClass::Basic(basic::AMQPMethod::RecoverAsync(recover)) => {
                self.recover(id, recover.requeue)?
            }
            AMQPClass::Channel(channel::AMQPMethod::Flow(flow)) => {
                if !flow.active {
                    // RabbitMQ refuses it too: a client pauses deliveries with its prefetch.
                    return Err(Failure::Connection(
                        code::NOT_IMPLEMENTED,
                        "channel.flow active=false is not supported; use basic.qos".into(),
                    ));
                }
                let ok = channel::FlowOk { active: true };
                send(&self.outbox, id, AMQPClass::Channel(channel::AMQPMethod::FlowOk(ok)));
            }
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                let (outbox, due) = (self.outbox.clone(), self.confirms_due.clone());
                let channel = self.channel(id);
                channel.confirms.get_or_insert_with(|| Arc::new(Confirms::new(outbox, id, due)));
                if !select.nowait {
                    send(
                        &self.outbox,
                        id,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(declare)) => {
                let name = match declare.queue.as_str() {
                    "" => format!("amq.gen-{:016x}", rand::random::<u64>()),
                    name => name.to_owned(),
                };
                self.shared.check_exclusive(&name, self.conn_id)?;
                let info = if declare.passive {
                    engine.queue_info(&caller, &name)?
                } else {
                    let declared = arguments::queue_settings(declare.durable, &declare.arguments)?;
                    let (info, created) = engine.declare(&caller, &name, declared.settings, None).await?;
                    if created && declare.exclusive {
                        self.shared.claim_exclusive(&name, self.conn_id);
                        self.exclusive.push(name.clone());
                    }
                    if created && declare.auto_delete {
                        self.auto_delete.insert(name.clone());
                    }
                    if let Some(after) = declared.expires {
                        self.shared.expire(&self.engine, &name, after);
                    }
                    info
                };
                self.shared.used(&name);
                if !declare.nowait {
                    let ok = queue::DeclareOk {
                        queue: name.into(),
                        message_count: u32::try_from(info.snapshot.ready).unwrap_or(u32::MAX),
                        consumer_count: info.snapshot.consumers,
                    };
                    send(&self.outbox, id, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)));
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Bind(bind)) => {
                self.shared.check_exclusive(bind.queue.as_str(), self.conn_id)?;
                let binding =
                    binding(Destination::Queue(bind.queue.to_string()), &bind.routing_key, &bind.arguments);
                engine.bind(&caller, bind.exchange.as_str(), binding).await?;
                self.shared.bound(bind.exchange.as_str());
                if !bind.nowait {
                    send(&self.outbox, id, AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})));
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Unbind(unbind)) => {
                self.shared.check_exclusive(unbind.queue.as_str(), self.conn_id)?;
                let binding = binding(
                    Destination::Queue(unbind.queue.to_string()),
                    &unbind.routing_key,
                    &unbind.arguments,
                );
                engine.unbind(&caller, unbind.exchange.as_str(), binding).await?;
                self.shared.reap_exchanges(&engine).await;
                send(&self.outbox, id, AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})));
            }
            AMQPClass::Queue(queue::AMQPMethod::Purge(purge)) => {
                self.shared.check_exclusive(purge.queue.as_str(), self.conn_id)?;
                let purged = engine.purge(&caller, purge.queue.as_str())?;
                if !purge.nowait {
                    let ok = queue::PurgeOk { message_count: u32::try_from(purged).unwrap_or(u32::MAX) };
                    send(&self.outbox, id, AMQPClass::Queue(queue::AMQPMethod::PurgeOk(ok)));
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Delete(delete)) => {
                self.shared.check_exclusive(delete.queue.as_str(), self.conn_id)?;
                // Deleting a queue that is not there succeeds, as in RabbitMQ.
                let deleted = match engine
                    .delete_queue(&caller, delete.queue.as_str(), delete.if_unused, delete.if_empty)
                    .await
                {
                    Err(BrokerError::NotFound(_)) => 0,
                    deleted => deleted?,
                };
                // Its bindings went with it.
                self.shared.reap_exchanges(&engine).await;
                if !delete.nowait {
                    let ok = queue::DeleteOk { message_count: u32::try_from(deleted).unwrap_or(u32::MAX) };
                    send(&self.outbox, id, AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)));
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(declare)) => {
                arguments::exchange_arguments(&declare.arguments)?;
                let spec = ExchangeSpec {
                    name: declare.exchange.as_str().to_owned(),
                    kind: arguments::exchange_kind(declare.kind.as_str())?,
                    durable: declare.durable,
                    alternate: arguments::text(&declare.arguments, "alternate-exchange"),
                };
                engine.declare_exchange(&caller, spec, declare.passive).await?;
                if !declare.passive {
                    let name = declare.exchange.as_str();
                    self.shared.exchange_declared(name, declare.internal, declare.auto_delete);
                }
                if !declare.nowait {
                    let ok = exchange::DeclareOk {};
                    send(&self.outbox, id, AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(ok)));
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(delete)) => {
                // Deleting an exchange that is not there succeeds, as in RabbitMQ.
                match engine.delete_exchange(&caller, delete.exchange.as_str(), delete.if_unused).await {
                    Ok(()) | Err(BrokerError::NotFound(_)) => {
                        self.shared.exchange_deleted(delete.exchange.as_str())
                    }
                    Err(err) => return Err(err.into()),
                }
                if !delete.nowait {
                    let ok = exchange::DeleteOk {};
                    send(&self.outbox, id, AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(ok)));
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(bind)) => {
                let binding = binding(
                    Destination::Exchange(bind.destination.to_string()),
                    &bind.routing_key,
                    &bind.arguments,
                );
                engine.bind(&caller, bind.source.as_str(), binding).await?;
                self.shared.bound(bind.source.as_str());
                if !bind.nowait {
                    send(
                        &self.outbox,
                        id,
                        AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                    );
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Unbind(unbind)) => {
                let binding = binding(
                    Destination::Exchange(unbind.destination.to_string()),
                    &unbind.routing_key,
                    &unbind.arguments,
                );
                engine.unbind(&caller, unbind.source.as_str(), binding).await?;
                self.shared.reap_exchanges(&engine).await;
                if !unbind.nowait {
                    let ok = exchange::UnbindOk {};
                    send(&self.outbox, id, AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(ok)));
                }
            }
            other => {
                let described = format!("{other:?}");
                let name = described.split(['{', ' ']).next().unwrap_or_default();
                let text = format!(
                    "{name} (class {}, method {}) is not supported",
                    other.get_amqp_class_id(),
                    other.get_amqp_method_id()
                );
                return Err(Failure::Connection(code::NOT_IMPLEMENTED, text));
            }
        }
        self.end_stopped(id);
        Ok(())
    }

    /// Ends the consumers the client cancelled whose deliveries are all settled now.
    fn end_stopped(&mut self, id: u16) {
        if self.channels.get(&id).is_none_or(|channel| channel.stopped.is_empty()) {
            return;
        }
        // Their acks reach the queue first, or the cancel would take those deliveries back.
        self.flush_acks();
        let Some(channel) = self.channels.get_mut(&id) else { return };
        let done: Vec<u64> = {
            let mut tags = channel.tags.lock();
            let done: Vec<u64> =
                channel.stopped.iter().copied().filter(|consumer| !tags.holds(*consumer)).collect();
            for consumer_id in &done {
                tags.ended(*consumer_id);
                channel.stopped.remove(consumer_id);
            }
            done
        };
        for consumer_id in done {
            let _ = self.engine.cancel(&self.caller, consumer_id, "cancelled by the client");
            self.cancelled(consumer_id);
        }
    }

    /// The deliveries a settle of `tag` covers, by consumer.
    fn settled(&mut self, id: u16, tag: u64, multiple: bool) -> Result<Vec<(u64, u64, bool)>, Failure> {
        self.channel(id)
            .tags
            .lock()
            .settle(tag, multiple)
            .map_err(|tag| Failure::Channel(code::PRECONDITION_FAILED, format!("unknown delivery tag {tag}")))
    }

    /// `basic.recover`: every delivery of the channel not settled yet goes back to its queue,
    /// to be delivered again flagged redelivered.
    fn recover(&mut self, id: u16, requeue: bool) -> Result<(), Failure> {
        if !requeue {
            return Err(requeue_false());
        }
        for (consumer_id, delivery_tag, multiple) in self.settled(id, 0, true)? {
            let options = NackOptions { multiple, requeue: true, ..NackOptions::default() };
            // A delivery its consumer's cancel took back already is back already.
            let _ =
                self.engine.nack(&self.caller, DeliveryRef::Tag { consumer_id, delivery_tag }, options, None);
        }
        Ok(())
    }

    /// `basic.get`: one message, if the queue has one ready.
    async fn get(&mut self, id: u16, get: basic::Get) -> Result<(), Failure> {
        self.shared.check_exclusive(get.queue.as_str(), self.conn_id)?;
        self.shared.used(get.queue.as_str());
        let pull = Pull { count: 1, visibility_ms: 0, wait: Duration::ZERO, budget: usize::MAX };
        let deliveries = self.engine.get(&self.caller, get.queue.as_str(), pull, None).await?;
        let Some(delivery) = deliveries.into_iter().next() else {
            send(&self.outbox, id, AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})));
            return Ok(());
        };
        let (consumer_id, delivery_tag) = (delivery.consumer_id, delivery.delivery_tag);
        let tags = self.channel(id).tags.clone();
        let tag = match get.no_ack {
            true => tags.lock().issue_settled(),
            false => tags.lock().issue(consumer_id, delivery_tag),
        };
        let remaining =
            self.engine.queue_info(&self.caller, get.queue.as_str()).map_or(0, |info| info.snapshot.ready);
        let payload = &delivery.message.payload;
        let ok = basic::GetOk {
            delivery_tag: tag,
            redelivered: delivery.message.redelivered,
            exchange: payload.exchange.as_ref().into(),
            routing_key: payload.routing_key.as_str().into(),
            message_count: u32::try_from(remaining).unwrap_or(u32::MAX),
        };
        let frames =
            content_frames(id, AMQPClass::Basic(basic::AMQPMethod::GetOk(ok)), payload, self.frame_max);
        self.outbox.push_bytes(&frames);
        if get.no_ack {
            self.engine.ack(&self.caller, DeliveryRef::Tag { consumer_id, delivery_tag }, false, None)?;
        }
        Ok(())
    }

    fn consume(&mut self, id: u16, consume: basic::Consume) -> Result<(), Failure> {
        let tag = match consume.consumer_tag.as_str() {
            "" => {
                self.next_consumer_tag += 1;
                format!("amq.ctag-{}", self.next_consumer_tag)
            }
            tag => tag.to_owned(),
        };
        let (outbox, frame_max) = (self.outbox.clone(), self.frame_max);
        let auto_ack = consume.no_ack.then(|| self.auto_ack_tx.clone());
        let channel = self.channel(id);
        let tag_taken = channel.consumers.contains_key(&tag)
            || channel.reply.as_ref().is_some_and(|(_, reply_tag)| *reply_tag == tag);
        if tag_taken {
            return Err(Failure::Connection(
                code::NOT_ALLOWED,
                format!("consumer tag '{tag}' is in use on this channel"),
            ));
        }
        if let Some((name, _)) = consume.arguments.inner().iter().next() {
            return Err(Failure::Channel(
                code::PRECONDITION_FAILED,
                format!("consumer argument {} is not supported by Hopper", name.as_str()),
            ));
        }
        let queue = consume.queue.as_str();
        if queue == REPLY_TO {
            return self.consume_replies(id, tag, &consume);
        }
        self.shared.check_exclusive(queue, self.conn_id)?;
        let busy = consume.exclusive
            && self.engine.queue_info(&self.caller, queue).is_ok_and(|info| info.snapshot.consumers > 0);
        if busy || self.shared.held_exclusively(queue) {
            return Err(Failure::Channel(
                code::ACCESS_REFUSED,
                format!("queue '{queue}' in vhost '/' in exclusive use"),
            ));
        }
        self.shared.used(queue);
        let channel = self.channel(id);
        // A no-ack consumer takes as much as the connection's writes allow; its window only
        // bounds the deliveries waiting for the connection to ack them.
        let prefetch = if consume.no_ack { NO_ACK_WINDOW } else { u32::from(channel.prefetch) };
        let sink = AmqpSink::new(outbox.clone(), id, &tag, channel.tags.clone(), frame_max, auto_ack);
        let options = ConsumeOptions { prefetch, tag: tag.clone(), ..ConsumeOptions::default() };
        let nowait = consume.nowait;
        let announce_tag = tag.clone();
        let consumer_id = self.engine.consume(
            &self.caller,
            consume.queue.as_str(),
            options,
            Arc::new(sink),
            move |_| {
                // Before the first delivery, which it must precede on the wire.
                if !nowait {
                    let ok = basic::ConsumeOk { consumer_tag: announce_tag.into() };
                    send(&outbox, id, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)));
                }
            },
        )?;
        if consume.exclusive {
            // Checked again now that the consumer is on: another may have come meanwhile
            // (this one then hears of its refusal after its consume-ok).
            let consumers =
                self.engine.queue_info(&self.caller, queue).map_or(0, |info| info.snapshot.consumers);
            if consumers > 1 || self.shared.held_exclusively(queue) {
                let _ = self.engine.cancel(&self.caller, consumer_id, "exclusive consume refused");
                return Err(Failure::Channel(
                    code::ACCESS_REFUSED,
                    format!("queue '{queue}' in vhost '/' in exclusive use"),
                ));
            }
            self.shared.hold_exclusively(queue, consumer_id);
        }
        if self.auto_delete.contains(queue) {
            self.auto_delete_consumers.insert(consumer_id, queue.to_owned());
        }
        let channel = self.channel(id);
        channel.consumers.insert(tag, consumer_id);
        if consume.no_ack {
            channel.no_ack.insert(consumer_id);
        }
        Ok(())
    }

    /// A consumer of direct replies (`amq.rabbitmq.reply-to`): publishes of this channel
    /// with that reply-to get this consumer's address, and replies to it come straight here.
    fn consume_replies(&mut self, id: u16, tag: String, consume: &basic::Consume) -> Result<(), Failure> {
        if !consume.no_ack {
            return Err(Failure::Channel(
                code::PRECONDITION_FAILED,
                "reply consumer cannot acknowledge: consume from amq.rabbitmq.reply-to with no-ack".into(),
            ));
        }
        let channel = self.channels.get_mut(&id).expect("the channel was checked to be open");
        if channel.reply.is_some() {
            return Err(Failure::Channel(
                code::PRECONDITION_FAILED,
                "this channel has a reply consumer already".into(),
            ));
        }
        let consumer = ReplyConsumer {
            outbox: self.outbox.clone(),
            channel: id,
            consumer_tag: tag.clone(),
            tags: channel.tags.clone(),
            frame_max: self.frame_max,
        };
        let token = self.shared.add_reply_consumer(consumer);
        channel.reply = Some((token, tag.clone()));
        if !consume.nowait {
            let ok = basic::ConsumeOk { consumer_tag: tag.into() };
            send(&self.outbox, id, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)));
        }
        Ok(())
    }

    /// Publishes the channel's incoming message once all of its content has arrived (or holds
    /// it back while publishers are blocked).
    fn publish_if_complete(&mut self, id: u16) -> Result<(), Failure> {
        let channel = self.channel(id);
        let Some(incoming) = channel.incoming.as_ref() else { return Ok(()) };
        let Some(header) = incoming.header.as_ref() else { return Ok(()) };
        let size = header.body_size;
        if (incoming.body_len() as u64) < size {
            return Ok(());
        }
        let incoming = channel.incoming.take().expect("checked above");
        if incoming.body_len() as u64 != size {
            let text = format!("{} body bytes came for a content of {size}", incoming.body_len());
            return Err(Failure::Connection(code::FRAME_ERROR, text));
        }
        if !self.publisher {
            self.publisher = true;
            self.apply_flow();
        }
        if self.holding || !self.held.is_empty() {
            self.held_bytes += incoming.body_len();
            self.held.push_back((id, incoming));
            return Ok(());
        }
        self.publish(id, incoming)
    }

    /// Publishes a message whose content has all arrived.
    fn publish(&mut self, id: u16, incoming: Incoming) -> Result<(), Failure> {
        let (method, header, body) = incoming.into_parts();
        let mut header = header.expect("a complete publish has its header");
        let channel = self.channels.get_mut(&id).expect("publishes come on open channels");
        // Direct reply-to: the reply address names this channel's reply consumer.
        if header.properties.reply_to().as_ref().is_some_and(|to| to.as_str() == REPLY_TO) {
            let Some((token, _)) = channel.reply.as_ref() else {
                return Err(Failure::Channel(
                    code::PRECONDITION_FAILED,
                    "fast reply consumer does not exist: consume from amq.rabbitmq.reply-to with no-ack \
                     on this channel first"
                        .into(),
                ));
            };
            header.properties = header.properties.with_reply_to(format!("{REPLY_TO}.{token}").into());
        }
        self.shared.check_publish(method.exchange.as_str())?;
        let channel = self.channels.get_mut(&id).expect("publishes come on open channels");
        let confirms = channel.confirms.clone();
        let number = confirms.as_ref().map(|confirms| confirms.next_number());
        if method.exchange.as_str().is_empty() && method.routing_key.as_str().starts_with(REPLY_TO) {
            return self.reply(id, &method, header.properties, &body, number);
        }
        let properties = self.channel(id).properties_of(&header.properties);
        // Kept for a `basic.return`, should the message be unroutable and mandatory.
        let returned = method.mandatory.then(|| (body.clone(), header.properties.clone()));
        let message = NewMessage { body, properties, ..NewMessage::default() };
        let confirm = match (confirms, number) {
            (Some(to), Some(request_id)) => Confirm::Reply { to, request_id },
            _ => Confirm::Callback(Box::new(|_| {})),
        };
        let route = Route {
            exchange: method.exchange.as_str(),
            routing_key: method.routing_key.as_str(),
            mandatory: method.mandatory,
        };
        match self.engine.publish_routed(&self.caller, route, message, confirm) {
            Ok(_) => Ok(()),
            // Unroutable and mandatory: back to the publisher, then confirmed (as RabbitMQ does).
            Err(BrokerError::NoRoute(_)) if returned.is_some() => {
                let (body, amqp_properties) = returned.expect("checked above");
                self.return_unroutable(id, &method, amqp_properties, &body, number);
                Ok(())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Sends an unroutable mandatory publish back (`basic.return` 312), then its confirm.
    fn return_unroutable(
        &self,
        id: u16,
        method: &basic::Publish,
        amqp_properties: basic::AMQPProperties,
        body: &[u8],
        number: Option<u64>,
    ) {
        let back = basic::Return {
            reply_code: code::NO_ROUTE,
            reply_text: "NO_ROUTE".into(),
            exchange: method.exchange.clone(),
            routing_key: method.routing_key.clone(),
        };
        let frames = content(
            id,
            AMQPClass::Basic(basic::AMQPMethod::Return(back)),
            amqp_properties,
            body,
            self.frame_max,
        );
        self.outbox.push_bytes(&frames);
        self.confirm(id, number);
    }

    /// Confirms publish `number` of channel `id`, if it is in confirm mode.
    fn confirm(&self, id: u16, number: Option<u64>) {
        let confirms = self.channels.get(&id).and_then(|channel| channel.confirms.as_ref());
        if let (Some(confirms), Some(number)) = (confirms, number) {
            confirms.answer(number, true);
        }
    }

    /// A publish to `amq.rabbitmq.reply-to.<token>`: straight to the reply consumer that
    /// token names, on whatever connection it is; dropped (or returned, if mandatory) when it
    /// is gone, as RabbitMQ does.
    fn reply(
        &self,
        id: u16,
        method: &basic::Publish,
        amqp_properties: basic::AMQPProperties,
        body: &[u8],
        number: Option<u64>,
    ) -> Result<(), Failure> {
        let delivered = self.shared.reply_consumer(method.routing_key.as_str()).is_some_and(|to| {
            let mut tags = to.tags.lock();
            // A reply consumer whose channel is closing is gone.
            if tags.is_closed() {
                return false;
            }
            let deliver = basic::Deliver {
                consumer_tag: to.consumer_tag.as_str().into(),
                delivery_tag: tags.issue_settled(),
                redelivered: false,
                exchange: "".into(),
                routing_key: method.routing_key.clone(),
            };
            let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver));
            to.outbox.push_bytes(&content(to.channel, method, amqp_properties.clone(), body, to.frame_max));
            true
        });
        if !delivered && method.mandatory {
            self.return_unroutable(id, method, amqp_properties, body, number);
            return Ok(());
        }
        self.confirm(id, number);
        Ok(())
    }

    /// Closes channel `id` for `text`: its consumers are cancelled, and frames are ignored
    /// until the client's `channel.close-ok`.
    fn close_channel(&mut self, id: u16, code: u16, text: &str) {
        tracing::debug!(channel = id, code, text, "channel closed by the broker");
        if let Some(channel) = self.channels.remove(&id) {
            self.end_channel(channel);
            self.channels.insert(id, Channel { closing: true, ..Channel::default() });
        }
        let close =
            channel::Close { reply_code: code, reply_text: truncate(text).into(), class_id: 0, method_id: 0 };
        send(&self.outbox, id, AMQPClass::Channel(channel::AMQPMethod::Close(close)));
    }

    /// Forgets channel `id`, ending it.
    fn drop_channel(&mut self, id: u16) {
        if let Some(channel) = self.channels.remove(&id) {
            self.end_channel(channel);
        }
    }

    /// Ends `channel`: its consumers are cancelled (their unacked deliveries go back), the
    /// confirms due go out, and nothing is sent on it after.
    fn end_channel(&mut self, channel: Channel) {
        if let Some((token, _)) = channel.reply {
            self.shared.remove_reply_consumer(&token);
        }
        for consumer_id in channel.consumers.into_values().chain(channel.stopped) {
            let _ = self.engine.cancel(&self.caller, consumer_id, "channel closed");
            self.cancelled(consumer_id);
        }
        if let Some(confirms) = &channel.confirms {
            confirms.close();
        }
        channel.tags.lock().close();
    }
}

/// Deletes `queue` (only if it has no consumer, with `if_unused`), exclusive or auto-delete:
/// one gone already, or in use, is left as it is.
async fn delete_quietly(engine: &Engine, caller: &Caller, queue: &str, if_unused: bool) {
    match engine.delete_queue(caller, queue, if_unused, false).await {
        Ok(_) | Err(BrokerError::NotFound(_) | BrokerError::PreconditionFailed(_)) => {}
        Err(error) => tracing::warn!(queue, %error, "an exclusive or auto-delete queue was not deleted"),
    }
}

/// A binding to `destination` by `key`, with header arguments as text.
fn binding(
    destination: Destination,
    key: &amq_protocol::types::ShortString,
    arguments: &FieldTable,
) -> Binding {
    Binding { destination, key: key.as_str().to_owned(), arguments: arguments::table_text(arguments) }
}

/// `basic.recover` with `requeue=false`, refused as RabbitMQ refuses it: redelivering to the
/// same consumer is not offered.
fn requeue_false() -> Failure {
    Failure::Connection(code::NOT_IMPLEMENTED, "basic.recover with requeue=false is not supported".into())
}

/// The next frame of the handshake, if it comes in time and reads.
async fn next_frame<R: AsyncRead + Unpin>(frames: &mut FramedRead<R, FrameCodec>) -> Option<AMQPFrame> {
    tokio::time::timeout(HANDSHAKE_STEP, frames.next())
        .await
        .ok()
        .flatten()
        .and_then(Result::ok)
        .map(Inbound::into_frame)
}

/// Queues one method frame.
fn send(outbox: &Outbox, channel: u16, method: AMQPClass) {
    push_frame(outbox, &AMQPFrame::Method(channel, method));
}

/// Queues `connection.close` for `text`.
fn close_connection(outbox: &Outbox, code: u16, text: &str) {
    let close =
        connection::Close { reply_code: code, reply_text: truncate(text).into(), class_id: 0, method_id: 0 };
    send(outbox, 0, AMQPClass::Connection(connection::AMQPMethod::Close(close)));
}

/// `text`, cut to fit a short string (255 bytes) at a character boundary.
fn truncate(text: &str) -> String {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Connection ids of AMQP connections: apart from the binary listener's, which count from 1.
pub(super) static NEXT_ID: AtomicU64 = AtomicU64::new(1 << 48);
