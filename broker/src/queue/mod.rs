//! Queues: the lock-protected shell around each queue's state machine. One lock per queue, so
//! queues never slow each other down. The shell supplies the clock, runs the queue's timers,
//! routes dead messages to their dead-letter queue, and, for durable queues, hands records to
//! the log (`durable`).

mod durable;
mod exchanges;
mod publish_ids;
mod ready;
mod registry;
mod state;
mod window;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use crate::audit::AuditEvent;
use crate::error::BrokerError;
use crate::message::{Death, DeathReason, Payload, QueuedMessage};
use crate::storage::{Location, ReadError};

pub use crate::settings::{Overflow, Policy, QueueSettings};
pub use durable::{Durable, Storage};
pub use exchanges::{ExchangeCounters, ExchangeView, Routed};
pub use publish_ids::SavedIds;
pub use registry::{notify_cancelled, Declared, Deleted, Registry};
pub use state::{
    Counters, Journal, QueueFull, QueueState, ReadStall, Refusal, Scan, SettleError, Sink, Snapshot,
};
pub use window::Window;

use durable::DiskState;

/// What a confirmed request achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The message is held (on disk, for a durable queue).
    Published {
        /// Its id.
        message_id: u64,
        /// How many queues took it.
        routed: u32,
    },
    /// Deliveries were settled, and the settlement is as durable as a publish confirm.
    Settled {
        /// How many.
        count: u64,
    },
}

/// Where replicated queues send their publishes and the messages that left them: the
/// cluster, which commits them through Raft and applies them on every node.
pub trait Replicator: Send + Sync {
    /// Replicates a publish to `queue` (ready after `delay_ms`, living `ttl_ms`; 0 = no
    /// delay, no TTL of its own); `confirm` is answered once a majority holds it.
    fn publish(&self, queue: &str, payload: Arc<Payload>, delay_ms: u64, ttl_ms: u64, confirm: Confirm);
    /// The messages with these seqs left `queue` (acked, rejected, expired, purged) on this
    /// node; the cluster removes them everywhere if this node serves the queue.
    fn left(&self, queue: &str, seqs: Vec<u64>);
    /// True when this node serves `queue`: only the serving node routes the messages that die
    /// in it (the other nodes' copies follow its entries).
    fn serves(&self, queue: &str) -> bool;
}

/// A front end's connection, which answers its requests once they are due.
pub trait Replies: Send + Sync {
    /// Answers request `request_id`.
    fn reply(&self, request_id: u64, result: Result<Outcome, BrokerError>);
}

/// Where the answer to a request goes once it is due.
pub enum Confirm {
    /// The answer to request `request_id` of a connection.
    Reply {
        /// The connection.
        to: Arc<dyn Replies>,
        /// The request answered.
        request_id: u64,
    },
    /// A follow-up in the broker or a front end, e.g. settling a dead-lettered message in its
    /// old queue once the dead-letter queue holds it, or answering an HTTP request.
    Callback(Box<dyn FnOnce(Result<Outcome, BrokerError>) + Send>),
    /// One target queue's part of a message routed to several (see [`Confirm::split`]).
    Part(Arc<Split>, usize),
}

impl Confirm {
    /// The answer to `request_id`, sent to `to`.
    pub fn reply(to: Arc<dyn Replies>, request_id: u64) -> Self {
        Confirm::Reply { to, request_id }
    }

    /// Delivers the outcome or the error.
    pub fn send(self, result: Result<Outcome, BrokerError>) {
        match self {
            Confirm::Reply { to, request_id } => to.reply(request_id, result),
            Confirm::Callback(callback) => callback(result),
            Confirm::Part(split, target) => split.answer(target, result),
        }
    }
}

impl Confirm {
    /// One confirm per target queue, that together answer `self` once every one of them was
    /// answered: with the first refusal, naming its queue, or else with the outcome of the last.
    /// For a message routed to several queues. One allocation for them all: a fanout is on the
    /// hot path.
    pub fn split(self, targets: &[Arc<Queue>]) -> Vec<Confirm> {
        if targets.len() == 1 {
            return vec![self];
        }
        let split = Arc::new(Split {
            names: targets.iter().map(|q| q.name.clone()).collect(),
            remaining: std::sync::atomic::AtomicUsize::new(targets.len()),
            refused: Mutex::new(None),
            confirm: Mutex::new(Some(self)),
        });
        (0..targets.len()).map(|target| Confirm::Part(split.clone(), target)).collect()
    }
}

