//! Clustering: brokers that agree, through Raft groups (openraft), on the metadata every node
//! serves and on the contents of replicated queues.
//!
//! Each node runs a member of every group; every group spans the same nodes. In the metadata group, a change
//! made on any node is a [`MetaCommand`]: the leader appends it to the group's log, and once a
//! majority holds it every node applies it to its own broker, so all nodes answer the same way.
//! A follower forwards the command to the leader and waits for it to be applied. Replicated
//! queues are spread over a fixed number of queue groups by a hash of their name; in each,
//! publishes and the messages that left are [`QueueCommand`]s: every node keeps a copy of
//! every replicated queue, and a group's leader is the node that serves its queues to
//! consumers. The groups elect their leaders apart, so the serving spreads over the nodes.
//!
//! The groups form on their own when the nodes named by `--peers` start (static bootstrap):
//! each group's preferred node proposes the membership, which Raft accepts once and ignores
//! after, and so becomes the group's first leader; the groups' leaders spread over the nodes.

mod network;
mod store;
mod submit;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{SavedPermissions, UserRecord, UserSecret};
use crate::engine::Engine;
use crate::error::BrokerError;
use crate::message::Payload;
use crate::queue::{Confirm, Outcome, Replicator};
use crate::routing::{Binding, ExchangeSpec};
use crate::settings::QueueSettings;
pub use network::MembershipChange;
use network::{Link, Network, Request, Response, Routes, FORWARD_TIMEOUT};
use store::{LogStore, StateMachine};

/// Node ids, as given to `--node-id` and `--peers`.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The groups' types.
    pub TypeConfig:
        D = Command,
        R = MetaResponse,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// Leader heartbeats, in milliseconds: well under the election timeout, so a live leader is
/// never voted out.
pub const HEARTBEAT_MS: u64 = 100;
/// A follower that hears nothing from its leader for a random time in this range (ms) stands
/// for election. A dead leader is replaced within about the upper bound plus one election
/// round: under a second, well inside the 2 s the failover bar allows.
pub const ELECTION_TIMEOUT_MS: (u64, u64) = (400, 800);

/// The node that should lead `group`, given the members the cluster formed with (sorted):
/// the groups take the members in turn, so each node leads its share of them. It forms the
/// group (the others wait for it a moment), and so is its first leader.
pub fn preferred_leader(group: usize, members: &[NodeId]) -> Option<NodeId> {
    (!members.is_empty()).then(|| members[group % members.len()])
}

/// How long a leader goes on serving its group's queues without hearing from a majority (ms).
/// A leader cut off from the others is replaced once their election timeout passes; past this
/// lease it stops serving too (its consumers are cancelled), so that two nodes serve the same
/// queue for at most a moment, and only in different terms. The longest election timeout, not
/// the shortest: a leader slowed down for a moment must not drop its consumers.
pub const SERVING_LEASE_MS: u64 = ELECTION_TIMEOUT_MS.1;

/// How long a publish to a replicated queue is tried again while its group has no leader, or
/// its leader cannot be reached: well past a failover, short of a publisher's patience.
const PUBLISH_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// The metadata group; the queue groups are 1, 2, ...
pub const META: usize = 0;

/// The queue group (1 to `groups`) that carries replicated queue `name`: the same on every
/// node, since it hashes the name alone.
pub fn queue_group(name: &str, groups: usize) -> usize {
    1 + crc32c::crc32c(name.as_bytes()) as usize % groups.max(1)
}

/// A group's name, for logs and its directory: `metadata`, `queues-1`, ...
fn group_name(group: usize) -> String {
    if group == META {
        "metadata".into()
    } else {
        format!("queues-{group}")
    }
}

/// An entry of a group's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// In the metadata group.
    Meta(MetaCommand),
    /// In a queue group: the changes made one after the other since the last entry, in one
    /// entry (one write and one sync for all of them).
    Queues(Vec<QueueCommand>),
}

/// A change to the replicated queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueCommand {
    /// A message published to a replicated queue.
    Publish {
        /// The queue.
        queue: String,
        /// The message.
        message: ReplicatedMessage,
        /// Its time to live in ms; 0 = none.
        ttl_ms: u64,
        /// Ready only this long (ms) after it is applied; 0 = at once.
        #[serde(default, skip_serializing_if = "is_zero")]
        delay_ms: u64,
        /// The metadata entry the publishing node had applied: the queue exists once the
        /// metadata is applied that far, so a node applies this publish only then.
        meta_index: u64,
        /// The id the publisher gave the message (or the broker, if it gave none): while the
        /// queue holds a message with this id, or took one within its last 4,096 publishes, a
        /// publish with it again does not enter.
        #[serde(default, skip_serializing_if = "is_zero")]
        publish_id: u64,
    },
    /// Messages that left a replicated queue on the node serving it (acked, rejected,
    /// expired, purged), by their seq, which is the same on every node.
    Left {
        /// The queue.
        queue: String,
        /// Their seqs.
        seqs: Vec<u64>,
    },
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// A message as the queue group's log and snapshots carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedMessage {
    /// Its id.
    pub id: u64,
    /// Its body, in base64.
    pub body: String,
    /// Its headers.
    #[serde(default, skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub headers: std::collections::HashMap<String, String>,
    /// Its content type.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content_type: String,
    /// Unix ms of its publish.
    pub published_at_ms: u64,
    /// The exchange it was published through.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub exchange: String,
    /// Its routing key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub routing_key: String,
    /// Where and why it died before, oldest first (it came through a dead-letter queue).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deaths: Vec<crate::message::Death>,
    /// Deaths left out of `deaths`.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub deaths_omitted: u32,
    /// Times it was moved out of a queue.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub replay_count: u32,
}

