//! Replicated queues through the engine: what the cluster's queue group commits is applied to
//! this node's copy of each replicated queue, and only the node serving them (the group's
//! leader) lets consumers at them.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Engine;
use crate::cluster::{MetaResponse, QueueCommand, ReplicatedMessage};
use crate::error::BrokerError;
use crate::message::QueuedMessage;
use crate::queue::{Queue, QueueSettings};

/// One replicated queue's messages, as the queue group's snapshot holds them.
#[derive(Debug, Serialize, Deserialize)]
struct QueueContents {
    name: String,
    messages: Vec<StoredMessage>,
}

/// A message of a snapshot: where it stands in its queue, and what it is.
#[derive(Debug, Serialize, Deserialize)]
struct StoredMessage {
    seq: u64,
    #[serde(default)]
    expires_at_ms: u64,
    message: ReplicatedMessage,
}

impl Engine {
    /// Refuses a declare of a replicated queue that this broker cannot serve: outside a
    /// cluster, or with settings that would make the copies on the nodes differ.
    pub(super) fn check_replicated(
        &self,
        name: &str,
        settings: &mut QueueSettings,
    ) -> Result<(), BrokerError> {
        if !settings.replicated {
            return Ok(());
        }
        if self.cluster.get().is_none() {
            return Err(BrokerError::InvalidArgument(format!(
                "queue '{name}' cannot be replicated: this broker is not in a cluster (hopperd --node-id and --peers)"
            )));
        }
        let unsupported = [
            (!settings.dead_letter.is_empty() || !settings.dead_letter_exchange.is_empty(), "dead-lettering"),
            (settings.max_deliveries > 0, "a delivery limit"),
            (!settings.retry_backoff_ms.is_empty(), "retry backoff"),
            (settings.message_ttl_ms > 0, "a message TTL"),
            (settings.max_length > 0 || settings.max_bytes > 0, "a length limit"),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(set, _)| *set) {
            return Err(BrokerError::InvalidArgument(format!(
                "queue '{name}' is replicated and cannot have {what} yet"
            )));
        }
        // Each node holds its copy in memory; the queue group's log on disk is what makes it
        // durable.
        settings.durable = false;
        Ok(())
    }

    /// Refuses consumers of a replicated queue on a node that does not serve it, naming the
    /// node that does.
    pub(super) fn check_serving(&self, queue: &Queue) -> Result<(), BrokerError> {
        if !queue.settings().replicated {
            return Ok(());
        }
        let Some(cluster) = self.cluster.get() else { return Ok(()) };
        match cluster.serving(queue.name()) {
            Some(leader) if leader == cluster.node_id() => Ok(()),
            Some(leader) => Err(BrokerError::NotAllowed(format!(
                "replicated queue '{}' is served by node {leader}; consume from it there",
                queue.name()
            ))),
            None => Err(BrokerError::NotAllowed(format!(
                "replicated queue '{}' has no serving node right now (an election is under way); retry",
                queue.name()
            ))),
        }
    }

    /// `info` with the node serving it, for a replicated queue.
    pub(super) fn with_serving(&self, mut info: super::QueueInfo) -> super::QueueInfo {
        if let (true, Some(cluster)) = (info.settings.replicated, self.cluster.get()) {
            info.served_by = cluster.serving(&info.name);
        }
        info
    }

    /// Applies an entry of the queue group to this node's copies.
    pub(crate) fn apply_replicated(&self, command: &QueueCommand) -> MetaResponse {
        match command {
            QueueCommand::Publish { queue, message, ttl_ms, .. } => {
                let Ok(target) = self.queues.get(queue) else {
                    // Deleted since: the message went with it.
                    return MetaResponse::Done(false);
                };
                match message.payload() {
                    Ok(payload) => {
                        target.apply_publish(Arc::new(payload), *ttl_ms);
                        MetaResponse::Done(true)
                    }
                    Err(error) => MetaResponse::Refused(BrokerError::InvalidArgument(error)),
                }
            }
            QueueCommand::Left { queue, seqs } => {
                if let Ok(target) = self.queues.get(queue) {
                    target.apply_left(seqs);
                }
                MetaResponse::Done(true)
            }
        }
    }

    /// The messages of the replicated queues `in_group` takes, for a queue group's snapshot.
    pub(crate) fn export_replicated(&self, in_group: impl Fn(&str) -> bool) -> serde_json::Value {
        let contents: Vec<QueueContents> = self
            .replicated_queues()
            .filter(|queue| in_group(queue.name()))
            .map(|queue| QueueContents {
                name: queue.name().to_owned(),
                messages: queue.contents().iter().filter_map(stored).collect(),
            })
            .collect();
        serde_json::to_value(contents).expect("a snapshot serializes")
    }

    /// Makes every replicated queue hold what `snapshot` says (a snapshot taken over from the
    /// queue group's leader, or read at start).
    pub(crate) fn restore_replicated(&self, snapshot: &serde_json::Value, in_group: impl Fn(&str) -> bool) {
        let contents: Vec<QueueContents> = match serde_json::from_value(snapshot.clone()) {
            Ok(contents) => contents,
            Err(error) => {
                tracing::error!(%error, "the replicated queues' snapshot is unreadable; ignored");
                return;
            }
        };
        for queue in self.replicated_queues().filter(|queue| in_group(queue.name())) {
            let messages = contents.iter().find(|c| c.name == queue.name()).map_or(&[][..], |c| &c.messages);
            queue.restore_contents(messages.iter().filter_map(restored).collect());
        }
    }

    /// This node now serves the replicated queues: what waits in them may have been delivered
    /// by the node that served them before.
    pub(crate) fn take_over_replicated(&self, in_group: impl Fn(&str) -> bool) {
        for queue in self.replicated_queues().filter(|queue| in_group(queue.name())) {
            queue.take_over();
            tracing::info!(queue = %queue.name(), "serving replicated queue");
        }
    }

    fn replicated_queues(&self) -> impl Iterator<Item = Arc<Queue>> {
        self.queues.list().into_iter().filter(|queue| queue.settings().replicated)
    }
}

fn stored(message: &QueuedMessage) -> Option<StoredMessage> {
    let payload = message.payload.as_ref()?;
    Some(StoredMessage {
        seq: message.seq,
        expires_at_ms: message.expires_at_ms(),
        message: ReplicatedMessage::of(payload),
    })
}

fn restored(stored: &StoredMessage) -> Option<QueuedMessage> {
    let payload = match stored.message.payload() {
        Ok(payload) => payload,
        Err(error) => {
            tracing::error!(%error, "a message of the replicated queues' snapshot is unreadable; skipped");
            return None;
        }
    };
    let mut message = QueuedMessage::transient(stored.seq, Arc::new(payload));
    message.set_expires_at_ms(stored.expires_at_ms);
    Some(message)
}