/// The answer owed for a message routed to several queues, waiting for each queue's.
pub struct Split {
    /// The target queues' names (not the queues: a confirm a queue holds must not keep it).
    names: Vec<Arc<str>>,
    remaining: std::sync::atomic::AtomicUsize,
    refused: Mutex<Option<BrokerError>>,
    confirm: Mutex<Option<Confirm>>,
}

impl Split {
    fn answer(&self, target: usize, result: Result<Outcome, BrokerError>) {
        if let Err(err) = &result {
            let mut refused = self.refused.lock();
            if refused.is_none() {
                *refused = Some(err.named(&self.names[target]));
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let confirm = self.confirm.lock().take();
        let refused = self.refused.lock().take();
        if let Some(confirm) = confirm {
            confirm.send(match (refused, result) {
                (Some(err), _) => Err(err),
                (None, Ok(Outcome::Published { message_id, .. })) => {
                    Ok(Outcome::Published { message_id, routed: self.names.len() as u32 })
                }
                (None, other) => other,
            });
        }
    }
}

/// Where a consumer's deliveries go: a front end's connection, or a pull consumer's box.
pub type Subscriber = Arc<dyn Sink + Send + Sync>;

/// The targets of one dead message still to confirm, and what to do once they all have.
struct PendingDeath {
    remaining: std::sync::atomic::AtomicUsize,
    refused: AtomicBool,
    settle: Mutex<Option<Settle>>,
}

/// What runs once every target of a dead message answered.
type Settle = Box<dyn FnOnce(Result<Outcome, BrokerError>) + Send>;

impl PendingDeath {
    /// One share answered; the last one settles (or, if a target failed later, keeps the
    /// message in its old queue's log).
    fn answer(&self, ok: bool) {
        if !ok {
            self.refused.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(settle) = self.settle.lock().take() {
                let result = if self.refused.load(Ordering::Acquire) {
                    Err(BrokerError::ResourceLimit("a dead-letter target failed to store the message".into()))
                } else {
                    Ok(Outcome::Settled { count: 1 })
                };
                settle(result);
            }
        }
    }
}

/// How long dead messages whose bodies could not be read wait before the next try.
const PARKED_RETRY_MS: u64 = 500;

/// A message that died, on its way out of its queue (its payload loaded when it is routed).
pub(crate) struct Dead {
    message: QueuedMessage,
    reason: DeathReason,
}

/// One named queue.
pub struct Queue {
    me: Weak<Queue>,
    name: Arc<str>,
    settings: QueueSettings,
    deleted: AtomicBool,
    state: Mutex<Live>,
    durable: Option<Durable>,
    registry: Weak<Registry>,
    /// Unix ms of the earliest pending timer task; `u64::MAX` when none is pending.
    timer_at: AtomicU64,
    /// Ready depth above which the queue's alarm is raised; 0 = no alarm.
    alarm_depth: AtomicU64,
    alarm_raised: AtomicBool,
    /// Whether the last check of the queue's reads found them failing (see
    /// [`Queue::check_reads`]).
    reads_failing: AtomicBool,
    /// Dead messages whose stored bodies could not be read yet: they stay in the log (not
    /// settled) and are routed once their bodies can be read.
    parked: Mutex<Parked>,
    /// Held while the queue's metadata file is rewritten.
    meta_lock: Mutex<()>,
}

#[derive(Default)]
struct Parked {
    deaths: Vec<Dead>,
    error: String,
}

/// Everything behind the queue's lock.
struct Live {
    state: QueueState<Subscriber>,
    deleted: bool,
    disk: Option<DiskState>,
    /// Of a replicated queue: the publish ids of the messages it holds.
    publish_ids: publish_ids::PublishIds,
}

/// A replicated queue as its queue group's snapshot holds it.
pub struct Contents {
    /// Its messages, with their payloads.
    pub messages: Vec<QueuedMessage>,
    /// The seq its next publish takes: the same on every node, since only publishes, applied
    /// in log order, take seqs.
    pub next_seq: u64,
    /// The publish ids it has seen lately.
    pub publish_ids: SavedIds,
}

/// The journal of a transient queue: nothing to persist; dead messages are collected. For a
/// replicated queue it also collects the seqs of the messages that left, for the cluster.
struct MemJournal<'a> {
    deaths: &'a mut Vec<Dead>,
    left: Option<&'a mut Vec<u64>>,
}

impl Journal for MemJournal<'_> {
    fn delivered(&mut self, _: &QueuedMessage) {}
    fn settled(&mut self, message: &QueuedMessage) {
        if let Some(left) = &mut self.left {
            left.push(message.seq);
        }
    }
    fn requeued(&mut self, _: &mut QueuedMessage) {}
    fn failed(&mut self, _: &QueuedMessage) {}
    fn dead(&mut self, message: QueuedMessage, reason: DeathReason) {
        // A dead message of a replicated queue leaves the other copies once its dead-letter
        // queues hold it (see `Queue::route_dead`), so that a failover in between loses it
        // nowhere.
        self.deaths.push(Dead { message, reason });
    }
    fn load(&mut self, _: &QueuedMessage) -> Result<Arc<Payload>, ReadError> {
        Err(ReadError::Corrupt("a transient message has no stored copy".into()))
    }
    fn hold(&mut self, _: &Payload) {}
}

