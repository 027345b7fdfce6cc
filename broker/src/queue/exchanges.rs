//! The registry's exchanges and bindings: the routing topology beside the queues, with its
//! durable part saved in the catalogue (`topology.json`) after every change to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Queue, Registry};
use crate::error::BrokerError;
use crate::routing::{Binding, Destination, ExchangeSpec, Topology, TopologyError};
use crate::storage::{SavedBinding, SavedTopology};

/// Lifetime counters of one exchange, and its name as the messages it routes carry it (shared,
/// not copied into each).
#[derive(Debug, Default)]
pub struct ExchangeCounters {
    /// The exchange's name.
    pub name: Arc<str>,
    /// Messages published to it.
    pub published: AtomicU64,
    /// Messages it routed to no queue (dropped, or returned when mandatory).
    pub unroutable: AtomicU64,
    /// Mandatory messages it returned to their publisher.
    pub returned: AtomicU64,
}

impl ExchangeCounters {
    /// Zeroed counters of the exchange `name`.
    fn named(name: &str) -> Self {
        ExchangeCounters { name: name.into(), ..ExchangeCounters::default() }
    }
}

/// An exchange as listed: its declaration, bindings and counters.
#[derive(Debug, Clone)]
pub struct ExchangeView {
    /// What it was declared with.
    pub spec: ExchangeSpec,
    /// Its bindings.
    pub bindings: usize,
    /// Messages published to it.
    pub published: u64,
    /// Messages it could not route.
    pub unroutable: u64,
    /// Mandatory messages it returned.
    pub returned: u64,
}

/// Where a message published to an exchange goes.
pub struct Routed {
    /// The queues that take it, each once.
    pub queues: Vec<Arc<Queue>>,
    /// The exchange's counters, to count the outcome.
    pub counters: Arc<ExchangeCounters>,
}

/// The topology and what goes with it, kept by the registry.
#[derive(Default)]
pub(super) struct Exchanges {
    topology: parking_lot::RwLock<Topology>,
    counters: dashmap::DashMap<String, Arc<ExchangeCounters>>,
    /// Held while the durable topology is written, so the file ends with the last change.
    saving: parking_lot::Mutex<()>,
}

fn topology_error(err: TopologyError) -> BrokerError {
    match err {
        TopologyError::NoExchange(_) => BrokerError::NotFound(err.to_string()),
        TopologyError::Different(_) | TopologyError::InUse(_) => {
            BrokerError::PreconditionFailed(err.to_string())
        }
        TopologyError::Invalid(_) => BrokerError::InvalidArgument(err.to_string()),
    }
}

impl Registry {
    /// Declares an exchange: creates it, or finds an identical one (false).
    pub fn declare_exchange(&self, spec: ExchangeSpec) -> Result<bool, BrokerError> {
        let durable = spec.durable;
        let name = spec.name.clone();
        let created = self.exchanges.topology.write().declare(spec).map_err(topology_error)?;
        if created {
            self.exchanges
                .counters
                .entry(name.clone())
                .or_insert_with(|| Arc::new(ExchangeCounters::named(&name)));
            if durable {
                self.save_topology()?;
            }
            tracing::info!(exchange = %name, "exchange declared");
        }
        Ok(created)
    }

