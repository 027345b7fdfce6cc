//! Backpressure and operations against a scripted broker: flow control, broker status, peek,
//! moves, depth alarms and the event stream.

mod support;

use std::time::Duration;

use futures::StreamExt;
use hopper_client::{Error, EventKind, MoveOptions, MoveState, Overflow, PublishOptions, QueueOptions};
use hopper_proto::{pb, Body};
use support::{connect, Peer, PATIENCE};

fn flow(blocked: bool, reason: &str) -> Body {
    Body::FlowControl(pb::FlowControl { blocked, reason: reason.into() })
}

/// Answers one `QueueList`, so that everything the broker sent before has been read.
async fn sync(conn: &hopper_client::Connection, peer: &mut Peer) {
    let (list, ()) = tokio::join!(conn.list_queues(), async {
        let (id, body) = peer.recv_request().await;
        assert!(matches!(body, Body::QueueList(_)), "{body:?}");
        peer.send(id, Body::QueueListOk(pb::QueueListOk { queues: vec![] })).await;
    });
    list.unwrap();
}

#[tokio::test]
async fn bounded_queue_settings_reach_the_wire_and_come_back() {
    let (conn, mut peer) = connect().await;
    let options = QueueOptions {
        max_length: Some(7),
        max_bytes: Some(4096),
        overflow: Overflow::DropHead,
        ..Default::default()
    };
    let (info, ()) = tokio::join!(conn.declare_queue("q", options), async {
        let (id, body) = peer.recv_request().await;
        let Body::QueueDeclare(declare) = body else { panic!("{body:?}") };
        let settings = declare.settings.clone().unwrap();
        assert_eq!(
            (settings.max_length, settings.max_bytes, settings.overflow.as_str()),
            (7, 4096, "drop-head")
        );
        let queue = pb::QueueInfo {
            name: declare.name,
            settings: declare.settings,
            waiting_bytes: 10,
            alarm_depth: 5,
            ..Default::default()
        };
        peer.send(id, Body::QueueDeclareOk(pb::QueueDeclareOk { queue: Some(queue), created: true })).await;
    });
    let info = info.unwrap();
    assert_eq!((info.max_length, info.max_bytes, info.overflow), (Some(7), Some(4096), Overflow::DropHead));
    assert_eq!((info.waiting_bytes, info.alarm_depth, info.alarm), (10, Some(5), false));

    // A full queue refuses the publish through its confirm.
    let (confirm, ()) = tokio::join!(conn.publish("q", "x", PublishOptions::default()), async {
        let (id, _) = peer.recv_request().await;
        let error = pb::Error {
            code: pb::ErrorCode::ResourceLimit as i32,
            message: "queue 'q' is full (max_length 7)".into(),
            ..Default::default()
        };
        peer.send(id, Body::Error(error)).await;
    });
    let err = confirm.unwrap_err();
    assert_eq!(err.to_string(), "RESOURCE_LIMIT: queue 'q' is full (max_length 7)");
}

