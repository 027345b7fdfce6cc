//! Where an AMQP consumer's deliveries go: a `basic.deliver` with its content header and body
//! frames, into the connection's outbox. Each delivery takes its channel's next delivery tag;
//! the channel maps the tag back to the consumer and the broker's own tag when the client
//! settles it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::{basic, AMQPClass};
use parking_lot::Mutex;

use super::codec::{encode, encode_body_into, encode_into, push_with, BASIC};
use super::properties;
use crate::message::{Payload, Properties, QueuedMessage};
use crate::outbox::Outbox;
use crate::queue::{Refusal, Sink};

/// A channel's delivery tags: each names a delivery of one of its consumers. Tags are issued
/// in order, so the unsettled ones are kept in that order, as (tag, consumer, its own tag):
/// settling the oldest, the usual case, is cheap, and only unsettled deliveries take room.
///
/// Its lock also orders what others send on the channel (a queue's deliveries and cancels,
/// direct replies) against the channel's close: they send while holding it, and only if the
/// channel is not [closed](Tags::close), so nothing follows the close on the wire. A client
/// forgets a channel at its close and fails on a frame that names it after. (Publish confirms
/// do the same under their own lock.)
#[derive(Debug, Default)]
pub struct Tags {
    last: u64,
    deliveries: VecDeque<(u64, u64, u64)>,
    /// Consumers the client cancelled that still hold deliveries: their queue going away
    /// needs no `basic.cancel`, the client has ended them.
    stopped: Vec<u64>,
    /// Consumers their queue cancelled (it was deleted) that still hold deliveries: as in
    /// RabbitMQ, the client may still settle those, and it does nothing.
    gone: Vec<u64>,
    closed: bool,
}

impl Tags {
    /// Nothing more is sent on the channel: its close is about to be.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// True once the channel is closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// A new tag for delivery `delivery_tag` of consumer `consumer_id`.
    pub fn issue(&mut self, consumer_id: u64, delivery_tag: u64) -> u64 {
        self.last += 1;
        self.deliveries.push_back((self.last, consumer_id, delivery_tag));
        self.last
    }

    /// A new tag for a delivery the client will not settle (a no-ack consumer's).
    pub fn issue_settled(&mut self) -> u64 {
        self.last += 1;
        self.last
    }

    /// Where unsettled `tag` is kept, if it is.
    fn find(&self, tag: u64) -> Option<usize> {
        self.deliveries.binary_search_by_key(&tag, |&(tag, _, _)| tag).ok()
    }

    /// The deliveries a settle of `tag` (with `multiple`, of every tag up to it; tag 0 with
    /// `multiple` is every one) covers, by consumer: the consumer, its latest tag covered, and
    /// whether more than one of its deliveries is. They are forgotten; those of consumers the
    /// broker cancelled are left out.
    pub fn settle(&mut self, tag: u64, multiple: bool) -> Result<Vec<(u64, u64, bool)>, u64> {
        let mut settled = self.take(tag, multiple)?;
        let before = settled.len();
        settled.retain(|(consumer, _, _)| !self.gone.contains(consumer));
        if settled.len() < before {
            // Some of a gone consumer's: forgotten once none is left.
            self.gone.retain(|&consumer| self.deliveries.iter().any(|&(_, of, _)| of == consumer));
        }
        Ok(settled)
    }

    /// What [`Tags::settle`] covers, every consumer's.
    fn take(&mut self, tag: u64, multiple: bool) -> Result<Vec<(u64, u64, bool)>, u64> {
        if !multiple {
            let index = self.find(tag).ok_or(tag)?;
            let (_, consumer, delivery) = self.deliveries.remove(index).expect("found above");
            return Ok(vec![(consumer, delivery, false)]);
        }
        if tag != 0 && self.find(tag).is_none() {
            return Err(tag);
        }
        let upto = if tag == 0 { self.last } else { tag };
        let covered = self.deliveries.partition_point(|&(tag, _, _)| tag <= upto);
        let mut by_consumer: Vec<(u64, u64, usize)> = Vec::new();
        for (_, consumer, delivery) in self.deliveries.drain(..covered) {
            match by_consumer.iter_mut().find(|(c, _, _)| *c == consumer) {
                Some(entry) => {
                    entry.1 = entry.1.max(delivery);
                    entry.2 += 1;
                }
                None => by_consumer.push((consumer, delivery, 1)),
            }
        }
        by_consumer.sort_unstable_by_key(|(consumer, _, _)| *consumer);
        Ok(by_consumer.into_iter().map(|(consumer, delivery, n)| (consumer, delivery, n > 1)).collect())
    }

