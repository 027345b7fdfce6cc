//! Durable queues across restarts of the real broker: what a clean restart (SIGTERM) keeps,
//! what a crash (SIGKILL) keeps under each fsync policy, and how recovered messages are
//! flagged.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hopper_client::{
    ConsumeOptions, DeleteOptions, Delivery, Error, ErrorCode, PublishOptions, QueueOptions,
};
use hopper_tests::{
    clean_marker_present, connect, next_deliveries, next_delivery, publish_all, receive_backlog,
    stats_eventually, Broker,
};

fn durable() -> QueueOptions {
    QueueOptions { durable: true, ..Default::default() }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis() as u64
}

/// Messages with every kind of property: empty and binary bodies, a body far larger than a
/// socket read, no headers and many, content types, non-ASCII text.
fn assorted_messages() -> Vec<(Bytes, PublishOptions)> {
    let headers = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let mut messages = vec![
        (Bytes::from_static(b"plain"), PublishOptions::default()),
        (
            Bytes::from_static(br#"{"order":17}"#),
            PublishOptions {
                headers: headers(&[("trace", "abc-123"), ("greeting", "h\u{e9}llo \u{2713}")]),
                content_type: "application/json".into(),
                ..Default::default()
            },
        ),
        (Bytes::new(), PublishOptions { headers: headers(&[("empty-body", "yes")]), ..Default::default() }),
        (
            Bytes::from((0..=255u8).collect::<Vec<u8>>()),
            PublishOptions { content_type: "application/octet-stream".into(), ..Default::default() },
        ),
        (Bytes::from(vec![b'x'; 300 * 1024]), PublishOptions::default()),
    ];
    let many: HashMap<String, String> = (0..40).map(|i| (format!("h{i}"), "v".repeat(i))).collect();
    messages
        .push((Bytes::from_static(b"many headers"), PublishOptions { headers: many, ..Default::default() }));
    messages.extend((0..50).map(|i| (Bytes::from(format!("numbered {i}")), PublishOptions::default())));
    messages
}

#[tokio::test]
async fn a_clean_restart_keeps_durable_queues_and_their_messages() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("orders", durable()).await.unwrap();
    conn.declare_queue("scratch", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "scratch", ["transient"]).await;
    let sent = assorted_messages();
    let published_from = now_ms();
    let confirms: Vec<_> =
        sent.iter().map(|(body, options)| conn.publish("orders", body.clone(), options.clone())).collect();
    let ids: Vec<u64> =
        futures::future::join_all(confirms).await.into_iter().map(|r| r.expect("confirmed")).collect();
    let published_until = now_ms();

    let status = broker.terminate();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", broker.stderr());
    assert!(clean_marker_present(broker.data_dir()), "a clean shutdown leaves its marker");
    broker.restart();
    assert!(!clean_marker_present(broker.data_dir()), "the marker is consumed at start");

    let conn = connect(&broker).await;
    let names: Vec<String> = conn.list_queues().await.unwrap().into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["orders"], "the transient queue is gone");
    match conn.queue_exists("scratch").await {
        Err(Error::Broker { code: ErrorCode::NotFound, .. }) => {}
        other => panic!("expected NOT_FOUND for the transient queue, got {other:?}"),
    }
    let info = conn.queue_exists("orders").await.unwrap();
    assert!(info.durable, "{info:?}");
    assert_eq!((info.ready, info.unacked), (sent.len() as u64, 0), "{info:?}");
    match conn.declare_queue("orders", QueueOptions { durable: false, ..Default::default() }).await {
        Err(Error::Broker { code: ErrorCode::PreconditionFailed, .. }) => {}
        other => panic!("redeclaring with other settings must fail, got {other:?}"),
    }
    let again = conn.declare_queue("orders", durable()).await.unwrap();
    assert_eq!(again.ready, sent.len() as u64);

    let (_consumer, deliveries) = receive_backlog(&conn, "orders").await;
    assert_eq!(deliveries.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids, "same ids, same order");
    for (delivery, (body, options)) in deliveries.iter().zip(&sent) {
        assert_eq!(delivery.body, body, "body of {}", delivery.message_id);
        assert_eq!(delivery.headers, options.headers, "headers of {}", delivery.message_id);
        assert_eq!(delivery.content_type, options.content_type, "content type of {}", delivery.message_id);
        assert!(
            (published_from..=published_until).contains(&delivery.published_at_ms),
            "published_at_ms of {} is {}, outside {published_from}..={published_until}",
            delivery.message_id,
            delivery.published_at_ms
        );
        assert_eq!((delivery.redelivered, delivery.delivery_count), (false, 1), "{delivery:?}");
    }
}

