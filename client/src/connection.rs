//! [`Connection`]: the handshake, the request/response methods, publish confirms, and the
//! flow-control state the broker reports.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt as _, StreamExt as _};
use hopper_proto::{
    encode_frame, pb, scram, Body, ErrorCode, Frame, FrameCodec, Inbound, DEFAULT_MAX_FRAME_SIZE,
    HANDSHAKE_MAX_FRAME_SIZE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::FramedRead;
use tracing::debug;

use crate::consumer::Consumer;
use crate::error::{Error, Result};
use crate::info::{AuditEvent, BrokerStatus, ClusterStatus, QueueInfo};
use crate::io::{self, cancel_detached, READ_BUFFER};
use crate::options::{
    wire_ms, ConnectOptions, ConsumeOptions, DeleteOptions, Mechanism, PublishOptions, QueueOptions,
};
use crate::pull::Pullers;
use crate::shared::{body_name, unexpected, PendingRequest, Shared, HELLO_REQUEST_ID};
use crate::tls;
use crate::tracker::DeliveryTracker;

/// A connection to a Hopper broker.
///
/// Cheap to clone: clones share one socket, one reader task and one writer task, and every
/// method takes `&self`, so many tasks can issue requests at once (they are pipelined).
/// Dropping the last clone closes the connection like [`close`](Self::close) without waiting;
/// live [`Consumer`]s and [`Delivery`](crate::Delivery)s hold a clone.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    user: String,
    server_version: String,
    heartbeat: Duration,
    max_frame_size: u32,
    /// Settle state of the pull consumers the broker uses for this connection's `get`s.
    pullers: Pullers,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.begin_close();
    }
}

/// What the broker agreed to in the handshake.
struct Negotiated {
    user: String,
    server_version: String,
    heartbeat: Duration,
    max_frame_size: u32,
}

impl Connection {
    /// Connects to the broker at `addr` with default [`ConnectOptions`].
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Connection> {
        Connection::connect_with(addr, ConnectOptions::default()).await
    }

