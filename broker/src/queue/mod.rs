//! Queues: the registry of named queues and the lock-protected shell around each queue's
//! state machine. One lock per queue, so queues never slow each other down. Durable queues add
//! a log and a sync thread (`durable`).

mod durable;
mod state;
mod window;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use hopper_proto::{pb, Body, Frame};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::message::Payload;
use crate::outbox::Outbox;
use crate::storage::{QueueMeta, StorageConfig, Store};

pub use durable::Durable;
pub use state::{Counters, Journal, NoJournal, QueueState, SettleError, Sink, Snapshot};
pub use window::Window;

use durable::DiskState;

/// Properties fixed when a queue is declared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueSettings {
    /// Messages are kept on disk and the queue survives restarts.
    pub durable: bool,
}

impl std::fmt::Display for QueueSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "durable={}", self.durable)
    }
}

/// Where the answer to a publish goes: the publishing connection and its request id.
pub struct Confirm {
    outbox: Arc<Outbox>,
    request_id: u64,
}

impl Confirm {
    /// A confirm to be sent to `outbox` for `request_id`.
    pub fn new(outbox: Arc<Outbox>, request_id: u64) -> Self {
        Confirm { outbox, request_id }
    }

    /// Sends the positive response (`PublishOk`, `SettleOk`) or the error.
    pub fn send(self, result: Result<Body, BrokerError>) {
        let frame = match result {
            Ok(body) => Frame::new(self.request_id, body),
            Err(err) => Frame::error(self.request_id, err.code(), err.to_string()),
        };
        self.outbox.push(&frame);
    }
}

/// One named queue.
pub struct Queue {
    name: Arc<str>,
    settings: QueueSettings,
    deleted: AtomicBool,
    state: Mutex<Live>,
    durable: Option<Durable>,
}

/// Everything behind the queue's lock.
struct Live {
    state: QueueState<Arc<Outbox>>,
    deleted: bool,
    disk: Option<DiskState>,
}

