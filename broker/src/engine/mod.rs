//! The broker's one door. Every front end — the binary-protocol session, the HTTP API, and
//! whatever comes next — calls the operations of [`Engine`], named for what users do (declare,
//! publish, consume, ack, get, peek, move, status, ...), with a [`Caller`] saying who asks, and
//! gets domain values and one error type, [`BrokerError`], back. Front ends only translate bytes
//! or JSON into these calls and the answers back; checks, limits and bookkeeping (which
//! connection owns which consumer, which receipts are genuine) live here, once.
//!
//! Blocking file work (creating or deleting a durable queue's files, rewriting its metadata,
//! reading the audit log) runs on blocking threads behind `async` operations, never on the
//! async workers and never under a lock.

mod access;
mod consumers;
mod exchanges;
mod pull;
mod queues;
mod receipts;
mod replicated;
mod view;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::auth::{Access, Account, Resource, Users};
use crate::config::Config;
use crate::error::BrokerError;
use crate::events::{BrokerEvent, Events};
use crate::flow::Flow;
use crate::mover::Moves;
use crate::queue::{Queue, Registry};

pub use access::{TokenView, UserConnection, UserView};
pub use consumers::{ConsumeOptions, DeliveryRef, NackOptions, NewMessage, PublishTarget};
pub use exchanges::Route;
pub use pull::{Pull, PullBox, MAX_GET_COUNT};
pub use view::{Delivery, MessageView, QueueInfo, Status};

use pull::Puller;
use receipts::Receipts;

/// Who is asking: the connection a request came in on, and the user it authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The connection's id; 0 for a caller without a connection (an HTTP request), whose
    /// pulled deliveries are settled by receipt.
    pub connection_id: u64,
    /// The authenticated user, whose permissions every operation is checked against; `None`
    /// for the broker's own work, which is checked against nothing.
    pub user: Option<Arc<str>>,
}

impl Caller {
    /// A request of `user` on connection `connection_id`.
    pub fn connection(connection_id: u64, user: &str) -> Self {
        Caller { connection_id, user: Some(user.into()) }
    }

    /// A request of `user` that belongs to no connection (an HTTP request).
    pub fn detached(user: &str) -> Self {
        Caller { connection_id: 0, user: Some(user.into()) }
    }

    /// The broker's own work (metrics, recovery): no user, no checks.
    pub const fn broker() -> Self {
        Caller { connection_id: 0, user: None }
    }
}

/// The broker's state and its operations, shared by every front end.
pub struct Engine {
    config: Config,
    queues: Arc<Registry>,
    flow: Arc<Flow>,
    moves: Moves,
    events: Arc<Events>,
    started: Instant,
    connections: AtomicU32,
    next_message_id: AtomicU64,
    next_consumer_id: AtomicU64,
    /// Every consumer, with its queue and the connection that owns it.
    consumers: DashMap<u64, Owned, foldhash::fast::RandomState>,
    /// Pull consumers by (connection, queue); several per key when gets run concurrently.
    pullers: Mutex<Pullers>,
    receipts: Receipts,
    users: Arc<Users>,
    /// Open connections per user, against `max_connections_per_user`.
    user_connections: Mutex<std::collections::HashMap<Arc<str>, usize>>,
    /// This node's member of its cluster's metadata group, once started.
    cluster: std::sync::OnceLock<crate::cluster::Cluster>,
    /// The address clients reach each node of the cluster at, as the nodes told the cluster.
    node_addrs: Mutex<std::collections::BTreeMap<u64, String>>,
}

/// Pull consumers by (connection id, queue name).
type Pullers = std::collections::HashMap<PullKey, Vec<Arc<Puller>>>;

/// Whose pull consumers: (connection id, user, queue). HTTP requests (connection 0) of
/// different users never share one, so a receipt only works for the user who pulled.
type PullKey = (u64, Option<Arc<str>>, String);

/// A consumer and who owns it.
struct Owned {
    queue: Arc<Queue>,
    connection_id: u64,
    /// The user who subscribed; receipts of HTTP pulls work only for that user.
    user: Option<Arc<str>>,
}

impl Engine {
    /// An engine over recovered `queues`, starting the flow-control and alarm monitor.
    pub fn new(config: Config, queues: Arc<Registry>, users: Arc<Users>) -> Arc<Engine> {
        let flow = Arc::new(Flow::new(
            config.memory_high_watermark_bytes,
            config.disk_free_low_watermark_bytes,
            config.data_dir.clone(),
        ));
        let events = Arc::new(Events::new(config.alarm_webhook.clone()));
        flow.start(Arc::downgrade(&queues), events.clone());
        Arc::new(Engine {
            config,
            queues,
            flow,
            moves: Moves::default(),
            events,
            started: Instant::now(),
            connections: AtomicU32::new(0),
            next_message_id: AtomicU64::new(initial_message_id()),
            next_consumer_id: AtomicU64::new(1),
            consumers: DashMap::default(),
            pullers: Mutex::default(),
            receipts: Receipts::new(),
            users,
            user_connections: Mutex::default(),
            cluster: std::sync::OnceLock::new(),
            node_addrs: Mutex::default(),
        })
    }

