//! [`Consumer`], a stream of deliveries from one queue, and [`Delivery`], a message that can be
//! settled (acked, nacked or rejected) exactly once.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::stream::{FusedStream, Stream};
use hopper_proto::{pb, Body};
use tokio::sync::{mpsc, oneshot};

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::io::cancel_detached;
use crate::shared::{unexpected, PendingRequest};

/// What the reader passes to a consumer.
#[derive(Debug)]
pub(crate) enum ConsumerEvent {
    /// A message for the consumer.
    Deliver(pb::Deliver),
    /// The broker ended the consumer; the reason follows.
    Cancelled(String),
    /// The connection ended unexpectedly; the reason follows.
    Closed(String),
}

/// The part of a consumer its deliveries share, so they can settle themselves.
pub(crate) struct ConsumerShared {
    conn: Connection,
    id: u64,
    queue: String,
    settles: SettleWindow,
    /// Set when the consumer is cancelled, by the client or by the broker: its deliveries can
    /// no longer be settled.
    cancelled: AtomicBool,
    /// Settles wait for the broker's `SettleOk`.
    confirm: bool,
}

/// A subscription to a queue: a [`Stream`] of [`Delivery`]s.
///
/// The stream yields `Err(Error::ConsumerCancelled(..))` once and ends if the broker cancels
/// the consumer (e.g. its queue was deleted), and `Err(Error::Closed(..))` once and ends if the
/// connection is lost. After [`Connection::close`] it just ends.
///
/// Deliveries waiting in the client are bounded by the consumer's prefetch window (the broker
/// sends no more than `prefetch` unacknowledged deliveries); with a prefetch of 0 they are not.
///
/// Dropping a `Consumer` cancels it at the broker, which requeues its unacknowledged
/// deliveries.
pub struct Consumer {
    shared: Arc<ConsumerShared>,
    events: mpsc::UnboundedReceiver<ConsumerEvent>,
    /// The stream has ended.
    done: bool,
}

impl Consumer {
    pub(crate) fn new(
        conn: Connection,
        id: u64,
        queue: &str,
        events: mpsc::UnboundedReceiver<ConsumerEvent>,
        confirm: bool,
    ) -> Self {
        let shared = Arc::new(ConsumerShared {
            conn,
            id,
            queue: queue.to_string(),
            settles: SettleWindow::default(),
            cancelled: AtomicBool::new(false),
            confirm,
        });
        Consumer { shared, events, done: false }
    }

    /// The broker-assigned id of this consumer on its connection.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The queue this consumer reads from.
    pub fn queue(&self) -> &str {
        &self.shared.queue
    }

    /// Ends the subscription. Returns how many unacknowledged deliveries the broker put back
    /// in the queue; deliveries not yet taken from the stream are among them. Deliveries of
    /// this consumer still held can no longer be settled. Returns `Ok(0)` if the broker had
    /// already cancelled the consumer and the stream reported it.
    pub async fn cancel(self) -> Result<u64> {
        if self.shared.cancelled.swap(true, Ordering::AcqRel) {
            return Ok(0);
        }
        let (reply, response) = oneshot::channel();
        let shared = self.shared.conn.shared();
        let consumer_id = self.shared.id;
        let cancel = Body::Cancel(pb::Cancel { consumer_id });
        shared.send_request(cancel, PendingRequest::Cancel { consumer_id, reply: Some(reply) })?;
        match shared.response(response).await? {
            Body::CancelOk(ok) => Ok(ok.requeued),
            other => Err(unexpected("CancelOk", &other)),
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let shared = self.shared.conn.shared();
        if !self.shared.cancelled.swap(true, Ordering::AcqRel) && !shared.is_closed() {
            cancel_detached(shared, self.shared.id);
        }
    }
}

impl Stream for Consumer {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match ready!(self.events.poll_recv(cx)) {
            Some(ConsumerEvent::Deliver(deliver)) => return Poll::Ready(Some(Ok(self.delivery(deliver)))),
            Some(ConsumerEvent::Cancelled(reason)) => {
                self.shared.cancelled.store(true, Ordering::Release);
                Some(Err(Error::ConsumerCancelled(reason)))
            }
            Some(ConsumerEvent::Closed(reason)) => Some(Err(Error::Closed(reason))),
            None => None,
        };
        self.done = true;
        Poll::Ready(item)
    }
}

