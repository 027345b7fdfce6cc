//! The client against a scripted peer playing the broker, for the cases a well-behaved
//! broker never produces: rejected handshakes, a broker that stops answering, and frames the
//! client must refuse to send.

use std::time::{Duration, Instant};

use hopper_client::{
    ConnectOptions, Connection, ConsumeOptions, Error, ErrorCode, PublishOptions, QueueOptions,
};
use hopper_proto::{pb, Body, Frame};
use hopper_tests::{connect_with, next_delivery, within, Broker, RawConn};
use tokio::net::TcpListener;

/// A listener on a free port and the address to give the client.
async fn fake_broker() -> (TcpListener, std::net::SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Accepts one connection and reads its `Hello`; returns the connection and the Hello frame.
async fn accept_hello(listener: &TcpListener) -> (RawConn, Frame) {
    let (stream, _) = within("the client to connect", listener.accept()).await.unwrap();
    let mut peer = RawConn::from_stream(stream);
    let hello = peer.recv().await.expect("the client sends a Hello");
    assert!(matches!(hello.body, Some(Body::Hello(_))), "the first frame is a Hello: {hello:?}");
    (peer, hello)
}

#[tokio::test]
async fn hello_carries_the_requested_settings() {
    let (listener, addr) = fake_broker().await;
    let options = ConnectOptions {
        client_name: "settings-check".into(),
        heartbeat: Duration::from_millis(1500),
        max_frame_size: 100_000,
        ..Default::default()
    };
    let client = tokio::spawn(Connection::connect_with(addr, options));
    let (mut peer, hello) = accept_hello(&listener).await;
    match hello.body {
        Some(Body::Hello(hello)) => {
            assert_eq!(hello.protocol_version, hopper_proto::PROTOCOL_VERSION);
            assert_eq!(hello.client_name, "settings-check");
            assert_eq!((hello.heartbeat_ms, hello.max_frame_size), (1500, 100_000));
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    let ok = pb::HelloOk {
        protocol_version: 1,
        server_version: "9.9.9-test".into(),
        heartbeat_ms: 0,
        max_frame_size: 70_000,
        ..Default::default()
    };
    peer.send(&Frame::new(hello.request_id, Body::HelloOk(ok))).await;
    let conn = within("the handshake", client).await.unwrap().expect("connected");
    assert_eq!(conn.server_version(), "9.9.9-test");
    assert_eq!(conn.heartbeat(), Duration::ZERO);
    assert_eq!(conn.max_frame_size(), 70_000);
}

#[tokio::test]
async fn rejected_handshake_names_the_supported_versions() {
    let (listener, addr) = fake_broker().await;
    let client = tokio::spawn(Connection::connect(addr));
    let (mut peer, hello) = accept_hello(&listener).await;
    let rejected = pb::HelloRejected {
        message: "only version 7 here".into(),
        min_version: 7,
        max_version: 8,
        ..Default::default()
    };
    peer.send(&Frame::new(hello.request_id, Body::HelloRejected(rejected))).await;
    match within("the handshake", client).await.unwrap() {
        Err(err @ Error::HandshakeRejected { min_version: 7, max_version: 8, .. }) => {
            assert_eq!(err.code(), Some(ErrorCode::UnsupportedVersion));
            assert!(err.to_string().contains("only version 7 here"), "{err}");
        }
        other => panic!("expected HandshakeRejected, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_times_out_when_the_handshake_is_never_answered() {
    let (listener, addr) = fake_broker().await;
    let options = ConnectOptions { connect_timeout: Duration::from_millis(200), ..Default::default() };
    let client = tokio::spawn(Connection::connect_with(addr, options));
    let (_peer, _hello) = accept_hello(&listener).await;
    match within("the connect timeout", client).await.unwrap() {
        Err(Error::Timeout(_)) => {}
        other => panic!("expected Error::Timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn a_silent_broker_is_detected_by_heartbeats() {
    let (listener, addr) = fake_broker().await;
    let options = ConnectOptions { heartbeat: Duration::from_millis(100), ..Default::default() };
    let client = tokio::spawn(Connection::connect_with(addr, options));
    let (mut peer, hello) = accept_hello(&listener).await;
    let ok = pb::HelloOk {
        protocol_version: 1,
        server_version: "silent".into(),
        heartbeat_ms: 100,
        max_frame_size: 0,
        ..Default::default()
    };
    peer.send(&Frame::new(hello.request_id, Body::HelloOk(ok))).await;
    let conn = within("the handshake", client).await.unwrap().expect("connected");
    let silent_since = Instant::now();

    // The request is never answered; the heartbeat timeout must end it.
    match within("the heartbeat timeout", conn.queue_stats("q")).await {
        Err(Error::Closed(reason)) => assert!(reason.contains("heartbeat"), "{reason}"),
        other => panic!("expected Error::Closed, got {other:?}"),
    }
    assert!(silent_since.elapsed() >= Duration::from_millis(100), "not before a heartbeat interval passed");
    assert!(conn.is_closed());

    // While it waited, the client kept sending heartbeats of its own.
    let frames = peer.expect_eof().await;
    let heartbeats = frames.iter().filter(|f| matches!(f.body, Some(Body::Heartbeat(_)))).count();
    assert!(heartbeats >= 1, "the client sent heartbeats: {frames:?}");
}

#[tokio::test]
async fn broker_errors_fail_only_their_request() {
    let (listener, addr) = fake_broker().await;
    let client = tokio::spawn(Connection::connect(addr));
    let (mut peer, hello) = accept_hello(&listener).await;
    let ok = pb::HelloOk { protocol_version: 1, server_version: "x".into(), ..Default::default() };
    peer.send(&Frame::new(hello.request_id, Body::HelloOk(ok))).await;
    let conn = within("the handshake", client).await.unwrap().expect("connected");

    let first = conn.publish("a", "1", PublishOptions::default());
    let second = conn.publish("b", "2", PublishOptions::default());
    let ids: Vec<u64> = [peer.recv().await.unwrap(), peer.recv().await.unwrap()].map(|f| f.request_id).into();
    // Answer out of order: the client matches answers by request id.
    peer.send(&Frame::new(ids[1], Body::PublishOk(pb::PublishOk { message_id: 77, routed: 1 }))).await;
    peer.send(&Frame::error(ids[0], ErrorCode::NotFound, "no queue named 'a'")).await;
    assert_eq!(within("the second confirm", second).await.unwrap(), 77);
    match within("the first confirm", first).await {
        Err(Error::Broker { code: ErrorCode::NotFound, message }) => {
            assert_eq!(message, "no queue named 'a'")
        }
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
    assert!(!conn.is_closed());
}

#[tokio::test]
async fn frames_over_the_negotiated_size_are_refused_before_sending() {
    let broker = Broker::start();
    let options = ConnectOptions { max_frame_size: 65_536, ..Default::default() };
    let conn = connect_with(&broker, options).await;
    assert_eq!(conn.max_frame_size(), 65_536);
    conn.declare_queue("small", QueueOptions::default()).await.unwrap();
    match conn.publish("small", vec![0u8; 100 * 1024], PublishOptions::default()).await {
        Err(err @ Error::FrameTooLarge { .. }) => assert_eq!(err.code(), Some(ErrorCode::FrameTooLarge)),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    // Nothing was sent, and the connection goes on.
    let id = conn.publish("small", vec![1u8; 1024], PublishOptions::default()).await.unwrap();
    let mut consumer = conn.consume("small", ConsumeOptions::default()).await.unwrap();
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!((delivery.message_id, delivery.body.len()), (id, 1024));
    assert_eq!(conn.queue_stats("small").await.unwrap().published_total, 1);
}
