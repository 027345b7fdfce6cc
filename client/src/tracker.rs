//! [`DeliveryTracker`]: what a consumer's deliveries may still do — which are settled, which
//! the broker took back after their ack deadline, and whether the consumer was cancelled.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Why a delivery may not be settled or extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// It was settled already, by itself or by a `multiple` settle.
    AlreadySettled,
    /// The broker took it back after its ack deadline.
    Expired,
    /// Its consumer was cancelled.
    Cancelled,
}

/// Most expired delivery tags remembered per consumer. A tag is kept until it falls out of this
/// window (oldest first), because a [`Delivery`](crate::Delivery) may be settled at any later
/// time. One that was forgotten is not lost either: its settle goes to the broker, which
/// refuses it with `PRECONDITION_FAILED`.
const MAX_EXPIRED_TAGS: usize = 4096;

/// Settle bookkeeping of one consumer, shared by its deliveries and the connection's reader
/// (which records expiries and cancellations as the broker reports them).
///
/// It holds no connection handle, so the reader can keep it without keeping the connection
/// alive.
#[derive(Debug, Default)]
pub(crate) struct DeliveryTracker {
    /// Every tag at or below this was covered by a `multiple` settle.
    settled_up_to: AtomicU64,
    /// Tags whose ack deadline passed (`DeliveryExpired`).
    expired: Mutex<BTreeSet<u64>>,
    /// Size of `expired`, so the common case (nothing expired) takes no lock.
    expired_len: AtomicUsize,
    /// The consumer was cancelled, by the client or by the broker.
    cancelled: AtomicBool,
}

impl DeliveryTracker {
    /// Claims the right to settle delivery `tag` (whose own flag is `settled`), and with
    /// `multiple` every earlier one too.
    ///
    /// Lock-free unless deliveries expired; a single settle racing a `multiple` one on another
    /// task may both be sent, and the broker then refuses the second, which the reader logs.
    pub(crate) fn claim(&self, tag: u64, settled: &AtomicBool, multiple: bool) -> Result<(), Refusal> {
        self.check_expired(tag)?;
        if settled.swap(true, Ordering::AcqRel) || tag <= self.settled_up_to.load(Ordering::Acquire) {
            return Err(Refusal::AlreadySettled);
        }
        if multiple {
            self.settled_up_to.fetch_max(tag, Ordering::AcqRel);
        }
        self.check_cancelled()
    }

    /// Checks that delivery `tag` is still outstanding as far as the client knows: not settled,
    /// not expired, its consumer not cancelled. Claims nothing.
    pub(crate) fn check_outstanding(&self, tag: u64, settled: &AtomicBool) -> Result<(), Refusal> {
        self.check_expired(tag)?;
        if settled.load(Ordering::Acquire) || tag <= self.settled_up_to.load(Ordering::Acquire) {
            return Err(Refusal::AlreadySettled);
        }
        self.check_cancelled()
    }

    /// Records that the broker took delivery `tag` back after its ack deadline.
    pub(crate) fn expire(&self, tag: u64) {
        let mut expired = self.expired.lock();
        expired.insert(tag);
        while expired.len() > MAX_EXPIRED_TAGS {
            expired.pop_first();
        }
        self.expired_len.store(expired.len(), Ordering::Release);
    }

    /// Whether delivery `tag` is known to have expired.
    pub(crate) fn is_expired(&self, tag: u64) -> bool {
        self.expired_len.load(Ordering::Acquire) > 0 && self.expired.lock().contains(&tag)
    }

    /// Marks the consumer cancelled; returns whether it already was.
    pub(crate) fn cancel(&self) -> bool {
        self.cancelled.swap(true, Ordering::AcqRel)
    }

    fn check_expired(&self, tag: u64) -> Result<(), Refusal> {
        if self.is_expired(tag) {
            return Err(Refusal::Expired);
        }
        Ok(())
    }

    fn check_cancelled(&self) -> Result<(), Refusal> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(Refusal::Cancelled);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(n: usize) -> Vec<AtomicBool> {
        (0..=n).map(|_| AtomicBool::new(false)).collect()
    }

    #[test]
    fn a_delivery_settles_once() {
        let tracker = DeliveryTracker::default();
        let flags = flags(3);
        assert!(tracker.claim(1, &flags[1], false).is_ok());
        assert_eq!(tracker.claim(1, &flags[1], false), Err(Refusal::AlreadySettled));
        assert_eq!(tracker.claim(1, &flags[1], true), Err(Refusal::AlreadySettled));
        assert!(tracker.claim(2, &flags[2], false).is_ok(), "other deliveries are unaffected");
    }

