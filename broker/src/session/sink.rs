//! A connection as the queues and the engine see it: where its consumers' deliveries, expiry
//! and cancel notices, and the confirms of its requests go, encoded as frames into its outbox.

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

impl Replies for Outbox {
    fn reply(&self, request_id: u64, result: Result<Outcome, BrokerError>) {
        let frame = match result {
            Ok(Outcome::Published { message_id, routed }) => {
                Frame::new(request_id, Body::PublishOk(pb::PublishOk { message_id, routed }))
            }
            Ok(Outcome::Settled { count }) => {
                Frame::new(request_id, Body::SettleOk(pb::SettleOk { settled: count }))
            }
            Err(err) => Frame::error(request_id, err.code(), err.to_string()),
        };
        self.push(&frame);
    }
}
