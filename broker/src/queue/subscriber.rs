//! Where a queue's deliveries go: a push consumer's connection, or the collecting box of a
//! pull (`Get`) consumer.

use std::sync::Arc;

use hopper_proto::{pb, Body, Frame};
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::Sink;
use crate::message::{Payload, QueuedMessage};
use crate::outbox::Outbox;

/// A consumer's delivery target.
#[derive(Clone)]
pub enum Subscriber {
    /// Deliveries are pushed to the connection as `Deliver` events.
    Push(Arc<Outbox>),
    /// Deliveries are collected for the answer to a `Get`.
    Pull(Arc<PullBox>),
}

/// Deliveries gathered for a pending `Get`.
pub struct PullBox {
    connection_id: u64,
    /// The connection to tell when a pulled message's visibility timeout passes (none for
    /// HTTP pulls, whose receipts outlive any connection).
    outbox: Option<Arc<Outbox>>,
    collected: Mutex<Vec<pb::Deliver>>,
    arrived: Notify,
}

impl PullBox {
    /// An empty box for a pull consumer of the connection whose outbox this is.
    pub fn new(outbox: Option<Arc<Outbox>>) -> Self {
        let connection_id = outbox.as_ref().map_or(0, |o| o.connection_id());
        PullBox { connection_id, outbox, collected: Mutex::new(Vec::new()), arrived: Notify::new() }
    }

    /// Takes what was collected.
    pub fn take(&self) -> Vec<pb::Deliver> {
        std::mem::take(&mut self.collected.lock())
    }

    /// How many deliveries are waiting.
    pub fn len(&self) -> usize {
        self.collected.lock().len()
    }

    /// True when nothing was collected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when a delivery arrives (or one arrived since the last call).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }
}

/// The wire form of a delivery.
pub fn deliver_frame_body(
    consumer_id: u64,
    delivery_tag: u64,
    message: &QueuedMessage,
    payload: &Payload,
) -> pb::Deliver {
    pb::Deliver { consumer_id, delivery_tag, message: Some(message_to_wire(message, payload)) }
}

/// The wire form of a message.
pub fn message_to_wire(message: &QueuedMessage, payload: &Payload) -> pb::Message {
    pb::Message {
        message_id: payload.id,
        body: payload.body.clone(),
        headers: payload.headers.clone(),
        content_type: payload.content_type.clone(),
        published_at_ms: payload.published_at_ms,
        delivery_count: message.delivery_count,
        redelivered: message.redelivered(),
        deaths: payload.deaths.iter().map(crate::session::death_to_wire).collect(),
        replay_count: payload.replay_count,
    }
}

impl Sink for Subscriber {
    fn is_writable(&self) -> bool {
        match self {
            Subscriber::Push(outbox) => outbox.accepts_deliveries(),
            Subscriber::Pull(_) => true,
        }
    }

    fn deliver(&self, consumer_id: u64, delivery_tag: u64, message: &QueuedMessage, payload: &Payload) {
        let deliver = deliver_frame_body(consumer_id, delivery_tag, message, payload);
        match self {
            Subscriber::Push(outbox) => outbox.push(&Frame::event(Body::Deliver(deliver))),
            Subscriber::Pull(pull) => {
                pull.collected.lock().push(deliver);
                pull.arrived.notify_one();
            }
        }
    }

    fn expired(&self, consumer_id: u64, delivery_tag: u64) {
        let outbox = match self {
            Subscriber::Push(outbox) => Some(outbox),
            Subscriber::Pull(pull) => pull.outbox.as_ref(),
        };
        if let Some(outbox) = outbox {
            let body = Body::DeliveryExpired(pb::DeliveryExpired { consumer_id, delivery_tag });
            outbox.push(&Frame::event(body));
        }
    }

    fn connection_id(&self) -> u64 {
        match self {
            Subscriber::Push(outbox) => outbox.connection_id(),
            Subscriber::Pull(pull) => pull.connection_id,
        }
    }
}
