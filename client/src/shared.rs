//! State shared by a connection's handles and its reader and writer tasks: the outgoing
//! buffer, the table of requests awaiting a response, and how the connection ended.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use hopper_proto::{encode_frame, pb, Body, ErrorCode, Frame, ProtoError};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::consumer::ConsumerEvent;
use crate::error::{Error, Result};
use crate::events::EventRoute;
use crate::tracker::DeliveryTracker;

/// Request id of the `Hello` frame; requests made through [`Shared`] start after it.
pub(crate) const HELLO_REQUEST_ID: u64 = 1;

/// Where the response to a request goes.
pub(crate) type Reply = oneshot::Sender<Result<Body>>;

/// A request sent and not yet answered.
pub(crate) enum PendingRequest {
    /// A plain request: the response (or error) goes to the caller.
    Reply(Reply),
    /// A `Consume`: on `ConsumeOk` the reader registers `events` and `tracker` under the new
    /// consumer id before it reads the next frame, so no delivery (or expiry) can arrive ahead
    /// of the registration.
    Consume { reply: Reply, events: mpsc::UnboundedSender<ConsumerEvent>, tracker: Arc<DeliveryTracker> },
    /// A `Cancel`: whatever the answer, the reader forgets the consumer. `reply` is `None` when
    /// a dropped [`Consumer`](crate::Consumer) cancels itself.
    Cancel { consumer_id: u64, reply: Option<Reply> },
    /// A `Subscribe`: on `SubscribeOk` the reader adds `route` to the event streams before it
    /// reads the next frame, so no event that follows the answer is missed.
    Subscribe { reply: Reply, route: EventRoute },
}

impl PendingRequest {
    /// Resolves the request with `error` (the connection ended before it was answered).
    pub(crate) fn fail(self, error: Error) {
        let reply = match self {
            PendingRequest::Reply(reply)
            | PendingRequest::Consume { reply, .. }
            | PendingRequest::Subscribe { reply, .. } => Some(reply),
            PendingRequest::Cancel { reply, .. } => reply,
        };
        if let Some(reply) = reply {
            let _ = reply.send(Err(error));
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone)]
pub(crate) struct CloseReason {
    /// Human-readable cause, carried by [`Error::Closed`].
    pub(crate) message: String,
    /// True when this client asked for the close: consumer streams then end quietly instead of
    /// yielding an error.
    pub(crate) by_client: bool,
}

impl CloseReason {
    pub(crate) fn by_client() -> Self {
        CloseReason { message: "the client closed the connection".into(), by_client: true }
    }

    pub(crate) fn lost(message: impl Into<String>) -> Self {
        CloseReason { message: message.into(), by_client: false }
    }
}

/// Lifecycle of the outgoing buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboxState {
    /// Frames are accepted.
    Open,
    /// The client is closing: a `Close` frame is the last thing in the buffer; the writer
    /// sends what is left and then shuts the socket's write side.
    Closing,
    /// The connection is finished; nothing more is sent.
    Stopped,
}

/// Frames encoded and waiting for the writer.
struct Outbox {
    buf: BytesMut,
    state: OutboxState,
}

/// Requests awaiting a response.
struct Requests {
    map: HashMap<u64, PendingRequest>,
    /// Set once no new request may be registered. Checked under the same lock that drains
    /// `map`, so a request is either answered, failed by the drain, or refused up front.
    closed: Option<CloseReason>,
}

