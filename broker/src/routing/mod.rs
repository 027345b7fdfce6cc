//! Exchanges and bindings (the AMQP 0-9-1 routing model) as plain data: which queues a message
//! published to an exchange with a routing key and headers reaches. No I/O and no locks; the
//! engine keeps the topology and persists its durable part.

mod topic;

use std::collections::{BTreeMap, HashMap, HashSet};

use indexmap::IndexSet;
use serde::{Deserialize, Serialize};

pub use hopper_proto::ExchangeKind;
pub use topic::TopicTrie;

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", content = "name", rename_all = "lowercase")]
pub enum Destination {
    /// A queue, by name.
    Queue(String),
    /// Another exchange, by name: routing goes on there.
    Exchange(String),
}

/// One binding of an exchange.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Binding {
    /// Where it leads.
    pub destination: Destination,
    /// The binding key (direct: the routing key to equal; topic: the pattern; else unused).
    pub key: String,
    /// Headers exchanges: the headers to match, and `x-match` (`all`, the default, or `any`).
    pub arguments: BTreeMap<String, String>,
}

/// An exchange's declaration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeSpec {
    /// Its name (not empty: `""` is the default exchange).
    pub name: String,
    /// How it routes.
    pub kind: ExchangeKind,
    /// Kept across restarts.
    pub durable: bool,
    /// The exchange that receives what this one cannot route, if any.
    pub alternate: Option<String>,
}

/// An exchange with its bindings and the index that routes by them.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// What it was declared with.
    pub spec: ExchangeSpec,
    /// Its bindings, in the order they were made; a set, so binding again finds a duplicate
    /// without a scan.
    pub bindings: IndexSet<Binding>,
    direct: HashMap<String, Vec<Destination>>,
    topic: TopicTrie<Destination>,
}

impl Exchange {
    /// Takes a removed binding out of the index that routes by it.
    fn unindex(&mut self, binding: &Binding) {
        match self.spec.kind {
            ExchangeKind::Direct => {
                if let Some(list) = self.direct.get_mut(&binding.key) {
                    if let Some(i) = list.iter().position(|d| d == &binding.destination) {
                        list.remove(i);
                    }
                    if list.is_empty() {
                        self.direct.remove(&binding.key);
                    }
                }
            }
            ExchangeKind::Topic => {
                self.topic.remove(&binding.key, &binding.destination);
            }
            ExchangeKind::Fanout | ExchangeKind::Headers => {}
        }
    }

    fn new(spec: ExchangeSpec) -> Self {
        Exchange { spec, bindings: IndexSet::new(), direct: HashMap::new(), topic: TopicTrie::default() }
    }

    /// The destinations a message with `key` and `headers` takes from this exchange.
    fn destinations<'a>(
        &'a self,
        key: &str,
        headers: &HashMap<String, String>,
        found: &mut impl FnMut(&'a Destination),
    ) {
        match self.spec.kind {
            ExchangeKind::Direct => self.direct.get(key).into_iter().flatten().for_each(found),
            ExchangeKind::Fanout => self.bindings.iter().for_each(|b| found(&b.destination)),
            ExchangeKind::Topic => self.topic.matches(key, found),
            ExchangeKind::Headers => self
                .bindings
                .iter()
                .filter(|b| headers_match(&b.arguments, headers))
                .for_each(|b| found(&b.destination)),
        }
    }
}

/// Whether `headers` match a headers binding's `arguments`: every argument (`x-match=all`, the
/// default) or at least one (`any`) equal to the header of the same name. Arguments starting with
/// `x-` are not matched.
pub fn headers_match(arguments: &BTreeMap<String, String>, headers: &HashMap<String, String>) -> bool {
    let mut wanted = arguments.iter().filter(|(k, _)| !k.starts_with("x-"));
    let equal = |(k, v): (&String, &String)| headers.get(k) == Some(v);
    match arguments.get("x-match").map(String::as_str) {
        Some("any") => wanted.any(equal),
        _ => wanted.all(equal),
    }
}

