//! One AMQP 0-9-1 connection: the handshake (protocol header, start, tune, open), then the
//! methods of its channels, each turned into one engine call and its answer back into frames.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, ProtocolVersion};
use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::FramedRead;

use super::codec::{encode, FrameCodec, FrameError, PROTOCOL_HEADER};
use super::sink::{content, content_frames, AmqpSink, Tags};
use super::{arguments, properties};
use crate::engine::{Caller, ConsumeOptions, DeliveryRef, Engine, NackOptions, NewMessage, Pull, Route};
use crate::error::BrokerError;
use crate::outbox::Outbox;
use crate::queue::{Confirm, Outcome};
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
    header: Option<AMQPContentHeader>,
    body: Vec<u8>,
}

/// One open channel.
#[derive(Default)]
struct Channel {
    tags: Arc<Mutex<Tags>>,
    /// `basic.qos`: the prefetch of the channel's next consumers (0 = none).
    prefetch: u16,
    /// Its consumers: consumer tag → consumer id.
    consumers: HashMap<String, u64>,
    incoming: Option<Incoming>,
    /// In confirm mode: the number of the last publish.
    confirms: Option<Arc<AtomicU64>>,
    /// Closed by the broker: frames are ignored until the client's `channel.close-ok`.
    closing: bool,
}

/// A logged-in connection.
pub(super) struct Connection {
    engine: Arc<Engine>,
    caller: Caller,
    outbox: Arc<Outbox>,
    frame_max: usize,
    channels: HashMap<u16, Channel>,
    next_consumer_tag: u64,
    /// Where no-ack consumers send their deliveries (consumer id, tag) for the connection to
    /// ack them, and where it takes them.
    auto_ack_tx: mpsc::UnboundedSender<(u64, u64)>,
    auto_ack_rx: mpsc::UnboundedReceiver<(u64, u64)>,
    /// Queues this connection declared `exclusive`: deleted when it closes.
    exclusive: Vec<String>,
    /// Queues this connection declared `auto-delete`.
    auto_delete: std::collections::HashSet<String>,
    /// Its consumers of those: deleting the queue is tried when one is cancelled.
    auto_delete_consumers: HashMap<u64, String>,
}

/// Reads the handshake from `frames` and logs the client in; `None` (after telling the client
/// why, if it can) when it fails.
pub(super) async fn handshake(
    engine: &Arc<Engine>,
    frames: &mut FramedRead<OwnedReadHalf, FrameCodec>,
    outbox: &Arc<Outbox>,
    peer: SocketAddr,
) -> Option<(String, u16)> {
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
    for capability in ["publisher_confirms", "consumer_cancel_notify", "basic.nack", "per_consumer_qos"] {
        capabilities.insert(capability.into(), AMQPValue::Boolean(true));
    }
    server_properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    let start = connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties,
        mechanisms: "PLAIN".into(),
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
    if start_ok.mechanism.as_str() != "PLAIN" {
        return refuse(format!("mechanism {} is not offered; use PLAIN", start_ok.mechanism.as_str()));
    }
    // PLAIN: authzid NUL user NUL password.
    let response = start_ok.response.as_bytes();
    let mut parts = response.split(|b| *b == 0);
    let (Some(_), Some(user), Some(password)) = (parts.next(), parts.next(), parts.next()) else {
        return refuse("a PLAIN response is authzid NUL user NUL password".into());
    };
    let (user, password) = (String::from_utf8_lossy(user).into_owned(), String::from_utf8_lossy(password));
    if let Err(err) = engine.users().check_password(&user, &password, peer.ip()).await {
        return refuse(err.to_string());
    }
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
    Some((user, frame_max as u16))
}

impl Connection {
    /// A connection of `user`, whose frames are at most `frame_max` bytes.
    pub(super) fn new(
        engine: Arc<Engine>,
        conn_id: u64,
        user: &str,
        outbox: Arc<Outbox>,
        frame_max: usize,
    ) -> Self {
        let (auto_ack_tx, auto_ack_rx) = mpsc::unbounded_channel();
        Connection {
            engine,
            caller: Caller::connection(conn_id, user),
            outbox,
            frame_max,
            channels: HashMap::new(),
            next_consumer_tag: 0,
            auto_ack_tx,
            auto_ack_rx,
            exclusive: Vec::new(),
            auto_delete: Default::default(),
            auto_delete_consumers: HashMap::new(),
        }
    }

