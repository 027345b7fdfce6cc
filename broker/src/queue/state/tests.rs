//! State machine tests: dispatch, prefetch, round-robin, settle and requeue order.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    consumer: u64,
    tag: u64,
    id: u64,
    count: u32,
}

#[derive(Clone, Default)]
struct Recorder {
    sent: Rc<RefCell<Vec<Sent>>>,
    blocked: Rc<Cell<bool>>,
}

impl Recorder {
    fn take(&self) -> Vec<Sent> {
        std::mem::take(&mut self.sent.borrow_mut())
    }

    fn ids(&self) -> Vec<u64> {
        self.take().into_iter().map(|s| s.id).collect()
    }
}

impl Sink for Recorder {
    fn is_writable(&self) -> bool {
        !self.blocked.get()
    }

    fn deliver(&self, consumer_id: u64, delivery_tag: u64, message: &QueuedMessage, payload: &Payload) {
        self.sent.borrow_mut().push(Sent {
            consumer: consumer_id,
            tag: delivery_tag,
            id: payload.id,
            count: message.delivery_count,
        });
    }
}

fn payload(id: u64) -> Arc<Payload> {
    Arc::new(Payload {
        id,
        body: bytes::Bytes::from(id.to_string()),
        headers: Default::default(),
        content_type: String::new(),
        published_at_ms: 0,
    })
}

fn queue_with(ids: impl IntoIterator<Item = u64>) -> QueueState<Recorder> {
    let mut queue = QueueState::new();
    for id in ids {
        queue.publish(payload(id));
    }
    queue
}

#[test]
fn messages_wait_until_a_consumer_arrives() {
    let mut queue = queue_with(1..=3);
    queue.dispatch(&mut NoJournal);
    assert_eq!(queue.snapshot().ready, 3);
    let sink = Recorder::default();
    queue.add_consumer(7, 0, sink.clone());
    queue.dispatch(&mut NoJournal);
    assert_eq!(sink.ids(), vec![1, 2, 3]);
    let snapshot = queue.snapshot();
    assert_eq!((snapshot.ready, snapshot.unacked, snapshot.consumers), (0, 3, 1));
}

#[test]
fn prefetch_bounds_outstanding_deliveries() {
    let mut queue = queue_with(1..=10);
    let sink = Recorder::default();
    queue.add_consumer(1, 3, sink.clone());
    queue.dispatch(&mut NoJournal);
    assert_eq!(sink.ids(), vec![1, 2, 3]);
    queue.ack(1, 2, false, &mut NoJournal).unwrap();
    queue.dispatch(&mut NoJournal);
    assert_eq!(sink.ids(), vec![4]);
    queue.ack(1, 4, true, &mut NoJournal).unwrap();
    queue.dispatch(&mut NoJournal);
    assert_eq!(sink.ids(), vec![5, 6, 7]);
    assert_eq!(queue.snapshot().unacked, 3);
}

#[test]
fn consumers_share_round_robin() {
    let mut queue = QueueState::new();
    let sink = Recorder::default();
    queue.add_consumer(1, 0, sink.clone());
    queue.add_consumer(2, 0, sink.clone());
    queue.add_consumer(3, 0, sink.clone());
    for id in 1..=6 {
        queue.publish(payload(id));
        queue.dispatch(&mut NoJournal);
    }
    let consumers: Vec<u64> = sink.take().into_iter().map(|s| s.consumer).collect();
    assert_eq!(consumers, vec![1, 2, 3, 1, 2, 3]);
}

#[test]
fn a_full_consumer_is_skipped_not_waited_for() {
    let mut queue = QueueState::new();
    let sink = Recorder::default();
    queue.add_consumer(1, 1, sink.clone());
    queue.add_consumer(2, 0, sink.clone());
    for id in 1..=4 {
        queue.publish(payload(id));
    }
    queue.dispatch(&mut NoJournal);
    let consumers: Vec<u64> = sink.take().into_iter().map(|s| s.consumer).collect();
    assert_eq!(consumers, vec![1, 2, 2, 2]);
}

#[test]
fn unwritable_sinks_get_nothing_until_dispatch_runs_again() {
    let mut queue = queue_with(1..=2);
    let sink = Recorder::default();
    sink.blocked.set(true);
    queue.add_consumer(1, 0, sink.clone());
    queue.dispatch(&mut NoJournal);
    assert!(sink.ids().is_empty());
    sink.blocked.set(false);
    queue.dispatch(&mut NoJournal);
    assert_eq!(sink.ids(), vec![1, 2]);
}

