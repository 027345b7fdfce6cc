//! Stored bodies that cannot be read: a read that may succeed later pauses delivery and never
//! loses the message; a corrupt record makes the message die `corrupt`, and nothing else.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::*;
use crate::message::DeathReason;
use crate::storage::Location;

/// A consumer that records the ids it was sent.
#[derive(Clone, Default)]
struct Ids(std::rc::Rc<std::cell::RefCell<Vec<u64>>>);

impl Sink for Ids {
    fn is_writable(&self) -> bool {
        true
    }
    fn deliver(&self, _: u64, _: u64, _: &QueuedMessage, payload: &Payload) -> Result<(), Refusal> {
        self.0.borrow_mut().push(payload.id);
        Ok(())
    }
    fn expired(&self, _: u64, _: u64) {}
    fn connection_id(&self) -> u64 {
        1
    }
    fn cancelled(&self, _: u64, _: &str) {}
}

impl Ids {
    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut self.0.borrow_mut())
    }
}

/// A disk whose reads can be made to fail, transiently or for good.
#[derive(Default)]
struct Disk {
    bodies: HashMap<u64, Arc<Payload>>,
    /// While set, every read fails with this (e.g. out of file descriptors).
    unavailable: Option<String>,
    /// Seqs whose records are damaged.
    corrupt: HashSet<u64>,
    settled: Vec<u64>,
    dead: Vec<(u64, DeathReason, String)>,
    loads: usize,
    /// Bytes of loaded bodies kept in memory.
    held: usize,
}

impl Journal for Disk {
    fn delivered(&mut self, _: &QueuedMessage) {}
    fn settled(&mut self, message: &QueuedMessage) {
        self.settled.push(message.seq);
    }
    fn requeued(&mut self, _: &mut QueuedMessage) {}
    fn failed(&mut self, _: &QueuedMessage) {}
    fn dead(&mut self, message: QueuedMessage, reason: DeathReason) {
        let error = message.failure().map(|f| f.error.clone()).unwrap_or_default();
        self.dead.push((message.seq, reason, error));
    }
    fn load(&mut self, message: &QueuedMessage) -> Result<Arc<Payload>, ReadError> {
        self.loads += 1;
        if let Some(error) = &self.unavailable {
            return Err(ReadError::Unavailable(std::io::Error::other(error.clone())));
        }
        if self.corrupt.contains(&message.seq) {
            return Err(ReadError::Corrupt("checksum mismatch".into()));
        }
        Ok(self.bodies[&message.seq].clone())
    }
    fn hold(&mut self, payload: &Payload) {
        self.held += payload.size();
    }
}

/// A queue of `n` messages known only by their stored copies (as after a restart), seq i
/// holding message id 100 + i, and the disk they are on.
fn stored_queue(n: u64) -> (QueueState<Ids>, Disk) {
    let mut queue = QueueState::new(Policy::default());
    let mut disk = Disk::default();
    for seq in 0..n {
        let payload = Arc::new(Payload { id: 100 + seq, body: "body".into(), ..Payload::default() });
        disk.bodies.insert(seq, payload);
        let location = Location::new(1, 8 + seq * 64, 64);
        queue.restore(QueuedMessage::stored(seq, 0, 4, location));
    }
    (queue, disk)
}

#[test]
fn a_failing_read_pauses_delivery_and_loses_nothing() {
    let (mut queue, mut disk) = stored_queue(5);
    let sink = Ids::default();
    queue.add_consumer(1, 0, 0, sink.clone());
    disk.unavailable = Some("Too many open files (os error 24)".into());
    queue.dispatch(1_000, &mut disk);

    assert!(sink.take().is_empty());
    assert!(disk.settled.is_empty() && disk.dead.is_empty(), "nothing settled or dead-lettered");
    let snapshot = queue.snapshot();
    assert_eq!((snapshot.ready, snapshot.unacked), (5, 0), "every message still waits");
    assert_eq!(snapshot.counters.delivered, 0);
    assert_eq!(snapshot.read_error, "Too many open files (os error 24)");
    let stall = queue.read_stall().unwrap().clone();
    assert_eq!((stall.since_ms, stall.attempts), (1_000, 1));
    assert_eq!(queue.next_timer(), Some(stall.retry_at_ms), "a retry is scheduled");

    // Before the retry is due nothing is read at all; at it, the read fails again and the
    // wait doubles.
    let loads = disk.loads;
    queue.dispatch(stall.retry_at_ms - 1, &mut disk);
    assert_eq!(disk.loads, loads, "no read before the retry is due");
    queue.tick(stall.retry_at_ms, &mut disk);
    queue.dispatch(stall.retry_at_ms, &mut disk);
    let second = queue.read_stall().unwrap().clone();
    assert_eq!(second.attempts, 2);
    assert_eq!(second.since_ms, 1_000);
    assert!(second.retry_at_ms - stall.retry_at_ms > stall.retry_at_ms - 1_000, "backoff grows");

    disk.unavailable = None;
    queue.dispatch(second.retry_at_ms, &mut disk);
    assert_eq!(sink.take(), vec![100, 101, 102, 103, 104], "every message, in order, once");
    assert_eq!(queue.read_stall(), None);
    assert_eq!(queue.snapshot().read_error, "");
    assert!(disk.settled.is_empty() && disk.dead.is_empty());
}

