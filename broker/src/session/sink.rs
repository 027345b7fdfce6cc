//! A connection as the queues and the engine see it: where its consumers' deliveries, expiry
//! and cancel notices, and the confirms of its requests go, encoded as frames into its outbox.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hopper_proto::{pb, Body, Frame};

use crate::error::BrokerError;
use crate::message::{Payload, QueuedMessage};
use crate::outbox::Outbox;
use crate::queue::{Outcome, Refusal, Replies, Sink};
use crate::wire;

impl Sink for Outbox {
    fn is_writable(&self) -> bool {
        self.accepts_deliveries()
    }

    fn deliver(
        &self,
        consumer_id: u64,
        delivery_tag: u64,
        message: &QueuedMessage,
        payload: &Payload,
    ) -> Result<(), Refusal> {
        let frame = wire::DeliverFrame {
            consumer_id,
            delivery_tag,
            payload,
            delivery_count: message.delivery_count,
            redelivered: message.redelivered(),
        };
        self.push_encoded_if_fits(frame.encoded_len(), |buf| frame.encode(buf))
            .map_err(|(bytes, limit)| Refusal::TooLarge { bytes, limit })
    }

    fn expired(&self, consumer_id: u64, delivery_tag: u64) {
        let body = Body::DeliveryExpired(pb::DeliveryExpired { consumer_id, delivery_tag });
        self.push(&Frame::event(body));
    }

    fn connection_id(&self) -> u64 {
        Outbox::connection_id(self)
    }

    fn cancelled(&self, consumer_id: u64, reason: &str) {
        let body = Body::ConsumerCancelled(pb::ConsumerCancelled { consumer_id, reason: reason.to_owned() });
        self.push(&Frame::event(body));
    }
}

/// A connection's publish confirms: answered through its outbox, and counted while in flight,
/// so a client cannot pile up unconfirmed publishes without bound.
pub(super) struct PublishReplies {
    outbox: Arc<Outbox>,
    in_flight: AtomicUsize,
}

impl PublishReplies {
    pub(super) fn new(outbox: Arc<Outbox>) -> Self {
        PublishReplies { outbox, in_flight: AtomicUsize::new(0) }
    }

    /// Counts one more publish in flight, unless `limit` are already.
    pub(super) fn start(&self, limit: usize) -> Result<(), BrokerError> {
        let started = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1));
        started.map(|_| ()).map_err(|_| {
            BrokerError::ResourceLimit(format!(
                "{limit} publishes of this connection are waiting for their confirms, the most it may have \
                 (--max-unconfirmed-per-connection); wait for confirms before publishing more"
            ))
        })
    }

    /// Uncounts a publish that was refused before it could be confirmed.
    pub(super) fn abandon(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Replies for PublishReplies {
    fn reply(&self, request_id: u64, result: Result<Outcome, BrokerError>) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.outbox.reply(request_id, result);
    }
}

impl Replies for Outbox {
    fn reply(&self, request_id: u64, result: Result<Outcome, BrokerError>) {
        let frame = match result {
            Ok(Outcome::Published { message_id, routed }) => {
                Frame::new(request_id, Body::PublishOk(pb::PublishOk { message_id, routed }))
            }
            Ok(Outcome::Settled { count }) => {
                Frame::new(request_id, Body::SettleOk(pb::SettleOk { settled: count }))
            }
            Err(err) => err.frame(request_id),
        };
        self.push(&frame);
    }
}
