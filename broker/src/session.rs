//! One client connection: the handshake, the read loop, heartbeats, and the translation of
//! wire requests into engine calls. Wire types stop here; the engine sees domain values only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use hopper_proto::{pb, Body, ErrorCode, Frame, Inbound, ProtoError, RawFrameCodec, RawInbound};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Notify};
use tokio_util::codec::FramedRead;
use tracing::Instrument;

use crate::cluster::MembershipChange;
use crate::engine::{Caller, Engine, PublishTarget};
use crate::error::BrokerError;
use crate::events::BrokerEvent;
use crate::outbox::Outbox;
use crate::wire;

mod commands;
mod login;
mod sink;

pub(crate) use login::Transport;

/// Read buffer size: large enough that a burst of small publishes is one read.
const READ_BUFFER: usize = 64 * 1024;
/// Body bytes of publishes a blocked connection may send before it is not read any more. Up to
/// this much, its acks and other requests behind the publishes are still served.
const MAX_HELD_BYTES: usize = 1024 * 1024;
/// Most frames handled one after another before the loop looks at shutdown, heartbeats and
/// flow control again.
const FRAMES_PER_TURN: usize = 64;
/// How long a closing connection's last frames may take to reach the peer.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// A new connection: who is on the other end, how it came, and whether it may stay.
pub(crate) struct Accepted {
    /// The broker's number for it.
    pub conn_id: u64,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Plain TCP or TLS, and the user of a client certificate.
    pub transport: Transport,
    /// False past the connection limit: it is told so and closed.
    pub admitted: bool,
}

/// Serves one connection, read from `read_half` and written to `write_half`, until the peer
/// leaves, breaks the protocol beyond repair, goes silent, stops reading what it is sent, or
/// the broker shuts down. Every unacked delivery returns to its queue afterwards.
///
/// Generic over the halves, so plain TCP keeps tokio's owned halves (no lock shared by reader
/// and writer) while TLS runs over a split TLS stream.
pub(crate) async fn run<R, W>(
    read_half: R,
    write_half: W,
    accepted: Accepted,
    engine: Arc<Engine>,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Accepted { conn_id, peer, transport, admitted } = accepted;
    let span = tracing::info_span!("conn", conn_id, %peer, tls = tracing::field::Empty);
    if transport.tls {
        span.record("tls", true);
    }
    async move {
        let _counted = engine.connection_opened();
        let outbox = Arc::new(Outbox::new(hopper_proto::HANDSHAKE_MAX_FRAME_SIZE, conn_id));
        let resume = Arc::new(Notify::new());
        let mut writer = {
            let outbox = outbox.clone();
            let resume = resume.clone();
            let write_timeout = engine.config().write_timeout();
            tokio::spawn(
                async move { outbox.run_writer(write_half, write_timeout, || resume.notify_one()).await },
            )
        };
        if admitted {
            let frames = FramedRead::with_capacity(
                read_half,
                RawFrameCodec::new(hopper_proto::HANDSHAKE_MAX_FRAME_SIZE),
                READ_BUFFER,
            );
            let mut session = Session::new(engine, conn_id, peer, transport, outbox.clone());
            session.serve(frames, shutdown, &resume).await;
            session.release_consumers();
        } else {
            tracing::warn!("connection refused: too many connections");
            outbox.push(&close_frame(ErrorCode::ResourceLimit, "too many connections"));
        }
        outbox.close();
        // A peer that does not read does not hold the connection (or a shutdown) open.
        match tokio::time::timeout(CLOSE_FLUSH, &mut writer).await {
            Ok(Ok(Err(err))) => tracing::info!(error = %err, "write failed"),
            Ok(Err(err)) => tracing::error!(error = %err, "writer task failed"),
            Ok(Ok(Ok(()))) => {}
            Err(_) => {
                writer.abort();
                tracing::info!("the peer did not take the last frames; closed anyway");
            }
        }
        tracing::debug!("connection closed");
    }
    .instrument(span)
    .await
}

/// Marks the connection as held back by flow control, and releases it on drop.
struct Held {
    engine: Arc<Engine>,
    on: bool,
}