fn is_zero_u32(value: &u32) -> bool {
    *value == 0
}

impl ReplicatedMessage {
    /// The message of `payload`.
    pub fn of(payload: &Payload) -> Self {
        use base64::Engine as _;
        ReplicatedMessage {
            id: payload.id,
            body: base64::engine::general_purpose::STANDARD.encode(&payload.body),
            headers: payload.headers().clone(),
            content_type: payload.content_type().to_owned(),
            published_at_ms: payload.published_at_ms,
            exchange: payload.exchange.to_string(),
            routing_key: payload.routing_key.clone(),
            deaths: payload.deaths().to_vec(),
            deaths_omitted: payload.deaths_omitted(),
            replay_count: payload.replay_count,
        }
    }

    /// The payload it carries.
    pub fn payload(&self) -> Result<Payload, String> {
        use base64::Engine as _;
        let body = base64::engine::general_purpose::STANDARD
            .decode(&self.body)
            .map_err(|e| format!("message {}: body: {e}", self.id))?;
        let payload = Payload {
            id: self.id,
            body: body.into(),
            published_at_ms: self.published_at_ms,
            replay_count: self.replay_count,
            exchange: self.exchange.as_str().into(),
            routing_key: self.routing_key.clone(),
            ..Payload::default()
        };
        Ok(payload
            .with_properties(self.headers.clone(), self.content_type.clone())
            .with_deaths(self.deaths.clone(), self.deaths_omitted))
    }
}

/// A change to the cluster's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Declare a queue.
    DeclareQueue {
        /// The queue's name.
        name: String,
        /// Its settings.
        settings: QueueSettings,
    },
    /// Delete a queue (and the bindings to it).
    DeleteQueue {
        /// The queue's name.
        name: String,
    },
    /// Declare an exchange.
    DeclareExchange(ExchangeSpec),
    /// Delete an exchange with its bindings and the bindings to it.
    DeleteExchange {
        /// The exchange's name.
        name: String,
    },
    /// Bind exchange `source` to a queue or exchange.
    Bind {
        /// The exchange the binding belongs to.
        source: String,
        /// Where it leads, with its key and arguments.
        binding: Binding,
    },
    /// Remove a binding.
    Unbind {
        /// The exchange the binding belongs to.
        source: String,
        /// The binding.
        binding: Binding,
    },
    /// Create a user or (with `update`) change its password and tags.
    PutUser {
        /// The user's name.
        name: String,
        /// Its tags.
        tags: Vec<String>,
        /// Its new password's verifier; `None` keeps the password (an update).
        secret: Option<UserSecret>,
        /// Change an existing user rather than create one.
        update: bool,
    },
    /// Delete a user.
    DeleteUser {
        /// The user's name.
        name: String,
    },
    /// Set a user's permission patterns.
    SetPermissions {
        /// The user's name.
        name: String,
        /// The patterns.
        permissions: SavedPermissions,
    },
    /// Changes nothing: once a node has applied it, it has applied every change committed
    /// before (see [`Cluster::catch_up`]).
    Barrier,
    /// Node `node` is reached by clients at `addr` (written by the node itself when it
    /// starts): where a client is sent for what that node serves.
    Advertise {
        /// The node.
        node: NodeId,
        /// Its client address, HOST:PORT.
        addr: String,
    },
}

/// The outcome of applying a [`MetaCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    /// Applied; true if it changed something (a declare created, a bind added, an unbind
    /// removed), false if it found things as asked.
    Done(bool),
    /// The broker refused the change (it is recorded in the log all the same, refused on
    /// every node alike).
    Refused(BrokerError),
    /// The outcome of each change of a [`Command::Queues`] entry, in order.
    Each(Vec<MetaResponse>),
}

/// The metadata a node holds, as a snapshot carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Queues, with their settings.
    pub queues: Vec<(String, QueueSettings)>,
    /// Exchanges.
    pub exchanges: Vec<ExchangeSpec>,
    /// Bindings, with their source exchanges.
    pub bindings: Vec<(String, Binding)>,
    /// Users and their permissions.
    #[serde(default)]
    pub users: Vec<UserRecord>,
    /// Each node's client address.
    #[serde(default)]
    pub nodes: Vec<(NodeId, String)>,
}

