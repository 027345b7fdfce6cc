//! Disk space follows the live backlog: segments whose messages are all settled are deleted,
//! and a few old messages that stay unacked do not pin the segments behind them (compaction).
//! Segments belong to a log that several queues may share: one is deleted only once no queue
//! has a live message in it.

use std::path::Path;
use std::time::Duration;

use hopper_client::{Connection, ConsumeOptions, Consumer, QueueOptions};
use hopper_tests::{
    connect, eventually, log_dir, next_deliveries, next_delivery, publish_all, receive_backlog,
    segment_files, stats_eventually, Broker,
};

/// Small segments, so a few hundred messages span many of them.
const SEGMENT_BYTES: &str = "4096";

fn durable() -> QueueOptions {
    QueueOptions { durable: true, ..Default::default() }
}

fn body(i: usize) -> String {
    format!("message {i} {}", "=".repeat(100))
}

/// Segment files in the log of `queue` (alone in it in the tests that count them).
fn segment_count(data_dir: &Path, queue: &str) -> usize {
    segment_files(&log_dir(data_dir, queue)).len()
}

/// A consumer whose acks return once the broker has written them, so the files can be
/// inspected right after.
async fn acking_consumer(conn: &Connection, queue: &str) -> Consumer {
    let options = ConsumeOptions { prefetch: 50, confirm_settlements: true, ..Default::default() };
    conn.consume(queue, options).await.unwrap()
}

/// Publishes `count` messages in groups of ten: a segment is closed between writes, and one
/// large batch would land in one segment however large.
async fn publish_in_groups(conn: &Connection, queue: &str, from: usize, count: usize) -> Vec<u64> {
    let mut ids = Vec::with_capacity(count);
    for start in (from..from + count).step_by(10) {
        ids.extend(publish_all(conn, queue, (start..(start + 10).min(from + count)).map(body)).await);
    }
    ids
}

#[tokio::test]
async fn draining_a_queue_deletes_its_settled_segments() {
    let mut broker = Broker::start_with(&["--segment-bytes", SEGMENT_BYTES]);
    let conn = connect(&broker).await;
    conn.declare_queue("q", durable()).await.unwrap();
    let ids = publish_in_groups(&conn, "q", 0, 300).await;
    let before = segment_count(broker.data_dir(), "q");
    assert!(before >= 5, "300 messages span several segments: {before}");

    let mut consumer = acking_consumer(&conn, "q").await;
    for expected in &ids {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(delivery.message_id, *expected);
        delivery.ack().await.unwrap();
    }
    let data_dir = broker.data_dir().to_path_buf();
    eventually("the settled segments to be deleted", Duration::from_secs(10), || {
        let data_dir = data_dir.clone();
        async move { segment_count(&data_dir, "q") == 1 }
    })
    .await;

    drop(consumer);
    assert_eq!(broker.terminate().code(), Some(0));
    broker.restart();
    assert_eq!(segment_count(broker.data_dir(), "q"), 1);
    let conn = connect(&broker).await;
    let info = conn.queue_stats("q").await.unwrap();
    assert_eq!((info.ready, info.unacked), (0, 0), "{info:?}");
    let id = conn.publish("q", "after", Default::default()).await.unwrap();
    let (_consumer, after) = receive_backlog(&conn, "q").await;
    assert_eq!(after.iter().map(|d| d.message_id).collect::<Vec<_>>(), [id]);
}

