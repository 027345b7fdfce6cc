//! The requests a session translates into engine calls: publishing, consuming (push and pull),
//! settling, queue management and the audit trail.

use std::sync::Arc;
use std::time::Duration;

use hopper_proto::{pb, Body, Frame};

use super::Session;
use crate::engine::{ConsumeOptions, DeliveryRef, NackOptions, NewMessage, Pull, Route};
use crate::error::BrokerError;
use crate::message::MessageProperties;
use crate::queue::{Confirm, Replies, Subscriber};
use crate::wire;

/// Visibility timeout of pulled messages when the request names none (as SQS's default).
const DEFAULT_VISIBILITY_MS: u64 = 30_000;
/// Longest long poll.
const MAX_WAIT_MS: u64 = 20_000;
/// Bytes of a `GetOk` frame besides its deliveries' messages.
const GET_OK_OVERHEAD: usize = 1024;

impl Session {
    /// Publishes to a queue, which confirms (at once, or once the message is on disk).
    pub(super) fn publish(&mut self, request_id: u64, publish: pb::Publish) -> Result<(), BrokerError> {
        self.publisher = true;
        self.publishes.start(self.engine.config().max_unconfirmed_per_connection)?;
        // Refused before its confirm was handed on: it is no longer in flight.
        self.publish_counted(request_id, publish).inspect_err(|_| self.publishes.abandon())
    }

    fn publish_counted(&mut self, request_id: u64, publish: pb::Publish) -> Result<(), BrokerError> {
        if !publish.queue.is_empty() && (!publish.exchange.is_empty() || !publish.routing_key.is_empty()) {
            return Err(BrokerError::InvalidArgument(
                "a publish names a queue, or an exchange and a routing key, not both".into(),
            ));
        }
        if publish.queue.is_empty() {
            let message = NewMessage {
                body: publish.body,
                properties: MessageProperties::new(publish.headers, publish.content_type),
                delay_ms: publish.delay_ms,
                ttl_ms: publish.ttl_ms,
                publish_id: publish.publish_id,
            };
            let route = Route {
                exchange: &publish.exchange,
                routing_key: &publish.routing_key,
                mandatory: publish.mandatory,
            };
            let confirm = Confirm::reply(self.publishes.clone(), request_id);
            return self.engine.publish_routed(&self.caller, route, message, confirm).map(|_| ());
        }
        let message = NewMessage {
            body: publish.body,
            properties: MessageProperties::new(publish.headers, publish.content_type),
            delay_ms: publish.delay_ms,
            ttl_ms: publish.ttl_ms,
            publish_id: publish.publish_id,
        };
        let confirm = Confirm::reply(self.publishes.clone(), request_id);
        // The connection keeps the queues it publishes to, unless one was deleted since.
        if self.publish_cache.get(&publish.queue).is_none_or(|t| t.is_stale()) {
            let target = self.engine.publish_target(&self.caller, &publish.queue)?;
            self.publish_cache.insert(publish.queue.clone(), target);
        }
        let target = &self.publish_cache[&publish.queue];
        self.engine.publish_to(&self.caller, target, message, confirm).map(|_| ())
    }

    pub(super) fn consume(&mut self, request_id: u64, consume: pb::Consume) -> Result<(), BrokerError> {
        let limit = self.engine.config().max_consumers_per_connection;
        if self.consumers.len() >= limit {
            return Err(BrokerError::ResourceLimit(format!(
                "this connection has {limit} consumers, the most it may (--max-consumers-per-connection)"
            )));
        }
        let options = ConsumeOptions {
            prefetch: consume.prefetch_count,
            ack_timeout_ms: consume.ack_timeout_ms,
            limit: consume.limit,
            tag: consume.tag,
        };
        let outbox = self.outbox.clone();
        // ConsumeOk is queued before the first delivery, so the client learns the consumer id
        // first.
        let announce = |consumer_id| {
            outbox.push(&Frame::new(request_id, Body::ConsumeOk(pb::ConsumeOk { consumer_id })));
        };
        let consumer_id =
            self.engine.consume(&self.caller, &consume.queue, options, self.sink(), announce)?;
        self.consumers.insert(consumer_id);
        Ok(())
    }

