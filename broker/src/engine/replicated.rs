//! Replicated queues through the engine: what the cluster's queue group commits is applied to
//! this node's copy of each replicated queue, and only the node serving them (the group's
//! leader) lets consumers at them.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Engine;
use crate::cluster::{MetaCommand, MetaResponse, QueueCommand, ReplicatedMessage, WriteError};
use crate::error::BrokerError;
use crate::message::QueuedMessage;
use crate::queue::{Contents, Queue, QueueSettings, SavedIds};

/// One replicated queue's messages, as the queue group's snapshot holds them.
#[derive(Debug, Serialize, Deserialize)]
struct QueueContents {
    name: String,
    messages: Vec<StoredMessage>,
    /// The seq of the queue's next publish.
    #[serde(default)]
    next_seq: u64,
    /// The publish ids it has seen lately.
    #[serde(flatten)]
    publish_ids: SavedIds,
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
            if settings.replicas != 0 {
                return Err(BrokerError::InvalidArgument(format!(
                    "queue '{name}': replicas apply to a replicated queue only"
                )));
            }
            return Ok(());
        }
        let Some(cluster) = self.cluster.get() else {
            return Err(BrokerError::InvalidArgument(format!(
                "queue '{name}' cannot be replicated: this broker is not in a cluster (hopperd --node-id and --peers)"
            )));
        };
        let nodes = cluster.voters();
        if settings.replicas != 0 && settings.replicas as usize != nodes {
            return Err(BrokerError::InvalidArgument(format!(
                "queue '{name}': this cluster keeps a copy of every replicated queue on each of its {nodes} nodes, \
                 so it cannot keep {} (leave --replicas out, or give {nodes})",
                settings.replicas
            )));
        }
        // A copy on every node, as the cluster's members change.
        settings.replicas = 0;
        // A length limit drops or refuses by what the serving node holds, which is ahead of
        // the other copies (acks reach them a moment later): the copies would decide apart.
        if settings.max_length > 0 || settings.max_bytes > 0 {
            return Err(BrokerError::InvalidArgument(format!(
                "queue '{name}' is replicated and cannot have a length limit yet"
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
            Some(leader) => {
                let message = format!(
                    "replicated queue '{}' is served by node {leader}; consume from it there",
                    queue.name()
                );
                match self.node_addr(leader) {
                    Some(addr) => {
                        Err(BrokerError::ServedElsewhere { message: format!("{message} ({addr})"), addr })
                    }
                    None => Err(BrokerError::NotAllowed(message)),
                }
            }
            None => Err(BrokerError::NotAllowed(format!(
                "replicated queue '{}' has no serving node right now (an election is under way); retry",
                queue.name()
            ))),
        }
    }

    /// Tells the cluster the address clients reach this node at, trying again until a
    /// leader has taken it (or the broker stops).
    pub async fn advertise(engine: std::sync::Weak<Engine>, addr: String) {
        let mut delay = std::time::Duration::from_millis(crate::cluster::HEARTBEAT_MS);
        loop {
            // Done once the cluster has it (or the broker is gone).
            let Some(cluster) = engine.upgrade().and_then(|engine| {
                let cluster = engine.cluster.get()?.clone();
                let known = engine.node_addr(cluster.node_id());
                (known.as_deref() != Some(addr.as_str())).then_some(cluster)
            }) else {
                return;
            };
            let command = MetaCommand::Advertise { node: cluster.node_id(), addr: addr.clone() };
            match cluster.write(command).await {
                Ok(_) => tracing::info!(%addr, "client address told to the cluster"),
                Err(WriteError::Stopped) => return,
                Err(error) => {
                    tracing::debug!(%error, "telling the cluster this node's client address; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
            }
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
            QueueCommand::Publish { queue, message, delay_ms, ttl_ms, publish_id, .. } => {
                let Ok(target) = self.queues.get(queue) else {
                    // Deleted since: the message went with it.
                    return MetaResponse::Done(false);
                };
                match message.payload() {
                    Ok(payload) => MetaResponse::Done(target.apply_publish(
                        Arc::new(payload),
                        *delay_ms,
                        *ttl_ms,
                        *publish_id,
                    )),
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
            .map(|queue| {
                let contents = queue.contents();
                QueueContents {
                    name: queue.name().to_owned(),
                    messages: contents.messages.iter().filter_map(stored).collect(),
                    next_seq: contents.next_seq,
                    publish_ids: contents.publish_ids,
                }
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
            let held = contents.iter().find(|c| c.name == queue.name());
            queue.restore_contents(Contents {
                messages: held.map_or(&[][..], |c| &c.messages).iter().filter_map(restored).collect(),
                next_seq: held.map_or(0, |c| c.next_seq),
                publish_ids: held.map(|c| c.publish_ids.clone()).unwrap_or_default(),
            });
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

    /// This node no longer serves the replicated queues `in_group` (another node leads their
    /// group): their consumers here are cancelled, so that their clients subscribe again on
    /// the serving node, and what they held returns to the queue (the serving node delivers it
    /// again, flagged).
    pub(crate) fn stop_serving_replicated(&self, in_group: impl Fn(&str) -> bool) {
        for queue in self.replicated_queues().filter(|queue| in_group(queue.name())) {
            let reason = format!("this node no longer serves replicated queue '{}'", queue.name());
            let cancelled = queue.with_state(|state, journal, now| {
                let ids: Vec<u64> = state.consumer_ids().collect();
                let mut cancelled = Vec::with_capacity(ids.len());
                for id in ids {
                    let Some(sink) = state.sink(id).cloned() else { continue };
                    state.remove_consumer(id, &reason, now, journal);
                    cancelled.push((id, sink));
                }
                cancelled
            });
            let cancelled = cancelled.unwrap_or_default();
            if cancelled.is_empty() {
                continue;
            }
            for (consumer_id, _) in &cancelled {
                self.consumers.remove(consumer_id);
            }
            self.pullers.lock().retain(|(_, _, name), _| name != queue.name());
            tracing::info!(queue = %queue.name(), consumers = cancelled.len(), "no longer serving replicated queue");
            crate::queue::notify_cancelled(cancelled, &reason);
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