/// Delivery counts are recorded on disk: after a clean restart they are exact, and so is the
/// redelivered flag. Acked messages stay gone.
#[tokio::test]
async fn a_clean_restart_keeps_delivery_counts_exact() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("q", durable()).await.unwrap();
    let ids = publish_all(&conn, "q", (0..10).map(|i| format!("m{i}"))).await;

    let mut consumer = conn.consume("q", ConsumeOptions { prefetch: 5, ..Default::default() }).await.unwrap();
    let first = next_deliveries(&mut consumer, 5).await;
    assert_eq!(first.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids[..5]);
    // m1 goes back and, its slot free again, straight back to this consumer: twice delivered.
    first[1].nack(true).await.unwrap();
    let m1 = next_delivery(&mut consumer).await;
    assert_eq!((m1.message_id, m1.delivery_count, m1.redelivered), (ids[1], 2, true));
    // Acking two frees two slots: m5 and m6 follow.
    first[0].ack().await.unwrap();
    first[3].ack().await.unwrap();
    let more = next_deliveries(&mut consumer, 2).await;
    assert_eq!(more.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids[5..7]);
    // Acks have no response; the statistics show when the broker has taken them.
    let info = stats_eventually(&conn, "q", |info| info.acked_total == 2).await;
    assert_eq!((info.unacked, info.ready), (5, 3), "{info:?}");

    // The consumer still holds m1 (twice delivered), m2, m4, m5, m6 when the broker stops.
    assert_eq!(broker.terminate().code(), Some(0), "stderr:\n{}", broker.stderr());
    broker.restart();
    let conn = connect(&broker).await;
    let (_consumer, after) = receive_backlog(&conn, "q").await;
    let seen: Vec<(u64, u32, bool)> =
        after.iter().map(|d| (d.message_id, d.delivery_count, d.redelivered)).collect();
    let expected = vec![
        (ids[1], 3, true),
        (ids[2], 2, true),
        (ids[4], 2, true),
        (ids[5], 2, true),
        (ids[6], 2, true),
        (ids[7], 1, false),
        (ids[8], 1, false),
        (ids[9], 1, false),
    ];
    assert_eq!(seen, expected, "(id, delivery_count, redelivered) after the restart");
    let bodies: Vec<String> = after.iter().map(|d| String::from_utf8_lossy(&d.body).into_owned()).collect();
    assert_eq!(bodies, ["m1", "m2", "m4", "m5", "m6", "m7", "m8", "m9"]);
}

/// After a crash the broker cannot know whether its last deliveries were recorded, so every
/// recovered message says it may have been delivered before; its count is what was recorded.
#[tokio::test]
async fn after_a_crash_every_recovered_message_is_flagged_redelivered() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("q", durable()).await.unwrap();
    let ids = publish_all(&conn, "q", ["a", "b", "c"]).await;
    let mut consumer = conn.consume("q", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let held = next_delivery(&mut consumer).await;
    assert_eq!(held.message_id, ids[0]);
    // A second request on the connection proves the broker has put the delivery in its log
    // buffer; under the default policy the log is written within moments, but nothing here
    // waits for that, so the recorded count may be 0 or 1.
    stats_eventually(&conn, "q", |info| info.unacked == 1).await;

    broker.kill();
    assert!(!clean_marker_present(broker.data_dir()));
    broker.restart();
    let conn = connect(&broker).await;
    let (_consumer, after) = receive_backlog(&conn, "q").await;
    assert_eq!(after.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids);
    assert!(after.iter().all(|d| d.redelivered), "all flagged after a crash: {after:?}");
    assert!((1..=2).contains(&after[0].delivery_count), "{:?}", after[0]);
    assert_eq!(after[1].delivery_count, 1);
    assert_eq!(after[2].delivery_count, 1);
}

#[tokio::test]
async fn a_deleted_durable_queue_stays_deleted() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("doomed", durable()).await.unwrap();
    conn.declare_queue("kept", durable()).await.unwrap();
    publish_all(&conn, "doomed", ["x", "y"]).await;
    assert_eq!(conn.delete_queue("doomed", DeleteOptions::default()).await.unwrap(), 2);
    broker.kill();
    broker.restart();
    let conn = connect(&broker).await;
    let names: Vec<String> = conn.list_queues().await.unwrap().into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["kept"]);
    // A new queue of the same name starts empty.
    let info = conn.declare_queue("doomed", durable()).await.unwrap();
    assert_eq!(info.ready, 0, "{info:?}");
}

