//! A queue's state machine: ready and delayed messages, consumers and their prefetch windows,
//! and the failure rules (delivery limit, retry backoff, TTL, ack timeouts).
//!
//! Plain data with methods and no I/O; time comes in as `now_ms` arguments, so tests run on a
//! made-up clock. Deliveries leave through a [`Sink`] (a connection's outbox, or a recorder in
//! tests). Every change a durable queue must persist, and every message that dies, is reported
//! to a [`Journal`].

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

use crate::message::{clip_error, DeathReason, Payload, QueuedMessage};
use crate::queue::ready::Ready;
use crate::queue::window::Window;
use crate::settings::{Overflow, Policy};
use crate::storage::ReadError;

/// Wait before the first retry of a failed body read; it doubles with each failure in a row.
const READ_RETRY_FIRST_MS: u64 = 10;
/// Longest wait between retries of a failed body read.
const READ_RETRY_MAX_MS: u64 = 1000;
/// Stale timer entries tolerated beyond as many as there are live ones, before the timer heaps
/// are rebuilt from the messages the queue holds.
const TIMER_SLACK: usize = 1024;

/// Where a consumer's deliveries go.
pub trait Sink {
    /// False while the consumer's connection cannot take more bytes; dispatch skips it then.
    fn is_writable(&self) -> bool;
    /// Sends one delivery of `message`, whose payload is `payload`, or says why it cannot.
    fn deliver(
        &self,
        consumer_id: u64,
        delivery_tag: u64,
        message: &QueuedMessage,
        payload: &Payload,
    ) -> Result<(), Refusal>;
    /// Tells the consumer that a delivery was taken back (its ack deadline passed).
    fn expired(&self, consumer_id: u64, delivery_tag: u64);
    /// The connection the consumer belongs to, for the audit trail.
    fn connection_id(&self) -> u64;
    /// Tells the consumer it was cancelled by the broker (its queue was deleted).
    fn cancelled(&self, consumer_id: u64, reason: &str);
}

/// Why a sink did not take a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It takes no more now (a pull's answer is as large as it may be); the message keeps its
    /// place.
    Full,
    /// The delivery would be larger than the consumer can ever receive (its max frame size).
    TooLarge {
        /// The delivery's size.
        bytes: usize,
        /// The most the consumer takes.
        limit: usize,
    },
}

impl<T: Sink + ?Sized> Sink for Arc<T> {
    fn is_writable(&self) -> bool {
        (**self).is_writable()
    }
    fn deliver(
        &self,
        consumer_id: u64,
        delivery_tag: u64,
        message: &QueuedMessage,
        payload: &Payload,
    ) -> Result<(), Refusal> {
        (**self).deliver(consumer_id, delivery_tag, message, payload)
    }
    fn expired(&self, consumer_id: u64, delivery_tag: u64) {
        (**self).expired(consumer_id, delivery_tag)
    }
    fn connection_id(&self) -> u64 {
        (**self).connection_id()
    }
    fn cancelled(&self, consumer_id: u64, reason: &str) {
        (**self).cancelled(consumer_id, reason)
    }
}

/// What a queue reports for persistence and dead-lettering. Called under the queue's lock, so
/// implementations only buffer; writing and routing happen after it is released.
pub trait Journal {
    /// `message` was just delivered; its delivery count is already raised.
    fn delivered(&mut self, message: &QueuedMessage);
    /// `message` left the queue for good (acked, dropped, purged).
    fn settled(&mut self, message: &QueuedMessage);
    /// `message` went back to the ready messages; the journal may drop its payload from memory.
    fn requeued(&mut self, message: &mut QueuedMessage);
    /// A delivery of `message` failed; its failure info and `due_ms` are updated.
    fn failed(&mut self, message: &QueuedMessage);
    /// `message` died and leaves the queue; the journal routes it to the dead-letter queue (or
    /// drops it) and settles it here once that is done.
    fn dead(&mut self, message: QueuedMessage, reason: DeathReason);
    /// Reads the payload of a message that is only on disk. It is not counted as held in
    /// memory until [`Journal::hold`] says it is kept.
    fn load(&mut self, message: &QueuedMessage) -> Result<Arc<Payload>, ReadError>;
    /// A payload read with [`Journal::load`] is now kept with its message (delivered, or taken
    /// to be moved); a peeked one is not.
    fn hold(&mut self, payload: &Payload);
}

/// Messages one [`QueueState::take_first`] call looks at, at most.
pub const SCAN_BATCH: usize = 1024;

/// What [`QueueState::take_first`] found.
#[derive(Debug)]
pub enum Scan {
    /// This message, taken out of the queue.
    Taken(QueuedMessage),
    /// Nothing yet; the search goes on from this seq.
    Passed {
        /// Where to look next.
        next_seq: u64,
    },
    /// Nothing in the range.
    Done,
}

/// The queue is full and refuses new messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queue is full ({0})")]
pub struct QueueFull(pub String);