impl Queue {
    fn transient(name: &str, settings: QueueSettings) -> Self {
        Queue {
            name: name.into(),
            settings,
            deleted: AtomicBool::new(false),
            state: Mutex::new(Live { state: QueueState::new(), deleted: false, disk: None }),
            durable: None,
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

    /// True once the queue was deleted; holders of a stale handle should look it up again.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Runs `f` on the state under the queue's lock, with the queue's journal, then
    /// dispatches whatever became deliverable. Fails with NOT_FOUND if the queue was deleted.
    pub fn with_state<R>(
        &self,
        f: impl FnOnce(&mut QueueState<Arc<Outbox>>, &mut dyn Journal) -> R,
    ) -> Result<R, BrokerError> {
        let mut guard = self.state.lock();
        let live = &mut *guard;
        if live.deleted {
            return Err(BrokerError::queue_not_found(&self.name));
        }
        let result = match (&mut live.disk, &self.durable) {
            (Some(disk), Some(durable)) => {
                let mut journal = durable.journal(disk);
                let result = f(&mut live.state, &mut journal);
                live.state.dispatch(&mut journal);
                durable.wake_if_pending(disk);
                result
            }
            _ => {
                let result = f(&mut live.state, &mut NoJournal);
                live.state.dispatch(&mut NoJournal);
                result
            }
        };
        Ok(result)
    }

    /// Accepts a published message. A transient queue confirms at once; a durable one once the
    /// message is on disk (per the fsync policy).
    pub fn publish(&self, payload: Arc<Payload>, confirm: Confirm) -> Result<(), BrokerError> {
        let mut guard = self.state.lock();
        let live = &mut *guard;
        if live.deleted {
            return Err(BrokerError::queue_not_found(&self.name));
        }
        match (&mut live.disk, &self.durable) {
            (Some(disk), Some(durable)) => {
                let seq = live.state.reserve_seq();
                durable.append_publish(disk, seq, payload, confirm);
            }
            _ => {
                let id = payload.id;
                live.state.publish(payload);
                live.state.dispatch(&mut NoJournal);
                drop(guard);
                confirm.send(Ok(Body::PublishOk(pb::PublishOk { message_id: id })));
            }
        }
        Ok(())
    }

    /// Sends `response` once everything this queue has buffered for its log so far is as
    /// durable as a publish confirm: at once for a transient queue or an empty buffer.
    pub fn confirm_when_durable(&self, confirm: Confirm, response: Body) {
        let mut guard = self.state.lock();
        if let (Some(disk), Some(durable)) = (guard.disk.as_mut(), &self.durable) {
            durable.defer_confirm(disk, confirm, response);
            return;
        }
        drop(guard);
        confirm.send(Ok(response));
    }

    /// A snapshot of the queue's counts.
    pub fn snapshot(&self) -> Snapshot {
        self.state.lock().state.snapshot()
    }
}

/// All queues of a broker, by name.
pub struct Registry {
    queues: DashMap<Arc<str>, Arc<Queue>>,
    store: Store,
    storage: StorageConfig,
}

/// What a declare did.
pub struct Declared {
    /// The queue.
    pub queue: Arc<Queue>,
    /// True if this call created it.
    pub created: bool,
}

/// What deleting a queue dropped.
pub struct Deleted {
    /// Messages (ready and unacked) dropped with the queue.
    pub messages: u64,
    /// Consumers that were subscribed, with their connections, to be told.
    pub consumers: Vec<(u64, Arc<Outbox>)>,
}

impl Registry {
    /// Opens the store and brings back every durable queue it holds. Problems with single
    /// queues or segments are logged and skipped: one bad queue does not stop the broker.
    pub fn recover(store: Store, storage: StorageConfig) -> std::io::Result<Registry> {
        let crashed = !store.take_clean_shutdown()?;
        let registry = Registry { queues: DashMap::new(), store, storage };
        for entry in registry.store.list()? {
            let (dir, meta) = match entry {
                Ok(found) => found,
                Err(problem) => {
                    tracing::error!(problem = %problem, "durable queue skipped");
                    continue;
                }
            };
            match durable::recover(&meta, &dir, &registry.storage, crashed) {
                Ok(queue) => {
                    registry.queues.insert(meta.name.as_str().into(), queue);
                }
                Err(err) => {
                    tracing::error!(queue = %meta.name, dir = %dir.display(), error = %err, "durable queue could not be recovered");
                }
            }
        }
        Ok(registry)
    }

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
                        "queue '{name}' exists with other settings ({}); requested {settings}",
                        queue.settings
                    )));
                }
                Ok(Declared { queue, created: false })
            }
            Entry::Vacant(entry) => {
                let queue = if settings.durable {
                    let meta = QueueMeta { name: name.to_owned(), settings: settings.clone() };
                    let dir: PathBuf = self.store.create(&meta).map_err(|e| {
                        BrokerError::ResourceLimit(format!("cannot create durable queue '{name}': {e}"))
                    })?;
                    durable::create(&meta, &dir, &self.storage).map_err(|e| {
                        BrokerError::ResourceLimit(format!("cannot create durable queue '{name}': {e}"))
                    })?
                } else {
                    Arc::new(Queue::transient(name, settings))
                };
                entry.insert(queue.clone());
                tracing::info!(queue = %name, durable = queue.settings.durable, "queue declared");
                Ok(Declared { queue, created: true })
            }
        }
    }

    /// Deletes a queue, dropping its messages (and files) and cancelling its consumers.
    pub fn delete(&self, name: &str, if_unused: bool, if_empty: bool) -> Result<Deleted, BrokerError> {
        let queue = self.get(name)?;
        let deleted = {
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
            live.deleted = true;
            queue.deleted.store(true, Ordering::Release);
            Deleted { messages: live.state.len() as u64, consumers: live.state.take_consumers() }
        };
        self.queues.remove(name);
        if let Some(durable) = &queue.durable {
            let _ = durable.stop(&queue);
            if let Err(err) = self.store.remove(durable.dir()) {
                tracing::error!(queue = %name, error = %err, "could not remove the queue's files");
            }
        }
        tracing::info!(queue = %name, dropped = deleted.messages, "queue deleted");
        Ok(deleted)
    }

    /// Every queue, sorted by name.
    pub fn list(&self) -> Vec<Arc<Queue>> {
        let mut queues: Vec<Arc<Queue>> = self.queues.iter().map(|q| q.value().clone()).collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        queues
    }

    /// Writes out and syncs what every durable queue has buffered, stops their threads, and
    /// records the clean shutdown.
    pub fn close(&self) {
        let mut clean = true;
        for queue in self.list() {
            if let Some(durable) = &queue.durable {
                clean &= durable.stop(&queue);
            }
        }
        if !clean {
            tracing::error!(
                "some queue could not write its last records; the next start recovers as after a crash"
            );
            return;
        }
        if let Err(err) = self.store.mark_clean_shutdown() {
            tracing::warn!(error = %err, "could not record the clean shutdown");
        }
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
