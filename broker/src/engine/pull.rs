//! Pull consumers (`get`, SQS-style): one type for every front end. A pull consumer takes
//! nothing until a get grants it credit; its deliveries are collected in a [`PullBox`] and
//! handed back as the get's answer, each invisible to others until it is settled or its
//! visibility timeout passes.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{Caller, Delivery, Engine, MessageView, Owned};
use crate::auth::{Access, Resource};
use crate::error::BrokerError;
use crate::message::{Payload, QueuedMessage};
use crate::queue::{Queue, Refusal, Sink, Subscriber};

/// Most messages one get may ask for.
pub const MAX_GET_COUNT: u32 = 1000;

/// What a get asks for.
#[derive(Debug, Clone, Copy)]
pub struct Pull {
    /// Most messages (1 to [`MAX_GET_COUNT`]).
    pub count: u32,
    /// How long each pulled message stays invisible to others.
    pub visibility_ms: u64,
    /// How long to wait for the first message.
    pub wait: Duration,
    /// Most bytes the answer may carry on the wire.
    pub budget: usize,
}

/// Deliveries gathered for a pending get.
pub struct PullBox {
    connection_id: u64,
    /// Where to tell that a pulled message's visibility passed (the connection, if there is
    /// one; HTTP pulls have none).
    notices: Option<Subscriber>,
    collected: Mutex<Collected>,
    arrived: Notify,
}

/// What a get has gathered, and how much its answer may hold.
#[derive(Default)]
struct Collected {
    deliveries: Vec<Delivery>,
    /// Estimated bytes of the deliveries on the wire.
    bytes: usize,
    /// Most bytes the answer may carry (the caller's frame budget).
    budget: usize,
}

impl PullBox {
    fn new(connection_id: u64, notices: Option<Subscriber>) -> Self {
        PullBox { connection_id, notices, collected: Mutex::default(), arrived: Notify::new() }
    }

    /// Takes what was gathered; the next get sets its own budget.
    fn take(&self) -> Vec<Delivery> {
        let mut collected = self.collected.lock();
        collected.bytes = 0;
        std::mem::take(&mut collected.deliveries)
    }

    fn is_empty(&self) -> bool {
        self.collected.lock().deliveries.is_empty()
    }

    fn set_budget(&self, budget: usize) {
        self.collected.lock().budget = budget;
    }
}

impl Sink for PullBox {
    fn is_writable(&self) -> bool {
        true
    }

    /// Gathers a delivery while the answer stays within its budget, so a get never takes
    /// messages it cannot send back.
    fn deliver(
        &self,
        consumer_id: u64,
        delivery_tag: u64,
        message: &QueuedMessage,
        payload: &Payload,
    ) -> Result<(), Refusal> {
        let message = MessageView::of(message, payload);
        let size = message.wire_size();
        let mut collected = self.collected.lock();
        if collected.bytes + size > collected.budget {
            return Err(if collected.deliveries.is_empty() {
                Refusal::TooLarge { bytes: size, limit: collected.budget }
            } else {
                Refusal::Full
            });
        }
        collected.bytes += size;
        collected.deliveries.push(Delivery { consumer_id, delivery_tag, message });
        drop(collected);
        self.arrived.notify_one();
        Ok(())
    }

    fn expired(&self, consumer_id: u64, delivery_tag: u64) {
        if let Some(notices) = &self.notices {
            notices.expired(consumer_id, delivery_tag);
        }
    }

    fn connection_id(&self) -> u64 {
        self.connection_id
    }

    fn cancelled(&self, _: u64, _: &str) {}
}

