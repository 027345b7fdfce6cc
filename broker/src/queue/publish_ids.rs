//! The publish ids a replicated queue has seen lately: a publish sent twice (tried again after
//! a lost connection or a failover) enters the queue once, while the first copy is still in
//! it or was one of the queue's last [`RETAINED`] publishes.
//!
//! The set changes only with the queue group's log (a publish applied, messages that left
//! applied), never with what the serving node does on its own, so every node decides alike.

use std::collections::{HashMap, VecDeque};

use foldhash::fast::RandomState;

/// Publishes whose ids are kept after their messages left the queue: a retry comes within
/// seconds, and a publisher has at most this many in flight (a client's default is far less).
pub const RETAINED: u64 = 4096;

/// The publish ids a queue remembers. Applying a publish is on the path of every confirm, so
/// each step is a hash lookup or a push at the end of a ring.
#[derive(Debug, Default)]
pub struct PublishIds {
    /// Every id kept, with the seq of its message.
    ids: HashMap<u64, u64, RandomState>,
    /// (seq, id, left the queue) of the ids of the last [`RETAINED`] publishes, in seq order.
    recent: VecDeque<(u64, u64, bool)>,
    /// Ids of messages older than that and still held, by seq.
    old: HashMap<u64, u64, RandomState>,
}

/// [`PublishIds`] as a snapshot holds them.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedIds {
    /// (seq, id) of every id kept, in seq order.
    #[serde(rename = "publish_ids", default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<(u64, u64)>,
    /// The seqs among them whose messages left the queue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub departed: Vec<u64>,
}

impl PublishIds {
    /// True when `id` was seen: its message is held, or left less than [`RETAINED`]
    /// publishes ago. Id 0 is never seen: it means the publisher gave none.
    pub fn contains(&self, id: u64) -> bool {
        id != 0 && self.ids.contains_key(&id)
    }

    /// The message with `seq` (above every seq before) was published with `id`.
    pub fn insert(&mut self, seq: u64, id: u64) {
        while let Some(&(oldest, oldest_id, departed)) = self.recent.front() {
            if oldest.saturating_add(RETAINED) > seq {
                break;
            }
            self.recent.pop_front();
            match departed {
                true => {
                    self.ids.remove(&oldest_id);
                }
                false => {
                    self.old.insert(oldest, oldest_id);
                }
            }
        }
        if id != 0 && !self.ids.contains_key(&id) {
            self.ids.insert(id, seq);
            self.recent.push_back((seq, id, false));
        }
    }

    /// The messages with `seqs` left the queue.
    pub fn remove(&mut self, seqs: &[u64]) {
        for seq in seqs {
            if let Some(id) = self.old.remove(seq) {
                self.ids.remove(&id);
            } else if let Ok(at) = self.recent.binary_search_by_key(seq, |(seq, _, _)| *seq) {
                self.recent[at].2 = true;
            }
        }
    }

    /// What a snapshot keeps.
    pub fn saved(&self) -> SavedIds {
        let mut ids: Vec<(u64, u64)> = self.old.iter().map(|(seq, id)| (*seq, *id)).collect();
        ids.sort_unstable();
        ids.extend(self.recent.iter().map(|(seq, id, _)| (*seq, *id)));
        let departed =
            self.recent.iter().filter(|(_, _, departed)| *departed).map(|(seq, _, _)| *seq).collect();
        SavedIds { ids, departed }
    }

    /// Holds exactly what `saved` (taken from a snapshot) holds.
    pub fn replace(&mut self, saved: &SavedIds) {
        *self = PublishIds::default();
        let departed: std::collections::HashSet<u64> = saved.departed.iter().copied().collect();
        let mut ids = saved.ids.clone();
        ids.sort_unstable();
        for (seq, id) in ids {
            if id != 0 && !self.ids.contains_key(&id) {
                self.ids.insert(id, seq);
                self.recent.push_back((seq, id, departed.contains(&seq)));
            }
        }
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

    #[test]
    fn an_old_message_still_held_keeps_its_id_until_it_leaves() {
        let mut ids = PublishIds::default();
        ids.insert(1, 11);
        for seq in 2..=RETAINED + 10 {
            ids.insert(seq, 1000 + seq);
            ids.remove(&[seq]);
        }
        assert!(ids.contains(11), "held for {RETAINED}+ publishes");
        assert!(!ids.contains(1002), "left long ago");
        let saved = ids.saved();
        assert_eq!(saved.ids.first(), Some(&(1, 11)));
        ids.remove(&[1]);
        assert!(!ids.contains(11));
        let mut restored = PublishIds::default();
        restored.replace(&saved);
        assert!(restored.contains(11) && restored.contains(1000 + RETAINED + 10));
    }

    #[test]
    fn saved_ids_keep_their_snapshot_names_and_empty_ones_are_left_out() {
        let saved = SavedIds { ids: vec![(1, 10)], departed: vec![1] };
        let json = serde_json::to_value(&saved).unwrap();
        assert_eq!(json, serde_json::json!({"publish_ids": [[1, 10]], "departed": [1]}));
        assert_eq!(serde_json::from_value::<SavedIds>(json).unwrap(), saved);
        assert_eq!(serde_json::to_value(SavedIds::default()).unwrap(), serde_json::json!({}));
        assert_eq!(serde_json::from_value::<SavedIds>(serde_json::json!({})).unwrap(), SavedIds::default());
    }
}