    /// Joins this broker to its cluster: from now on metadata changes go through `cluster`.
    pub fn set_cluster(&self, cluster: crate::cluster::Cluster) {
        self.queues.set_replicator(Arc::new(cluster.clone()));
        let _ = self.cluster.set(cluster);
    }

    /// Adds a node to the cluster or removes one (admin only); returns the status after.
    pub async fn change_cluster_members(
        &self,
        caller: &Caller,
        change: crate::cluster::MembershipChange,
    ) -> Result<crate::cluster::ClusterStatus, BrokerError> {
        self.require_admin(caller, "changing the cluster's members")?;
        let cluster = self.cluster.get().ok_or_else(|| {
            BrokerError::NotFound(
                "this broker is not in a cluster (start hopperd with --node-id and --peers)".into(),
            )
        })?;
        if let crate::cluster::MembershipChange::Add { id: 0, .. } = change {
            return Err(BrokerError::InvalidArgument("node ids start at 1".into()));
        }
        cluster.change_members(change).await?;
        self.cluster_status()
    }

    /// This node's view of its cluster (for any logged-in user, like [`Engine::status`]);
    /// `NotFound` when the broker is not in one.
    pub fn cluster_status(&self) -> Result<crate::cluster::ClusterStatus, BrokerError> {
        match self.cluster.get() {
            Some(cluster) => {
                let mut status = cluster.status();
                for member in &mut status.members {
                    member.client_addr = self.node_addr(member.id);
                }
                Ok(status)
            }
            None => Err(BrokerError::NotFound(
                "this broker is not in a cluster (start hopperd with --node-id and --peers)".into(),
            )),
        }
    }

    /// The broker's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counts a connection for as long as the returned guard lives.
    pub fn connection_opened(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard { engine: self.clone() }
    }

    /// Why publishers are blocked (memory or disk watermark), if they are.
    pub fn publishers_blocked(&self) -> Option<String> {
        self.flow.blocked()
    }

    /// Changes of the publisher block, to wait on.
    pub fn flow_changes(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.flow.subscribe()
    }

    /// Counts a connection as held back by flow control (or not any more).
    pub fn hold_publisher(&self, held: bool) {
        self.flow.hold(held);
    }

    /// A subscription to broker events (alarms, blocks, moves, read failures).
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<BrokerEvent> {
        self.events.subscribe()
    }

    /// The broker's health and flow-control readings.
    pub fn status(&self) -> Status {
        let (memory_used, memory_high_watermark, disk_free, disk_free_low_watermark, held) =
            self.flow.readings();
        let storage = self.queues.storage();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            connections: self.connections.load(Ordering::Relaxed),
            blocked: self.flow.blocked(),
            blocked_publishers: held,
            memory_used,
            memory_high_watermark,
            disk_free,
            disk_free_low_watermark,
            storage_threads: storage.threads() as u32,
            fsyncs: storage.fsyncs(),
            open_segment_files: storage.open_files() as u32,
            storage_error: storage.failure(),
        }
    }

    /// The dead-letter trail: up to `limit` deaths (0 = 1000) of `queue` (empty = every queue)
    /// since `since_ms`, oldest first. Read on a blocking thread.
    pub async fn audit(
        &self,
        caller: &Caller,
        queue: String,
        since_ms: u64,
        limit: u32,
    ) -> Result<Vec<crate::audit::AuditEvent>, BrokerError> {
        if queue.is_empty() {
            self.require_admin(caller, "reading every queue's dead-letter trail")?;
        } else {
            self.check(caller, "read the dead-letter trail of", Access::Read, Resource::Queue(&queue))?;
        }
        let limit = if limit == 0 { 1000 } else { limit as usize };
        let registry = self.queues.clone();
        blocking(move || {
            registry
                .audit()
                .query(&queue, since_ms, limit)
                .map_err(|e| BrokerError::Internal(format!("cannot read the audit log: {e}")))
        })
        .await
    }

    /// Writes out and syncs every durable queue and stops their threads (at shutdown), on a
    /// blocking thread.
    pub async fn close(&self) {
        let registry = self.queues.clone();
        let _ = tokio::task::spawn_blocking(move || registry.close()).await;
    }

    /// The receipt of a delivery pulled by a caller without a connection, to settle it by.
    pub fn receipt(&self, delivery: &Delivery) -> String {
        self.receipts.issue(delivery.consumer_id, delivery.delivery_tag)
    }

    fn next_consumer_id(&self) -> u64 {
        self.next_consumer_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Keeps a connection counted; see [`Engine::connection_opened`].
pub struct ConnectionGuard {
    engine: Arc<Engine>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.engine.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs blocking file work on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|err| Err(BrokerError::Internal(format!("blocking task failed: {err}"))))
}

/// Message ids start from the current time in microseconds, scaled, so ids stay unique across
/// restarts without persisting a counter.
fn initial_message_id() -> u64 {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    micros.saturating_mul(1024)
}