    /// Connects to the broker at `addr` and performs the handshake.
    pub async fn connect_with(addr: impl ToSocketAddrs, options: ConnectOptions) -> Result<Connection> {
        let timeout = options.connect_timeout;
        let connecting = Connection::establish(addr, options);
        if timeout.is_zero() {
            return connecting.await;
        }
        match tokio::time::timeout(timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(format!("connecting to the broker took longer than {timeout:?}"))),
        }
    }

    /// Connects to the first broker of `addrs` that answers, trying them in order, each within
    /// `options.connect_timeout`. A broker that cannot be reached, or fails the connection
    /// before logging in, is passed over for the next. A refused login or protocol version ends
    /// the search at once: the next broker of the same cluster would answer the same, and
    /// trying credentials on every one would only multiply the failed logins.
    pub async fn connect_any<A>(addrs: &[A], options: ConnectOptions) -> Result<Connection>
    where
        A: std::fmt::Display,
    {
        let mut failures = Vec::with_capacity(addrs.len());
        for addr in addrs {
            match Connection::connect_with(addr.to_string(), options.clone()).await {
                Ok(connection) => return Ok(connection),
                Err(err @ (Error::Authentication(_) | Error::HandshakeRejected { .. })) => return Err(err),
                Err(err) => failures.push(format!("{addr}: {err}")),
            }
        }
        if failures.is_empty() {
            return Err(Error::Unreachable("no address given".into()));
        }
        Err(Error::Unreachable(failures.join("; ")))
    }

    async fn establish(addr: impl ToSocketAddrs, options: ConnectOptions) -> Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        // Frames are batched by the writer; waiting for more data in the kernel only adds
        // latency.
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        match &options.tls {
            // Plain TCP keeps tokio's owned halves: no lock shared by the reader and writer.
            None => {
                let (read, write) = stream.into_split();
                Connection::open(read, write, peer, &options).await
            }
            Some(tls_options) => {
                let stream = tls::connect(stream, tls_options).await?;
                let (read, write) = tokio::io::split(stream);
                Connection::open(read, write, peer, &options).await
            }
        }
    }

    /// Logs in over an established stream and starts the reader and writer tasks.
    async fn open<R, W>(
        read: R,
        mut write: W,
        peer: std::net::SocketAddr,
        options: &ConnectOptions,
    ) -> Result<Connection>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut frames =
            FramedRead::with_capacity(read, FrameCodec::new(HANDSHAKE_MAX_FRAME_SIZE), READ_BUFFER);
        let negotiated = handshake(&mut frames, &mut write, options).await?;
        frames.decoder_mut().set_max_frame_size(negotiated.max_frame_size);
        debug!(
            %peer,
            server_version = %negotiated.server_version,
            heartbeat = ?negotiated.heartbeat,
            max_frame_size = negotiated.max_frame_size,
            "connected"
        );

        let shared = Arc::new(Shared::new(negotiated.max_frame_size));
        let span = tracing::debug_span!("hopper_connection", %peer, tls = options.tls.is_some());
        io::spawn(shared.clone(), frames, write, negotiated.heartbeat, span);
        let inner = Inner {
            shared,
            user: negotiated.user,
            server_version: negotiated.server_version,
            heartbeat: negotiated.heartbeat,
            max_frame_size: negotiated.max_frame_size,
            pullers: Pullers::default(),
        };
        Ok(Connection { inner: Arc::new(inner) })
    }

    /// The user this connection logged in as.
    pub fn user(&self) -> &str {
        &self.inner.user
    }

    /// The version string the broker reported in the handshake.
    pub fn server_version(&self) -> &str {
        &self.inner.server_version
    }

    /// The negotiated heartbeat interval; zero when heartbeats are off.
    pub fn heartbeat(&self) -> Duration {
        self.inner.heartbeat
    }

    /// The negotiated max frame size in bytes, enforced in both directions.
    pub fn max_frame_size(&self) -> u32 {
        self.inner.max_frame_size
    }

    /// Creates the queue `name` if it does not exist and returns its description. Declaring an
    /// existing queue with other settings fails with `PRECONDITION_FAILED`. A dead-letter
    /// queue is not created for you: declare it first.
    pub async fn declare_queue(&self, name: &str, options: QueueOptions) -> Result<QueueInfo> {
        self.declare(name, Some(options.to_wire()), false).await
    }

    /// Describes the queue `name` without creating it; fails with `NOT_FOUND`
    /// ([`Error::Broker`]) if it does not exist.
    pub async fn queue_exists(&self, name: &str) -> Result<QueueInfo> {
        self.declare(name, None, true).await
    }

    async fn declare(
        &self,
        name: &str,
        settings: Option<pb::QueueSettings>,
        passive: bool,
    ) -> Result<QueueInfo> {
        let declare = pb::QueueDeclare { name: name.to_string(), settings, passive };
        match self.call(Body::QueueDeclare(declare)).await? {
            Body::QueueDeclareOk(pb::QueueDeclareOk { queue: Some(info), .. }) => Ok(info.into()),
            Body::QueueDeclareOk(_) => Err(Error::Protocol("QueueDeclareOk without a queue".into())),
            other => Err(unexpected("QueueDeclareOk", &other)),
        }
    }

    /// Deletes the queue `name` and returns how many messages (ready and unacknowledged) were
    /// dropped with it. Its consumers are cancelled.
    pub async fn delete_queue(&self, name: &str, options: DeleteOptions) -> Result<u64> {
        let delete = pb::QueueDelete {
            name: name.to_string(),
            if_unused: options.if_unused,
            if_empty: options.if_empty,
        };
        match self.call(Body::QueueDelete(delete)).await? {
            Body::QueueDeleteOk(ok) => Ok(ok.message_count),
            other => Err(unexpected("QueueDeleteOk", &other)),
        }
    }

    /// Removes every ready message of the queue `name` and returns how many there were.
    /// Delivered, unacknowledged messages are not touched.
    pub async fn purge_queue(&self, name: &str) -> Result<u64> {
        match self.call(Body::QueuePurge(pb::QueuePurge { name: name.to_string() })).await? {
            Body::QueuePurgeOk(ok) => Ok(ok.message_count),
            other => Err(unexpected("QueuePurgeOk", &other)),
        }
    }

    /// Describes the queue `name`; fails with `NOT_FOUND` if it does not exist.
    pub async fn queue_stats(&self, name: &str) -> Result<QueueInfo> {
        match self.call(Body::QueueStats(pb::QueueStats { name: name.to_string() })).await? {
            Body::QueueInfo(info) => Ok(info.into()),
            other => Err(unexpected("QueueInfo", &other)),
        }
    }

    /// Describes every queue of the broker.
    pub async fn list_queues(&self) -> Result<Vec<QueueInfo>> {
        match self.call(Body::QueueList(pb::QueueList {})).await? {
            Body::QueueListOk(ok) => Ok(ok.queues.into_iter().map(QueueInfo::from).collect()),
            other => Err(unexpected("QueueListOk", &other)),
        }
    }

    /// Sets the depth alarm of the queue `name`: the alarm is raised (an
    /// [`EventKind::AlarmRaised`](crate::EventKind::AlarmRaised) event, and
    /// [`QueueInfo::alarm`]) while more than `depth` messages are ready. `None` (or `Some(0)`)
    /// removes the alarm. Returns the queue's description.
    pub async fn set_alarm(&self, name: &str, depth: Option<u64>) -> Result<QueueInfo> {
        let alarm = pb::QueueSetAlarm { name: name.to_string(), depth: depth.unwrap_or(0) };
        match self.call(Body::QueueSetAlarm(alarm)).await? {
            Body::QueueInfo(info) => Ok(info.into()),
            other => Err(unexpected("QueueInfo", &other)),
        }
    }

    /// The broker's health: version, uptime, connections, memory and disk against their
    /// watermarks, and whether publishers are blocked.
    pub async fn status(&self) -> Result<BrokerStatus> {
        match self.call(Body::BrokerStatus(pb::BrokerStatus {})).await? {
            Body::BrokerStatusOk(status) => Ok(status.into()),
            other => Err(unexpected("BrokerStatusOk", &other)),
        }
    }

    /// The cluster as the connected node sees it: members, leader, term, replication lag.
    /// Fails with [`ErrorCode::NotFound`](hopper_proto::ErrorCode) from a broker that is not in
    /// a cluster.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        match self.call(Body::ClusterStatus(pb::ClusterStatus {})).await? {
            Body::ClusterStatusOk(status) => Ok(status.into()),
            other => Err(unexpected("ClusterStatusOk", &other)),
        }
    }

    /// Adds node `id`, reachable by the other nodes at `addr` (its `--cluster-listen`), to the
    /// cluster; returns the cluster's status once the change is committed. The node must run
    /// with `--node-id` and no `--peers`. Admin only.
    pub async fn cluster_add_node(&self, id: u64, addr: &str) -> Result<ClusterStatus> {
        let add = pb::ClusterAddNode { id, addr: addr.to_owned() };
        match self.call(Body::ClusterAddNode(add)).await? {
            Body::ClusterStatusOk(status) => Ok(status.into()),
            other => Err(unexpected("ClusterStatusOk", &other)),
        }
    }

    /// Removes node `id` from the cluster; returns the cluster's status after. Admin only.
    pub async fn cluster_remove_node(&self, id: u64) -> Result<ClusterStatus> {
        match self.call(Body::ClusterRemoveNode(pb::ClusterRemoveNode { id })).await? {
            Body::ClusterStatusOk(status) => Ok(status.into()),
            other => Err(unexpected("ClusterStatusOk", &other)),
        }
    }

    /// True while the broker blocks this connection's publishing (flow control): it has
    /// stopped reading from the connection until its memory or disk recovers. Only a
    /// connection that has published is ever blocked.
    pub fn is_blocked(&self) -> bool {
        self.shared().blocked().is_some()
    }

    /// Why the broker blocks this connection's publishing, while it does (e.g. `memory high
    /// watermark: ...`).
    pub fn blocked_reason(&self) -> Option<String> {
        self.shared().blocked()
    }

    /// A receiver of this connection's flow-control state: `Some(reason)` while publishing is
    /// blocked, `None` otherwise. `changed().await` wakes on every block and unblock; the state
    /// goes back to `None` when the connection ends.
    pub fn flow_changes(&self) -> watch::Receiver<Option<String>> {
        self.shared().flow_changes()
    }

    /// Publishes `body` to `queue`.
    ///
    /// The message is queued for sending before this returns, so many publishes can be in
    /// flight without awaiting each. The returned [`PublishConfirm`] resolves with the
    /// broker-assigned message id once the broker holds the message (a delayed message too,
    /// before its delay has passed); dropping it does not withdraw the message. Publishing
    /// never waits: bound the publishes in flight by awaiting their confirms.
    ///
    /// A full queue (see [`QueueOptions::max_length`]) refuses the message: the confirm fails
    /// with `RESOURCE_LIMIT`. While the broker blocks publishers ([`is_blocked`](Self::is_blocked))
    /// confirms simply take longer: they resolve once the block ends.
    pub fn publish(&self, queue: &str, body: impl Into<Bytes>, options: PublishOptions) -> PublishConfirm {
        let publish = pb::Publish {
            queue: queue.to_string(),
            body: body.into(),
            headers: options.headers,
            content_type: options.content_type,
            exchange: String::new(),
            routing_key: String::new(),
            delay_ms: options.delay.map_or(0, wire_ms),
            ttl_ms: options.ttl.map_or(0, wire_ms),
            mandatory: false,
            publish_id: options.publish_id,
        };
        let (reply, response) = oneshot::channel();
        match self.shared().send_request(Body::Publish(publish), PendingRequest::Reply(reply)) {
            Ok(()) => PublishConfirm { state: ConfirmState::Waiting(response) },
            Err(error) => PublishConfirm { state: ConfirmState::Failed(Some(error)) },
        }
    }

    /// Starts consuming from `queue`. Deliveries arrive through the returned [`Consumer`].
    pub async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer> {
        // Deliveries are bounded by the consumer's prefetch window; see `Consumer`.
        let (events_tx, events) = mpsc::unbounded_channel();
        let tracker = Arc::new(DeliveryTracker::default());
        let (reply, response) = oneshot::channel();
        let consume = pb::Consume {
            queue: queue.to_string(),
            prefetch_count: options.prefetch,
            tag: options.tag,
            ack_timeout_ms: options.ack_timeout.map_or(0, wire_ms),
            limit: options.limit.unwrap_or(0),
        };
        let pending = PendingRequest::Consume { reply, events: events_tx, tracker: tracker.clone() };
        self.shared().send_request(Body::Consume(consume), pending)?;
        let answer = PendingConsume { shared: self.shared().clone(), response: Some(response) }.await;
        match answer? {
            Body::ConsumeOk(ok) => Ok(Consumer::new(
                self.clone(),
                ok.consumer_id,
                queue,
                events,
                tracker,
                options.confirm_settlements,
            )),
            other => Err(unexpected("ConsumeOk", &other)),
        }
    }

    /// Reads the broker's audit trail of dead messages (rejected, past their delivery limit,
    /// expired, or pushed out by a length limit), oldest first: the last `limit` events (0 =
    /// the broker's default of 1000) at or after `since_ms` (Unix milliseconds; 0 = all), of
    /// the queue the messages died in, or of every queue when `queue` is `None`.
    pub async fn audit(&self, queue: Option<&str>, since_ms: u64, limit: u32) -> Result<Vec<AuditEvent>> {
        let query = pb::AuditQuery { queue: queue.unwrap_or_default().to_string(), since_ms, limit };
        match self.call(Body::AuditQuery(query)).await? {
            Body::AuditEvents(events) => Ok(events.events.into_iter().map(AuditEvent::from).collect()),
            other => Err(unexpected("AuditEvents", &other)),
        }
    }

    /// Closes the connection: what is already queued is sent, then a `Close` frame, and the
    /// socket is shut once the broker hangs up (or after a grace period). Requests still in
    /// flight get their responses if the broker answers before hanging up, and fail with
    /// [`Error::Closed`] otherwise. Consumer streams end.
    ///
    /// Fails with [`Error::Closed`] only if the connection had already been lost before.
    pub async fn close(&self) -> Result<()> {
        let shared = self.shared();
        shared.begin_close();
        shared.finished.cancelled().await;
        match shared.close_reason() {
            Some(reason) if !reason.by_client => Err(Error::Closed(reason.message)),
            _ => Ok(()),
        }
    }

    /// True once [`close`](Self::close) was called or the connection was lost.
    pub fn is_closed(&self) -> bool {
        self.shared().is_closed()
    }

    /// Waits until the connection has ended: lost, closed by the broker, or closed by this
    /// client.
    pub async fn closed(&self) {
        self.shared().stop.cancelled().await;
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.shared().close_reason().map(|reason| reason.message)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    pub(crate) fn pullers(&self) -> &Pullers {
        &self.inner.pullers
    }

    /// Sends a request and waits for its response.
    pub(crate) async fn call(&self, body: Body) -> Result<Body> {
        let (reply, response) = oneshot::channel();
        self.shared().send_request(body, PendingRequest::Reply(reply))?;
        self.shared().response(response).await
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("server_version", &self.inner.server_version)
            .field("heartbeat", &self.inner.heartbeat)
            .field("max_frame_size", &self.inner.max_frame_size)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The mechanism `options` ask for, made concrete; `None` for the built-in guest.
fn choose_mechanism(options: &ConnectOptions) -> Result<Option<Mechanism>> {
    let tls = options.tls.as_ref();
    let has_certificate = tls.is_some_and(|tls| tls.client_certificate.is_some());
    let has_credentials = options.credentials.is_some();
    let mechanism = match options.mechanism {
        Mechanism::Auto if has_credentials => Mechanism::ScramSha256,
        Mechanism::Auto if has_certificate => Mechanism::External,
        Mechanism::Auto => return Ok(None),
        other => other,
    };
    match mechanism {
        Mechanism::ScramSha256 | Mechanism::Plain if !has_credentials => Err(Error::Authentication(format!(
            "{} needs credentials (a user and password)",
            mechanism.name()
        ))),
        // The password would be readable by anyone on the path: refuse before sending it.
        Mechanism::Plain if tls.is_none() => Err(Error::Authentication(
            "PLAIN sends the password readable and is used only over TLS (ConnectOptions::tls); \
             use SCRAM-SHA-256 over plain TCP"
                .into(),
        )),
        other => Ok(Some(other)),
    }
}

/// Sends `Hello`, logs in, and waits for the broker's answer.
async fn handshake<R, W>(
    frames: &mut FramedRead<R, FrameCodec>,
    write: &mut W,
    options: &ConnectOptions,
) -> Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let server_name = options.tls.as_ref().map_or("", |tls| tls.server_name.as_str());
    let (mechanism, auth, mut scram) = match (choose_mechanism(options)?, &options.credentials) {
        (Some(Mechanism::ScramSha256), Some(credentials)) => {
            let (client, first) = scram::Client::start(&credentials.user);
            (scram::MECHANISM, first.into_bytes(), Some(Login::Started(client)))
        }
        (Some(Mechanism::Plain), Some(credentials)) => {
            // RFC 4616: authzid NUL authcid NUL password, with no authzid.
            let response = format!("\0{}\0{}", credentials.user, credentials.password);
            (Mechanism::Plain.name(), response.into_bytes(), None)
        }
        (Some(Mechanism::External), _) => (Mechanism::External.name(), Vec::new(), None),
        _ => ("", Vec::new(), None),
    };
    let hello = Body::Hello(pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: options.client_name.clone(),
        heartbeat_ms: options.heartbeat_ms(),
        max_frame_size: options.max_frame_size,
        mechanism: mechanism.to_string(),
        auth: auth.into(),
    });
    send_handshake_frame(write, hello).await?;

    let ok = loop {
        let body = match frames.next().await {
            Some(Ok(Inbound::Frame(Frame { body: Some(body), .. }))) => body,
            Some(Ok(other)) => {
                return Err(Error::Protocol(format!("invalid frame during the handshake: {other:?}")))
            }
            // Over TLS, a broker that refuses the client certificate says so only now.
            Some(Err(hopper_proto::ProtoError::Io(err))) => {
                return Err(Error::Io(tls::explain(err, server_name)))
            }
            Some(Err(err)) => return Err(Error::Protocol(err.to_string())),
            None => {
                return Err(Error::Closed("the broker closed the connection during the handshake".into()))
            }
        };
        match body {
            Body::HelloOk(ok) => break ok,
            Body::AuthChallenge(challenge) => {
                let (Some(Login::Started(client)), Some(credentials)) = (scram.take(), &options.credentials)
                else {
                    return Err(Error::Protocol("the broker sent an unexpected AuthChallenge".into()));
                };
                let server_first = std::str::from_utf8(&challenge.challenge)
                    .map_err(|_| Error::Protocol("the broker's challenge is not UTF-8".into()))?;
                let (last, client_final) = client
                    .respond(server_first, &credentials.password)
                    .map_err(|e| Error::Authentication(e.to_string()))?;
                scram = Some(Login::Answered(last));
                let response =
                    Body::AuthResponse(pb::AuthResponse { response: client_final.into_bytes().into() });
                send_handshake_frame(write, response).await?;
            }
            Body::HelloRejected(rejected) => {
                if hopper_proto::error_code(rejected.code) == ErrorCode::Unauthenticated {
                    return Err(Error::Authentication(rejected.message));
                }
                return Err(Error::HandshakeRejected {
                    message: rejected.message,
                    min_version: rejected.min_version,
                    max_version: rejected.max_version,
                });
            }
            Body::Error(error) => return Err(Error::from_frame(error)),
            Body::Close(close) => {
                return Err(Error::Closed(format!("the broker closed the connection: {}", close.reason)))
            }
            Body::Heartbeat(_) => continue,
            other => {
                return Err(Error::Protocol(format!("expected HelloOk, got {}", body_name(&other))));
            }
        }
    };
    match scram {
        // The broker proves it holds this user's verifier: a man in the middle cannot.
        Some(Login::Answered(last)) => {
            let server_final = std::str::from_utf8(&ok.auth)
                .map_err(|_| Error::Authentication("the broker's final message is not UTF-8".into()))?;
            last.finish(server_final).map_err(|e| Error::Authentication(e.to_string()))?;
        }
        Some(Login::Started(_)) => {
            return Err(Error::Authentication(
                "the broker accepted the login without checking the password".into(),
            ))
        }
        None => {}
    }
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&ok.protocol_version) {
        return Err(Error::Protocol(format!(
            "the broker answered with protocol version {}, this client speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
            ok.protocol_version
        )));
    }
    let max_frame_size = match (ok.max_frame_size, options.max_frame_size) {
        (0, 0) => DEFAULT_MAX_FRAME_SIZE,
        (0, ours) => ours,
        (negotiated, _) => negotiated,
    };
    Ok(Negotiated {
        user: ok.user,
        server_version: ok.server_version,
        heartbeat: Duration::from_millis(ok.heartbeat_ms.into()),
        max_frame_size,
    })
}

