//! Exchanges and bindings: declaring and deleting exchanges, binding queues and exchanges to
//! them, and publishing through them.

use std::collections::HashMap;

use bytes::Bytes;
pub use hopper_proto::ExchangeKind;
use hopper_proto::{pb, Body};

use crate::connection::{ConfirmState, Connection, PublishConfirm};
use crate::error::Result;
use crate::options::{wire_ms, PublishOptions};
use crate::shared::{unexpected, PendingRequest};

/// Settings of an exchange, fixed when it is declared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangeOptions {
    /// Keep the exchange and its bindings to durable queues and exchanges across restarts.
    pub durable: bool,
    /// Exchange that receives what this one cannot route.
    pub alternate: Option<String>,
}

/// An exchange as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeInfo {
    /// Its name.
    pub name: String,
    /// `direct`, `fanout`, `topic` or `headers`.
    pub kind: String,
    /// Whether it survives restarts.
    pub durable: bool,
    /// Its alternate exchange, if any.
    pub alternate: Option<String>,
    /// Its bindings.
    pub bindings: u32,
    /// Messages published to it since the broker started.
    pub published_total: u64,
    /// Messages it routed to no queue.
    pub unroutable_total: u64,
    /// Mandatory messages it returned to their publisher.
    pub returned_total: u64,
}

impl From<pb::ExchangeInfo> for ExchangeInfo {
    fn from(info: pb::ExchangeInfo) -> Self {
        ExchangeInfo {
            name: info.name,
            kind: info.kind,
            durable: info.durable,
            alternate: (!info.alternate.is_empty()).then_some(info.alternate),
            bindings: info.bindings,
            published_total: info.published_total,
            unroutable_total: info.unroutable_total,
            returned_total: info.returned_total,
        }
    }
}

/// One binding of an exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BindingInfo {
    /// The exchange bound.
    pub source: String,
    /// The queue or exchange it leads to.
    pub destination: String,
    /// True when the destination is an exchange.
    pub to_exchange: bool,
    /// The binding key (direct) or pattern (topic).
    pub routing_key: String,
    /// Headers to match (headers exchanges), with `x-match`.
    pub arguments: HashMap<String, String>,
}

impl BindingInfo {
    fn to_wire(&self) -> pb::Binding {
        pb::Binding {
            source: self.source.clone(),
            destination: self.destination.clone(),
            destination_kind: if self.to_exchange { "exchange" } else { "queue" }.into(),
            routing_key: self.routing_key.clone(),
            arguments: self.arguments.clone(),
        }
    }
}

impl From<pb::Binding> for BindingInfo {
    fn from(binding: pb::Binding) -> Self {
        BindingInfo {
            source: binding.source,
            destination: binding.destination,
            to_exchange: binding.destination_kind == "exchange",
            routing_key: binding.routing_key,
            arguments: binding.arguments,
        }
    }
}