impl Catalog {
    /// The commands that build this catalog on a broker that has none of it: exchanges and
    /// queues before the bindings between them.
    pub fn as_commands(&self) -> Vec<MetaCommand> {
        let exchanges = self.exchanges.iter().cloned().map(MetaCommand::DeclareExchange);
        let queues = self.queues.iter().map(|(name, settings)| MetaCommand::DeclareQueue {
            name: name.clone(),
            settings: settings.clone(),
        });
        let bindings = self
            .bindings
            .iter()
            .map(|(source, binding)| MetaCommand::Bind { source: source.clone(), binding: binding.clone() });
        let users = self.users.iter().flat_map(|user| {
            let put = MetaCommand::PutUser {
                name: user.name.clone(),
                tags: user.tags.clone(),
                secret: Some(user.secret.clone()),
                update: false,
            };
            let permissions = MetaCommand::SetPermissions {
                name: user.name.clone(),
                permissions: user.permissions.clone(),
            };
            [put, permissions]
        });
        let nodes =
            self.nodes.iter().map(|(node, addr)| MetaCommand::Advertise { node: *node, addr: addr.clone() });
        exchanges.chain(queues).chain(bindings).chain(users).chain(nodes).collect()
    }
}

/// The broker as a group's state machine sees it.
pub trait GroupHost: Send + Sync {
    /// Applies one committed entry. Every node applies the same entries in the same order,
    /// and again from the last snapshot on after a restart: applying one twice changes
    /// nothing.
    fn apply(&self, command: &Command) -> MetaResponse;
    /// What the broker holds now, as a snapshot.
    fn export(&self) -> serde_json::Value;
    /// Makes the broker hold exactly `snapshot` (taken over from the leader, or read at
    /// start).
    fn reset(&self, snapshot: &serde_json::Value);
    /// This node became the group's leader.
    fn lead(&self) {}
    /// This node was the group's leader and is no longer.
    fn follow(&self) {}
}

/// The engine as the metadata group's [`GroupHost`], while it lives.
struct MetaHost(std::sync::Weak<Engine>);

impl GroupHost for MetaHost {
    fn apply(&self, command: &Command) -> MetaResponse {
        match (self.0.upgrade(), command) {
            (Some(engine), Command::Meta(command)) => engine.apply_meta(command),
            (Some(_), other) => {
                MetaResponse::Refused(BrokerError::Internal(format!("not a metadata command: {other:?}")))
            }
            (None, _) => MetaResponse::Refused(BrokerError::Internal("the broker is shutting down".into())),
        }
    }

    fn export(&self) -> serde_json::Value {
        let catalog = self.0.upgrade().map(|engine| engine.export_meta()).unwrap_or_default();
        serde_json::to_value(catalog).expect("the catalog serializes")
    }

    fn reset(&self, snapshot: &serde_json::Value) {
        let Some(engine) = self.0.upgrade() else { return };
        let catalog: Catalog = match serde_json::from_value(snapshot.clone()) {
            Ok(catalog) => catalog,
            Err(error) => {
                tracing::error!(%error, "the metadata snapshot is unreadable; ignored");
                return;
            }
        };
        let current = engine.export_meta();
        let mut gone = Vec::new();
        for (source, binding) in &current.bindings {
            if !catalog.bindings.iter().any(|(s, b)| s == source && b == binding) {
                gone.push(MetaCommand::Unbind { source: source.clone(), binding: binding.clone() });
            }
        }
        for spec in &current.exchanges {
            if !catalog.exchanges.iter().any(|x| x.name == spec.name) {
                gone.push(MetaCommand::DeleteExchange { name: spec.name.clone() });
            }
        }
        for (name, _) in &current.queues {
            if !catalog.queues.iter().any(|(n, _)| n == name) {
                gone.push(MetaCommand::DeleteQueue { name: name.clone() });
            }
        }
        for user in &current.users {
            if !catalog.users.iter().any(|u| u.name == user.name) {
                gone.push(MetaCommand::DeleteUser { name: user.name.clone() });
            }
        }
        for mut command in gone.into_iter().chain(catalog.as_commands()) {
            // A user this node has already is updated to the catalog's.
            if let MetaCommand::PutUser { name, update, .. } = &mut command {
                *update = current.users.iter().any(|u| &u.name == name);
            }
            if let MetaResponse::Refused(error) = engine.apply_meta(&command) {
                tracing::warn!(?command, %error, "taking over the cluster's metadata: a change was refused");
            }
        }
    }
}

/// The engine as a queue group's [`GroupHost`], while it lives: the replicated queues of
/// group `.1` of `.2`.
struct QueueHost(std::sync::Weak<Engine>, usize, usize);

impl GroupHost for QueueHost {
    fn apply(&self, command: &Command) -> MetaResponse {
        match (self.0.upgrade(), command) {
            (Some(engine), Command::Queues(commands)) => {
                MetaResponse::Each(commands.iter().map(|command| engine.apply_replicated(command)).collect())
            }
            (Some(_), other) => {
                MetaResponse::Refused(BrokerError::Internal(format!("not a queue command: {other:?}")))
            }
            (None, _) => MetaResponse::Refused(BrokerError::Internal("the broker is shutting down".into())),
        }
    }

