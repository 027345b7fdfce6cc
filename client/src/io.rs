//! The two tasks behind every connection: the writer sends the outbox in batches and keeps
//! heartbeats going, the reader routes responses to waiting requests and deliveries to
//! consumers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use futures::{FutureExt as _, StreamExt as _};
use hopper_proto::{
    decode_frame, deliver_event_offset, error_code, pb, Body, Frame, FrameCodec, Inbound, ProtoError,
    RawFrameCodec, RawInbound,
};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::codec::FramedRead;
use tracing::{debug, warn, Instrument as _, Span};

use crate::consumer::ConsumerEvent;
use crate::error::Error;
use crate::events::EventRoute;
use crate::info::block_reason;
use crate::shared::{body_name, CloseReason, OutboxState, PendingRequest, Shared};
use crate::tracker::DeliveryTracker;

/// Size of the reader's buffer: many small frames arrive per read.
pub(crate) const READ_BUFFER: usize = 64 * 1024;
/// A write buffer grown past this by a burst is given back after it is flushed.
const RETAINED_WRITE_BUFFER: usize = 4 * 1024 * 1024;
/// How long a closing client waits for the broker to answer what is in flight and hang up.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Most frames the reader handles per wake-up before it looks at its other events again.
const READ_BATCH: usize = 256;

/// Starts the reader and writer of a connection whose handshake is done. Generic over the
/// halves: plain TCP's owned halves, or the halves of a TLS stream.
pub(crate) fn spawn<R, W>(
    shared: Arc<Shared>,
    frames: FramedRead<R, FrameCodec>,
    write: W,
    heartbeat: Duration,
    span: Span,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let writer = Writer {
        shared: shared.clone(),
        write,
        buf: BytesMut::with_capacity(64 * 1024),
        ticker: liveness_ticker(heartbeat),
        liveness: Liveness::default(),
        heartbeat,
        wrote: false,
    };
    tokio::spawn(writer.run().instrument(span.clone()));
    let reader = Reader {
        shared,
        frames: frames.map_decoder(RawFrameCodec::from),
        consumers: HashMap::new(),
        with_pending: Vec::new(),
        events: Vec::new(),
        last_error: None,
    };
    tokio::spawn(reader.run().instrument(span));
}

/// Ticks every half heartbeat interval, or never when heartbeats are off.
fn liveness_ticker(heartbeat: Duration) -> Option<Interval> {
    if heartbeat.is_zero() {
        return None;
    }
    let period = heartbeat / Liveness::TICKS_PER_INTERVAL;
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    Some(ticker)
}

async fn next_tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// What a heartbeat tick calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tick {
    /// Nothing to do.
    Idle,
    /// Nothing was written lately: send a heartbeat so the broker knows we are alive.
    SendHeartbeat,
    /// Nothing was received for two intervals: the broker is gone.
    Dead,
}

/// Heartbeat bookkeeping, ticked every half interval (so the checks are at most half an
/// interval late) with whether anything was received and written since the previous tick.
#[derive(Debug, Default)]
struct Liveness {
    silent_ticks: u32,
}

impl Liveness {
    const TICKS_PER_INTERVAL: u32 = 2;
    /// Two intervals without a frame from the broker.
    const DEAD_AFTER_TICKS: u32 = 2 * Self::TICKS_PER_INTERVAL;

    fn on_tick(&mut self, received: bool, wrote: bool) -> Tick {
        self.silent_ticks = if received { 0 } else { self.silent_ticks + 1 };
        if self.silent_ticks >= Self::DEAD_AFTER_TICKS {
            Tick::Dead
        } else if wrote {
            Tick::Idle
        } else {
            // Idle for at least half an interval: the broker sees a frame at least once per
            // interval, well inside its two-interval limit.
            Tick::SendHeartbeat
        }
    }
}

/// Sends the outbox in batches.
struct Writer<W> {
    shared: Arc<Shared>,
    write: W,
    /// The batch being written; swapped with the outbox's buffer.
    buf: BytesMut,
    ticker: Option<Interval>,
    liveness: Liveness,
    heartbeat: Duration,
    /// Whether anything was written since the last tick.
    wrote: bool,
}

/// The writer cannot go on (stopped or failed); the connection is already shut down.
struct Stopped;