    /// True if some delivery of `consumer_id` is not settled yet.
    pub fn holds(&self, consumer_id: u64) -> bool {
        self.deliveries.iter().any(|&(_, consumer, _)| consumer == consumer_id)
    }

    /// The broker cancelled `consumer_id`: what it holds can still be settled, to no effect.
    /// True if its client had cancelled it first.
    pub fn cancelled(&mut self, consumer_id: u64) -> bool {
        if self.holds(consumer_id) {
            self.gone.push(consumer_id);
        }
        self.ended(consumer_id)
    }

    /// The client cancelled `consumer_id`, which still holds deliveries.
    pub fn stop(&mut self, consumer_id: u64) {
        self.stopped.push(consumer_id);
    }

    /// The client's cancel of `consumer_id` is done with; true if there was one.
    pub fn ended(&mut self, consumer_id: u64) -> bool {
        let before = self.stopped.len();
        self.stopped.retain(|&consumer| consumer != consumer_id);
        self.stopped.len() < before
    }
}

/// One AMQP consumer, as its queue sees it.
pub struct AmqpSink {
    outbox: Arc<Outbox>,
    channel: u16,
    tags: Arc<Mutex<Tags>>,
    /// The negotiated frame size: bodies are cut into frames no larger.
    frame_max: usize,
    /// For a no-ack consumer: where its deliveries go to be acked by the connection (it
    /// cannot be done here, under the queue's lock). Unbounded, but the consumer's prefetch
    /// window bounds what waits in it.
    auto_ack: Option<tokio::sync::mpsc::UnboundedSender<(u64, u64)>>,
    /// Its `basic.deliver` frame, kept from one delivery to the next: its consumer tag stays,
    /// and its exchange and routing key (a queue's messages mostly share theirs) are replaced
    /// only when they differ.
    deliver: Mutex<AMQPFrame>,
}

impl AmqpSink {
    /// Consumer `consumer_tag` on channel `channel` of the connection writing to `outbox`.
    pub fn new(
        outbox: Arc<Outbox>,
        channel: u16,
        consumer_tag: &str,
        tags: Arc<Mutex<Tags>>,
        frame_max: usize,
        auto_ack: Option<tokio::sync::mpsc::UnboundedSender<(u64, u64)>>,
    ) -> Self {
        let deliver = basic::Deliver { consumer_tag: consumer_tag.into(), ..basic::Deliver::default() };
        let frame = AMQPFrame::Method(channel, AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)));
        AmqpSink { outbox, channel, tags, frame_max, auto_ack, deliver: Mutex::new(frame) }
    }
}

/// The `basic.deliver` a sink's frame carries.
fn deliver_of(frame: &mut AMQPFrame) -> &mut basic::Deliver {
    match frame {
        AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver))) => deliver,
        _ => unreachable!("a sink's frame is its basic.deliver"),
    }
}

impl Sink for AmqpSink {
    fn is_writable(&self) -> bool {
        self.outbox.accepts_deliveries()
    }

    fn deliver(
        &self,
        consumer_id: u64,
        delivery_tag: u64,
        message: &QueuedMessage,
        payload: &Payload,
    ) -> Result<(), Refusal> {
        let mut tags = self.tags.lock();
        if tags.is_closed() {
            // Its cancel is on its way.
            return Err(Refusal::Full);
        }
        let tag = match &self.auto_ack {
            Some(auto_ack) => {
                let _ = auto_ack.send((consumer_id, delivery_tag));
                tags.issue_settled()
            }
            None => tags.issue(consumer_id, delivery_tag),
        };
        let mut frame = self.deliver.lock();
        let deliver = deliver_of(&mut frame);
        deliver.delivery_tag = tag;
        deliver.redelivered = message.redelivered();
        if deliver.exchange.as_str() != &*payload.exchange {
            deliver.exchange = payload.exchange.as_ref().into();
        }
        if deliver.routing_key.as_str() != payload.routing_key {
            deliver.routing_key = payload.routing_key.as_str().into();
        }
        push_with(&self.outbox, |bytes| {
            encode_into(bytes, &frame);
            write_message_content(bytes, self.channel, payload, self.frame_max);
        });
        Ok(())
    }

    fn expired(&self, _consumer_id: u64, _delivery_tag: u64) {
        // AMQP has no such notice; the client's late ack of it is refused then.
    }

    fn connection_id(&self) -> u64 {
        self.outbox.connection_id()
    }