/// The state behind one connection.
pub(crate) struct Shared {
    max_frame_size: u32,
    next_request_id: AtomicU64,
    /// Callers encode frames straight into this buffer; the writer swaps it out and sends the
    /// whole batch with one write. Encoding here, rather than queueing `Frame`s, lets an
    /// oversize frame fail in the caller before anything is registered or sent.
    ///
    /// Not bounded by itself: publishes are bounded by the confirms a producer keeps in flight
    /// (each publish is answered), settles by consumers' prefetch windows.
    outbox: Mutex<Outbox>,
    /// Wakes the writer when the outbox goes from empty to non-empty, or on close.
    pub(crate) wake_writer: Notify,
    requests: Mutex<Requests>,
    closed: AtomicBool,
    /// Set by the reader whenever a frame arrives; the writer's heartbeat tick takes it.
    received: AtomicBool,
    /// Cancelled when the client starts closing.
    pub(crate) closing: CancellationToken,
    /// Cancelled when the connection is over: reader and writer stop at once.
    pub(crate) stop: CancellationToken,
    /// Cancelled when the reader has exited and every consumer stream has been ended.
    pub(crate) finished: CancellationToken,
    /// `Some(reason)` while the broker blocks this connection's publishing (flow control), as
    /// the reader last heard.
    blocked: watch::Sender<Option<String>>,
    /// Delivery trackers of this connection's pull consumers, by consumer id, so the reader can
    /// mark pulled deliveries expired.
    pub(crate) pull_trackers: Mutex<HashMap<u64, std::sync::Weak<crate::tracker::DeliveryTracker>>>,
}

impl Shared {
    pub(crate) fn new(max_frame_size: u32) -> Self {
        Shared {
            pull_trackers: Mutex::new(HashMap::new()),
            max_frame_size,
            next_request_id: AtomicU64::new(HELLO_REQUEST_ID + 1),
            outbox: Mutex::new(Outbox { buf: BytesMut::with_capacity(64 * 1024), state: OutboxState::Open }),
            wake_writer: Notify::new(),
            requests: Mutex::new(Requests { map: HashMap::new(), closed: None }),
            closed: AtomicBool::new(false),
            received: AtomicBool::new(false),
            closing: CancellationToken::new(),
            stop: CancellationToken::new(),
            finished: CancellationToken::new(),
            blocked: watch::channel(None).0,
        }
    }

    /// Why the broker blocks this connection's publishing, if it does.
    pub(crate) fn blocked(&self) -> Option<String> {
        self.blocked.borrow().clone()
    }

    /// A receiver that sees every change of [`blocked`](Self::blocked).
    pub(crate) fn flow_changes(&self) -> watch::Receiver<Option<String>> {
        self.blocked.subscribe()
    }

    /// Records a flow-control change; watchers are woken only when it is one.
    pub(crate) fn set_blocked(&self, reason: Option<String>) {
        self.blocked.send_if_modified(|current| {
            if *current == reason {
                return false;
            }
            *current = reason;
            true
        });
    }

