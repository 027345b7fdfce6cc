//! Recognizing a delivery event in a frame's bytes, so that a receiver can decode it straight
//! into a [`Deliver`](crate::pb::Deliver).
//!
//! Deliveries are most of what a consumer connection reads. Decoded as a [`Frame`](crate::Frame),
//! each is built inside the `Body` enum (the size of its largest variant) and moved out again;
//! decoded on its own it is built in place.

use prost::encoding::{decode_varint, WireType};

/// Field number of `deliver` in `Frame`'s `body` oneof (`proto/hopper.proto`).
const DELIVER_FIELD: u64 = 34;

/// Where the `Deliver` message starts in `frame` (a frame's bytes, length prefix excluded) if
/// the frame is a delivery event with nothing else in it: no request id (0, so not encoded)
/// and exactly one `deliver` field, running to the end. Decoding `frame[offset..]` as a
/// `Deliver` then gives what decoding the whole frame would, and `None` means the frame must
/// be decoded as a whole.
pub fn deliver_event_offset(frame: &[u8]) -> Option<usize> {
    let mut rest = frame;
    let key = decode_varint(&mut rest).ok()?;
    if key != DELIVER_FIELD << 3 | WireType::LengthDelimited as u64 {
        return None;
    }
    let len = decode_varint(&mut rest).ok()?;
    (len == rest.len() as u64).then(|| frame.len() - rest.len())
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes, BytesMut};
    use prost::Message as _;

    use super::*;
    use crate::{pb, Body, Frame};

    fn deliver() -> pb::Deliver {
        pb::Deliver {
            consumer_id: 7,
            delivery_tag: 300,
            message: Some(pb::Message {
                message_id: 42,
                body: Bytes::from_static(b"hello"),
                exchange: "x".into(),
                routing_key: "k".into(),
                ..Default::default()
            }),
        }
    }

    fn encoded(frame: &Frame) -> Bytes {
        frame.encode_to_vec().into()
    }

    #[test]
    fn a_delivery_event_decodes_as_its_deliver() {
        let frame = encoded(&Frame::event(Body::Deliver(deliver())));
        let offset = deliver_event_offset(&frame).expect("a delivery event");
        assert_eq!(pb::Deliver::decode(frame.slice(offset..)).unwrap(), deliver());
    }

    #[test]
    fn an_empty_delivery_event_is_one_too() {
        let frame = encoded(&Frame::event(Body::Deliver(pb::Deliver::default())));
        let offset = deliver_event_offset(&frame).expect("a delivery event");
        assert_eq!(offset, frame.len());
    }

    #[test]
    fn other_frames_are_decoded_whole() {
        assert_eq!(deliver_event_offset(&encoded(&Frame::new(5, Body::Deliver(deliver())))), None);
        assert_eq!(deliver_event_offset(&encoded(&Frame::event(Body::Heartbeat(pb::Heartbeat {})))), None);
        let ack = pb::Ack { consumer_id: 1, delivery_tag: 2, multiple: false, confirm: false };
        assert_eq!(deliver_event_offset(&encoded(&Frame::event(Body::Ack(ack)))), None);
        assert_eq!(deliver_event_offset(&[]), None);
    }

    #[test]
    fn a_delivery_followed_by_more_fields_is_decoded_whole() {
        let single = encoded(&Frame::event(Body::Deliver(deliver())));
        let mut twice = BytesMut::new();
        twice.put_slice(&single);
        twice.put_slice(&single);
        assert_eq!(deliver_event_offset(&twice), None);
        // And a truncated one is left to the full decode to report.
        assert_eq!(deliver_event_offset(&single[..single.len() - 1]), None);
    }
}