    #[test]
    fn multiple_covers_earlier_deliveries_only() {
        let tracker = DeliveryTracker::default();
        let flags = flags(6);
        assert!(tracker.claim(4, &flags[4], true).is_ok());
        for tag in 1..=3 {
            assert_eq!(tracker.claim(tag, &flags[tag as usize], false), Err(Refusal::AlreadySettled));
        }
        assert!(tracker.claim(5, &flags[5], false).is_ok());
        assert!(tracker.claim(6, &flags[6], true).is_ok());
    }

    #[test]
    fn multiple_below_the_window_is_already_settled() {
        let tracker = DeliveryTracker::default();
        let flags = flags(5);
        assert!(tracker.claim(5, &flags[5], true).is_ok());
        assert_eq!(tracker.claim(2, &flags[2], true), Err(Refusal::AlreadySettled));
        assert_eq!(tracker.settled_up_to.load(Ordering::Relaxed), 5, "the window never moves back");
    }

    #[test]
    fn an_individually_settled_delivery_does_not_block_a_later_multiple() {
        let tracker = DeliveryTracker::default();
        let flags = flags(3);
        assert!(tracker.claim(2, &flags[2], false).is_ok());
        assert!(tracker.claim(3, &flags[3], true).is_ok());
        assert_eq!(tracker.claim(1, &flags[1], false), Err(Refusal::AlreadySettled));
    }

    #[test]
    fn an_expired_delivery_cannot_be_settled_or_extended() {
        let tracker = DeliveryTracker::default();
        let flags = flags(3);
        tracker.expire(2);
        assert!(tracker.is_expired(2));
        assert!(!tracker.is_expired(1));
        assert_eq!(tracker.claim(2, &flags[2], false), Err(Refusal::Expired));
        // Refused, not claimed: asking again gives the same answer, not AlreadySettled.
        assert_eq!(tracker.claim(2, &flags[2], true), Err(Refusal::Expired));
        assert_eq!(tracker.check_outstanding(2, &flags[2]), Err(Refusal::Expired));
        assert!(!flags[2].load(Ordering::Relaxed));
        assert!(tracker.check_outstanding(1, &flags[1]).is_ok());
        assert!(tracker.claim(1, &flags[1], false).is_ok(), "other deliveries are unaffected");
        assert!(tracker.claim(3, &flags[3], true).is_ok());
    }

    #[test]
    fn outstanding_check_sees_settles_but_claims_nothing() {
        let tracker = DeliveryTracker::default();
        let flags = flags(4);
        assert!(tracker.check_outstanding(3, &flags[3]).is_ok());
        assert!(tracker.check_outstanding(3, &flags[3]).is_ok(), "may be asked many times");
        assert!(tracker.claim(3, &flags[3], false).is_ok(), "still settleable");
        assert_eq!(tracker.check_outstanding(3, &flags[3]), Err(Refusal::AlreadySettled));
        assert!(tracker.claim(2, &flags[2], true).is_ok());
        assert_eq!(tracker.check_outstanding(1, &flags[1]), Err(Refusal::AlreadySettled));
    }

    #[test]
    fn expired_tags_are_bounded_oldest_first() {
        let tracker = DeliveryTracker::default();
        for tag in 1..=(MAX_EXPIRED_TAGS as u64 + 10) {
            tracker.expire(tag);
        }
        assert_eq!(tracker.expired.lock().len(), MAX_EXPIRED_TAGS);
        assert!(!tracker.is_expired(10), "the oldest are forgotten");
        assert!(tracker.is_expired(11));
        assert!(tracker.is_expired(MAX_EXPIRED_TAGS as u64 + 10));
    }

    #[test]
    fn a_cancelled_consumer_refuses_settles() {
        let tracker = DeliveryTracker::default();
        let flags = flags(2);
        assert!(!tracker.cancel());
        assert!(tracker.cancel(), "reports an earlier cancel");
        assert_eq!(tracker.claim(1, &flags[1], false), Err(Refusal::Cancelled));
        assert_eq!(tracker.check_outstanding(2, &flags[2]), Err(Refusal::Cancelled));
    }
}