/// Why a settle request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettleError {
    /// No consumer with this id on the queue.
    #[error("no consumer {0} on this queue")]
    UnknownConsumer(u64),
    /// The tag is not an outstanding delivery of the consumer.
    #[error("unknown delivery tag {0}")]
    UnknownTag(u64),
    /// The delivery's ack deadline passed and the message was taken back.
    #[error("delivery {0} expired: its ack deadline passed and the message was taken back")]
    Expired(u64),
}

/// Lifetime counters of a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages accepted.
    pub published: u64,
    /// Deliveries sent (redeliveries included).
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries of messages delivered before.
    pub redelivered: u64,
    /// Messages that died, by reason.
    pub dead: HashMap<DeathReason, u64>,
}

/// A point-in-time view of a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Messages waiting for a consumer.
    pub ready: u64,
    /// Deliveries not yet settled.
    pub unacked: u64,
    /// Messages waiting for their delay or retry backoff to pass.
    pub delayed: u64,
    /// Body bytes of the waiting (ready + delayed) messages.
    pub waiting_bytes: u64,
    /// Body bytes of every message held: waiting and unacked.
    pub held_bytes: u64,
    /// Unix ms of the publish of the message at the head, if its body is in memory; else 0.
    pub oldest_ready_ms: u64,
    /// Subscribed consumers.
    pub consumers: u32,
    /// Lifetime counters.
    pub counters: Counters,
    /// While stored bodies cannot be read (delivery is paused): why; empty when reads work.
    pub read_error: String,
}

/// Reads of stored bodies are failing for a reason that may pass: delivery is paused and
/// retried with backoff. No message is settled, dropped or dead-lettered because of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadStall {
    /// What the last failed read said.
    pub error: String,
    /// Unix ms of the first failure of this run.
    pub since_ms: u64,
    /// Unix ms of the next attempt.
    pub retry_at_ms: u64,
    /// Failed attempts in a row.
    pub attempts: u32,
}

struct Consumer<S> {
    id: u64,
    window: Window,
    sink: S,
    /// This consumer's ack timeout (its own, or the queue's); 0 = none.
    ack_timeout_ms: u64,
    /// For pull consumers: deliveries still wanted by the pending `Get`. `None` for push
    /// consumers, which take whatever their window allows.
    credit: Option<u32>,
}

/// The state of one queue.
pub struct QueueState<S> {
    /// Ready messages, ordered by `seq`.
    ready: Ready,
    /// Delayed messages by (due time, seq): the earliest is first.
    delayed: BTreeMap<(u64, u64), QueuedMessage>,
    /// Due time of each delayed message, by seq, to find it when it expires.
    delayed_due: HashMap<u64, u64>,
    /// (expiry, seq) of messages with a TTL; entries of messages gone since are skipped.
    expiries: BinaryHeap<Reverse<(u64, u64)>>,
    /// (deadline, consumer, tag) of deliveries with an ack timeout; stale entries are skipped.
    deadlines: BinaryHeap<Reverse<(u64, u64, u64)>>,
    next_seq: u64,
    /// Body bytes of the ready and delayed messages.
    waiting_bytes: u64,
    /// Messages and bytes of publishes accepted but not yet written (durable queues), counted
    /// against the queue's bounds.
    reserved: (u64, u64),
    consumers: Vec<Consumer<S>>,
    /// Index of the consumer that gets the next delivery (round-robin).
    cursor: usize,
    counters: Counters,
    policy: Policy,
    /// Set while stored bodies cannot be read.
    stall: Option<ReadStall>,
}

impl<S: Sink> QueueState<S> {
    /// An empty queue with these failure rules.
    pub fn new(policy: Policy) -> Self {
        QueueState {
            ready: Ready::default(),
            delayed: BTreeMap::new(),
            delayed_due: HashMap::new(),
            expiries: BinaryHeap::new(),
            deadlines: BinaryHeap::new(),
            next_seq: 0,
            waiting_bytes: 0,
            reserved: (0, 0),
            consumers: Vec::new(),
            cursor: 0,
            counters: Counters::default(),
            policy,
            stall: None,
        }
    }

    /// Set while delivery is paused because stored bodies cannot be read.
    pub fn read_stall(&self) -> Option<&ReadStall> {
        self.stall.as_ref()
    }

    /// The queue's failure rules.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Hands out the next arrival position.
    pub fn reserve_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// The seq the next message will get: every message in the queue now has a smaller one.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Continues numbering after recovered messages.
    pub fn set_next_seq(&mut self, next_seq: u64) {
        self.next_seq = self.next_seq.max(next_seq);
    }

    /// The expiry of a message entering the queue now with its own TTL (`ttl_ms`, 0 = none):
    /// the sooner of that and the queue's TTL.
    pub fn expiry_for(&self, now_ms: u64, ttl_ms: u64) -> u64 {
        [ttl_ms, self.policy.message_ttl_ms]
            .into_iter()
            .filter(|&t| t > 0)
            .min()
            .map_or(0, |t| deadline(now_ms, t))
    }