    /// Pulls up to `count` messages; with `wait_ms`, waits for the first one that long in a
    /// task of its own, so the connection goes on serving meanwhile.
    pub(super) async fn get(&mut self, request_id: u64, get: pb::Get) -> Result<Option<Body>, BrokerError> {
        let visibility = if get.visibility_ms > 0 { get.visibility_ms } else { DEFAULT_VISIBILITY_MS };
        let wait = Duration::from_millis(get.wait_ms.min(MAX_WAIT_MS));
        let (engine, caller, notices) = (self.engine.clone(), self.caller.clone(), Some(self.sink()));
        // The answer is one frame: room for its own fields besides the deliveries.
        let budget = (self.outbox.max_frame_size() as usize).saturating_sub(GET_OK_OVERHEAD);
        let pull = async move {
            let options = Pull { count: get.count, visibility_ms: visibility, wait, budget };
            let deliveries = engine.get(&caller, &get.queue, options, notices).await?;
            Ok(Body::GetOk(pb::GetOk { deliveries: deliveries.iter().map(wire::deliver).collect() }))
        };
        if wait.is_zero() {
            return pull.await.map(Some);
        }
        let outbox = self.outbox.clone();
        tokio::spawn(async move {
            let frame = match pull.await {
                Ok(body) => Frame::new(request_id, body),
                Err(err) => err.frame(request_id),
            };
            outbox.push(&frame);
        });
        Ok(None)
    }

    pub(super) fn cancel(&mut self, consumer_id: u64) -> Result<Body, BrokerError> {
        let requeued = self.engine.cancel(&self.caller, consumer_id, "consumer cancelled")?;
        self.consumers.remove(&consumer_id);
        Ok(Body::CancelOk(pb::CancelOk { requeued }))
    }

    /// Acknowledges; with `confirm`, answers `SettleOk` once the settlement is durable.
    pub(super) fn ack(&mut self, request_id: u64, ack: pb::Ack) -> Result<(), BrokerError> {
        let delivery = DeliveryRef::Tag { consumer_id: ack.consumer_id, delivery_tag: ack.delivery_tag };
        let confirm = self.settle_confirm(ack.confirm, request_id);
        self.engine.ack(&self.caller, delivery, ack.multiple, confirm)
    }

    pub(super) fn nack(&mut self, request_id: u64, nack: pb::Nack) -> Result<(), BrokerError> {
        let delivery = DeliveryRef::Tag { consumer_id: nack.consumer_id, delivery_tag: nack.delivery_tag };
        let options = NackOptions {
            multiple: nack.multiple,
            requeue: nack.requeue,
            error: nack.error,
            delay_ms: nack.delay_ms,
        };
        let confirm = self.settle_confirm(nack.confirm, request_id);
        self.engine.nack(&self.caller, delivery, options, confirm)
    }

    pub(super) fn reject(&mut self, request_id: u64, reject: pb::Reject) -> Result<(), BrokerError> {
        let delivery =
            DeliveryRef::Tag { consumer_id: reject.consumer_id, delivery_tag: reject.delivery_tag };
        let options =
            NackOptions { multiple: false, requeue: reject.requeue, error: reject.error, delay_ms: None };
        let confirm = self.settle_confirm(reject.confirm, request_id);
        self.engine.nack(&self.caller, delivery, options, confirm)
    }

    pub(super) fn extend(&mut self, extend: pb::Extend) -> Result<Body, BrokerError> {
        let delivery =
            DeliveryRef::Tag { consumer_id: extend.consumer_id, delivery_tag: extend.delivery_tag };
        self.engine.extend(&self.caller, delivery, extend.extend_ms)?;
        Ok(Body::SettleOk(pb::SettleOk { settled: 1 }))
    }