impl FusedStream for Consumer {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl Consumer {
    fn delivery(&self, deliver: pb::Deliver) -> Delivery {
        let message = deliver.message.unwrap_or_default();
        Delivery {
            message_id: message.message_id,
            body: message.body,
            headers: message.headers,
            content_type: message.content_type,
            published_at_ms: message.published_at_ms,
            delivery_count: message.delivery_count,
            redelivered: message.redelivered,
            delivery_tag: deliver.delivery_tag,
            consumer_id: deliver.consumer_id,
            consumer: self.shared.clone(),
            settled: AtomicBool::new(false),
        }
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer").field("id", &self.shared.id).field("queue", &self.shared.queue).finish()
    }
}

/// A message delivered to a [`Consumer`].
///
/// Settle it with exactly one of [`ack`](Self::ack), [`ack_multiple`](Self::ack_multiple),
/// [`nack`](Self::nack), [`nack_multiple`](Self::nack_multiple) or [`reject`](Self::reject); a
/// second settle, or one of a delivery an earlier `*_multiple` call already covered, fails
/// with [`Error::AlreadySettled`] and sends nothing. By default settles have no response from
/// the broker: `Ok` means the request was queued for sending, and a refusal is logged. With
/// [`ConsumeOptions::confirm_settlements`](crate::ConsumeOptions::confirm_settlements) they
/// wait for the broker to record them durably and return its refusal as an error.
pub struct Delivery {
    /// Broker-assigned id of the message, unique within the broker.
    pub message_id: u64,
    /// The message body.
    pub body: Bytes,
    /// Headers set by the publisher.
    pub headers: HashMap<String, String>,
    /// MIME type set by the publisher; empty if none.
    pub content_type: String,
    /// Unix time in milliseconds at which the broker accepted the publish.
    pub published_at_ms: u64,
    /// How many times the message has been delivered, this delivery included.
    pub delivery_count: u32,
    /// True when the message was delivered before and not acknowledged.
    pub redelivered: bool,
    /// Position of this delivery in its consumer's sequence (1, 2, ...).
    pub delivery_tag: u64,
    /// The consumer the message was delivered to.
    pub consumer_id: u64,
    consumer: Arc<ConsumerShared>,
    settled: AtomicBool,
}

impl Delivery {
    /// The queue the message came from.
    pub fn queue(&self) -> &str {
        &self.consumer.queue
    }

    /// Acknowledges this delivery: the broker forgets the message.
    pub async fn ack(&self) -> Result<()> {
        self.settle(false, |consumer_id, delivery_tag, confirm| {
            Body::Ack(pb::Ack { consumer_id, delivery_tag, multiple: false, confirm })
        })
        .await
    }

    /// Acknowledges this delivery and every earlier unsettled delivery of the same consumer.
    pub async fn ack_multiple(&self) -> Result<()> {
        self.settle(true, |consumer_id, delivery_tag, confirm| {
            Body::Ack(pb::Ack { consumer_id, delivery_tag, multiple: true, confirm })
        })
        .await
    }

    /// Refuses this delivery: with `requeue` the message goes back near the head of its queue,
    /// without it the message is dropped.
    pub async fn nack(&self, requeue: bool) -> Result<()> {
        self.settle(false, |consumer_id, delivery_tag, confirm| {
            Body::Nack(pb::Nack { consumer_id, delivery_tag, multiple: false, requeue, confirm })
        })
        .await
    }

    /// Like [`nack`](Self::nack), for this delivery and every earlier unsettled delivery of the
    /// same consumer.
    pub async fn nack_multiple(&self, requeue: bool) -> Result<()> {
        self.settle(true, |consumer_id, delivery_tag, confirm| {
            Body::Nack(pb::Nack { consumer_id, delivery_tag, multiple: true, requeue, confirm })
        })
        .await
    }

    /// Rejects this delivery without requeueing it: the message is dropped.
    pub async fn reject(&self) -> Result<()> {
        self.settle(false, |consumer_id, delivery_tag, confirm| {
            Body::Reject(pb::Reject { consumer_id, delivery_tag, requeue: false, confirm })
        })
        .await
    }

