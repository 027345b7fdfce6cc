//! [`Consumer`], a stream of deliveries pushed by the broker from one queue.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::stream::{FusedStream, Stream};
use hopper_proto::{pb, Body};
use tokio::sync::{mpsc, oneshot};

use crate::connection::Connection;
use crate::delivery::{ConsumerShared, Delivery};
use crate::error::{Error, Result};
use crate::io::cancel_detached;
use crate::shared::{unexpected, PendingRequest};
use crate::tracker::DeliveryTracker;

/// What the reader passes to a consumer.
#[derive(Debug)]
pub(crate) enum ConsumerEvent {
    /// Messages for the consumer, oldest first: all that arrived in one read of the socket,
    /// so that the reader sends once and wakes the consumer once per read, not per message.
    Deliveries(Vec<pb::Deliver>),
    /// The broker ended the consumer; the reason follows.
    Cancelled(String),
    /// The connection ended unexpectedly; the reason follows.
    Closed(String),
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
    /// The rest of the last batch received, yielded before the next is taken.
    batch: std::vec::IntoIter<pb::Deliver>,
    /// The stream has ended.
    done: bool,
}

impl Consumer {
    pub(crate) fn new(
        conn: Connection,
        id: u64,
        queue: &str,
        events: mpsc::UnboundedReceiver<ConsumerEvent>,
        tracker: Arc<DeliveryTracker>,
        confirm: bool,
    ) -> Self {
        let shared = Arc::new(ConsumerShared { conn, id, queue: queue.to_string(), tracker, confirm });
        Consumer { shared, events, batch: Vec::new().into_iter(), done: false }
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
    /// already cancelled the consumer.
    pub async fn cancel(self) -> Result<u64> {
        if self.shared.tracker.cancel() {
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
        if !self.shared.tracker.cancel() && !shared.is_closed() {
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
        let item = loop {
            if let Some(deliver) = self.batch.next() {
                return Poll::Ready(Some(Ok(Delivery::new(deliver, self.shared.clone()))));
            }
            match ready!(self.events.poll_recv(cx)) {
                Some(ConsumerEvent::Deliveries(batch)) => self.batch = batch.into_iter(),
                Some(ConsumerEvent::Cancelled(reason)) => {
                    self.shared.tracker.cancel();
                    break Some(Err(Error::ConsumerCancelled(reason)));
                }
                Some(ConsumerEvent::Closed(reason)) => break Some(Err(Error::Closed(reason))),
                None => break None,
            }
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

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer").field("id", &self.shared.id).field("queue", &self.shared.queue).finish()
    }
}
