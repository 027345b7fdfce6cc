//! Queues: the registry of named queues and the lock-protected shell around each queue's
//! state machine. One lock per queue, so queues never slow each other down.

mod state;
mod window;

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::error::BrokerError;
use crate::outbox::Outbox;

pub use state::{Counters, QueueState, SettleError, Sink, Snapshot};
pub use window::Window;

/// Properties fixed when a queue is declared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSettings {
    /// Declared durable. Kept with the queue and reported; see docs/storage.md.
    pub durable: bool,
}

/// One named queue.
pub struct Queue {
    name: Arc<str>,
    settings: QueueSettings,
    state: Mutex<Live>,
}

/// The state plus the tombstone that tells holders of a stale `Arc<Queue>` it was deleted.
struct Live {
    state: QueueState<Arc<Outbox>>,
    deleted: bool,
}

impl Queue {
    fn new(name: &str, settings: QueueSettings) -> Self {
        Queue {
            name: name.into(),
            settings,
            state: Mutex::new(Live { state: QueueState::new(), deleted: false }),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's declared settings.
    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// Runs `f` on the state under the queue's lock, then dispatches whatever became
    /// deliverable. Fails with NOT_FOUND if the queue was deleted meanwhile.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut QueueState<Arc<Outbox>>) -> R) -> Result<R, BrokerError> {
        let mut live = self.state.lock();
        if live.deleted {
            return Err(BrokerError::queue_not_found(&self.name));
        }
        let result = f(&mut live.state);
        live.state.dispatch();
        Ok(result)
    }

    /// A snapshot of the queue's counts.
    pub fn snapshot(&self) -> Snapshot {
        self.state.lock().state.snapshot()
    }
}

/// All queues of a broker, by name.
#[derive(Default)]
pub struct Registry {
    queues: DashMap<Arc<str>, Arc<Queue>>,
}

/// What deleting a queue dropped.
pub struct Deleted {
    /// Messages (ready and unacked) dropped with the queue.
    pub messages: u64,
    /// Consumers that were subscribed, with their connections, to be told.
    pub consumers: Vec<(u64, Arc<Outbox>)>,
}

/// What a declare did.
pub struct Declared {
    /// The queue.
    pub queue: Arc<Queue>,
    /// True if this call created it.
    pub created: bool,
}

impl Registry {
    /// Looks a queue up.
    pub fn get(&self, name: &str) -> Result<Arc<Queue>, BrokerError> {
        self.queues.get(name).map(|q| q.clone()).ok_or_else(|| BrokerError::queue_not_found(name))
    }

    /// Creates a queue, or returns the existing one if its settings match.
    pub fn declare(&self, name: &str, settings: QueueSettings) -> Result<Declared, BrokerError> {
        validate_queue_name(name)?;
        match self.queues.entry(name.into()) {
            Entry::Occupied(entry) => {
                let queue = entry.get().clone();
                if queue.settings != settings {
                    return Err(BrokerError::PreconditionFailed(format!(
                        "queue '{name}' exists with other settings ({:?}); requested {settings:?}",
                        queue.settings
                    )));
                }
                Ok(Declared { queue, created: false })
            }
            Entry::Vacant(entry) => {
                let queue = Arc::new(Queue::new(name, settings));
                entry.insert(queue.clone());
                tracing::info!(queue = %name, "queue declared");
                Ok(Declared { queue, created: true })
            }
        }
    }

    /// Deletes a queue, dropping its messages and cancelling its consumers.
    pub fn delete(&self, name: &str, if_unused: bool, if_empty: bool) -> Result<Deleted, BrokerError> {
        let queue = self.get(name)?;
        let mut live = queue.state.lock();
        if live.deleted {
            return Err(BrokerError::queue_not_found(name));
        }
        let snapshot = live.state.snapshot();
        if if_unused && snapshot.consumers > 0 {
            return Err(BrokerError::PreconditionFailed(format!(
                "queue '{name}' has {} consumer(s)",
                snapshot.consumers
            )));
        }
        if if_empty && !live.state.is_empty() {
            return Err(BrokerError::PreconditionFailed(format!(
                "queue '{name}' holds {} message(s)",
                live.state.len()
            )));
        }
        let dropped = live.state.len() as u64;
        let consumers = live.state.take_consumers();
        live.deleted = true;
        self.queues.remove(name);
        tracing::info!(queue = %name, dropped, "queue deleted");
        Ok(Deleted { messages: dropped, consumers })
    }

    /// Every queue, sorted by name.
    pub fn list(&self) -> Vec<Arc<Queue>> {
        let mut queues: Vec<Arc<Queue>> = self.queues.iter().map(|q| q.value().clone()).collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        queues
    }
}

/// Queue names are 1 to 255 bytes of UTF-8 without control characters.
pub fn validate_queue_name(name: &str) -> Result<(), BrokerError> {
    if name.is_empty() || name.len() > 255 {
        return Err(BrokerError::InvalidArgument(format!(
            "queue name must be 1 to 255 bytes, got {}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(BrokerError::InvalidArgument("queue name must not contain control characters".into()));
    }
    Ok(())
}
