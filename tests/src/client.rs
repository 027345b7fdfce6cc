//! `hopper-client` helpers: connecting to a test broker and waiting on queue statistics.

use bytes::Bytes;
use futures::StreamExt;
use hopper_client::{
    ConnectOptions, Connection, ConsumeOptions, Consumer, DeleteOptions, Delivery, PublishOptions, QueueInfo,
    QueueOptions,
};

use crate::broker::Broker;
use crate::wait::{within, DEADLINE};

/// Connects to `broker` with default options.
pub async fn connect(broker: &Broker) -> Connection {
    within("connect", Connection::connect(broker.addr())).await.expect("connect to the broker")
}

/// Connects to `broker` with `options`.
pub async fn connect_with(broker: &Broker, options: ConnectOptions) -> Connection {
    within("connect", Connection::connect_with(broker.addr(), options)).await.expect("connect to the broker")
}

/// Publishes every body to `queue`, all in flight at once, and returns the message ids in
/// publish order once the broker confirmed them all.
pub async fn publish_all<B: Into<Bytes>>(
    conn: &Connection,
    queue: &str,
    bodies: impl IntoIterator<Item = B>,
) -> Vec<u64> {
    let confirms: Vec<_> =
        bodies.into_iter().map(|body| conn.publish(queue, body, PublishOptions::default())).collect();
    let results = within("publish confirms", futures::future::join_all(confirms)).await;
    results.into_iter().map(|result| result.expect("publish confirmed")).collect()
}

/// Polls the statistics of `queue` until `condition` holds and returns them; fails the test
/// with the last statistics seen if that does not happen within the deadline.
pub async fn stats_eventually(
    conn: &Connection,
    queue: &str,
    condition: impl Fn(&QueueInfo) -> bool,
) -> QueueInfo {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let info = conn.queue_stats(queue).await.expect("queue stats");
        if condition(&info) {
            return info;
        }
        assert!(tokio::time::Instant::now() < deadline, "queue stats never matched; last: {info:?}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Checks that `broker` still serves a new client end to end: declare, publish, consume, ack.
pub async fn assert_serves(broker: &Broker) {
    let conn = connect(broker).await;
    let queue = "harness-still-serving";
    conn.declare_queue(queue, QueueOptions::default()).await.expect("declare");
    let message_id =
        within("publish", conn.publish(queue, "ping", PublishOptions::default())).await.expect("publish");
    let mut consumer =
        conn.consume(queue, ConsumeOptions { prefetch: 1, ..Default::default() }).await.expect("consume");
    let delivery =
        within("a delivery", consumer.next()).await.expect("the stream is open").expect("delivery");
    assert_eq!(delivery.message_id, message_id);
    assert_eq!(&delivery.body[..], b"ping");
    delivery.ack().await.expect("ack");
    stats_eventually(&conn, queue, |info| info.unacked == 0 && info.ready == 0).await;
    conn.delete_queue(queue, DeleteOptions::default()).await.expect("delete");
    let _ = conn.close().await;
}

/// The next delivery of `consumer`; fails the test if the stream ends, yields an error, or
/// nothing arrives within the deadline.
pub async fn next_delivery(consumer: &mut Consumer) -> Delivery {
    match within("a delivery", consumer.next()).await {
        Some(Ok(delivery)) => delivery,
        Some(Err(err)) => panic!("the consumer of {} failed: {err}", consumer.queue()),
        None => panic!("the consumer of {} ended", consumer.queue()),
    }
}

/// Takes `n` deliveries from `consumer`.
pub async fn next_deliveries(consumer: &mut Consumer, n: usize) -> Vec<Delivery> {
    let mut deliveries = Vec::with_capacity(n);
    for _ in 0..n {
        deliveries.push(next_delivery(consumer).await);
    }
    deliveries
}

/// A delivery body as text.
pub fn body_text(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.body).into_owned()
}

/// Subscribes to `queue`, which must have no consumer, and receives every message it holds:
/// as many deliveries as it had ready messages, none of them settled. Checks that nothing was
/// left behind. Returns the consumer (cancel or drop it to requeue the deliveries) and the
/// deliveries in the order they arrived.
pub async fn receive_backlog(conn: &Connection, queue: &str) -> (Consumer, Vec<Delivery>) {
    let before = conn.queue_stats(queue).await.expect("queue stats");
    assert_eq!((before.unacked, before.consumers), (0, 0), "{queue} must be idle: {before:?}");
    // No prefetch limit: the backlog is the bound on what the consumer receives.
    let options = ConsumeOptions { prefetch: 0, ..Default::default() };
    let mut consumer = conn.consume(queue, options).await.expect("consume");
    let deliveries = next_deliveries(&mut consumer, before.ready as usize).await;
    let after = conn.queue_stats(queue).await.expect("queue stats");
    assert_eq!((after.ready, after.unacked), (0, before.ready), "{queue}: {after:?}");
    (consumer, deliveries)
}
