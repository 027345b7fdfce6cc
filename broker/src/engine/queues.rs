//! Queue management through the engine: declare, delete, purge, describe, alarms, peek and
//! moves.

use super::{blocking, Caller, Engine, MessageView, QueueInfo};
use crate::auth::{Access, Resource};
use crate::error::BrokerError;
use crate::mover::{MoveSpec, MoveStatus};
use crate::queue::{notify_cancelled, QueueSettings};

/// Most messages one peek returns.
const MAX_PEEK: usize = 10_000;

impl Engine {
    /// Declares a queue: creates it, or finds an identical one (`created` false). With
    /// `alarm_depth`, sets its depth alarm too. A durable queue's files are created on a
    /// blocking thread.
    pub async fn declare(
        &self,
        caller: &Caller,
        name: &str,
        mut settings: QueueSettings,
        alarm_depth: Option<u64>,
    ) -> Result<(QueueInfo, bool), BrokerError> {
        self.check(caller, "declare", Access::Configure, Resource::Queue(name))?;
        self.check_replicated(name, &mut settings)?;
        let max_queues = self.config.max_queues;
        if self.queues.get(name).is_err() && self.queues.count() >= max_queues {
            return Err(BrokerError::ResourceLimit(format!(
                "the broker holds {max_queues} queues, the most it may (--max-queues); delete some first"
            )));
        }
        if let Some(cluster) = self.cluster.get() {
            let declare = crate::cluster::MetaCommand::DeclareQueue { name: name.to_owned(), settings };
            let created = cluster.write(declare).await?;
            if let Some(depth) = alarm_depth {
                self.queues.set_alarm(name, depth)?;
            }
            return Ok((self.queue_info(&Caller::broker(), name)?, created));
        }
        let registry = self.queues.clone();
        let owned = name.to_owned();
        let created = blocking(move || {
            let declared = registry.declare(&owned, settings)?;
            if let Some(depth) = alarm_depth {
                registry.set_alarm(&owned, depth)?;
            }
            Ok(declared.created)
        })
        .await?;
        Ok((self.queue_info(&Caller::broker(), name)?, created))
    }

    /// Applies a metadata change committed by the cluster to this node (see
    /// [`crate::cluster::MetaHost::apply`]).
    pub(crate) fn apply_meta(&self, command: &crate::cluster::MetaCommand) -> crate::cluster::MetaResponse {
        use crate::cluster::{MetaCommand, MetaResponse};
        let result = match command {
            MetaCommand::DeclareQueue { name, settings } => {
                self.queues.declare(name, settings.clone()).map(|declared| declared.created)
            }
            MetaCommand::DeleteQueue { name } => match self.queues.delete(name, false, false) {
                Ok(deleted) => {
                    for (consumer_id, _) in &deleted.consumers {
                        self.consumers.remove(consumer_id);
                    }
                    self.pullers.lock().retain(|(_, _, queue), _| queue != name);
                    notify_cancelled(deleted.consumers, &format!("queue '{name}' was deleted"));
                    Ok(true)
                }
                Err(BrokerError::NotFound(_)) => Ok(false),
                Err(err) => Err(err),
            },
            MetaCommand::DeclareExchange(spec) => self.queues.declare_exchange(spec.clone()),
            MetaCommand::DeleteExchange { name } => match self.queues.delete_exchange(name, false) {
                Ok(()) => Ok(true),
                Err(BrokerError::NotFound(_)) => Ok(false),
                Err(err) => Err(err),
            },
            MetaCommand::Bind { source, binding } => self.queues.bind(source, binding.clone()),
            MetaCommand::Unbind { source, binding } => match self.queues.unbind(source, binding) {
                Err(BrokerError::NotFound(_)) => Ok(false),
                other => other,
            },
            MetaCommand::Barrier => Ok(false),
            MetaCommand::Advertise { node, addr } => {
                let previous = self.node_addrs.lock().insert(*node, addr.clone());
                Ok(previous.as_ref() != Some(addr))
            }
            MetaCommand::PutUser { name, tags, secret, update } => {
                self.users.put_secret(name, secret.as_ref(), tags.clone(), *update).map(|()| true)
            }
            MetaCommand::DeleteUser { name } => match self.users.delete(name) {
                Ok(()) => Ok(true),
                Err(BrokerError::NotFound(_)) => Ok(false),
                Err(err) => Err(err),
            },
            MetaCommand::SetPermissions { name, permissions } => {
                crate::auth::Permissions::compile(permissions.clone())
                    .and_then(|compiled| self.users.set_permissions(name, compiled))
                    .map(|()| true)
            }
        };
        match result {
            Ok(changed) => MetaResponse::Done(changed),
            Err(err) => MetaResponse::Refused(err),
        }
    }

    /// The metadata this node holds: every queue, exchange and binding.
    pub(crate) fn export_meta(&self) -> crate::cluster::Catalog {
        let queues =
            self.queues.list().into_iter().map(|queue| (queue.name().to_owned(), queue.settings().clone()));
        crate::cluster::Catalog {
            queues: queues.collect(),
            exchanges: self.queues.exchanges().into_iter().map(|view| view.spec).collect(),
            bindings: self.queues.bindings(),
            users: self.users.records(),
            nodes: self.node_addrs.lock().clone().into_iter().collect(),
        }
    }

