//! A queue's ready messages in arrival order, stored so that a backlog costs little: a run of
//! new in-memory messages takes one pointer per message, anything else its full index entry.
//!
//! A queue fed by a fanout exchange holds the same payloads as its nine siblings, so what it
//! pays per message is its index entry alone. Most ready messages are new ones nobody has seen:
//! never delivered, no expiry, no due time, not stored on disk. Their seqs are consecutive (the
//! queue numbers its arrivals), so a run of them is its first seq and its payloads. Every other
//! message (requeued, recovered, durable, with a TTL) keeps its [`QueuedMessage`].

use std::borrow::Cow;
use std::collections::{vec_deque, VecDeque};
use std::sync::Arc;

use crate::message::{Payload, QueuedMessage};

/// Most messages in one run. A run's buffer grows by doubling: the cap keeps the unused part of
/// the newest run small, and splitting a run (a message taken out of its middle) cheap.
const RUN_MAX: usize = 4096;

/// Largest emptied run buffer kept for the next run. A queue whose consumers keep up would
/// otherwise allocate a buffer per message; a large one is given back instead, so a hundred
/// thousand drained queues do not each sit on one.
const SPARE_MAX: usize = 64;

/// The ready messages of one queue, ordered by seq.
#[derive(Debug, Default)]
pub struct Ready {
    runs: VecDeque<Run>,
    len: usize,
    spare: Option<VecDeque<Arc<Payload>>>,
}

/// Messages with neighbouring places in the queue. Never empty.
#[derive(Debug)]
enum Run {
    /// New in-memory messages with the seqs `first`, `first + 1`, … .
    Fresh { first: u64, payloads: VecDeque<Arc<Payload>> },
    /// Any one message.
    One(QueuedMessage),
}

impl Run {
    fn first_seq(&self) -> u64 {
        match self {
            Run::Fresh { first, .. } => *first,
            Run::One(message) => message.seq,
        }
    }

    fn last_seq(&self) -> u64 {
        match self {
            Run::Fresh { first, payloads } => first + payloads.len() as u64 - 1,
            Run::One(message) => message.seq,
        }
    }
}

/// True when `message` is all a fresh run keeps of it: its seq and its payload.
fn is_fresh(message: &QueuedMessage) -> bool {
    message.delivery_count == 0
        && !message.maybe_delivered
        && message.location.is_none()
        && message.extra.is_none()
        && message.payload.is_some()
}

impl Ready {
    /// How many messages are ready.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no message is ready.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Puts `message` at the place its seq gives it: a new one at the back, a requeued one
    /// among the others, so a requeue restores FIFO order instead of reversing it.
    pub fn insert(&mut self, mut message: QueuedMessage) {
        self.len += 1;
        let seq = message.seq;
        // New messages arrive in order: only a requeue needs the search.
        let at = match self.runs.back() {
            Some(last) if last.last_seq() >= seq => self.runs.partition_point(|run| run.last_seq() < seq),
            _ => self.runs.len(),
        };
        debug_assert!(
            self.runs.get(at).is_none_or(|run| run.first_seq() > seq),
            "seq {seq} is already ready"
        );
        if is_fresh(&message) {
            let payload = message.payload.take().expect("a fresh message is in memory");
            if let Some(Run::Fresh { first, payloads }) = at.checked_sub(1).and_then(|i| self.runs.get_mut(i))
            {
                if *first + payloads.len() as u64 == seq && payloads.len() < RUN_MAX {
                    payloads.push_back(payload);
                    return;
                }
            }
            if let Some(Run::Fresh { first, payloads }) = self.runs.get_mut(at) {
                if *first == seq + 1 && payloads.len() < RUN_MAX {
                    payloads.push_front(payload);
                    *first = seq;
                    return;
                }
            }
            let mut payloads = self.spare.take().unwrap_or_default();
            payloads.push_back(payload);
            self.runs.insert(at, Run::Fresh { first: seq, payloads });
        } else {
            self.runs.insert(at, Run::One(message));
        }
    }

    /// Takes the oldest ready message.
    pub fn pop_front(&mut self) -> Option<QueuedMessage> {
        let message = match self.runs.front_mut()? {
            Run::Fresh { first, payloads } => {
                let payload = payloads.pop_front().expect("runs are never empty");
                *first += 1;
                QueuedMessage::transient(*first - 1, payload)
            }
            Run::One(_) => match self.runs.pop_front() {
                Some(Run::One(message)) => message,
                _ => unreachable!("the front run is a single message"),
            },
        };
        self.len -= 1;
        self.drop_if_empty(0);
        Some(message)
    }

    /// Takes the ready message with this seq, if there is one.
    pub fn remove(&mut self, seq: u64) -> Option<QueuedMessage> {
        let at = self.find(seq)?;
        self.len -= 1;
        let Run::Fresh { first, payloads } = &mut self.runs[at] else {
            return match self.runs.remove(at) {
                Some(Run::One(message)) => Some(message),
                _ => unreachable!("the run found is a single message"),
            };
        };
        let index = (seq - *first) as usize;
        let payload = if index == 0 {
            *first += 1;
            payloads.pop_front()
        } else if index + 1 == payloads.len() {
            payloads.pop_back()
        } else {
            let after = payloads.split_off(index + 1);
            let payload = payloads.pop_back();
            self.runs.insert(at + 1, Run::Fresh { first: seq + 1, payloads: after });
            payload
        };
        let message = QueuedMessage::transient(seq, payload.expect("the seq is in the run"));
        self.drop_if_empty(at);
        Some(message)
    }

