//! `Deliver` frames encoded straight from a shared payload.
//!
//! A delivery is the broker's most frequent frame: a fanout to ten queues sends ten of them per
//! publish. Building a `pb::Message` first would copy the payload's headers, content type,
//! exchange and routing key once per delivery, and prost would size the nested messages
//! again at every level. Here the lengths are computed once and every field is written from
//! the payload itself; the bytes are those prost writes for the same `Frame`, field for field.

use bytes::BufMut;
use prost::encoding::{self, encoded_len_varint, key_len, WireType};

use crate::message::Payload;

/// Field numbers, as in `proto/hopper.proto`.
const FRAME_DELIVER: u32 = 34;
const DELIVER_CONSUMER_ID: u32 = 1;
const DELIVER_TAG: u32 = 2;
const DELIVER_MESSAGE: u32 = 3;

/// A delivery of `payload`, borrowed, ready to encode as a `Frame`.
pub struct DeliverFrame<'a> {
    pub consumer_id: u64,
    pub delivery_tag: u64,
    pub payload: &'a Payload,
    pub delivery_count: u32,
    pub redelivered: bool,
}

impl DeliverFrame<'_> {
    /// The encoded length of the `Message` inside the `Deliver`.
    fn message_len(&self) -> usize {
        let p = self.payload;
        uint64_len(1, p.id)
            + bytes_len(2, p.body.len())
            + string_map_len(3, p)
            + bytes_len(4, p.content_type().len())
            + uint64_len(5, p.published_at_ms)
            + uint64_len(6, u64::from(self.delivery_count))
            + if self.redelivered { key_len(7) + 1 } else { 0 }
            + p.deaths().iter().map(|d| nested_len(8, death_len(&super::death_to_wire(d)))).sum::<usize>()
            + uint64_len(9, u64::from(p.replay_count))
            + uint64_len(10, u64::from(p.deaths_omitted()))
            + bytes_len(11, p.exchange.len())
            + bytes_len(12, p.routing_key.len())
    }

    fn deliver_len(&self, message_len: usize) -> usize {
        uint64_len(DELIVER_CONSUMER_ID, self.consumer_id)
            + uint64_len(DELIVER_TAG, self.delivery_tag)
            + nested_len(DELIVER_MESSAGE, message_len)
    }

    /// The encoded length of the whole `Frame` (request id 0, an event).
    pub fn encoded_len(&self) -> usize {
        nested_len(FRAME_DELIVER, self.deliver_len(self.message_len()))
    }

    /// Writes the `Frame` (without its length prefix); `buf` must have room for
    /// [`DeliverFrame::encoded_len`] bytes.
    pub fn encode(&self, buf: &mut impl BufMut) {
        let p = self.payload;
        let message_len = self.message_len();
        encoding::encode_key(FRAME_DELIVER, WireType::LengthDelimited, buf);
        encoding::encode_varint(self.deliver_len(message_len) as u64, buf);
        put_uint64(DELIVER_CONSUMER_ID, self.consumer_id, buf);
        put_uint64(DELIVER_TAG, self.delivery_tag, buf);
        encoding::encode_key(DELIVER_MESSAGE, WireType::LengthDelimited, buf);
        encoding::encode_varint(message_len as u64, buf);
        put_uint64(1, p.id, buf);
        if !p.body.is_empty() {
            encoding::bytes::encode(2, &p.body, buf);
        }
        encoding::hash_map::encode(
            encoding::string::encode,
            encoding::string::encoded_len,
            encoding::string::encode,
            encoding::string::encoded_len,
            3,
            p.headers(),
            buf,
        );
        put_string(4, p.content_type(), buf);
        put_uint64(5, p.published_at_ms, buf);
        put_uint64(6, u64::from(self.delivery_count), buf);
        if self.redelivered {
            encoding::bool::encode(7, &true, buf);
        }
        for death in p.deaths() {
            encoding::message::encode(8, &super::death_to_wire(death), buf);
        }
        put_uint64(9, u64::from(p.replay_count), buf);
        put_uint64(10, u64::from(p.deaths_omitted()), buf);
        put_string(11, &p.exchange, buf);
        put_string(12, &p.routing_key, buf);
    }
}

