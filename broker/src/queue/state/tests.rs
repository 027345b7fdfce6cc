//! State machine tests: dispatch, prefetch, round-robin, settle and requeue order.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use super::*;
use crate::message::DeathReason;

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
    expired: Rc<RefCell<Vec<(u64, u64)>>>,
}

/// Records what a queue reports: deaths, failures, settles.
#[derive(Default)]
struct Log {
    dead: Vec<(u64, DeathReason, u32, String)>,
    settled: Vec<u64>,
    failed: Vec<u64>,
}

impl Journal for Log {
    fn delivered(&mut self, _: &QueuedMessage) {}
    fn settled(&mut self, message: &QueuedMessage) {
        self.settled.push(message.payload.as_ref().map_or(0, |p| p.id));
    }
    fn requeued(&mut self, _: &mut QueuedMessage) {}
    fn failed(&mut self, message: &QueuedMessage) {
        self.failed.push(message.payload.as_ref().map_or(0, |p| p.id));
    }
    fn dead(&mut self, message: QueuedMessage, reason: DeathReason) {
        let id = message.payload.as_ref().map_or(0, |p| p.id);
        let error = message.failure().map(|f| f.error.clone()).unwrap_or_default();
        self.dead.push((id, reason, message.delivery_count, error));
    }
    fn load(&mut self, _: &QueuedMessage) -> Result<Arc<Payload>, ReadError> {
        Err(ReadError::Corrupt("in memory".into()))
    }
    fn hold(&mut self, _: &Payload) {}
}

fn j() -> Log {
    Log::default()
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

    fn expired(&self, consumer_id: u64, delivery_tag: u64) {
        self.expired.borrow_mut().push((consumer_id, delivery_tag));
    }

    fn connection_id(&self) -> u64 {
        1
    }

    fn cancelled(&self, _: u64, _: &str) {}

    fn deliver(
        &self,
        consumer_id: u64,
        delivery_tag: u64,
        message: &QueuedMessage,
        payload: &Payload,
    ) -> Result<(), Refusal> {
        self.sent.borrow_mut().push(Sent {
            consumer: consumer_id,
            tag: delivery_tag,
            id: payload.id,
            count: message.delivery_count,
        });
        Ok(())
    }
}

fn payload(id: u64) -> Arc<Payload> {
    Arc::new(Payload { id, body: bytes::Bytes::from(id.to_string()), ..Payload::default() })
}

fn queue_with(ids: impl IntoIterator<Item = u64>) -> QueueState<Recorder> {
    let mut queue = QueueState::new(Policy::default());
    for id in ids {
        queue.publish(payload(id), 0, 0, 0);
    }
    queue
}

#[test]
fn messages_wait_until_a_consumer_arrives() {
    let mut queue = queue_with(1..=3);
    queue.dispatch(0, &mut j());
    assert_eq!(queue.snapshot().ready, 3);
    let sink = Recorder::default();
    queue.add_consumer(7, 0, 0, sink.clone());
    queue.dispatch(0, &mut j());
    assert_eq!(sink.ids(), vec![1, 2, 3]);
    let snapshot = queue.snapshot();
    assert_eq!((snapshot.ready, snapshot.unacked, snapshot.consumers), (0, 3, 1));
}

#[test]
fn prefetch_bounds_outstanding_deliveries() {
    let mut queue = queue_with(1..=10);
    let sink = Recorder::default();
    queue.add_consumer(1, 3, 0, sink.clone());
    queue.dispatch(0, &mut j());
    assert_eq!(sink.ids(), vec![1, 2, 3]);
    queue.ack(1, 2, false, &mut j()).unwrap();
    queue.dispatch(0, &mut j());
    assert_eq!(sink.ids(), vec![4]);
    queue.ack(1, 4, true, &mut j()).unwrap();
    queue.dispatch(0, &mut j());
    assert_eq!(sink.ids(), vec![5, 6, 7]);
    assert_eq!(queue.snapshot().unacked, 3);
}