    /// Appends an in-memory message: ready at once, or after `delay_ms`.
    pub fn publish(&mut self, payload: Arc<Payload>, now_ms: u64, delay_ms: u64, ttl_ms: u64) {
        let seq = self.reserve_seq();
        let mut message = QueuedMessage::transient(seq, payload);
        message.set_expires_at_ms(self.expiry_for(now_ms, ttl_ms));
        message.set_due_ms(if delay_ms > 0 { deadline(now_ms, delay_ms) } else { 0 });
        self.admit(message);
    }

    /// Adds a newly published message whose seq, expiry and due time are set.
    pub fn admit(&mut self, message: QueuedMessage) {
        self.counters.published += 1;
        self.restore(message);
    }

    /// Adds a recovered message (ready, or delayed if its due time is set).
    pub fn restore(&mut self, message: QueuedMessage) {
        self.next_seq = self.next_seq.max(message.seq + 1);
        if message.expires_at_ms() != 0 {
            self.expiries.push(Reverse((message.expires_at_ms(), message.seq)));
        }
        self.push_waiting(message);
    }

    /// Makes room for a new message of `size` bytes under the queue's bounds: with
    /// `drop-head`, the oldest waiting messages die (`maxlen`); with `reject-publish`, a full
    /// queue refuses.
    pub fn make_room(&mut self, size: u64, journal: &mut dyn Journal) -> Result<(), QueueFull> {
        let (max_length, max_bytes) = (self.policy.max_length, self.policy.max_bytes);
        if max_length == 0 && max_bytes == 0 {
            return Ok(());
        }
        let over = |state: &Self| {
            let count = state.ready.len() as u64 + state.delayed.len() as u64 + state.reserved.0;
            let bytes = state.waiting_bytes + state.reserved.1;
            (max_length > 0 && count + 1 > max_length) || (max_bytes > 0 && bytes + size > max_bytes)
        };
        if !over(self) {
            return Ok(());
        }
        if self.policy.overflow == Overflow::RejectPublish {
            let limit = if max_length > 0 { format!("max_length {max_length}") } else { String::new() };
            let bytes = if max_bytes > 0 { format!("max_bytes {max_bytes}") } else { String::new() };
            let limits = [limit, bytes].into_iter().filter(|l| !l.is_empty()).collect::<Vec<_>>().join(", ");
            return Err(QueueFull(limits));
        }
        while over(self) {
            let Some(oldest) = self.pop_oldest_waiting() else { break };
            self.die(oldest, DeathReason::MaxLen, journal);
        }
        Ok(())
    }

    /// Lets the oldest waiting messages of a drop-head queue die (`maxlen`) while it is over its
    /// bounds: publishes accepted before they could be counted (a durable queue's, while being
    /// written) can take it over them.
    pub fn enforce_bounds(&mut self, journal: &mut dyn Journal) {
        let (max_length, max_bytes) = (self.policy.max_length, self.policy.max_bytes);
        if self.policy.overflow != Overflow::DropHead || (max_length == 0 && max_bytes == 0) {
            return;
        }
        loop {
            let count = self.ready.len() as u64 + self.delayed.len() as u64;
            let over =
                (max_length > 0 && count > max_length) || (max_bytes > 0 && self.waiting_bytes > max_bytes);
            if !over {
                return;
            }
            let Some(oldest) = self.pop_oldest_waiting() else { return };
            self.die(oldest, DeathReason::MaxLen, journal);
        }
    }

    /// Counts a publish accepted but not yet admitted (a durable queue's unwritten one).
    pub fn reserve(&mut self, size: u64) {
        self.reserved.0 += 1;
        self.reserved.1 += size;
    }

    /// Releases a reservation (the message was admitted, or its write failed).
    pub fn unreserve(&mut self, size: u64) {
        self.reserved.0 = self.reserved.0.saturating_sub(1);
        self.reserved.1 = self.reserved.1.saturating_sub(size);
    }

    /// Looks through the ready messages with `from_seq <= seq < below_seq`, oldest first, for
    /// the first one `wanted` accepts, and removes it to move it elsewhere; bodies only on disk
    /// are read for the look and dropped again unless taken. The message is out of the queue's
    /// counts until [`QueueState::give_back`] or the caller settles it.
    ///
    /// One call looks at no more than [`SCAN_BATCH`] messages, so a filter that matches little
    /// does not hold the queue's lock for long: it then says where to go on. A message whose
    /// stored body is corrupt is passed over (delivery dead-letters it); a read that may succeed
    /// later stops the search with its error, so nothing is passed over for a reason that
    /// passes.
    pub fn take_first(
        &mut self,
        from_seq: u64,
        below_seq: u64,
        mut wanted: impl FnMut(&QueuedMessage, &Payload) -> bool,
        journal: &mut dyn Journal,
    ) -> Result<Scan, ReadError> {
        for (looked, message) in self.ready.iter_from(from_seq).enumerate() {
            if message.seq >= below_seq {
                break;
            }
            if looked == SCAN_BATCH {
                return Ok(Scan::Passed { next_seq: message.seq });
            }
            let payload = match &message.payload {
                Some(payload) => payload.clone(),
                None => match journal.load(&message) {
                    Ok(payload) => payload,
                    Err(ReadError::Corrupt(_)) => continue,
                    Err(err) => return Err(err),
                },
            };
            if wanted(&message, &payload) {
                let seq = message.seq;
                let mut message = self.ready.remove(seq).expect("seen ready just now");
                if message.payload.is_none() {
                    journal.hold(&payload);
                    message.payload = Some(payload);
                }
                self.waiting_bytes -= u64::from(message.size);
                return Ok(Scan::Taken(message));
            }
        }
        Ok(Scan::Done)
    }

