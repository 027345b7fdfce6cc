//! Entries of the queue group, submitted in the order they were made.
//!
//! Publishes to a replicated queue must enter its log in the order the publisher sent them. One
//! task per node takes them from a channel in that order, in batches of whatever is waiting,
//! and makes each batch one log entry (one write, one sync and one replication for all its
//! changes): on the leader it hands the entry to Raft and takes the next batch while it
//! commits; on a follower it forwards the entry to the leader over one connection. Each
//! submitter hears back its change's outcome once the entry is applied on the leader.

use openraft::error::ClientWriteError;
use openraft::Raft;
use tokio::sync::{mpsc, oneshot};

use super::network::{Link, Request, Response, Routes, FORWARD_TIMEOUT};
use super::{Command, MetaResponse, NodeId, QueueCommand, TypeConfig, WriteError};

/// Most entries in one batch.
const MAX_BATCH: usize = 512;

/// One entry waiting to be submitted, and who waits for its outcome.
pub struct Submission {
    pub command: QueueCommand,
    pub reply: Reply,
    /// Submitters of entries merged into this one.
    pub also: Vec<Reply>,
}

/// Where an entry's outcome goes.
pub type Reply = oneshot::Sender<Result<MetaResponse, WriteError>>;

/// Who waits for the outcome of one change of an entry: its submitter, and those of the
/// changes merged into it.
struct Waiters {
    reply: Reply,
    also: Vec<Reply>,
}

impl Waiters {
    fn answer(self, outcome: Result<MetaResponse, WriteError>) {
        for reply in self.also {
            let _ = reply.send(outcome.clone());
        }
        let _ = self.reply.send(outcome);
    }
}

/// Submits what arrives on `submissions` to `raft`, queue group `group`, in order, until the
/// channel closes.
pub async fn run(
    raft: Raft<TypeConfig>,
    group: u8,
    node_id: NodeId,
    routes: Routes,
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
        let (entry, batch) = entry(coalesce(batch));
        let metrics = raft.metrics().borrow().clone();
        match metrics.current_leader {
            Some(leader) if leader == node_id => submit_here(&raft, entry, batch).await,
            Some(leader) => {
                let node = metrics.membership_config.membership().get_node(&leader).cloned();
                let Some(node) = node else {
                    fail(batch, || WriteError::NoLeader);
                    continue;
                };
                let addr = routes.addr(leader, &node);
                let link = match &mut link {
                    Some((to, link)) if *to == leader => link,
                    _ => &mut link.insert((leader, Link::new(addr))).1,
                };
                forward(link, group, leader, entry, batch).await;
            }
            None => fail(batch, || WriteError::NoLeader),
        }
    }
}

/// Merges runs of `Left` entries of one queue into one entry (an ack at a time makes one
/// each): fewer entries to write, send and apply. Every submitter of a merged entry hears its
/// outcome.
fn coalesce(batch: Vec<Submission>) -> Vec<Submission> {
    let mut merged: Vec<Submission> = Vec::with_capacity(batch.len());
    for submission in batch {
        if let Some(last) = merged.last_mut() {
            if let (QueueCommand::Left { queue, seqs }, QueueCommand::Left { queue: next, seqs: more }) =
                (&mut last.command, &submission.command)
            {
                if queue == next {
                    seqs.extend_from_slice(more);
                    last.also.push(submission.reply);
                    last.also.extend(submission.also);
                    continue;
                }
            }
        }
        merged.push(submission);
    }
    merged
}

fn fail(batch: Vec<Waiters>, error: impl Fn() -> WriteError) {
    for waiters in batch {
        waiters.answer(Err(error()));
    }
}

/// The batch as one entry, its changes in order, and who waits for each.
fn entry(batch: Vec<Submission>) -> (Command, Vec<Waiters>) {
    let mut commands = Vec::with_capacity(batch.len());
    let mut waiters = Vec::with_capacity(batch.len());
    for Submission { command, reply, also } in batch {
        commands.push(command);
        waiters.push(Waiters { reply, also });
    }
    (Command::Queues(commands), waiters)
}

/// Hands each submitter its change's outcome from the entry's outcome.
fn answer(batch: Vec<Waiters>, outcome: Result<MetaResponse, WriteError>) {
    match outcome {
        Ok(MetaResponse::Each(outcomes)) if outcomes.len() == batch.len() => {
            for (submission, outcome) in batch.into_iter().zip(outcomes) {
                submission.answer(Ok(outcome));
            }
        }
        Ok(other) => fail(batch, || WriteError::Raft(format!("unexpected outcome {other:?}"))),
        Err(error) => fail(batch, || error.clone()),
    }
}

/// On the leader: hands the batch to Raft as one entry, and waits for its outcome in the
/// background, so the next batch is handed over meanwhile.
async fn submit_here(raft: &Raft<TypeConfig>, entry: Command, batch: Vec<Waiters>) {
    match raft.client_write_ff(entry).await {
        Ok(outcome) => {
            tokio::spawn(async move {
                let result = match outcome.await {
                    Ok(Ok(response)) => Ok(response.data),
                    Ok(Err(ClientWriteError::ForwardToLeader(_))) => Err(WriteError::NoLeader),
                    Ok(Err(err)) => Err(WriteError::Raft(err.to_string())),
                    Err(_) => Err(WriteError::Stopped),
                };
                answer(batch, result);
            });
        }
        Err(_) => fail(batch, || WriteError::Stopped),
    }
}

/// From a follower: sends the batch to the leader as one entry and passes on the outcomes.
async fn forward(link: &mut Link, group: u8, leader: NodeId, entry: Command, batch: Vec<Waiters>) {
    match link.call(group, &Request::WriteBatch(vec![entry]), FORWARD_TIMEOUT).await {
        Ok(Response::WriteBatch(mut outcomes)) if outcomes.len() == 1 => {
            let outcome = outcomes.pop().expect("one outcome");
            answer(batch, outcome.map_err(|err| WriteError::Forward(leader, err)));
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
