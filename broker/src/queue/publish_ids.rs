//! The publish ids a replicated queue has seen lately: a publish sent twice (tried again after
//! a lost connection or a failover) enters the queue once, while the first copy is still in
//! it or was one of the queue's last [`RETAINED`] publishes.
//!
//! The set changes only with the queue group's log (a publish applied, messages that left
//! applied), never with what the serving node does on its own, so every node decides alike.

use std::collections::{BTreeMap, BTreeSet, HashSet};

/// Publishes whose ids are kept after their messages left the queue: a retry comes within
/// seconds, and a publisher has at most this many in flight (a client's default is far less).
pub const RETAINED: u64 = 4096;

/// Publish ids by the seq of the message that carried each.
#[derive(Debug, Default)]
pub struct PublishIds {
    ids: HashSet<u64>,
    by_seq: BTreeMap<u64, u64>,
    /// Seqs (with an id) of messages that left the queue, dropped once [`RETAINED`] publishes
    /// old.
    departed: BTreeSet<u64>,
}

/// [`PublishIds`] as a snapshot holds them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SavedIds {
    /// (seq, id) of every id kept.
    pub ids: Vec<(u64, u64)>,
    /// The seqs among them whose messages left the queue.
    pub departed: Vec<u64>,
}

impl PublishIds {
    /// True when `id` was seen: its message is held, or left less than [`RETAINED`]
    /// publishes ago. Id 0 is never seen: it means the publisher gave none.
    pub fn contains(&self, id: u64) -> bool {
        id != 0 && self.ids.contains(&id)
    }

    /// The message with `seq` was published with `id`.
    pub fn insert(&mut self, seq: u64, id: u64) {
        while let Some(&oldest) = self.departed.first() {
            if oldest.saturating_add(RETAINED) > seq {
                break;
            }
            self.departed.pop_first();
            if let Some(id) = self.by_seq.remove(&oldest) {
                self.ids.remove(&id);
            }
        }
        if id != 0 && self.ids.insert(id) {
            self.by_seq.insert(seq, id);
        }
    }

    /// The messages with `seqs` left the queue.
    pub fn remove(&mut self, seqs: &[u64]) {
        for seq in seqs {
            if self.by_seq.contains_key(seq) {
                self.departed.insert(*seq);
            }
        }
    }

    /// What a snapshot keeps.
    pub fn saved(&self) -> SavedIds {
        SavedIds {
            ids: self.by_seq.iter().map(|(seq, id)| (*seq, *id)).collect(),
            departed: self.departed.iter().copied().collect(),
        }
    }

    /// Holds exactly what `saved` (taken from a snapshot) holds.
    pub fn replace(&mut self, saved: &SavedIds) {
        *self = PublishIds::default();
        for (seq, id) in &saved.ids {
            if self.ids.insert(*id) {
                self.by_seq.insert(*seq, *id);
            }
        }
        self.departed = saved.departed.iter().copied().filter(|seq| self.by_seq.contains_key(seq)).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_seen_while_held_and_for_a_while_after_it_left() {
        let mut ids = PublishIds::default();
        ids.insert(1, 77);
        ids.insert(2, 78);
        assert!(ids.contains(77) && ids.contains(78));
        ids.remove(&[1, 9]);
        assert!(ids.contains(77), "left, but recently");
        ids.insert(RETAINED, 79);
        assert!(ids.contains(77), "{RETAINED} publishes after it is still recent");
        ids.insert(RETAINED + 1, 80);
        assert!(!ids.contains(77), "forgotten once older than {RETAINED} publishes");
        assert!(ids.contains(78), "held ids are never forgotten");
    }

    #[test]
    fn zero_means_no_id_and_a_second_insert_keeps_the_first_seq() {
        let mut ids = PublishIds::default();
        ids.insert(1, 0);
        assert!(!ids.contains(0));
        assert!(ids.saved().ids.is_empty());
        ids.insert(2, 5);
        ids.insert(3, 5);
        assert_eq!(ids.saved().ids, [(2, 5)]);
        ids.remove(&[3]);
        assert!(ids.saved().departed.is_empty(), "seq 3 never carried an id");
    }

    #[test]
    fn a_snapshot_keeps_what_was_seen_and_what_left() {
        let mut ids = PublishIds::default();
        ids.insert(1, 10);
        ids.insert(2, 20);
        ids.remove(&[1]);
        let saved = ids.saved();
        let mut restored = PublishIds::default();
        restored.insert(7, 70);
        restored.replace(&saved);
        assert_eq!(restored.saved(), saved);
        assert!(restored.contains(10) && restored.contains(20) && !restored.contains(70));
        restored.insert(RETAINED + 1, 30);
        assert!(!restored.contains(10) && restored.contains(20));
    }
}