    /// Puts back a message taken with [`QueueState::take_first`].
    pub fn give_back(&mut self, message: QueuedMessage) {
        self.push_waiting(message);
    }

    /// The first `count` ready messages (payloads loaded through `journal` if needed), without
    /// changing anything.
    pub fn peek(&mut self, count: usize, journal: &mut dyn Journal) -> Vec<(QueuedMessage, Arc<Payload>)> {
        let mut found = Vec::with_capacity(count.min(self.ready.len()));
        for message in self.ready.iter().take(count) {
            let payload = match &message.payload {
                Some(payload) => payload.clone(),
                None => match journal.load(&message) {
                    Ok(payload) => payload,
                    Err(_) => continue,
                },
            };
            found.push((QueuedMessage { payload: None, ..message.into_owned() }, payload));
        }
        found
    }

    /// The message with this seq, ready, delayed or delivered.
    pub fn find_mut(&mut self, seq: u64) -> Option<&mut QueuedMessage> {
        if self.ready.contains(seq) {
            return self.ready.get_mut(seq);
        }
        if let Some(&due) = self.delayed_due.get(&seq) {
            return self.delayed.get_mut(&(due, seq));
        }
        self.consumers.iter_mut().find_map(|c| c.window.find_mut(seq))
    }

    /// Takes a waiting (ready or delayed) message out of the queue, as a settle would, without
    /// telling a journal; `None` if no message with this seq is waiting.
    pub fn remove_waiting(&mut self, seq: u64) -> Option<QueuedMessage> {
        let message = match self.delayed_due.remove(&seq) {
            Some(due) => self.delayed.remove(&(due, seq)),
            None => self.ready.remove(seq),
        }?;
        self.waiting_bytes -= u64::from(message.size);
        self.counters.acked += 1;
        Some(message)
    }

    /// Flags every waiting message as one that may have been delivered (AMQP's
    /// "redelivered"): its next delivery says so.
    pub fn mark_maybe_delivered(&mut self) {
        let seqs: Vec<u64> = self.ready.iter().map(|message| message.seq).collect();
        for seq in seqs {
            if let Some(message) = self.ready.get_mut(seq) {
                message.maybe_delivered = true;
            }
        }
        for message in self.delayed.values_mut() {
            message.maybe_delivered = true;
        }
    }

    /// Every message: ready, delayed and delivered.
    pub fn messages(&self) -> impl Iterator<Item = Cow<'_, QueuedMessage>> + '_ {
        self.ready
            .iter()
            .chain(self.delayed.values().map(Cow::Borrowed))
            .chain(self.consumers.iter().flat_map(|c| c.window.messages()).map(Cow::Borrowed))
    }

    /// Subscribes a consumer with a prefetch window of `prefetch` (0 = unlimited) and an ack
    /// timeout (0 = the queue's).
    pub fn add_consumer(&mut self, id: u64, prefetch: u32, ack_timeout_ms: u64, sink: S) {
        self.add_limited_consumer(id, prefetch, ack_timeout_ms, 0, sink);
    }

    /// Like [`QueueState::add_consumer`], for a consumer that takes at most `limit` deliveries
    /// (0 = no limit).
    pub fn add_limited_consumer(&mut self, id: u64, prefetch: u32, ack_timeout_ms: u64, limit: u64, sink: S) {
        let ack_timeout_ms = if ack_timeout_ms > 0 { ack_timeout_ms } else { self.policy.ack_timeout_ms };
        let credit = (limit > 0).then(|| limit.min(u64::from(u32::MAX)) as u32);
        self.consumers.push(Consumer { id, window: Window::new(prefetch), sink, ack_timeout_ms, credit });
    }

    /// Subscribes a pull consumer: it receives nothing until [`QueueState::grant`]ed credit.
    pub fn add_pull_consumer(&mut self, id: u64, sink: S) {
        let ack_timeout_ms = self.policy.ack_timeout_ms;
        self.consumers.push(Consumer { id, window: Window::new(0), sink, ack_timeout_ms, credit: Some(0) });
    }

