//! Exchanges through the engine: declare, delete, bind, unbind, list, and publishing through an
//! exchange to every queue it routes to, confirmed once all of them hold the message.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{blocking, Caller, Engine, NewMessage};
use crate::auth::{Access, Resource};
use crate::cluster::MetaCommand;
use crate::error::BrokerError;
use crate::queue::{Confirm, ExchangeView, Outcome};
use crate::routing::{Binding, Destination, ExchangeSpec};
use crate::settings::check_duration;

/// Where and how a message is published through an exchange.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    /// The exchange; empty for the default exchange, which routes to the queue named by the
    /// routing key.
    pub exchange: &'a str,
    /// The routing key.
    pub routing_key: &'a str,
    /// Return the message (NO_ROUTE) rather than drop it when no queue takes it.
    pub mandatory: bool,
}

impl Engine {
    /// Declares an exchange (with `passive`, only looks it up); returns it and whether this call
    /// created it. A durable one is saved on a blocking thread.
    pub async fn declare_exchange(
        &self,
        caller: &Caller,
        spec: ExchangeSpec,
        passive: bool,
    ) -> Result<(ExchangeView, bool), BrokerError> {
        self.check(caller, "declare", Access::Configure, Resource::Exchange(&spec.name))?;
        let name = spec.name.clone();
        let created = if passive {
            false
        } else if let Some(cluster) = self.cluster.get() {
            cluster.write(MetaCommand::DeclareExchange(spec)).await?
        } else {
            let registry = self.queues.clone();
            blocking(move || registry.declare_exchange(spec)).await?
        };
        let view = self.exchange(&name)?;
        Ok((view, created))
    }

    /// Deletes an exchange; with `if_unused`, only while it has no bindings.
    pub async fn delete_exchange(
        &self,
        caller: &Caller,
        name: &str,
        if_unused: bool,
    ) -> Result<(), BrokerError> {
        self.check(caller, "delete", Access::Configure, Resource::Exchange(name))?;
        if let Some(cluster) = self.cluster.get() {
            // Checked here, on the node asked, once it knows every change made so far; every
            // node then deletes it unconditionally.
            cluster.catch_up().await?;
            let view = self.exchange(name)?;
            if if_unused && view.bindings > 0 {
                return Err(BrokerError::PreconditionFailed(format!(
                    "exchange '{name}' has {} binding(s)",
                    view.bindings
                )));
            }
            cluster.write(MetaCommand::DeleteExchange { name: name.to_owned() }).await?;
            return Ok(());
        }
        let (registry, name) = (self.queues.clone(), name.to_owned());
        blocking(move || registry.delete_exchange(&name, if_unused)).await
    }

    /// Binds exchange `source` to a queue or exchange; false if the binding existed.
    /// Needs read on the source exchange and write on the destination.
    pub async fn bind(&self, caller: &Caller, source: &str, binding: Binding) -> Result<bool, BrokerError> {
        self.check_binding(caller, source, &binding)?;
        if let Some(cluster) = self.cluster.get() {
            return Ok(cluster.write(MetaCommand::Bind { source: source.to_owned(), binding }).await?);
        }
        let (registry, source) = (self.queues.clone(), source.to_owned());
        blocking(move || registry.bind(&source, binding)).await
    }

    /// Removes a binding; false if there was none.
    pub async fn unbind(&self, caller: &Caller, source: &str, binding: Binding) -> Result<bool, BrokerError> {
        self.check_binding(caller, source, &binding)?;
        if let Some(cluster) = self.cluster.get() {
            return Ok(cluster.write(MetaCommand::Unbind { source: source.to_owned(), binding }).await?);
        }
        let (registry, source) = (self.queues.clone(), source.to_owned());
        blocking(move || registry.unbind(&source, &binding)).await
    }

    /// Every exchange, sorted by name.
    pub fn list_exchanges(&self, _caller: &Caller) -> Vec<ExchangeView> {
        self.queues.exchanges()
    }