/// A pull consumer, used by one get at a time.
pub(super) struct Puller {
    pub(super) consumer_id: u64,
    queue: Arc<Queue>,
    inbox: Arc<PullBox>,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Engine {
    /// Pulls up to `count` messages (at most [`MAX_GET_COUNT`]) from a queue, as many as fit
    /// in `budget` bytes on the wire, each invisible to others for `visibility_ms`; waits up to
    /// `wait` for the first one. A message that alone exceeds the budget dies `too_large`.
    /// Visibility expiries of a connection's pulls are told to `notices`. Deliveries of a
    /// caller without a connection are settled by [`Engine::receipt`].
    ///
    /// Each concurrent get uses a pull consumer of its own, so a long poll never holds up
    /// another request. If the returned future is dropped midway (the client went away), what
    /// it had collected goes back to the queue.
    pub async fn get(
        &self,
        caller: &Caller,
        queue: &str,
        pull: Pull,
        notices: Option<Subscriber>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let Pull { count, visibility_ms, wait, budget } = pull;
        if count == 0 || count > MAX_GET_COUNT {
            return Err(BrokerError::InvalidArgument(format!(
                "get takes a count of 1 to {MAX_GET_COUNT}, got {count}"
            )));
        }
        crate::settings::check_duration("visibility_ms", visibility_ms)?;
        self.check(caller, "get from", Access::Read, Resource::Queue(queue))?;
        let queue = self.queues.get(queue)?;
        self.check_serving(&queue)?;
        let (puller, turn) = self.puller(caller, &queue, notices)?;
        let consumer_id = puller.consumer_id;
        puller.inbox.set_budget(budget);
        queue
            .with_state(|s, _, _| {
                // Again under the queue's lock: see `Engine::consume`.
                self.check_serving(&queue)?;
                s.grant(consumer_id, count, visibility_ms)
                    .map_err(|e| BrokerError::Internal(format!("pull consumer {consumer_id} vanished: {e}")))
            })
            .and_then(|granted| granted)?;
        let mut guard = Abandoned { puller: puller.clone(), armed: true };
        if !wait.is_zero() {
            let deadline = tokio::time::sleep(wait);
            tokio::pin!(deadline);
            while puller.inbox.is_empty() {
                tokio::select! {
                    _ = puller.inbox.arrived.notified() => {}
                    _ = &mut deadline => break,
                }
            }
        }
        guard.armed = false;
        let deliveries = queue.with_state(|s, _, _| {
            s.revoke(consumer_id);
            puller.inbox.take()
        });
        drop(turn);
        if caller.connection_id == 0 {
            self.reclaim_idle_pullers(caller, queue.clone());
        }
        deliveries
    }

    /// Drops idle pull consumers of callers without a connection. Each concurrent HTTP pull
    /// needs one, and without this the pool would keep its peak size for as long as the queue
    /// lives. One idle consumer stays for the next pull; a consumer whose deliveries are not
    /// settled yet stays too (their receipts name it).
    fn reclaim_idle_pullers(&self, caller: &Caller, queue: Arc<Queue>) {
        let mut pullers = self.pullers.lock();
        let Some(pool) = pullers.get_mut(&(0, caller.user.clone(), queue.name().to_owned())) else { return };
        let mut reclaimed = Vec::new();
        let _ = queue.with_state(|s, j, now| {
            let mut kept_idle = false;
            pool.retain(|puller| {
                let idle = puller.turn.try_lock().is_ok() && s.outstanding(puller.consumer_id) == Some(0);
                if !idle || !std::mem::replace(&mut kept_idle, true) {
                    return true;
                }
                s.remove_consumer(puller.consumer_id, "idle pull consumer", now, j);
                reclaimed.push(puller.consumer_id);
                false
            });
        });
        drop(pullers);
        for consumer_id in reclaimed {
            self.consumers.remove(&consumer_id);
        }
    }

    /// A free pull consumer of the caller on `queue`, with its turn taken. A connection has
    /// one per queue, and one get at a time on it; callers without a connection (each HTTP
    /// request) get a new one when every one is busy. Consumers of a deleted queue are
    /// dropped.
    fn puller(
        &self,
        caller: &Caller,
        queue: &Arc<Queue>,
        notices: Option<Subscriber>,
    ) -> Result<(Arc<Puller>, tokio::sync::OwnedMutexGuard<()>), BrokerError> {
        let mut pullers = self.pullers.lock();
        let pool =
            pullers.entry((caller.connection_id, caller.user.clone(), queue.name().to_owned())).or_default();
        pool.retain(|p| !p.queue.is_deleted() && Arc::ptr_eq(&p.queue, queue));
        for puller in pool.iter() {
            if let Ok(turn) = puller.turn.clone().try_lock_owned() {
                return Ok((puller.clone(), turn));
            }
        }
        if caller.connection_id != 0 && !pool.is_empty() {
            return Err(BrokerError::PreconditionFailed(format!(
                "a get on queue '{}' is already waiting on this connection",
                queue.name()
            )));
        }
        let consumer_id = self.next_consumer_id();
        let inbox = Arc::new(PullBox::new(caller.connection_id, notices));
        let subscriber: Subscriber = inbox.clone();
        queue.with_state(|s, _, _| s.add_pull_consumer(consumer_id, subscriber))?;
        self.consumers.insert(
            consumer_id,
            Owned { queue: queue.clone(), connection_id: caller.connection_id, user: caller.user.clone() },
        );
        let puller = Arc::new(Puller {
            consumer_id,
            queue: queue.clone(),
            inbox,
            turn: Arc::new(tokio::sync::Mutex::new(())),
        });
        let turn = puller.turn.clone().try_lock_owned().expect("a new puller is free");
        pool.push(puller.clone());
        Ok((puller, turn))
    }
}

/// Undoes a get whose caller went away: stops the grant and puts back what was collected.
struct Abandoned {
    puller: Arc<Puller>,
    armed: bool,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (consumer_id, inbox) = (self.puller.consumer_id, &self.puller.inbox);
        let _ = self.puller.queue.with_state(|s, j, now| {
            s.revoke(consumer_id);
            for delivery in inbox.take() {
                let _ = s.nack(
                    consumer_id,
                    delivery.delivery_tag,
                    false,
                    true,
                    "pull abandoned",
                    Some(0),
                    now,
                    j,
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Audit;
    use crate::config::Config;
    use crate::engine::{DeliveryRef, NewMessage};
    use crate::queue::{Confirm, Registry};
    use crate::settings::QueueSettings;
    use crate::storage::Store;

    /// An engine over a fresh data directory.
    fn engine(dir: &std::path::Path) -> Arc<Engine> {
        let config = Config { data_dir: dir.to_path_buf(), ..Config::default() };
        let store = Store::open(dir).unwrap();
        let audit = Audit::open(&dir.join("audit"), 1 << 20).unwrap();
        let registry =
            Registry::recover(store, config.storage(), audit, tokio::runtime::Handle::current()).unwrap();
        let users = crate::auth::Users::open(dir).unwrap();
        Engine::new(config, registry, Arc::new(users))
    }

    fn pull(wait: Duration) -> Pull {
        Pull { count: 1, visibility_ms: 60_000, wait, budget: 1 << 20 }
    }

    #[tokio::test]
    async fn idle_http_pull_consumers_are_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let http = Caller::broker();
        engine.declare(&http, "q", QueueSettings::default(), None).await.unwrap();

        // Five long polls at once: five pull consumers.
        let polls: Vec<_> = (0..5)
            .map(|_| {
                let (engine, http) = (engine.clone(), http.clone());
                tokio::spawn(async move { engine.get(&http, "q", pull(Duration::from_secs(30)), None).await })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while engine.queue_info(&http, "q").unwrap().snapshot.consumers < 5 {
            assert!(tokio::time::Instant::now() < deadline, "the five polls never all waited");
            tokio::task::yield_now().await;
        }
        for i in 0..5 {
            let message = NewMessage { body: format!("m{i}").into(), ..NewMessage::default() };
            engine.publish(&http, "q", message, Confirm::Callback(Box::new(|_| {}))).unwrap();
        }
        for poll in polls {
            let delivery = poll.await.unwrap().unwrap().remove(0);
            let receipt = engine.receipt(&delivery);
            engine.ack(&http, DeliveryRef::Receipt { queue: "q", receipt: &receipt }, false, None).unwrap();
        }
        assert!(engine.pullers.lock()[&(0, None, "q".to_string())].len() <= 5);

        // The next pull finds them all idle: one stays.
        engine.get(&http, "q", pull(Duration::ZERO), None).await.unwrap();
        assert_eq!(engine.pullers.lock()[&(0, None, "q".to_string())].len(), 1);
        assert_eq!(engine.consumers.len(), 1, "the reclaimed consumers are gone from the queue too");
    }
}
