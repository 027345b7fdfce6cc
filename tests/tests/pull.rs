//! Pulling messages with `get`: visibility timeouts (an unsettled pulled message comes back as
//! a failed delivery), settling by receipt, long polls, and push and pull consumers on one
//! queue.

use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::StreamExt;
use hopper_client::{ConsumeOptions, Error, ErrorCode, GetOptions, PublishOptions, QueueOptions};
use hopper_tests::{
    body_text, connect, declare_with_dead_letter, next_delivery, publish_all, stats_eventually, take_ready,
    Broker,
};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How much later than its due time a timer may fire before a test calls it broken.
const SLACK: Duration = Duration::from_millis(1500);

/// The broker counts due times in whole Unix milliseconds from when a request arrived, so a
/// timer may fire up to this much before that instant plus its delay.
const CLOCK_TICK: Duration = Duration::from_millis(1);

/// Pull up to `count` messages, hidden from others for `visibility`, waiting up to `wait`.
fn pull(count: u32, visibility: Option<Duration>, wait: Option<Duration>) -> GetOptions {
    GetOptions { count, visibility, wait }
}

#[tokio::test]
async fn an_unsettled_pulled_message_comes_back_after_its_visibility_timeout_as_a_failed_delivery() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let options = QueueOptions { max_deliveries: Some(2), ..Default::default() };
    let dead_letter = declare_with_dead_letter(&conn, "jobs", options).await;
    let id = conn.publish("jobs", "pulled", PublishOptions::default()).await.unwrap();
    let visibility = ms(300);

    // Measured from before the request: the broker starts the clock when it hands it out.
    let pulled_at = Instant::now();
    let first = conn.get("jobs", pull(1, Some(visibility), None)).await.unwrap();
    assert_eq!(first.len(), 1);
    let first = &first[0];
    assert_eq!((first.message_id, first.delivery_count, first.redelivered), (id, 1, false));
    assert_eq!((body_text(first).as_str(), first.queue()), ("pulled", "jobs"));
    let other = connect(&broker).await;
    assert!(other.get("jobs", GetOptions::default()).await.unwrap().is_empty(), "invisible to others");
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.ready, info.unacked), (0, 1), "{info:?}");

    // A long poll sees it the moment it becomes visible again.
    let again = other.get("jobs", pull(1, Some(visibility), Some(Duration::from_secs(10)))).await.unwrap();
    let elapsed = pulled_at.elapsed();
    assert!(elapsed + CLOCK_TICK >= visibility && elapsed < visibility + SLACK, "back after {elapsed:?}");
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].message_id, again[0].delivery_count, again[0].redelivered), (id, 2, true));
    // Whatever the client makes of it (see the test below), the late ack must not remove the
    // message now pulled by the other connection.
    let _ = first.ack().await;

    // Unsettled again: the second failed delivery reaches max_deliveries.
    let dead = take_ready(&conn, &dead_letter, 1).await;
    let death = dead[0].last_death().expect("a death");
    assert_eq!((dead[0].message_id, death.reason.as_str(), death.count), (id, "delivery_limit", 2));
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.ready, info.unacked, info.acked_total), (0, 0, 0), "{info:?}");
}