    /// The address clients reach node `node` at, once it has told the cluster.
    pub(crate) fn node_addr(&self, node: u64) -> Option<String> {
        self.node_addrs.lock().get(&node).cloned()
    }

    /// Deletes a queue, its messages and (durable) files; its consumers are told they were
    /// cancelled. Returns how many messages it held.
    pub async fn delete_queue(
        &self,
        caller: &Caller,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u64, BrokerError> {
        self.check(caller, "delete", Access::Configure, Resource::Queue(name))?;
        if let Some(cluster) = self.cluster.get() {
            // Checked here, on the node asked, once it knows every change made so far; every
            // node then deletes it unconditionally.
            cluster.catch_up().await?;
            let snapshot = self.queues.get(name)?.snapshot();
            if if_unused && snapshot.consumers > 0 {
                let consumers = snapshot.consumers;
                return Err(BrokerError::PreconditionFailed(format!(
                    "queue '{name}' has {consumers} consumer(s)"
                )));
            }
            let messages = snapshot.ready + snapshot.unacked + snapshot.delayed;
            if if_empty && messages > 0 {
                return Err(BrokerError::PreconditionFailed(format!(
                    "queue '{name}' holds {messages} message(s)"
                )));
            }
            cluster.write(crate::cluster::MetaCommand::DeleteQueue { name: name.to_owned() }).await?;
            return Ok(messages);
        }
        let registry = self.queues.clone();
        let owned = name.to_owned();
        let deleted = blocking(move || registry.delete(&owned, if_unused, if_empty)).await?;
        for (consumer_id, _) in &deleted.consumers {
            self.consumers.remove(consumer_id);
        }
        self.pullers.lock().retain(|(_, _, queue), _| queue != name);
        notify_cancelled(deleted.consumers, &format!("queue '{name}' was deleted"));
        Ok(deleted.messages)
    }

    /// Drops every ready and delayed message of a queue; returns how many.
    pub fn purge(&self, caller: &Caller, name: &str) -> Result<u64, BrokerError> {
        self.check(caller, "purge", Access::Configure, Resource::Queue(name))?;
        let queue = self.queues.get(name)?;
        let purged = queue.with_state(|s, j, _| s.purge(j))? as u64;
        tracing::info!(queue = %name, purged, "queue purged");
        Ok(purged)
    }

    /// One queue's settings, counts and alarm state.
    pub fn queue_info(&self, _caller: &Caller, name: &str) -> Result<QueueInfo, BrokerError> {
        let queue = self.queues.get(name)?;
        Ok(self.with_serving(QueueInfo::of(&queue, self.queues.is_dead_letter_target(name))))
    }

    /// Every queue, sorted by name.
    pub fn list_queues(&self, _caller: &Caller) -> Vec<QueueInfo> {
        self.queues
            .list()
            .iter()
            .map(|q| self.with_serving(QueueInfo::of(q, self.queues.is_dead_letter_target(q.name()))))
            .collect()
    }

    /// Sets a queue's depth alarm threshold (0 = none); durable queues keep it on disk, which
    /// is written on a blocking thread.
    pub async fn set_alarm(&self, caller: &Caller, name: &str, depth: u64) -> Result<QueueInfo, BrokerError> {
        self.check(caller, "set the alarm of", Access::Configure, Resource::Queue(name))?;
        let registry = self.queues.clone();
        let owned = name.to_owned();
        blocking(move || registry.set_alarm(&owned, depth)).await?;
        self.queue_info(&Caller::broker(), name)
    }

    /// The first `count` ready messages of a queue (at most 10,000), unchanged.
    pub fn peek(&self, caller: &Caller, name: &str, count: usize) -> Result<Vec<MessageView>, BrokerError> {
        self.check(caller, "peek into", Access::Read, Resource::Queue(name))?;
        let queue = self.queues.get(name)?;
        let count = count.min(MAX_PEEK);
        let found = queue.with_state(|s, j, _| s.peek(count, j))?;
        Ok(found.iter().map(|(message, payload)| MessageView::of(message, payload)).collect())
    }

    /// Starts moving messages out of a queue (redrive); returns the move's first status.
    /// Needs read on the source and write on the destination; a move with no destination
    /// (back where each message died, wherever that is) needs the admin tag.
    pub fn start_move(&self, caller: &Caller, spec: MoveSpec) -> Result<MoveStatus, BrokerError> {
        self.check(caller, "move messages out of", Access::Read, Resource::Queue(&spec.source))?;
        if spec.destination.is_empty() {
            self.require_admin(caller, "a move back to where messages died")?;
        } else {
            self.check(caller, "move messages into", Access::Write, Resource::Queue(&spec.destination))?;
        }
        self.moves.start(&self.queues, &self.events, spec)
    }

    /// Every remembered move, oldest first.
    pub fn list_moves(&self, _caller: &Caller) -> Vec<MoveStatus> {
        self.moves.list(&self.queues)
    }

    /// Asks a running move to stop.
    pub fn cancel_move(&self, caller: &Caller, id: u64) -> Result<MoveStatus, BrokerError> {
        if let Some(status) = self.moves.list(&self.queues).iter().find(|m| m.id == id) {
            self.check(caller, "cancel a move out of", Access::Read, Resource::Queue(&status.spec.source))?;
        }
        self.moves.cancel(id, &self.queues)
    }
}
