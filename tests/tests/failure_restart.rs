//! Failure handling across broker restarts, for durable queues: delayed messages, messages in
//! retry backoff and their failure records, dead messages' death histories, the audit trail,
//! and queue arguments.

use std::collections::HashMap;
use std::time::Duration;

use hopper_client::{
    Connection, ConsumeOptions, Death, ErrorCode, NackOptions, PublishOptions, QueueOptions,
};
use hopper_tests::{
    body_text, connect, declare_with_dead_letter, declared_options, next_delivery, stats_eventually,
    take_ready, unix_ms, Broker,
};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How much later than its due time a timer may fire before a test calls it broken.
const SLACK_MS: u64 = 1500;

/// Consumer options with settlements confirmed, so that a settle is on disk when it returns.
fn confirmed(prefetch: u32) -> ConsumeOptions {
    ConsumeOptions { prefetch, confirm_settlements: true, ..Default::default() }
}

/// Stops the broker gracefully, starts it again on the same data directory, and connects.
async fn restart(broker: &mut Broker) -> Connection {
    let status = broker.terminate();
    assert_eq!(status.code(), Some(0), "hopperd exits 0 after SIGTERM; stderr:\n{}", broker.stderr());
    broker.restart();
    connect(broker).await
}

/// Nacks the next delivery of `queue` with requeue and `error`; returns its delivery count.
async fn nack_next(conn: &Connection, queue: &str, error: &str) -> u32 {
    let mut consumer = conn.consume(queue, confirmed(1)).await.unwrap();
    let delivery = next_delivery(&mut consumer).await;
    delivery.nack_with(true, NackOptions { error: error.into(), delay: None }).await.unwrap();
    delivery.delivery_count
}

#[tokio::test]
async fn a_delayed_message_is_still_delayed_after_a_restart_and_arrives_after_its_delay() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    let delay = 2000;
    let delayed = PublishOptions { delay: Some(ms(delay)), ..Default::default() };
    let id = conn.publish("jobs", "later", delayed).await.unwrap();
    conn.publish("jobs", "now", PublishOptions::default()).await.unwrap();

    let conn = restart(&mut broker).await;
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.delayed, info.ready), (1, 1), "{info:?}");
    let mut consumer = conn.consume("jobs", confirmed(10)).await.unwrap();
    let now = next_delivery(&mut consumer).await;
    assert_eq!(body_text(&now), "now");
    now.ack().await.unwrap();
    let later = next_delivery(&mut consumer).await;
    let arrived = unix_ms();
    assert_eq!((later.message_id, body_text(&later).as_str()), (id, "later"));
    let waited = arrived - later.published_at_ms;
    assert!(waited >= delay && waited < delay + SLACK_MS, "delivered {waited} ms after its publish");
    later.ack().await.unwrap();
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.delayed, info.ready, info.unacked), (0, 0, 0), "{info:?}");
}

/// Two messages fail before a restart and die after it: one when it fails again (its first
/// failure time is from before the restart), one when its TTL runs out during its retry
/// backoff (with the error text given before the restart).
#[tokio::test]
async fn retry_state_and_failure_records_survive_a_restart() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    let backoff = 2000;
    let retried = QueueOptions {
        durable: true,
        max_deliveries: Some(2),
        retry_backoff: vec![ms(backoff)],
        ..Default::default()
    };
    declare_with_dead_letter(&conn, "retried", retried).await;
    let parked =
        QueueOptions { durable: true, retry_backoff: vec![Duration::from_secs(60)], ..Default::default() };
    declare_with_dead_letter(&conn, "parked", parked).await;
    let retried_id = conn.publish("retried", "r", PublishOptions::default()).await.unwrap();
    let ttl = 1500;
    let expiring = PublishOptions { ttl: Some(ms(ttl)), ..Default::default() };
    let parked_id = conn.publish("parked", "p", expiring).await.unwrap();

    let before_nack = unix_ms();
    assert_eq!(nack_next(&conn, "retried", "smtp timeout").await, 1);
    assert_eq!(nack_next(&conn, "parked", "upstream unavailable").await, 1);
    for queue in ["retried", "parked"] {
        let info = conn.queue_stats(queue).await.unwrap();
        assert_eq!((info.delayed, info.ready, info.unacked), (1, 0, 0), "{queue}: {info:?}");
    }
    let restarted_at = unix_ms();
    let conn = restart(&mut broker).await;
    let info = conn.queue_stats("retried").await.unwrap();
    assert_eq!((info.delayed, info.ready), (1, 0), "still backing off: {info:?}");

    let mut consumer = conn.consume("retried", confirmed(1)).await.unwrap();
    let again = next_delivery(&mut consumer).await;
    let waited = unix_ms() - before_nack;
    assert!(waited >= backoff && waited < backoff + SLACK_MS, "redelivered {waited} ms after the nack");
    assert_eq!((again.message_id, again.delivery_count, again.redelivered), (retried_id, 2, true));
    let error = "smtp timeout again".to_string();
    again.nack_with(true, NackOptions { error, delay: None }).await.unwrap();
    let dead = take_ready(&conn, "retried.dead", 1).await;
    let death = dead[0].last_death().expect("a death");
    assert_eq!(
        (death.reason.as_str(), death.count, death.error.as_str()),
        ("delivery_limit", 2, "smtp timeout again")
    );
    assert!(
        before_nack <= death.first_failure_ms && death.first_failure_ms <= restarted_at,
        "the first failure was before the restart: {death:?} (restarted at {restarted_at})"
    );
    assert!(death.last_failure_ms > restarted_at, "{death:?}");

    let dead = take_ready(&conn, "parked.dead", 1).await;
    let death = dead[0].last_death().expect("a death");
    assert_eq!(dead[0].message_id, parked_id);
    assert_eq!((death.reason.as_str(), death.count), ("expired", 1), "{death:?}");
    assert_eq!(death.error, "upstream unavailable", "the error text from before the restart");
    assert!(death.first_failure_ms > 0 && death.first_failure_ms <= restarted_at, "{death:?}");
    let lived = death.died_at_ms - dead[0].published_at_ms;
    assert!(lived >= ttl && lived < ttl + SLACK_MS, "lived {lived} ms");
    let info = conn.queue_stats("parked").await.unwrap();
    assert_eq!((info.delayed, info.ready), (0, 0), "{info:?}");
}

