//! The per-consumer prefetch window: deliveries sent and not yet settled, by delivery tag.
//!
//! Tags are handed out one after another, so the window is a deque indexed by
//! `tag - base_tag`. Settling a tag in the middle leaves a hole that is trimmed once it
//! reaches the front, which makes every operation O(1) for in-order acks.

use std::collections::{BTreeSet, VecDeque};

use crate::message::QueuedMessage;

/// Unacknowledged deliveries of one consumer, bounded by its prefetch count.
#[derive(Debug)]
pub struct Window {
    /// Most outstanding deliveries; 0 = no limit.
    capacity: u32,
    /// Tag of `entries[0]`.
    base_tag: u64,
    entries: VecDeque<Option<QueuedMessage>>,
    outstanding: usize,
    /// Body bytes of the outstanding deliveries.
    bytes: u64,
    /// Recent tags taken back by an ack timeout, so a late settle gets a clear error.
    expired: BTreeSet<u64>,
}

/// Most expired tags remembered per consumer.
const EXPIRED_MEMORY: usize = 4096;

impl Window {
    /// An empty window; `capacity` 0 means unlimited.
    pub fn new(capacity: u32) -> Self {
        Window {
            capacity,
            base_tag: 1,
            entries: VecDeque::new(),
            outstanding: 0,
            bytes: 0,
            expired: BTreeSet::new(),
        }
    }

    /// True when no further delivery may be sent.
    pub fn is_full(&self) -> bool {
        self.capacity != 0 && self.outstanding >= self.capacity as usize
    }

    /// Deliveries sent and not settled.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Body bytes of the outstanding deliveries.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Changes the prefetch count; deliveries beyond a smaller one stay out until settled.
    pub fn set_capacity(&mut self, capacity: u32) {
        self.capacity = capacity;
    }

    /// The prefetch count this window enforces.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Records a delivery and returns its tag.
    pub fn add(&mut self, message: QueuedMessage) -> u64 {
        let tag = self.base_tag + self.entries.len() as u64;
        self.bytes += u64::from(message.size);
        self.entries.push_back(Some(message));
        self.outstanding += 1;
        tag
    }

    /// The tag the next delivery will get.
    pub fn next_tag(&self) -> u64 {
        self.base_tag + self.entries.len() as u64
    }

    /// Settles one delivery, returning its message, or `None` if the tag is not outstanding.
    pub fn take(&mut self, tag: u64) -> Option<QueuedMessage> {
        let index = tag.checked_sub(self.base_tag)? as usize;
        let message = self.entries.get_mut(index)?.take()?;
        self.outstanding -= 1;
        self.bytes -= u64::from(message.size);
        self.trim();
        Some(message)
    }

    /// Settles every outstanding delivery with a tag up to and including `tag` (all of them when
    /// `tag` is 0), passing each to `settled` in tag order.
    pub fn take_up_to(&mut self, tag: u64, mut settled: impl FnMut(QueuedMessage)) -> usize {
        let last = if tag == 0 { u64::MAX } else { tag };
        let mut count = 0;
        while self.base_tag <= last {
            let Some(entry) = self.entries.pop_front() else { break };
            self.base_tag += 1;
            if let Some(message) = entry {
                count += 1;
                self.bytes -= u64::from(message.size);
                settled(message);
            }
        }
        self.outstanding -= count;
        self.trim();
        count
    }

    /// Empties the window, passing each outstanding message to `settled` in tag order.
    pub fn take_all(&mut self, settled: impl FnMut(QueuedMessage)) -> usize {
        self.take_up_to(0, settled)
    }

    /// The outstanding delivery with this tag.
    pub fn get_mut(&mut self, tag: u64) -> Option<&mut QueuedMessage> {
        let index = tag.checked_sub(self.base_tag)? as usize;
        self.entries.get_mut(index)?.as_mut()
    }

    /// Takes back an outstanding delivery whose ack deadline passed, remembering its tag.
    pub fn expire(&mut self, tag: u64) -> Option<QueuedMessage> {
        let message = self.take(tag)?;
        self.expired.insert(tag);
        if self.expired.len() > EXPIRED_MEMORY {
            self.expired.pop_first();
        }
        Some(message)
    }

