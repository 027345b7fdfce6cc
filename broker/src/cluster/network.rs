//! Node-to-node traffic: Raft's messages and forwarded metadata writes, over TCP.
//!
//! Framing is Hopper's own: a 4-byte big-endian length, then the message (JSON of an
//! [`Envelope`] holding the group and the [`Request`], or of the [`Response`]). A connection carries one request at a time and its answer.
//! Each peer that Raft replicates to gets its own connection, opened when first needed and
//! again after any failure; every call is bounded by the timeout Raft gives it.

// openraft's traits fix these error types, large as they are.
#![allow(clippy::result_large_err)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, ClientWriteResponse, InstallSnapshotRequest,
    InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::{Command, NodeId, TypeConfig};

/// Largest message between nodes (a snapshot chunk or a batch of entries).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// How long a forwarded metadata write may take.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// A request and the group it is for.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The group: [`super::META`] or a queue group.
    pub group: u8,
    /// The request.
    pub request: Request,
}

/// An [`Envelope`] as sent: the request borrowed.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    group: u8,
    request: &'a Request,
}

/// A message from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A write made on a follower, for the leader to commit.
    Write(Command),
    /// A membership change asked of a follower, for the leader to make.
    ChangeMembers(MembershipChange),
    /// Entries made on a follower, in order, for the leader to commit in that order.
    WriteBatch(Vec<Command>),
}

/// A change of the cluster's voters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add a node: it catches up as a learner, then votes.
    Add {
        /// The new node's id.
        id: NodeId,
        /// Its cluster address.
        addr: String,
    },
    /// Remove a node from the voters and the cluster.
    Remove {
        /// The node's id.
        id: NodeId,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Write(Result<ClientWriteResponse<TypeConfig>, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>),
    ChangeMembers(Result<(), String>),
    WriteBatch(Vec<Result<super::MetaResponse, String>>),
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(MAX_MESSAGE).new_codec()
}

/// A connection to another node.
pub struct Link {
    addr: String,
    conn: Option<Framed<TcpStream, LengthDelimitedCodec>>,
}

impl Link {
    pub fn new(addr: String) -> Self {
        Link { addr, conn: None }
    }

    /// Sends `request` for `group` and waits for the answer, within `timeout`. Any failure
    /// drops the connection; the next call opens a new one. `Err(true)` means the node could
    /// not be reached at all.
    pub async fn call(
        &mut self,
        group: u8,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, (bool, io::Error)> {
        let result = tokio::time::timeout(timeout, self.exchange(group, request)).await;
        let result = match result {
            Ok(result) => result,
            Err(_) => Err((
                false,
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from {} in {timeout:?}", self.addr),
                ),
            )),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn exchange(&mut self, group: u8, request: &Request) -> Result<Response, (bool, io::Error)> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(&self.addr).await.map_err(|e| (true, e))?;
            let _ = stream.set_nodelay(true);
            self.conn = Some(Framed::new(stream, codec()));
        }
        let conn = self.conn.as_mut().expect("connected above");
        let envelope = EnvelopeRef { group, request };
        let bytes = serde_json::to_vec(&envelope).map_err(|e| (false, io::Error::other(e)))?;
        conn.send(bytes::Bytes::from(bytes)).await.map_err(|e| (false, e))?;
        let frame = match conn.next().await {
            Some(frame) => frame.map_err(|e| (false, e))?,
            None => return Err((false, io::Error::new(io::ErrorKind::UnexpectedEof, "the node hung up"))),
        };
        serde_json::from_slice(&frame).map_err(|e| (false, io::Error::new(io::ErrorKind::InvalidData, e)))
    }
}

/// Makes the [`Peer`] a group's Raft uses to reach each node.
pub struct Network {
    /// The group.
    pub group: u8,
    /// Where this node reaches its peers.
    pub routes: Routes,
}

