//! Time in failure handling: the retry backoff schedule and explicit nack delays, delayed
//! messages that hold up nothing behind them, and ack timeouts (redelivery to another
//! consumer, late settles refused with `DeliveryExpired`, extending a deadline).

use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::StreamExt;
use hopper_client::{
    Connection, ConsumeOptions, Consumer, Delivery, Error, NackOptions, PublishOptions, QueueOptions,
};
use hopper_tests::{body_text, connect, next_delivery, stats_eventually, Broker};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How much later than its due time a timer may fire before a test calls it broken.
const SLACK: Duration = Duration::from_millis(1500);

/// The broker counts due times in whole Unix milliseconds from when a request arrived, so a
/// timer may fire up to this much before that instant plus its delay.
const CLOCK_TICK: Duration = Duration::from_millis(1);

/// Consumer options with settlements confirmed, so that a settle has taken effect when it
/// returns.
fn confirmed(prefetch: u32) -> ConsumeOptions {
    ConsumeOptions { prefetch, confirm_settlements: true, ..Default::default() }
}

/// Asserts that `elapsed`, measured from before the request that started the broker's timer,
/// is at least `delay` and not absurdly more.
#[track_caller]
fn assert_waited(elapsed: Duration, delay: Duration, what: &str) {
    assert!(elapsed + CLOCK_TICK >= delay, "{what}: after {elapsed:?}, before its {delay:?}");
    assert!(elapsed < delay + SLACK, "{what}: after {elapsed:?}, long past its {delay:?}");
}

/// A nack with requeue saying nothing, after `delay` if given.
fn retry_after(delay: Option<Duration>) -> NackOptions {
    NackOptions { error: String::new(), delay }
}

#[tokio::test]
async fn retry_backoff_spaces_the_redeliveries_and_its_last_delay_repeats() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let options = QueueOptions { retry_backoff: vec![ms(200), ms(400)], ..Default::default() };
    conn.declare_queue("jobs", options).await.unwrap();
    let id = conn.publish("jobs", "retry me", PublishOptions::default()).await.unwrap();
    let mut consumer = conn.consume("jobs", confirmed(1)).await.unwrap();
    let mut delivery = next_delivery(&mut consumer).await;
    for (failures, delay) in [(1, ms(200)), (2, ms(400)), (3, ms(400))] {
        let nacked = Instant::now();
        delivery.nack(true).await.unwrap();
        delivery = next_delivery(&mut consumer).await;
        assert_waited(nacked.elapsed(), delay, &format!("redelivery after failure {failures}"));
        assert_eq!((delivery.message_id, delivery.delivery_count), (id, failures + 1));
    }
    delivery.ack().await.unwrap();
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.delivered_total, info.redelivered_total, info.acked_total), (4, 3, 1), "{info:?}");
    assert_eq!((info.ready, info.delayed, info.unacked), (0, 0, 0), "{info:?}");
}

#[tokio::test]
async fn an_explicit_nack_delay_overrides_the_backoff_and_a_retry_holds_up_nothing() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let options = QueueOptions { retry_backoff: vec![Duration::from_secs(60)], ..Default::default() };
    conn.declare_queue("jobs", options).await.unwrap();
    conn.publish("jobs", "a", PublishOptions::default()).await.unwrap();
    conn.publish("jobs", "b", PublishOptions::default()).await.unwrap();
    let mut consumer = conn.consume("jobs", confirmed(1)).await.unwrap();

    let a = next_delivery(&mut consumer).await;
    assert_eq!(body_text(&a), "a");
    let nacked = Instant::now();
    a.nack(true).await.unwrap();
    let b = next_delivery(&mut consumer).await;
    assert_eq!(body_text(&b), "b", "the message behind the one backing off goes on");
    assert!(nacked.elapsed() < SLACK, "{:?}", nacked.elapsed());
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.delayed, info.ready, info.unacked), (1, 0, 1), "a waits out its backoff: {info:?}");

    let nacked = Instant::now();
    b.nack_with(true, retry_after(Some(ms(150)))).await.unwrap();
    let b = next_delivery(&mut consumer).await;
    assert_waited(nacked.elapsed(), ms(150), "redelivery after an explicit delay");
    assert_eq!((body_text(&b).as_str(), b.delivery_count), ("b", 2));

    let nacked = Instant::now();
    b.nack_with(true, retry_after(Some(Duration::ZERO))).await.unwrap();
    let b = next_delivery(&mut consumer).await;
    assert!(nacked.elapsed() < SLACK, "a zero delay redelivers at once: {:?}", nacked.elapsed());
    assert_eq!((body_text(&b).as_str(), b.delivery_count), ("b", 3));
    b.ack().await.unwrap();
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.delayed, info.ready, info.unacked, info.acked_total), (1, 0, 0, 1), "{info:?}");
}

#[tokio::test]
async fn a_delayed_message_does_not_hold_up_the_ones_behind_it() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    let delayed = |delay| PublishOptions { delay: Some(delay), ..Default::default() };
    conn.publish("jobs", "in a minute", delayed(Duration::from_secs(60))).await.unwrap();
    let published = Instant::now();
    conn.publish("jobs", "soon", delayed(ms(300))).await.unwrap();
    conn.publish("jobs", "now", PublishOptions::default()).await.unwrap();
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.delayed, info.ready), (2, 1), "{info:?}");

    let mut consumer = conn.consume("jobs", confirmed(10)).await.unwrap();
    let now = next_delivery(&mut consumer).await;
    assert_eq!(body_text(&now), "now");
    assert!(published.elapsed() < SLACK, "delivered at once: {:?}", published.elapsed());
    let soon = next_delivery(&mut consumer).await;
    assert_eq!(body_text(&soon), "soon");
    assert_waited(published.elapsed(), ms(300), "a message published with a delay");
    for delivery in [now, soon] {
        delivery.ack().await.unwrap();
    }
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.delayed, info.ready, info.unacked, info.acked_total), (1, 0, 0, 2), "{info:?}");
    assert!(consumer.next().now_or_never().is_none(), "the 60 s one is still waiting");
}

