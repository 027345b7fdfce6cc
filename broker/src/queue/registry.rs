//! The registry of named queues: declare, look up, delete, list, recover at start and close
//! at shutdown.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::durable::{self, Storage, Stored};
use super::{validate_queue_name, Queue, QueueSettings, QueueState, Subscriber};
use crate::audit::Audit;
use crate::error::BrokerError;
use crate::storage::{QueueMeta, StorageConfig, Store};

/// All queues of a broker, by name.
pub struct Registry {
    me: Weak<Registry>,
    /// Looked up on every publish: hashed with a fast, per-process seeded hasher.
    queues: DashMap<Arc<str>, Arc<Queue>, foldhash::fast::RandomState>,
    pub(super) store: Store,
    storage: Storage,
    audit: Audit,
    runtime: tokio::runtime::Handle,
    pub(super) exchanges: super::exchanges::Exchanges,
    /// How many queues name each queue as their dead-letter queue.
    dead_letter_refs: DashMap<Arc<str>, usize, foldhash::fast::RandomState>,
    /// The cluster, for replicated queues; unset outside a cluster.
    replicator: std::sync::OnceLock<Arc<dyn super::Replicator>>,
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
    /// Messages (ready, delayed and unacked) dropped with the queue.
    pub messages: u64,
    /// Consumers that were subscribed, to be told.
    pub consumers: Vec<(u64, Subscriber)>,
}

impl Registry {
    /// Joins the registry to the cluster that replicates its replicated queues.
    pub fn set_replicator(&self, replicator: Arc<dyn super::Replicator>) {
        let _ = self.replicator.set(replicator);
    }

    /// The cluster, if the broker is in one.
    pub fn replicator(&self) -> Option<Arc<dyn super::Replicator>> {
        self.replicator.get().cloned()
    }