impl Held {
    fn set(&mut self, on: bool) {
        if on != self.on {
            self.on = on;
            self.engine.hold_publisher(on);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Values agreed in the handshake.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    heartbeat: Option<Duration>,
}

/// Whether the read loop goes on after a frame.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// What became of a frame: handled, or a request to await.
enum Handled {
    Done(Flow),
    Slow(u64, Box<Body>),
}

/// Requests that wait on blocking work or a long poll; the others are answered at once, with
/// no future built per request on the hot path.
fn is_slow(body: &Body) -> bool {
    matches!(
        body,
        Body::Get(_)
            | Body::QueueDeclare(_)
            | Body::QueueDelete(_)
            | Body::AuditQuery(_)
            | Body::QueueSetAlarm(_)
            | Body::ExchangeDeclare(_)
            | Body::ExchangeDelete(_)
            | Body::Bind(_)
            | Body::Unbind(_)
            | Body::UserPut(_)
            | Body::UserDelete(_)
            | Body::PermissionsSet(_)
            | Body::TokenCreate(_)
            | Body::TokenDelete(_)
            | Body::ClusterAddNode(_)
            | Body::ClusterRemoveNode(_)
    )
}

struct Session {
    engine: Arc<Engine>,
    /// The connection and, once logged in, its user; before that, a user that may do nothing.
    caller: Caller,
    peer: SocketAddr,
    /// Whether the connection runs over TLS, and with which client certificate.
    transport: Transport,
    /// A SCRAM exchange waiting for the client's response.
    login: Option<login::Pending>,
    /// The Hello whose login is under way.
    hello: Option<pb::Hello>,
    /// How the user logged in.
    mechanism: &'static str,
    outbox: Arc<Outbox>,
    negotiated: Option<Negotiated>,
    /// This connection's push consumers.
    consumers: HashSet<u64>,
    /// Queues this connection published to, so a publish skips the lookup.
    publish_cache: HashMap<String, PublishTarget>,
    /// This connection has published: flow control applies to it.
    publisher: bool,
    /// Set while publishers are blocked and this connection is a publisher.
    holding: bool,
    /// Publishes read while holding, answered once publishers are unblocked, in order.
    held_publishes: VecDeque<(u64, pb::Publish)>,
    /// Body bytes of `held_publishes`.
    held_bytes: usize,
    /// Broker events this connection subscribed to.
    events: Option<tokio::sync::broadcast::Receiver<BrokerEvent>>,
    /// Acks without confirm read in this burst and not applied yet, in order: applied together
    /// before any other request and at the end of the burst.
    acks: Vec<PendingAck>,
    /// Counts this connection against its user's connection limit while it is open.
    user_slot: Option<crate::engine::UserConnection>,
    /// Where publish confirms go: the outbox, counting publishes in flight.
    publishes: Arc<sink::PublishReplies>,
}

/// An ack read and not applied yet.
struct PendingAck {
    request_id: u64,
    consumer_id: u64,
    delivery_tag: u64,
    multiple: bool,
}

impl Session {
    fn new(
        engine: Arc<Engine>,
        conn_id: u64,
        peer: SocketAddr,
        transport: Transport,
        outbox: Arc<Outbox>,
    ) -> Self {
        let publishes = Arc::new(sink::PublishReplies::new(outbox.clone()));
        Session {
            engine,
            publishes,
            user_slot: None,
            caller: Caller::connection(conn_id, ""),
            peer,
            transport,
            login: None,
            hello: None,
            mechanism: "",
            outbox,
            negotiated: None,
            consumers: HashSet::new(),
            publish_cache: HashMap::new(),
            publisher: false,
            holding: false,
            held_publishes: VecDeque::new(),
            held_bytes: 0,
            events: None,
            acks: Vec::new(),
        }
    }

    async fn serve<R: AsyncRead + Unpin>(
        &mut self,
        mut frames: FramedRead<R, RawFrameCodec>,
        mut shutdown: watch::Receiver<bool>,
        resume: &Notify,
    ) {
        let handshake_deadline = tokio::time::sleep(self.engine.config().handshake_timeout());
        tokio::pin!(handshake_deadline);
        let mut heartbeat: Option<tokio::time::Interval> = None;
        let mut last_seen = Instant::now();
        let mut flow_changes = self.engine.flow_changes();
        let mut held = Held { engine: self.engine.clone(), on: false };
        loop {
            // While publishers are blocked, a publishing connection is told so and its publishes
            // are held back (up to MAX_HELD_BYTES, then it is not read any more); its acks and
            // other requests are still served, so a worker that consumes and republishes on one
            // connection can drain what blocks it.
            let block = if self.publisher { self.engine.publishers_blocked() } else { None };
            if block.is_some() != held.on {
                held.set(block.is_some());
                let reason = block.unwrap_or_default();
                let event = pb::FlowControl { blocked: held.on, reason };
                self.outbox.push(&Frame::event(Body::FlowControl(event)));
                last_seen = Instant::now();
            }
            self.holding = held.on;
            if !self.holding && !self.held_publishes.is_empty() {
                self.release_publishes();
            }
            // Requests are not read while the peer is not reading the responses; everything
            // else (heartbeats, shutdown, the write deadline) goes on meanwhile.
            let room = self.outbox.has_room();
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    self.outbox.push(&close_frame(ErrorCode::Unspecified, "broker is shutting down"));
                    return;
                }
                _ = flow_changes.changed() => {}
                event = next_event(&mut self.events) => {
                    if let Some(event) = event {
                        let event = pb::Event {
                            time_ms: event.time_ms,
                            kind: event.kind,
                            queue: event.queue,
                            value: event.value,
                            detail: event.detail,
                        };
                        self.outbox.push(&Frame::event(Body::Event(event)));
                    }
                }
                _ = resume.notified() => {
                    // The writer wakes us when it drained the outbox, or when it gave up.
                    if self.outbox.is_closed() {
                        tracing::info!("the peer stopped reading or the connection broke; closing");
                        return;
                    }
                    if self.outbox.take_stalled() {
                        self.engine.redispatch(self.consumers.iter().copied());
                    }
                }
                _ = self.outbox.wait_for_room(), if !room => {
                    // Silence while we were not reading does not count against heartbeats.
                    last_seen = Instant::now();
                }
                item = frames.next(), if room && self.held_bytes < MAX_HELD_BYTES => {
                    last_seen = Instant::now();
                    let flow = self.on_burst(item, &mut frames, &mut heartbeat, held.on).await;
                    self.apply_acks();
                    if flow == Flow::Close {
                        return;
                    }
                }
                _ = tick(&mut heartbeat) => {
                    let interval = heartbeat.as_ref().map(|h| h.period()).unwrap_or_default();
                    if !held.on && room && last_seen.elapsed() > interval * 2 {
                        tracing::info!(heartbeat_ms = interval.as_millis() as u64, "peer missed two heartbeats; closing");
                        self.outbox.push(&close_frame(ErrorCode::Unspecified, "missed heartbeats"));
                        return;
                    }
                    self.outbox.push(&Frame::event(Body::Heartbeat(pb::Heartbeat {})));
                }
                _ = &mut handshake_deadline, if self.negotiated.is_none() => {
                    tracing::info!("no handshake in time; closing");
                    self.outbox.push(&close_frame(ErrorCode::ProtocolViolation, "handshake timed out"));
                    return;
                }
            }
        }
    }