impl Queue {
    fn build(
        name: &str,
        settings: QueueSettings,
        state: QueueState<Subscriber>,
        disk: Option<DiskState>,
        durable: Option<Durable>,
        registry: Weak<Registry>,
    ) -> Arc<Queue> {
        Arc::new_cyclic(|me| Queue {
            me: me.clone(),
            name: name.into(),
            settings,
            deleted: AtomicBool::new(false),
            state: Mutex::new(Live { state, deleted: false, disk, publish_ids: Default::default() }),
            durable,
            registry,
            timer_at: AtomicU64::new(u64::MAX),
            alarm_depth: AtomicU64::new(0),
            alarm_raised: AtomicBool::new(false),
            reads_failing: AtomicBool::new(false),
            parked: Mutex::default(),
            meta_lock: Mutex::default(),
        })
    }

    /// The ready depth above which the alarm is raised (0 = none).
    pub fn alarm_depth(&self) -> u64 {
        self.alarm_depth.load(Ordering::Acquire)
    }

    /// True while the depth alarm is raised.
    pub fn alarm_raised(&self) -> bool {
        self.alarm_raised.load(Ordering::Acquire)
    }

    /// Compares the ready depth with the alarm threshold; returns `Some(raised)` on a
    /// transition.
    pub fn check_alarm(&self) -> Option<(bool, u64)> {
        let depth = self.alarm_depth();
        if depth == 0 && !self.alarm_raised() {
            return None;
        }
        let ready = self.snapshot().ready;
        let raised = self.alarm_raised();
        let now_raised = depth > 0 && if raised { ready >= depth } else { ready > depth };
        (now_raised != raised).then(|| {
            self.alarm_raised.store(now_raised, Ordering::Release);
            (now_raised, ready)
        })
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's declared settings.
    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// True once the queue was deleted; holders of a stale handle should look it up again.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Runs `f` on the state under the queue's lock, with the queue's journal and the current
    /// time, then dispatches whatever became deliverable. Afterwards, outside the lock, routes
    /// messages that died and schedules the queue's next timer. Fails with NOT_FOUND if the
    /// queue was deleted.
    pub fn with_state<R>(
        &self,
        f: impl FnOnce(&mut QueueState<Subscriber>, &mut dyn Journal, u64) -> R,
    ) -> Result<R, BrokerError> {
        let now = now_ms();
        let mut deaths = Vec::new();
        let mut left = Vec::new();
        let (result, next) = {
            let mut guard = self.state.lock();
            let live = &mut *guard;
            if live.deleted {
                return Err(BrokerError::queue_not_found(&self.name));
            }
            let result = match (&mut live.disk, &self.durable) {
                (Some(disk), Some(durable)) => {
                    let mut journal = durable.journal(disk, &mut deaths);
                    let result = f(&mut live.state, &mut journal, now);
                    live.state.dispatch(now, &mut journal);
                    durable.wake_if_pending(disk);
                    result
                }
                _ => {
                    let left = self.settings.replicated.then_some(&mut left);
                    let mut journal = MemJournal { deaths: &mut deaths, left };
                    let result = f(&mut live.state, &mut journal, now);
                    live.state.dispatch(now, &mut journal);
                    result
                }
            };
            (result, live.state.next_timer())
        };
        self.report_left(left);
        self.after_unlock(deaths, next);
        Ok(result)
    }

    /// Dispatches whatever can be delivered now (a consumer's connection drained, say).
    pub fn dispatch_now(&self) {
        let _ = self.with_state(|_, _, _| ());
    }

    /// Accepts a published message, visible after `delay_ms`, living at most `ttl_ms` (0 =
    /// the queue's TTL). A transient queue confirms at once; a durable one once the message is
    /// on disk (per the fsync policy).
    pub fn publish(
        &self,
        payload: Arc<Payload>,
        delay_ms: u64,
        ttl_ms: u64,
        confirm: Confirm,
    ) -> Result<(), BrokerError> {
        self.try_publish(payload, delay_ms, ttl_ms, confirm).map_err(|(err, _)| err)
    }

    /// Like [`Queue::publish`], but a refusal is answered through `confirm` too: for a message
    /// routed to several queues, whose one confirm waits for every queue's answer. `now` is
    /// the time of the publish, read once for all of them.
    pub fn publish_or_refuse(
        &self,
        payload: Arc<Payload>,
        now: u64,
        delay_ms: u64,
        ttl_ms: u64,
        confirm: Confirm,
    ) {
        if let Err((err, confirm)) = self.offer(payload, now, delay_ms, ttl_ms, confirm) {
            confirm.send(Err(err));
        }
    }

    /// Like [`Queue::publish`], giving the confirm back with a refusal.
    pub(crate) fn try_publish(
        &self,
        payload: Arc<Payload>,
        delay_ms: u64,
        ttl_ms: u64,
        confirm: Confirm,
    ) -> Result<(), (BrokerError, Confirm)> {
        self.offer(payload, now_ms(), delay_ms, ttl_ms, confirm)
    }

    /// Takes the message, or gives the confirm back with the reason it did not.
    fn offer(
        &self,
        payload: Arc<Payload>,
        now: u64,
        delay_ms: u64,
        ttl_ms: u64,
        confirm: Confirm,
    ) -> Result<(), (BrokerError, Confirm)> {
        if self.settings.replicated {
            return self.offer_replicated(payload, delay_ms, ttl_ms, confirm);
        }
        let size = payload.size() as u64;
        let id = payload.id;
        let mut deaths = Vec::new();
        let mut guard = self.state.lock();
        let live = &mut *guard;
        if live.deleted {
            return Err((BrokerError::queue_not_found(&self.name), confirm));
        }
        let room = match (&mut live.disk, &self.durable) {
            (Some(disk), Some(durable)) => {
                live.state.make_room(size, &mut durable.journal(disk, &mut deaths))
            }
            _ => live.state.make_room(size, &mut MemJournal { deaths: &mut deaths, left: None }),
        };
        let refused = match room {
            Err(full) => {
                Some(BrokerError::ResourceLimit(format!("queue '{}' is full ({})", self.name, full.0)))
            }
            Ok(_) => self.durable.as_ref().and_then(Durable::refusal),
        };
        if let Some(err) = refused {
            let next = live.state.next_timer();
            drop(guard);
            self.after_unlock(deaths, next);
            return Err((err, confirm));
        }
        let now_confirmed = match (&mut live.disk, &self.durable) {
            (Some(disk), Some(durable)) => {
                let mut message = QueuedMessage::transient(live.state.reserve_seq(), payload);
                message.set_expires_at_ms(live.state.expiry_for(now, ttl_ms));
                message.set_due_ms(if delay_ms > 0 { state::deadline(now, delay_ms) } else { 0 });
                live.state.reserve(size);
                durable.append_publish(disk, message, confirm);
                // A durable queue confirms from its storage thread.
                None
            }
            _ => {
                let mut journal = MemJournal { deaths: &mut deaths, left: None };
                live.state.publish(payload, now, delay_ms, ttl_ms);
                live.state.dispatch(now, &mut journal);
                Some(confirm)
            }
        };
        let next = live.state.next_timer();
        drop(guard);
        self.after_unlock(deaths, next);
        if let Some(confirm) = now_confirmed {
            confirm.send(Ok(Outcome::Published { message_id: id, routed: 1 }));
        }
        Ok(())
    }

    /// Hands a publish to a replicated queue to the cluster: it enters the queue on every
    /// node once a majority holds it ([`Queue::apply_publish`]), and is confirmed then.
    fn offer_replicated(
        &self,
        payload: Arc<Payload>,
        delay_ms: u64,
        ttl_ms: u64,
        confirm: Confirm,
    ) -> Result<(), (BrokerError, Confirm)> {
        if self.is_deleted() {
            return Err((BrokerError::queue_not_found(&self.name), confirm));
        }
        let Some(replicator) = self.registry.upgrade().and_then(|registry| registry.replicator()) else {
            let refusal = format!("queue '{}' is replicated, but this broker is not in a cluster", self.name);
            return Err((BrokerError::Internal(refusal), confirm));
        };
        replicator.publish(&self.name, payload, delay_ms, ttl_ms, confirm);
        Ok(())
    }

    /// A publish to this replicated queue, committed by the cluster: it enters the queue
    /// here, as on every node (in the same order, so with the same seq everywhere), unless the
    /// queue has seen a publish with the same `publish_id` (not 0) lately (see
    /// [`publish_ids`]). Returns whether it entered.
    pub fn apply_publish(&self, payload: Arc<Payload>, delay_ms: u64, ttl_ms: u64, publish_id: u64) -> bool {
        let now = now_ms();
        let mut deaths = Vec::new();
        let mut left = Vec::new();
        let next = {
            let mut guard = self.state.lock();
            let live = &mut *guard;
            if live.deleted || live.publish_ids.contains(publish_id) {
                return false;
            }
            live.publish_ids.insert(live.state.next_seq(), publish_id);
            live.state.publish(payload, now, delay_ms, ttl_ms);
            let mut journal = MemJournal { deaths: &mut deaths, left: Some(&mut left) };
            live.state.dispatch(now, &mut journal);
            live.state.next_timer()
        };
        self.report_left(left);
        self.after_unlock(deaths, next);
        true
    }

    /// Messages of this replicated queue that left it on the node serving it, committed by
    /// the cluster: they leave here too (where they still wait: on the serving node they are
    /// gone already).
    pub fn apply_left(&self, seqs: &[u64]) {
        let mut guard = self.state.lock();
        for &seq in seqs {
            guard.state.remove_waiting(seq);
        }
        guard.publish_ids.remove(seqs);
    }

    /// Flags every waiting message as possibly delivered: this node takes over serving the
    /// queue from one that may have delivered them before it stopped.
    pub fn take_over(&self) {
        self.state.lock().state.mark_maybe_delivered();
    }

    /// What a snapshot of a replicated queue holds.
    pub fn contents(&self) -> Contents {
        let guard = self.state.lock();
        Contents {
            messages: guard.state.messages().map(|message| message.into_owned()).collect(),
            next_seq: guard.state.next_seq(),
            publish_ids: guard.publish_ids.saved(),
        }
    }

    /// Replaces the queue's messages with those of `contents` (a snapshot taken over from the
    /// cluster's leader); consumers keep their subscriptions.
    pub fn restore_contents(&self, contents: Contents) {
        let Contents { messages, next_seq, publish_ids } = contents;
        let mut guard = self.state.lock();
        let live = &mut *guard;
        live.state.set_next_seq(next_seq);
        live.publish_ids.replace(&publish_ids);
        let mut deaths = Vec::new();
        live.state.purge(&mut MemJournal { deaths: &mut deaths, left: None });
        for mut message in messages {
            message.delivery_count = 0;
            message.maybe_delivered = true;
            live.state.restore(message);
        }
    }

    /// Tells the cluster which messages left this replicated queue.
    fn report_left(&self, left: Vec<u64>) {
        if left.is_empty() {
            return;
        }
        if let Some(replicator) = self.registry.upgrade().and_then(|registry| registry.replicator()) {
            replicator.left(&self.name, left);
        }
    }

    /// Sends `response` once everything this queue has buffered for its log so far is as
    /// durable as a publish confirm: at once for a transient queue.
    pub fn confirm_when_durable(&self, confirm: Confirm, response: Outcome) {
        let mut guard = self.state.lock();
        if let (Some(disk), Some(durable)) = (guard.disk.as_mut(), &self.durable) {
            durable.defer_confirm(disk, confirm, response);
            return;
        }
        drop(guard);
        confirm.send(Ok(response));
    }

    /// Bytes of messages this queue holds in memory, for the memory watermark: payloads in
    /// memory, one index entry per message, and records waiting to be written.
    pub fn memory_bytes(&self) -> u64 {
        let live = self.state.lock();
        let index = live.state.len() as u64 * crate::message::INDEX_ENTRY_BYTES;
        match &live.disk {
            Some(disk) => disk.resident_bytes() as u64 + disk.pending_bytes() as u64 + index,
            None => live.state.held_bytes() + index,
        }
    }

    /// A snapshot of the queue's counts.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.state.lock().state.snapshot();
        if snapshot.read_error.is_empty() {
            let parked = self.parked.lock();
            if !parked.deaths.is_empty() {
                snapshot.read_error =
                    format!("{} dead message(s) wait to be routed: {}", parked.deaths.len(), parked.error);
            }
        }
        snapshot
    }

