//! Broker-wide flow control: while message memory is above its high watermark or the data
//! directory's disk is below its free-space low watermark, publishing connections are blocked
//! (the broker stops reading from them) until it recovers. Consumers keep draining meanwhile.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Weak;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::events::{BrokerEvent, Events};
use crate::queue::Registry;

/// How often memory and disk are checked.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// The flow-control state every session consults.
pub struct Flow {
    memory_limit: u64,
    disk_limit: u64,
    memory_used: AtomicU64,
    disk_free: AtomicU64,
    /// Connections currently held back.
    held: AtomicU32,
    /// `Some(reason)` while publishers are blocked.
    blocked: watch::Sender<Option<String>>,
    data_dir: PathBuf,
    monitor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Flow {
    /// Flow control with these watermarks, for the disk holding `data_dir`.
    pub fn new(memory_limit: u64, disk_limit: u64, data_dir: PathBuf) -> Self {
        Flow {
            memory_limit,
            disk_limit,
            memory_used: AtomicU64::new(0),
            disk_free: AtomicU64::new(u64::MAX),
            held: AtomicU32::new(0),
            blocked: watch::channel(None).0,
            data_dir,
            monitor: Mutex::new(None),
        }
    }

    /// Starts checking the watermarks and the queues' depth alarms every 100 ms.
    pub fn start(self: &std::sync::Arc<Self>, registry: Weak<Registry>, events: std::sync::Arc<Events>) {
        let flow = std::sync::Arc::downgrade(self);
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(flow), Some(registry)) = (flow.upgrade(), registry.upgrade()) else { return };
                let memory: u64 = registry.unsorted().iter().map(|q| q.memory_bytes()).sum();
                let disk = fs4::available_space(&flow.data_dir).unwrap_or(u64::MAX);
                if let Some(blocked) = flow.update(memory, disk) {
                    let (kind, detail) = match blocked {
                        Some(reason) => ("publishers_blocked", reason),
                        None => ("publishers_unblocked", String::new()),
                    };
                    let time_ms = crate::queue::now_ms();
                    let event =
                        BrokerEvent { time_ms, kind: kind.into(), queue: String::new(), value: 0, detail };
                    events.emit(event);
                }
                registry.check_alarms(&events);
                registry.check_reads(&events);
            }
        });
        *self.monitor.lock() = Some(handle);
    }

    /// Re-evaluates the block from fresh readings; returns the new state on a change.
    pub fn update(&self, memory_used: u64, disk_free: u64) -> Option<Option<String>> {
        self.memory_used.store(memory_used, Ordering::Relaxed);
        self.disk_free.store(disk_free, Ordering::Relaxed);
        let reason = if memory_used > self.memory_limit {
            Some(format!(
                "memory high watermark: {memory_used} bytes of messages held, limit {}",
                self.memory_limit
            ))
        } else if disk_free < self.disk_limit {
            Some(format!("disk free low watermark: {disk_free} bytes free, limit {}", self.disk_limit))
        } else {
            None
        };
        let changed = self.blocked.send_if_modified(|current| {
            if current.is_some() == reason.is_some() {
                return false;
            }
            *current = reason.clone();
            true
        });
        if !changed {
            return None;
        }
        match &reason {
            Some(reason) => tracing::warn!(reason = %reason, "blocking publishers"),
            None => tracing::info!("publishers unblocked"),
        }
        Some(reason)
    }

    /// Why publishers are blocked, if they are.
    pub fn blocked(&self) -> Option<String> {
        self.blocked.borrow().clone()
    }

    /// A receiver that changes whenever the block starts or ends.
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.blocked.subscribe()
    }

    /// Counts a connection held back (`true`) or released (`false`).
    pub fn hold(&self, held: bool) {
        if held {
            self.held.fetch_add(1, Ordering::AcqRel);
        } else {
            self.held.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Readings for status reports: (memory used, memory limit, disk free, disk limit, held).
    pub fn readings(&self) -> (u64, u64, u64, u64, u32) {
        (
            self.memory_used.load(Ordering::Relaxed),
            self.memory_limit,
            self.disk_free.load(Ordering::Relaxed),
            self.disk_limit,
            self.held.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        if let Some(handle) = self.monitor.lock().take() {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_on_either_watermark_and_unblocks_when_both_recover() {
        let flow = Flow::new(1000, 500, PathBuf::from("."));
        let mut changes = flow.subscribe();
        flow.update(999, 501);
        assert_eq!(flow.blocked(), None);
        flow.update(1001, 10_000);
        assert!(flow.blocked().unwrap().contains("memory"));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        flow.update(10, 100);
        assert!(flow.blocked().is_some(), "still blocked: now by the disk");
        assert!(!changes.has_changed().unwrap(), "no change event while it stays blocked");
        flow.update(10, 10_000);
        assert_eq!(flow.blocked(), None);
    }
}