/// Where this node reaches each other node: at the address its own `--peers` gives, or else
/// at the one the cluster's membership records (a node added later). Nodes behind address
/// translation, or a proxy, are reached at different addresses from different nodes.
#[derive(Debug, Clone, Default)]
pub struct Routes(pub std::sync::Arc<std::collections::BTreeMap<NodeId, String>>);

impl Routes {
    /// The address to reach node `id` at, recorded as `node` in the membership.
    pub fn addr(&self, id: NodeId, node: &BasicNode) -> String {
        self.0.get(&id).cloned().unwrap_or_else(|| node.addr.clone())
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer { group: self.group, target, link: Link::new(self.routes.addr(target, node)) }
    }
}

/// A group's view of one other node.
pub struct Peer {
    group: u8,
    target: NodeId,
    link: Link,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Peer {
    async fn call<E: std::error::Error>(
        &mut self,
        request: Request,
        option: &RPCOption,
    ) -> RpcResult<Response, E> {
        self.link.call(self.group, &request, option.hard_ttl()).await.map_err(|(unreachable, e)| {
            if unreachable {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                RPCError::Network(NetworkError::new(&e))
            }
        })
    }

    fn remote<T, E: std::error::Error>(&self, result: Result<T, RaftError<NodeId, E>>) -> RpcResult<T, E> {
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn unexpected<E: std::error::Error>(
    response: &Response,
) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    let error = io::Error::new(io::ErrorKind::InvalidData, format!("unexpected answer {response:?}"));
    RPCError::Network(NetworkError::new(&error))
}

impl RaftNetwork<TypeConfig> for Peer {
    /// Tries a node that could not be reached again within half a heartbeat, rather than
    /// openraft's 500 ms: a node that restarts hears from its leader before its election
    /// timeout, instead of standing for election and making the leader step down.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(super::HEARTBEAT_MS / 2)))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self.call(Request::AppendEntries(rpc), &option).await? {
            Response::AppendEntries(result) => self.remote(result),
            other => Err(unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.call(Request::InstallSnapshot(rpc), &option).await? {
            Response::InstallSnapshot(result) => self.remote(result),
            other => Err(unexpected(&other)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        match self.call(Request::Vote(rpc), &option).await? {
            Response::Vote(result) => self.remote(result),
            other => Err(unexpected(&other)),
        }
    }
}

/// Serves other nodes' requests to `rafts` (by group) until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    rafts: Arc<Vec<Raft<TypeConfig>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                tracing::warn!(error = %err, "cluster listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let rafts = rafts.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(err) = serve_connection(stream, rafts, shutdown).await {
                tracing::debug!(%peer, error = %err, "cluster connection ended");
            }
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    rafts: Arc<Vec<Raft<TypeConfig>>>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut conn = Framed::new(stream, codec());
    loop {
        let frame = tokio::select! {
            frame = conn.next() => frame,
            _ = shutdown.changed() => return Ok(()),
        };
        let Some(frame) = frame else { return Ok(()) };
        let Envelope { group, request } =
            serde_json::from_slice(&frame?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let Some(raft) = rafts.get(usize::from(group)) else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("no group {group}")));
        };
        let response = match request {
            Request::AppendEntries(rpc) => Response::AppendEntries(raft.append_entries(rpc).await),
            Request::Vote(rpc) => Response::Vote(raft.vote(rpc).await),
            Request::InstallSnapshot(rpc) => Response::InstallSnapshot(raft.install_snapshot(rpc).await),
            Request::Write(command) => Response::Write(raft.client_write(command).await),
            Request::WriteBatch(commands) => {
                Response::WriteBatch(super::submit::write_batch(raft, commands).await)
            }
            Request::ChangeMembers(change) => {
                let changed = super::change_members(raft, change).await;
                Response::ChangeMembers(changed.map_err(|e| match e {
                    super::WriteError::NoLeader => super::NOT_LEADER.to_string(),
                    other => other.to_string(),
                }))
            }
        };
        let bytes = serde_json::to_vec(&response).map_err(io::Error::other)?;
        conn.send(bytes::Bytes::from(bytes)).await?;
    }
}