#[test]
fn the_read_retry_backoff_is_capped() {
    let (mut queue, mut disk) = stored_queue(1);
    queue.add_consumer(1, 0, 0, Ids::default());
    disk.unavailable = Some("EIO".into());
    let mut now = 0;
    for _ in 0..40 {
        queue.dispatch(now, &mut disk);
        let retry = queue.read_stall().unwrap().retry_at_ms;
        assert!(retry - now <= READ_RETRY_MAX_MS);
        now = retry;
    }
    assert_eq!(queue.snapshot().ready, 1);
}

#[test]
fn a_corrupt_record_kills_only_its_message() {
    let (mut queue, mut disk) = stored_queue(4);
    disk.corrupt.insert(1);
    let sink = Ids::default();
    queue.add_consumer(1, 0, 0, sink.clone());
    queue.dispatch(0, &mut disk);

    assert_eq!(sink.take(), vec![100, 102, 103]);
    assert_eq!(disk.dead.len(), 1);
    let (seq, reason, error) = &disk.dead[0];
    assert_eq!((*seq, *reason), (1, DeathReason::Corrupt));
    assert!(error.contains("checksum mismatch"), "{error}");
    assert!(error.contains("segment 1, offset 72, 64 bytes"), "{error}");
    assert!(disk.settled.is_empty(), "the death is routed, not silently settled");
    assert_eq!(queue.snapshot().counters.dead.get(&DeathReason::Corrupt), Some(&1));
    assert_eq!(queue.read_stall(), None);
}

#[test]
fn a_move_stops_at_an_unreadable_body_instead_of_skipping_it() {
    let (mut queue, mut disk) = stored_queue(3);
    disk.unavailable = Some("EMFILE".into());
    assert!(matches!(queue.take_first(0, u64::MAX, |_, _| true, &mut disk), Err(ReadError::Unavailable(_))));
    assert_eq!(queue.snapshot().ready, 3);

    disk.unavailable = None;
    disk.corrupt.insert(0);
    let Ok(Scan::Taken(taken)) = queue.take_first(0, u64::MAX, |_, _| true, &mut disk) else {
        panic!("a message is taken")
    };
    assert_eq!(taken.seq, 1, "a corrupt body is passed over, for delivery to dead-letter");
}

#[test]
fn purging_clears_a_read_stall() {
    let (mut queue, mut disk) = stored_queue(2);
    queue.add_consumer(1, 0, 0, Ids::default());
    disk.unavailable = Some("EMFILE".into());
    queue.dispatch(0, &mut disk);
    assert!(queue.read_stall().is_some());
    queue.purge(&mut disk);
    assert_eq!(queue.snapshot().read_error, "");
    assert_eq!(queue.next_timer(), None);
}

#[test]
fn a_filtered_scan_keeps_no_bodies_it_passes_over_and_stops_at_its_bound() {
    let (mut queue, mut disk) = stored_queue(3000);
    let bound = queue.next_seq();
    queue.restore(QueuedMessage::stored(bound, 0, 4, Location::new(1, 8, 64)));
    disk.bodies.insert(bound, Arc::new(Payload { id: 9999, body: "late".into(), ..Payload::default() }));

    // Only message 2500 matches: the scan goes in batches, reading bodies it drops again.
    let mut from = 0;
    let taken = loop {
        match queue.take_first(from, bound, |_, p| p.id == 100 + 2500, &mut disk).unwrap() {
            Scan::Taken(message) => break message,
            Scan::Passed { next_seq } => {
                assert!(next_seq > from, "the scan moves on");
                from = next_seq;
            }
            Scan::Done => panic!("message 2500 is in range"),
        }
    };
    assert_eq!(taken.seq, 2500);
    assert_eq!(disk.held, 4, "only the taken body is kept");
    assert!(queue.ready.iter().all(|m| m.payload.is_none()), "no passed-over body stays in memory");
    // The message published after the bound is not looked at.
    assert!(
        matches!(queue.take_first(2501, bound, |_, _| true, &mut disk).unwrap(), Scan::Taken(m) if m.seq == 2501)
    );
    assert!(matches!(queue.take_first(bound, bound, |_, _| true, &mut disk).unwrap(), Scan::Done));
}