    /// Handles `item` and then the frames already read behind it, a burst at a time, while
    /// nothing the loop watches for has changed.
    async fn on_burst<R: AsyncRead + Unpin>(
        &mut self,
        item: Option<Result<RawInbound, ProtoError>>,
        frames: &mut FramedRead<R, RawFrameCodec>,
        heartbeat: &mut Option<tokio::time::Interval>,
        held: bool,
    ) -> Flow {
        if self.on_frame(item, frames, heartbeat).await == Flow::Close {
            return Flow::Close;
        }
        for _ in 1..FRAMES_PER_TURN {
            let block_changed = self.publisher && self.engine.publishers_blocked().is_some() != held;
            if block_changed || self.held_bytes >= MAX_HELD_BYTES || !self.outbox.has_room() {
                break;
            }
            let Some(item) = frames.next().now_or_never() else { break };
            if self.on_frame(item, frames, heartbeat).await == Flow::Close {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// Applies the acks read so far, a run of one consumer's at a time, and answers those that
    /// failed.
    fn apply_acks(&mut self) {
        let mut acks = std::mem::take(&mut self.acks);
        for run in acks.chunk_by(|a, b| a.consumer_id == b.consumer_id) {
            let tags: Vec<(u64, bool)> = run.iter().map(|a| (a.delivery_tag, a.multiple)).collect();
            match self.engine.ack_all(&self.caller, run[0].consumer_id, &tags) {
                Ok(results) => {
                    for (ack, result) in run.iter().zip(results) {
                        if let Err(err) = result {
                            self.reply_error(ack.request_id, err);
                        }
                    }
                }
                Err(err) => {
                    for ack in run {
                        self.reply_error(ack.request_id, err.clone());
                    }
                }
            }
        }
        acks.clear();
        self.acks = acks;
    }

    /// Handles one item of the frame stream; starts heartbeats once the handshake agreed them.
    async fn on_frame<R: AsyncRead + Unpin>(
        &mut self,
        item: Option<Result<RawInbound, ProtoError>>,
        frames: &mut FramedRead<R, RawFrameCodec>,
        heartbeat: &mut Option<tokio::time::Interval>,
    ) -> Flow {
        // Decoded here rather than in the codec, so the frame is not copied up the stream.
        let inbound = match item {
            Some(Ok(raw)) => raw.decode(),
            None => {
                tracing::info!("peer closed the connection");
                return Flow::Close;
            }
            Some(Err(ProtoError::Io(err))) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::info!("peer closed the connection in the middle of a frame");
                return Flow::Close;
            }
            Some(Err(err)) => {
                tracing::info!(error = %err, "read failed");
                return Flow::Close;
            }
        };
        if let Inbound::Frame(Frame { request_id, body: Some(Body::Hello(hello)) }) = &inbound {
            return self.on_hello(*request_id, hello.clone(), frames.decoder_mut(), heartbeat).await;
        }
        if let Inbound::Frame(Frame { request_id, body: Some(Body::AuthResponse(response)) }) = &inbound {
            let Some(pending) = self.login.take() else {
                self.reply_error(
                    *request_id,
                    BrokerError::ProtocolViolation("AuthResponse without a challenge".into()),
                );
                return Flow::Continue;
            };
            let step = login::finish(self.engine.users(), self.peer.ip(), pending, &response.response);
            return self.login_step(*request_id, step, frames.decoder_mut(), heartbeat).await;
        }
        let was_negotiated = self.negotiated.is_some();
        match self.handle(inbound) {
            Handled::Done(Flow::Continue) => {}
            Handled::Done(Flow::Close) => return Flow::Close,
            Handled::Slow(request_id, body) => self.slow_request(request_id, *body).await,
        }
        if !was_negotiated {
            if let Some(interval) = self.negotiated.and_then(|n| n.heartbeat) {
                *heartbeat = Some(tokio::time::interval_at(tokio::time::Instant::now() + interval, interval));
            }
        }
        Flow::Continue
    }

    /// Handles one unit read off the wire; a request that waits on blocking work or a long
    /// poll is handed back to be awaited.
    fn handle(&mut self, inbound: Inbound) -> Handled {
        let handshaken = self.negotiated.is_some();
        let frame = match inbound {
            Inbound::Frame(frame) => frame,
            Inbound::Oversize { request_id, len } => {
                let max = if handshaken { "negotiated" } else { "handshake" };
                self.outbox.push(&Frame::error(
                    request_id,
                    ErrorCode::FrameTooLarge,
                    format!("frame of {len} bytes exceeds the {max} max frame size; it was skipped"),
                ));
                // Before the handshake the peer may not speak this protocol at all.
                return Handled::Done(if handshaken { Flow::Continue } else { Flow::Close });
            }
            Inbound::Malformed { request_id, error } => {
                tracing::info!(request_id, %error, "malformed frame");
                let message = format!("malformed frame: {error}");
                if !handshaken {
                    self.outbox.push(&close_frame(ErrorCode::ProtocolViolation, &message));
                    return Handled::Done(Flow::Close);
                }
                // Answering the id the frame declared lets the client fail that request now
                // rather than at its timeout.
                self.outbox.push(&Frame::error(request_id, ErrorCode::ProtocolViolation, message));
                return Handled::Done(Flow::Continue);
            }
        };
        let request_id = frame.request_id;
        let Some(body) = frame.body else {
            self.reply_error(
                request_id,
                BrokerError::ProtocolViolation("frame has no known command (unknown message type)".into()),
            );
            return Handled::Done(Flow::Continue);
        };
        match body {
            Body::Hello(_) | Body::AuthResponse(_) => {
                self.reply_error(request_id, BrokerError::ProtocolViolation("Hello sent twice".into()));
                return Handled::Done(Flow::Continue);
            }
            Body::Close(close) => {
                tracing::info!(reason = %close.reason, "peer closed the session");
                return Handled::Done(Flow::Close);
            }
            Body::Heartbeat(_) => return Handled::Done(Flow::Continue),
            _ if !handshaken => {
                self.reply_error(
                    request_id,
                    BrokerError::ProtocolViolation(
                        "handshake required: the first frame must be Hello".into(),
                    ),
                );
                return Handled::Done(Flow::Continue);
            }
            Body::Ack(ack) if !ack.confirm => {
                let pb::Ack { consumer_id, delivery_tag, multiple, .. } = ack;
                self.acks.push(PendingAck { request_id, consumer_id, delivery_tag, multiple });
                return Handled::Done(Flow::Continue);
            }
            body if is_slow(&body) => {
                self.apply_acks();
                return Handled::Slow(request_id, Box::new(body));
            }
            body => {
                self.apply_acks();
                let result = self.request(request_id, body);
                self.answer(request_id, result);
            }
        }
        Handled::Done(Flow::Continue)
    }

    /// Runs a request that waits (blocking file work, a long poll) and answers it.
    async fn slow_request(&mut self, request_id: u64, body: Body) {
        let result = match body {
            Body::Get(get) => self.get(request_id, get).await,
            Body::QueueDeclare(declare) => self.declare(declare).await.map(Some),
            Body::QueueDelete(delete) => self.delete(delete).await.map(Some),
            Body::AuditQuery(query) => self.audit(query).await.map(Some),
            Body::QueueSetAlarm(alarm) => self
                .engine
                .set_alarm(&self.caller, &alarm.name, alarm.depth)
                .await
                .map(|info| Some(Body::QueueInfo(wire::queue_info(info)))),
            Body::ExchangeDeclare(declare) => self.declare_exchange(declare).await.map(Some),
            Body::ExchangeDelete(delete) => self
                .engine
                .delete_exchange(&self.caller, &delete.name, delete.if_unused)
                .await
                .map(|()| Some(Body::ExchangeDeleteOk(pb::ExchangeDeleteOk {}))),
            Body::Bind(bind) => self.bind(bind).await.map(Some),
            Body::Unbind(unbind) => self.unbind(unbind).await.map(Some),
            Body::UserPut(put) => {
                let password = (!put.keep_password).then_some(put.password);
                self.engine
                    .put_user(&self.caller, put.name, password, put.tags, put.update)
                    .await
                    .map(|()| Some(Body::AccessOk(pb::AccessOk {})))
            }
            Body::UserDelete(delete) => self
                .engine
                .delete_user(&self.caller, delete.name)
                .await
                .map(|()| Some(Body::AccessOk(pb::AccessOk {}))),
            Body::PermissionsSet(set) => self
                .engine
                .set_permissions(&self.caller, set.user, wire::permissions_from_wire(set.permissions))
                .await
                .map(|()| Some(Body::AccessOk(pb::AccessOk {}))),
            Body::TokenCreate(create) => self
                .engine
                .create_token(&self.caller, create.name, create.expires_ms)
                .await
                .map(|token| Some(Body::TokenCreateOk(pb::TokenCreateOk { token }))),
            Body::TokenDelete(delete) => self
                .engine
                .delete_token(&self.caller, delete.name)
                .await
                .map(|()| Some(Body::AccessOk(pb::AccessOk {}))),
            Body::ClusterAddNode(add) => self
                .engine
                .change_cluster_members(&self.caller, MembershipChange::Add { id: add.id, addr: add.addr })
                .await
                .map(|status| Some(Body::ClusterStatusOk(wire::cluster_status(status)))),
            Body::ClusterRemoveNode(remove) => self
                .engine
                .change_cluster_members(&self.caller, MembershipChange::Remove { id: remove.id })
                .await
                .map(|status| Some(Body::ClusterStatusOk(wire::cluster_status(status)))),
            other => self.request(request_id, other),
        };
        self.answer(request_id, result);
    }

    fn answer(&self, request_id: u64, result: Result<Option<Body>, BrokerError>) {
        match result {
            Ok(Some(response)) => self.outbox.push(&Frame::new(request_id, response)),
            Ok(None) => {}
            Err(err) => self.reply_error(request_id, err),
        }
    }

    fn reply_error(&self, request_id: u64, err: BrokerError) {
        tracing::debug!(request_id, error = %err, "request failed");
        self.outbox.push(&err.frame(request_id));
    }

    /// A Hello: checks the version, then starts the login it asks for.
    async fn on_hello(
        &mut self,
        request_id: u64,
        hello: pb::Hello,
        codec: &mut RawFrameCodec,
        heartbeat: &mut Option<tokio::time::Interval>,
    ) -> Flow {
        if self.negotiated.is_some() || self.hello.is_some() {
            self.reply_error(request_id, BrokerError::ProtocolViolation("Hello sent twice".into()));
            return Flow::Continue;
        }
        let supported = hopper_proto::MIN_PROTOCOL_VERSION..=hopper_proto::PROTOCOL_VERSION;
        if !supported.contains(&hello.protocol_version) {
            tracing::info!(version = hello.protocol_version, "unsupported protocol version");
            let message = format!(
                "protocol version {} is not supported; this broker speaks versions {} to {}",
                hello.protocol_version,
                supported.start(),
                supported.end()
            );
            self.refuse_hello(request_id, ErrorCode::UnsupportedVersion, message);
            return Flow::Close;
        }
        let step =
            login::start(self.engine.users(), self.peer.ip(), &hello.mechanism, &hello.auth, &self.transport);
        self.hello = Some(pb::Hello { auth: Default::default(), ..hello });
        self.login_step(request_id, step, codec, heartbeat).await
    }

    /// Goes on with a login: sends the challenge, or opens the session, or refuses and closes.
    async fn login_step(
        &mut self,
        request_id: u64,
        step: login::Step,
        codec: &mut RawFrameCodec,
        heartbeat: &mut Option<tokio::time::Interval>,
    ) -> Flow {
        match step {
            login::Step::Challenge(challenge, pending) => {
                self.login = Some(pending);
                let body = Body::AuthChallenge(pb::AuthChallenge { challenge: challenge.into() });
                self.outbox.push(&Frame::new(request_id, body));
                Flow::Continue
            }
            login::Step::Done { user, mechanism, auth } => {
                let Some(hello) = self.hello.take() else {
                    self.reply_error(request_id, BrokerError::ProtocolViolation("no Hello to answer".into()));
                    return Flow::Close;
                };
                match self.engine.user_connected(&user) {
                    Ok(slot) => self.user_slot = Some(slot),
                    Err(err) => {
                        tracing::info!(%user, error = %err, "connection refused");
                        self.refuse_hello(request_id, err.code(), err.to_string());
                        return Flow::Close;
                    }
                }
                self.caller = Caller::connection(self.caller.connection_id, &user);
                self.mechanism = mechanism;
                let ok = self.negotiate(&hello, codec, user, auth);
                if let Some(interval) = self.negotiated.and_then(|n| n.heartbeat) {
                    *heartbeat =
                        Some(tokio::time::interval_at(tokio::time::Instant::now() + interval, interval));
                }
                self.outbox.push(&Frame::new(request_id, Body::HelloOk(ok)));
                Flow::Continue
            }
            login::Step::Refused { reason, delay } => {
                // Slows guessing from this address; nobody else waits.
                tokio::time::sleep(delay).await;
                self.refuse_hello(request_id, ErrorCode::Unauthenticated, reason);
                Flow::Close
            }
        }
    }

    fn refuse_hello(&self, request_id: u64, code: ErrorCode, message: String) {
        let rejection = pb::HelloRejected {
            code: code.into(),
            message,
            min_version: hopper_proto::MIN_PROTOCOL_VERSION,
            max_version: hopper_proto::PROTOCOL_VERSION,
        };
        self.outbox.push(&Frame::new(request_id, Body::HelloRejected(rejection)));
    }

    /// Agrees on heartbeats and frame size with a logged-in client.
    fn negotiate(
        &mut self,
        hello: &pb::Hello,
        codec: &mut RawFrameCodec,
        user: String,
        auth: Vec<u8>,
    ) -> pb::HelloOk {
        let config = self.engine.config();
        let heartbeat_ms = match (hello.heartbeat_ms, config.heartbeat_ms) {
            (0, _) => 0,
            (client, 0) => client,
            (client, broker) => client.min(broker),
        };
        let max_frame_size = match hello.max_frame_size {
            0 => config.max_frame_size,
            client => client.clamp(hopper_proto::HANDSHAKE_MAX_FRAME_SIZE, config.max_frame_size),
        };
        codec.set_max_frame_size(max_frame_size);
        self.outbox.set_max_frame_size(max_frame_size);
        let heartbeat = (heartbeat_ms > 0).then(|| Duration::from_millis(heartbeat_ms.into()));
        self.negotiated = Some(Negotiated { heartbeat });
        tracing::info!(client = %hello.client_name, %user, mechanism = self.mechanism, heartbeat_ms, max_frame_size, "session open");
        pb::HelloOk {
            // A client of an older version gets its own version back.
            protocol_version: hello.protocol_version.min(hopper_proto::PROTOCOL_VERSION),
            server_version: env!("CARGO_PKG_VERSION").into(),
            heartbeat_ms,
            max_frame_size,
            auth: auth.into(),
            user,
        }
    }

    /// Answers the publishes held back while publishers were blocked, in order.
    fn release_publishes(&mut self) {
        while let Some((request_id, publish)) = self.held_publishes.pop_front() {
            let result = self.publish(request_id, publish).map(|()| None);
            self.answer(request_id, result);
        }
        self.held_bytes = 0;
    }

    /// Runs one request after the handshake. `Ok(None)` means no success response is due
    /// (settlements) or it was already queued.
    fn request(&mut self, request_id: u64, body: Body) -> Result<Option<Body>, BrokerError> {
        match body {
            Body::Publish(publish) if self.holding || !self.held_publishes.is_empty() => {
                self.held_bytes += publish.body.len();
                self.held_publishes.push_back((request_id, publish));
                Ok(None)
            }
            Body::Publish(publish) => self.publish(request_id, publish).map(|()| None),
            Body::Ack(ack) => self.ack(request_id, ack).map(|()| None),
            Body::Nack(nack) => self.nack(request_id, nack).map(|()| None),
            Body::Reject(reject) => self.reject(request_id, reject).map(|()| None),
            Body::Extend(extend) => self.extend(extend).map(Some),
            Body::Consume(consume) => self.consume(request_id, consume).map(|()| None),
            Body::Cancel(cancel) => self.cancel(cancel.consumer_id).map(Some),
            Body::QueuePurge(purge) => {
                let message_count = self.engine.purge(&self.caller, &purge.name)?;
                Ok(Some(Body::QueuePurgeOk(pb::QueuePurgeOk { message_count })))
            }
            Body::QueueStats(stats) => {
                let info = self.engine.queue_info(&self.caller, &stats.name)?;
                Ok(Some(Body::QueueInfo(wire::queue_info(info))))
            }
            Body::QueueList(_) => {
                let queues =
                    self.engine.list_queues(&self.caller).into_iter().map(wire::queue_info).collect();
                Ok(Some(Body::QueueListOk(pb::QueueListOk { queues })))
            }
            Body::BrokerStatus(_) => Ok(Some(Body::BrokerStatusOk(wire::status(self.engine.status())))),
            Body::ClusterStatus(_) => {
                Ok(Some(Body::ClusterStatusOk(wire::cluster_status(self.engine.cluster_status()?))))
            }
            Body::WhoAmI(_) => {
                let user = wire::user_info(self.engine.whoami(&self.caller)?);
                Ok(Some(Body::WhoAmIOk(pb::WhoAmIOk { user: Some(user), mechanism: self.mechanism.into() })))
            }
            Body::TokenList(_) => {
                let tokens = self.engine.list_tokens(&self.caller)?;
                let tokens = tokens
                    .into_iter()
                    .map(|t| pb::TokenInfo {
                        name: t.name,
                        created_ms: t.created_ms,
                        expires_ms: t.expires_ms,
                    })
                    .collect();
                Ok(Some(Body::TokenListOk(pb::TokenListOk { tokens })))
            }
            Body::UserList(_) => {
                let (users, default_user) = self.engine.list_users(&self.caller)?;
                let users = users.into_iter().map(wire::user_info).collect();
                Ok(Some(Body::UserListOk(pb::UserListOk { users, default_user })))
            }
            Body::MoveStart(start) => {
                let status = self.engine.start_move(&self.caller, wire::move_spec(start)?)?;
                Ok(Some(Body::MoveInfo(wire::move_info(status))))
            }
            Body::MoveList(_) => {
                let moves = self.engine.list_moves(&self.caller).into_iter().map(wire::move_info).collect();
                Ok(Some(Body::MoveListOk(pb::MoveListOk { moves })))
            }
            Body::MoveCancel(cancel) => {
                let status = self.engine.cancel_move(&self.caller, cancel.id)?;
                Ok(Some(Body::MoveInfo(wire::move_info(status))))
            }
            Body::Peek(peek) => {
                // Zero asks for the default.
                let count = if peek.count == 0 { 10 } else { peek.count as usize };
                let found = self.engine.peek(&self.caller, &peek.queue, count)?;
                let messages = found.iter().map(wire::message).collect();
                Ok(Some(Body::PeekOk(pb::PeekOk { messages })))
            }
            Body::ExchangeList(_) => {
                let exchanges =
                    self.engine.list_exchanges(&self.caller).into_iter().map(wire::exchange_info).collect();
                Ok(Some(Body::ExchangeListOk(pb::ExchangeListOk { exchanges })))
            }
            Body::BindingList(list) => Ok(Some(self.bindings(list))),
            Body::Subscribe(_) => {
                self.events.get_or_insert_with(|| self.engine.subscribe_events());
                Ok(Some(Body::SubscribeOk(pb::SubscribeOk {})))
            }
            other => Err(BrokerError::ProtocolViolation(format!(
                "{} is sent by the broker, not to it",
                other.name()
            ))),
        }
    }
}

fn close_frame(code: ErrorCode, reason: &str) -> Frame {
    Frame::event(Body::Close(pb::Close { code: code as i32, reason: reason.into() }))
}

/// The next broker event of a subscribed connection; never resolves without a subscription.
/// A subscriber that fell behind skips the events it missed.
async fn next_event(
    events: &mut Option<tokio::sync::broadcast::Receiver<BrokerEvent>>,
) -> Option<BrokerEvent> {
    let Some(receiver) = events else { return std::future::pending().await };
    loop {
        match receiver.recv().await {
            Ok(event) => return Some(event),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "event subscriber fell behind");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}