#[tokio::test]
async fn flow_control_is_tracked_and_publishes_wait_it_out() {
    let (conn, mut peer) = connect().await;
    let mut changes = conn.flow_changes();
    assert!(!conn.is_blocked());
    let confirm = conn.publish("q", "big", PublishOptions::default());
    let (id, body) = peer.recv_request().await;
    assert!(matches!(body, Body::Publish(_)), "{body:?}");

    peer.send(0, flow(true, "memory high watermark")).await;
    tokio::time::timeout(PATIENCE, changes.changed()).await.unwrap().unwrap();
    assert_eq!(changes.borrow_and_update().as_deref(), Some("memory high watermark"));
    assert!(conn.is_blocked());
    assert_eq!(conn.blocked_reason().as_deref(), Some("memory high watermark"));

    // The confirm is not failed by the block: it resolves when the broker answers.
    tokio::pin!(confirm);
    assert!(tokio::time::timeout(Duration::from_millis(50), &mut confirm).await.is_err());
    peer.send(0, flow(false, "")).await;
    tokio::time::timeout(PATIENCE, changes.changed()).await.unwrap().unwrap();
    assert_eq!(*changes.borrow_and_update(), None);
    assert!(!conn.is_blocked());
    peer.send(id, Body::PublishOk(pb::PublishOk { message_id: 9, routed: 1 })).await;
    assert_eq!(confirm.await.unwrap(), 9);

    // A block without a reason still says something.
    peer.send(0, flow(true, "")).await;
    sync(&conn, &mut peer).await;
    assert_eq!(conn.blocked_reason().as_deref(), Some("no reason given"));

    // A connection that ends is blocked no more.
    drop(peer);
    tokio::time::timeout(PATIENCE, changes.changed()).await.unwrap().unwrap();
    tokio::time::timeout(PATIENCE, async {
        while conn.is_blocked() {
            changes.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn status_peek_and_alarm() {
    let (conn, mut peer) = connect().await;
    let (status, ()) = tokio::join!(conn.status(), async {
        let (id, body) = peer.recv_request().await;
        assert!(matches!(body, Body::BrokerStatus(_)), "{body:?}");
        let status = pb::BrokerStatusOk {
            version: "0.1.0".into(),
            uptime_ms: 65_000,
            connections: 2,
            blocked: true,
            blocked_reason: "disk".into(),
            blocked_publishers: 1,
            memory_used: 10,
            memory_high_watermark: 100,
            disk_free: 5,
            disk_free_low_watermark: 50,
            storage_threads: 2,
            fsyncs: 7,
            open_segment_files: 1,
            storage_error: "log 0: fsync failed".into(),
        };
        peer.send(id, Body::BrokerStatusOk(status)).await;
    });
    let status = status.unwrap();
    assert_eq!((status.version.as_str(), status.uptime), ("0.1.0", Duration::from_secs(65)));
    assert_eq!((status.blocked.as_deref(), status.blocked_publishers), (Some("disk"), 1));
    assert_eq!((status.storage_threads, status.fsyncs), (2, 7));
    assert_eq!(status.storage_error.as_deref(), Some("log 0: fsync failed"));

    let (peeked, ()) = tokio::join!(conn.peek("q.dead", 2), async {
        let (id, body) = peer.recv_request().await;
        assert_eq!(body, Body::Peek(pb::Peek { queue: "q.dead".into(), count: 2 }));
        let message = |id: u64| pb::Message {
            message_id: id,
            body: "m".into(),
            replay_count: 1,
            deaths: vec![pb::Death { queue: "q".into(), reason: "expired".into(), ..Default::default() }],
            ..Default::default()
        };
        peer.send(id, Body::PeekOk(pb::PeekOk { messages: vec![message(1), message(2)] })).await;
    });
    let peeked = peeked.unwrap();
    assert_eq!(peeked.iter().map(|m| m.message_id).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(peeked[0].last_death().map(|d| d.reason.as_str()), Some("expired"));
    assert_eq!(peeked[1].replay_count, 1);

    for (depth, wire) in [(Some(5), 5), (None, 0)] {
        let (info, ()) = tokio::join!(conn.set_alarm("q", depth), async {
            let (id, body) = peer.recv_request().await;
            assert_eq!(body, Body::QueueSetAlarm(pb::QueueSetAlarm { name: "q".into(), depth: wire }));
            let info = pb::QueueInfo { name: "q".into(), alarm_depth: wire, ..Default::default() };
            peer.send(id, Body::QueueInfo(info)).await;
        });
        assert_eq!(info.unwrap().alarm_depth, depth);
    }
}

#[tokio::test]
async fn moves_are_started_listed_and_cancelled() {
    let (conn, mut peer) = connect().await;
    let running = pb::MoveInfo {
        id: 4,
        source: "q.dead".into(),
        rate: 50,
        state: "running".into(),
        remaining: 100,
        started_ms: 1000,
        ..Default::default()
    };
    let options = MoveOptions {
        source: "q.dead".into(),
        rate: Some(50),
        filter: Some(("reason".into(), "expired".into())),
        ..Default::default()
    };
    let (started, ()) = tokio::join!(conn.start_move(options), async {
        let (id, body) = peer.recv_request().await;
        let Body::MoveStart(start) = body else { panic!("{body:?}") };
        assert_eq!((start.source.as_str(), start.destination.as_str(), start.rate), ("q.dead", "", 50));
        assert_eq!((start.filter_key.as_str(), start.filter_value.as_str()), ("reason", "expired"));
        peer.send(id, Body::MoveInfo(running.clone())).await;
    });
    let started = started.unwrap();
    assert_eq!((started.id, started.state, started.destination), (4, MoveState::Running, None));

    let (moves, ()) = tokio::join!(conn.list_moves(), async {
        let (id, body) = peer.recv_request().await;
        assert!(matches!(body, Body::MoveList(_)), "{body:?}");
        let progressed = pb::MoveInfo { moved: 40, remaining: 60, ..running.clone() };
        peer.send(id, Body::MoveListOk(pb::MoveListOk { moves: vec![progressed] })).await;
    });
    let moves = moves.unwrap();
    assert_eq!((moves.len(), moves[0].moved, moves[0].expected_total()), (1, 40, 100));

    let (cancelled, ()) = tokio::join!(conn.cancel_move(4), async {
        let (id, body) = peer.recv_request().await;
        assert_eq!(body, Body::MoveCancel(pb::MoveCancel { id: 4 }));
        let ended = pb::MoveInfo { state: "cancelled".into(), finished_ms: 3000, ..running.clone() };
        peer.send(id, Body::MoveInfo(ended)).await;
    });
    let cancelled = cancelled.unwrap();
    assert_eq!((cancelled.state, cancelled.finished_ms), (MoveState::Cancelled, Some(3000)));

    let (unknown, ()) = tokio::join!(conn.cancel_move(99), async {
        let (id, _) = peer.recv_request().await;
        let error = pb::Error {
            code: pb::ErrorCode::NotFound as i32,
            message: "no move with id 99".into(),
            ..Default::default()
        };
        peer.send(id, Body::Error(error)).await;
    });
    assert_eq!(unknown.unwrap_err().code(), Some(hopper_client::ErrorCode::NotFound));
}

#[tokio::test]
async fn every_event_stream_sees_every_event_until_the_connection_is_lost() {
    let (conn, mut peer) = connect().await;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let (events, ()) = tokio::join!(conn.subscribe_events(), async {
            let (id, body) = peer.recv_request().await;
            assert!(matches!(body, Body::Subscribe(_)), "{body:?}");
            peer.send(id, Body::SubscribeOk(pb::SubscribeOk {})).await;
        });
        streams.push(events.unwrap());
    }
    let alarm =
        pb::Event { time_ms: 5, kind: "alarm_raised".into(), queue: "q".into(), value: 6, detail: "".into() };
    peer.send(0, Body::Event(alarm)).await;
    for events in &mut streams {
        let event = tokio::time::timeout(PATIENCE, events.next()).await.unwrap().unwrap().unwrap();
        assert_eq!((event.kind, event.queue.as_deref(), event.value), (EventKind::AlarmRaised, Some("q"), 6));
    }
    drop(streams.pop());
    let blocked =
        pb::Event { kind: "publishers_blocked".into(), detail: "memory".into(), ..Default::default() };
    peer.send(0, Body::Event(blocked)).await;
    let mut events = streams.pop().unwrap();
    let event = tokio::time::timeout(PATIENCE, events.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(
        (event.kind, event.queue, event.detail.as_str()),
        (EventKind::PublishersBlocked, None, "memory")
    );

    drop(peer);
    let end = tokio::time::timeout(PATIENCE, events.next()).await.unwrap();
    assert!(matches!(end, Some(Err(Error::Closed(_)))), "{end:?}");
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn event_stream_ends_quietly_when_the_client_closes() {
    let (conn, mut peer) = connect().await;
    let (events, ()) = tokio::join!(conn.subscribe_events(), async {
        let (id, _) = peer.recv_request().await;
        peer.send(id, Body::SubscribeOk(pb::SubscribeOk {})).await;
    });
    let mut events = events.unwrap();
    let (closed, ()) = tokio::join!(conn.close(), async {
        peer.expect_eof().await;
        drop(peer);
    });
    closed.unwrap();
    assert!(tokio::time::timeout(PATIENCE, events.next()).await.unwrap().is_none());
}