    /// Lets a pull consumer receive up to `count` more messages, each invisible to others for
    /// `visibility_ms`.
    pub fn grant(&mut self, id: u64, count: u32, visibility_ms: u64) -> Result<(), SettleError> {
        let consumer = self.consumer_mut(id)?;
        consumer.credit = Some(count);
        consumer.ack_timeout_ms = visibility_ms;
        Ok(())
    }

    /// Changes a consumer's prefetch (0 = no limit).
    pub fn set_prefetch(&mut self, id: u64, prefetch: u32) -> Result<(), SettleError> {
        self.consumer_mut(id)?.window.set_capacity(prefetch);
        Ok(())
    }

    /// Stops deliveries to a consumer (a pull consumer's grant, or a push consumer that keeps
    /// only what it holds).
    pub fn revoke(&mut self, id: u64) {
        if let Ok(consumer) = self.consumer_mut(id) {
            consumer.credit = Some(0);
        }
    }

    /// Unsubscribes a consumer. Its unacked deliveries count as failed and return to the queue
    /// (or die, past the delivery limit). Returns how many it held.
    pub fn remove_consumer(
        &mut self,
        id: u64,
        reason: &str,
        now_ms: u64,
        journal: &mut dyn Journal,
    ) -> Option<usize> {
        let index = self.consumers.iter().position(|c| c.id == id)?;
        let mut consumer = self.consumers.remove(index);
        if self.cursor > index {
            self.cursor -= 1;
        }
        let mut returned = Vec::new();
        let count = consumer.window.take_all(|message| returned.push(message));
        let who = (consumer.id, consumer.sink.connection_id());
        for message in returned {
            self.fail(message, now_ms, reason, who, None, journal);
        }
        Some(count)
    }

    /// Removes every consumer without requeueing (the queue is going away).
    pub fn take_consumers(&mut self) -> Vec<(u64, S)> {
        self.cursor = 0;
        self.consumers.drain(..).map(|c| (c.id, c.sink)).collect()
    }

    /// Deliveries a consumer holds, if it is subscribed.
    pub fn outstanding(&self, consumer_id: u64) -> Option<usize> {
        self.consumers.iter().find(|c| c.id == consumer_id).map(|c| c.window.outstanding())
    }

    /// The sink of a subscribed consumer.
    pub fn sink(&self, consumer_id: u64) -> Option<&S> {
        self.consumers.iter().find(|c| c.id == consumer_id).map(|c| &c.sink)
    }