    /// True once the client started closing or the connection ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// How the connection ended (or is ending), if it did.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        self.requests.lock().closed.clone()
    }

    /// The error for an operation attempted on a closed connection.
    pub(crate) fn closed_error(&self) -> Error {
        let message = self.close_reason().map_or_else(|| "connection closed".to_string(), |r| r.message);
        Error::Closed(message)
    }

    /// Sends a request whose response will be routed to `entry`.
    pub(crate) fn send_request(&self, body: Body, entry: PendingRequest) -> Result<()> {
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut requests = self.requests.lock();
            if let Some(reason) = &requests.closed {
                return Err(Error::Closed(reason.message.clone()));
            }
            requests.map.insert(id, entry);
        }
        // Registered before it is encoded: the writer cannot see the frame (and the broker
        // cannot answer it) before the entry exists.
        if let Err(err) = self.enqueue(&Frame::new(id, body)) {
            self.requests.lock().map.remove(&id);
            return Err(err);
        }
        Ok(())
    }

    /// Waits for the response registered with [`send_request`](Self::send_request).
    pub(crate) async fn response(&self, response: oneshot::Receiver<Result<Body>>) -> Result<Body> {
        match response.await {
            Ok(result) => result,
            // Every path that drops a reply sends on it first; this is only a fallback.
            Err(_) => Err(self.closed_error()),
        }
    }

    /// Sends a request that has no success response (`Ack`, `Nack`, `Reject` without
    /// `confirm`). A fresh request
    /// id still goes with it so that an error the broker sends back can be told apart; the
    /// reader logs such an error because nothing is waiting for it.
    pub(crate) fn send_untracked(&self, body: Body) -> Result<()> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        self.enqueue(&Frame::new(id, body))
    }

    /// Sends an event (request id 0), e.g. a heartbeat.
    pub(crate) fn send_event(&self, body: Body) -> Result<()> {
        self.enqueue(&Frame::event(body))
    }

    /// Encodes `frame` into the outbox and wakes the writer if it may be idle.
    fn enqueue(&self, frame: &Frame) -> Result<()> {
        let mut outbox = self.outbox.lock();
        if outbox.state != OutboxState::Open {
            drop(outbox);
            return Err(self.closed_error());
        }
        let was_empty = outbox.buf.is_empty();
        encode_frame(frame, self.max_frame_size, &mut outbox.buf).map_err(|err| match err {
            ProtoError::FrameTooLarge { len, max } => Error::FrameTooLarge { len, max },
            ProtoError::Io(err) => Error::Io(err),
        })?;
        drop(outbox);
        if was_empty {
            self.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Swaps the outbox's buffer with `spare` (which must be empty) and returns the outbox's
    /// state at that moment.
    pub(crate) fn take_outgoing(&self, spare: &mut BytesMut) -> OutboxState {
        debug_assert!(spare.is_empty());
        let mut outbox = self.outbox.lock();
        std::mem::swap(&mut outbox.buf, spare);
        outbox.state
    }

    /// Removes and returns the request `id` is answering.
    pub(crate) fn take_request(&self, id: u64) -> Option<PendingRequest> {
        self.requests.lock().map.remove(&id)
    }

    /// Records that a frame arrived (the broker is alive).
    pub(crate) fn mark_received(&self) {
        self.received.store(true, Ordering::Relaxed);
    }

    /// Whether a frame arrived since the last call.
    pub(crate) fn take_received(&self) -> bool {
        self.received.swap(false, Ordering::Relaxed)
    }

    /// Starts a client-initiated close: new requests are refused, a `Close` frame goes after
    /// everything already queued, and requests in flight may still be answered until the
    /// broker hangs up. Does nothing if the connection is already closing or closed.
    pub(crate) fn begin_close(&self) {
        {
            let mut requests = self.requests.lock();
            if requests.closed.is_some() {
                return;
            }
            requests.closed = Some(CloseReason::by_client());
        }
        self.closed.store(true, Ordering::Release);
        {
            let mut outbox = self.outbox.lock();
            if outbox.state == OutboxState::Open {
                let close = Frame::event(Body::Close(pb::Close {
                    code: ErrorCode::Unspecified as i32,
                    reason: "client closing".into(),
                }));
                encode_frame(&close, self.max_frame_size, &mut outbox.buf)
                    .expect("a Close frame is far below any max frame size");
                outbox.state = OutboxState::Closing;
            }
        }
        self.wake_writer.notify_one();
        self.closing.cancel();
    }

    /// Ends the connection: every request still waiting fails with [`Error::Closed`], nothing
    /// more is sent, and the reader and writer stop. The first reason recorded wins (a close
    /// the client started stays a client close); the one in force is returned.
    pub(crate) fn shut_down(&self, reason: CloseReason) -> CloseReason {
        let (reason, waiting) = {
            let mut requests = self.requests.lock();
            let reason = requests.closed.get_or_insert(reason).clone();
            (reason, std::mem::take(&mut requests.map))
        };
        self.closed.store(true, Ordering::Release);
        {
            let mut outbox = self.outbox.lock();
            outbox.state = OutboxState::Stopped;
            outbox.buf = BytesMut::new();
        }
        self.stop.cancel();
        for (_, request) in waiting {
            request.fail(Error::Closed(reason.message.clone()));
        }
        reason
    }
}

/// The name of a frame body, for logs and protocol errors.
pub(crate) fn body_name(body: &Body) -> &'static str {
    body.name()
}

/// The error for a response of the wrong kind.
pub(crate) fn unexpected(expected: &str, got: &Body) -> Error {
    Error::Protocol(format!("expected {expected} in response, got {}", body_name(got)))
}

#[cfg(test)]
mod tests {
    use hopper_proto::{FrameDecoder, Inbound};

    use super::*;