/// One message held unacked from the start pins the oldest segment; compaction copies it
/// forward so the settled segments behind it can go. After a restart it is there, once.
#[tokio::test]
async fn a_message_held_unacked_does_not_pin_old_segments() {
    let mut broker = Broker::start_with(&["--segment-bytes", SEGMENT_BYTES]);
    let conn = connect(&broker).await;
    conn.declare_queue("q", durable()).await.unwrap();
    let pinned = conn.publish("q", "pinned", Default::default()).await.unwrap();
    let holder = connect(&broker).await;
    let mut holding =
        holder.consume("q", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let held = next_delivery(&mut holding).await;
    assert_eq!(held.message_id, pinned);

    let mut consumer = acking_consumer(&conn, "q").await;
    let mut most = 0;
    for group in 0..60 {
        publish_in_groups(&conn, "q", group * 10, 10).await;
        for delivery in next_deliveries(&mut consumer, 10).await {
            delivery.ack().await.unwrap();
        }
        most = most.max(segment_count(broker.data_dir(), "q"));
    }
    // Without compaction the 600 acked messages would keep some twenty segments alive.
    assert!(most <= 4, "at most {most} segments while a message stayed unacked");
    let data_dir = broker.data_dir().to_path_buf();
    eventually("the segments behind the held message to go", Duration::from_secs(10), || {
        let data_dir = data_dir.clone();
        async move { segment_count(&data_dir, "q") <= 2 }
    })
    .await;
    let info = stats_eventually(&conn, "q", |info| info.acked_total == 600).await;
    assert_eq!((info.ready, info.unacked), (0, 1), "{info:?}");

    // Cancelled before the shutdown requeues the held message, so it cannot go to this one.
    assert_eq!(consumer.cancel().await.unwrap(), 0);
    assert_eq!(broker.terminate().code(), Some(0));
    broker.restart();
    let conn = connect(&broker).await;
    let (_consumer, after) = receive_backlog(&conn, "q").await;
    assert_eq!(after.len(), 1, "only the held message is left: {after:?}");
    assert_eq!((after[0].message_id, &after[0].body[..]), (pinned, &b"pinned"[..]));
    assert_eq!((after[0].redelivered, after[0].delivery_count), (true, 2), "{:?}", after[0]);
}

/// Two queues sharing a log fill the same segments. Draining one deletes none of them while the
/// other still has messages there, which a restart then serves from those segments; once the
/// other is drained too, they go.
#[tokio::test]
async fn a_shared_segment_is_deleted_once_no_queue_has_messages_in_it() {
    let mut broker = Broker::start_with(&["--segment-bytes", SEGMENT_BYTES, "--storage-threads", "1"]);
    let conn = connect(&broker).await;
    conn.declare_queue("a", durable()).await.unwrap();
    conn.declare_queue("b", durable()).await.unwrap();
    let (mut a_ids, mut b_ids) = (Vec::new(), Vec::new());
    for group in 0..15 {
        a_ids.extend(publish_in_groups(&conn, "a", group * 10, 10).await);
        b_ids.extend(publish_in_groups(&conn, "b", group * 10, 10).await);
    }
    let log = log_dir(broker.data_dir(), "a");
    assert_eq!(log, log_dir(broker.data_dir(), "b"), "one log");
    let before = segment_files(&log);
    assert!(before.len() >= 5, "300 messages span several segments: {before:?}");

    // Half of every segment is still live: nothing to delete, nothing worth compacting.
    let mut consumer = acking_consumer(&conn, "a").await;
    for expected in &a_ids {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(delivery.message_id, *expected);
        delivery.ack().await.unwrap();
    }
    stats_eventually(&conn, "a", |info| info.acked_total == 150).await;
    let after = segment_files(&log);
    assert!(after.starts_with(&before), "b's messages keep every segment they are in: {before:?} {after:?}");
    drop(consumer);
    assert_eq!(broker.terminate().code(), Some(0));

    // Bodies come from the segments after a restart.
    broker.restart();
    let conn = connect(&broker).await;
    assert_eq!(conn.queue_stats("a").await.unwrap().ready, 0);
    let mut consumer = acking_consumer(&conn, "b").await;
    for (i, expected) in b_ids.iter().enumerate() {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!((delivery.message_id, &delivery.body[..]), (*expected, body(i).as_bytes()));
        delivery.ack().await.unwrap();
    }
    eventually("the drained segments to be deleted", Duration::from_secs(10), || {
        let log = log.clone();
        async move { segment_files(&log).len() == 1 }
    })
    .await;
}