/// Where a SCRAM login stands on the client's side.
enum Login {
    Started(scram::Client),
    Answered(scram::ClientFinal),
}

/// Writes one handshake frame under the Hello's request id.
async fn send_handshake_frame<W: AsyncWrite + Unpin>(write: &mut W, body: Body) -> Result<()> {
    let mut buf = BytesMut::new();
    encode_frame(&Frame::new(HELLO_REQUEST_ID, body), HANDSHAKE_MAX_FRAME_SIZE, &mut buf).map_err(|err| {
        Error::Protocol(format!(
            "the handshake frame does not fit the handshake limit (client name too long?): {err}"
        ))
    })?;
    write.write_all(&buf).await?;
    // TLS keeps written bytes in its buffer until flushed.
    write.flush().await?;
    Ok(())
}

/// Waits for the answer to a `Consume`. If the caller gives up first, the consumer the broker
/// may have created is cancelled, since nobody would ever read or cancel it.
struct PendingConsume {
    shared: Arc<Shared>,
    response: Option<oneshot::Receiver<Result<Body>>>,
}

impl Future for PendingConsume {
    type Output = Result<Body>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = self.response.as_mut().expect("polled after completion");
        let result = match std::task::ready!(response.poll_unpin(cx)) {
            Ok(result) => result,
            Err(_) => Err(self.shared.closed_error()),
        };
        self.response = None;
        Poll::Ready(result)
    }
}