    /// Opens the store and brings back every durable queue it holds. Problems with single
    /// queues or segments are logged and skipped: one bad queue does not stop the broker.
    /// Timers run on `runtime`.
    pub fn recover(
        store: Store,
        storage: StorageConfig,
        audit: Audit,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Arc<Registry>> {
        let crashed = !store.take_clean_shutdown()?;
        let mut stored = Vec::new();
        let mut unreadable = Vec::new();
        for listed in store.list()? {
            match listed.meta {
                Ok(meta) => stored.push(Stored { id: listed.id, dir: listed.dir, meta }),
                Err(problem) => {
                    tracing::error!(problem = %problem, "durable queue skipped; its stored messages are kept");
                    unreadable.push(listed.id);
                }
            }
        }
        let (storage, mut parts) = Storage::open(&store, &storage, &mut stored, &unreadable, crashed)?;
        let registry = Arc::new_cyclic(|me| Registry {
            me: me.clone(),
            queues: DashMap::default(),
            store,
            storage,
            audit,
            runtime,
            exchanges: Default::default(),
            dead_letter_refs: DashMap::default(),
            replicator: std::sync::OnceLock::new(),
        });
        for Stored { id, meta, dir } in stored {
            let Some(parts) = parts.remove(&id) else {
                tracing::error!(queue = %meta.name, dir = %dir.display(), "durable queue not started");
                continue;
            };
            let queue = registry.assemble(&meta.name, meta.settings.clone(), parts);
            queue.alarm_depth.store(meta.alarm_depth, Ordering::Release);
            registry.count_dead_letter(&queue.settings.dead_letter, 1);
            registry.queues.insert(meta.name.as_str().into(), queue.clone());
            // Recovered delayed messages and TTLs need their timer.
            let _ = queue.with_state(|_, _, _| ());
        }
        registry.recover_topology()?;
        Ok(registry)
    }

    /// Looks a queue up.
    pub fn get(&self, name: &str) -> Result<Arc<Queue>, BrokerError> {
        self.queues.get(name).map(|q| q.clone()).ok_or_else(|| BrokerError::queue_not_found(name))
    }

    /// Creates a queue, or returns the existing one if its settings match.
    pub fn declare(&self, name: &str, settings: QueueSettings) -> Result<Declared, BrokerError> {
        validate_queue_name(name)?;
        settings.validate()?;
        if settings.dead_letter == name {
            return Err(BrokerError::InvalidArgument(format!(
                "queue '{name}' cannot be its own dead-letter queue"
            )));
        }
        if !settings.dead_letter.is_empty() {
            validate_queue_name(&settings.dead_letter)?;
        }
        if let Some(existing) = self.queues.get(name).map(|q| q.clone()) {
            return same_settings(existing, name, &settings);
        }
        // The files of a durable queue are made before taking the map's entry, so no lock is
        // held across the fsyncs; a declare that lost a race gives its files back.
        let queue = if settings.durable {
            let mut meta =
                QueueMeta { name: name.to_owned(), settings: settings.clone(), alarm_depth: 0, log: None };
            let (id, dir) = self.store.create(&mut meta, |id| self.storage.assign(id)).map_err(|e| {
                BrokerError::ResourceLimit(format!("cannot create durable queue '{name}': {e}"))
            })?;
            let index = meta.log.unwrap_or_default();
            let parts = self.storage.create(id, &dir, index, settings.policy());
            self.assemble(name, settings.clone(), parts)
        } else {
            let state = QueueState::new(settings.policy());
            Queue::build(name, settings.clone(), state, None, None, self.me.clone())
        };
        match self.queues.entry(name.into()) {
            Entry::Occupied(entry) => {
                let existing = entry.get().clone();
                drop(entry);
                self.discard(&queue);
                same_settings(existing, name, &settings)
            }
            Entry::Vacant(entry) => {
                entry.insert(queue.clone());
                self.count_dead_letter(&settings.dead_letter, 1);
                tracing::info!(queue = %name, settings = %queue.settings, "queue declared");
                Ok(Declared { queue, created: true })
            }
        }
    }

    /// Stops and removes a queue that never entered the map.
    fn discard(&self, queue: &Arc<Queue>) {
        if let Some(durable) = &queue.durable {
            durable.detach(queue);
            if let Err(err) = self.store.remove(durable.dir()) {
                tracing::warn!(queue = %queue.name, error = %err, "could not remove the files of a duplicate declare");
            }
        }
    }

    fn assemble(&self, name: &str, settings: QueueSettings, parts: durable::Parts) -> Arc<Queue> {
        let (state, disk, durable) = parts.into_inner();
        let queue = Queue::build(name, settings, state, Some(disk), Some(durable), self.me.clone());
        if let Some(durable) = &queue.durable {
            durable.attach(&queue);
        }
        queue
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
        if self.queues.remove(name).is_some() {
            self.count_dead_letter(&queue.settings.dead_letter, -1);
        }
        self.unbind_queue(name);
        if let Some(durable) = &queue.durable {
            durable.detach(&queue);
            if let Err(err) = self.store.remove(durable.dir()) {
                tracing::error!(queue = %name, error = %err, "could not remove the queue's files");
            }
        }
        tracing::info!(queue = %name, dropped = deleted.messages, "queue deleted");
        Ok(deleted)
    }

    /// Sets a queue's depth alarm threshold (0 = none); kept across restarts for durable
    /// queues.
    pub fn set_alarm(&self, name: &str, depth: u64) -> Result<(), BrokerError> {
        let queue = self.get(name)?;
        // One metadata write at a time per queue, the threshold set under the same lock, so
        // the file always ends with the last value set.
        let _writing = queue.meta_lock.lock();
        queue.alarm_depth.store(depth, Ordering::Release);
        if let Some(durable) = &queue.durable {
            let meta = QueueMeta {
                name: name.to_owned(),
                settings: queue.settings.clone(),
                alarm_depth: depth,
                log: Some(durable.log_index()),
            };
            self.store
                .rewrite(durable.dir(), &meta)
                .map_err(|e| BrokerError::Internal(format!("cannot save the alarm of '{name}': {e}")))?;
        }
        tracing::info!(queue = %name, depth, "alarm threshold set");
        Ok(())
    }

    /// Raises or clears depth alarms, announcing each transition.
    pub fn check_alarms(&self, events: &crate::events::Events) {
        for queue in self.unsorted() {
            let Some((raised, ready)) = queue.check_alarm() else { continue };
            let depth = queue.alarm_depth();
            let (kind, detail) = if raised {
                tracing::warn!(queue = %queue.name, ready, threshold = depth, "queue depth alarm raised");
                ("alarm_raised", format!("ready depth {ready} is above {depth}"))
            } else {
                tracing::info!(queue = %queue.name, ready, threshold = depth, "queue depth alarm cleared");
                ("alarm_cleared", format!("ready depth {ready} is back below {depth}"))
            };
            events.emit(crate::events::BrokerEvent {
                time_ms: super::now_ms(),
                kind: kind.into(),
                queue: queue.name.to_string(),
                value: ready,
                detail,
            });
        }
    }

    /// Announces queues whose stored bodies became unreadable, or readable again: one log
    /// line and one event per change.
    pub fn check_reads(&self, events: &crate::events::Events) {
        for queue in self.unsorted() {
            let Some(error) = queue.check_reads() else { continue };
            let (kind, detail) = if error.is_empty() {
                tracing::info!(queue = %queue.name, "stored messages are readable again; delivery resumed");
                ("reads_resumed", String::new())
            } else {
                tracing::error!(queue = %queue.name, error = %error, "stored messages cannot be read; delivery paused and retried, nothing is dropped");
                ("reads_failing", error)
            };
            events.emit(crate::events::BrokerEvent {
                time_ms: super::now_ms(),
                kind: kind.into(),
                queue: queue.name.to_string(),
                value: 0,
                detail,
            });
        }
    }

    /// Whether some queue names `name` as its dead-letter queue.
    pub fn is_dead_letter_target(&self, name: &str) -> bool {
        self.dead_letter_refs.get(name).is_some_and(|refs| *refs > 0)
    }

    fn count_dead_letter(&self, target: &str, change: isize) {
        if target.is_empty() {
            return;
        }
        let mut refs = self.dead_letter_refs.entry(target.into()).or_insert(0);
        *refs = refs.saturating_add_signed(change);
        let unused = *refs == 0;
        drop(refs);
        if unused {
            self.dead_letter_refs.remove_if(target, |_, refs| *refs == 0);
        }
    }

    /// How many queues there are.
    pub fn count(&self) -> usize {
        self.queues.len()
    }

    /// Every queue, in no particular order: for sweeps that do not show the list.
    pub fn unsorted(&self) -> Vec<Arc<Queue>> {
        self.queues.iter().map(|q| q.value().clone()).collect()
    }

    /// Every queue, sorted by name.
    pub fn list(&self) -> Vec<Arc<Queue>> {
        let mut queues: Vec<Arc<Queue>> = self.queues.iter().map(|q| q.value().clone()).collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        queues
    }

    /// The storage threads of durable queues.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The audit trail of dead messages.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The runtime the queues' timers run on.
    pub(super) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Writes out and syncs what every durable queue has buffered, stops their threads, and
    /// records the clean shutdown.
    pub fn close(&self) {
        if !self.storage.stop() {
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

/// The existing queue if it was declared with `settings`, else PRECONDITION_FAILED.
fn same_settings(queue: Arc<Queue>, name: &str, settings: &QueueSettings) -> Result<Declared, BrokerError> {
    if &queue.settings != settings {
        return Err(BrokerError::PreconditionFailed(format!(
            "queue '{name}' exists with other settings ({}); requested {settings}",
            queue.settings
        )));
    }
    Ok(Declared { queue, created: false })
}

/// Tells consumers of a deleted queue that they were cancelled.
pub fn notify_cancelled(consumers: Vec<(u64, Subscriber)>, reason: &str) {
    for (consumer_id, subscriber) in consumers {
        subscriber.cancelled(consumer_id, reason);
    }
}