    /// Deletes an exchange with its bindings and the bindings to it; with `if_unused`, only
    /// while it has no bindings of its own.
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), BrokerError> {
        let deleted = self.exchanges.topology.write().delete(name, if_unused).map_err(topology_error)?;
        self.exchanges.counters.remove(name);
        self.save_topology()?;
        tracing::info!(exchange = %name, bindings = deleted.bindings.len(), "exchange deleted");
        Ok(())
    }

    /// Binds exchange `source` to a queue or exchange; false if that binding exists.
    pub fn bind(&self, source: &str, binding: Binding) -> Result<bool, BrokerError> {
        if let Destination::Queue(queue) = &binding.destination {
            self.get(queue)?;
        }
        let created =
            self.exchanges.topology.write().bind(source, binding.clone()).map_err(topology_error)?;
        if created && self.is_durable_binding(&self.exchanges.topology.read(), source, &binding) {
            self.save_topology()?;
        }
        Ok(created)
    }

    /// Removes a binding; false if there was none.
    pub fn unbind(&self, source: &str, binding: &Binding) -> Result<bool, BrokerError> {
        let removed = self.exchanges.topology.write().unbind(source, binding).map_err(topology_error)?;
        if removed && self.is_durable_binding(&self.exchanges.topology.read(), source, binding) {
            self.save_topology()?;
        }
        Ok(removed)
    }

    /// True when a binding from `source` is saved: its exchange and its destination are both
    /// durable. Transient ones change nothing on disk.
    fn is_durable_binding(&self, topology: &Topology, source: &str, binding: &Binding) -> bool {
        let durable_exchange = |name: &str| topology.get(name).is_some_and(|x| x.spec.durable);
        durable_exchange(source)
            && match &binding.destination {
                Destination::Queue(name) => self.get(name).is_ok_and(|q| q.settings().durable),
                Destination::Exchange(name) => durable_exchange(name),
            }
    }

    /// Forgets the bindings to a deleted queue.
    pub(super) fn unbind_queue(&self, queue: &str) {
        let sources = self.exchanges.topology.write().unbind_destination(&Destination::Queue(queue.into()));
        if !sources.is_empty() {
            if let Err(err) = self.save_topology() {
                tracing::error!(queue = %queue, error = %err, "could not save the bindings after deleting a queue");
            }
        }
    }

    /// The queues a message published to `exchange` with `key` and `headers` reaches.
    pub fn route(
        &self,
        exchange: &str,
        key: &str,
        headers: &HashMap<String, String>,
    ) -> Result<Routed, BrokerError> {
        let queues = {
            let topology = self.exchanges.topology.read();
            let route = topology.route(exchange, key, headers).map_err(topology_error)?;
            route.queues.iter().filter_map(|name| self.get(name).ok()).collect()
        };
        let counters = self.exchanges.counters.get(exchange).map(|c| c.clone()).unwrap_or_default();
        Ok(Routed { queues, counters })
    }

    /// Every exchange, sorted by name.
    pub fn exchanges(&self) -> Vec<ExchangeView> {
        let topology = self.exchanges.topology.read();
        let mut views: Vec<ExchangeView> = topology
            .exchanges()
            .map(|exchange| {
                let counters =
                    self.exchanges.counters.get(&exchange.spec.name).map(|c| c.clone()).unwrap_or_default();
                ExchangeView {
                    spec: exchange.spec.clone(),
                    bindings: exchange.bindings.len(),
                    published: counters.published.load(Ordering::Relaxed),
                    unroutable: counters.unroutable.load(Ordering::Relaxed),
                    returned: counters.returned.load(Ordering::Relaxed),
                }
            })
            .collect();
        views.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        views
    }

    /// Every binding with its source exchange, sorted by source.
    pub fn bindings(&self) -> Vec<(String, Binding)> {
        let topology = self.exchanges.topology.read();
        let mut all: Vec<(String, Binding)> = topology
            .exchanges()
            .flat_map(|x| x.bindings.iter().map(|b| (x.spec.name.clone(), b.clone())))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Brings back the saved exchanges and bindings (at start, after the queues).
    pub(super) fn recover_topology(&self) -> std::io::Result<()> {
        let saved = self.store.read_topology()?;
        let mut topology = self.exchanges.topology.write();
        for spec in saved.exchanges {
            self.exchanges
                .counters
                .entry(spec.name.clone())
                .or_insert_with(|| Arc::new(ExchangeCounters::named(&spec.name)));
            if let Err(err) = topology.declare(spec) {
                tracing::error!(error = %err, "saved exchange skipped");
            }
        }
        for SavedBinding { source, binding } in saved.bindings {
            if let Destination::Queue(queue) = &binding.destination {
                if self.get(queue).is_err() {
                    tracing::warn!(exchange = %source, queue = %queue, "saved binding to a missing queue skipped");
                    continue;
                }
            }
            if let Err(err) = topology.bind(&source, binding) {
                tracing::error!(exchange = %source, error = %err, "saved binding skipped");
            }
        }
        Ok(())
    }

    /// Writes the durable exchanges and bindings (a binding is durable when its exchange and
    /// its destination both are), on the caller's thread: the engine calls these operations
    /// from blocking threads.
    fn save_topology(&self) -> Result<(), BrokerError> {
        let _saving = self.exchanges.saving.lock();
        let saved = {
            let topology = self.exchanges.topology.read();
            let mut exchanges: Vec<ExchangeSpec> =
                topology.exchanges().filter(|x| x.spec.durable).map(|x| x.spec.clone()).collect();
            exchanges.sort_by(|a, b| a.name.cmp(&b.name));
            let bindings = topology
                .exchanges()
                .filter(|x| x.spec.durable)
                .flat_map(|x| {
                    x.bindings
                        .iter()
                        .filter(|b| self.is_durable_binding(&topology, &x.spec.name, b))
                        .map(|b| SavedBinding { source: x.spec.name.clone(), binding: b.clone() })
                })
                .collect();
            SavedTopology { exchanges, bindings }
        };
        self.store
            .write_topology(&saved)
            .map_err(|e| BrokerError::ResourceLimit(format!("cannot save the exchanges and bindings: {e}")))
    }
}