    pub(super) async fn declare(&mut self, declare: pb::QueueDeclare) -> Result<Body, BrokerError> {
        let (info, created) = if declare.passive {
            (self.engine.queue_info(&self.caller, &declare.name)?, false)
        } else {
            let settings = wire::settings_from_wire(declare.settings.unwrap_or_default())?;
            self.engine.declare(&self.caller, &declare.name, settings, None).await?
        };
        Ok(Body::QueueDeclareOk(pb::QueueDeclareOk { queue: Some(wire::queue_info(info)), created }))
    }

    pub(super) async fn delete(&mut self, delete: pb::QueueDelete) -> Result<Body, BrokerError> {
        let message_count =
            self.engine.delete_queue(&self.caller, &delete.name, delete.if_unused, delete.if_empty).await?;
        Ok(Body::QueueDeleteOk(pb::QueueDeleteOk { message_count }))
    }

    pub(super) async fn audit(&mut self, query: pb::AuditQuery) -> Result<Body, BrokerError> {
        let events = self.engine.audit(&self.caller, query.queue, query.since_ms, query.limit).await?;
        Ok(Body::AuditEvents(pb::AuditEvents { events: events.into_iter().map(wire::audit_event).collect() }))
    }

    pub(super) async fn declare_exchange(
        &mut self,
        declare: pb::ExchangeDeclare,
    ) -> Result<Body, BrokerError> {
        let spec = wire::exchange_spec(&declare).or_else(|err| match declare.passive {
            // A passive declare only names the exchange.
            true => Ok(crate::routing::ExchangeSpec {
                name: declare.name.clone(),
                kind: crate::routing::ExchangeKind::Direct,
                durable: false,
                alternate: None,
            }),
            false => Err(err),
        })?;
        let (view, created) = self.engine.declare_exchange(&self.caller, spec, declare.passive).await?;
        Ok(Body::ExchangeDeclareOk(pb::ExchangeDeclareOk {
            exchange: Some(wire::exchange_info(view)),
            created,
        }))
    }

    pub(super) async fn bind(&mut self, bind: pb::Bind) -> Result<Body, BrokerError> {
        let (source, binding) = wire::binding_from_wire(bind.binding)?;
        let created = self.engine.bind(&self.caller, &source, binding).await?;
        Ok(Body::BindOk(pb::BindOk { created }))
    }

    pub(super) async fn unbind(&mut self, unbind: pb::Unbind) -> Result<Body, BrokerError> {
        let (source, binding) = wire::binding_from_wire(unbind.binding)?;
        let removed = self.engine.unbind(&self.caller, &source, binding).await?;
        Ok(Body::UnbindOk(pb::UnbindOk { removed }))
    }

    pub(super) fn bindings(&self, list: pb::BindingList) -> Body {
        let exchange = (!list.exchange.is_empty()).then_some(list.exchange.as_str());
        let queue = (!list.queue.is_empty()).then_some(list.queue.as_str());
        let bindings = self
            .engine
            .list_bindings(&self.caller, exchange, queue)
            .into_iter()
            .map(|(source, binding)| wire::binding_to_wire(source, binding))
            .collect();
        Body::BindingListOk(pb::BindingListOk { bindings })
    }

    /// Unsubscribes every consumer of this connection; their unacked messages go back, each
    /// counted as a failed delivery.
    pub(super) fn release_consumers(&mut self) {
        self.engine.release_connection(&self.caller, self.consumers.drain());
    }

    /// This connection as a delivery target.
    fn sink(&self) -> Subscriber {
        self.outbox.clone()
    }

    /// This connection as the answerer of its requests.
    fn replies(&self) -> Arc<dyn Replies> {
        self.outbox.clone()
    }

    fn settle_confirm(&self, confirm: bool, request_id: u64) -> Option<Confirm> {
        confirm.then(|| Confirm::reply(self.replies(), request_id))
    }
}