    fn export(&self) -> serde_json::Value {
        self.0.upgrade().map(|engine| engine.export_replicated(self.in_group())).unwrap_or_default()
    }

    fn reset(&self, snapshot: &serde_json::Value) {
        if let Some(engine) = self.0.upgrade() {
            engine.restore_replicated(snapshot, self.in_group());
        }
    }

    fn lead(&self) {
        if let Some(engine) = self.0.upgrade() {
            engine.take_over_replicated(self.in_group());
        }
    }

    fn follow(&self) {
        if let Some(engine) = self.0.upgrade() {
            engine.stop_serving_replicated(self.in_group());
        }
    }
}

impl QueueHost {
    /// Which queues are this group's.
    fn in_group(&self) -> impl Fn(&str) -> bool {
        let (group, groups) = (self.1, self.2);
        move |queue| queue_group(queue, groups) == group
    }
}

/// The engine as each group's state machine: the metadata group's, then each of `queue_groups`
/// queue groups'.
pub fn hosts(engine: std::sync::Weak<Engine>, queue_groups: usize) -> Vec<Arc<dyn GroupHost>> {
    let mut hosts: Vec<Arc<dyn GroupHost>> = vec![Arc::new(MetaHost(engine.clone()))];
    for group in 1..=queue_groups {
        hosts.push(Arc::new(QueueHost(engine.clone(), group, queue_groups)));
    }
    hosts
}

/// How this node joins a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's id (1 or more), unique in the cluster.
    pub node_id: NodeId,
    /// Address other nodes reach this one at (port 0 picks a free port).
    pub listen: String,
    /// Every member of the initial cluster, this node included: id → cluster address.
    pub peers: BTreeMap<NodeId, String>,
    /// Entries after which the metadata is snapshotted and the log before it dropped (keeping
    /// as many again for followers that lag a little).
    pub snapshot_entries: u64,
    /// Queue groups the replicated queues are spread over, each with its own leader; the same
    /// on every node, and never changed once the cluster holds replicated queues.
    pub queue_groups: usize,
}

impl ClusterConfig {
    /// Parses `--peers` (`1=host:port,2=host:port,...`).
    pub fn parse_peers(text: &str) -> Result<BTreeMap<NodeId, String>, String> {
        let mut peers = BTreeMap::new();
        for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            let Some((id, addr)) = item.split_once('=') else {
                return Err(format!("'{item}' is not ID=ADDRESS"));
            };
            let id: NodeId = id.trim().parse().map_err(|_| format!("'{id}' in '{item}' is not a node id"))?;
            if id == 0 {
                return Err("node ids start at 1".into());
            }
            if peers.insert(id, addr.trim().to_owned()).is_some() {
                return Err(format!("node {id} is listed twice"));
            }
        }
        Ok(peers)
    }

    /// Checks the configuration before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("--node-id must be at least 1".into());
        }
        if self.snapshot_entries == 0 {
            return Err("cluster_snapshot_entries must be at least 1".into());
        }
        if !(1..=64).contains(&self.queue_groups) {
            return Err("--queue-groups must be between 1 and 64".into());
        }
        if !self.peers.is_empty() && !self.peers.contains_key(&self.node_id) {
            return Err(format!("--peers does not list this node ({})", self.node_id));
        }
        Ok(())
    }
}

/// This node's member of each group.
#[derive(Clone)]
pub struct Cluster {
    node_id: NodeId,
    addr: SocketAddr,
    /// By group: [`META`], then the queue groups.
    rafts: Arc<Vec<Raft<TypeConfig>>>,
    runtime: tokio::runtime::Handle,
    /// Entries of each queue group (index 0 for group 1), submitted in order.
    queue_entries: Arc<Vec<tokio::sync::mpsc::UnboundedSender<submit::Submission>>>,
    /// Where this node reaches the others.
    routes: Routes,
}

/// Why a metadata change did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// No leader: an election is under way, or this node cannot reach a majority.
    #[error("no leader is known to this node; the cluster may have lost its majority")]
    NoLeader,
    /// The leader could not be reached, or did not answer in time.
    #[error("the leader (node {0}) could not be reached: {1}")]
    Forward(NodeId, String),
    /// Raft refused the change.
    #[error("{0}")]
    Raft(String),
    /// The broker refused the change.
    #[error("{0}")]
    Refused(BrokerError),
    /// The change was committed but this node did not apply it in time.
    #[error("the change was committed but not yet applied on this node; retry shortly")]
    NotApplied,
    /// This node is shutting down.
    #[error("the cluster is shutting down")]
    Stopped,
}

impl From<WriteError> for BrokerError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::Refused(error) => error,
            other => BrokerError::Internal(format!("cluster: {other}")),
        }
    }
}