#[test]
fn requeue_restores_fifo_order_and_counts_deliveries() {
    let mut queue = queue_with(1..=5);
    let sink = Recorder::default();
    queue.add_consumer(1, 3, sink.clone());
    queue.dispatch(&mut NoJournal);
    assert_eq!(sink.ids(), vec![1, 2, 3]);
    // Requeue 3, then 1, out of order: they go back to their own places.
    queue.nack(1, 3, false, true, &mut NoJournal).unwrap();
    queue.nack(1, 1, false, true, &mut NoJournal).unwrap();
    queue.ack(1, 2, false, &mut NoJournal).unwrap();
    queue.dispatch(&mut NoJournal);
    let sent = sink.take();
    let ids: Vec<u64> = sent.iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![1, 3, 4]);
    assert_eq!(sent[0].count, 2, "second delivery of message 1");
    assert_eq!(sent[2].count, 1);
    assert_eq!(queue.snapshot().counters.redelivered, 2);
}

#[test]
fn nack_without_requeue_drops() {
    let mut queue = queue_with(1..=3);
    let sink = Recorder::default();
    queue.add_consumer(1, 0, sink.clone());
    queue.dispatch(&mut NoJournal);
    assert_eq!(queue.nack(1, 2, true, false, &mut NoJournal), Ok(2));
    assert_eq!(queue.len(), 1);
    assert_eq!(queue.snapshot().counters.acked, 0);
}

#[test]
fn removing_a_consumer_returns_its_unacked_messages_in_order() {
    let mut queue = queue_with(1..=6);
    let first = Recorder::default();
    let second = Recorder::default();
    queue.add_consumer(1, 0, first.clone());
    queue.add_consumer(2, 0, second.clone());
    queue.dispatch(&mut NoJournal);
    assert_eq!(first.ids(), vec![1, 3, 5]);
    assert_eq!(second.ids(), vec![2, 4, 6]);
    assert_eq!(queue.remove_consumer(1, &mut NoJournal), Some(3));
    assert_eq!(queue.remove_consumer(2, &mut NoJournal), Some(3));
    assert_eq!(queue.remove_consumer(2, &mut NoJournal), None);
    let third = Recorder::default();
    queue.add_consumer(3, 0, third.clone());
    queue.dispatch(&mut NoJournal);
    let sent = third.take();
    assert_eq!(sent.iter().map(|s| s.id).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    assert!(sent.iter().all(|s| s.count == 2));
}

#[test]
fn settle_errors_name_the_problem() {
    let mut queue = queue_with(1..=1);
    let sink = Recorder::default();
    queue.add_consumer(1, 0, sink.clone());
    queue.dispatch(&mut NoJournal);
    assert_eq!(queue.ack(9, 1, false, &mut NoJournal), Err(SettleError::UnknownConsumer(9)));
    assert_eq!(queue.ack(1, 2, false, &mut NoJournal), Err(SettleError::UnknownTag(2)));
    assert_eq!(queue.ack(1, 2, true, &mut NoJournal), Err(SettleError::UnknownTag(2)));
    assert_eq!(queue.ack(1, 1, false, &mut NoJournal), Ok(1));
    assert_eq!(queue.ack(1, 1, false, &mut NoJournal), Err(SettleError::UnknownTag(1)), "double ack");
}

#[test]
fn purge_drops_ready_but_not_unacked() {
    let mut queue = queue_with(1..=5);
    let sink = Recorder::default();
    queue.add_consumer(1, 2, sink.clone());
    queue.dispatch(&mut NoJournal);
    assert_eq!(queue.purge(&mut NoJournal), 3);
    let snapshot = queue.snapshot();
    assert_eq!((snapshot.ready, snapshot.unacked), (0, 2));
}

#[test]
fn delivery_tags_count_up_per_consumer() {
    let mut queue = queue_with(1..=4);
    let sink = Recorder::default();
    queue.add_consumer(1, 0, sink.clone());
    queue.add_consumer(2, 0, sink.clone());
    queue.dispatch(&mut NoJournal);
    let tags: Vec<(u64, u64)> = sink.take().into_iter().map(|s| (s.consumer, s.tag)).collect();
    assert_eq!(tags, vec![(1, 1), (2, 1), (1, 2), (2, 2)]);
}