/// Every exchange and binding of a broker.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    exchanges: HashMap<String, Exchange>,
}

/// Why a topology change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// No exchange of that name.
    #[error("no exchange named '{0}'")]
    NoExchange(String),
    /// It exists, declared otherwise.
    #[error("exchange '{0}' exists with other settings")]
    Different(String),
    /// An invalid name or argument.
    #[error("{0}")]
    Invalid(String),
    /// It still has bindings and deletion was asked only if unused.
    #[error("exchange '{0}' has bindings")]
    InUse(String),
}

/// Where a routed message goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route<'a> {
    /// Queues that take it, each once.
    pub queues: Vec<&'a str>,
    /// True when only an alternate exchange routed it.
    pub by_alternate: bool,
}

impl Topology {
    /// Declares an exchange: creates it, or finds an identical one (false). A different one is
    /// [`TopologyError::Different`].
    pub fn declare(&mut self, spec: ExchangeSpec) -> Result<bool, TopologyError> {
        validate_name(&spec.name)?;
        if let Some(alternate) = &spec.alternate {
            validate_name(alternate)?;
        }
        match self.exchanges.get(&spec.name) {
            Some(existing) if existing.spec == spec => Ok(false),
            Some(_) => Err(TopologyError::Different(spec.name)),
            None => {
                self.exchanges.insert(spec.name.clone(), Exchange::new(spec));
                Ok(true)
            }
        }
    }

    /// Deletes an exchange and its bindings, and every binding that leads to it. With
    /// `if_unused`, refuses while it has bindings of its own.
    pub fn delete(&mut self, name: &str, if_unused: bool) -> Result<Exchange, TopologyError> {
        let exchange = self.exchanges.get(name).ok_or_else(|| TopologyError::NoExchange(name.into()))?;
        if if_unused && !exchange.bindings.is_empty() {
            return Err(TopologyError::InUse(name.into()));
        }
        let exchange = self.exchanges.remove(name).expect("found above");
        self.unbind_destination(&Destination::Exchange(name.into()));
        Ok(exchange)
    }

    /// Binds `source` to a destination; false if the binding exists. The destination's
    /// existence is the caller's to check (queues live elsewhere).
    pub fn bind(&mut self, source: &str, binding: Binding) -> Result<bool, TopologyError> {
        if let Destination::Exchange(name) = &binding.destination {
            if !self.exchanges.contains_key(name) {
                return Err(TopologyError::NoExchange(name.clone()));
            }
        }
        if let Some(x_match) = binding.arguments.get("x-match") {
            if x_match != "all" && x_match != "any" {
                return Err(TopologyError::Invalid(format!("x-match must be all or any, not '{x_match}'")));
            }
        }
        let exchange =
            self.exchanges.get_mut(source).ok_or_else(|| TopologyError::NoExchange(source.into()))?;
        if exchange.bindings.contains(&binding) {
            return Ok(false);
        }
        match exchange.spec.kind {
            ExchangeKind::Direct => {
                exchange.direct.entry(binding.key.clone()).or_default().push(binding.destination.clone());
            }
            ExchangeKind::Topic => {
                exchange.topic.insert(&binding.key, binding.destination.clone());
            }
            ExchangeKind::Fanout | ExchangeKind::Headers => {}
        }
        exchange.bindings.insert(binding);
        Ok(true)
    }

    /// Removes a binding; false if there was none.
    pub fn unbind(&mut self, source: &str, binding: &Binding) -> Result<bool, TopologyError> {
        let exchange =
            self.exchanges.get_mut(source).ok_or_else(|| TopologyError::NoExchange(source.into()))?;
        if !exchange.bindings.shift_remove(binding) {
            return Ok(false);
        }
        exchange.unindex(binding);
        Ok(true)
    }

