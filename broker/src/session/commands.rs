//! The requests a session serves after the handshake: publishing, consuming (push and pull),
//! settling, queue management and the audit trail.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hopper_proto::{pb, Body, Frame};

use super::{convert, Puller, Session};
use crate::error::BrokerError;
use crate::message::Payload;
use crate::queue::{
    message_to_wire, now_ms, Confirm, Journal, PullBox, Queue, QueueState, SettleError, Subscriber,
};

/// Visibility timeout of pulled messages when the request names none (as SQS's default).
const DEFAULT_VISIBILITY_MS: u64 = 30_000;
/// Longest long poll.
const MAX_WAIT_MS: u64 = 20_000;

impl Session {
    /// Hands the message to its queue, which confirms it (at once, or once it is on disk).
    pub(super) fn publish(&mut self, request_id: u64, publish: pb::Publish) -> Result<(), BrokerError> {
        if !publish.exchange.is_empty() || !publish.routing_key.is_empty() {
            return Err(BrokerError::NotAllowed(
                "exchanges and routing keys are not supported in protocol version 1; publish to a queue by name"
                    .into(),
            ));
        }
        let queue = self.publish_target(&publish.queue)?;
        self.publisher = true;
        let payload = Arc::new(Payload {
            id: self.shared.next_message_id.fetch_add(1, Ordering::Relaxed),
            body: publish.body,
            headers: publish.headers,
            content_type: publish.content_type,
            published_at_ms: now_ms(),
            deaths: Vec::new(),
            replay_count: 0,
        });
        let confirm = Confirm::new(self.outbox.clone(), request_id);
        queue.publish(payload, publish.delay_ms, publish.ttl_ms, confirm)
    }

    /// The queue to publish to, from this connection's cache unless it was deleted since.
    fn publish_target(&mut self, name: &str) -> Result<Arc<Queue>, BrokerError> {
        if let Some(queue) = self.publish_cache.get(name) {
            if !queue.is_deleted() {
                return Ok(queue.clone());
            }
        }
        let queue = self.shared.queues.get(name)?;
        self.publish_cache.insert(name.to_owned(), queue.clone());
        Ok(queue)
    }

    pub(super) fn consume(
        &mut self,
        request_id: u64,
        consume: pb::Consume,
    ) -> Result<Option<Body>, BrokerError> {
        let queue = self.shared.queues.get(&consume.queue)?;
        let consumer_id = self.shared.next_consumer_id.fetch_add(1, Ordering::Relaxed);
        let outbox = self.outbox.clone();
        queue.with_state(|s, _, _| {
            s.add_limited_consumer(
                consumer_id,
                consume.prefetch_count,
                consume.ack_timeout_ms,
                consume.limit,
                Subscriber::Push(outbox.clone()),
            );
            // Queued before the dispatch that follows, so the client learns the consumer id
            // before its first delivery.
            outbox.push(&Frame::new(request_id, Body::ConsumeOk(pb::ConsumeOk { consumer_id })));
        })?;
        tracing::info!(queue = %consume.queue, consumer_id, prefetch = consume.prefetch_count, tag = %consume.tag, "consumer subscribed");
        self.consumers.insert(consumer_id, queue);
        Ok(None)
    }

