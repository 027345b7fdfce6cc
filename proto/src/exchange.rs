//! The exchange types, named as they are on the wire (`ExchangeDeclare.type`).

/// How an exchange routes: the AMQP 0-9-1 exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "json", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "json", serde(rename_all = "lowercase"))]
pub enum ExchangeKind {
    /// To the queues whose binding key equals the routing key.
    Direct,
    /// To every bound queue.
    Fanout,
    /// To the queues whose binding pattern matches the routing key: words separated by `.`,
    /// `*` for exactly one word, `#` for any number.
    Topic,
    /// To the queues whose binding arguments match the message's headers (`x-match` `all`, the
    /// default, or `any`).
    Headers,
}

impl ExchangeKind {
    /// Every kind.
    pub const ALL: [ExchangeKind; 4] =
        [ExchangeKind::Direct, ExchangeKind::Fanout, ExchangeKind::Topic, ExchangeKind::Headers];

    /// The kind's name on the wire, in the CLI and in `topology.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }

    /// Parses [`ExchangeKind::as_str`]'s output.
    pub fn parse(text: &str) -> Option<Self> {
        ExchangeKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}