    /// True if `tag` was taken back by [`Window::expire`] (recently enough to remember).
    pub fn was_expired(&self, tag: u64) -> bool {
        self.expired.contains(&tag)
    }

    /// The outstanding delivery of the message with this seq.
    pub fn find_mut(&mut self, seq: u64) -> Option<&mut QueuedMessage> {
        self.entries.iter_mut().flatten().find(|m| m.seq == seq)
    }

    /// Every outstanding message, in tag order.
    pub fn messages(&self) -> impl Iterator<Item = &QueuedMessage> + '_ {
        self.entries.iter().flatten()
    }

    /// Every outstanding message with its tag, in tag order.
    pub fn tagged(&self) -> impl Iterator<Item = (u64, &QueuedMessage)> + '_ {
        (self.base_tag..).zip(self.entries.iter()).filter_map(|(tag, m)| Some((tag, m.as_ref()?)))
    }

    fn trim(&mut self) {
        while let Some(None) = self.entries.front() {
            self.entries.pop_front();
            self.base_tag += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::message::Payload;

    fn message(seq: u64) -> QueuedMessage {
        let payload = Payload { id: seq, ..Payload::default() };
        QueuedMessage { delivery_count: 1, ..QueuedMessage::transient(seq, Arc::new(payload)) }
    }

    #[test]
    fn fills_up_to_capacity_and_frees_on_ack() {
        let mut window = Window::new(2);
        assert_eq!(window.add(message(1)), 1);
        assert!(!window.is_full());
        assert_eq!(window.add(message(2)), 2);
        assert!(window.is_full());
        assert_eq!(window.take(1).map(|m| m.seq), Some(1));
        assert!(!window.is_full());
        assert_eq!(window.add(message(3)), 3);
        assert_eq!(window.outstanding(), 2);
    }

    #[test]
    fn zero_capacity_is_unlimited() {
        let mut window = Window::new(0);
        for seq in 0..10_000 {
            window.add(message(seq));
        }
        assert!(!window.is_full());
    }

    #[test]
    fn out_of_order_acks_leave_holes_that_are_trimmed() {
        let mut window = Window::new(10);
        for seq in 1..=4 {
            window.add(message(seq));
        }
        assert!(window.take(3).is_some());
        assert!(window.take(3).is_none(), "a tag settles once");
        assert!(window.take(2).is_some());
        assert!(window.take(1).is_some());
        assert_eq!(window.outstanding(), 1);
        assert_eq!(window.take(4).map(|m| m.seq), Some(4));
        assert_eq!(window.outstanding(), 0);
        assert_eq!(window.next_tag(), 5);
    }

    #[test]
    fn expired_tags_are_remembered() {
        let mut window = Window::new(10);
        window.add(message(1));
        window.add(message(2));
        assert_eq!(window.expire(1).map(|m| m.seq), Some(1));
        assert!(window.was_expired(1));
        assert!(!window.was_expired(2));
        assert!(window.take(1).is_none());
        assert_eq!(window.outstanding(), 1);
    }

    #[test]
    fn unknown_tags_are_none() {
        let mut window = Window::new(10);
        window.add(message(1));
        assert!(window.take(0).is_none());
        assert!(window.take(2).is_none());
        assert!(window.take(u64::MAX).is_none());
    }

    #[test]
    fn take_up_to_settles_a_prefix_in_order() {
        let mut window = Window::new(10);
        for seq in 1..=5 {
            window.add(message(seq));
        }
        window.take(2);
        let mut seen = Vec::new();
        assert_eq!(window.take_up_to(4, |m| seen.push(m.seq)), 3);
        assert_eq!(seen, vec![1, 3, 4]);
        assert_eq!(window.outstanding(), 1);
        assert_eq!(window.take_all(|m| seen.push(m.seq)), 1);
        assert_eq!(seen, vec![1, 3, 4, 5]);
        assert_eq!(window.next_tag(), 6);
    }
}
