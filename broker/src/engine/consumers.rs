//! Message flow through the engine: publish, push consumers, and settling deliveries (ack,
//! nack, reject, extend) by consumer and tag or, for callers without a connection, by receipt.

use std::sync::Arc;

use bytes::Bytes;

use super::{Caller, Engine, Owned};
use crate::auth::{Access, Resource};
use crate::error::BrokerError;
use crate::message::{MessageProperties, Payload};
use crate::queue::{now_ms, Confirm, Journal, Outcome, Queue, QueueState, SettleError, Subscriber};
use crate::settings::check_duration;

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    /// The body.
    pub body: Bytes,
    /// Application headers and MIME type.
    pub properties: MessageProperties,
    /// Invisible for this long after the publish (0 = ready at once).
    pub delay_ms: u64,
    /// Lives at most this long (0 = the queue's TTL, if any).
    pub ttl_ms: u64,
    /// The publisher's id for it, so that a publish tried twice enters a replicated queue
    /// once; 0 = none.
    pub publish_id: u64,
}

/// How a push consumer takes deliveries.
#[derive(Debug, Clone, Default)]
pub struct ConsumeOptions {
    /// Most unacknowledged deliveries at once; 0 = no limit.
    pub prefetch: u32,
    /// Time to settle a delivery before it is taken back; 0 = the queue's.
    pub ack_timeout_ms: u64,
    /// Deliveries after which the consumer takes no more; 0 = no limit.
    pub limit: u64,
    /// The client's label, for the log.
    pub tag: String,
}

/// Which delivery a settlement is about.
#[derive(Debug, Clone, Copy)]
pub enum DeliveryRef<'a> {
    /// A delivery of one of the caller's connection's consumers.
    Tag {
        /// The consumer.
        consumer_id: u64,
        /// The delivery's tag.
        delivery_tag: u64,
    },
    /// A pulled delivery of a caller without a connection, by the receipt its pull gave.
    Receipt {
        /// The queue named in the request.
        queue: &'a str,
        /// The receipt.
        receipt: &'a str,
    },
}

/// How a negative acknowledgement treats the message.
#[derive(Debug, Clone, Default)]
pub struct NackOptions {
    /// Every outstanding delivery up to the tag, not just it.
    pub multiple: bool,
    /// Back to the queue (a failed delivery) rather than dead (`rejected`).
    pub requeue: bool,
    /// Why, kept with the message and its death.
    pub error: String,
    /// Redeliver after this long instead of the queue's retry backoff.
    pub delay_ms: Option<u64>,
}

/// A queue looked up once for many publishes: a connection keeps the queues it publishes to.
#[derive(Clone)]
pub struct PublishTarget {
    queue: Arc<Queue>,
}

impl PublishTarget {
    /// True once the queue was deleted: look it up again (a new queue may have its name).
    pub fn is_stale(&self) -> bool {
        self.queue.is_deleted()
    }
}

impl Engine {
    /// Looks up a queue to publish to.
    pub fn publish_target(&self, caller: &Caller, queue: &str) -> Result<PublishTarget, BrokerError> {
        self.check(caller, "publish to", Access::Write, Resource::Queue(queue))?;
        Ok(PublishTarget { queue: self.queues.get(queue)? })
    }

    /// Publishes a message to a queue; `confirm` hears when the queue holds it (on disk, for a
    /// durable queue). Returns the message's id.
    pub fn publish(
        &self,
        caller: &Caller,
        queue: &str,
        message: NewMessage,
        confirm: Confirm,
    ) -> Result<u64, BrokerError> {
        self.publish_to(caller, &self.publish_target(caller, queue)?, message, confirm)
    }

