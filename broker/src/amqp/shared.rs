//! What the AMQP connections of one broker share: which connection owns each exclusive queue,
//! which consumer holds a queue exclusively, the direct reply-to consumers
//! (`amq.rabbitmq.reply-to`), the queues that expire unused (`x-expires`), and the exchanges
//! declared internal or auto-delete.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::sink::Tags;
use crate::engine::{Caller, Engine};
use crate::error::BrokerError;
use crate::outbox::Outbox;

/// The pseudo-queue a client consumes from for direct replies, and the prefix of the
/// reply-to addresses the broker hands out for it.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Where a direct reply goes: a no-ack consumer on one channel.
#[derive(Clone)]
pub struct ReplyConsumer {
    pub outbox: Arc<Outbox>,
    pub channel: u16,
    pub consumer_tag: String,
    pub tags: Arc<Mutex<Tags>>,
    pub frame_max: usize,
}

/// An `x-expires` queue: deleted once it has gone `after` without a consumer, a `basic.get`
/// or a declare.
struct Expiring {
    after: Duration,
    last_used: Instant,
}

#[derive(Default)]
pub struct Shared {
    /// Exclusive queue → the connection that declared it.
    exclusive_queues: Mutex<HashMap<String, u64>>,
    /// Queue → its exclusive consumer.
    exclusive_consumers: Mutex<HashMap<String, u64>>,
    /// Reply-to token → the consumer its replies go to.
    replies: Mutex<HashMap<String, ReplyConsumer>>,
    expiring: Mutex<HashMap<String, Expiring>>,
    /// Exchanges clients may not publish to.
    internal: parking_lot::RwLock<std::collections::HashSet<String>>,
    /// Auto-delete exchanges → whether one has been bound from yet (only then does losing its
    /// last binding delete it).
    auto_delete: Mutex<HashMap<String, bool>>,
}

impl Shared {
    /// Records `queue` as exclusive to connection `conn_id`.
    pub fn claim_exclusive(&self, queue: &str, conn_id: u64) {
        self.exclusive_queues.lock().insert(queue.to_owned(), conn_id);
    }

    /// Forgets the exclusive queues of connection `conn_id`.
    pub fn release_exclusive(&self, conn_id: u64) {
        self.exclusive_queues.lock().retain(|_, owner| *owner != conn_id);
    }

    /// Refuses connection `conn_id` the use of `queue` if another connection declared it
    /// exclusive (405, as RabbitMQ).
    pub fn check_exclusive(&self, queue: &str, conn_id: u64) -> Result<(), BrokerError> {
        match self.exclusive_queues.lock().get(queue) {
            Some(owner) if *owner != conn_id => Err(BrokerError::NotAllowed(format!(
                "cannot obtain exclusive access to locked queue '{queue}' in vhost '/'; it is exclusive \
                 to another connection"
            ))),
            _ => Ok(()),
        }
    }

    /// Records `consumer_id` as the only consumer of `queue`.
    pub fn hold_exclusively(&self, queue: &str, consumer_id: u64) {
        self.exclusive_consumers.lock().insert(queue.to_owned(), consumer_id);
    }

    /// True if some consumer holds `queue` exclusively.
    pub fn held_exclusively(&self, queue: &str) -> bool {
        self.exclusive_consumers.lock().contains_key(queue)
    }

    /// Consumer `consumer_id` is gone: whatever it held exclusively is free again.
    pub fn consumer_gone(&self, consumer_id: u64) {
        self.exclusive_consumers.lock().retain(|_, holder| *holder != consumer_id);
    }

    /// Registers a direct reply-to consumer and returns its token.
    pub fn add_reply_consumer(&self, consumer: ReplyConsumer) -> String {
        let token = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
        self.replies.lock().insert(token.clone(), consumer);
        token
    }

    pub fn remove_reply_consumer(&self, token: &str) {
        self.replies.lock().remove(token);
    }

    /// The consumer a routing key `amq.rabbitmq.reply-to.<token>` names, if it is still there.
    pub fn reply_consumer(&self, routing_key: &str) -> Option<ReplyConsumer> {
        let token = routing_key.strip_prefix(REPLY_TO)?.strip_prefix('.')?;
        self.replies.lock().get(token).cloned()
    }

    /// Makes `queue` expire after `after` unused, and watches it (again, after a redeclare).
    pub fn expire(self: &Arc<Self>, engine: &Arc<Engine>, queue: &str, after: Duration) {
        let watched = {
            let mut expiring = self.expiring.lock();
            let watched = expiring.contains_key(queue);
            expiring.insert(queue.to_owned(), Expiring { after, last_used: Instant::now() });
            watched
        };
        if !watched {
            let (shared, engine) = (Arc::downgrade(self), Arc::downgrade(engine));
            tokio::spawn(watch_expiry(shared, engine, queue.to_owned()));
        }
    }