#[tokio::test]
async fn dead_messages_keep_their_death_history_and_the_audit_trail_across_restarts() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    let durable = QueueOptions { durable: true, ..Default::default() };
    conn.declare_queue("jobs.parking", durable.clone()).await.unwrap();
    let dead_letter = QueueOptions { dead_letter: Some("jobs.parking".into()), ..durable.clone() };
    conn.declare_queue("jobs.dead", dead_letter).await.unwrap();
    conn.declare_queue("jobs", QueueOptions { dead_letter: Some("jobs.dead".into()), ..durable })
        .await
        .unwrap();
    let headers = HashMap::from([("tenant".to_string(), "acme".to_string())]);
    let options = PublishOptions { headers: headers.clone(), ..Default::default() };
    let id = conn.publish("jobs", "payload", options).await.unwrap();
    let mut consumer = conn.consume("jobs", confirmed(1)).await.unwrap();
    next_delivery(&mut consumer).await.reject_with("bad signature").await.unwrap();
    stats_eventually(&conn, "jobs.dead", |info| info.ready == 1).await;
    let audit_before = conn.audit(None, 0, 0).await.unwrap();
    assert_eq!(audit_before.len(), 1, "{audit_before:?}");

    let conn = restart(&mut broker).await;
    assert_eq!(conn.audit(None, 0, 0).await.unwrap(), audit_before, "the audit trail is kept");
    let mut consumer = conn.consume("jobs.dead", confirmed(1)).await.unwrap();
    let dead = next_delivery(&mut consumer).await;
    assert_eq!((dead.message_id, body_text(&dead).as_str(), &dead.headers), (id, "payload", &headers));
    assert_eq!(dead.deaths.len(), 1, "{dead:?}");
    let first: Death = dead.deaths[0].clone();
    assert_eq!((first.queue.as_str(), first.reason.as_str(), first.count), ("jobs", "rejected", 1));
    assert_eq!(first.error, "bad signature");
    assert_eq!(first.died_at_ms, audit_before[0].time_ms, "{first:?}");
    dead.reject_with("still bad").await.unwrap();
    stats_eventually(&conn, "jobs.parking", |info| info.ready == 1).await;

    let conn = restart(&mut broker).await;
    let parked = take_ready(&conn, "jobs.parking", 1).await;
    assert_eq!(parked[0].message_id, id);
    assert_eq!(parked[0].deaths.len(), 2, "{:?}", parked[0]);
    assert_eq!(parked[0].deaths[0], first, "the older death is kept as it was");
    let second = &parked[0].deaths[1];
    assert_eq!((second.queue.as_str(), second.reason.as_str()), ("jobs.dead", "rejected"), "{second:?}");
    assert_eq!((second.count, second.error.as_str()), (1, "still bad"), "{second:?}");
    let events = conn.audit(None, 0, 0).await.unwrap();
    let reasons: Vec<(&str, &str)> = events.iter().map(|e| (e.queue.as_str(), e.error.as_str())).collect();
    assert_eq!(reasons, [("jobs", "bad signature"), ("jobs.dead", "still bad")]);
}

#[tokio::test]
async fn queue_arguments_survive_a_restart() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    let options = QueueOptions {
        durable: true,
        dead_letter: None,
        max_deliveries: Some(3),
        retry_backoff: vec![ms(250), Duration::from_secs(10)],
        message_ttl: Some(Duration::from_secs(3600)),
        ack_timeout: Some(Duration::from_secs(45)),
        ..Default::default()
    };
    declare_with_dead_letter(&conn, "jobs", options.clone()).await;
    let declared = declared_options(&conn.queue_stats("jobs").await.unwrap());
    assert_eq!(declared.dead_letter.as_deref(), Some("jobs.dead"));

    let conn = restart(&mut broker).await;
    assert_eq!(declared_options(&conn.queue_stats("jobs").await.unwrap()), declared);
    conn.declare_queue("jobs", declared.clone()).await.expect("the same settings are accepted");
    let changed = QueueOptions { max_deliveries: Some(4), ..declared.clone() };
    let err = conn.declare_queue("jobs", changed).await.expect_err("other settings are refused");
    assert_eq!(err.code(), Some(ErrorCode::PreconditionFailed), "{err}");

    // And they still act: max_deliveries 3 and the dead-letter queue.
    conn.publish("jobs", "x", PublishOptions::default()).await.unwrap();
    let mut consumer = conn.consume("jobs", confirmed(1)).await.unwrap();
    for attempt in 1..=3 {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(delivery.delivery_count, attempt);
        delivery
            .nack_with(true, NackOptions { error: String::new(), delay: Some(Duration::ZERO) })
            .await
            .unwrap();
    }
    let dead = take_ready(&conn, "jobs.dead", 1).await;
    assert_eq!(dead[0].last_death().map(|d| (d.reason.as_str(), d.count)), Some(("delivery_limit", 3)));
}
