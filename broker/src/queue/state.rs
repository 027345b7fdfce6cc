//! A queue's state machine: ready messages, consumers and their prefetch windows.
//!
//! Plain data with methods and no I/O. Deliveries leave through a [`Sink`], which the broker
//! implements with a connection's outbox and the tests with a recorder.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::message::{Payload, QueuedMessage};
use crate::queue::window::Window;

/// Where a consumer's deliveries go.
pub trait Sink {
    /// False while the consumer's connection cannot take more bytes; dispatch skips it then.
    fn is_writable(&self) -> bool;
    /// Sends one delivery.
    fn deliver(&self, consumer_id: u64, delivery_tag: u64, message: &QueuedMessage);
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

    /// Appends a message at the tail.
    pub fn publish(&mut self, payload: Arc<Payload>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.ready.push_back(QueuedMessage { seq, delivery_count: 0, payload });
        self.counters.published += 1;
    }

    /// Subscribes a consumer with a prefetch window of `prefetch` (0 = unlimited).
    pub fn add_consumer(&mut self, id: u64, prefetch: u32, sink: S) {
        self.consumers.push(Consumer { id, window: Window::new(prefetch), sink });
    }

    /// Unsubscribes a consumer; its unacked deliveries return to the queue. Returns how many.
    pub fn remove_consumer(&mut self, id: u64) -> Option<usize> {
        let index = self.consumers.iter().position(|c| c.id == id)?;
        let mut consumer = self.consumers.remove(index);
        if self.cursor > index {
            self.cursor -= 1;
        }
        let ready = &mut self.ready;
        Some(consumer.window.take_all(|message| requeue(ready, message)))
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
    pub fn ack(&mut self, consumer_id: u64, tag: u64, multiple: bool) -> Result<usize, SettleError> {
        let consumer = self.consumer_mut(consumer_id)?;
        let count = settle(&mut consumer.window, tag, multiple, |_| {})?;
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
    ) -> Result<usize, SettleError> {
        let index = self.consumer_index(consumer_id)?;
        let ready = &mut self.ready;
        settle(&mut self.consumers[index].window, tag, multiple, |message| {
            if requeue_messages {
                requeue(ready, message);
            }
        })
    }

    /// Drops every ready message; unacked deliveries are untouched. Returns how many.
    pub fn purge(&mut self) -> usize {
        let count = self.ready.len();
        self.ready.clear();
        count
    }

    /// Pushes ready messages to consumers with room in their window, round-robin.
    pub fn dispatch(&mut self) {
        if self.consumers.is_empty() {
            return;
        }
        while !self.ready.is_empty() {
            let Some(index) = self.next_consumer() else { return };
            let mut message = self.ready.pop_front().expect("checked non-empty");
            message.delivery_count += 1;
            if message.redelivered() {
                self.counters.redelivered += 1;
            }
            self.counters.delivered += 1;
            let consumer = &mut self.consumers[index];
            let tag = consumer.window.next_tag();
            consumer.sink.deliver(consumer.id, tag, &message);
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
