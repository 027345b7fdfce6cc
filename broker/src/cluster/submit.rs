//! Entries of the queue group, submitted in the order they were made.
//!
//! Publishes to a replicated queue must enter its log in the order the publisher sent them. One
//! task per node takes them from a channel in that order and, in batches of whatever is
//! waiting: on the leader, hands each to Raft before awaiting any (Raft keeps the order it was
//! given); on a follower, forwards the batch to the leader over one connection, which does the
//! same there. Each submitter hears back its entry's outcome once it is applied on the leader.

use openraft::error::ClientWriteError;
use openraft::{BasicNode, Raft};
use tokio::sync::{mpsc, oneshot};

use super::network::{Link, Request, Response, FORWARD_TIMEOUT};
use super::{Command, MetaResponse, NodeId, TypeConfig, WriteError, QUEUES};

/// Most entries in one batch.
const MAX_BATCH: usize = 512;

/// One entry waiting to be submitted, and who waits for its outcome.
pub struct Submission {
    pub command: Command,
    pub reply: oneshot::Sender<Result<MetaResponse, WriteError>>,
}

/// Submits what arrives on `submissions`, in order, until the channel closes.
pub async fn run(
    raft: Raft<TypeConfig>,
    node_id: NodeId,
    mut submissions: mpsc::UnboundedReceiver<Submission>,
) {
    let mut link: Option<(NodeId, Link)> = None;
    while let Some(first) = submissions.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match submissions.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let metrics = raft.metrics().borrow().clone();
        match metrics.current_leader {
            Some(leader) if leader == node_id => submit_here(&raft, batch).await,
            Some(leader) => {
                let node = metrics.membership_config.membership().get_node(&leader).cloned();
                let Some(BasicNode { addr, .. }) = node else {
                    fail(batch, || WriteError::NoLeader);
                    continue;
                };
                let link = match &mut link {
                    Some((to, link)) if *to == leader => link,
                    _ => &mut link.insert((leader, Link::new(addr))).1,
                };
                forward(link, leader, batch).await;
            }
            None => fail(batch, || WriteError::NoLeader),
        }
    }
}

fn fail(batch: Vec<Submission>, error: impl Fn() -> WriteError) {
    for submission in batch {
        let _ = submission.reply.send(Err(error()));
    }
}

/// On the leader: hands every entry to Raft in order, then waits for their outcomes in the
/// background, so the next batch is handed over meanwhile.
async fn submit_here(raft: &Raft<TypeConfig>, batch: Vec<Submission>) {
    let mut pending = Vec::with_capacity(batch.len());
    for Submission { command, reply } in batch {
        match raft.client_write_ff(command).await {
            Ok(outcome) => pending.push((outcome, reply)),
            Err(_) => {
                let _ = reply.send(Err(WriteError::Stopped));
            }
        }
    }
    tokio::spawn(async move {
        for (outcome, reply) in pending {
            let result = match outcome.await {
                Ok(Ok(response)) => Ok(response.data),
                Ok(Err(ClientWriteError::ForwardToLeader(_))) => Err(WriteError::NoLeader),
                Ok(Err(err)) => Err(WriteError::Raft(err.to_string())),
                Err(_) => Err(WriteError::Stopped),
            };
            let _ = reply.send(result);
        }
    });
}

/// From a follower: sends the batch to the leader and passes on each outcome.
async fn forward(link: &mut Link, leader: NodeId, batch: Vec<Submission>) {
    let commands = batch.iter().map(|s| s.command.clone()).collect();
    match link.call(QUEUES as u8, &Request::WriteBatch(commands), FORWARD_TIMEOUT).await {
        Ok(Response::WriteBatch(outcomes)) if outcomes.len() == batch.len() => {
            for (submission, outcome) in batch.into_iter().zip(outcomes) {
                let _ = submission.reply.send(outcome.map_err(|err| WriteError::Forward(leader, err)));
            }
        }
        Ok(other) => fail(batch, || WriteError::Forward(leader, format!("unexpected answer {other:?}"))),
        Err((_, err)) => fail(batch, || WriteError::Forward(leader, err.to_string())),
    }
}

/// On the leader, for a follower's batch: hands every entry to Raft in order and answers once
/// all are applied.
pub async fn write_batch(
    raft: &Raft<TypeConfig>,
    commands: Vec<Command>,
) -> Vec<Result<MetaResponse, String>> {
    let mut pending = Vec::with_capacity(commands.len());
    for command in commands {
        pending.push(raft.client_write_ff(command).await);
    }
    let mut outcomes = Vec::with_capacity(pending.len());
    for submitted in pending {
        outcomes.push(match submitted {
            Ok(outcome) => match outcome.await {
                Ok(Ok(response)) => Ok(response.data),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err("the leader is shutting down".to_string()),
            },
            Err(fatal) => Err(fatal.to_string()),
        });
    }
    outcomes
}
