//! Timer heaps do not keep entries of messages that left the queue.

use std::sync::Arc;

use super::*;

#[derive(Clone, Default)]
struct Quiet;

impl Sink for Quiet {
    fn is_writable(&self) -> bool {
        true
    }
    fn deliver(&self, _: u64, _: u64, _: &QueuedMessage, _: &Payload) -> Result<(), Refusal> {
        Ok(())
    }
    fn expired(&self, _: u64, _: u64) {}
    fn connection_id(&self) -> u64 {
        1
    }
    fn cancelled(&self, _: u64, _: &str) {}
}

#[derive(Default)]
struct Nothing;

impl Journal for Nothing {
    fn delivered(&mut self, _: &QueuedMessage) {}
    fn settled(&mut self, _: &QueuedMessage) {}
    fn requeued(&mut self, _: &mut QueuedMessage) {}
    fn failed(&mut self, _: &QueuedMessage) {}
    fn dead(&mut self, _: QueuedMessage, _: crate::message::DeathReason) {}
    fn load(&mut self, _: &QueuedMessage) -> Result<Arc<Payload>, ReadError> {
        Err(ReadError::Corrupt("in memory".into()))
    }
    fn hold(&mut self, _: &Payload) {}
}

fn payload(id: u64) -> Arc<Payload> {
    Arc::new(Payload { id, ..Payload::default() })
}

const DAY_MS: u64 = 86_400_000;

#[test]
fn purged_messages_leave_no_expiry_entries_behind() {
    let policy = Policy { message_ttl_ms: DAY_MS, ..Policy::default() };
    let mut queue: QueueState<Quiet> = QueueState::new(policy);
    for round in 0..20u64 {
        for id in 0..5_000 {
            queue.publish(payload(round * 10_000 + id), 0, 0, 0);
        }
        queue.purge(&mut Nothing);
        queue.dispatch(0, &mut Nothing);
    }
    assert!(queue.timer_entries() <= TIMER_SLACK + 1, "{} entries for an empty queue", queue.timer_entries());

    // Live entries survive a rebuild: a message published now still expires.
    queue.publish(payload(1), 0, 0, 0);
    for id in 0..3_000 {
        queue.publish(payload(100 + id), 0, 0, 0);
    }
    queue.purge(&mut Nothing);
    queue.publish(payload(7), 0, 0, 0);
    queue.dispatch(0, &mut Nothing);
    assert_eq!(queue.next_timer(), Some(DAY_MS));
    let mut dead = DeadCount::default();
    queue.tick(DAY_MS, &mut dead);
    assert_eq!((dead.0, queue.snapshot().ready), (1, 0), "the live message expired on time");
}

#[test]
fn acked_deliveries_leave_no_deadline_entries_behind() {
    let mut queue: QueueState<Quiet> = QueueState::new(Policy::default());
    queue.add_consumer(1, 0, 60_000, Quiet);
    for round in 0..10u64 {
        for id in 0..1_000 {
            queue.publish(payload(round * 1_000 + id), 0, 0, 0);
        }
        queue.dispatch(0, &mut Nothing);
        let last = queue.consumers[0].window.next_tag() - 1;
        queue.ack(1, last, true, &mut Nothing).unwrap();
        queue.dispatch(0, &mut Nothing);
    }
    assert!(
        queue.timer_entries() <= TIMER_SLACK + 1,
        "{} entries, nothing outstanding",
        queue.timer_entries()
    );

    // An outstanding delivery keeps its deadline through a rebuild.
    queue.publish(payload(5), 0, 0, 0);
    queue.dispatch(0, &mut Nothing);
    queue.compact_timers();
    assert_eq!(queue.next_timer(), Some(60_000));
}

#[derive(Default)]
struct DeadCount(usize);

impl Journal for DeadCount {
    fn delivered(&mut self, _: &QueuedMessage) {}
    fn settled(&mut self, _: &QueuedMessage) {}
    fn requeued(&mut self, _: &mut QueuedMessage) {}
    fn failed(&mut self, _: &QueuedMessage) {}
    fn dead(&mut self, _: QueuedMessage, _: crate::message::DeathReason) {
        self.0 += 1;
    }
    fn load(&mut self, _: &QueuedMessage) -> Result<Arc<Payload>, ReadError> {
        Err(ReadError::Corrupt("in memory".into()))
    }
    fn hold(&mut self, _: &Payload) {}
}
