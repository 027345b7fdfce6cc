//! A frame that does not decode still names its request: the broker reads the request id from
//! the frame's first bytes and answers it with `PROTOCOL_VIOLATION`, so a client fails that
//! request at once instead of waiting for its timeout, and the connection goes on.

use bytes::{BufMut, BytesMut};
use hopper_client::ErrorCode;
use hopper_proto::{encode_frame, pb, Body, Frame};
use hopper_tests::{assert_serves, Broker, RawConn};

/// A length-prefixed frame that starts with a valid request id (field 1) and goes on with a
/// `Publish` field (20) declaring 200 bytes of which only three follow.
fn garbage_after_request_id(request_id: u64) -> BytesMut {
    let mut payload = vec![0x08];
    prost::encoding::encode_varint(request_id, &mut payload);
    payload.extend_from_slice(&[0xa2, 0x01, 0xc8, 0x01, 1, 2, 3]);
    let mut frame = BytesMut::new();
    frame.put_u32(payload.len() as u32);
    frame.extend_from_slice(&payload);
    frame
}

fn declare(name: &str) -> Body {
    Body::QueueDeclare(pb::QueueDeclare { name: name.into(), settings: None, passive: false })
}

fn stats(queue: &str) -> Body {
    Body::QueueStats(pb::QueueStats { name: queue.into() })
}

#[tokio::test]
async fn a_malformed_frame_is_answered_with_its_request_id() {
    let broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let request_id = raw.next_request_id();
    raw.send_bytes(&garbage_after_request_id(request_id)).await;

    let (code, message) = raw.error_response(request_id).await;
    assert_eq!(code, ErrorCode::ProtocolViolation, "{message}");
    assert!(message.contains("malformed frame"), "{message}");

    // The connection is still usable, and so is the broker for everyone else.
    assert!(matches!(raw.call(declare("after-malformed")).await, Body::QueueDeclareOk(_)));
    assert!(matches!(raw.call(stats("after-malformed")).await, Body::QueueInfo(_)));
    assert_serves(&broker).await;
}

#[tokio::test]
async fn a_malformed_frame_is_answered_in_order_among_pipelined_requests() {
    let broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    assert!(matches!(raw.call(declare("pipelined")).await, Body::QueueDeclareOk(_)));

    // Three requests in one write: the broker answers them in order, each under its own id.
    let before = raw.next_request_id();
    let broken = raw.next_request_id();
    let after = raw.next_request_id();
    let mut wire = BytesMut::new();
    encode_frame(&Frame::new(before, stats("pipelined")), u32::MAX, &mut wire).expect("encode a frame");
    wire.extend_from_slice(&garbage_after_request_id(broken));
    encode_frame(&Frame::new(after, stats("pipelined")), u32::MAX, &mut wire).expect("encode a frame");
    raw.send_bytes(&wire).await;

    assert!(matches!(raw.response(before).await, Body::QueueInfo(_)));
    let (code, message) = raw.error_response(broken).await;
    assert_eq!(code, ErrorCode::ProtocolViolation, "{message}");
    assert!(matches!(raw.response(after).await, Body::QueueInfo(_)));
}

#[tokio::test]
async fn a_large_request_id_survives_a_frame_split_across_writes() {
    let broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    // The largest id takes the longest varint (ten bytes). Its first bytes are written one at
    // a time, so the id may reach the broker cut across reads.
    let request_id = u64::MAX;
    let frame = garbage_after_request_id(request_id);
    let (head, tail) = frame.split_at(8);
    for byte in head {
        raw.send_bytes(&[*byte]).await;
    }
    raw.send_bytes(tail).await;

    let (code, message) = raw.error_response(request_id).await;
    assert_eq!(code, ErrorCode::ProtocolViolation, "{message}");
    assert!(matches!(raw.call(declare("after-split")).await, Body::QueueDeclareOk(_)));
}