/// A proto3 scalar field: absent when zero.
fn uint64_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value)
    }
}

/// A proto3 string or bytes field of `len` bytes: absent when empty.
fn bytes_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        nested_len(tag, len)
    }
}

/// A length-delimited field holding `len` bytes, written even when empty (a set message).
fn nested_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn string_map_len(tag: u32, payload: &Payload) -> usize {
    encoding::hash_map::encoded_len(
        encoding::string::encoded_len,
        encoding::string::encoded_len,
        tag,
        payload.headers(),
    )
}

fn death_len(death: &hopper_proto::pb::Death) -> usize {
    prost::Message::encoded_len(death)
}

fn put_uint64(tag: u32, value: u64, buf: &mut impl BufMut) {
    if value != 0 {
        encoding::uint64::encode(tag, &value, buf);
    }
}

fn put_string(tag: u32, value: &str, buf: &mut impl BufMut) {
    if !value.is_empty() {
        encoding::encode_key(tag, encoding::WireType::LengthDelimited, buf);
        encoding::encode_varint(value.len() as u64, buf);
        buf.put_slice(value.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::{Bytes, BytesMut};
    use hopper_proto::{pb, Body, Frame};
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::message::{Death, DeathReason};

    fn reference(frame: &DeliverFrame) -> Frame {
        let message = crate::wire::message_of(frame.payload, frame.delivery_count, frame.redelivered);
        let deliver = pb::Deliver {
            consumer_id: frame.consumer_id,
            delivery_tag: frame.delivery_tag,
            message: Some(message),
        };
        Frame::event(Body::Deliver(deliver))
    }

    fn death(queue: String, error: String, count: u32) -> Death {
        Death {
            queue,
            reason: DeathReason::Rejected,
            count,
            error,
            first_failure_ms: 1,
            last_failure_ms: 2,
            died_at_ms: 3,
            exchange: "x".into(),
            routing_key: String::new(),
        }
    }

    proptest! {
        #[test]
        fn decodes_to_the_frame_prost_would_write(
            id in any::<u64>(),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            headers in proptest::collection::hash_map("[a-z]{0,6}", "[a-zé]{0,6}", 0..4),
            content_type in "[a-z/]{0,10}",
            published_at_ms in any::<u64>(),
            deaths in proptest::collection::vec(("[a-z]{0,5}", "[a-z ]{0,8}", any::<u32>()), 0..3),
            (replay_count, deaths_omitted) in (any::<u32>(), any::<u32>()),
            (exchange, routing_key) in ("[a-z.]{0,8}", "[a-z.#*]{0,12}"),
            (consumer_id, delivery_tag, delivery_count) in (any::<u64>(), any::<u64>(), any::<u32>()),
            redelivered in any::<bool>(),
        ) {
            let payload = Payload { id, body: Bytes::from(body), published_at_ms, replay_count, exchange: exchange.into(), routing_key, ..Payload::default() }
                .with_properties(headers.into_iter().collect::<HashMap<_, _>>(), content_type)
                .with_deaths(deaths.into_iter().map(|(q, e, c)| death(q, e, c)).collect(), deaths_omitted);
            let frame = DeliverFrame { consumer_id, delivery_tag, payload: &payload, delivery_count, redelivered };
            let expected = reference(&frame);
            let mut buf = BytesMut::new();
            frame.encode(&mut buf);
            prop_assert_eq!(buf.len(), frame.encoded_len());
            prop_assert_eq!(buf.len(), expected.encoded_len());
            prop_assert_eq!(Frame::decode(buf.freeze()).expect("decodes"), expected);
        }
    }
}