#[test]
fn consumers_share_round_robin() {
    let mut queue = QueueState::new(Policy::default());
    let sink = Recorder::default();
    queue.add_consumer(1, 0, 0, sink.clone());
    queue.add_consumer(2, 0, 0, sink.clone());
    queue.add_consumer(3, 0, 0, sink.clone());
    for id in 1..=6 {
        queue.publish(payload(id), 0, 0, 0);
        queue.dispatch(0, &mut j());
    }
    let consumers: Vec<u64> = sink.take().into_iter().map(|s| s.consumer).collect();
    assert_eq!(consumers, vec![1, 2, 3, 1, 2, 3]);
}

#[test]
fn a_full_consumer_is_skipped_not_waited_for() {
    let mut queue = QueueState::new(Policy::default());
    let sink = Recorder::default();
    queue.add_consumer(1, 1, 0, sink.clone());
    queue.add_consumer(2, 0, 0, sink.clone());
    for id in 1..=4 {
        queue.publish(payload(id), 0, 0, 0);
    }
    queue.dispatch(0, &mut j());
    let consumers: Vec<u64> = sink.take().into_iter().map(|s| s.consumer).collect();
    assert_eq!(consumers, vec![1, 2, 2, 2]);
}

#[test]
fn unwritable_sinks_get_nothing_until_dispatch_runs_again() {
    let mut queue = queue_with(1..=2);
    let sink = Recorder::default();
    sink.blocked.set(true);
    queue.add_consumer(1, 0, 0, sink.clone());
    queue.dispatch(0, &mut j());
    assert!(sink.ids().is_empty());
    sink.blocked.set(false);
    queue.dispatch(0, &mut j());
    assert_eq!(sink.ids(), vec![1, 2]);
}

#[test]
fn requeue_restores_fifo_order_and_counts_deliveries() {
    let mut queue = queue_with(1..=5);
    let sink = Recorder::default();
    queue.add_consumer(1, 3, 0, sink.clone());
    queue.dispatch(0, &mut j());
    assert_eq!(sink.ids(), vec![1, 2, 3]);
    // Requeue 3, then 1, out of order: they go back to their own places.
    queue.nack(1, 3, false, true, "", None, 0, &mut j()).unwrap();
    queue.nack(1, 1, false, true, "", None, 0, &mut j()).unwrap();
    queue.ack(1, 2, false, &mut j()).unwrap();
    queue.dispatch(0, &mut j());
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
    queue.add_consumer(1, 0, 0, sink.clone());
    queue.dispatch(0, &mut j());
    assert_eq!(queue.nack(1, 2, true, false, "", None, 0, &mut j()), Ok(2));
    assert_eq!(queue.len(), 1);
    assert_eq!(queue.snapshot().counters.acked, 0);
}

