//! Slowing down password guessing: each failed login from an address makes that address's next
//! failure answer later, up to a cap; a success resets it. Only the failing connection waits;
//! nobody else is slowed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use parking_lot::Mutex;

/// Delay added per failure in a row.
const STEP: Duration = Duration::from_millis(10);
/// Longest delay before a failure is answered.
const MAX_DELAY: Duration = Duration::from_secs(2);
/// Addresses tracked at most; the least recent are forgotten first.
const MAX_ADDRESSES: usize = 10_000;

/// Failed logins in a row, per source address.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Per address: failures in a row, and the tick of the latest.
    failures: HashMap<IpAddr, (u32, u64)>,
    tick: u64,
}

impl LoginThrottle {
    /// Counts a failure from `peer`; returns how long to wait before answering it.
    pub fn failed(&self, peer: IpAddr) -> Duration {
        let mut inner = self.inner.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let failures = &mut inner.failures;
        if failures.len() >= MAX_ADDRESSES && !failures.contains_key(&peer) {
            if let Some(oldest) = failures.iter().min_by_key(|(_, (_, t))| *t).map(|(ip, _)| *ip) {
                failures.remove(&oldest);
            }
        }
        let entry = failures.entry(peer).or_insert((0, tick));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = tick;
        STEP.saturating_mul(entry.0).min(MAX_DELAY)
    }

    /// Forgets `peer`'s failures after it logged in.
    pub fn succeeded(&self, peer: IpAddr) {
        self.inner.lock().failures.remove(&peer);
    }

    /// Failures in a row from `peer`.
    pub fn failures(&self, peer: IpAddr) -> u32 {
        self.inner.lock().failures.get(&peer).map_or(0, |(n, _)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_waits_longer_up_to_the_cap_and_a_success_resets() {
        let throttle = LoginThrottle::default();
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(throttle.failed(peer), STEP);
        assert_eq!(throttle.failed(peer), STEP * 2);
        assert_eq!(throttle.failed(other), STEP, "addresses are counted apart");
        for _ in 0..1000 {
            throttle.failed(peer);
        }
        assert_eq!(throttle.failed(peer), MAX_DELAY);
        throttle.succeeded(peer);
        assert_eq!(throttle.failures(peer), 0);
        assert_eq!(throttle.failed(peer), STEP);
    }
}