impl Connection {
    /// Declares an exchange, or checks that an identical one exists (`PRECONDITION_FAILED` if
    /// it exists with other settings).
    pub async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
    ) -> Result<ExchangeInfo> {
        let declare = pb::ExchangeDeclare {
            name: name.to_string(),
            kind: kind.as_str().to_string(),
            durable: options.durable,
            alternate: options.alternate.unwrap_or_default(),
            passive: false,
        };
        match self.call(Body::ExchangeDeclare(declare)).await? {
            Body::ExchangeDeclareOk(ok) => Ok(ok.exchange.unwrap_or_default().into()),
            other => Err(unexpected("ExchangeDeclareOk", &other)),
        }
    }

    /// Deletes an exchange with its bindings; with `if_unused`, fails while it has bindings.
    pub async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<()> {
        let delete = pb::ExchangeDelete { name: name.to_string(), if_unused };
        match self.call(Body::ExchangeDelete(delete)).await? {
            Body::ExchangeDeleteOk(_) => Ok(()),
            other => Err(unexpected("ExchangeDeleteOk", &other)),
        }
    }

    /// Every exchange, sorted by name.
    pub async fn list_exchanges(&self) -> Result<Vec<ExchangeInfo>> {
        match self.call(Body::ExchangeList(pb::ExchangeList {})).await? {
            Body::ExchangeListOk(ok) => Ok(ok.exchanges.into_iter().map(ExchangeInfo::from).collect()),
            other => Err(unexpected("ExchangeListOk", &other)),
        }
    }

    /// Binds `queue` to `exchange` with a binding key (direct), pattern (topic) or header
    /// arguments (headers). Returns false when the binding existed.
    pub async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: HashMap<String, String>,
    ) -> Result<bool> {
        let binding = BindingInfo {
            source: exchange.into(),
            destination: queue.into(),
            to_exchange: false,
            routing_key: routing_key.into(),
            arguments,
        };
        self.bind(binding).await
    }

    /// Binds exchange `destination` to exchange `source`: what `source` routes by this binding
    /// goes on through `destination`. Returns false when the binding existed.
    pub async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: HashMap<String, String>,
    ) -> Result<bool> {
        let binding = BindingInfo {
            source: source.into(),
            destination: destination.into(),
            to_exchange: true,
            routing_key: routing_key.into(),
            arguments,
        };
        self.bind(binding).await
    }

    /// Makes a binding; false when it existed.
    pub async fn bind(&self, binding: BindingInfo) -> Result<bool> {
        match self.call(Body::Bind(pb::Bind { binding: Some(binding.to_wire()) })).await? {
            Body::BindOk(ok) => Ok(ok.created),
            other => Err(unexpected("BindOk", &other)),
        }
    }

    /// Removes a binding; false when there was none.
    pub async fn unbind(&self, binding: BindingInfo) -> Result<bool> {
        match self.call(Body::Unbind(pb::Unbind { binding: Some(binding.to_wire()) })).await? {
            Body::UnbindOk(ok) => Ok(ok.removed),
            other => Err(unexpected("UnbindOk", &other)),
        }
    }

    /// The bindings of `exchange` (all exchanges when `None`) that lead to `queue` (anywhere
    /// when `None`).
    pub async fn list_bindings(
        &self,
        exchange: Option<&str>,
        queue: Option<&str>,
    ) -> Result<Vec<BindingInfo>> {
        let list = pb::BindingList {
            exchange: exchange.unwrap_or_default().to_string(),
            queue: queue.unwrap_or_default().to_string(),
        };
        match self.call(Body::BindingList(list)).await? {
            Body::BindingListOk(ok) => Ok(ok.bindings.into_iter().map(BindingInfo::from).collect()),
            other => Err(unexpected("BindingListOk", &other)),
        }
    }

    /// Publishes `body` through `exchange` with `routing_key` (the empty exchange is the
    /// default one: it routes to the queue named by the key). The confirm resolves with the
    /// message id once every queue it was routed to holds it. A message no queue takes is
    /// dropped, or, with [`PublishOptions::mandatory`], returned: the confirm then fails with
    /// `NO_ROUTE`.
    pub fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: impl Into<Bytes>,
        options: PublishOptions,
    ) -> PublishConfirm {
        let publish = pb::Publish {
            queue: String::new(),
            body: body.into(),
            headers: options.headers,
            content_type: options.content_type,
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            delay_ms: options.delay.map_or(0, wire_ms),
            ttl_ms: options.ttl.map_or(0, wire_ms),
            mandatory: options.mandatory,
            publish_id: options.publish_id,
        };
        let (reply, response) = tokio::sync::oneshot::channel();
        match self.shared().send_request(Body::Publish(publish), PendingRequest::Reply(reply)) {
            Ok(()) => PublishConfirm { state: ConfirmState::Waiting(response) },
            Err(error) => PublishConfirm { state: ConfirmState::Failed(Some(error)) },
        }
    }
}