impl Cluster {
    /// Starts this node's member of each group with its state in `dir` (the metadata group)
    /// and `dir/queues-N`, serving other nodes on `config.listen`, and proposes the initial
    /// membership when `config.peers` lists one. `hosts` are the groups' state machines: the
    /// metadata group's, then one per queue group.
    pub async fn start(
        config: &ClusterConfig,
        dir: &Path,
        hosts: Vec<Arc<dyn GroupHost>>,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Cluster> {
        let raft_config = openraft::Config {
            cluster_name: "hopper".into(),
            heartbeat_interval: HEARTBEAT_MS,
            election_timeout_min: ELECTION_TIMEOUT_MS.0,
            election_timeout_max: ELECTION_TIMEOUT_MS.1,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_entries),
            max_in_snapshot_log_to_keep: config.snapshot_entries,
            ..Default::default()
        }
        .validate()
        .map_err(std::io::Error::other)?;
        let raft_config = Arc::new(raft_config);
        let listener = TcpListener::bind(&config.listen).await?;
        let addr = listener.local_addr()?;
        let routes = Routes(Arc::new(config.peers.clone()));
        let mut rafts: Vec<Raft<TypeConfig>> = Vec::new();
        for (group, host) in hosts.into_iter().enumerate() {
            let name = group_name(group);
            let dir = if group == META { dir.to_path_buf() } else { dir.join(&name) };
            let log = LogStore::open(&dir)?;
            // A publish waits for the metadata that declared its queue.
            let metadata = rafts.first().cloned();
            let machine = StateMachine::open(&dir, name, host.clone(), metadata)?;
            let network = Network { group: group as u8, routes: routes.clone() };
            let raft = Raft::new(config.node_id, raft_config.clone(), network, log, machine)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(watch_leadership(raft.clone(), host));
            rafts.push(raft);
        }
        let rafts = Arc::new(rafts);
        tokio::spawn(network::serve(listener, rafts.clone(), shutdown.clone()));
        if !config.peers.is_empty() {
            let members: BTreeMap<NodeId, BasicNode> =
                config.peers.iter().map(|(id, addr)| (*id, BasicNode::new(addr))).collect();
            let ids: Vec<NodeId> = members.keys().copied().collect();
            for (group, raft) in rafts.iter().enumerate() {
                match preferred_leader(group, &ids) {
                    Some(preferred) if preferred != config.node_id => {
                        tokio::spawn(defer_to(raft.clone(), group, preferred, members.clone()));
                    }
                    _ => initialize(raft, group, members.clone()).await?,
                }
            }
        }
        let mut queue_entries = Vec::new();
        for (group, raft) in rafts.iter().enumerate().skip(1) {
            let (entries, submissions) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(submit::run(raft.clone(), group as u8, config.node_id, routes.clone(), submissions));
            queue_entries.push(entries);
        }
        let queue_entries = Arc::new(queue_entries);
        let runtime = tokio::runtime::Handle::current();
        let cluster = Cluster { node_id: config.node_id, addr, rafts, runtime, queue_entries, routes };
        let stopping = cluster.rafts.clone();
        let mut shutdown = shutdown;
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
            for raft in stopping.iter() {
                let _ = raft.shutdown().await;
            }
        });
        Ok(cluster)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The address other nodes reach this one at.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node serving replicated queue `queue` (the leader of its queue group), as this
    /// node knows: not this node while it leads but has lost touch with the majority.
    pub fn serving(&self, queue: &str) -> Option<NodeId> {
        let metrics = self.rafts[self.group_of(queue)].metrics();
        let metrics = metrics.borrow();
        match metrics.current_leader {
            Some(leader) if leader == self.node_id => serves(&metrics).then_some(leader),
            other => other,
        }
    }

    /// How many nodes vote in the cluster (its metadata group).
    pub fn voters(&self) -> usize {
        self.rafts[META].metrics().borrow().membership_config.membership().voter_ids().count()
    }

    /// The queue group of replicated queue `queue`.
    pub fn group_of(&self, queue: &str) -> usize {
        queue_group(queue, self.rafts.len() - 1)
    }

    /// The leader of each queue group, in group order.
    pub fn queue_leaders(&self) -> Vec<Option<NodeId>> {
        self.rafts.iter().skip(1).map(|raft| raft.metrics().borrow().current_leader).collect()
    }

    /// Index of the newest metadata entry this node has applied.
    pub fn meta_applied(&self) -> u64 {
        self.rafts[META].metrics().borrow().last_applied.map_or(0, |id| id.index)
    }

    /// Returns once this node has applied every metadata change committed so far, so that
    /// what it checks locally next (does the queue exist?) sees changes made on other nodes.
    pub async fn catch_up(&self) -> Result<(), WriteError> {
        self.write(MetaCommand::Barrier).await.map(drop)
    }

    /// Commits a metadata change (forwarded to the leader from a follower) and returns once
    /// it is applied here too; true if it changed something.
    pub async fn write(&self, command: MetaCommand) -> Result<bool, WriteError> {
        self.commit(META, Command::Meta(command), true).await
    }

    /// Commits `command` in `group`, forwarded to its leader from a follower; with
    /// `applied_here`, returns only once this node has applied it too.
    async fn commit(&self, group: usize, command: Command, applied_here: bool) -> Result<bool, WriteError> {
        let raft = &self.rafts[group];
        let response = match raft.client_write(command.clone()).await {
            Ok(response) => response,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                let (Some(leader), Some(node)) = (forward.leader_id, forward.leader_node) else {
                    return Err(WriteError::NoLeader);
                };
                let mut link = Link::new(self.routes.addr(leader, &node));
                match link.call(group as u8, &Request::Write(command), FORWARD_TIMEOUT).await {
                    Ok(Response::Write(Ok(response))) => response,
                    Ok(Response::Write(Err(err))) => {
                        return Err(WriteError::Forward(leader, err.to_string()))
                    }
                    Ok(other) => {
                        return Err(WriteError::Forward(leader, format!("unexpected answer {other:?}")))
                    }
                    Err((_, err)) => return Err(WriteError::Forward(leader, err.to_string())),
                }
            }
            Err(RaftError::APIError(err)) => return Err(WriteError::Raft(err.to_string())),
            Err(RaftError::Fatal(_)) => return Err(WriteError::Stopped),
        };
        // The leader has applied it; a follower that took the request applies it before it
        // answers, so the client sees its own change on the node it asked.
        if applied_here {
            let wait = raft.wait(Some(FORWARD_TIMEOUT));
            if wait.applied_index_at_least(Some(response.log_id.index), "applied here").await.is_err() {
                return Err(WriteError::NotApplied);
            }
        }
        match response.data {
            MetaResponse::Done(changed) => Ok(changed),
            MetaResponse::Refused(error) => Err(WriteError::Refused(error)),
            MetaResponse::Each(_) => Err(WriteError::Raft("a batch answered a single change".into())),
        }
    }

    /// Adds a node to the cluster, or removes one, in every group, through Raft's joint
    /// consensus: a new node first catches up as a learner, then becomes a voter. Asked of a
    /// follower, the change is forwarded to the leader.
    pub async fn change_members(&self, change: MembershipChange) -> Result<(), WriteError> {
        for group in 0..self.rafts.len() {
            self.change_members_in(group, change.clone()).await?;
        }
        Ok(())
    }

    /// Makes `change` in `group`, waiting out an election there (the groups elect their
    /// leaders separately).
    async fn change_members_in(&self, group: usize, change: MembershipChange) -> Result<(), WriteError> {
        let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
        loop {
            match self.try_change_members_in(group, change.clone()).await {
                Err(WriteError::NoLeader) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(HEARTBEAT_MS)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_change_members_in(&self, group: usize, change: MembershipChange) -> Result<(), WriteError> {
        let raft = &self.rafts[group];
        let leader = raft.current_leader().await;
        if leader == Some(self.node_id) {
            return change_members(raft, change).await;
        }
        let Some(leader) = leader else { return Err(WriteError::NoLeader) };
        let metrics = raft.metrics().borrow().clone();
        let Some(node) = metrics.membership_config.membership().get_node(&leader).cloned() else {
            return Err(WriteError::NoLeader);
        };
        let mut link = Link::new(self.routes.addr(leader, &node));
        match link.call(group as u8, &Request::ChangeMembers(change), FORWARD_TIMEOUT).await {
            Ok(Response::ChangeMembers(Ok(()))) => Ok(()),
            Ok(Response::ChangeMembers(Err(err))) if err == NOT_LEADER => Err(WriteError::NoLeader),
            Ok(Response::ChangeMembers(Err(err))) => Err(WriteError::Raft(err)),
            Ok(other) => Err(WriteError::Forward(leader, format!("unexpected answer {other:?}"))),
            Err((_, err)) => Err(WriteError::Forward(leader, err.to_string())),
        }
    }

    /// What this node knows of the cluster now (the metadata group's view, and the queue
    /// group's leader).
    pub fn status(&self) -> ClusterStatus {
        let metrics = self.rafts[META].metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let replication = metrics.replication.clone().unwrap_or_default();
        let last_index = metrics.last_log_index.unwrap_or(0);
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let matched = if *id == metrics.id {
                    metrics.last_log_index
                } else {
                    replication.get(id).and_then(|m| m.map(|log_id| log_id.index))
                };
                MemberStatus {
                    id: *id,
                    addr: node.addr.clone(),
                    client_addr: None,
                    voter: voters.contains(id),
                    leader: metrics.current_leader == Some(*id),
                    // Only the leader knows how far the others are.
                    lag: (metrics.state == ServerState::Leader)
                        .then(|| last_index - matched.unwrap_or(0).min(last_index)),
                }
            })
            .collect();
        ClusterStatus {
            node_id: metrics.id,
            state: format!("{:?}", metrics.state).to_lowercase(),
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            last_applied: metrics.last_applied.map_or(0, |id| id.index),
            members,
            queue_leaders: self.queue_leaders(),
        }
    }
}

