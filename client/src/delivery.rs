//! [`Delivery`]: a message handed to a consumer (pushed, or pulled with
//! [`Connection::get`](crate::Connection::get)) that can be settled exactly once, and whose ack
//! deadline can be extended until then.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hopper_proto::{pb, Body, ErrorCode};

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::info::Death;
use crate::options::{wire_ms, NackOptions};
use crate::tracker::{DeliveryTracker, Refusal};

/// The part of a consumer its deliveries share, so they can settle themselves.
pub(crate) struct ConsumerShared {
    pub(crate) conn: Connection,
    pub(crate) id: u64,
    pub(crate) queue: String,
    /// Also held by the connection's reader, which records expiries and cancellations in it.
    pub(crate) tracker: Arc<DeliveryTracker>,
    /// Settles wait for the broker's `SettleOk`.
    pub(crate) confirm: bool,
}

/// A message delivered to a [`Consumer`](crate::Consumer) or pulled with
/// [`Connection::get`](crate::Connection::get).
///
/// Settle it with exactly one of [`ack`](Self::ack), [`ack_multiple`](Self::ack_multiple),
/// [`nack`](Self::nack), [`nack_with`](Self::nack_with),
/// [`nack_multiple`](Self::nack_multiple), [`reject`](Self::reject) or
/// [`reject_with`](Self::reject_with); a second settle, or one of a delivery an earlier
/// `*_multiple` call already covered, fails with [`Error::AlreadySettled`] and sends nothing.
/// Once the broker has reported that the delivery's ack deadline passed, settling fails with
/// [`Error::DeliveryExpired`], also without sending anything.
///
/// By default settles have no response from the broker: `Ok` means the request was queued for
/// sending, and a refusal is logged. With
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
    /// Every time the message died, oldest first; empty unless it came through a dead-letter
    /// queue.
    pub deaths: Vec<Death>,
    /// How many times the message was moved (replayed) out of a queue, e.g. from a dead-letter
    /// queue back to where it failed ([`Connection::start_move`](crate::Connection::start_move)).
    pub replay_count: u32,
    /// Deaths left out of `deaths` between the first and the latest ones (the broker keeps at
    /// most 16).
    pub deaths_omitted: u32,
    /// The exchange the message was published to; empty for a publish to a queue.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Position of this delivery in its consumer's sequence (1, 2, ...).
    pub delivery_tag: u64,
    /// The consumer the message was delivered to (for a pulled message, the connection's pull
    /// consumer of the queue).
    pub consumer_id: u64,
    consumer: Arc<ConsumerShared>,
    settled: AtomicBool,
}

impl Delivery {
    /// A delivery of the consumer `consumer` from its wire form.
    pub(crate) fn new(deliver: pb::Deliver, consumer: Arc<ConsumerShared>) -> Self {
        let message = deliver.message.unwrap_or_default();
        Delivery {
            message_id: message.message_id,
            body: message.body,
            headers: message.headers,
            content_type: message.content_type,
            published_at_ms: message.published_at_ms,
            delivery_count: message.delivery_count,
            redelivered: message.redelivered,
            deaths: message.deaths.into_iter().map(Death::from).collect(),
            replay_count: message.replay_count,
            deaths_omitted: message.deaths_omitted,
            exchange: message.exchange,
            routing_key: message.routing_key,
            delivery_tag: deliver.delivery_tag,
            consumer_id: deliver.consumer_id,
            consumer,
            settled: AtomicBool::new(false),
        }
    }

    /// The queue the message came from.
    pub fn queue(&self) -> &str {
        &self.consumer.queue
    }