    /// The bindings of `exchange` (every exchange when `None`) that lead to `queue` (anywhere
    /// when `None`), with their source exchanges.
    pub fn list_bindings(
        &self,
        _caller: &Caller,
        exchange: Option<&str>,
        queue: Option<&str>,
    ) -> Vec<(String, Binding)> {
        self.queues
            .bindings()
            .into_iter()
            .filter(|(source, _)| exchange.is_none_or(|x| x == source))
            .filter(|(_, b)| queue.is_none_or(|q| b.destination == Destination::Queue(q.to_owned())))
            .collect()
    }

    /// Publishes a message through an exchange to every queue it routes to, sharing one body.
    /// `confirm` hears once every queue holds it (the first refusal names its queue); with no
    /// queue to take it, a mandatory message is refused with NO_ROUTE and another is dropped
    /// (confirmed with `routed` 0). Returns the message's id.
    pub fn publish_routed(
        &self,
        caller: &Caller,
        route: Route<'_>,
        message: NewMessage,
        confirm: Confirm,
    ) -> Result<u64, BrokerError> {
        if route.exchange.is_empty() {
            self.check(caller, "publish to", Access::Write, Resource::Queue(route.routing_key))?;
        } else {
            self.check(caller, "publish to", Access::Write, Resource::Exchange(route.exchange))?;
        }
        check_duration("delay_ms", message.delay_ms)?;
        check_duration("ttl_ms", message.ttl_ms)?;
        let (queues, counters) = if route.exchange.is_empty() {
            (self.queues.get(route.routing_key).into_iter().collect::<Vec<_>>(), None)
        } else {
            let routed =
                self.queues.route(route.exchange, route.routing_key, message.properties.headers())?;
            routed.counters.published.fetch_add(1, Ordering::Relaxed);
            (routed.queues, Some(routed.counters))
        };
        let (delay_ms, ttl_ms) = (message.delay_ms, message.ttl_ms);
        let exchange: Arc<str> = match &counters {
            Some(counters) if *counters.name == *route.exchange => counters.name.clone(),
            _ if route.exchange.is_empty() => Arc::default(),
            _ => route.exchange.into(),
        };
        let payload = self.new_payload(message, exchange, route.routing_key.to_owned());
        let id = payload.id;
        if queues.is_empty() {
            if let Some(counters) = &counters {
                counters.unroutable.fetch_add(1, Ordering::Relaxed);
            }
            let exchange = if route.exchange.is_empty() { "the default exchange" } else { route.exchange };
            if route.mandatory {
                if let Some(counters) = &counters {
                    counters.returned.fetch_add(1, Ordering::Relaxed);
                }
                return Err(BrokerError::NoRoute(format!(
                    "no queue takes routing key '{}' on {exchange}: the message was returned",
                    route.routing_key
                )));
            }
            confirm.send(Ok(Outcome::Published { message_id: id, routed: 0 }));
            return Ok(id);
        }
        let now = crate::queue::now_ms();
        for (queue, confirm) in queues.iter().zip(confirm.split(&queues)) {
            queue.publish_or_refuse(payload.clone(), now, delay_ms, ttl_ms, confirm);
        }
        Ok(id)
    }

    fn check_binding(&self, caller: &Caller, source: &str, binding: &Binding) -> Result<(), BrokerError> {
        self.check(caller, "bind from", Access::Read, Resource::Exchange(source))?;
        match &binding.destination {
            Destination::Queue(queue) => self.check(caller, "bind to", Access::Write, Resource::Queue(queue)),
            Destination::Exchange(exchange) => {
                self.check(caller, "bind to", Access::Write, Resource::Exchange(exchange))
            }
        }
    }

    /// One exchange, as it is now.
    pub fn exchange(&self, name: &str) -> Result<ExchangeView, BrokerError> {
        self.queues
            .exchanges()
            .into_iter()
            .find(|x| x.spec.name == name)
            .ok_or_else(|| BrokerError::NotFound(format!("no exchange named '{name}'")))
    }
}
