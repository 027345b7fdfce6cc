//! A queue's state machine: ready messages, consumers and their prefetch windows.
//!
//! Plain data with methods and no I/O. Deliveries leave through a [`Sink`], which the broker
//! implements with a connection's outbox and the tests with a recorder. Every change a durable
//! queue must persist is reported to a [`Journal`]; transient queues pass [`NoJournal`].

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use crate::message::{Payload, QueuedMessage};
use crate::queue::window::Window;

/// Where a consumer's deliveries go.
pub trait Sink {
    /// False while the consumer's connection cannot take more bytes; dispatch skips it then.
    fn is_writable(&self) -> bool;
    /// Sends one delivery of `message`, whose payload is `payload`.
    fn deliver(&self, consumer_id: u64, delivery_tag: u64, message: &QueuedMessage, payload: &Payload);
}

/// What a queue reports for persistence. Called under the queue's lock, so implementations
/// only buffer; the writing happens elsewhere.
pub trait Journal {
    /// `message` was just delivered; its delivery count is already raised.
    fn delivered(&mut self, message: &QueuedMessage);
    /// `message` left the queue for good (acked, dropped, purged).
    fn settled(&mut self, message: &QueuedMessage);
    /// `message` went back to the ready messages; the journal may drop its payload from memory.
    fn requeued(&mut self, message: &mut QueuedMessage);
    /// Reads the payload of a message that is only on disk.
    fn load(&mut self, message: &QueuedMessage) -> io::Result<Arc<Payload>>;
}

/// The journal of a transient queue: nothing is persisted, every payload is in memory.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoJournal;

impl Journal for NoJournal {
    fn delivered(&mut self, _: &QueuedMessage) {}
    fn settled(&mut self, _: &QueuedMessage) {}
    fn requeued(&mut self, _: &mut QueuedMessage) {}
    fn load(&mut self, _: &QueuedMessage) -> io::Result<Arc<Payload>> {
        Err(io::Error::other("a transient message has no stored copy"))
    }
}

/// Why a settle request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettleError {
    /// No consumer with this id on the queue.
    #[error("no consumer {0} on this queue")]
    UnknownConsumer(u64),
    /// The tag is not an outstanding delivery of the consumer.
    #[error("unknown delivery tag {0}")]
    UnknownTag(u64),
}

/// Lifetime counters of a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages accepted.
    pub published: u64,
    /// Deliveries sent (redeliveries included).
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries of messages delivered before.
    pub redelivered: u64,
}

/// A point-in-time view of a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Messages waiting for a consumer.
    pub ready: u64,
    /// Deliveries not yet settled.
    pub unacked: u64,
    /// Subscribed consumers.
    pub consumers: u32,
    /// Lifetime counters.
    pub counters: Counters,
}

struct Consumer<S> {
    id: u64,
    window: Window,
    sink: S,
}

/// The state of one queue.
pub struct QueueState<S> {
    /// Ready messages, ordered by `seq`.
    ready: VecDeque<QueuedMessage>,
    next_seq: u64,
    consumers: Vec<Consumer<S>>,
    /// Index of the consumer that gets the next delivery (round-robin).
    cursor: usize,
    counters: Counters,
}

impl<S: Sink> Default for QueueState<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Sink> QueueState<S> {
    /// An empty queue.
    pub fn new() -> Self {
        QueueState {
            ready: VecDeque::new(),
            next_seq: 0,
            consumers: Vec::new(),
            cursor: 0,
            counters: Counters::default(),
        }
    }

    /// Appends an in-memory message at the tail.
    pub fn publish(&mut self, payload: Arc<Payload>) {
        let seq = self.reserve_seq();
        self.push_ready(QueuedMessage::transient(seq, payload));
    }

    /// Hands out the next arrival position, for a message that becomes ready later (once it
    /// is on disk).
    pub fn reserve_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Continues numbering after recovered messages.
    pub fn set_next_seq(&mut self, next_seq: u64) {
        self.next_seq = self.next_seq.max(next_seq);
    }

    /// Adds a newly published message whose seq was reserved to the ready messages.
    pub fn push_ready(&mut self, message: QueuedMessage) {
        self.counters.published += 1;
        self.restore(message);
    }

    /// Adds a recovered message to the ready messages, in seq order.
    pub fn restore(&mut self, message: QueuedMessage) {
        self.next_seq = self.next_seq.max(message.seq + 1);
        requeue(&mut self.ready, message);
    }

    /// The message with this seq, ready or delivered.
    pub fn find_mut(&mut self, seq: u64) -> Option<&mut QueuedMessage> {
        let at = self.ready.partition_point(|m| m.seq < seq);
        if self.ready.get(at).is_some_and(|m| m.seq == seq) {
            return self.ready.get_mut(at);
        }
        self.consumers.iter_mut().find_map(|c| c.window.find_mut(seq))
    }

