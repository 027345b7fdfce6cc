//! The client against a scripted broker: each test plays the broker's side of the protocol
//! frame by frame, so ordering, error routing and connection loss can be checked exactly.

mod support;

use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use hopper_client::{
    ConnectOptions, Connection, ConsumeOptions, Error, ErrorCode, PublishOptions, QueueOptions,
};
use hopper_proto::{encode_frame, pb, Body, Frame, LENGTH_PREFIX};
use support::{connect, connect_with, consume, deliver, hello_ok};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn handshake_reports_negotiated_values() {
    let options = ConnectOptions { client_name: "tester".into(), ..Default::default() };
    let (conn, _peer) = connect_with(options, hello_ok(3000, 4096)).await;
    let conn = conn.unwrap();
    assert_eq!(conn.server_version(), "fake-0.1");
    assert_eq!(conn.heartbeat(), Duration::from_secs(3));
    assert_eq!(conn.max_frame_size(), 4096);
    assert!(!conn.is_closed());
}

#[tokio::test]
async fn rejected_handshake_names_the_supported_versions() {
    let rejected = Body::HelloRejected(pb::HelloRejected {
        message: "unsupported protocol version".into(),
        min_version: 7,
        max_version: 9,
        ..Default::default()
    });
    let (conn, _peer) = connect_with(ConnectOptions::default(), rejected).await;
    match conn {
        Err(Error::HandshakeRejected { min_version: 7, max_version: 9, .. }) => {}
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn pipelined_publishes_are_confirmed_out_of_order() {
    let (conn, mut peer) = connect().await;
    let confirms: Vec<_> =
        (0..3).map(|i| conn.publish("q", format!("m{i}"), PublishOptions::default())).collect();
    let mut requests = Vec::new();
    for i in 0..3 {
        let (id, body) = peer.recv_request().await;
        match body {
            Body::Publish(p) => assert_eq!(p.body, format!("m{i}").as_bytes()),
            other => panic!("expected a publish, got {other:?}"),
        }
        requests.push(id);
    }
    // Answer in reverse order; the message id tells which request each answer was for.
    for (i, id) in requests.iter().enumerate().rev() {
        peer.send(*id, Body::PublishOk(pb::PublishOk { message_id: 1000 + i as u64, routed: 1 })).await;
    }
    for (i, confirm) in confirms.into_iter().enumerate() {
        assert_eq!(confirm.await.unwrap(), 1000 + i as u64);
    }
}

#[tokio::test]
async fn broker_errors_reach_the_request_that_caused_them() {
    let (conn, mut peer) = connect().await;
    let (result, ()) = tokio::join!(conn.queue_stats("missing"), async {
        let (id, _) = peer.recv_request().await;
        peer.send(
            id,
            Body::Error(pb::Error {
                code: ErrorCode::NotFound as i32,
                message: "no queue named 'missing'".into(),
                ..Default::default()
            }),
        )
        .await;
    });
    let err = result.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert_eq!(err.to_string(), "NOT_FOUND: no queue named 'missing'");
}

#[tokio::test]
async fn declare_returns_the_queue_description() {
    let (conn, mut peer) = connect().await;
    let options = QueueOptions { durable: true, ..Default::default() };
    let (info, ()) = tokio::join!(conn.declare_queue("jobs", options), async {
        let (id, body) = peer.recv_request().await;
        let Body::QueueDeclare(declare) = body else { panic!("{body:?}") };
        assert!(!declare.passive);
        assert_eq!(declare.settings, Some(pb::QueueSettings { durable: true, ..Default::default() }));
        let queue =
            pb::QueueInfo { name: declare.name, settings: declare.settings, ready: 4, ..Default::default() };
        peer.send(id, Body::QueueDeclareOk(pb::QueueDeclareOk { queue: Some(queue), created: true })).await;
    });
    let info = info.unwrap();
    assert_eq!((info.name.as_str(), info.durable, info.ready), ("jobs", true, 4));
}

#[tokio::test]
async fn a_malformed_answer_fails_the_request_it_names() {
    let (conn, mut peer) = connect().await;
    let (result, ()) = tokio::join!(conn.queue_stats("q"), async {
        let (id, _) = peer.recv_request().await;
        // The request id (field 1), then a `QueueInfo` field declaring more bytes than follow.
        let mut frame = BytesMut::new();
        encode_frame(&Frame { request_id: id, body: None }, u32::MAX, &mut frame).unwrap();
        frame.extend_from_slice(&[0x9a, 0x01, 50, 1, 2]);
        let len = (frame.len() - LENGTH_PREFIX) as u32;
        frame[..LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
        peer.write.write_all(&frame).await.unwrap();
    });
    // Failed at once, not at the request timeout, and the connection goes on.
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Protocol(ref message) if message.contains("malformed")), "{err}");
    let (result, ()) = tokio::join!(conn.queue_stats("q"), async {
        let (id, _) = peer.recv_request().await;
        peer.send(id, Body::QueueInfo(pb::QueueInfo { name: "q".into(), ..Default::default() })).await;
    });
    assert_eq!(result.unwrap().name, "q");
}

#[tokio::test]
async fn oversize_publish_fails_locally_and_sends_nothing() {
    let options = ConnectOptions { heartbeat: Duration::ZERO, ..Default::default() };
    let (conn, mut peer) = connect_with(options, hello_ok(0, 1024)).await;
    let conn = conn.unwrap();
    let err = conn.publish("q", vec![0u8; 2000], PublishOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::FrameTooLarge { max: 1024, .. }), "{err}");
    assert_eq!(err.code(), Some(ErrorCode::FrameTooLarge));
    // The next thing on the wire is the next request, not the refused one.
    let confirm = conn.publish("q", "small", PublishOptions::default());
    let (id, body) = peer.recv_request().await;
    assert!(matches!(body, Body::Publish(ref p) if p.body == "small"), "{body:?}");
    peer.send(id, Body::PublishOk(pb::PublishOk { message_id: 1, routed: 1 })).await;
    assert_eq!(confirm.await.unwrap(), 1);
}