    /// Like [`Engine::publish`], to a queue looked up before.
    pub fn publish_to(
        &self,
        caller: &Caller,
        target: &PublishTarget,
        message: NewMessage,
        confirm: Confirm,
    ) -> Result<u64, BrokerError> {
        // Checked again per publish: permissions may have changed since the lookup.
        self.check(caller, "publish to", Access::Write, Resource::Queue(target.queue.name()))?;
        check_duration("delay_ms", message.delay_ms)?;
        check_duration("ttl_ms", message.ttl_ms)?;
        let (delay_ms, ttl_ms) = (message.delay_ms, message.ttl_ms);
        let payload = self.new_payload(message, Arc::default(), String::new());
        let id = payload.id;
        target.queue.publish(payload, delay_ms, ttl_ms, confirm)?;
        Ok(id)
    }

    /// The payload of a new message, with a fresh id.
    pub(super) fn new_payload(
        &self,
        message: NewMessage,
        exchange: Arc<str>,
        routing_key: String,
    ) -> Arc<Payload> {
        let payload = Payload {
            id: self.next_message_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            body: own_body(message.body),
            published_at_ms: now_ms(),
            replay_count: 0,
            exchange,
            routing_key,
            publish_id: message.publish_id,
            ..Payload::default()
        };
        Arc::new(payload.with_shared_properties(message.properties))
    }

    /// Subscribes a push consumer of the caller's connection; deliveries go to `sink`.
    /// `announce` runs with the new consumer's id before its first delivery is made.
    pub fn consume(
        &self,
        caller: &Caller,
        queue: &str,
        options: ConsumeOptions,
        sink: Subscriber,
        announce: impl FnOnce(u64),
    ) -> Result<u64, BrokerError> {
        check_duration("ack_timeout_ms", options.ack_timeout_ms)?;
        self.check(caller, "consume from", Access::Read, Resource::Queue(queue))?;
        let queue = self.queues.get(queue)?;
        self.check_serving(&queue)?;
        let consumer_id = self.next_consumer_id();
        self.consumers.insert(
            consumer_id,
            Owned { queue: queue.clone(), connection_id: caller.connection_id, user: caller.user.clone() },
        );
        let subscribed = queue.with_state(|s, _, _| {
            // Again under the queue's lock, which a node that stops serving a replicated queue
            // takes to cancel its consumers: no consumer slips in after them.
            self.check_serving(&queue)?;
            s.add_limited_consumer(
                consumer_id,
                options.prefetch,
                options.ack_timeout_ms,
                options.limit,
                sink,
            );
            announce(consumer_id);
            Ok(())
        });
        let subscribed = subscribed.and_then(|subscribed| subscribed);
        if let Err(err) = subscribed {
            self.consumers.remove(&consumer_id);
            return Err(err);
        }
        tracing::info!(queue = %queue.name(), consumer_id, prefetch = options.prefetch, tag = %options.tag, "consumer subscribed");
        Ok(consumer_id)
    }

    /// Unsubscribes one of the caller's consumers; its unacked deliveries return to the queue
    /// as failed deliveries. Returns how many.
    pub fn cancel(&self, caller: &Caller, consumer_id: u64, reason: &str) -> Result<u64, BrokerError> {
        let queue = self.owned_queue(caller, consumer_id)?;
        self.consumers.remove(&consumer_id);
        let requeued = queue
            .with_state(|s, j, now| s.remove_consumer(consumer_id, reason, now, j))
            .ok()
            .flatten()
            .unwrap_or(0) as u64;
        if requeued > 0 || reason != "connection closed" {
            tracing::info!(queue = %queue.name(), consumer_id, requeued, reason, "consumer cancelled");
        }
        Ok(requeued)
    }

    /// Stops deliveries to one of the caller's consumers but leaves it its unacked deliveries,
    /// to be settled (AMQP's `basic.cancel`, after which the channel may still ack what it
    /// got); [`Engine::cancel`] ends it.
    pub fn stop(&self, caller: &Caller, consumer_id: u64) -> Result<(), BrokerError> {
        let queue = self.owned_queue(caller, consumer_id)?;
        queue.with_state(|s, _, _| s.revoke(consumer_id))
    }

