//! Prefetch windows: a consumer never holds more unacknowledged deliveries than its prefetch
//! count, and does get that many when the queue has them.

use std::collections::VecDeque;

use futures::FutureExt;
use futures::StreamExt;
use hopper_client::{ConsumeOptions, Delivery, PublishOptions, QueueOptions};
use hopper_tests::{
    body_text, connect, next_deliveries, next_delivery, publish_all, stats_eventually, Broker,
};

const MESSAGES: usize = 10_000;

/// Publishes 10,000 messages, then consumes them with an acking consumer that holds
/// deliveries until its window is full and only then acks the oldest: at every point the
/// deliveries received minus the acks sent must stay within `prefetch`, and reach it.
async fn window_is_filled_but_never_exceeded(prefetch: u32) {
    let broker = Broker::start();
    let publisher = connect(&broker).await;
    let queue = "window";
    publisher.declare_queue(queue, QueueOptions::default()).await.unwrap();
    let ids = publish_all(&publisher, queue, (0..MESSAGES).map(|i| i.to_string())).await;

    let conn = connect(&broker).await;
    let mut consumer = conn.consume(queue, ConsumeOptions { prefetch, ..Default::default() }).await.unwrap();
    let window = prefetch as usize;
    let mut held: VecDeque<Delivery> = VecDeque::new();
    let mut received = 0;
    let mut max_outstanding = 0;
    while received < MESSAGES {
        // Wait for one delivery, then take every one the client already has, so that a
        // broker overrunning the window shows up as more outstanding deliveries.
        let mut batch = vec![next_delivery(&mut consumer).await];
        while let Some(Some(item)) = consumer.next().now_or_never() {
            batch.push(item.expect("delivery"));
        }
        for delivery in batch {
            assert_eq!(delivery.message_id, ids[received], "deliveries come in publish order");
            assert_eq!(body_text(&delivery), received.to_string());
            assert!(!delivery.redelivered);
            received += 1;
            held.push_back(delivery);
        }
        max_outstanding = max_outstanding.max(held.len());
        assert!(
            held.len() <= window,
            "{} deliveries outstanding with a prefetch of {prefetch} (after {received} received)",
            held.len()
        );
        while held.len() >= window || (received == MESSAGES && !held.is_empty()) {
            held.pop_front().expect("held").ack().await.expect("ack");
        }
    }
    assert_eq!(max_outstanding, window, "the window was filled to the prefetch count");
    let info = stats_eventually(&conn, queue, |info| info.acked_total == MESSAGES as u64).await;
    assert_eq!((info.ready, info.unacked), (0, 0), "{info:?}");
    assert_eq!(info.delivered_total, MESSAGES as u64, "{info:?}");
    assert_eq!(info.redelivered_total, 0, "{info:?}");
}

#[tokio::test]
async fn prefetch_1_window_is_filled_but_never_exceeded() {
    window_is_filled_but_never_exceeded(1).await;
}

#[tokio::test]
async fn prefetch_10_window_is_filled_but_never_exceeded() {
    window_is_filled_but_never_exceeded(10).await;
}

#[tokio::test]
async fn prefetch_100_window_is_filled_but_never_exceeded() {
    window_is_filled_but_never_exceeded(100).await;
}

/// A consumer that does not ack gets exactly `prefetch` deliveries; the rest stay ready, as
/// the broker's own statistics show, and one ack lets exactly one more through.
async fn unacked_deliveries_stop_at_the_prefetch_count(prefetch: u32) {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let queue = "held";
    conn.declare_queue(queue, QueueOptions::default()).await.unwrap();
    let n = prefetch as usize;
    publish_all(&conn, queue, (0..n + 5).map(|i| i.to_string())).await;

    let mut consumer = conn.consume(queue, ConsumeOptions { prefetch, ..Default::default() }).await.unwrap();
    let held = next_deliveries(&mut consumer, n).await;
    let bodies: Vec<String> = held.iter().map(body_text).collect();
    assert_eq!(bodies, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());

    // Publishing a marker runs the broker's dispatch again: still nothing for this consumer.
    conn.publish(queue, "marker", PublishOptions::default()).await.unwrap();
    let info = stats_eventually(&conn, queue, |info| info.published_total == n as u64 + 6).await;
    assert_eq!((info.unacked, info.ready), (prefetch as u64, 6), "{info:?}");
    assert_eq!(info.delivered_total, prefetch as u64, "{info:?}");
    assert!(consumer.next().now_or_never().is_none(), "no delivery beyond the window reached the client");

    // One ack frees one slot: exactly the next message arrives.
    held[0].ack().await.unwrap();
    let next = next_delivery(&mut consumer).await;
    assert_eq!(body_text(&next), n.to_string());
    let info = stats_eventually(&conn, queue, |info| info.acked_total == 1).await;
    assert_eq!((info.unacked, info.ready), (prefetch as u64, 5), "{info:?}");
    assert!(consumer.next().now_or_never().is_none(), "one ack let exactly one delivery through");
}

#[tokio::test]
async fn prefetch_1_unacked_deliveries_stop_at_the_window() {
    unacked_deliveries_stop_at_the_prefetch_count(1).await;
}

#[tokio::test]
async fn prefetch_10_unacked_deliveries_stop_at_the_window() {
    unacked_deliveries_stop_at_the_prefetch_count(10).await;
}

#[tokio::test]
async fn prefetch_100_unacked_deliveries_stop_at_the_window() {
    unacked_deliveries_stop_at_the_prefetch_count(100).await;
}

#[tokio::test]
async fn prefetch_0_means_no_limit() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("unlimited", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "unlimited", (0..500).map(|i| i.to_string())).await;
    let mut consumer = conn.consume("unlimited", ConsumeOptions::default()).await.unwrap();
    let held = next_deliveries(&mut consumer, 500).await;
    let info = stats_eventually(&conn, "unlimited", |info| info.unacked == 500).await;
    assert_eq!(info.ready, 0);
    held.last().unwrap().ack_multiple().await.unwrap();
    stats_eventually(&conn, "unlimited", |info| info.unacked == 0 && info.acked_total == 500).await;
}
