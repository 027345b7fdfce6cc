//! Hostile and broken input: every case gets a precise answer (or a clean close), never a
//! panic, and the broker keeps serving everyone else afterwards.

use bytes::{BufMut, BytesMut};
use hopper_client::{Error, ErrorCode, QueueOptions};
use hopper_proto::{pb, Body, Frame};
use hopper_tests::{assert_serves, connect, Broker, RawConn};

fn declare(name: &str) -> Body {
    Body::QueueDeclare(pb::QueueDeclare { name: name.into(), settings: None, passive: false })
}

fn publish(queue: &str, body: impl Into<bytes::Bytes>) -> Body {
    Body::Publish(pb::Publish { queue: queue.into(), body: body.into(), ..Default::default() })
}

fn stats(queue: &str) -> Body {
    Body::QueueStats(pb::QueueStats { name: queue.into() })
}

fn is_frame_too_large_or_close(frame: &Frame) -> bool {
    match &frame.body {
        Some(Body::Error(error)) => error.code == ErrorCode::FrameTooLarge as i32,
        Some(Body::Close(close)) => close.code == ErrorCode::ProtocolViolation as i32,
        _ => false,
    }
}

#[tokio::test]
async fn garbage_bytes_get_an_error_and_the_connection_is_closed() {
    let broker = Broker::start();
    let mut raw = RawConn::connect(broker.addr()).await;
    raw.send_bytes(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    let frames = raw.expect_eof().await;
    // "GET " read as a length is about 1.2 GB: the broker says the frame is too large (or that
    // the protocol was violated) and hangs up, since the peer does not speak Hopper.
    assert_eq!(frames.len(), 1, "one answer before the close: {frames:?}");
    assert!(is_frame_too_large_or_close(&frames[0]), "unexpected answer: {frames:?}");
    assert_serves(&broker).await;
}

#[tokio::test]
async fn garbage_that_fits_a_frame_is_a_protocol_violation_before_the_handshake() {
    let broker = Broker::start();
    let mut raw = RawConn::connect(broker.addr()).await;
    // A valid length prefix followed by bytes that are not a protobuf `Frame`.
    raw.send_bytes(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).await;
    let frames = raw.expect_eof().await;
    match frames.as_slice() {
        [Frame { body: Some(Body::Close(close)), .. }] => {
            assert_eq!(close.code, ErrorCode::ProtocolViolation as i32, "{close:?}");
        }
        other => panic!("expected one Close(PROTOCOL_VIOLATION) before EOF, got {other:?}"),
    }
    assert_serves(&broker).await;
}

#[tokio::test]
async fn malformed_frame_after_the_handshake_is_reported_and_the_connection_continues() {
    let broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    raw.send_bytes(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).await;
    // The request id cannot be read from garbage, so the error carries 0.
    let (code, message) = raw.error_response(0).await;
    assert_eq!(code, ErrorCode::ProtocolViolation, "{message}");
    assert!(matches!(raw.call(declare("after-garbage")).await, Body::QueueDeclareOk(_)));
    assert_serves(&broker).await;
}

#[tokio::test]
async fn frame_over_the_negotiated_max_is_skipped_with_frame_too_large() {
    let broker = Broker::start();
    let mut raw = RawConn::connect(broker.addr()).await;
    let ok = raw.hello(0, 65_536).await;
    assert_eq!(ok.max_frame_size, 65_536);
    assert!(matches!(raw.call(declare("big")).await, Body::QueueDeclareOk(_)));

    let request_id = raw.request(publish("big", vec![b'x'; 100 * 1024])).await;
    let (code, message) = raw.error_response(request_id).await;
    assert_eq!(code, ErrorCode::FrameTooLarge, "{message}");

    // The stream is still in sync: the next request on the same connection works.
    match raw.call(publish("big", "small")).await {
        Body::PublishOk(ok) => assert!(ok.message_id > 0),
        other => panic!("expected PublishOk, got {other:?}"),
    }
    match raw.call(stats("big")).await {
        Body::QueueInfo(info) => {
            assert_eq!((info.ready, info.published_total), (1, 1), "the oversize publish was dropped")
        }
        other => panic!("expected QueueInfo, got {other:?}"),
    }
    assert_serves(&broker).await;
}

#[tokio::test]
async fn truncated_frame_closes_only_that_connection() {
    let broker = Broker::start();
    let mut bystander = RawConn::connect_hello(broker.addr()).await;
    assert!(matches!(bystander.call(declare("bystander")).await, Body::QueueDeclareOk(_)));

    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let mut bytes = BytesMut::new();
    bytes.put_u32(100);
    bytes.put_slice(&[0x08; 50]);
    raw.send_bytes(&bytes).await;
    raw.shutdown_write().await;
    let frames = raw.expect_eof().await;
    assert!(frames.iter().all(|f| matches!(f.body, Some(Body::Heartbeat(_)))), "{frames:?}");

    assert!(matches!(bystander.call(publish("bystander", "still here")).await, Body::PublishOk(_)));
    assert_serves(&broker).await;
}

#[tokio::test]
async fn unknown_message_type_is_a_protocol_violation_and_the_connection_continues() {
    let broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let request_id = raw.next_request_id();
    // A Frame with request_id and an empty length-delimited field 999, a body this protocol
    // version does not know.
    let mut frame = BytesMut::new();
    prost::encoding::encode_key(1, prost::encoding::WireType::Varint, &mut frame);
    prost::encoding::encode_varint(request_id, &mut frame);
    prost::encoding::encode_key(999, prost::encoding::WireType::LengthDelimited, &mut frame);
    prost::encoding::encode_varint(0, &mut frame);
    let mut bytes = BytesMut::new();
    bytes.put_u32(frame.len() as u32);
    bytes.put_slice(&frame);
    raw.send_bytes(&bytes).await;

    let (code, message) = raw.error_response(request_id).await;
    assert_eq!(code, ErrorCode::ProtocolViolation, "{message}");
    assert!(matches!(raw.call(declare("after-unknown")).await, Body::QueueDeclareOk(_)));
    assert_serves(&broker).await;
}

#[tokio::test]
async fn frames_only_the_broker_sends_are_protocol_violations() {
    let broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let request_id = raw.request(Body::PublishOk(pb::PublishOk { message_id: 1, routed: 1 })).await;
    let (code, message) = raw.error_response(request_id).await;
    assert_eq!(code, ErrorCode::ProtocolViolation, "{message}");
    assert!(matches!(raw.call(declare("after-publish-ok")).await, Body::QueueDeclareOk(_)));
}

#[tokio::test]
async fn commands_before_the_handshake_are_protocol_violations() {
    let broker = Broker::start();
    let mut raw = RawConn::connect(broker.addr()).await;
    let request_id = raw.request(Body::QueueList(pb::QueueList {})).await;
    let (code, message) = raw.error_response(request_id).await;
    assert_eq!(code, ErrorCode::ProtocolViolation, "{message}");
    assert!(message.contains("Hello"), "the error says what is missing: {message}");
    // Nothing was done, and the handshake can still follow.
    raw.hello(0, 0).await;
    match raw.call(Body::QueueList(pb::QueueList {})).await {
        Body::QueueListOk(list) => assert!(list.queues.is_empty()),
        other => panic!("expected QueueListOk, got {other:?}"),
    }
    assert_serves(&broker).await;
}

#[tokio::test]
async fn a_second_hello_is_a_protocol_violation() {
    let broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let hello = pb::Hello { protocol_version: hopper_proto::PROTOCOL_VERSION, ..Default::default() };
    let request_id = raw.request(Body::Hello(hello)).await;
    let (code, message) = raw.error_response(request_id).await;
    assert_eq!(code, ErrorCode::ProtocolViolation, "{message}");
    assert!(matches!(raw.call(declare("after-hello")).await, Body::QueueDeclareOk(_)));
}

#[tokio::test]
async fn wrong_protocol_version_is_rejected_naming_the_supported_range() {
    let broker = Broker::start();
    let mut raw = RawConn::connect(broker.addr()).await;
    let hello =
        pb::Hello { protocol_version: 99, client_name: "from the future".into(), ..Default::default() };
    match raw.send_hello(hello).await.body {
        Some(Body::HelloRejected(rejected)) => {
            assert_eq!(rejected.min_version, hopper_proto::MIN_PROTOCOL_VERSION);
            assert_eq!(rejected.max_version, hopper_proto::PROTOCOL_VERSION);
            assert!(rejected.message.contains("99"), "{rejected:?}");
        }
        other => panic!("expected HelloRejected, got {other:?}"),
    }
    raw.expect_eof().await;
    assert_serves(&broker).await;
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hopper.toml");
    std::fs::write(&config, "handshake_timeout_ms = 200\n").unwrap();
    let broker = Broker::start_with(&["--config", config.to_str().unwrap()]);
    let mut raw = RawConn::connect(broker.addr()).await;
    let frames = raw.expect_eof().await;
    match frames.as_slice() {
        [Frame { body: Some(Body::Close(close)), .. }] => {
            assert_eq!(close.code, ErrorCode::ProtocolViolation as i32, "{close:?}")
        }
        other => panic!("expected one Close(PROTOCOL_VIOLATION) before EOF, got {other:?}"),
    }
    assert_serves(&broker).await;
}

#[tokio::test]
async fn settling_an_unknown_delivery_tag_is_not_found_and_the_connection_continues() {
    let broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    assert!(matches!(raw.call(declare("tags")).await, Body::QueueDeclareOk(_)));
    let consume = pb::Consume { queue: "tags".into(), prefetch_count: 10, ..Default::default() };
    let consumer_id = match raw.call(Body::Consume(consume)).await {
        Body::ConsumeOk(ok) => ok.consumer_id,
        other => panic!("expected ConsumeOk, got {other:?}"),
    };

    let ack = pb::Ack { consumer_id, delivery_tag: 42, multiple: false, confirm: false };
    let request_id = raw.request(Body::Ack(ack)).await;
    let (code, message) = raw.error_response(request_id).await;
    assert_eq!(code, ErrorCode::NotFound, "{message}");

    let nack = pb::Nack { consumer_id, delivery_tag: 7, multiple: true, requeue: true, ..Default::default() };
    let request_id = raw.request(Body::Nack(nack)).await;
    assert_eq!(raw.error_response(request_id).await.0, ErrorCode::NotFound);

    let reject = pb::Reject { consumer_id: consumer_id + 1000, delivery_tag: 1, ..Default::default() };
    let request_id = raw.request(Body::Reject(reject)).await;
    assert_eq!(raw.error_response(request_id).await.0, ErrorCode::NotFound, "unknown consumer");

    // The connection and the consumer still work: a publish is delivered and can be acked.
    // The delivery may overtake the publish confirm, so take both in either order.
    let request_id = raw.request(publish("tags", "hello")).await;
    let (mut message_id, mut deliver) = (None, None);
    while message_id.is_none() || deliver.is_none() {
        match raw.recv_skipping_heartbeats().await.and_then(|f| f.body.map(|b| (f.request_id, b))) {
            Some((id, Body::PublishOk(ok))) if id == request_id => message_id = Some(ok.message_id),
            Some((0, Body::Deliver(d))) => deliver = Some(d),
            other => panic!("expected PublishOk and Deliver, got {other:?}"),
        }
    }
    let deliver = deliver.unwrap();
    assert_eq!(deliver.message.as_ref().map(|m| m.message_id), message_id);
    raw.request(Body::Ack(pb::Ack {
        consumer_id,
        delivery_tag: deliver.delivery_tag,
        multiple: false,
        confirm: false,
    }))
    .await;
    match raw.call(stats("tags")).await {
        Body::QueueInfo(info) => assert_eq!((info.unacked, info.acked_total), (0, 1)),
        other => panic!("expected QueueInfo, got {other:?}"),
    }
}

#[tokio::test]
async fn a_publish_naming_a_queue_and_an_exchange_is_refused() {
    let broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    assert!(matches!(raw.call(declare("direct")).await, Body::QueueDeclareOk(_)));
    let body = Body::Publish(pb::Publish {
        queue: "direct".into(),
        body: "x".into(),
        exchange: "amq.direct".into(),
        ..Default::default()
    });
    let request_id = raw.request(body).await;
    let (code, message) = raw.error_response(request_id).await;
    assert_eq!(code, ErrorCode::InvalidArgument, "{message}");
    assert!(message.contains("not both"), "{message}");
}

#[tokio::test]
async fn invalid_queue_names_are_invalid_arguments() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let too_long = "q".repeat(256);
    for name in ["", too_long.as_str(), "line\nbreak", "tab\there"] {
        match conn.declare_queue(name, QueueOptions::default()).await {
            Err(Error::Broker { code: ErrorCode::InvalidArgument, .. }) => {}
            other => panic!("declare {name:?}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    let longest = "q".repeat(255);
    let info = conn.declare_queue(&longest, QueueOptions::default()).await.expect("255 bytes is allowed");
    assert_eq!(info.name, longest);
    let names: Vec<String> = conn.list_queues().await.unwrap().into_iter().map(|q| q.name).collect();
    assert_eq!(names, vec![longest], "no invalid queue was created");
}

#[tokio::test]
async fn redeclaring_with_another_durability_is_a_precondition_failure() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("orders", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    match conn.declare_queue("orders", QueueOptions { durable: false, ..Default::default() }).await {
        Err(err @ Error::Broker { code: ErrorCode::PreconditionFailed, .. }) => {
            assert_eq!(err.code(), Some(ErrorCode::PreconditionFailed));
        }
        other => panic!("expected PRECONDITION_FAILED, got {other:?}"),
    }
    // The existing queue is untouched and the connection goes on.
    let info = conn.queue_stats("orders").await.unwrap();
    assert!(info.durable);
    assert_serves(&broker).await;
}