    /// Changes the prefetch of one of the caller's consumers (0 = no limit); a larger one
    /// takes more at once.
    pub fn set_prefetch(&self, caller: &Caller, consumer_id: u64, prefetch: u32) -> Result<(), BrokerError> {
        let queue = self.owned_queue(caller, consumer_id)?;
        queue
            .with_state(|s, _, _| s.set_prefetch(consumer_id, prefetch))?
            .map_err(|e| settle_error(consumer_id, e))
    }

    /// Cancels every consumer of a connection that is going away: its push consumers
    /// (`consumer_ids`) and its pull consumers.
    pub fn release_connection(&self, caller: &Caller, consumer_ids: impl IntoIterator<Item = u64>) {
        let pullers: Vec<u64> = {
            let mut pullers = self.pullers.lock();
            let mine: Vec<super::PullKey> = pullers
                .keys()
                .filter(|(connection, _, _)| *connection == caller.connection_id)
                .cloned()
                .collect();
            mine.iter().filter_map(|key| pullers.remove(key)).flatten().map(|p| p.consumer_id).collect()
        };
        for consumer_id in consumer_ids.into_iter().chain(pullers) {
            let _ = self.cancel(caller, consumer_id, "connection closed");
        }
    }

    /// Acknowledges a delivery (with `multiple`, every outstanding one of its consumer up to
    /// it). With `confirm`, answers [`Outcome::Settled`] once the settlement is durable.
    pub fn ack(
        &self,
        caller: &Caller,
        delivery: DeliveryRef<'_>,
        multiple: bool,
        confirm: Option<Confirm>,
    ) -> Result<(), BrokerError> {
        self.settle(caller, delivery, confirm, |s, j, consumer, tag, _| s.ack(consumer, tag, multiple, j))
    }

    /// Acknowledges deliveries of one consumer, `(tag, multiple)` each, in order, under one
    /// lock of its queue and one dispatch after them all: a burst of acks read together costs
    /// that once, not once per ack. Each ack gets its own answer; the outer error (an unknown
    /// consumer) is every ack's.
    pub fn ack_all(
        &self,
        caller: &Caller,
        consumer_id: u64,
        acks: &[(u64, bool)],
    ) -> Result<Vec<Result<(), BrokerError>>, BrokerError> {
        let queue = self.owned_queue(caller, consumer_id)?;
        queue.with_state(|s, j, _| {
            let mut ack = |&(tag, multiple): &(u64, bool)| {
                s.ack(consumer_id, tag, multiple, j).map(|_| ()).map_err(|e| settle_error(consumer_id, e))
            };
            acks.iter().map(&mut ack).collect()
        })
    }

    /// Negatively acknowledges a delivery: requeued as a failed delivery, or dead (`rejected`).
    pub fn nack(
        &self,
        caller: &Caller,
        delivery: DeliveryRef<'_>,
        options: NackOptions,
        confirm: Option<Confirm>,
    ) -> Result<(), BrokerError> {
        let NackOptions { multiple, requeue, error, delay_ms } = options;
        if let Some(delay) = delay_ms {
            check_duration("delay_ms", delay)?;
        }
        self.settle(caller, delivery, confirm, |s, j, consumer, tag, now| {
            s.nack(consumer, tag, multiple, requeue, &error, delay_ms, now, j)
        })
    }

    /// Pushes a delivery's ack deadline (or a pulled message's visibility) to `extend_ms` from
    /// now.
    pub fn extend(
        &self,
        caller: &Caller,
        delivery: DeliveryRef<'_>,
        extend_ms: u64,
    ) -> Result<(), BrokerError> {
        check_duration("extend_ms", extend_ms)?;
        let (queue, consumer_id, tag) = self.resolve(caller, delivery)?;
        queue
            .with_state(|s, _, now| s.extend(consumer_id, tag, extend_ms, now))?
            .map_err(|e| settle_error(consumer_id, e))
    }