    fn cancelled(&self, consumer_id: u64, _reason: &str) {
        let mut tags = self.tags.lock();
        if tags.cancelled(consumer_id) || tags.is_closed() {
            return;
        }
        let consumer_tag = deliver_of(&mut self.deliver.lock()).consumer_tag.clone();
        let cancel = basic::Cancel { consumer_tag, nowait: true };
        let frame = AMQPFrame::Method(self.channel, AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)));
        self.outbox.push_bytes(&encode(&frame));
    }
}

/// A method that carries content (`basic.deliver`, `basic.get-ok`, `basic.return`), with the
/// content header and the body cut into frames of at most `frame_max` bytes.
pub fn content_frames(channel: u16, method: AMQPClass, payload: &Payload, frame_max: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_into(&mut bytes, &AMQPFrame::Method(channel, method));
    write_message_content(&mut bytes, channel, payload, frame_max);
    bytes
}

/// `method` with a content of `body` and `properties`, the body cut into frames of at most
/// `frame_max` bytes.
pub fn content(
    channel: u16,
    method: AMQPClass,
    properties: basic::AMQPProperties,
    body: &[u8],
    frame_max: usize,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_into(&mut bytes, &AMQPFrame::Method(channel, method));
    let header = AMQPContentHeader { class_id: BASIC, body_size: body.len() as u64, properties };
    encode_into(&mut bytes, &AMQPFrame::Header(channel, header));
    write_body(&mut bytes, channel, body, frame_max);
    bytes
}

thread_local! {
    /// The content header frame of the latest message delivered on this thread, and the
    /// properties it was written from (none for a message without any): the next message with
    /// the same ones, most often the same publisher's next, takes the frame with its own
    /// channel and body size, its properties not written out again.
    static HEADER: RefCell<Option<(Option<Arc<Properties>>, AMQPFrame)>> = const { RefCell::new(None) };
}

/// Appends the content header and body frames of `payload` to `bytes`, the body cut into
/// frames of at most `frame_max` bytes.
fn write_message_content(bytes: &mut Vec<u8>, channel: u16, payload: &Payload, frame_max: usize) {
    HEADER.with_borrow_mut(|cached| {
        let shared = payload.properties_ptr();
        let same = match cached.as_ref() {
            Some((Some(of), _)) => shared.is_some_and(|shared| Arc::ptr_eq(of, shared)),
            Some((None, _)) => shared.is_none(),
            None => false,
        };
        if !same {
            let header =
                AMQPContentHeader { class_id: BASIC, body_size: 0, properties: properties::to_amqp(payload) };
            *cached = Some((shared.cloned(), AMQPFrame::Header(channel, header)));
        }
        let Some((_, frame)) = cached.as_mut() else { unreachable!("set above") };
        if let AMQPFrame::Header(on, header) = frame {
            *on = channel;
            header.body_size = payload.body.len() as u64;
        }
        encode_into(bytes, frame);
    });
    write_body(bytes, channel, &payload.body, frame_max);
}