    /// Serves frames until the client closes, the connection fails or the broker stops.
    pub(super) async fn serve(
        &mut self,
        frames: &mut FramedRead<OwnedReadHalf, FrameCodec>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut heartbeat = tokio::time::interval(Duration::from_secs(u64::from(HEARTBEAT_S) / 2));
        loop {
            let frame = tokio::select! {
                frame = frames.next() => frame,
                _ = heartbeat.tick() => {
                    self.outbox.push_bytes(&encode(&AMQPFrame::Heartbeat));
                    continue;
                }
                Some(first) = self.auto_ack_rx.recv() => {
                    self.auto_ack(first);
                    continue;
                }
                _ = shutdown.changed() => {
                    close_connection(&self.outbox, code::CONNECTION_FORCED, "the broker is shutting down");
                    return;
                }
            };
            let frame = match frame {
                Some(Ok(frame)) => frame,
                Some(Err(FrameError::Io(err))) => {
                    tracing::info!(error = %err, "connection lost");
                    return;
                }
                Some(Err(err)) => {
                    close_connection(&self.outbox, code::FRAME_ERROR, &err.to_string());
                    return;
                }
                None => return,
            };
            match self.frame(frame).await {
                Ok(true) => {}
                Ok(false) => return,
                Err((channel, Failure::Channel(code, text))) if channel != 0 => {
                    self.close_channel(channel, code, &text)
                }
                Err((_, Failure::Channel(code, text) | Failure::Connection(code, text))) => {
                    close_connection(&self.outbox, code, &text);
                    return;
                }
            }
        }
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

    /// Cancels every consumer of the connection (it is going away).
    pub(super) fn release(&mut self) {
        let consumers: Vec<u64> =
            self.channels.values().flat_map(|channel| channel.consumers.values().copied()).collect();
        self.engine.release_connection(&self.caller, consumers.iter().copied());
        self.channels.clear();
        for consumer_id in consumers {
            self.cancelled(consumer_id);
        }
        for queue in std::mem::take(&mut self.exclusive) {
            self.delete_later(queue, false);
        }
    }

    /// Consumer `consumer_id` of this connection was cancelled: its queue goes if it was
    /// declared `auto-delete` and has no consumer left.
    fn cancelled(&mut self, consumer_id: u64) {
        if let Some(queue) = self.auto_delete_consumers.remove(&consumer_id) {
            self.delete_later(queue, true);
        }
    }

    /// Deletes `queue` (only if it has no consumer, with `if_unused`) in the background.
    fn delete_later(&self, queue: String, if_unused: bool) {
        let (engine, caller) = (self.engine.clone(), self.caller.clone());
        tokio::spawn(async move {
            match engine.delete_queue(&caller, &queue, if_unused, false).await {
                Ok(_) | Err(BrokerError::NotFound(_) | BrokerError::PreconditionFailed(_)) => {}
                Err(error) => {
                    tracing::warn!(queue, %error, "an exclusive or auto-delete queue was not deleted")
                }
            }
        });
    }

    /// Handles one frame; false once the connection is closed.
    async fn frame(&mut self, frame: AMQPFrame) -> Result<bool, (u16, Failure)> {
        match frame {
            AMQPFrame::Heartbeat => Ok(true),
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
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
            AMQPFrame::Header(_, header) => {
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
            AMQPFrame::Body(_, bytes) => {
                let channel = self.channel(id);
                let Some(incoming) = channel.incoming.as_mut().filter(|i| i.header.is_some()) else {
                    return Err(Failure::Connection(
                        code::UNEXPECTED_FRAME,
                        "a content body without a header".into(),
                    ));
                };
                incoming.body.extend_from_slice(&bytes);
                self.publish_if_complete(id)
            }
            other => Err(Failure::Connection(code::UNEXPECTED_FRAME, format!("unexpected frame {other:?}"))),
        }
    }

    fn channel(&mut self, id: u16) -> &mut Channel {
        self.channels.get_mut(&id).expect("the channel was checked to be open")
    }

    async fn method(&mut self, id: u16, method: AMQPClass) -> Result<(), Failure> {
        let engine = self.engine.clone();
        let caller = self.caller.clone();
        match method {
            AMQPClass::Basic(basic::AMQPMethod::Publish(publish)) => {
                if publish.immediate {
                    return Err(Failure::Connection(
                        code::NOT_IMPLEMENTED,
                        "immediate=true is not supported".into(),
                    ));
                }
                self.channel(id).incoming =
                    Some(Incoming { method: publish, header: None, body: Vec::new() });
            }
            AMQPClass::Basic(basic::AMQPMethod::Get(get)) => self.get(id, get).await?,
            AMQPClass::Basic(basic::AMQPMethod::Qos(qos)) => {
                self.channel(id).prefetch = qos.prefetch_count;
                send(&self.outbox, id, AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
            }
            AMQPClass::Basic(basic::AMQPMethod::Consume(consume)) => self.consume(id, consume)?,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
                let tag = cancel.consumer_tag.as_str().to_owned();
                if let Some(consumer_id) = self.channel(id).consumers.remove(&tag) {
                    engine.cancel(&caller, consumer_id, "cancelled by the client")?;
                    self.channel(id).tags.lock().forget(consumer_id);
                    self.cancelled(consumer_id);
                }
                if !cancel.nowait {
                    let ok = basic::CancelOk { consumer_tag: tag.into() };
                    send(&self.outbox, id, AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok)));
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => {
                for (consumer_id, delivery_tag, multiple) in
                    self.settled(id, ack.delivery_tag, ack.multiple)?
                {
                    engine.ack(&caller, DeliveryRef::Tag { consumer_id, delivery_tag }, multiple, None)?;
                }
            }
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
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                let channel = self.channel(id);
                channel.confirms.get_or_insert_with(Default::default);
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
                let info = if declare.passive {
                    engine.queue_info(&caller, &name)?
                } else {
                    let settings = arguments::queue_settings(declare.durable, &declare.arguments)?;
                    let (info, created) = engine.declare(&caller, &name, settings, None).await?;
                    if created && declare.exclusive {
                        self.exclusive.push(name.clone());
                    }
                    if created && declare.auto_delete {
                        self.auto_delete.insert(name.clone());
                    }
                    info
                };
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
                let binding = queue_binding(&bind.queue, &bind.routing_key, &bind.arguments);
                engine.bind(&caller, bind.exchange.as_str(), binding).await?;
                if !bind.nowait {
                    send(&self.outbox, id, AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})));
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Unbind(unbind)) => {
                let binding = queue_binding(&unbind.queue, &unbind.routing_key, &unbind.arguments);
                engine.unbind(&caller, unbind.exchange.as_str(), binding).await?;
                send(&self.outbox, id, AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})));
            }
            AMQPClass::Queue(queue::AMQPMethod::Purge(purge)) => {
                let purged = engine.purge(&caller, purge.queue.as_str())?;
                if !purge.nowait {
                    let ok = queue::PurgeOk { message_count: u32::try_from(purged).unwrap_or(u32::MAX) };
                    send(&self.outbox, id, AMQPClass::Queue(queue::AMQPMethod::PurgeOk(ok)));
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Delete(delete)) => {
                let deleted = engine
                    .delete_queue(&caller, delete.queue.as_str(), delete.if_unused, delete.if_empty)
                    .await?;
                if !delete.nowait {
                    let ok = queue::DeleteOk { message_count: u32::try_from(deleted).unwrap_or(u32::MAX) };
                    send(&self.outbox, id, AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)));
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(declare)) => {
                let spec = ExchangeSpec {
                    name: declare.exchange.as_str().to_owned(),
                    kind: arguments::exchange_kind(declare.kind.as_str())?,
                    durable: declare.durable,
                    alternate: arguments::text(&declare.arguments, "alternate-exchange"),
                };
                engine.declare_exchange(&caller, spec, declare.passive).await?;
                if !declare.nowait {
                    let ok = exchange::DeclareOk {};
                    send(&self.outbox, id, AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(ok)));
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(delete)) => {
                engine.delete_exchange(&caller, delete.exchange.as_str(), delete.if_unused).await?;
                if !delete.nowait {
                    let ok = exchange::DeleteOk {};
                    send(&self.outbox, id, AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(ok)));
                }
            }
            other => {
                let text = format!("{} is not supported yet", other.get_amqp_class_id());
                return Err(Failure::Channel(code::NOT_IMPLEMENTED, text));
            }
        }
        Ok(())
    }

    /// The deliveries a settle of `tag` covers, by consumer.
    fn settled(&mut self, id: u16, tag: u64, multiple: bool) -> Result<Vec<(u64, u64, bool)>, Failure> {
        self.channel(id)
            .tags
            .lock()
            .settle(tag, multiple)
            .map_err(|tag| Failure::Channel(code::PRECONDITION_FAILED, format!("unknown delivery tag {tag}")))
    }

    /// `basic.get`: one message, if the queue has one ready.
    async fn get(&mut self, id: u16, get: basic::Get) -> Result<(), Failure> {
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
        if channel.consumers.contains_key(&tag) {
            return Err(Failure::Connection(
                code::NOT_ALLOWED,
                format!("consumer tag '{tag}' is in use on this channel"),
            ));
        }
        // A no-ack consumer takes as much as the connection's writes allow; its window only
        // bounds the deliveries waiting for the connection to ack them.
        let prefetch = if consume.no_ack { NO_ACK_WINDOW } else { u32::from(channel.prefetch) };
        let sink = AmqpSink {
            outbox: outbox.clone(),
            channel: id,
            consumer_tag: tag.clone(),
            tags: channel.tags.clone(),
            frame_max,
            auto_ack,
        };
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
        if self.auto_delete.contains(consume.queue.as_str()) {
            self.auto_delete_consumers.insert(consumer_id, consume.queue.as_str().to_owned());
        }
        self.channel(id).consumers.insert(tag, consumer_id);
        Ok(())
    }

    /// Publishes the channel's incoming message once all of its content has arrived.
    fn publish_if_complete(&mut self, id: u16) -> Result<(), Failure> {
        let channel = self.channel(id);
        let Some(incoming) = channel.incoming.as_ref() else { return Ok(()) };
        let Some(header) = incoming.header.as_ref() else { return Ok(()) };
        if (incoming.body.len() as u64) < header.body_size {
            return Ok(());
        }
        let Incoming { method, header, body } = channel.incoming.take().expect("checked above");
        let header = header.expect("checked above");
        if body.len() as u64 != header.body_size {
            let text = format!("{} body bytes came for a content of {}", body.len(), header.body_size);
            return Err(Failure::Connection(code::FRAME_ERROR, text));
        }
        let (headers, content_type) = properties::from_amqp(&header.properties);
        let body = bytes::Bytes::from(body);
        // Kept for a `basic.return`, should the message be unroutable and mandatory.
        let returned = method.mandatory.then(|| (body.clone(), header.properties.clone()));
        let message = NewMessage { body, headers, content_type, ..NewMessage::default() };
        let number = channel.confirms.as_ref().map(|published| published.fetch_add(1, Ordering::Relaxed) + 1);
        let confirm = match number {
            Some(number) => {
                let outbox = self.outbox.clone();
                Confirm::Callback(Box::new(move |result: Result<Outcome, crate::error::BrokerError>| {
                    let method = match result {
                        Ok(_) | Err(BrokerError::NoRoute(_)) => {
                            basic::AMQPMethod::Ack(basic::Ack { delivery_tag: number, multiple: false })
                        }
                        Err(_) => basic::AMQPMethod::Nack(basic::Nack {
                            delivery_tag: number,
                            multiple: false,
                            requeue: false,
                        }),
                    };
                    send(&outbox, id, AMQPClass::Basic(method));
                }))
            }
            None => Confirm::Callback(Box::new(|_| {})),
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
                let back = basic::Return {
                    reply_code: code::NO_ROUTE,
                    reply_text: "NO_ROUTE".into(),
                    exchange: method.exchange.clone(),
                    routing_key: method.routing_key.clone(),
                };
                let method = AMQPClass::Basic(basic::AMQPMethod::Return(back));
                let frames = content(id, method, amqp_properties, &body, self.frame_max);
                self.outbox.push_bytes(&frames);
                if let Some(number) = number {
                    let ack = basic::Ack { delivery_tag: number, multiple: false };
                    send(&self.outbox, id, AMQPClass::Basic(basic::AMQPMethod::Ack(ack)));
                }
                Ok(())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Closes channel `id` for `text`: its consumers are cancelled, and frames are ignored
    /// until the client's `channel.close-ok`.
    fn close_channel(&mut self, id: u16, code: u16, text: &str) {
        tracing::debug!(channel = id, code, text, "channel closed by the broker");
        let consumers: Vec<u64> = match self.channels.get_mut(&id) {
            Some(channel) => {
                channel.closing = true;
                channel.incoming = None;
                channel.consumers.drain().map(|(_, consumer)| consumer).collect()
            }
            None => Vec::new(),
        };
        for consumer_id in consumers {
            let _ = self.engine.cancel(&self.caller, consumer_id, "channel closed");
            self.cancelled(consumer_id);
        }
        let close =
            channel::Close { reply_code: code, reply_text: truncate(text).into(), class_id: 0, method_id: 0 };
        send(&self.outbox, id, AMQPClass::Channel(channel::AMQPMethod::Close(close)));
    }

    /// Forgets channel `id`, cancelling its consumers (their unacked deliveries go back).
    fn drop_channel(&mut self, id: u16) {
        if let Some(channel) = self.channels.remove(&id) {
            for consumer_id in channel.consumers.into_values() {
                let _ = self.engine.cancel(&self.caller, consumer_id, "channel closed");
                self.cancelled(consumer_id);
            }
        }
    }
}

/// A binding of queue `queue` by `key`, with header arguments as text.
fn queue_binding(
    queue: &amq_protocol::types::ShortString,
    key: &amq_protocol::types::ShortString,
    arguments: &FieldTable,
) -> Binding {
    Binding {
        destination: Destination::Queue(queue.as_str().to_owned()),
        key: key.as_str().to_owned(),
        arguments: arguments::table_text(arguments),
    }
}

/// The next frame of the handshake, if it comes in time and reads.
async fn next_frame(frames: &mut FramedRead<OwnedReadHalf, FrameCodec>) -> Option<AMQPFrame> {
    tokio::time::timeout(HANDSHAKE_STEP, frames.next()).await.ok().flatten().and_then(Result::ok)
}

/// Queues one method frame.
fn send(outbox: &Outbox, channel: u16, method: AMQPClass) {
    outbox.push_bytes(&encode(&AMQPFrame::Method(channel, method)));
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