    /// Gives the queues of these consumers a chance to deliver again (their connection had
    /// no room and has drained).
    pub fn redispatch(&self, consumer_ids: impl IntoIterator<Item = u64>) {
        let mut seen: Vec<Arc<Queue>> = Vec::new();
        for consumer_id in consumer_ids {
            let Some(queue) = self.consumers.get(&consumer_id).map(|o| o.queue.clone()) else { continue };
            if !seen.iter().any(|q| Arc::ptr_eq(q, &queue)) {
                queue.dispatch_now();
                seen.push(queue);
            }
        }
    }

    fn settle(
        &self,
        caller: &Caller,
        delivery: DeliveryRef<'_>,
        confirm: Option<Confirm>,
        op: impl FnOnce(
            &mut QueueState<Subscriber>,
            &mut dyn Journal,
            u64,
            u64,
            u64,
        ) -> Result<usize, SettleError>,
    ) -> Result<(), BrokerError> {
        let (queue, consumer_id, tag) = self.resolve(caller, delivery)?;
        let settled = queue
            .with_state(|s, j, now| op(s, j, consumer_id, tag, now))?
            .map_err(|e| settle_error(consumer_id, e))?;
        if let Some(confirm) = confirm {
            queue.confirm_when_durable(confirm, Outcome::Settled { count: settled as u64 });
        }
        Ok(())
    }

    /// The queue, consumer and tag a settlement names, if the caller may settle it.
    fn resolve(
        &self,
        caller: &Caller,
        delivery: DeliveryRef<'_>,
    ) -> Result<(Arc<Queue>, u64, u64), BrokerError> {
        match delivery {
            DeliveryRef::Tag { consumer_id, delivery_tag } => {
                Ok((self.owned_queue(caller, consumer_id)?, consumer_id, delivery_tag))
            }
            DeliveryRef::Receipt { queue, receipt } => {
                self.queues.get(queue)?;
                let (consumer_id, tag) = self.receipts.open(receipt)?;
                let owner = self
                    .consumers
                    .get(&consumer_id)
                    .filter(|o| o.connection_id == 0 && o.queue.name() == queue && o.user == caller.user)
                    .map(|o| o.queue.clone());
                let queue = owner.ok_or_else(|| {
                    BrokerError::NotFound(format!("unknown or already settled receipt '{receipt}'"))
                })?;
                Ok((queue, consumer_id, tag))
            }
        }
    }

    /// The queue of `consumer_id` if the caller's connection owns it.
    fn owned_queue(&self, caller: &Caller, consumer_id: u64) -> Result<Arc<Queue>, BrokerError> {
        self.consumers
            .get(&consumer_id)
            .filter(|o| o.connection_id == caller.connection_id && caller.connection_id != 0)
            .map(|o| o.queue.clone())
            .ok_or_else(|| unknown_consumer(consumer_id))
    }
}

fn unknown_consumer(consumer_id: u64) -> BrokerError {
    BrokerError::NotFound(format!("no consumer {consumer_id} on this connection"))
}

/// The error a front end reports for a failed settlement.
fn settle_error(consumer_id: u64, err: SettleError) -> BrokerError {
    match err {
        SettleError::UnknownConsumer(id) => unknown_consumer(id),
        SettleError::UnknownTag(tag) => {
            BrokerError::NotFound(format!("unknown delivery tag {tag} for consumer {consumer_id}"))
        }
        SettleError::Expired(tag) => BrokerError::PreconditionFailed(format!(
            "delivery expired: tag {tag} of consumer {consumer_id} passed its ack deadline and was taken back"
        )),
    }
}

/// Bodies up to this size are copied out of the frame they arrived in.
const COPIED_BODY_MAX: usize = 4096;

/// The body as a message keeps it. A small body sliced out of the connection's read buffer
/// would keep that whole buffer, and the frames around it, alive for as long as the message
/// waits; copied, it costs its own size. A large body is most of its frame and stays as it is.
fn own_body(body: Bytes) -> Bytes {
    if body.len() <= COPIED_BODY_MAX {
        Bytes::copy_from_slice(&body)
    } else {
        body
    }
}
