//! Clients that stop reading what the broker sends them. Such a client is disconnected once a
//! write to it has made no progress for the write deadline (its unacked deliveries go back to
//! the queue), other clients are served meanwhile, and it cannot hold up a shutdown.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hopper_client::{ConsumeOptions, QueueOptions};
use hopper_proto::{pb, Body};
use hopper_tests::{connect, next_delivery, publish_all, stats_eventually, Broker, RawConn};

/// Deliveries that together far exceed what the kernel's socket buffers on loopback hold, so
/// writes to a peer that does not read stall.
const COUNT: usize = 600;
const SIZE: usize = 64 * 1024;

fn bodies() -> Vec<Bytes> {
    (0..COUNT).map(|i| Bytes::from(vec![b'a' + (i % 26) as u8; SIZE])).collect()
}

/// A connection that subscribes to `queue` without a prefetch limit and then never reads.
async fn stopped_consumer(broker: &Broker, queue: &str) -> RawConn {
    let mut raw = RawConn::connect(broker.addr()).await;
    raw.hello(0, 0).await;
    let consume = pb::Consume { queue: queue.into(), prefetch_count: 0, ..Default::default() };
    match raw.call(Body::Consume(consume)).await {
        Body::ConsumeOk(_) => raw,
        other => panic!("expected ConsumeOk, got {other:?}"),
    }
}

#[tokio::test]
async fn a_consumer_that_stops_reading_is_disconnected_and_others_are_served_meanwhile() {
    let broker = Broker::start_with(&["--write-timeout-ms", "1500"]);
    let conn = connect(&broker).await;
    conn.declare_queue("slow", QueueOptions::default()).await.unwrap();
    conn.declare_queue("fast", QueueOptions::default()).await.unwrap();
    let stopped = stopped_consumer(&broker, "slow").await;
    publish_all(&conn, "slow", bodies()).await;
    // Its connection took what it could and the rest waits in the queue.
    let stalled = stats_eventually(&conn, "slow", |info| info.unacked > 0 && info.ready > 0).await;
    assert_eq!(stalled.consumers, 1);

    // Meanwhile, another connection publishes and consumes as usual.
    let consumer = connect(&broker).await;
    let mut fast =
        consumer.consume("fast", ConsumeOptions { prefetch: 50, ..Default::default() }).await.unwrap();
    let ids = publish_all(&conn, "fast", (0..1000).map(|i| format!("fast {i}"))).await;
    let mut received = Vec::with_capacity(ids.len());
    while received.len() < ids.len() {
        let delivery = next_delivery(&mut fast).await;
        delivery.ack().await.unwrap();
        received.push(delivery.message_id);
    }
    assert_eq!(received, ids);

    // After the write deadline the silent consumer is gone and what it held is back.
    let back = stats_eventually(&conn, "slow", |info| info.consumers == 0 && info.unacked == 0).await;
    assert_eq!(back.ready, COUNT as u64, "every message is back in the queue");
    assert!(back.redelivered_total == 0 && back.acked_total == 0, "{back:?}");
    assert!(
        broker.stderr().contains("the peer stopped reading or the connection broke"),
        "{}",
        broker.stderr()
    );
    drop(stopped);
}

#[tokio::test]
async fn sigterm_finishes_promptly_while_a_consumer_has_stopped_reading() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_in(data_dir.path(), &[]);
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    let stopped = stopped_consumer(&broker, "jobs").await;
    publish_all(&conn, "jobs", bodies()).await;
    stats_eventually(&conn, "jobs", |info| info.unacked > 0 && info.ready > 0).await;

    let asked = Instant::now();
    broker.signal_terminate();
    let status = broker.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?}\n{}", broker.stderr());
    assert!(asked.elapsed() < Duration::from_secs(5));
    drop(stopped);

    // The deliveries it never acknowledged come back after the restart.
    broker.restart();
    let conn = connect(&broker).await;
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.ready, info.unacked), (COUNT as u64, 0), "{info:?}");
}