#[tokio::test]
async fn settling_a_pulled_message_after_its_visibility_timeout_fails_with_delivery_expired() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    conn.publish("jobs", "pulled", PublishOptions::default()).await.unwrap();
    let first = conn.get("jobs", pull(1, Some(ms(200)), None)).await.unwrap();
    let other = connect(&broker).await;
    let again = other.get("jobs", pull(1, None, Some(Duration::from_secs(10)))).await.unwrap();
    assert_eq!(again.len(), 1);
    // The broker told the first connection of the expiry before it redelivered the message,
    // so by the time a later request there is answered the client knows.
    conn.queue_stats("jobs").await.unwrap();
    for result in [first[0].extend(Duration::from_secs(10)).await, first[0].ack().await] {
        match result {
            Err(Error::DeliveryExpired { delivery_tag }) => assert_eq!(delivery_tag, first[0].delivery_tag),
            other => panic!("expected DeliveryExpired for the first pull's receipt, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn pulled_messages_are_settled_by_their_receipt() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    let ids = publish_all(&conn, "jobs", ["a", "b", "c"]).await;

    let got = conn.get("jobs", pull(2, None, None)).await.unwrap();
    assert_eq!(got.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids[..2]);
    assert_eq!(got[0].consumer_id, got[1].consumer_id, "one pull consumer per queue and connection");
    assert_ne!(got[0].delivery_tag, got[1].delivery_tag);
    got[0].ack().await.unwrap();
    got[1].nack(true).await.unwrap();
    assert!(matches!(got[0].ack().await, Err(Error::AlreadySettled { .. })));

    let got = conn.get("jobs", pull(5, None, None)).await.unwrap();
    let seen: Vec<(String, u32)> = got.iter().map(|d| (body_text(d), d.delivery_count)).collect();
    assert_eq!(seen, [("b".to_string(), 2), ("c".to_string(), 1)], "b is back in its place");
    got[0].ack().await.unwrap();
    got[1].extend(Duration::from_secs(60)).await.expect("extend by receipt");
    got[1].ack().await.unwrap();
    let info = stats_eventually(&conn, "jobs", |info| info.acked_total == 3).await;
    assert_eq!((info.ready, info.unacked, info.redelivered_total), (0, 0, 1), "{info:?}");
    assert!(conn.get("jobs", GetOptions::default()).await.unwrap().is_empty());
}

#[tokio::test]
async fn extending_a_pulled_message_keeps_it_invisible_past_its_visibility_timeout() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    conn.publish("jobs", "long job", PublishOptions::default()).await.unwrap();
    let got = conn.get("jobs", pull(1, Some(ms(200)), None)).await.unwrap();
    got[0].extend(Duration::from_secs(10)).await.unwrap();

    // Another consumer long-polls past the original visibility timeout and gets nothing.
    let other = connect(&broker).await;
    let waited = Instant::now();
    let nothing = other.get("jobs", pull(1, None, Some(ms(600)))).await.unwrap();
    assert!(nothing.is_empty(), "{nothing:?}");
    assert!(waited.elapsed() >= ms(600), "the long poll waited: {:?}", waited.elapsed());
    got[0].ack().await.unwrap();
    let info = stats_eventually(&conn, "jobs", |info| info.acked_total == 1).await;
    assert_eq!((info.delivered_total, info.ready, info.unacked), (1, 0, 0), "{info:?}");
}

#[tokio::test]
async fn a_long_poll_answers_as_soon_as_a_message_is_published() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions::default()).await.unwrap();

    let asked = Instant::now();
    assert!(conn.get("jobs", GetOptions::default()).await.unwrap().is_empty());
    assert!(asked.elapsed() < SLACK, "without wait, an empty queue answers at once");
    let asked = Instant::now();
    assert!(conn.get("jobs", pull(1, None, Some(ms(300)))).await.unwrap().is_empty());
    let waited = asked.elapsed();
    assert!(waited >= ms(300) && waited < ms(300) + SLACK, "an empty long poll waits it out: {waited:?}");

    let waiting = connect(&broker).await;
    let poll = {
        let waiting = waiting.clone();
        tokio::spawn(async move { waiting.get("jobs", pull(1, None, Some(Duration::from_secs(15)))).await })
    };
    // The poll's pull consumer counts while it waits; the first connection's, idle now, does not.
    stats_eventually(&conn, "jobs", |info| info.consumers == 1).await;
    match waiting.get("jobs", GetOptions::default()).await {
        Err(err) => assert_eq!(err.code(), Some(ErrorCode::PreconditionFailed), "{err}"),
        Ok(got) => panic!("a second get while one waits on the same connection returned {got:?}"),
    }
    let info = waiting.queue_stats("jobs").await.expect("other requests are served meanwhile");
    assert_eq!(info.ready, 0);

    let published = Instant::now();
    let id = conn.publish("jobs", "wake up", PublishOptions::default()).await.unwrap();
    let got = poll.await.expect("the poll task").expect("the long poll");
    assert!(published.elapsed() < SLACK, "answered at once, not after the wait: {:?}", published.elapsed());
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].message_id, body_text(&got[0]).as_str()), (id, "wake up"));
    got[0].ack().await.unwrap();
    stats_eventually(&conn, "jobs", |info| info.acked_total == 1 && info.unacked == 0).await;
}

#[tokio::test]
async fn push_and_pull_consumers_share_a_queue() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    let ids = publish_all(&conn, "jobs", ["1", "2", "3", "4"]).await;
    let options = ConsumeOptions { prefetch: 1, confirm_settlements: true, ..Default::default() };
    let mut pushed = conn.consume("jobs", options).await.unwrap();
    let puller = connect(&broker).await;

    let one = next_delivery(&mut pushed).await;
    assert_eq!(one.message_id, ids[0]);
    let pulled = puller.get("jobs", pull(2, None, None)).await.unwrap();
    assert_eq!(pulled.iter().map(|d| d.message_id).collect::<Vec<_>>(), ids[1..3]);
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.ready, info.unacked, info.consumers), (1, 3, 2), "{info:?}");

    one.ack().await.unwrap();
    let four = next_delivery(&mut pushed).await;
    assert_eq!((four.message_id, four.delivery_count), (ids[3], 1));
    // A pulled message nacked with requeue waits for the push consumer's window.
    pulled[0].nack(true).await.unwrap();
    stats_eventually(&conn, "jobs", |info| info.ready == 1).await;
    four.ack().await.unwrap();
    let two = next_delivery(&mut pushed).await;
    assert_eq!((two.message_id, two.delivery_count), (ids[1], 2));
    two.ack().await.unwrap();

    // A pulled message still unsettled when its connection closes returns like any other.
    puller.close().await.unwrap();
    let three = next_delivery(&mut pushed).await;
    assert_eq!((three.message_id, three.delivery_count, three.redelivered), (ids[2], 2, true));
    three.ack().await.unwrap();
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!(
        (info.acked_total, info.ready, info.unacked, info.redelivered_total),
        (4, 0, 0, 2),
        "{info:?}"
    );
    assert!(pushed.next().now_or_never().is_none());
}