/// True when the node whose `metrics` these are leads its group, has applied an entry of its
/// own term (so every entry of its predecessors: what they may have delivered is in its
/// copy, to be flagged), and has heard from a majority within the [`SERVING_LEASE_MS`].
fn serves(metrics: &openraft::RaftMetrics<NodeId, BasicNode>) -> bool {
    let alone = metrics.membership_config.membership().voter_ids().count() <= 1;
    metrics.state == ServerState::Leader
        && metrics.current_leader == Some(metrics.id)
        && metrics.last_applied.is_some_and(|applied| applied.leader_id.term == metrics.current_term)
        && (alone || metrics.millis_since_quorum_ack.is_some_and(|ms| ms < SERVING_LEASE_MS))
}

/// How long a node leaves a leaderless group to its preferred node before standing itself.
const PREFERRED_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Proposes `group`'s initial membership from this node (once: a formed group ignores it).
/// Proposing it makes the node stand for election at once.
async fn initialize(
    raft: &Raft<TypeConfig>,
    group: usize,
    members: BTreeMap<NodeId, BasicNode>,
) -> std::io::Result<()> {
    match raft.initialize(members).await {
        Ok(()) => tracing::info!(group = %group_name(group), "cluster membership proposed"),
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
            tracing::info!(group = %group_name(group), "cluster already formed; rejoining")
        }
        Err(err) => return Err(std::io::Error::other(err)),
    }
    Ok(())
}