/// Every way a message leaves a durable queue for good is recorded: ack, reject, nack without
/// requeue, purge.
#[tokio::test]
async fn rejects_dropping_nacks_and_purges_are_recorded() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("q", durable()).await.unwrap();
    publish_all(&conn, "q", (0..6).map(|i| format!("m{i}"))).await;
    let options = ConsumeOptions { prefetch: 2, confirm_settlements: true, ..Default::default() };
    let mut consumer = conn.consume("q", options).await.unwrap();
    let d = next_deliveries(&mut consumer, 2).await;
    d[0].reject().await.unwrap();
    d[1].nack(false).await.unwrap();
    let d = next_deliveries(&mut consumer, 2).await;
    assert_eq!((&d[0].body[..], &d[1].body[..]), (&b"m2"[..], &b"m3"[..]));
    // The ack frees a slot, which m4 takes.
    d[1].ack().await.unwrap();
    assert_eq!(consumer.cancel().await.unwrap(), 2, "m2 and m4 go back");
    assert_eq!(conn.purge_queue("q").await.unwrap(), 3, "m2, m4 and m5 are purged");
    let last = conn.publish("q", "m6", PublishOptions::default()).await.unwrap();

    assert_eq!(broker.terminate().code(), Some(0));
    broker.restart();
    let conn = connect(&broker).await;
    let (_consumer, after) = receive_backlog(&conn, "q").await;
    let seen: Vec<(u64, &[u8], bool)> =
        after.iter().map(|d| (d.message_id, &d.body[..], d.redelivered)).collect();
    assert_eq!(seen, [(last, &b"m6"[..], false)]);
}

/// Under `fsync = batch` (with an interval far longer than the test) and `never`, a confirm
/// only means the OS has the data. The page cache outlives a killed process, so a confirmed
/// message is never lost to `kill -9`.
async fn confirmed_messages_survive_a_kill(flags: &[&str]) {
    let mut broker = Broker::start_with(flags);
    let conn = connect(&broker).await;
    conn.declare_queue("q", durable()).await.unwrap();
    let ids = publish_all(&conn, "q", (0..500).map(|i| format!("m{i}"))).await;
    broker.kill();
    broker.restart();
    let conn = connect(&broker).await;
    let (_consumer, after) = receive_backlog(&conn, "q").await;
    assert_eq!(after.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids, "{flags:?}");
    for (i, delivery) in after.iter().enumerate() {
        assert_eq!(delivery.body, format!("m{i}"), "{flags:?}");
        assert!(delivery.redelivered, "{flags:?}: {delivery:?}");
    }
}

#[tokio::test]
async fn fsync_never_loses_nothing_confirmed_to_a_process_crash() {
    confirmed_messages_survive_a_kill(&["--fsync", "never"]).await;
}

#[tokio::test]
async fn fsync_batch_loses_nothing_confirmed_to_a_process_crash() {
    confirmed_messages_survive_a_kill(&["--fsync", "batch", "--fsync-interval-ms", "3600000"]).await;
}

/// A held delivery's body comes from disk after a restart too, even when the queue keeps no
/// bodies in memory at all.
#[tokio::test]
async fn bodies_are_read_back_from_disk_beyond_the_memory_budget() {
    let mut broker = Broker::start_with(&["--queue-memory-bytes", "0"]);
    let conn = connect(&broker).await;
    conn.declare_queue("q", durable()).await.unwrap();
    let bodies: Vec<String> = (0..200).map(|i| format!("{i}:{}", "b".repeat(i * 7))).collect();
    let ids = publish_all(&conn, "q", bodies.clone()).await;
    let (consumer, before) = receive_backlog(&conn, "q").await;
    assert_eq!(before.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids);
    assert!(before.iter().zip(&bodies).all(|(d, b)| d.body == b.as_bytes()));
    assert_eq!(consumer.cancel().await.unwrap(), 200);

    assert_eq!(broker.terminate().code(), Some(0));
    broker.restart();
    let conn = connect(&broker).await;
    let (_consumer, after) = receive_backlog(&conn, "q").await;
    let seen: Vec<(u64, &[u8], u32)> =
        after.iter().map(|d| (d.message_id, &d.body[..], d.delivery_count)).collect();
    let expected: Vec<(u64, &[u8], u32)> =
        ids.iter().zip(&bodies).map(|(&id, body)| (id, body.as_bytes(), 2)).collect();
    assert_eq!(seen, expected);
}

/// Deliveries from a queue recovered after a restart keep flowing to a consumer that acks them,
/// and the acks are recorded: a second restart brings none of them back.
#[tokio::test]
async fn acks_after_a_restart_are_recorded_too() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("q", durable()).await.unwrap();
    let ids = publish_all(&conn, "q", (0..20).map(|i| i.to_string())).await;
    assert_eq!(broker.terminate().code(), Some(0));
    broker.restart();

    let conn = connect(&broker).await;
    let mut consumer = conn.consume("q", ConsumeOptions { prefetch: 4, ..Default::default() }).await.unwrap();
    let mut acked: Vec<Delivery> = Vec::new();
    for _ in 0..15 {
        let delivery = next_delivery(&mut consumer).await;
        delivery.ack().await.unwrap();
        acked.push(delivery);
    }
    assert_eq!(acked.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids[..15]);
    stats_eventually(&conn, "q", |info| info.acked_total == 15).await;
    drop(consumer);
    assert_eq!(broker.terminate().code(), Some(0));
    broker.restart();

    let conn = connect(&broker).await;
    let (_consumer, rest) = receive_backlog(&conn, "q").await;
    assert_eq!(rest.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids[15..]);
}