impl<W: AsyncWrite + Unpin> Writer<W> {
    async fn run(mut self) {
        loop {
            let state = self.shared.take_outgoing(&mut self.buf);
            if !self.buf.is_empty() {
                if self.flush().await.is_err() {
                    return;
                }
                continue;
            }
            match state {
                OutboxState::Open => {}
                OutboxState::Closing => {
                    // Everything, the Close frame last, is out: half-close and let the reader
                    // wait for the broker to hang up.
                    let _ = self.write.shutdown().await;
                    debug!("sent close");
                    return;
                }
                OutboxState::Stopped => return,
            }
            tokio::select! {
                biased;
                _ = self.shared.stop.cancelled() => return,
                _ = self.shared.wake_writer.notified() => {}
                _ = next_tick(&mut self.ticker) => {
                    if self.on_tick().is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Checks liveness and queues a heartbeat if nothing was written lately.
    fn on_tick(&mut self) -> Result<(), Stopped> {
        let received = self.shared.take_received();
        match self.liveness.on_tick(received, std::mem::take(&mut self.wrote)) {
            Tick::Idle => Ok(()),
            Tick::SendHeartbeat => {
                // Queued like any frame; the main loop picks it up right away.
                let _ = self.shared.send_event(Body::Heartbeat(pb::Heartbeat {}));
                Ok(())
            }
            Tick::Dead => Err(broker_silent(&self.shared, self.heartbeat)),
        }
    }

    /// Writes `buf` out, watching for a stop and for the broker going silent meanwhile.
    async fn flush(&mut self) -> Result<(), Stopped> {
        let result = {
            let (socket, buf) = (&mut self.write, &self.buf);
            // TLS keeps the last records of a batch in its buffer while the socket is full;
            // flushed, the batch is on the socket before the writer sleeps (a no-op for TCP).
            let write = async move {
                socket.write_all(buf).await?;
                socket.flush().await
            };
            tokio::pin!(write);
            loop {
                tokio::select! {
                    biased;
                    _ = self.shared.stop.cancelled() => return Err(Stopped),
                    result = &mut write => break result,
                    _ = next_tick(&mut self.ticker) => {
                        // Busy writing, so no heartbeat is needed; only check the broker is alive.
                        let received = self.shared.take_received();
                        if self.liveness.on_tick(received, true) == Tick::Dead {
                            return Err(broker_silent(&self.shared, self.heartbeat));
                        }
                    }
                }
            }
        };
        if let Err(err) = result {
            debug!(error = %err, "write failed");
            self.shared.shut_down(CloseReason::lost(format!("writing to the broker failed: {err}")));
            return Err(Stopped);
        }
        self.wrote = true;
        if self.buf.capacity() > RETAINED_WRITE_BUFFER {
            self.buf = BytesMut::with_capacity(64 * 1024);
        } else {
            self.buf.clear();
        }
        Ok(())
    }
}

/// Ends the connection because the broker stopped sending.
fn broker_silent(shared: &Shared, heartbeat: Duration) -> Stopped {
    let silence = heartbeat * 2;
    warn!(?silence, "broker unresponsive, closing the connection");
    shared.shut_down(CloseReason::lost(format!(
        "no frame from the broker for {silence:?} (heartbeat timeout)"
    )));
    Stopped
}

/// Routes incoming frames.
struct Reader<R> {
    shared: Arc<Shared>,
    /// Frames are decoded by the reader, so that deliveries can take a shorter way.
    frames: FramedRead<R, RawFrameCodec>,
    /// This connection's consumers. Only the reader touches the map, so routing a delivery
    /// takes no lock.
    consumers: HashMap<u64, Route>,
    /// Consumers whose `pending` deliveries are not handed over yet, in the order of their
    /// first pending delivery.
    with_pending: Vec<u64>,
    /// The event streams of this connection; the broker sends one copy of each event, the
    /// reader hands it to every stream.
    events: Vec<EventRoute>,
    /// The last connection-level error the broker sent, to explain a hang-up that follows.
    last_error: Option<String>,
}

/// Where the reader sends what concerns one consumer.
struct Route {
    /// Deliveries and the end of the stream.
    events: mpsc::UnboundedSender<ConsumerEvent>,
    /// Expiries and cancellations, recorded at once so that settles see them even before
    /// the stream is read.
    tracker: Arc<DeliveryTracker>,
    /// Deliveries read in the current batch of frames, handed over together when the batch
    /// ends: one channel send, and at most one wake-up of the consumer, per batch rather than
    /// per delivery.
    pending: Vec<pb::Deliver>,
    /// Size of the last batch handed over, to size the next one's buffer up front.
    last_batch: usize,
}

impl Route {
    fn new(events: mpsc::UnboundedSender<ConsumerEvent>, tracker: Arc<DeliveryTracker>) -> Self {
        Route { events, tracker, pending: Vec::new(), last_batch: 0 }
    }
}

/// One read off the wire, as `FramedRead` yields it.
type ReadItem = Option<Result<RawInbound, ProtoError>>;

/// What woke the reader.
enum Wake {
    Stopped,
    Closing,
    GraceOver,
    Read(ReadItem),
}

impl<R: AsyncRead + Unpin> Reader<R> {
    async fn run(mut self) {
        let reason = self.read_until_closed().await;
        let reason = self.shared.shut_down(reason);
        for (_, route) in self.consumers.drain() {
            // A close the client asked for ends consumer streams quietly.
            if !reason.by_client {
                let _ = route.events.send(ConsumerEvent::Closed(reason.message.clone()));
            }
        }
        // Event streams end when their route is dropped and read the reason from `shared`.
        self.events.clear();
        // A closed connection is blocked no more; whoever waits for the block to end can stop.
        self.shared.set_blocked(None);
        debug!(reason = %reason.message, "connection closed");
        self.shared.finished.cancel();
    }

    async fn read_until_closed(&mut self) -> CloseReason {
        let stop = self.shared.stop.clone();
        let closing = self.shared.closing.clone();
        let stopped = stop.cancelled();
        let closing_started = closing.cancelled();
        tokio::pin!(stopped, closing_started);
        let mut grace_until = None;
        loop {
            let wake = tokio::select! {
                biased;
                _ = &mut stopped => Wake::Stopped,
                _ = &mut closing_started, if grace_until.is_none() => Wake::Closing,
                _ = sleep_until(grace_until) => Wake::GraceOver,
                item = self.frames.next() => Wake::Read(item),
            };
            match wake {
                Wake::Stopped => {
                    return self
                        .shared
                        .close_reason()
                        .unwrap_or_else(|| CloseReason::lost("connection stopped"))
                }
                Wake::Closing => grace_until = Some(Instant::now() + CLOSE_GRACE),
                Wake::GraceOver => {
                    return CloseReason::lost("the broker did not hang up after the client's close")
                }
                Wake::Read(mut item) => {
                    self.shared.mark_received();
                    // Handle every frame already buffered before going back to the select:
                    // polling the cancellation futures takes a lock, worth paying per batch
                    // but not per frame.
                    let mut handled = 0;
                    loop {
                        if let Some(reason) = self.handle(item) {
                            return reason;
                        }
                        handled += 1;
                        if handled == READ_BATCH {
                            break;
                        }
                        match self.frames.next().now_or_never() {
                            Some(next) => item = next,
                            None => break,
                        }
                    }
                    self.hand_over();
                }
            }
        }
    }

    /// Handles one read; returns why the connection ends if it does.
    fn handle(&mut self, item: ReadItem) -> Option<CloseReason> {
        let inbound = match item {
            Some(Ok(RawInbound::Frame(mut frame))) => match deliver_event_offset(&frame) {
                // Most frames are deliveries: decoded on their own, they skip building a
                // `Frame` and moving the delivery out of it.
                Some(offset) => {
                    frame.advance(offset);
                    match pb::Deliver::decode(frame) {
                        Ok(deliver) => {
                            self.hold(deliver);
                            return None;
                        }
                        Err(error) => Inbound::Malformed { request_id: 0, error },
                    }
                }
                None => decode_frame(frame),
            },
            Some(Ok(RawInbound::Oversize { request_id, len })) => Inbound::Oversize { request_id, len },
            Some(Err(err)) => {
                self.hand_over();
                return Some(CloseReason::lost(format!("reading from the broker failed: {err}")));
            }
            None => {
                self.hand_over();
                return Some(CloseReason::lost(match self.last_error.take() {
                    Some(error) => format!("the broker closed the connection after an error: {error}"),
                    None => "the broker closed the connection".to_string(),
                }));
            }
        };
        // Anything else may end a consumer or answer a request about it: the deliveries read
        // before it go first, so every stream sees frames in the order they arrived.
        self.hand_over();
        match inbound {
            Inbound::Frame(frame) => self.handle_frame(frame),
            Inbound::Oversize { request_id, len } => {
                warn!(request_id, len, "broker sent a frame over the max frame size; skipped");
                if let Some(request) = self.shared.take_request(request_id) {
                    let error = format!("the broker's response of {len} bytes exceeds the max frame size");
                    self.complete(request, Err(Error::Protocol(error)));
                }
                None
            }
            Inbound::Malformed { request_id, error } => {
                warn!(request_id, %error, "broker sent a malformed frame; skipped");
                if let Some(request) = self.shared.take_request(request_id) {
                    self.complete(
                        request,
                        Err(Error::Protocol(format!("the broker's response is malformed: {error}"))),
                    );
                }
                None
            }
        }
    }

    fn handle_frame(&mut self, frame: Frame) -> Option<CloseReason> {
        let Frame { request_id, body } = frame;
        let Some(body) = body else {
            warn!(request_id, "broker sent a frame without a body; skipped");
            return None;
        };
        if request_id == 0 {
            return self.handle_event(body);
        }
        let Some(request) = self.shared.take_request(request_id) else {
            match body {
                // Unconfirmed acks, nacks and rejects have no success response: an error is all
                // that can come back for them, and nothing waits for it.
                Body::Error(error) => warn!(
                    request_id,
                    code = error_code(error.code).as_str_name(),
                    message = %error.message,
                    "broker refused a request that has no response (ack, nack or reject)"
                ),
                other => {
                    warn!(request_id, frame = body_name(&other), "response to an unknown request; ignored")
                }
            }
            return None;
        };
        let result = match body {
            Body::Error(error) => Err(Error::from_frame(error)),
            body => Ok(body),
        };
        self.complete(request, result);
        None
    }

    /// Keeps a delivery until the end of the batch of frames being read.
    fn hold(&mut self, deliver: pb::Deliver) {
        let consumer_id = deliver.consumer_id;
        let Some(route) = self.consumers.get_mut(&consumer_id) else {
            debug!(consumer_id, "delivery for a consumer that is gone; dropped");
            return;
        };
        if route.pending.is_empty() {
            self.with_pending.push(consumer_id);
            route.pending.reserve(route.last_batch.max(8));
        }
        route.pending.push(deliver);
    }

    /// Hands every held delivery to its consumer, one batch per consumer.
    fn hand_over(&mut self) {
        for consumer_id in self.with_pending.drain(..) {
            let Some(route) = self.consumers.get_mut(&consumer_id) else { continue };
            route.last_batch = route.pending.len();
            let batch = std::mem::take(&mut route.pending);
            if route.events.send(ConsumerEvent::Deliveries(batch)).is_err() {
                // The Consumer was dropped and has sent a Cancel; the broker requeues what it
                // delivered meanwhile.
                self.consumers.remove(&consumer_id);
            }
        }
    }

    fn handle_event(&mut self, body: Body) -> Option<CloseReason> {
        match body {
            Body::Deliver(deliver) => {
                // `handle` holds deliveries before they get here; should one come this way, it
                // still reaches its consumer.
                self.hold(deliver);
                self.hand_over();
            }
            Body::DeliveryExpired(expired) => {
                let (consumer_id, delivery_tag) = (expired.consumer_id, expired.delivery_tag);
                debug!(
                    consumer_id,
                    delivery_tag, "delivery passed its ack deadline; the broker took it back"
                );
                let pulled = || self.shared.pull_trackers.lock().get(&consumer_id).and_then(|t| t.upgrade());
                match self.consumers.get(&consumer_id) {
                    Some(route) => route.tracker.expire(delivery_tag),
                    None => match pulled() {
                        Some(tracker) => tracker.expire(delivery_tag),
                        None => debug!(consumer_id, "expiry for a consumer that is gone; ignored"),
                    },
                }
            }
            Body::ConsumerCancelled(cancelled) => {
                debug!(consumer_id = cancelled.consumer_id, reason = %cancelled.reason, "broker cancelled a consumer");
                if let Some(route) = self.consumers.remove(&cancelled.consumer_id) {
                    route.tracker.cancel();
                    let _ = route.events.send(ConsumerEvent::Cancelled(cancelled.reason));
                }
            }
            Body::FlowControl(flow) => {
                let blocked = flow.blocked.then(|| block_reason(flow.reason));
                match &blocked {
                    Some(reason) => debug!(reason = %reason, "the broker blocks publishing"),
                    None => debug!("the broker unblocked publishing"),
                }
                self.shared.set_blocked(blocked);
            }
            Body::Event(event) => {
                if self.events.is_empty() {
                    debug!(kind = %event.kind, "event without a subscriber; dropped");
                }
                self.events.retain_mut(|route| route.deliver(&event));
            }
            Body::Heartbeat(_) => {}
            Body::Close(close) => {
                let code = error_code(close.code);
                debug!(code = code.as_str_name(), reason = %close.reason, "broker is closing the connection");
                let mut message = format!("the broker closed the connection: {}", close.reason);
                if code != hopper_proto::ErrorCode::Unspecified {
                    message = format!("{message} ({})", code.as_str_name());
                }
                return Some(CloseReason::lost(message));
            }
            Body::Error(error) => {
                let error = Error::from_frame(error);
                warn!(error = %error, "connection-level error from the broker");
                self.last_error = Some(error.to_string());
            }
            other => warn!(frame = body_name(&other), "unexpected event from the broker; ignored"),
        }
        None
    }

    /// Hands a response to the request waiting for it.
    fn complete(&mut self, request: PendingRequest, result: Result<Body, Error>) {
        match request {
            PendingRequest::Reply(reply) => {
                let _ = reply.send(result);
            }
            PendingRequest::Consume { reply, events, tracker } => {
                let consumer_id = match &result {
                    Ok(Body::ConsumeOk(ok)) => Some(ok.consumer_id),
                    _ => None,
                };
                if let Some(consumer_id) = consumer_id {
                    self.consumers.insert(consumer_id, Route::new(events, tracker));
                }
                if reply.send(result).is_err() {
                    if let Some(consumer_id) = consumer_id {
                        // The caller gave up on `consume` before the answer came: nobody will
                        // read from this consumer, so end it.
                        self.consumers.remove(&consumer_id);
                        cancel_detached(&self.shared, consumer_id);
                    }
                }
            }
            PendingRequest::Subscribe { reply, route } => {
                if matches!(result, Ok(Body::SubscribeOk(_))) {
                    self.events.push(route);
                }
                // A caller that gave up dropped the stream's receiver; the route goes at the
                // next event.
                let _ = reply.send(result);
            }
            PendingRequest::Cancel { consumer_id, reply } => {
                self.consumers.remove(&consumer_id);
                match reply {
                    Some(reply) => {
                        let _ = reply.send(result);
                    }
                    None => {
                        if let Err(error) = result {
                            debug!(consumer_id, error = %error, "cancel of a dropped consumer failed");
                        }
                    }
                }
            }
        }
    }
}

/// Cancels a consumer nobody holds any more, without waiting for the answer.
pub(crate) fn cancel_detached(shared: &Shared, consumer_id: u64) {
    let cancel = Body::Cancel(pb::Cancel { consumer_id });
    if let Err(error) = shared.send_request(cancel, PendingRequest::Cancel { consumer_id, reply: None }) {
        debug!(consumer_id, error = %error, "could not cancel a dropped consumer");
    }
}

/// Waits until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_connection_needs_no_heartbeat() {
        let mut liveness = Liveness::default();
        for _ in 0..10 {
            assert_eq!(liveness.on_tick(true, true), Tick::Idle);
        }
    }

    #[test]
    fn quiet_writer_sends_heartbeats() {
        let mut liveness = Liveness::default();
        assert_eq!(liveness.on_tick(true, false), Tick::SendHeartbeat);
        assert_eq!(liveness.on_tick(true, true), Tick::Idle);
        assert_eq!(liveness.on_tick(true, false), Tick::SendHeartbeat);
    }

    #[test]
    fn broker_is_dead_after_two_silent_intervals() {
        let mut liveness = Liveness::default();
        for _ in 1..Liveness::DEAD_AFTER_TICKS {
            assert_ne!(liveness.on_tick(false, true), Tick::Dead);
        }
        assert_eq!(liveness.on_tick(false, true), Tick::Dead);
    }

    #[test]
    fn any_frame_resets_the_silence() {
        let mut liveness = Liveness::default();
        for _ in 1..Liveness::DEAD_AFTER_TICKS {
            liveness.on_tick(false, false);
        }
        assert_eq!(liveness.on_tick(true, false), Tick::SendHeartbeat);
        for _ in 1..Liveness::DEAD_AFTER_TICKS {
            assert_ne!(liveness.on_tick(false, false), Tick::Dead);
        }
        assert_eq!(liveness.on_tick(false, false), Tick::Dead);
    }
}