/// Leaves the forming of `group` to its `preferred` node, which proposes the membership and so
/// stands first: this node proposes it only if the group has no leader after
/// [`PREFERRED_GRACE`] (the preferred node may be down). A new cluster's groups are then led
/// by their preferred nodes, spread over the nodes.
async fn defer_to(
    raft: Raft<TypeConfig>,
    group: usize,
    preferred: NodeId,
    members: BTreeMap<NodeId, BasicNode>,
) {
    let mut metrics = raft.metrics();
    let led = metrics.wait_for(|metrics| metrics.current_leader.is_some());
    if tokio::time::timeout(PREFERRED_GRACE, led).await.is_ok() {
        return;
    }
    tracing::info!(group = %group_name(group), preferred, "the preferred node formed no group in time; forming it");
    if let Err(error) = initialize(&raft, group, members).await {
        tracing::warn!(group = %group_name(group), %error, "could not propose the cluster's membership");
    }
}

/// Tells `host` whenever this node starts serving `raft`'s group (it became the leader), and
/// whenever it stops (another leads, or it lost touch with the majority).
async fn watch_leadership(raft: Raft<TypeConfig>, host: Arc<dyn GroupHost>) {
    let mut metrics = raft.metrics();
    // The term this node serves in, while it does.
    let mut leading: Option<u64> = None;
    loop {
        let now = {
            let metrics = metrics.borrow_and_update();
            serves(&metrics).then_some(metrics.current_term)
        };
        // Changes between two looks at the metrics are not all seen: a node that served in an
        // earlier term than now stopped in between, and another node may have served since.
        if leading.is_some() && now != leading {
            host.follow();
        }
        if now.is_some() && now != leading {
            host.lead();
        }
        leading = now;
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

impl Cluster {
    /// Submits an entry of `queue`'s group after every entry submitted to it before.
    fn submit(
        &self,
        queue: &str,
        command: QueueCommand,
    ) -> tokio::sync::oneshot::Receiver<Result<MetaResponse, WriteError>> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let submission = submit::Submission { command, reply, also: Vec::new() };
        if let Err(refused) = self.queue_entries[self.group_of(queue) - 1].send(submission) {
            let _ = refused.0.reply.send(Err(WriteError::Stopped));
        }
        outcome
    }
}

impl Replicator for Cluster {
    fn publish(&self, queue: &str, payload: Arc<Payload>, delay_ms: u64, ttl_ms: u64, confirm: Confirm) {
        // Tried again after a failover, the publish keeps its id, so that it enters the queue
        // once even if the first try was committed after all.
        let publish_id = match payload.publish_id {
            0 => rand::random::<u64>().max(1),
            id => id,
        };
        let publish = move |cluster: &Cluster, queue: &str, payload: &Payload| QueueCommand::Publish {
            queue: queue.to_owned(),
            message: ReplicatedMessage::of(payload),
            ttl_ms,
            delay_ms,
            meta_index: cluster.meta_applied(),
            publish_id,
        };
        let mut outcome = self.submit(queue, publish(self, queue, &payload));
        let message_id = payload.id;
        let (cluster, queue) = (self.clone(), queue.to_owned());
        self.runtime.spawn(async move {
            // The leader died or is being replaced: the publish is handed to the next one,
            // for as long as a publisher would wait for a confirm.
            let deadline = tokio::time::Instant::now() + PUBLISH_RETRY;
            let result = loop {
                match outcome.await {
                    Ok(Ok(MetaResponse::Refused(error))) => break Err(error),
                    Ok(Ok(_)) => break Ok(Outcome::Published { message_id, routed: 1 }),
                    Ok(Err(error @ (WriteError::NoLeader | WriteError::Forward(..))))
                        if tokio::time::Instant::now() < deadline =>
                    {
                        tracing::debug!(%error, queue, "publish to a replicated queue tried again");
                        tokio::time::sleep(std::time::Duration::from_millis(HEARTBEAT_MS)).await;
                        outcome = cluster.submit(&queue, publish(&cluster, &queue, &payload));
                    }
                    Ok(Err(error)) => break Err(error.into()),
                    Err(_) => break Err(WriteError::Stopped.into()),
                }
            };
            confirm.send(result);
        });
    }

    fn serves(&self, queue: &str) -> bool {
        self.serving(queue) == Some(self.node_id)
    }

    fn left(&self, queue: &str, seqs: Vec<u64>) {
        // Only the node serving the queue speaks for it; the others follow its entries.
        if self.serving(queue) != Some(self.node_id) {
            return;
        }
        let cluster = self.clone();
        let queue = queue.to_owned();
        self.runtime.spawn(async move {
            // Until it is committed, the other copies still hold these messages: a failure is
            // tried again for as long as this node serves the queue (after that, the messages
            // are redelivered by the next serving node, flagged).
            loop {
                let left = QueueCommand::Left { queue: queue.clone(), seqs: seqs.clone() };
                match cluster.submit(&queue, left).await {
                    Ok(Ok(_)) | Err(_) => return,
                    Ok(Err(error)) => {
                        if cluster.serving(&queue) != Some(cluster.node_id) {
                            tracing::warn!(%error, queue, "messages that left a replicated queue were not replicated");
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(HEARTBEAT_MS / 2)).await;
                    }
                }
            }
        });
    }
}

/// How a node that is no longer the leader refuses a forwarded membership change.
const NOT_LEADER: &str = "not the leader";

/// Makes a membership change on the leader `raft`.
async fn change_members(raft: &Raft<TypeConfig>, change: MembershipChange) -> Result<(), WriteError> {
    let voters: BTreeSet<NodeId> =
        raft.metrics().borrow().membership_config.membership().voter_ids().collect();
    let refused = |err: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>| match err {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => WriteError::NoLeader,
        RaftError::APIError(err) => WriteError::Raft(err.to_string()),
        RaftError::Fatal(_) => WriteError::Stopped,
    };
    match change {
        MembershipChange::Add { id, addr } => {
            if voters.contains(&id) {
                return Err(WriteError::Refused(BrokerError::PreconditionFailed(format!(
                    "node {id} is already a member"
                ))));
            }
            raft.add_learner(id, BasicNode::new(addr), true).await.map_err(refused)?;
            let mut next = voters;
            next.insert(id);
            raft.change_membership(next, false).await.map_err(refused)?;
        }
        MembershipChange::Remove { id } => {
            if !voters.contains(&id) {
                return Err(WriteError::Refused(BrokerError::NotFound(format!("node {id} is not a member"))));
            }
            if voters.len() == 1 {
                return Err(WriteError::Refused(BrokerError::PreconditionFailed(
                    "the last member cannot be removed".into(),
                )));
            }
            let mut next = voters;
            next.remove(&id);
            raft.change_membership(next, false).await.map_err(refused)?;
        }
    }
    Ok(())
}

/// [`Cluster::status`]: this node's view of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The node answering.
    pub node_id: NodeId,
    /// leader, follower, candidate or learner.
    pub state: String,
    /// The current Raft term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Index of the newest entry in this node's log.
    pub last_log_index: u64,
    /// Index of the newest entry applied on this node.
    pub last_applied: u64,
    /// Every member, voters and learners.
    pub members: Vec<MemberStatus>,
    /// The leader of each queue group, in group order: the node serving the replicated
    /// queues of that group.
    pub queue_leaders: Vec<Option<NodeId>>,
}

/// One member in [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its node id.
    pub id: NodeId,
    /// Its cluster address.
    pub addr: String,
    /// The address clients reach it at, once it has told the cluster.
    pub client_addr: Option<String>,
    /// True for a voter, false for a learner.
    pub voter: bool,
    /// True for the leader.
    pub leader: bool,
    /// Entries the member is behind the leader's log (known on the leader only).
    pub lag: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_bad_lists_are_refused_clearly() {
        let peers = ClusterConfig::parse_peers("1=127.0.0.1:7001, 2=h2:7002,3=h3:7003").unwrap();
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[&2], "h2:7002");
        assert!(ClusterConfig::parse_peers("1=a,1=b").unwrap_err().contains("twice"));
        assert!(ClusterConfig::parse_peers("x=a").unwrap_err().contains("not a node id"));
        assert!(ClusterConfig::parse_peers("0=a").unwrap_err().contains("start at 1"));
        assert!(ClusterConfig::parse_peers("1:a").unwrap_err().contains("ID=ADDRESS"));
        let config =
            ClusterConfig { node_id: 4, listen: "x".into(), peers, snapshot_entries: 10, queue_groups: 3 };
        assert!(config.validate().unwrap_err().contains("does not list this node"));
    }
}