    fn drain(shared: &Shared) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        shared.take_outgoing(&mut buf);
        let mut decoder = FrameDecoder::new(u32::MAX);
        let mut frames = Vec::new();
        while let Some(Inbound::Frame(frame)) = decoder.decode(&mut buf) {
            frames.push(frame);
        }
        frames
    }

    #[test]
    fn requests_get_distinct_ids_and_are_registered() {
        let shared = Shared::new(1024);
        let (tx1, _rx1) = oneshot::channel();
        let (tx2, _rx2) = oneshot::channel();
        shared.send_request(Body::QueueList(pb::QueueList {}), PendingRequest::Reply(tx1)).unwrap();
        shared.send_request(Body::QueueList(pb::QueueList {}), PendingRequest::Reply(tx2)).unwrap();
        let frames = drain(&shared);
        assert_eq!(frames.len(), 2);
        assert_ne!(frames[0].request_id, frames[1].request_id);
        assert!(frames.iter().all(|f| f.request_id > HELLO_REQUEST_ID));
        assert!(shared.take_request(frames[0].request_id).is_some());
        assert!(shared.take_request(frames[0].request_id).is_none());
    }

    #[test]
    fn oversize_frame_is_refused_and_not_registered() {
        let shared = Shared::new(64);
        let (tx, _rx) = oneshot::channel();
        let publish = Body::Publish(pb::Publish {
            queue: "q".into(),
            body: vec![0u8; 100].into(),
            ..Default::default()
        });
        let err = shared.send_request(publish, PendingRequest::Reply(tx)).unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { max: 64, .. }), "{err}");
        assert!(drain(&shared).is_empty());
        assert!(shared.requests.lock().map.is_empty());
    }

    #[test]
    fn shut_down_fails_waiting_requests_and_refuses_new_ones() {
        let shared = Shared::new(1024);
        let (tx, mut rx) = oneshot::channel();
        shared.send_request(Body::QueueList(pb::QueueList {}), PendingRequest::Reply(tx)).unwrap();
        let reason = shared.shut_down(CloseReason::lost("broker went away"));
        assert!(!reason.by_client);
        assert!(matches!(rx.try_recv(), Ok(Err(Error::Closed(m))) if m == "broker went away"));
        let (tx, _rx) = oneshot::channel();
        let err =
            shared.send_request(Body::QueueList(pb::QueueList {}), PendingRequest::Reply(tx)).unwrap_err();
        assert!(matches!(err, Error::Closed(m) if m == "broker went away"));
        assert!(shared.send_untracked(Body::Heartbeat(pb::Heartbeat {})).is_err());
        assert!(shared.is_closed());
    }

    #[test]
    fn flow_changes_are_seen_once_each() {
        let shared = Shared::new(1024);
        let mut changes = shared.flow_changes();
        assert_eq!(shared.blocked(), None);
        shared.set_blocked(Some("memory".into()));
        assert!(changes.has_changed().unwrap());
        assert_eq!(changes.borrow_and_update().as_deref(), Some("memory"));
        shared.set_blocked(Some("memory".into()));
        assert!(!changes.has_changed().unwrap(), "the same state again is no change");
        shared.set_blocked(None);
        assert!(changes.has_changed().unwrap());
        assert_eq!(shared.blocked(), None);
    }

    #[test]
    fn client_close_queues_close_last_and_keeps_its_reason() {
        let shared = Shared::new(1024);
        let (tx, mut rx) = oneshot::channel();
        shared.send_request(Body::QueueList(pb::QueueList {}), PendingRequest::Reply(tx)).unwrap();
        shared.begin_close();
        let frames = drain(&shared);
        assert!(matches!(frames.last().and_then(|f| f.body.as_ref()), Some(Body::Close(_))));
        assert_eq!(shared.take_outgoing(&mut BytesMut::new()), OutboxState::Closing);
        // A later failure does not turn the client's close into an unexpected one.
        let reason = shared.shut_down(CloseReason::lost("eof"));
        assert!(reason.by_client);
        assert!(matches!(rx.try_recv(), Ok(Err(Error::Closed(_)))));
    }
}