/// Appends the body frames of `body`, cut to at most `frame_max` bytes each, to `bytes`.
fn write_body(bytes: &mut Vec<u8>, channel: u16, body: &[u8], frame_max: usize) {
    // Eight bytes of every frame are its header and end marker.
    let chunk = frame_max.saturating_sub(8).max(1);
    for part in body.chunks(chunk) {
        encode_body_into(bytes, channel, part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The content header and body a delivery of `payload` on `channel` is written with.
    fn header_of(channel: u16, payload: &Payload) -> (u16, AMQPContentHeader, Vec<u8>) {
        use super::super::codec::{FrameCodec, Inbound};
        use tokio_util::codec::Decoder;
        let mut bytes = Vec::new();
        write_message_content(&mut bytes, channel, payload, 4096);
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        let mut codec = FrameCodec::new(4096);
        let Some(Inbound::Header(on, header)) = codec.decode(&mut buf).unwrap() else {
            panic!("a header first")
        };
        let mut body = Vec::new();
        while let Some(Inbound::Body(_, part)) = codec.decode(&mut buf).unwrap() {
            body.extend_from_slice(&part);
        }
        (on, *header, body)
    }

    #[test]
    fn each_delivery_has_its_own_properties_channel_and_size_whatever_came_before() {
        use crate::message::MessageProperties;
        let persistent = MessageProperties::new(
            [("amqp-delivery-mode".to_owned(), "2".to_owned())].into(),
            "text/plain".to_owned(),
        );
        let other = MessageProperties::new([("tenant".to_owned(), "acme".to_owned())].into(), String::new());
        let message = |body: &'static [u8], properties: &MessageProperties| {
            Payload { body: bytes::Bytes::from_static(body), ..Payload::default() }
                .with_shared_properties(properties.clone())
        };
        let first = message(b"one", &persistent);
        let bare = message(b"two!", &MessageProperties::default());
        let again = message(b"three", &persistent);
        let different = message(b"", &other);
        for (channel, payload) in
            [(1, &first), (2, &bare), (3, &again), (1, &first), (4, &different), (5, &bare)]
        {
            let (on, header, body) = header_of(channel, payload);
            assert_eq!(on, channel);
            assert_eq!(header.body_size, payload.body.len() as u64);
            assert_eq!(body, payload.body.to_vec());
            assert_eq!(header.properties, properties::to_amqp(payload), "on channel {channel}");
        }
        assert_eq!(*header_of(1, &again).1.properties.delivery_mode(), Some(2));
        assert_eq!(*header_of(1, &bare).1.properties.delivery_mode(), None);
    }

    #[test]
    fn a_multiple_settle_covers_every_consumer_up_to_the_tag() {
        let mut tags = Tags::default();
        assert_eq!(tags.issue(7, 1), 1);
        assert_eq!(tags.issue(8, 1), 2);
        assert_eq!(tags.issue(7, 2), 3);
        assert_eq!(tags.issue(8, 2), 4);
        assert_eq!(tags.settle(3, true).unwrap(), [(7, 2, true), (8, 1, false)]);
        assert_eq!(tags.settle(3, false), Err(3), "settled already");
        assert_eq!(tags.settle(4, false).unwrap(), [(8, 2, false)]);
        assert_eq!(tags.settle(9, true), Err(9));
    }

    #[test]
    fn only_unsettled_deliveries_take_room() {
        let mut tags = Tags::default();
        tags.issue(1, 1);
        for _ in 0..10_000 {
            tags.issue_settled();
        }
        assert_eq!(tags.deliveries.len(), 1, "a no-ack stream beside one unacked delivery");
        assert_eq!(tags.settle(1, false).unwrap(), [(1, 1, false)]);
        assert!(tags.deliveries.is_empty());
    }

    #[test]
    fn settled_tags_in_any_order_leave_the_rest_settleable() {
        let mut tags = Tags::default();
        for delivery in 1..=5 {
            tags.issue(1, delivery);
        }
        assert_eq!(tags.issue_settled(), 6, "a no-ack delivery takes a tag too");
        assert_eq!(tags.issue(2, 1), 7);
        assert_eq!(tags.settle(3, false).unwrap(), [(1, 3, false)]);
        assert_eq!(tags.settle(1, false).unwrap(), [(1, 1, false)]);
        assert_eq!(tags.settle(3, true), Err(3), "settled already");
        assert_eq!(tags.settle(4, true).unwrap(), [(1, 4, true)], "2 and 4");
        assert_eq!(tags.settle(6, false), Err(6), "a no-ack tag is not settleable");
        assert!(tags.holds(2) && tags.holds(1));
        assert_eq!(tags.settle(0, true).unwrap(), [(1, 5, false), (2, 1, false)]);
        assert!(!tags.holds(1) && !tags.holds(2));
        assert_eq!(tags.settle(8, false), Err(8), "never issued");
        assert_eq!(tags.issue(3, 1), 8);
        assert_eq!(tags.settle(8, true).unwrap(), [(3, 1, false)]);
    }

    #[test]
    fn tag_zero_with_multiple_settles_everything_and_what_the_broker_cancelled_settles_to_nothing() {
        let mut tags = Tags::default();
        tags.issue(1, 1);
        tags.issue(2, 1);
        tags.issue(1, 2);
        tags.issue(2, 2);
        assert!(!tags.cancelled(2), "its client had not cancelled it");
        assert_eq!(tags.settle(2, false).unwrap(), [], "a known tag, of a consumer gone");
        assert_eq!(tags.settle(0, true).unwrap(), [(1, 2, true)]);
        assert!(tags.gone.is_empty(), "nothing of it is left to settle");
        assert!(tags.settle(0, true).unwrap().is_empty());
        assert_eq!(tags.settle(4, false), Err(4), "settled already");
    }

    #[test]
    fn a_consumer_its_client_cancelled_is_not_cancelled_again() {
        let mut tags = Tags::default();
        tags.issue(1, 1);
        tags.stop(1);
        assert!(tags.cancelled(1), "the client ended it");
        assert!(!tags.cancelled(1), "once");
        assert_eq!(tags.settle(1, false).unwrap(), []);
        tags.issue(2, 1);
        tags.stop(2);
        assert!(tags.ended(2));
        assert!(!tags.cancelled(2), "its cancel is done with");
    }
}