    /// Compares the queue's reads with the last check; returns `Some(error)` when they started
    /// failing (the error) or work again (empty).
    pub fn check_reads(&self) -> Option<String> {
        let failing = self.state.lock().state.read_stall().is_some() || !self.parked.lock().deaths.is_empty();
        if self.reads_failing.swap(failing, Ordering::AcqRel) == failing {
            return None;
        }
        Some(if failing { self.snapshot().read_error } else { String::new() })
    }

    /// Routes dead messages and schedules the next timer; called with the lock released.
    fn after_unlock(&self, deaths: Vec<Dead>, next_timer: Option<u64>) {
        // A node that does not serve a replicated queue leaves its dead messages to the one
        // that does: its copy loses them, and the serving node routes them once.
        let routes = || {
            !self.settings.replicated
                || self
                    .registry
                    .upgrade()
                    .and_then(|registry| registry.replicator())
                    .is_some_and(|r| r.serves(&self.name))
        };
        if !deaths.is_empty() && routes() {
            for dead in deaths {
                self.route_dead(dead);
            }
        }
        if let Some(at) = next_timer {
            self.schedule(at);
        }
    }

    /// Makes sure a timer task runs [`QueueState::tick`] at `at` (Unix ms). One pending task
    /// per queue at most for the earliest time, not one per message.
    fn schedule(&self, at: u64) {
        let mut current = self.timer_at.load(Ordering::Acquire);
        loop {
            if at >= current {
                return;
            }
            match self.timer_at.compare_exchange(current, at, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        let Some(registry) = self.registry.upgrade() else { return };
        let me = self.me.clone();
        registry.runtime().spawn(async move {
            let wait = at.saturating_sub(now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let Some(queue) = me.upgrade() else { return };
            let _ = queue.timer_at.compare_exchange(at, u64::MAX, Ordering::AcqRel, Ordering::Acquire);
            let _ = queue.with_state(|state, journal, now| state.tick(now, journal));
            queue.route_parked();
        });
    }

    /// Tries again to route the dead messages whose bodies could not be read.
    fn route_parked(&self) {
        let deaths = std::mem::take(&mut self.parked.lock().deaths);
        for dead in deaths {
            self.route_dead(dead);
        }
    }

    /// The payload of a dead message, read from its stored copy if it is not in memory.
    /// `Err` when it cannot be read now: the message then waits (parked) for another try. A
    /// corrupt copy yields an empty body, and the death says where the record was and why it
    /// is unreadable.
    fn dead_payload(
        &self,
        message: &mut QueuedMessage,
        reason: &mut DeathReason,
    ) -> Result<Arc<Payload>, String> {
        if let Some(payload) = &message.payload {
            return Ok(payload.clone());
        }
        let Some(durable) = &self.durable else {
            return Err("the message has neither a body in memory nor a stored copy".into());
        };
        if *reason != DeathReason::Corrupt {
            match durable.load(message) {
                Ok(payload) => return Ok(payload),
                Err(ReadError::Unavailable(err)) => return Err(err.to_string()),
                Err(ReadError::Corrupt(detail)) => {
                    let place = message.location.map_or_else(String::new, describe_location);
                    let error = format!("stored body is unreadable: {detail}{place}");
                    let failure = message.failure_mut(now_ms());
                    failure.error = error;
                    *reason = DeathReason::Corrupt;
                }
            }
        }
        let id = durable.salvage_id(message).unwrap_or(0);
        Ok(Arc::new(Payload { id, ..Payload::default() }))
    }

    /// Sends a dead message to the dead-letter queue (or drops it), records the death in the
    /// audit trail, and settles it here once the dead-letter queue holds it.
    fn route_dead(&self, dead: Dead) {
        let Dead { mut message, mut reason } = dead;
        let payload = match self.dead_payload(&mut message, &mut reason) {
            Ok(payload) => payload,
            Err(error) => {
                let mut parked = self.parked.lock();
                if parked.deaths.is_empty() {
                    tracing::warn!(queue = %self.name, seq = message.seq, error = %error, "a dead message's body cannot be read now; it stays stored and is routed once it can be");
                }
                parked.error = error;
                parked.deaths.push(Dead { message, reason });
                drop(parked);
                self.schedule(now_ms().saturating_add(PARKED_RETRY_MS));
                return;
            }
        };
        let failure = message.failure().cloned().unwrap_or_default();
        let now = now_ms();
        let death = Death {
            queue: self.name.to_string(),
            reason,
            count: message.delivery_count,
            error: failure.error.clone(),
            first_failure_ms: failure.first_ms,
            last_failure_ms: failure.last_ms,
            died_at_ms: now,
            exchange: payload.exchange.to_string(),
            routing_key: payload.routing_key.clone(),
        };
        let registry = self.registry.upgrade();
        let (targets, moved) = self.dead_letter_targets(registry.as_deref(), &payload, death);
        // Offer it to every target first: a refusal (e.g. a full queue) turns this into a drop,
        // and the audit trail must say what happened, not what was meant.
        let (seq, location) = (message.seq, message.location);
        let settle_here = {
            let me = self.me.clone();
            move |result: Result<Outcome, BrokerError>| {
                if let Err(err) = &result {
                    tracing::error!(error = %err, "dead-letter queue refused a message; it stays in its queue's log");
                    return;
                }
                let Some(queue) = me.upgrade() else { return };
                if let Some(location) = location {
                    queue.settle_stored(seq, location);
                }
                if queue.settings.replicated {
                    queue.report_left(vec![seq]);
                }
            }
        };
        // Each target that takes the message holds a share; the router holds one more while it
        // offers, so the settle runs once, after the last accepted target confirmed.
        let pending = Arc::new(PendingDeath {
            remaining: std::sync::atomic::AtomicUsize::new(1),
            refused: AtomicBool::new(false),
            settle: Mutex::new(Some(Box::new(settle_here))),
        });
        let mut taken_by = Vec::new();
        for target in &targets {
            pending.remaining.fetch_add(1, Ordering::AcqRel);
            let share = pending.clone();
            let confirm = Confirm::Callback(Box::new(move |result| share.answer(result.is_ok())));
            match target.try_publish(moved.clone(), 0, 0, confirm) {
                Ok(()) => taken_by.push(target.name().to_owned()),
                Err((err, _)) => {
                    pending.remaining.fetch_sub(1, Ordering::AcqRel);
                    tracing::error!(queue = %self.name, dead_letter = %target.name(), error = %err, "dead-letter queue refused the message");
                }
            }
        }
        let delivered_to = (!taken_by.is_empty()).then(|| taken_by.join(","));
        if delivered_to.is_some() {
            pending.answer(true);
        }
        if delivered_to.is_none() {
            // Dropped: it leaves this queue's log now.
            if let Some(location) = location {
                self.settle_stored(seq, location);
            }
            if self.settings.replicated {
                self.report_left(vec![seq]);
            }
        }
        let event = AuditEvent {
            time_ms: now,
            queue: self.name.to_string(),
            message_id: payload.id,
            reason: reason.as_str().to_owned(),
            count: message.delivery_count,
            consumer_id: failure.consumer_id,
            connection_id: failure.connection_id,
            error: failure.error,
            dead_letter: delivered_to.clone().unwrap_or_default(),
            exchange: payload.exchange.to_string(),
            routing_key: payload.routing_key.clone(),
        };
        match &delivered_to {
            Some(target) => tracing::info!(
                queue = %self.name, message_id = payload.id, reason = reason.as_str(), count = message.delivery_count,
                consumer_id = event.consumer_id, connection_id = event.connection_id, error = %event.error,
                dead_letter = %target, "message dead-lettered"
            ),
            None => tracing::warn!(
                queue = %self.name, message_id = payload.id, reason = reason.as_str(), count = message.delivery_count,
                consumer_id = event.consumer_id, connection_id = event.connection_id, error = %event.error,
                dead_letter = %self.settings.dead_letter,
                "message died and was dropped: no dead-letter queue is configured, it does not exist, or it refused the message"
            ),
        }
        if let Some(registry) = &registry {
            registry.audit().record(&event);
        }
    }

    /// Where a dead message goes: the dead-letter queue, and the queues the dead-letter exchange
    /// routes it to (with the dead-letter routing key, or its own), each once; and the message
    /// as it goes there, with its death added and, through an exchange, its new exchange and key.
    fn dead_letter_targets(
        &self,
        registry: Option<&Registry>,
        payload: &Payload,
        death: Death,
    ) -> (Vec<Arc<Queue>>, Arc<Payload>) {
        let mut moved = payload.with_death(death);
        let Some(registry) = registry else { return (Vec::new(), Arc::new(moved)) };
        let mut targets: Vec<Arc<Queue>> = Vec::new();
        if !self.settings.dead_letter.is_empty() {
            targets.extend(registry.get(&self.settings.dead_letter).ok());
        }
        let exchange = &self.settings.dead_letter_exchange;
        if !exchange.is_empty() {
            let key = match self.settings.dead_letter_routing_key.as_str() {
                "" => payload.routing_key.clone(),
                key => key.to_owned(),
            };
            match registry.route(exchange, &key, payload.headers()) {
                Ok(routed) => {
                    for queue in routed.queues {
                        if !targets.iter().any(|t| Arc::ptr_eq(t, &queue)) {
                            targets.push(queue);
                        }
                    }
                    moved.exchange = exchange.as_str().into();
                    moved.routing_key = key;
                }
                Err(err) => tracing::warn!(queue = %self.name, error = %err, "dead-letter exchange unusable"),
            }
        }
        (targets, Arc::new(moved))
    }

    /// Records in the log that a stored message left the queue (it is already gone from
    /// memory).
    fn settle_stored(&self, seq: u64, location: Location) {
        let mut guard = self.state.lock();
        if let (Some(disk), Some(durable)) = (guard.disk.as_mut(), &self.durable) {
            disk.log_settled(seq, location);
            durable.wake_if_pending(disk);
        }
    }
}

/// Where a stored record is, for error texts.
pub(crate) fn describe_location(location: Location) -> String {
    format!(" (segment {}, offset {}, {} bytes)", location.segment(), location.offset(), location.bytes())
}

/// Queue names are 1 to 255 bytes of UTF-8 without control characters.
pub fn validate_queue_name(name: &str) -> Result<(), BrokerError> {
    if name.is_empty() || name.len() > 255 {
        return Err(BrokerError::InvalidArgument(format!(
            "queue name must be 1 to 255 bytes, got {}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(BrokerError::InvalidArgument("queue name must not contain control characters".into()));
    }
    Ok(())
}

/// The wall clock in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