    async fn settle(&self, multiple: bool, body: impl FnOnce(u64, u64, bool) -> Body) -> Result<()> {
        let consumer = &*self.consumer;
        consumer.settles.claim(self.delivery_tag, &self.settled, multiple)?;
        if consumer.cancelled.load(Ordering::Acquire) {
            return Err(Error::ConsumerCancelled(format!(
                "consumer {} was cancelled; its deliveries can no longer be settled",
                consumer.id
            )));
        }
        let body = body(consumer.id, self.delivery_tag, consumer.confirm);
        if !consumer.confirm {
            return consumer.conn.shared().send_untracked(body);
        }
        match consumer.conn.call(body).await? {
            Body::SettleOk(_) => Ok(()),
            other => Err(Error::Protocol(format!("expected SettleOk, got {other:?}"))),
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.consumer.queue)
            .field("message_id", &self.message_id)
            .field("body_len", &self.body.len())
            .field("headers", &self.headers)
            .field("content_type", &self.content_type)
            .field("published_at_ms", &self.published_at_ms)
            .field("delivery_count", &self.delivery_count)
            .field("redelivered", &self.redelivered)
            .field("delivery_tag", &self.delivery_tag)
            .field("consumer_id", &self.consumer_id)
            .finish()
    }
}

/// Which deliveries of a consumer are settled: each delivery's own flag, plus the highest tag
/// a `multiple` settle covered (everything at or below it is settled).
///
/// Lock-free; a single settle racing a `multiple` one on another task may both be sent, and
/// the broker then refuses the second, which the reader logs.
#[derive(Debug, Default)]
struct SettleWindow {
    settled_up_to: AtomicU64,
}

impl SettleWindow {
    /// Claims the right to settle delivery `tag` (whose own flag is `settled`), and with
    /// `multiple` every earlier one too.
    fn claim(&self, tag: u64, settled: &AtomicBool, multiple: bool) -> Result<()> {
        if settled.swap(true, Ordering::AcqRel) || tag <= self.settled_up_to.load(Ordering::Acquire) {
            return Err(Error::AlreadySettled { delivery_tag: tag });
        }
        if multiple {
            self.settled_up_to.fetch_max(tag, Ordering::AcqRel);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(n: usize) -> Vec<AtomicBool> {
        (0..=n).map(|_| AtomicBool::new(false)).collect()
    }

    fn is_already_settled(result: Result<()>, tag: u64) -> bool {
        matches!(result, Err(Error::AlreadySettled { delivery_tag }) if delivery_tag == tag)
    }

    #[test]
    fn a_delivery_settles_once() {
        let window = SettleWindow::default();
        let flags = flags(3);
        assert!(window.claim(1, &flags[1], false).is_ok());
        assert!(is_already_settled(window.claim(1, &flags[1], false), 1));
        assert!(is_already_settled(window.claim(1, &flags[1], true), 1));
        assert!(window.claim(2, &flags[2], false).is_ok(), "other deliveries are unaffected");
    }

    #[test]
    fn multiple_covers_earlier_deliveries_only() {
        let window = SettleWindow::default();
        let flags = flags(6);
        assert!(window.claim(4, &flags[4], true).is_ok());
        for tag in 1..=3 {
            assert!(is_already_settled(window.claim(tag, &flags[tag as usize], false), tag));
        }
        assert!(window.claim(5, &flags[5], false).is_ok());
        assert!(window.claim(6, &flags[6], true).is_ok());
    }

    #[test]
    fn multiple_below_the_window_is_already_settled() {
        let window = SettleWindow::default();
        let flags = flags(5);
        assert!(window.claim(5, &flags[5], true).is_ok());
        assert!(is_already_settled(window.claim(2, &flags[2], true), 2));
        assert_eq!(window.settled_up_to.load(Ordering::Relaxed), 5, "the window never moves back");
    }

    #[test]
    fn an_individually_settled_delivery_does_not_block_a_later_multiple() {
        let window = SettleWindow::default();
        let flags = flags(3);
        assert!(window.claim(2, &flags[2], false).is_ok());
        assert!(window.claim(3, &flags[3], true).is_ok());
        assert!(is_already_settled(window.claim(1, &flags[1], false), 1));
    }
}