/// The first delivery to reach either consumer, and whether it was `a`.
async fn first_delivery(a: &mut Consumer, b: &mut Consumer) -> (Delivery, bool) {
    tokio::select! {
        delivery = next_delivery(a) => (delivery, true),
        delivery = next_delivery(b) => (delivery, false),
    }
}

/// Publishes one message to `queue`, which two consumers `a` and `b` share, and lets the
/// first delivery pass its `ack_timeout` unsettled. Returns that late delivery, the
/// redelivery the other consumer got (consumers take turns), and both consumers, the late
/// one first: dropping a consumer would cancel it.
async fn let_one_expire(
    conn: &Connection,
    queue: &str,
    ack_timeout: Duration,
    mut a: Consumer,
    mut b: Consumer,
) -> (Delivery, Delivery, [Consumer; 2]) {
    // Measured from before the publish: the ack deadline starts when the broker delivers.
    let published = Instant::now();
    let id = conn.publish(queue, "slow", PublishOptions::default()).await.unwrap();
    let (late, from_a) = first_delivery(&mut a, &mut b).await;
    let (mut holder, mut other) = if from_a { (a, b) } else { (b, a) };
    assert_eq!((late.message_id, late.delivery_count), (id, 1));
    let again = next_delivery(&mut other).await;
    assert_waited(published.elapsed(), ack_timeout, "redelivery after the ack timeout");
    assert_eq!((again.message_id, again.delivery_count, again.redelivered), (id, 2, true));
    assert!(holder.next().now_or_never().is_none(), "the late consumer did not get it back");
    (late, again, [holder, other])
}

#[track_caller]
fn assert_expired(result: hopper_client::Result<()>, delivery: &Delivery) {
    match result {
        Err(Error::DeliveryExpired { delivery_tag }) => assert_eq!(delivery_tag, delivery.delivery_tag),
        other => panic!("expected DeliveryExpired for {delivery:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_delivery_not_acked_in_time_goes_to_another_consumer_and_a_confirmed_late_ack_fails() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let timeout = ms(300);
    conn.declare_queue("jobs", QueueOptions { ack_timeout: Some(timeout), ..Default::default() })
        .await
        .unwrap();
    let (conn_a, conn_b) = (connect(&broker).await, connect(&broker).await);
    let a = conn_a.consume("jobs", confirmed(1)).await.unwrap();
    let b = conn_b.consume("jobs", confirmed(1)).await.unwrap();

    let (late, again, _consumers) = let_one_expire(&conn, "jobs", timeout, a, b).await;
    // Settled well within its own ack timeout.
    again.ack().await.unwrap();
    assert_expired(late.ack().await, &late);
    assert_expired(late.extend(Duration::from_secs(10)).await, &late);
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.acked_total, info.unacked, info.ready), (1, 0, 0), "{info:?}");
    assert_eq!((info.delivered_total, info.redelivered_total), (2, 1), "{info:?}");
}

#[tokio::test]
async fn without_confirmations_a_late_ack_fails_with_delivery_expired_too() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let timeout = ms(300);
    conn.declare_queue("jobs", QueueOptions { ack_timeout: Some(timeout), ..Default::default() })
        .await
        .unwrap();
    // On one connection the broker's expiry notice comes before the redelivery, so once the
    // redelivery is here the client knows the first delivery expired.
    let options = ConsumeOptions { prefetch: 1, ..Default::default() };
    let a = conn.consume("jobs", options.clone()).await.unwrap();
    let b = conn.consume("jobs", options).await.unwrap();

    let (late, again, _consumers) = let_one_expire(&conn, "jobs", timeout, a, b).await;
    again.ack().await.unwrap();
    assert_expired(late.ack().await, &late);
    assert_expired(late.nack(true).await, &late);
    assert_expired(late.extend(Duration::from_secs(10)).await, &late);
    let info = stats_eventually(&conn, "jobs", |info| info.acked_total == 1).await;
    assert_eq!((info.unacked, info.ready, info.delivered_total), (0, 0, 2), "{info:?}");
}

#[tokio::test]
async fn extend_keeps_a_delivery_past_its_ack_timeout() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let timeout = ms(300);
    conn.declare_queue("jobs", QueueOptions { ack_timeout: Some(timeout), ..Default::default() })
        .await
        .unwrap();
    let mut a = conn.consume("jobs", confirmed(1)).await.unwrap();
    let mut b = conn.consume("jobs", confirmed(1)).await.unwrap();
    conn.publish("jobs", "long job", PublishOptions::default()).await.unwrap();
    let (delivery, from_a) = first_delivery(&mut a, &mut b).await;
    let other = if from_a { &mut b } else { &mut a };

    delivery.extend(Duration::from_secs(10)).await.unwrap();
    // Three ack timeouts go by: that is the behaviour under test, not a synchronization.
    tokio::time::sleep(3 * timeout).await;
    assert!(other.next().now_or_never().is_none(), "the extended delivery was not taken back");
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.unacked, info.delivered_total, info.redelivered_total), (1, 1, 0), "{info:?}");
    delivery.extend(Duration::from_secs(10)).await.expect("extending again");
    delivery.ack().await.expect("the ack of an extended delivery counts");
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.acked_total, info.unacked, info.ready), (1, 0, 0), "{info:?}");
}