    /// Every message, ready or delivered.
    pub fn messages(&self) -> impl Iterator<Item = &QueuedMessage> + '_ {
        self.ready.iter().chain(self.consumers.iter().flat_map(|c| c.window.messages()))
    }

    /// Subscribes a consumer with a prefetch window of `prefetch` (0 = unlimited).
    pub fn add_consumer(&mut self, id: u64, prefetch: u32, sink: S) {
        self.consumers.push(Consumer { id, window: Window::new(prefetch), sink });
    }

    /// Unsubscribes a consumer; its unacked deliveries return to the queue. Returns how many.
    pub fn remove_consumer(&mut self, id: u64, journal: &mut dyn Journal) -> Option<usize> {
        let index = self.consumers.iter().position(|c| c.id == id)?;
        let mut consumer = self.consumers.remove(index);
        if self.cursor > index {
            self.cursor -= 1;
        }
        let ready = &mut self.ready;
        Some(consumer.window.take_all(|mut message| {
            journal.requeued(&mut message);
            requeue(ready, message);
        }))
    }

    /// Removes every consumer without requeueing (the queue is going away).
    pub fn take_consumers(&mut self) -> Vec<(u64, S)> {
        self.cursor = 0;
        self.consumers.drain(..).map(|c| (c.id, c.sink)).collect()
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

    /// Negatively acknowledges: with `requeue` the messages go back to their place near the
    /// head; without it they are dropped.
    pub fn nack(
        &mut self,
        consumer_id: u64,
        tag: u64,
        multiple: bool,
        requeue_messages: bool,
        journal: &mut dyn Journal,
    ) -> Result<usize, SettleError> {
        let index = self.consumer_index(consumer_id)?;
        let ready = &mut self.ready;
        settle(&mut self.consumers[index].window, tag, multiple, |mut message| {
            if requeue_messages {
                journal.requeued(&mut message);
                requeue(ready, message);
            } else {
                journal.settled(&message);
            }
        })
    }

    /// Drops every ready message; unacked deliveries are untouched. Returns how many.
    pub fn purge(&mut self, journal: &mut dyn Journal) -> usize {
        let count = self.ready.len();
        for message in self.ready.drain(..) {
            journal.settled(&message);
        }
        count
    }

    /// Pushes ready messages to consumers with room in their window, round-robin. A message
    /// that is only on disk is loaded first; one that cannot be read is dropped with an error.
    pub fn dispatch(&mut self, journal: &mut dyn Journal) {
        if self.consumers.is_empty() {
            return;
        }
        while !self.ready.is_empty() {
            let Some(index) = self.next_consumer() else { return };
            let mut message = self.ready.pop_front().expect("checked non-empty");
            let payload = match &message.payload {
                Some(payload) => payload.clone(),
                None => match journal.load(&message) {
                    Ok(payload) => {
                        message.payload = Some(payload.clone());
                        payload
                    }
                    Err(err) => {
                        tracing::error!(seq = message.seq, location = ?message.location, error = %err, "stored message is unreadable; dropped");
                        journal.settled(&message);
                        continue;
                    }
                },
            };
            message.delivery_count += 1;
            if message.redelivered() {
                self.counters.redelivered += 1;
            }
            self.counters.delivered += 1;
            journal.delivered(&message);
            let consumer = &mut self.consumers[index];
            let tag = consumer.window.next_tag();
            consumer.sink.deliver(consumer.id, tag, &message, &payload);
            consumer.window.add(message);
            self.cursor = (index + 1) % self.consumers.len();
        }
    }

    /// Counts and counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            ready: self.ready.len() as u64,
            unacked: self.consumers.iter().map(|c| c.window.outstanding() as u64).sum(),
            consumers: self.consumers.len() as u32,
            counters: self.counters,
        }
    }

    /// Every message the queue holds, ready and unacked.
    pub fn len(&self) -> usize {
        self.ready.len() + self.consumers.iter().map(|c| c.window.outstanding()).sum::<usize>()
    }

    /// True when the queue holds no message at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first consumer from the cursor on that can take a delivery.
    fn next_consumer(&self) -> Option<usize> {
        let n = self.consumers.len();
        (0..n).map(|i| (self.cursor + i) % n).find(|&i| {
            let consumer = &self.consumers[i];
            !consumer.window.is_full() && consumer.sink.is_writable()
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
        let message = window.take(tag).ok_or(SettleError::UnknownTag(tag))?;
        settled(message);
        Ok(1)
    }
}

/// Puts a message back among the ready ones at the place its arrival order gives it, so a
/// requeue restores FIFO order instead of reversing it.
fn requeue(ready: &mut VecDeque<QueuedMessage>, message: QueuedMessage) {
    let at = ready.partition_point(|m| m.seq < message.seq);
    ready.insert(at, message);
}

#[cfg(test)]
mod tests;