    /// Pulls up to `count` messages; with `wait_ms`, waits for the first one that long (in a
    /// task of its own, so the connection goes on serving meanwhile).
    pub(super) fn get(&mut self, request_id: u64, get: pb::Get) -> Result<Option<Body>, BrokerError> {
        if get.count == 0 {
            return Err(BrokerError::InvalidArgument("get needs a count of at least 1".into()));
        }
        let queue = self.shared.queues.get(&get.queue)?;
        let visibility = if get.visibility_ms > 0 { get.visibility_ms } else { DEFAULT_VISIBILITY_MS };
        let puller = self.puller(&queue)?;
        if puller.busy.swap(true, Ordering::AcqRel) {
            return Err(BrokerError::PreconditionFailed(format!(
                "a get on queue '{}' is already waiting on this connection",
                get.queue
            )));
        }
        let (consumer_id, inbox, busy) = (puller.consumer_id, puller.inbox.clone(), puller.busy.clone());
        queue
            .with_state(|s, _, _| s.grant(consumer_id, get.count, visibility))?
            .map_err(settle_error(consumer_id))?;
        let finish = move |queue: &Queue| {
            let deliveries = queue
                .with_state(|s, _, _| {
                    s.revoke(consumer_id);
                    inbox.take()
                })
                .unwrap_or_default();
            busy.store(false, Ordering::Release);
            Body::GetOk(pb::GetOk { deliveries })
        };
        let wait = get.wait_ms.min(MAX_WAIT_MS);
        if wait == 0 || !puller.inbox.is_empty() {
            return Ok(Some(finish(&queue)));
        }
        let inbox = puller.inbox.clone();
        let outbox = self.outbox.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(Duration::from_millis(wait));
            tokio::pin!(deadline);
            while inbox.is_empty() {
                tokio::select! {
                    _ = inbox.arrived() => {}
                    _ = &mut deadline => break,
                }
            }
            outbox.push(&Frame::new(request_id, finish(&queue)));
        });
        Ok(None)
    }

    /// This connection's pull consumer on `queue`, created on first use.
    fn puller(&mut self, queue: &Arc<Queue>) -> Result<&Puller, BrokerError> {
        let stale =
            self.pullers.get(queue.name()).is_some_and(|p| !self.consumers.contains_key(&p.consumer_id));
        if stale || !self.pullers.contains_key(queue.name()) {
            let consumer_id = self.shared.next_consumer_id.fetch_add(1, Ordering::Relaxed);
            let inbox = Arc::new(PullBox::new(Some(self.outbox.clone())));
            let subscriber = Subscriber::Pull(inbox.clone());
            queue.with_state(|s, _, _| s.add_pull_consumer(consumer_id, subscriber))?;
            self.consumers.insert(consumer_id, queue.clone());
            let puller = Puller { consumer_id, inbox, busy: Arc::default() };
            self.pullers.insert(queue.name().to_owned(), puller);
        }
        Ok(&self.pullers[queue.name()])
    }

    pub(super) fn cancel(&mut self, consumer_id: u64) -> Result<Body, BrokerError> {
        let queue = self.consumers.remove(&consumer_id).ok_or_else(|| unknown_consumer(consumer_id))?;
        let requeued = queue
            .with_state(|s, j, now| s.remove_consumer(consumer_id, "consumer cancelled", now, j))
            .ok()
            .flatten()
            .unwrap_or(0) as u64;
        tracing::info!(queue = %queue.name(), consumer_id, requeued, "consumer cancelled");
        Ok(Body::CancelOk(pb::CancelOk { requeued }))
    }

    /// Settles deliveries of one of this connection's consumers; with `confirm`, answers
    /// `SettleOk` once the settlement is durable.
    pub(super) fn settle(
        &mut self,
        request_id: u64,
        confirm: bool,
        consumer_id: u64,
        tag: u64,
        op: impl FnOnce(
            &mut QueueState<Subscriber>,
            &mut dyn Journal,
            u64,
            u64,
            u64,
        ) -> Result<usize, SettleError>,
    ) -> Result<Option<Body>, BrokerError> {
        let queue = self.consumers.get(&consumer_id).ok_or_else(|| unknown_consumer(consumer_id))?;
        let settled = queue
            .with_state(|s, j, now| op(s, j, consumer_id, tag, now))?
            .map_err(settle_error(consumer_id))?;
        if confirm {
            let response = Body::SettleOk(pb::SettleOk { settled: settled as u64 });
            queue.confirm_when_durable(Confirm::new(self.outbox.clone(), request_id), response);
        }
        Ok(None)
    }

    pub(super) fn extend(&mut self, extend: pb::Extend) -> Result<Body, BrokerError> {
        let consumer_id = extend.consumer_id;
        let queue = self.consumers.get(&consumer_id).ok_or_else(|| unknown_consumer(consumer_id))?;
        queue
            .with_state(|s, _, now| s.extend(consumer_id, extend.delivery_tag, extend.extend_ms, now))?
            .map_err(settle_error(consumer_id))?;
        Ok(Body::SettleOk(pb::SettleOk { settled: 1 }))
    }

    pub(super) fn declare(&mut self, declare: pb::QueueDeclare) -> Result<Body, BrokerError> {
        if declare.passive {
            let queue = self.shared.queues.get(&declare.name)?;
            return Ok(Body::QueueDeclareOk(pb::QueueDeclareOk {
                queue: Some(convert::queue_info(&queue)),
                created: false,
            }));
        }
        let settings = convert::settings_from_wire(declare.settings.unwrap_or_default())?;
        let declared = self.shared.queues.declare(&declare.name, settings)?;
        Ok(Body::QueueDeclareOk(pb::QueueDeclareOk {
            queue: Some(convert::queue_info(&declared.queue)),
            created: declared.created,
        }))
    }

    pub(super) fn delete(&mut self, delete: pb::QueueDelete) -> Result<Body, BrokerError> {
        let deleted = self.shared.queues.delete(&delete.name, delete.if_unused, delete.if_empty)?;
        crate::queue::notify_cancelled(deleted.consumers, &format!("queue '{}' was deleted", delete.name));
        self.publish_cache.remove(&delete.name);
        Ok(Body::QueueDeleteOk(pb::QueueDeleteOk { message_count: deleted.messages }))
    }

    pub(super) fn audit(&mut self, query: pb::AuditQuery) -> Result<Body, BrokerError> {
        let limit = if query.limit == 0 { 1000 } else { query.limit as usize };
        let events = self
            .shared
            .queues
            .audit()
            .query(&query.queue, query.since_ms, limit)
            .map_err(|e| BrokerError::Internal(format!("cannot read the audit log: {e}")))?;
        let events = events
            .into_iter()
            .map(|e| pb::AuditEvent {
                time_ms: e.time_ms,
                queue: e.queue,
                message_id: e.message_id,
                reason: e.reason,
                count: e.count,
                consumer_id: e.consumer_id,
                connection_id: e.connection_id,
                error: e.error,
                dead_letter: e.dead_letter,
            })
            .collect();
        Ok(Body::AuditEvents(pb::AuditEvents { events }))
    }

    pub(super) fn status(&self) -> Body {
        let (memory_used, memory_high_watermark, disk_free, disk_free_low_watermark, held) =
            self.shared.flow.readings();
        let blocked = self.shared.flow.blocked();
        Body::BrokerStatusOk(pb::BrokerStatusOk {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.shared.started.elapsed().as_millis() as u64,
            connections: self.shared.connections.load(Ordering::Relaxed),
            blocked: blocked.is_some(),
            blocked_reason: blocked.unwrap_or_default(),
            blocked_publishers: held,
            memory_used,
            memory_high_watermark,
            disk_free,
            disk_free_low_watermark,
        })
    }

    pub(super) fn move_start(&self, start: pb::MoveStart) -> Result<Body, BrokerError> {
        let spec = convert::move_spec(start)?;
        let status = self.shared.moves.start(&self.shared.queues, &self.shared.events, spec)?;
        Ok(Body::MoveInfo(convert::move_info(status)))
    }

    pub(super) fn move_list(&self) -> Body {
        let moves = self.shared.moves.list(&self.shared.queues).into_iter().map(convert::move_info).collect();
        Body::MoveListOk(pb::MoveListOk { moves })
    }

    pub(super) fn move_cancel(&self, cancel: pb::MoveCancel) -> Result<Body, BrokerError> {
        let status = self.shared.moves.cancel(cancel.id, &self.shared.queues)?;
        Ok(Body::MoveInfo(convert::move_info(status)))
    }

    /// Browses the head of a queue without changing it.
    pub(super) fn peek(&self, peek: pb::Peek) -> Result<Body, BrokerError> {
        let queue = self.shared.queues.get(&peek.queue)?;
        let count = if peek.count == 0 { 10 } else { peek.count.min(10_000) } as usize;
        let found = queue.with_state(|s, j, _| s.peek(count, j))?;
        let messages = found.iter().map(|(message, payload)| message_to_wire(message, payload)).collect();
        Ok(Body::PeekOk(pb::PeekOk { messages }))
    }

    /// Gives queues that held deliveries back (the outbox was full) another chance.
    pub(super) fn redispatch(&self) {
        let mut seen: Vec<*const Queue> = Vec::new();
        for queue in self.consumers.values() {
            if !seen.contains(&Arc::as_ptr(queue)) {
                seen.push(Arc::as_ptr(queue));
                let _ = queue.with_state(|_, _, _| ());
            }
        }
    }

    /// Unsubscribes every consumer of this connection; their unacked messages go back, each
    /// counted as a failed delivery.
    pub(super) fn release_consumers(&mut self) {
        for (consumer_id, queue) in self.consumers.drain() {
            let released =
                queue.with_state(|s, j, now| s.remove_consumer(consumer_id, "connection closed", now, j));
            if let Ok(Some(requeued)) = released {
                if requeued > 0 {
                    tracing::info!(queue = %queue.name(), consumer_id, requeued, "unacked messages returned to the queue");
                }
            }
        }
        self.pullers.clear();
    }
}

fn unknown_consumer(consumer_id: u64) -> BrokerError {
    BrokerError::NotFound(format!("no consumer {consumer_id} on this connection"))
}

fn settle_error(consumer_id: u64) -> impl Fn(SettleError) -> BrokerError {
    move |err| match err {
        SettleError::UnknownConsumer(id) => unknown_consumer(id),
        SettleError::UnknownTag(tag) => {
            BrokerError::NotFound(format!("unknown delivery tag {tag} for consumer {consumer_id}"))
        }
        SettleError::Expired(tag) => BrokerError::PreconditionFailed(format!(
            "delivery expired: tag {tag} of consumer {consumer_id} passed its ack deadline and was taken back"
        )),
    }
}
