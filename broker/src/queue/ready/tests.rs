//! The compact ready list against a plain ordered map of whole messages.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::message::Location;

fn fresh(seq: u64) -> QueuedMessage {
    let payload =
        Payload { id: seq, body: Bytes::from(vec![b'x'; (seq % 7) as usize]), ..Payload::default() };
    QueuedMessage::transient(seq, Arc::new(payload))
}

fn requeued(seq: u64) -> QueuedMessage {
    QueuedMessage { delivery_count: 1, ..fresh(seq) }
}

fn seqs(ready: &Ready) -> Vec<u64> {
    ready.iter().map(|m| m.seq).collect()
}

#[test]
fn new_messages_come_out_whole_and_in_order() {
    let mut ready = Ready::default();
    for seq in 0..10_000 {
        ready.insert(fresh(seq));
    }
    assert_eq!(ready.len(), 10_000);
    assert!(ready.runs.len() <= 10_000 / RUN_MAX + 1, "one pointer per message: {} runs", ready.runs.len());
    for seq in 0..10_000 {
        assert_eq!(ready.pop_front(), Some(fresh(seq)));
    }
    assert!(ready.is_empty() && ready.runs.is_empty());
    assert_eq!(ready.pop_front(), None);
}

#[test]
fn a_requeued_message_goes_back_to_its_place() {
    let mut ready = Ready::default();
    for seq in [0, 1, 2, 5, 6] {
        ready.insert(fresh(seq));
    }
    ready.insert(requeued(4));
    ready.insert(requeued(3));
    ready.insert(fresh(7));
    assert_eq!(seqs(&ready), [0, 1, 2, 3, 4, 5, 6, 7]);
    let popped: Vec<QueuedMessage> = std::iter::from_fn(|| ready.pop_front()).collect();
    assert_eq!(popped.iter().map(|m| m.delivery_count).collect::<Vec<_>>(), [0, 0, 0, 1, 1, 0, 0, 0]);
}

#[test]
fn a_message_handed_back_undelivered_rejoins_its_run() {
    let mut ready = Ready::default();
    for seq in 0..5 {
        ready.insert(fresh(seq));
    }
    let head = ready.pop_front().unwrap();
    ready.insert(head);
    assert_eq!(ready.runs.len(), 1, "still one run");
    assert_eq!(seqs(&ready), [0, 1, 2, 3, 4]);
}

#[test]
fn taking_from_the_middle_of_a_run_splits_it() {
    let mut ready = Ready::default();
    for seq in 0..10 {
        ready.insert(fresh(seq));
    }
    assert_eq!(ready.remove(4), Some(fresh(4)));
    assert_eq!(ready.remove(4), None);
    assert_eq!(ready.remove(0), Some(fresh(0)));
    assert_eq!(ready.remove(9), Some(fresh(9)));
    assert_eq!(seqs(&ready), [1, 2, 3, 5, 6, 7, 8]);
    assert_eq!(ready.iter_from(4).map(|m| m.seq).collect::<Vec<_>>(), [5, 6, 7, 8]);
    assert_eq!(ready.iter_from(2).map(|m| m.seq).collect::<Vec<_>>(), [2, 3, 5, 6, 7, 8]);
    assert_eq!(ready.iter_from(9).count(), 0);
    ready.insert(fresh(4));
    assert_eq!(seqs(&ready), [1, 2, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn a_message_changed_in_place_keeps_the_change() {
    let mut ready = Ready::default();
    for seq in 0..5 {
        ready.insert(fresh(seq));
    }
    let location = Location::new(1, 2, 3);
    ready.get_mut(2).unwrap().location = Some(location);
    ready.get_mut(3).unwrap().set_expires_at_ms(99);
    assert_eq!(ready.expiry_of(3), Some(99));
    assert_eq!(ready.expiry_of(1), Some(0));
    assert_eq!(ready.expiry_of(7), None);
    let all: Vec<QueuedMessage> = ready.drain().collect();
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    assert_eq!(all[2].location, Some(location));
    assert_eq!(all[3].expires_at_ms(), 99);
    assert!(ready.is_empty() && ready.iter().next().is_none());
}

#[derive(Debug, Clone)]
enum Op {
    Publish,
    Requeue(bool),
    Pop,
    Remove(u64),
    Touch(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Publish),
        2 => any::<bool>().prop_map(Op::Requeue),
        2 => Just(Op::Pop),
        1 => (0u64..64).prop_map(Op::Remove),
        1 => (0u64..64).prop_map(Op::Touch),
    ]
}

proptest! {
    /// Whatever is published, delivered, handed back, taken out or changed, the compact list
    /// holds what a plain ordered map of whole messages holds.
    #[test]
    fn holds_what_a_plain_map_holds(ops in proptest::collection::vec(op(), 0..300)) {
        let mut ready = Ready::default();
        let mut model: BTreeMap<u64, QueuedMessage> = BTreeMap::new();
        let mut out: Vec<QueuedMessage> = Vec::new();
        let mut next = 0;
        for op in ops {
            match op {
                Op::Publish => {
                    ready.insert(fresh(next));
                    model.insert(next, fresh(next));
                    next += 1;
                }
                Op::Requeue(delivered) => {
                    if let Some(mut message) = out.pop() {
                        if delivered {
                            message.delivery_count += 1;
                        }
                        model.insert(message.seq, message.clone());
                        ready.insert(message);
                    }
                }
                Op::Pop => {
                    let popped = ready.pop_front();
                    prop_assert_eq!(&popped, &model.pop_first().map(|(_, m)| m));
                    out.extend(popped);
                }
                Op::Remove(seq) => {
                    let removed = ready.remove(seq);
                    prop_assert_eq!(&removed, &model.remove(&seq));
                    out.extend(removed);
                }
                Op::Touch(seq) => {
                    if let Some(message) = ready.get_mut(seq) {
                        message.set_due_ms(seq + 1);
                    }
                    if let Some(message) = model.get_mut(&seq) {
                        message.set_due_ms(seq + 1);
                    }
                }
            }
            prop_assert_eq!(ready.len(), model.len());
        }
        let held: Vec<QueuedMessage> = ready.iter().map(Cow::into_owned).collect();
        prop_assert_eq!(held, model.values().cloned().collect::<Vec<_>>());
        for from in [0, next / 2, next] {
            let tail: Vec<u64> = ready.iter_from(from).map(|m| m.seq).collect();
            prop_assert_eq!(tail, model.range(from..).map(|(&seq, _)| seq).collect::<Vec<_>>());
        }
        prop_assert_eq!(ready.drain().collect::<Vec<_>>(), model.into_values().collect::<Vec<_>>());
    }
}

#[test]
fn a_whole_message_costs_no_more_than_its_entry() {
    assert_eq!(std::mem::size_of::<Run>(), std::mem::size_of::<QueuedMessage>());
}