    /// Ids of the subscribed consumers.
    pub fn consumer_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.consumers.iter().map(|c| c.id)
    }

    /// Acknowledges one delivery, or with `multiple` every outstanding one up to `tag`.
    pub fn ack(
        &mut self,
        consumer_id: u64,
        tag: u64,
        multiple: bool,
        journal: &mut dyn Journal,
    ) -> Result<usize, SettleError> {
        let consumer = self.consumer_mut(consumer_id)?;
        let count = settle(&mut consumer.window, tag, multiple, |message| journal.settled(&message))?;
        self.counters.acked += count as u64;
        Ok(count)
    }

    /// Negatively acknowledges. With `requeue` each message counts a failed delivery and goes
    /// back (after `delay_ms`, or the queue's retry backoff); without it, it dies `rejected`.
    /// `error` is kept with the message (and in its death).
    #[allow(clippy::too_many_arguments)]
    pub fn nack(
        &mut self,
        consumer_id: u64,
        tag: u64,
        multiple: bool,
        requeue: bool,
        error: &str,
        delay_ms: Option<u64>,
        now_ms: u64,
        journal: &mut dyn Journal,
    ) -> Result<usize, SettleError> {
        let index = self.consumer_index(consumer_id)?;
        let who = (consumer_id, self.consumers[index].sink.connection_id());
        let mut settled = Vec::new();
        let count = settle(&mut self.consumers[index].window, tag, multiple, |m| settled.push(m))?;
        for mut message in settled {
            if requeue {
                let delay = delay_ms.or_else(|| self.backoff(message.delivery_count));
                self.fail(message, now_ms, error, who, delay, journal);
            } else {
                record_failure(&mut message, now_ms, error, who);
                self.die(message, DeathReason::Rejected, journal);
            }
        }
        Ok(count)
    }

    /// Pushes a delivery's ack deadline to `extend_ms` from now.
    pub fn extend(
        &mut self,
        consumer_id: u64,
        tag: u64,
        extend_ms: u64,
        now_ms: u64,
    ) -> Result<(), SettleError> {
        let consumer = self.consumer_mut(consumer_id)?;
        let expired = consumer.window.was_expired(tag);
        let message = consumer.window.get_mut(tag).ok_or(if expired {
            SettleError::Expired(tag)
        } else {
            SettleError::UnknownTag(tag)
        })?;
        let due = deadline(now_ms, extend_ms);
        message.set_due_ms(due);
        self.deadlines.push(Reverse((due, consumer_id, tag)));
        Ok(())
    }

    /// Drops every ready and delayed message; unacked deliveries are untouched. Returns how
    /// many.
    pub fn purge(&mut self, journal: &mut dyn Journal) -> usize {
        let count = self.ready.len() + self.delayed.len();
        for message in self.ready.drain().chain(std::mem::take(&mut self.delayed).into_values()) {
            journal.settled(&message);
        }
        self.delayed_due.clear();
        self.waiting_bytes = 0;
        self.stall = None;
        count
    }

    /// Earliest time at which [`QueueState::tick`] has work, if any.
    pub fn next_timer(&self) -> Option<u64> {
        let delayed = self.delayed.keys().next().map(|&(due, _)| due);
        let expiry = self.expiries.peek().map(|Reverse((at, _))| *at);
        let deadline = self.deadlines.peek().map(|Reverse((at, _, _))| *at);
        let retry = self.stall.as_ref().filter(|_| !self.ready.is_empty()).map(|s| s.retry_at_ms);
        [delayed, expiry, deadline, retry].into_iter().flatten().min()
    }

    /// Runs whatever is due at `now_ms`: delayed messages become ready, expired ones die, and
    /// deliveries past their ack deadline are taken back.
    pub fn tick(&mut self, now_ms: u64, journal: &mut dyn Journal) {
        while let Some((&(due, seq), _)) = self.delayed.first_key_value() {
            if due > now_ms {
                break;
            }
            let mut message = self.delayed.remove(&(due, seq)).expect("first key exists");
            self.delayed_due.remove(&seq);
            message.set_due_ms(0);
            self.ready.insert(message);
        }
        while let Some(&Reverse((at, seq))) = self.expiries.peek() {
            if at > now_ms {
                break;
            }
            self.expiries.pop();
            // Skip stale entries: the message is gone, delivered (checked when it comes back),
            // or its expiry changed.
            if self.waiting_expiry(seq) == Some(at) {
                let message = self.take_waiting(seq).expect("found waiting");
                self.die(message, DeathReason::Expired, journal);
            }
        }
        while let Some(&Reverse((at, consumer_id, tag))) = self.deadlines.peek() {
            if at > now_ms {
                break;
            }
            self.deadlines.pop();
            let Ok(index) = self.consumer_index(consumer_id) else { continue };
            let consumer = &mut self.consumers[index];
            if consumer.window.get_mut(tag).map(|m| m.due_ms()) != Some(at) {
                continue;
            }
            let message = consumer.window.expire(tag).expect("outstanding");
            consumer.sink.expired(consumer_id, tag);
            let who = (consumer_id, consumer.sink.connection_id());
            self.fail(message, now_ms, "ack timeout", who, None, journal);
        }
    }

    /// Pushes ready messages to consumers with room in their window, round-robin. A message
    /// that is only on disk is loaded first. If it cannot be read now, it stays at the head and
    /// delivery pauses until a retry (see [`ReadStall`]); if its record is corrupt, it dies
    /// `corrupt` with the damage described. Expired messages met on the way die instead of
    /// being delivered.
    pub fn dispatch(&mut self, now_ms: u64, journal: &mut dyn Journal) {
        self.compact_timers();
        if self.consumers.is_empty() || self.stall.as_ref().is_some_and(|s| now_ms < s.retry_at_ms) {
            return;
        }
        while !self.ready.is_empty() {
            let Some(index) = self.next_consumer() else { return };
            let mut message = self.ready.pop_front().expect("checked non-empty");
            self.waiting_bytes -= u64::from(message.size);
            if message.is_expired(now_ms) {
                self.die(message, DeathReason::Expired, journal);
                continue;
            }
            let payload = match &message.payload {
                Some(payload) => payload.clone(),
                None => match journal.load(&message) {
                    Ok(payload) => {
                        journal.hold(&payload);
                        message.payload = Some(payload.clone());
                        payload
                    }
                    Err(ReadError::Unavailable(err)) => {
                        self.waiting_bytes += u64::from(message.size);
                        self.ready.insert(message);
                        self.stall_reads(now_ms, err.to_string());
                        return;
                    }
                    Err(ReadError::Corrupt(detail)) => {
                        let place = message.location.map_or_else(String::new, super::describe_location);
                        let error = format!("stored body is unreadable: {detail}{place}");
                        record_failure(&mut message, now_ms, &error, (0, 0));
                        self.die(message, DeathReason::Corrupt, journal);
                        continue;
                    }
                },
            };
            self.stall = None;
            message.delivery_count += 1;
            let consumer = &mut self.consumers[index];
            let tag = consumer.window.next_tag();
            match consumer.sink.deliver(consumer.id, tag, &message, &payload) {
                Ok(()) => {}
                Err(Refusal::Full) => {
                    message.delivery_count -= 1;
                    self.waiting_bytes += u64::from(message.size);
                    self.ready.insert(message);
                    match &mut consumer.credit {
                        // The pull's answer is full: it takes what it has.
                        Some(credit) => *credit = 0,
                        None => return,
                    }
                    continue;
                }
                Err(Refusal::TooLarge { bytes, limit }) => {
                    message.delivery_count -= 1;
                    let who = (consumer.id, consumer.sink.connection_id());
                    let error = format!(
                        "a delivery of {bytes} bytes is larger than consumer {}'s max frame size of {limit} bytes",
                        consumer.id
                    );
                    record_failure(&mut message, now_ms, &error, who);
                    self.die(message, DeathReason::TooLarge, journal);
                    continue;
                }
            }
            if message.redelivered() {
                self.counters.redelivered += 1;
            }
            self.counters.delivered += 1;
            journal.delivered(&message);
            let consumer = &mut self.consumers[index];
            message.set_due_ms(0);
            if consumer.ack_timeout_ms > 0 {
                let due = deadline(now_ms, consumer.ack_timeout_ms);
                message.set_due_ms(due);
                self.deadlines.push(Reverse((due, consumer.id, tag)));
            }
            consumer.window.add(message);
            if let Some(credit) = &mut consumer.credit {
                *credit -= 1;
            }
            self.cursor = (index + 1) % self.consumers.len();
        }
    }

    /// The timer heaps delete lazily: an entry of a message that was acked, purged or died stays
    /// until its time comes. Once such entries outnumber the live ones (plus a slack), the heaps
    /// are rebuilt from what the queue holds, so settled messages cost no memory (a queue with a
    /// day-long TTL that is published to and purged would otherwise grow without bound).
    fn compact_timers(&mut self) {
        if self.expiries.len() > 2 * self.len() + TIMER_SLACK {
            self.expiries = self
                .messages()
                .filter(|m| m.expires_at_ms() != 0)
                .map(|m| Reverse((m.expires_at_ms(), m.seq)))
                .collect();
        }
        let outstanding: usize = self.consumers.iter().map(|c| c.window.outstanding()).sum();
        if self.deadlines.len() > 2 * outstanding + TIMER_SLACK {
            self.deadlines = self
                .consumers
                .iter()
                .flat_map(|c| {
                    c.window
                        .tagged()
                        .filter(|(_, m)| m.due_ms() != 0)
                        .map(|(tag, m)| Reverse((m.due_ms(), c.id, tag)))
                })
                .collect();
        }
    }

    /// Entries in the timer heaps (expiries, ack deadlines), live or stale.
    pub fn timer_entries(&self) -> usize {
        self.expiries.len() + self.deadlines.len()
    }

    /// Body bytes of every message held: waiting and unacked.
    pub fn held_bytes(&self) -> u64 {
        self.waiting_bytes + self.consumers.iter().map(|c| c.window.bytes()).sum::<u64>()
    }

    /// Counts and counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            ready: self.ready.len() as u64,
            unacked: self.consumers.iter().map(|c| c.window.outstanding() as u64).sum(),
            delayed: self.delayed.len() as u64,
            waiting_bytes: self.waiting_bytes,
            held_bytes: self.waiting_bytes + self.consumers.iter().map(|c| c.window.bytes()).sum::<u64>(),
            oldest_ready_ms: self.ready.front_payload().map_or(0, |p| p.published_at_ms),
            // An idle pull consumer (no pending get, nothing held) is not consuming.
            consumers: self
                .consumers
                .iter()
                .filter(|c| c.credit != Some(0) || c.window.outstanding() > 0)
                .count() as u32,
            counters: self.counters.clone(),
            read_error: self.stall.as_ref().map(|s| s.error.clone()).unwrap_or_default(),
        }
    }

    /// Every message the queue holds: ready, delayed and unacked.
    pub fn len(&self) -> usize {
        self.ready.len()
            + self.delayed.len()
            + self.consumers.iter().map(|c| c.window.outstanding()).sum::<usize>()
    }

    /// True when the queue holds no message at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A failed delivery: recorded on the message, then the message dies (delivery limit,
    /// expired) or goes back, ready or after `delay_ms`.
    #[allow(clippy::too_many_arguments)]
    fn fail(
        &mut self,
        mut message: QueuedMessage,
        now_ms: u64,
        error: &str,
        who: (u64, u64),
        delay_ms: Option<u64>,
        journal: &mut dyn Journal,
    ) {
        record_failure(&mut message, now_ms, error, who);
        let limit = self.policy.max_deliveries;
        if limit > 0 && message.delivery_count >= limit {
            self.die(message, DeathReason::DeliveryLimit, journal);
            return;
        }
        if message.is_expired(now_ms) {
            self.die(message, DeathReason::Expired, journal);
            return;
        }
        message.set_due_ms(match delay_ms {
            Some(delay) if delay > 0 => deadline(now_ms, delay),
            _ => 0,
        });
        journal.failed(&message);
        journal.requeued(&mut message);
        self.push_waiting(message);
    }

    /// Pauses delivery after a failed read; the next attempt waits twice as long as the last.
    fn stall_reads(&mut self, now_ms: u64, error: String) {
        let (since_ms, attempts) = self.stall.as_ref().map_or((now_ms, 0), |s| (s.since_ms, s.attempts));
        let wait = READ_RETRY_FIRST_MS.saturating_mul(1 << attempts.min(16)).min(READ_RETRY_MAX_MS);
        self.stall = Some(ReadStall {
            error,
            since_ms,
            retry_at_ms: now_ms.saturating_add(wait),
            attempts: attempts.saturating_add(1),
        });
    }

    /// The retry backoff before redelivery after `failures` failed deliveries.
    fn backoff(&self, failures: u32) -> Option<u64> {
        let schedule = &self.policy.retry_backoff_ms;
        let index = (failures.max(1) as usize - 1).min(schedule.len().checked_sub(1)?);
        Some(schedule[index])
    }

    fn die(&mut self, message: QueuedMessage, reason: DeathReason, journal: &mut dyn Journal) {
        *self.counters.dead.entry(reason).or_insert(0) += 1;
        journal.dead(message, reason);
    }

    /// The expiry of a message that is waiting (ready or delayed), by seq.
    fn waiting_expiry(&self, seq: u64) -> Option<u64> {
        if let Some(expiry) = self.ready.expiry_of(seq) {
            return Some(expiry);
        }
        let due = self.delayed_due.get(&seq)?;
        self.delayed.get(&(*due, seq)).map(|m| m.expires_at_ms())
    }

    /// Removes a message that is waiting (ready or delayed), by seq.
    fn take_waiting(&mut self, seq: u64) -> Option<QueuedMessage> {
        let message = if self.ready.contains(seq) {
            self.ready.remove(seq)
        } else {
            let due = self.delayed_due.remove(&seq)?;
            self.delayed.remove(&(due, seq))
        }?;
        self.waiting_bytes -= u64::from(message.size);
        Some(message)
    }

    /// Removes the oldest waiting message: the ready head, else the earliest delayed one.
    fn pop_oldest_waiting(&mut self) -> Option<QueuedMessage> {
        let message = match self.ready.pop_front() {
            Some(message) => message,
            None => {
                let (&(due, seq), _) = self.delayed.first_key_value()?;
                self.delayed_due.remove(&seq);
                self.delayed.remove(&(due, seq)).expect("first key exists")
            }
        };
        self.waiting_bytes -= u64::from(message.size);
        Some(message)
    }

    /// Adds a message to the waiting ones: delayed if it has a due time, else ready.
    fn push_waiting(&mut self, message: QueuedMessage) {
        self.waiting_bytes += u64::from(message.size);
        let due = message.due_ms();
        if due != 0 {
            self.delayed_due.insert(message.seq, due);
            self.delayed.insert((due, message.seq), message);
        } else {
            self.ready.insert(message);
        }
    }

    /// The first consumer from the cursor on that can take a delivery.
    fn next_consumer(&self) -> Option<usize> {
        let n = self.consumers.len();
        (0..n).map(|i| (self.cursor + i) % n).find(|&i| {
            let consumer = &self.consumers[i];
            consumer.credit != Some(0) && !consumer.window.is_full() && consumer.sink.is_writable()
        })
    }

    fn consumer_index(&self, id: u64) -> Result<usize, SettleError> {
        self.consumers.iter().position(|c| c.id == id).ok_or(SettleError::UnknownConsumer(id))
    }

    fn consumer_mut(&mut self, id: u64) -> Result<&mut Consumer<S>, SettleError> {
        let index = self.consumer_index(id)?;
        Ok(&mut self.consumers[index])
    }
}

