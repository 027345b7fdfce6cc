//! [`Message`]: a message as [`Connection::peek`] shows it, without delivering it.

use std::collections::HashMap;

use bytes::Bytes;
use hopper_proto::{pb, Body};

use crate::connection::Connection;
use crate::error::Result;
use crate::info::Death;
use crate::shared::unexpected;

/// A waiting message, looked at with [`Connection::peek`]. It carries what a
/// [`Delivery`](crate::Delivery) carries, but it was not delivered: there is nothing to settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Broker-assigned id of the message, unique within the broker.
    pub message_id: u64,
    /// The message body.
    pub body: Bytes,
    /// Headers set by the publisher.
    pub headers: HashMap<String, String>,
    /// MIME type set by the publisher; empty if none.
    pub content_type: String,
    /// Unix time in milliseconds at which the broker accepted the publish.
    pub published_at_ms: u64,
    /// How many times the message has been delivered from this queue so far.
    pub delivery_count: u32,
    /// True when the message was delivered before and not acknowledged.
    pub redelivered: bool,
    /// Every time the message died, oldest first; empty unless it came through a dead-letter
    /// queue.
    pub deaths: Vec<Death>,
    /// How many times the message was moved (replayed) out of a queue.
    pub replay_count: u32,
    /// Deaths left out of `deaths` between the first and the latest ones (the broker keeps at
    /// most 16).
    pub deaths_omitted: u32,
    /// The exchange the message was published to; empty for a publish to a queue.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
}

impl Message {
    /// The most recent of the message's deaths, if it ever died.
    pub fn last_death(&self) -> Option<&Death> {
        self.deaths.last()
    }
}

impl From<pb::Message> for Message {
    fn from(message: pb::Message) -> Self {
        Message {
            message_id: message.message_id,
            body: message.body,
            headers: message.headers,
            content_type: message.content_type,
            published_at_ms: message.published_at_ms,
            delivery_count: message.delivery_count,
            redelivered: message.redelivered,
            deaths: message.deaths.into_iter().map(Death::from).collect(),
            replay_count: message.replay_count,
            deaths_omitted: message.deaths_omitted,
            exchange: message.exchange,
            routing_key: message.routing_key,
        }
    }
}

impl Connection {
    /// Returns up to `count` ready messages from the head of `queue` (0 asks for the broker's
    /// default of 10; it returns at most 10 000), changing nothing: no delivery is counted and
    /// nothing is locked. Meant for looking inside a dead-letter queue before moving its
    /// messages back.
    pub async fn peek(&self, queue: &str, count: u32) -> Result<Vec<Message>> {
        let peek = pb::Peek { queue: queue.to_string(), count };
        match self.call(Body::Peek(peek)).await? {
            Body::PeekOk(ok) => Ok(ok.messages.into_iter().map(Message::from).collect()),
            other => Err(unexpected("PeekOk", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keeps_every_field() {
        let message = Message::from(pb::Message {
            message_id: 7,
            body: Bytes::from_static(b"hi"),
            headers: HashMap::from([("k".to_string(), "v".to_string())]),
            content_type: "text/plain".into(),
            published_at_ms: 5,
            delivery_count: 2,
            redelivered: true,
            deaths: vec![pb::Death { queue: "jobs".into(), reason: "expired".into(), ..Default::default() }],
            replay_count: 3,
            deaths_omitted: 0,
            exchange: String::new(),
            routing_key: String::new(),
        });
        assert_eq!((message.message_id, &message.body[..], message.replay_count), (7, &b"hi"[..], 3));
        assert_eq!(message.headers.get("k").map(String::as_str), Some("v"));
        assert_eq!((message.delivery_count, message.redelivered), (2, true));
        assert_eq!(message.last_death().map(|d| d.reason.as_str()), Some("expired"));
    }
}