#[tokio::test]
async fn deliveries_are_settled_once() {
    let (conn, mut peer) = connect().await;
    let mut consumer = consume(&conn, &mut peer, 7).await;
    assert_eq!((consumer.id(), consumer.queue()), (7, "q"));
    for tag in 1..=3 {
        peer.send(0, deliver(7, tag, "hello")).await;
    }
    let first = consumer.next().await.unwrap().unwrap();
    let second = consumer.next().await.unwrap().unwrap();
    let third = consumer.next().await.unwrap().unwrap();
    assert_eq!((first.delivery_tag, first.message_id, &first.body[..]), (1, 101, &b"hello"[..]));
    assert_eq!(first.queue(), "q");

    second.ack_multiple().await.unwrap();
    let (ack_id, body) = peer.recv_request().await;
    assert_ne!(ack_id, 0, "settles carry a fresh request id");
    assert_eq!(body, Body::Ack(pb::Ack { consumer_id: 7, delivery_tag: 2, multiple: true, confirm: false }));
    assert!(matches!(first.ack().await, Err(Error::AlreadySettled { delivery_tag: 1 })));
    assert!(matches!(second.nack(true).await, Err(Error::AlreadySettled { delivery_tag: 2 })));

    third.reject().await.unwrap();
    assert!(matches!(third.ack().await, Err(Error::AlreadySettled { delivery_tag: 3 })));
    let (_, body) = peer.recv_request().await;
    assert_eq!(
        body,
        Body::Reject(pb::Reject {
            consumer_id: 7,
            delivery_tag: 3,
            requeue: false,
            confirm: false,
            error: String::new()
        })
    );

    // A refused settle has nobody waiting: it is logged, and the connection carries on.
    peer.send(
        ack_id,
        Body::Error(pb::Error {
            code: ErrorCode::NotFound as i32,
            message: "no tag".into(),
            ..Default::default()
        }),
    )
    .await;
    let (list, ()) = tokio::join!(conn.list_queues(), async {
        let (id, _) = peer.recv_request().await;
        peer.send(id, Body::QueueListOk(pb::QueueListOk { queues: vec![] })).await;
    });
    assert!(list.unwrap().is_empty());
}

#[tokio::test]
async fn broker_cancel_ends_the_stream_with_one_error() {
    let (conn, mut peer) = connect().await;
    let mut consumer = consume(&conn, &mut peer, 3).await;
    peer.send(0, deliver(3, 1, "last")).await;
    let reason = "queue 'q' was deleted";
    peer.send(0, Body::ConsumerCancelled(pb::ConsumerCancelled { consumer_id: 3, reason: reason.into() }))
        .await;
    let delivery = consumer.next().await.unwrap().unwrap();
    assert!(matches!(consumer.next().await, Some(Err(Error::ConsumerCancelled(r))) if r == reason));
    assert!(consumer.next().await.is_none());
    assert!(matches!(delivery.ack().await, Err(Error::ConsumerCancelled(_))));
    assert_eq!(consumer.cancel().await.unwrap(), 0, "nothing left to cancel");
}

#[tokio::test]
async fn cancel_returns_the_requeued_count() {
    let (conn, mut peer) = connect().await;
    let consumer = consume(&conn, &mut peer, 5).await;
    let (requeued, ()) = tokio::join!(consumer.cancel(), async {
        let (id, body) = peer.recv_request().await;
        assert_eq!(body, Body::Cancel(pb::Cancel { consumer_id: 5 }));
        peer.send(id, Body::CancelOk(pb::CancelOk { requeued: 2 })).await;
    });
    assert_eq!(requeued.unwrap(), 2);
}

#[tokio::test]
async fn dropping_a_consumer_cancels_it() {
    let (conn, mut peer) = connect().await;
    let consumer = consume(&conn, &mut peer, 9).await;
    drop(consumer);
    let (id, body) = peer.recv_request().await;
    assert_eq!(body, Body::Cancel(pb::Cancel { consumer_id: 9 }));
    peer.send(id, Body::CancelOk(pb::CancelOk { requeued: 0 })).await;
}