    /// The ready message with this seq, to change in place.
    pub fn get_mut(&mut self, seq: u64) -> Option<&mut QueuedMessage> {
        let mut at = self.find(seq)?;
        if let Run::Fresh { .. } = self.runs[at] {
            // Kept whole from now on: the caller may give it state a fresh run has no room for.
            let message = self.remove(seq)?;
            at = self.runs.partition_point(|run| run.last_seq() < seq);
            self.runs.insert(at, Run::One(message));
            self.len += 1;
        }
        match &mut self.runs[at] {
            Run::One(message) => Some(message),
            Run::Fresh { .. } => unreachable!("a fresh message was made whole above"),
        }
    }

    /// True when the message with this seq is ready.
    pub fn contains(&self, seq: u64) -> bool {
        self.find(seq).is_some()
    }

    /// The expiry of the ready message with this seq (0 = none), if it is ready.
    pub fn expiry_of(&self, seq: u64) -> Option<u64> {
        match &self.runs[self.find(seq)?] {
            Run::Fresh { .. } => Some(0),
            Run::One(message) => Some(message.expires_at_ms()),
        }
    }

    /// The payload of the oldest ready message, if it is in memory.
    pub fn front_payload(&self) -> Option<&Arc<Payload>> {
        match self.runs.front()? {
            Run::Fresh { payloads, .. } => payloads.front(),
            Run::One(message) => message.payload.as_ref(),
        }
    }

    /// Every ready message, oldest first.
    pub fn iter(&self) -> Iter<'_> {
        self.iter_from(0)
    }

    /// The ready messages with a seq of at least `seq`, oldest first.
    pub fn iter_from(&self, seq: u64) -> Iter<'_> {
        let at = self.runs.partition_point(|run| run.last_seq() < seq);
        let mut runs = self.runs.range(at..);
        let current = match runs.next() {
            Some(Run::Fresh { first, payloads }) => {
                let skip = seq.saturating_sub(*first) as usize;
                let mut rest = payloads.iter();
                if skip > 0 {
                    rest.nth(skip - 1);
                }
                Current::Fresh { next: first + skip as u64, payloads: rest }
            }
            Some(Run::One(message)) => Current::One(Some(message)),
            None => Current::One(None),
        };
        Iter { runs, current }
    }

    /// Takes every ready message, oldest first.
    pub fn drain(&mut self) -> impl Iterator<Item = QueuedMessage> {
        self.len = 0;
        std::mem::take(&mut self.runs).into_iter().flat_map(|run| {
            let (one, fresh) = match run {
                Run::One(message) => (Some(message), None),
                Run::Fresh { first, payloads } => (None, Some((first..).zip(payloads))),
            };
            one.into_iter().chain(
                fresh.into_iter().flatten().map(|(seq, payload)| QueuedMessage::transient(seq, payload)),
            )
        })
    }

    /// The index of the run holding `seq`.
    fn find(&self, seq: u64) -> Option<usize> {
        let at = self.runs.partition_point(|run| run.last_seq() < seq);
        self.runs.get(at).filter(|run| run.first_seq() <= seq).map(|_| at)
    }

    /// Removes the run at `at` if a message was just taken from it and none is left.
    fn drop_if_empty(&mut self, at: usize) {
        if let Some(Run::Fresh { payloads, .. }) = self.runs.get(at) {
            if payloads.is_empty() {
                if let Some(Run::Fresh { payloads, .. }) = self.runs.remove(at) {
                    if payloads.capacity() <= SPARE_MAX {
                        self.spare = Some(payloads);
                    }
                }
            }
        }
    }
}

/// The ready messages from some seq on; a message of a fresh run is lent as a
/// [`QueuedMessage`] made for the purpose.
pub struct Iter<'a> {
    runs: vec_deque::Iter<'a, Run>,
    current: Current<'a>,
}

enum Current<'a> {
    Fresh { next: u64, payloads: vec_deque::Iter<'a, Arc<Payload>> },
    One(Option<&'a QueuedMessage>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = Cow<'a, QueuedMessage>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match &mut self.current {
                Current::Fresh { next, payloads } => {
                    if let Some(payload) = payloads.next() {
                        *next += 1;
                        return Some(Cow::Owned(QueuedMessage::transient(*next - 1, payload.clone())));
                    }
                }
                Current::One(message) => {
                    if let Some(message) = message.take() {
                        return Some(Cow::Borrowed(message));
                    }
                }
            }
            self.current = match self.runs.next()? {
                Run::Fresh { first, payloads } => Current::Fresh { next: *first, payloads: payloads.iter() },
                Run::One(message) => Current::One(Some(message)),
            };
        }
    }
}

#[cfg(test)]
mod tests;
