//! Publishing with confirms and consuming: ids, message properties, order, and round-robin
//! between consumers.

use std::collections::{HashMap, HashSet};

use bytes::BytesMut;
use futures::{FutureExt, StreamExt};
use hopper_client::{ConsumeOptions, Error, ErrorCode, PublishOptions, QueueOptions};
use hopper_proto::{encode_frame, pb, Body, Frame};
use hopper_tests::{
    body_text, connect, next_deliveries, next_delivery, publish_all, stats_eventually, Broker, RawConn,
};

#[tokio::test]
async fn pipelined_publishes_are_all_confirmed_with_distinct_ids() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("confirms", QueueOptions::default()).await.unwrap();
    // All 1,000 are sent before the first confirm is awaited.
    let ids = publish_all(&conn, "confirms", (0..1000).map(|i| format!("m{i}"))).await;
    let distinct: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 1000, "every message has its own id");
    let info = stats_eventually(&conn, "confirms", |info| info.ready == 1000).await;
    assert_eq!(info.published_total, 1000);

    // The queue holds them in publish order, under the confirmed ids.
    let mut consumer =
        conn.consume("confirms", ConsumeOptions { prefetch: 1000, ..Default::default() }).await.unwrap();
    let deliveries = next_deliveries(&mut consumer, 1000).await;
    for (i, delivery) in deliveries.iter().enumerate() {
        assert_eq!(delivery.message_id, ids[i]);
        assert_eq!(body_text(delivery), format!("m{i}"));
    }
}

#[tokio::test]
async fn every_request_of_a_long_pipelined_burst_is_answered_in_order() {
    let broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let declare = pb::QueueDeclare { name: "burst".into(), settings: None, passive: false };
    assert!(matches!(raw.call(Body::QueueDeclare(declare)).await, Body::QueueDeclareOk(_)));

    // A thousand publishes in one write: the broker reads them in bursts and answers each.
    let mut wire = BytesMut::new();
    let ids: Vec<u64> = (0..1000).map(|_| raw.next_request_id()).collect();
    for (i, &request_id) in ids.iter().enumerate() {
        let publish =
            pb::Publish { queue: "burst".into(), body: format!("m{i}").into(), ..Default::default() };
        encode_frame(&Frame::new(request_id, Body::Publish(publish)), u32::MAX, &mut wire).expect("encode");
    }
    raw.send_bytes(&wire).await;
    for &request_id in &ids {
        assert!(matches!(raw.response(request_id).await, Body::PublishOk(_)));
    }
    let stats = pb::QueueStats { name: "burst".into() };
    let Body::QueueInfo(info) = raw.call(Body::QueueStats(stats)).await else { panic!("no queue info") };
    assert_eq!(info.ready, 1000);
}

#[tokio::test]
async fn publishes_from_many_tasks_share_one_connection() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("shared", QueueOptions::default()).await.unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|task| {
            let conn = conn.clone();
            tokio::spawn(async move {
                publish_all(&conn, "shared", (0..250).map(move |i| format!("{task}-{i}"))).await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for task in tasks {
        ids.extend(task.await.expect("publisher task"));
    }
    assert_eq!(ids.len(), 1000);
    stats_eventually(&conn, "shared", |info| info.ready == 1000).await;
}

#[tokio::test]
async fn publish_to_an_unknown_queue_is_not_found() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    match conn.publish("nowhere", "lost", PublishOptions::default()).await {
        Err(Error::Broker { code: ErrorCode::NotFound, message }) => {
            assert!(message.contains("nowhere"), "the error names the queue: {message}")
        }
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
    // A refused publish does not harm the connection.
    conn.declare_queue("somewhere", QueueOptions::default()).await.unwrap();
    conn.publish("somewhere", "kept", PublishOptions::default()).await.unwrap();
    match conn.queue_exists("nowhere").await {
        Err(err) => assert_eq!(err.code(), Some(ErrorCode::NotFound)),
        Ok(info) => panic!("the failed publish created a queue: {info:?}"),
    }
}

#[tokio::test]
async fn consuming_from_an_unknown_queue_is_not_found() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    match conn.consume("nowhere", ConsumeOptions::default()).await {
        Err(err) => assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}"),
        Ok(consumer) => panic!("consumed from a missing queue: {consumer:?}"),
    }
    assert!(!conn.is_closed());
}