    /// The most recent of the message's deaths, if it ever died.
    pub fn last_death(&self) -> Option<&Death> {
        self.deaths.last()
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

    /// Refuses this delivery: with `requeue` the message goes back to its queue (after the
    /// queue's retry backoff, if it has one), without it the message dies with reason
    /// `rejected` (moved to the dead-letter queue, or dropped).
    pub async fn nack(&self, requeue: bool) -> Result<()> {
        self.nack_with(requeue, NackOptions::default()).await
    }

    /// Like [`nack`](Self::nack), saying why processing failed and, with `requeue`, optionally
    /// when to try again instead of the queue's retry backoff. The error text stays with the
    /// message: it shows in its [`Death`] should it die, and in the audit trail.
    pub async fn nack_with(&self, requeue: bool, options: NackOptions) -> Result<()> {
        let NackOptions { error, delay } = options;
        self.settle(false, |consumer_id, delivery_tag, confirm| {
            Body::Nack(pb::Nack {
                consumer_id,
                delivery_tag,
                multiple: false,
                requeue,
                confirm,
                error,
                delay_ms: delay.map(wire_ms),
            })
        })
        .await
    }

    /// Like [`nack`](Self::nack), for this delivery and every earlier unsettled delivery of the
    /// same consumer.
    pub async fn nack_multiple(&self, requeue: bool) -> Result<()> {
        self.settle(true, |consumer_id, delivery_tag, confirm| {
            Body::Nack(pb::Nack {
                consumer_id,
                delivery_tag,
                multiple: true,
                requeue,
                confirm,
                error: String::new(),
                delay_ms: None,
            })
        })
        .await
    }

    /// Rejects this delivery without requeueing it: the message dies with reason `rejected`
    /// (moved to the queue's dead-letter queue, or dropped).
    pub async fn reject(&self) -> Result<()> {
        self.reject_with(String::new()).await
    }

    /// Like [`reject`](Self::reject), saying why: the error text goes with the message into
    /// its [`Death`] and the audit trail. Use it for poison messages that no retry can fix.
    pub async fn reject_with(&self, error: impl Into<String>) -> Result<()> {
        let error = error.into();
        self.settle(false, |consumer_id, delivery_tag, confirm| {
            Body::Reject(pb::Reject { consumer_id, delivery_tag, requeue: false, confirm, error })
        })
        .await
    }

    /// Moves this delivery's ack deadline (for a pulled message, its visibility timeout) to
    /// `by` from now, even if it had none, and waits for the broker to confirm. Not a settle:
    /// call it as often as the work needs. Fails with [`Error::AlreadySettled`] once the
    /// delivery is settled and [`Error::DeliveryExpired`] once its deadline has passed.
    pub async fn extend(&self, by: Duration) -> Result<()> {
        let consumer = &*self.consumer;
        consumer.tracker.check_outstanding(self.delivery_tag, &self.settled).map_err(|r| self.refused(r))?;
        let extend =
            pb::Extend { consumer_id: consumer.id, delivery_tag: self.delivery_tag, extend_ms: wire_ms(by) };
        match consumer.conn.call(Body::Extend(extend)).await {
            Ok(Body::SettleOk(_)) => Ok(()),
            Ok(other) => Err(Error::Protocol(format!("expected SettleOk, got {}", other.name()))),
            Err(error) => Err(self.explain(error)),
        }
    }

    async fn settle(&self, multiple: bool, body: impl FnOnce(u64, u64, bool) -> Body) -> Result<()> {
        let consumer = &*self.consumer;
        consumer.tracker.claim(self.delivery_tag, &self.settled, multiple).map_err(|r| self.refused(r))?;
        let body = body(consumer.id, self.delivery_tag, consumer.confirm);
        if !consumer.confirm {
            return consumer.conn.shared().send_untracked(body);
        }
        match consumer.conn.call(body).await {
            Ok(Body::SettleOk(_)) => Ok(()),
            Ok(other) => Err(Error::Protocol(format!("expected SettleOk, got {}", other.name()))),
            Err(error) => Err(self.explain(error)),
        }
    }

    /// The error for a request the client refuses to send.
    fn refused(&self, refusal: Refusal) -> Error {
        let delivery_tag = self.delivery_tag;
        match refusal {
            Refusal::AlreadySettled => Error::AlreadySettled { delivery_tag },
            Refusal::Expired => Error::DeliveryExpired { delivery_tag },
            Refusal::Cancelled => Error::ConsumerCancelled(format!(
                "consumer {} was cancelled; its deliveries can no longer be settled",
                self.consumer.id
            )),
        }
    }

    /// Turns the broker's refusal of a request about this delivery into
    /// [`Error::DeliveryExpired`] when the delivery expired. The broker reports the expiry
    /// before it answers a later request, so the reader has recorded it by now.
    fn explain(&self, error: Error) -> Error {
        let refused = matches!(error.code(), Some(ErrorCode::PreconditionFailed | ErrorCode::NotFound));
        if refused && self.consumer.tracker.is_expired(self.delivery_tag) {
            return Error::DeliveryExpired { delivery_tag: self.delivery_tag };
        }
        error
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
            .field("deaths", &self.deaths)
            .field("replay_count", &self.replay_count)
            .field("delivery_tag", &self.delivery_tag)
            .field("consumer_id", &self.consumer_id)
            .finish()
    }
}