impl Drop for PendingConsume {
    fn drop(&mut self) {
        if let Some(mut response) = self.response.take() {
            // Once closed, the reader's hand-over fails and the reader cancels the consumer
            // itself; an answer that arrived before is ours to clean up.
            response.close();
            if let Ok(Ok(Body::ConsumeOk(ok))) = response.try_recv() {
                cancel_detached(&self.shared, ok.consumer_id);
            }
        }
    }
}

/// The broker's confirmation of a publish: resolves with the message id the broker assigned,
/// or with the error that prevented the publish.
#[must_use = "a publish is confirmed (or refused) through this future"]
pub struct PublishConfirm {
    pub(crate) state: ConfirmState,
}

pub(crate) enum ConfirmState {
    Waiting(oneshot::Receiver<Result<Body>>),
    /// Refused before sending; the error is handed out on first poll.
    Failed(Option<Error>),
}

impl Future for PublishConfirm {
    type Output = Result<u64>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            ConfirmState::Waiting(response) => {
                Poll::Ready(match std::task::ready!(response.poll_unpin(cx)) {
                    Ok(Ok(Body::PublishOk(ok))) => Ok(ok.message_id),
                    Ok(Ok(other)) => Err(unexpected("PublishOk", &other)),
                    Ok(Err(error)) => Err(error),
                    Err(_) => {
                        Err(Error::Closed("the connection closed before the publish was confirmed".into()))
                    }
                })
            }
            ConfirmState::Failed(error) => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| Error::Protocol("confirm polled twice".into())))),
        }
    }
}

impl fmt::Debug for PublishConfirm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            ConfirmState::Waiting(_) => "waiting",
            ConfirmState::Failed(_) => "failed",
        };
        f.debug_struct("PublishConfirm").field("state", &state).finish()
    }
}