#[tokio::test]
async fn lost_connection_fails_requests_and_consumers() {
    let (conn, mut peer) = connect().await;
    let mut consumer = consume(&conn, &mut peer, 1).await;
    let confirm = conn.publish("q", "x", PublishOptions::default());
    let _ = peer.recv_request().await;
    drop(peer);
    assert!(matches!(confirm.await, Err(Error::Closed(_))));
    assert!(matches!(consumer.next().await, Some(Err(Error::Closed(_)))));
    assert!(consumer.next().await.is_none());
    assert!(conn.is_closed());
    assert!(matches!(conn.list_queues().await, Err(Error::Closed(_))));
    assert!(matches!(conn.publish("q", "y", PublishOptions::default()).await, Err(Error::Closed(_))));
}

#[tokio::test]
async fn broker_close_event_explains_the_closure() {
    let (conn, mut peer) = connect().await;
    let pending = conn.purge_queue("q");
    let (result, ()) = tokio::join!(pending, async {
        let _ = peer.recv_request().await;
        peer.send(0, Body::Close(pb::Close { code: 0, reason: "broker shutting down".into() })).await;
    });
    match result {
        Err(Error::Closed(reason)) => assert!(reason.contains("broker shutting down"), "{reason}"),
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[tokio::test]
async fn silent_broker_is_declared_dead() {
    let options = ConnectOptions { heartbeat: Duration::from_millis(100), ..Default::default() };
    let (conn, mut peer) = connect_with(options, hello_ok(100, 1 << 20)).await;
    let conn = conn.unwrap();
    let stats = conn.queue_stats("q");
    let (result, ()) = tokio::join!(stats, async {
        // The client keeps sending heartbeats while it waits.
        let _ = peer.recv_request().await;
        let heartbeat = peer.recv().await;
        assert!(matches!(heartbeat.body, Some(Body::Heartbeat(_))), "{heartbeat:?}");
        assert_eq!(heartbeat.request_id, 0);
    });
    match result {
        Err(Error::Closed(reason)) => assert!(reason.contains("heartbeat"), "{reason}"),
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[tokio::test]
async fn close_flushes_sends_close_and_ends_consumers_quietly() {
    let (conn, mut peer) = connect().await;
    let mut consumer = consume(&conn, &mut peer, 2).await;
    let confirm = conn.publish("q", "before close", PublishOptions::default());
    let (closed, ()) = tokio::join!(conn.close(), async {
        let (id, body) = peer.recv_request().await;
        assert!(matches!(body, Body::Publish(_)), "{body:?}");
        let (_, body) = peer.recv_request().await;
        assert!(matches!(body, Body::Close(_)), "{body:?}");
        // Requests in flight are still answered before the broker hangs up.
        peer.send(id, Body::PublishOk(pb::PublishOk { message_id: 42, routed: 1 })).await;
        peer.expect_eof().await;
        drop(peer);
    });
    closed.unwrap();
    assert_eq!(confirm.await.unwrap(), 42);
    assert!(consumer.next().await.is_none(), "a client close ends streams without an error");
    assert!(matches!(conn.list_queues().await, Err(Error::Closed(_))));
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection() {
    let (conn, mut peer) = connect().await;
    drop(conn);
    let (_, body) = peer.recv_request().await;
    assert!(matches!(body, Body::Close(_)), "{body:?}");
    peer.expect_eof().await;
}

#[tokio::test]
async fn a_consumer_keeps_its_connection_open() {
    let (conn, mut peer) = connect().await;
    let mut consumer = consume(&conn, &mut peer, 4).await;
    drop(conn);
    peer.send(0, deliver(4, 1, "still here")).await;
    let delivery = consumer.next().await.unwrap().unwrap();
    delivery.ack().await.unwrap();
    let (_, body) = peer.recv_request().await;
    assert_eq!(body, Body::Ack(pb::Ack { consumer_id: 4, delivery_tag: 1, multiple: false, confirm: false }));
}

#[tokio::test]
async fn abandoned_consume_is_cancelled_once_answered() {
    let (conn, mut peer) = connect().await;
    let consume = conn.consume("q", ConsumeOptions::default());
    // Give up on the consume right after it was sent, before the broker answers.
    assert!(tokio::time::timeout(Duration::from_millis(10), consume).await.is_err());
    let (id, body) = peer.recv_request().await;
    assert!(matches!(body, Body::Consume(_)), "{body:?}");
    peer.send(id, Body::ConsumeOk(pb::ConsumeOk { consumer_id: 11 })).await;
    let (_, body) = peer.recv_request().await;
    assert_eq!(body, Body::Cancel(pb::Cancel { consumer_id: 11 }));
}

#[test]
fn handles_can_move_between_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send_unpin<T: Send + Unpin>() {}
    assert_send_sync::<Connection>();
    assert_send_sync::<hopper_client::Delivery>();
    assert_send_unpin::<hopper_client::Consumer>();
    assert_send_unpin::<hopper_client::PublishConfirm>();
}