    /// Records how exchange `name` was declared: `internal`, `auto_delete`.
    pub fn exchange_declared(&self, name: &str, internal: bool, auto_delete: bool) {
        if internal {
            self.internal.write().insert(name.to_owned());
        }
        if auto_delete {
            self.auto_delete.lock().entry(name.to_owned()).or_insert(false);
        }
    }

    /// Exchange `name` is gone.
    pub fn exchange_deleted(&self, name: &str) {
        self.internal.write().remove(name);
        self.auto_delete.lock().remove(name);
    }

    /// Refuses a publish to an internal exchange (403, as RabbitMQ).
    pub fn check_publish(&self, exchange: &str) -> Result<(), BrokerError> {
        if exchange.is_empty() || !self.internal.read().contains(exchange) {
            return Ok(());
        }
        Err(BrokerError::AccessRefused(format!(
            "cannot publish to internal exchange '{exchange}' in vhost '/'"
        )))
    }

    /// Exchange `source` got a binding.
    pub fn bound(&self, source: &str) {
        if let Some(bound) = self.auto_delete.lock().get_mut(source) {
            *bound = true;
        }
    }

    /// Deletes the auto-delete exchanges that have lost their last binding.
    pub async fn reap_exchanges(&self, engine: &Engine) {
        let candidates: Vec<String> = {
            let auto_delete = self.auto_delete.lock();
            auto_delete.iter().filter(|(_, bound)| **bound).map(|(name, _)| name.clone()).collect()
        };
        let caller = Caller::broker();
        for name in candidates {
            match engine.exchange(&name) {
                Ok(view) if view.bindings > 0 => continue,
                Ok(_) => match engine.delete_exchange(&caller, &name, true).await {
                    Ok(()) | Err(BrokerError::NotFound(_)) => {}
                    // Bound again meanwhile.
                    Err(BrokerError::PreconditionFailed(_)) => continue,
                    Err(error) => {
                        tracing::warn!(exchange = name, %error, "an auto-delete exchange was not deleted");
                        continue;
                    }
                },
                Err(_) => {}
            }
            self.exchange_deleted(&name);
        }
    }

    /// `queue` was used (consumed from, read with `basic.get`, declared): its expiry starts over.
    pub fn used(&self, queue: &str) {
        if let Some(expiring) = self.expiring.lock().get_mut(queue) {
            expiring.last_used = Instant::now();
        }
    }
}

/// Deletes `queue` once it has been unused for its expiry: no consumer, no `basic.get`, no
/// declare. Ends when the queue or the broker is gone.
async fn watch_expiry(shared: Weak<Shared>, engine: Weak<Engine>, queue: String) {
    let caller = Caller::broker();
    loop {
        let due = {
            let Some(shared) = shared.upgrade() else { return };
            let expiring = shared.expiring.lock();
            let Some(entry) = expiring.get(&queue) else { return };
            entry.last_used + entry.after
        };
        tokio::time::sleep_until(due).await;
        let (Some(shared), Some(engine)) = (shared.upgrade(), engine.upgrade()) else { return };
        let consumers = match engine.queue_info(&caller, &queue) {
            Ok(info) => info.snapshot.consumers,
            Err(_) => {
                shared.expiring.lock().remove(&queue);
                return;
            }
        };
        let after = {
            let mut expiring = shared.expiring.lock();
            let Some(entry) = expiring.get_mut(&queue) else { return };
            if consumers > 0 {
                // In use: the expiry counts from when the last consumer goes, at the earliest.
                entry.last_used = Instant::now();
                continue;
            }
            if entry.last_used + entry.after > Instant::now() {
                continue;
            }
            let after = entry.after;
            expiring.remove(&queue);
            after
        };
        match engine.delete_queue(&caller, &queue, true, false).await {
            Ok(dropped) => tracing::info!(queue, dropped, "queue expired unused (x-expires)"),
            Err(BrokerError::NotFound(_)) => {}
            // A consumer came just now: the queue is in use, and its expiry starts over.
            Err(BrokerError::PreconditionFailed(_)) => {
                shared.expiring.lock().insert(queue.clone(), Expiring { after, last_used: Instant::now() });
                continue;
            }
            Err(error) => tracing::warn!(queue, %error, "an expired queue was not deleted"),
        }
        return;
    }
}