/// The Unix ms `after_ms` after `now_ms`: every due time, expiry and ack deadline is computed
/// here. It saturates, so no duration, however large, wraps a deadline into the past (the
/// engine also refuses durations above [`crate::settings::MAX_DURATION_MS`]).
pub fn deadline(now_ms: u64, after_ms: u64) -> u64 {
    now_ms.saturating_add(after_ms)
}

/// Notes a failed delivery on the message: when, why, and by which (consumer, connection).
fn record_failure(message: &mut QueuedMessage, now_ms: u64, error: &str, who: (u64, u64)) {
    let failure = message.failure_mut(now_ms);
    failure.last_ms = now_ms;
    failure.error = clip_error(error.to_owned());
    (failure.consumer_id, failure.connection_id) = who;
}

/// Settles `tag` (or everything up to it) in `window`, passing each message to `settled`.
fn settle(
    window: &mut Window,
    tag: u64,
    multiple: bool,
    mut settled: impl FnMut(QueuedMessage),
) -> Result<usize, SettleError> {
    if multiple {
        if tag >= window.next_tag() {
            return Err(SettleError::UnknownTag(tag));
        }
        Ok(window.take_up_to(tag, settled))
    } else {
        match window.take(tag) {
            Some(message) => {
                settled(message);
                Ok(1)
            }
            None if window.was_expired(tag) => Err(SettleError::Expired(tag)),
            None => Err(SettleError::UnknownTag(tag)),
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod timer_tests;
#[cfg(test)]
mod unreadable_tests;