#[test]
fn removing_a_consumer_returns_its_unacked_messages_in_order() {
    let mut queue = queue_with(1..=6);
    let first = Recorder::default();
    let second = Recorder::default();
    queue.add_consumer(1, 0, 0, first.clone());
    queue.add_consumer(2, 0, 0, second.clone());
    queue.dispatch(0, &mut j());
    assert_eq!(first.ids(), vec![1, 3, 5]);
    assert_eq!(second.ids(), vec![2, 4, 6]);
    assert_eq!(queue.remove_consumer(1, "gone", 0, &mut j()), Some(3));
    assert_eq!(queue.remove_consumer(2, "gone", 0, &mut j()), Some(3));
    assert_eq!(queue.remove_consumer(2, "gone", 0, &mut j()), None);
    let third = Recorder::default();
    queue.add_consumer(3, 0, 0, third.clone());
    queue.dispatch(0, &mut j());
    let sent = third.take();
    assert_eq!(sent.iter().map(|s| s.id).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    assert!(sent.iter().all(|s| s.count == 2));
}

#[test]
fn settle_errors_name_the_problem() {
    let mut queue = queue_with(1..=1);
    let sink = Recorder::default();
    queue.add_consumer(1, 0, 0, sink.clone());
    queue.dispatch(0, &mut j());
    assert_eq!(queue.ack(9, 1, false, &mut j()), Err(SettleError::UnknownConsumer(9)));
    assert_eq!(queue.ack(1, 2, false, &mut j()), Err(SettleError::UnknownTag(2)));
    assert_eq!(queue.ack(1, 2, true, &mut j()), Err(SettleError::UnknownTag(2)));
    assert_eq!(queue.ack(1, 1, false, &mut j()), Ok(1));
    assert_eq!(queue.ack(1, 1, false, &mut j()), Err(SettleError::UnknownTag(1)), "double ack");
}

#[test]
fn purge_drops_ready_but_not_unacked() {
    let mut queue = queue_with(1..=5);
    let sink = Recorder::default();
    queue.add_consumer(1, 2, 0, sink.clone());
    queue.dispatch(0, &mut j());
    assert_eq!(queue.purge(&mut j()), 3);
    let snapshot = queue.snapshot();
    assert_eq!((snapshot.ready, snapshot.unacked), (0, 2));
}

#[test]
fn delivery_tags_count_up_per_consumer() {
    let mut queue = queue_with(1..=4);
    let sink = Recorder::default();
    queue.add_consumer(1, 0, 0, sink.clone());
    queue.add_consumer(2, 0, 0, sink.clone());
    queue.dispatch(0, &mut j());
    let tags: Vec<(u64, u64)> = sink.take().into_iter().map(|s| (s.consumer, s.tag)).collect();
    assert_eq!(tags, vec![(1, 1), (2, 1), (1, 2), (2, 2)]);
}

fn policy_queue(policy: Policy) -> (QueueState<Recorder>, Recorder) {
    let mut queue = QueueState::new(policy);
    let sink = Recorder::default();
    queue.add_consumer(1, 0, 0, sink.clone());
    (queue, sink)
}

#[test]
fn every_unsuccessful_delivery_counts_toward_the_limit() {
    let (mut queue, sink) =
        policy_queue(Policy { max_deliveries: 3, ack_timeout_ms: 100, ..Policy::default() });
    let mut log = j();
    queue.publish(payload(7), 0, 0, 0);
    queue.dispatch(0, &mut log);
    // 1: nack with requeue.
    queue.nack(1, 1, false, true, "smtp down", None, 0, &mut log).unwrap();
    queue.dispatch(0, &mut log);
    // 2: the ack deadline passes.
    queue.tick(100, &mut log);
    assert_eq!(*sink.expired.borrow(), vec![(1, 2)]);
    assert_eq!(queue.ack(1, 2, false, &mut log), Err(SettleError::Expired(2)), "a late ack is refused");
    queue.dispatch(100, &mut log);
    // 3: the consumer goes away.
    queue.remove_consumer(1, "connection closed", 150, &mut log);
    assert_eq!(log.dead, vec![(7, DeathReason::DeliveryLimit, 3, "connection closed".to_string())]);
    assert!(queue.is_empty());
    assert_eq!(queue.snapshot().counters.dead.get(&DeathReason::DeliveryLimit), Some(&1));
}

#[test]
fn reject_without_requeue_dies_with_the_consumers_error() {
    let (mut queue, _sink) = policy_queue(Policy::default());
    let mut log = j();
    queue.publish(payload(1), 0, 0, 0);
    queue.dispatch(0, &mut log);
    queue.nack(1, 1, false, false, "invalid JSON at line 1", None, 5, &mut log).unwrap();
    assert_eq!(log.dead, vec![(1, DeathReason::Rejected, 1, "invalid JSON at line 1".to_string())]);
}

#[test]
fn retry_backoff_follows_the_schedule_and_repeats_the_last_delay() {
    let policy = Policy { retry_backoff_ms: vec![1_000, 10_000], ..Policy::default() };
    let (mut queue, sink) = policy_queue(policy);
    let mut log = j();
    queue.publish(payload(1), 0, 0, 0);
    queue.dispatch(0, &mut log);
    let mut now = 0;
    for (tag, delay) in [(1, 1_000), (2, 10_000), (3, 10_000)] {
        sink.take();
        queue.nack(1, tag, false, true, "", None, now, &mut log).unwrap();
        assert_eq!(queue.snapshot().delayed, 1);
        assert_eq!(queue.next_timer(), Some(now + delay));
        queue.tick(now + delay - 1, &mut log);
        queue.dispatch(now + delay - 1, &mut log);
        assert!(sink.take().is_empty(), "not before its delay");
        now += delay;
        queue.tick(now, &mut log);
        queue.dispatch(now, &mut log);
        assert_eq!(sink.ids(), vec![1]);
    }
}

#[test]
fn an_explicit_nack_delay_overrides_the_schedule() {
    let (mut queue, _sink) = policy_queue(Policy { retry_backoff_ms: vec![60_000], ..Policy::default() });
    let mut log = j();
    queue.publish(payload(1), 0, 0, 0);
    queue.dispatch(0, &mut log);
    queue.nack(1, 1, false, true, "", Some(5), 0, &mut log).unwrap();
    assert_eq!(queue.next_timer(), Some(5));
}

#[test]
fn a_delayed_message_never_blocks_the_ones_behind_it() {
    let (mut queue, sink) = policy_queue(Policy::default());
    let mut log = j();
    queue.publish(payload(1), 0, 60_000, 0);
    queue.publish(payload(2), 0, 0, 0);
    queue.dispatch(0, &mut log);
    assert_eq!(sink.ids(), vec![2], "the message behind a 60 s delay goes at once");
    let snapshot = queue.snapshot();
    assert_eq!((snapshot.delayed, snapshot.unacked), (1, 1));
    queue.tick(60_000, &mut log);
    queue.dispatch(60_000, &mut log);
    assert_eq!(sink.ids(), vec![1]);
}

#[test]
fn expired_messages_die_promptly_even_mid_queue() {
    let mut queue = QueueState::<Recorder>::new(Policy::default());
    let mut log = j();
    queue.publish(payload(1), 0, 0, 0);
    queue.publish(payload(2), 0, 0, 500);
    queue.publish(payload(3), 0, 0, 0);
    queue.publish(payload(4), 0, 2_000, 1_000);
    assert_eq!(queue.next_timer(), Some(500));
    queue.tick(500, &mut log);
    assert_eq!(log.dead, vec![(2, DeathReason::Expired, 0, String::new())]);
    queue.tick(1_000, &mut log);
    assert_eq!(log.dead.len(), 2, "a delayed message expires before its delay is over");
    assert_eq!(queue.snapshot().ready, 2);
}

#[test]
fn the_queue_ttl_and_the_message_ttl_the_lower_wins() {
    let queue = QueueState::<Recorder>::new(Policy { message_ttl_ms: 1_000, ..Policy::default() });
    assert_eq!(queue.expiry_for(10, 0), 1_010);
    assert_eq!(queue.expiry_for(10, 300), 310);
    assert_eq!(queue.expiry_for(10, 5_000), 1_010);
    let no_ttl = QueueState::<Recorder>::new(Policy::default());
    assert_eq!(no_ttl.expiry_for(10, 0), 0);
}

#[test]
fn extending_a_deadline_keeps_the_delivery() {
    let (mut queue, sink) = policy_queue(Policy { ack_timeout_ms: 100, ..Policy::default() });
    let mut log = j();
    queue.publish(payload(1), 0, 0, 0);
    queue.dispatch(0, &mut log);
    queue.extend(1, 1, 1_000, 50).unwrap();
    queue.tick(100, &mut log);
    assert!(sink.expired.borrow().is_empty());
    assert_eq!(queue.ack(1, 1, false, &mut log), Ok(1));
}

#[test]
fn pull_consumers_get_only_what_they_asked_for() {
    let mut queue = queue_with(1..=5);
    let puller = Recorder::default();
    let mut log = j();
    queue.add_pull_consumer(9, puller.clone());
    queue.dispatch(0, &mut log);
    assert!(puller.ids().is_empty(), "no credit, no delivery");
    queue.grant(9, 2, 30_000).unwrap();
    queue.dispatch(0, &mut log);
    assert_eq!(puller.ids(), vec![1, 2]);
    queue.dispatch(0, &mut log);
    assert!(puller.ids().is_empty());
    // The visibility timeout takes them back as failed deliveries.
    queue.tick(30_000, &mut log);
    assert_eq!(queue.snapshot().ready, 5);
}

fn bounded(max_length: u64, max_bytes: u64, overflow: Overflow) -> QueueState<Recorder> {
    QueueState::new(Policy { max_length, max_bytes, overflow, ..Policy::default() })
}

/// Publishes through the admission check, as the queue shell does.
fn offer(queue: &mut QueueState<Recorder>, id: u64, log: &mut Log) -> Result<(), QueueFull> {
    let body = payload(id);
    queue.make_room(body.body.len() as u64, log)?;
    queue.publish(body, 0, 0, 0);
    Ok(())
}

#[test]
fn reject_publish_refuses_exactly_past_the_limit() {
    let mut queue = bounded(3, 0, Overflow::RejectPublish);
    let mut log = j();
    for id in 1..=3 {
        offer(&mut queue, id, &mut log).unwrap();
    }
    assert!(offer(&mut queue, 4, &mut log).unwrap_err().0.contains("max_length 3"));
    assert_eq!(queue.snapshot().ready, 3);
    assert!(log.dead.is_empty(), "nothing is dropped");
}

#[test]
fn drop_head_lets_the_oldest_die_as_maxlen() {
    let mut queue = bounded(3, 0, Overflow::DropHead);
    let mut log = j();
    for id in 1..=5 {
        offer(&mut queue, id, &mut log).unwrap();
    }
    let dead: Vec<(u64, DeathReason)> = log.dead.iter().map(|d| (d.0, d.1)).collect();
    assert_eq!(dead, vec![(1, DeathReason::MaxLen), (2, DeathReason::MaxLen)]);
    let sink = Recorder::default();
    queue.add_consumer(1, 0, 0, sink.clone());
    queue.dispatch(0, &mut log);
    assert_eq!(sink.ids(), vec![3, 4, 5]);
}

#[test]
fn max_bytes_counts_waiting_body_bytes_and_frees_on_delivery() {
    // Bodies "1".."9" are one byte each.
    let mut queue = bounded(0, 2, Overflow::RejectPublish);
    let mut log = j();
    offer(&mut queue, 1, &mut log).unwrap();
    offer(&mut queue, 2, &mut log).unwrap();
    assert!(offer(&mut queue, 3, &mut log).is_err());
    assert_eq!(queue.snapshot().waiting_bytes, 2);
    let sink = Recorder::default();
    queue.add_consumer(1, 1, 0, sink.clone());
    queue.dispatch(0, &mut log);
    assert_eq!(queue.snapshot().waiting_bytes, 1, "delivered messages no longer count");
    offer(&mut queue, 3, &mut log).unwrap();
}

#[test]
fn taken_messages_can_be_given_back_in_place() {
    let mut queue = queue_with(1..=3);
    let mut log = j();
    let Scan::Taken(taken) = queue.take_first(0, u64::MAX, |_, p| p.id == 2, &mut log).unwrap() else {
        panic!("message 2 is taken")
    };
    assert_eq!(queue.snapshot().ready, 2);
    queue.give_back(taken);
    let sink = Recorder::default();
    queue.add_consumer(1, 0, 0, sink.clone());
    queue.dispatch(0, &mut log);
    assert_eq!(sink.ids(), vec![1, 2, 3]);
}

#[test]
fn peek_changes_nothing() {
    let mut queue = queue_with(1..=3);
    let mut log = j();
    let seen: Vec<u64> = queue.peek(2, &mut log).iter().map(|(_, p)| p.id).collect();
    assert_eq!(seen, vec![1, 2]);
    let snapshot = queue.snapshot();
    assert_eq!((snapshot.ready, snapshot.counters.delivered), (3, 0));
}