#[tokio::test]
async fn message_properties_arrive_unchanged() {
    let broker = Broker::start();
    let publisher = connect(&broker).await;
    let consumer_conn = connect(&broker).await;
    publisher.declare_queue("props", QueueOptions::default()).await.unwrap();
    let headers: HashMap<String, String> = [("trace-id", "abc-123"), ("unicode", "grüße ✓"), ("empty", "")]
        .map(|(k, v)| (k.into(), v.into()))
        .into();
    let options = PublishOptions {
        headers: headers.clone(),
        content_type: "application/json".into(),
        ..Default::default()
    };
    let before = now_ms();
    let id = publisher.publish("props", r#"{"n":1}"#, options).await.unwrap();
    let binary =
        publisher.publish("props", vec![0u8, 255, 10, 13, 0], PublishOptions::default()).await.unwrap();
    let empty = publisher.publish("props", "", PublishOptions::default()).await.unwrap();
    let after = now_ms();

    let mut consumer =
        consumer_conn.consume("props", ConsumeOptions { prefetch: 10, ..Default::default() }).await.unwrap();
    let first = next_delivery(&mut consumer).await;
    assert_eq!(first.message_id, id);
    assert_eq!(&first.body[..], br#"{"n":1}"#);
    assert_eq!(first.headers, headers);
    assert_eq!(first.content_type, "application/json");
    assert!((before..=after).contains(&first.published_at_ms), "published_at_ms {}", first.published_at_ms);
    assert_eq!((first.delivery_count, first.redelivered), (1, false));
    assert_eq!(first.queue(), "props");
    assert_eq!(first.consumer_id, consumer.id());

    let second = next_delivery(&mut consumer).await;
    assert_eq!((second.message_id, &second.body[..]), (binary, &[0u8, 255, 10, 13, 0][..]));
    assert!(second.headers.is_empty() && second.content_type.is_empty());
    let third = next_delivery(&mut consumer).await;
    assert_eq!((third.message_id, third.body.len()), (empty, 0));
    assert!(first.delivery_tag < second.delivery_tag && second.delivery_tag < third.delivery_tag);
}

#[tokio::test]
async fn large_bodies_round_trip() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("large", QueueOptions::default()).await.unwrap();
    let body: Vec<u8> = (0..4 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let id = conn.publish("large", body.clone(), PublishOptions::default()).await.unwrap();
    let mut consumer =
        conn.consume("large", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.message_id, id);
    assert!(delivery.body[..] == body[..], "the 4 MiB body arrived intact");
}

#[tokio::test]
async fn three_consumers_share_a_queue_round_robin() {
    let broker = Broker::start();
    let publisher = connect(&broker).await;
    publisher.declare_queue("work", QueueOptions::default()).await.unwrap();
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let conn = connect(&broker).await;
        let consumer =
            conn.consume("work", ConsumeOptions { prefetch: 1000, ..Default::default() }).await.unwrap();
        consumers.push((conn, consumer));
    }
    publish_all(&publisher, "work", (0..30).map(|i| i.to_string())).await;

    let mut seen = HashSet::new();
    let mut residues = HashSet::new();
    for (_, consumer) in &mut consumers {
        let got: Vec<usize> =
            next_deliveries(consumer, 10).await.iter().map(|d| body_text(d).parse().unwrap()).collect();
        // Interleaved: each consumer gets every third message.
        let first = got[0];
        assert!(first < 3, "each consumer starts with one of the first three messages: {got:?}");
        assert_eq!(got, (0..10).map(|k| first + 3 * k).collect::<Vec<_>>(), "consumer got {got:?}");
        residues.insert(first);
        seen.extend(got);
        assert!(consumer.next().now_or_never().is_none(), "no consumer gets more than its share");
    }
    assert_eq!(residues.len(), 3, "the three consumers got different thirds");
    assert_eq!(seen.len(), 30);
    let info = stats_eventually(&publisher, "work", |info| info.unacked == 30).await;
    assert_eq!((info.ready, info.consumers), (0, 3));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