    /// Removes every binding that leads to `destination` (a queue or exchange going away);
    /// returns the sources that had one.
    pub fn unbind_destination(&mut self, destination: &Destination) -> Vec<String> {
        let mut sources = Vec::new();
        for (name, exchange) in &mut self.exchanges {
            let leading: Vec<Binding> =
                exchange.bindings.iter().filter(|b| &b.destination == destination).cloned().collect();
            if leading.is_empty() {
                continue;
            }
            // One pass over the bindings, whatever the number removed.
            exchange.bindings.retain(|b| &b.destination != destination);
            leading.iter().for_each(|b| exchange.unindex(b));
            sources.push(name.clone());
        }
        sources
    }

    /// The queues a message published to `exchange` with `key` and `headers` reaches, each once,
    /// following exchange-to-exchange bindings (cycles are harmless) and, when nothing took it,
    /// the exchange's alternate exchange.
    pub fn route(
        &self,
        exchange: &str,
        key: &str,
        headers: &HashMap<String, String>,
    ) -> Result<Route<'_>, TopologyError> {
        let start = self.exchanges.get(exchange).ok_or_else(|| TopologyError::NoExchange(exchange.into()))?;
        let mut route = Route::default();
        let mut seen_queues = Seen::default();
        let mut seen_exchanges = Seen::default();
        self.follow(start, key, headers, &mut route.queues, &mut seen_queues, &mut seen_exchanges);
        // Alternate exchanges, in turn, while nothing took the message.
        let mut current = start;
        while route.queues.is_empty() {
            let Some(alternate) = current.spec.alternate.as_deref().and_then(|a| self.exchanges.get(a))
            else {
                break;
            };
            if !seen_exchanges.insert(alternate.spec.name.as_str()) {
                break;
            }
            self.follow(alternate, key, headers, &mut route.queues, &mut seen_queues, &mut Seen::default());
            route.by_alternate = !route.queues.is_empty();
            current = alternate;
        }
        Ok(route)
    }

    fn follow<'a>(
        &'a self,
        exchange: &'a Exchange,
        key: &str,
        headers: &HashMap<String, String>,
        queues: &mut Vec<&'a str>,
        seen_queues: &mut Seen<'a>,
        seen_exchanges: &mut Seen<'a>,
    ) {
        if !seen_exchanges.insert(exchange.spec.name.as_str()) {
            return;
        }
        let mut next = Vec::new();
        exchange.destinations(key, headers, &mut |destination| match destination {
            Destination::Queue(name) => {
                if seen_queues.insert(name.as_str()) {
                    queues.push(name.as_str());
                }
            }
            Destination::Exchange(name) => next.push(name.as_str()),
        });
        for name in next {
            if let Some(exchange) = self.exchanges.get(name) {
                self.follow(exchange, key, headers, queues, seen_queues, seen_exchanges);
            }
        }
    }

    /// An exchange by name.
    pub fn get(&self, name: &str) -> Option<&Exchange> {
        self.exchanges.get(name)
    }

    /// Every exchange, by name.
    pub fn exchanges(&self) -> impl Iterator<Item = &Exchange> {
        self.exchanges.values()
    }
}

/// Names met while routing one message. Most routes reach a few queues, which a scan of a
/// short list dedupes faster than hashing; past [`Seen::SCAN_MAX`] names a hash set takes over.
#[derive(Default)]
struct Seen<'a> {
    few: Vec<&'a str>,
    many: HashSet<&'a str>,
}

impl<'a> Seen<'a> {
    const SCAN_MAX: usize = 16;

    /// Adds `name`; false if it was there already.
    fn insert(&mut self, name: &'a str) -> bool {
        if !self.many.is_empty() {
            return self.many.insert(name);
        }
        if self.few.contains(&name) {
            return false;
        }
        if self.few.len() < Self::SCAN_MAX {
            self.few.push(name);
        } else {
            self.many.extend(self.few.drain(..));
            self.many.insert(name);
        }
        true
    }
}

/// Exchange names follow queue names: 1 to 255 bytes of UTF-8, no control characters.
fn validate_name(name: &str) -> Result<(), TopologyError> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(TopologyError::Invalid(format!(
            "exchange name must be 1 to 255 bytes without control characters: '{name}'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
