//! Failure handling: queue arguments, the death reasons (`rejected`, `delivery_limit`,
//! `expired`) and what a dead message carries into its dead-letter queue and the audit trail,
//! how every kind of unsuccessful delivery counts toward `max_deliveries`, and message TTLs.
//!
//! Retries and ack timeouts are in `retries.rs`, pulling in `pull.rs`, restarts in
//! `failure_restart.rs`, the CLI and the examples in `failure_cli.rs`.

use std::collections::HashMap;
use std::time::Duration;

use futures::FutureExt;
use futures::StreamExt;
use hopper_client::{
    Connection, ConsumeOptions, Delivery, Error, ErrorCode, NackOptions, PublishOptions, QueueOptions,
};
use hopper_proto::{pb, Body};
use hopper_tests::{
    body_text, connect, declare_with_dead_letter, declared_options, next_deliveries, next_delivery,
    take_ready, unix_ms, Broker, RawConn,
};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How much later than its due time a timer may fire before a test calls it broken.
const SLACK_MS: u64 = 1500;

/// Consumer options with settlements confirmed, so that a settle has taken effect when it
/// returns.
fn confirmed(prefetch: u32) -> ConsumeOptions {
    ConsumeOptions { prefetch, confirm_settlements: true, ..Default::default() }
}

/// The only death of a dead-lettered message.
fn only_death(delivery: &Delivery) -> &hopper_client::Death {
    assert_eq!(delivery.deaths.len(), 1, "{delivery:?}");
    delivery.last_death().expect("one death")
}

#[tokio::test]
async fn queue_arguments_are_reported_and_part_of_the_declaration() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs.dead", QueueOptions::default()).await.unwrap();
    let options = QueueOptions {
        durable: false,
        dead_letter: Some("jobs.dead".into()),
        max_deliveries: Some(5),
        retry_backoff: vec![ms(200), ms(1500), Duration::from_secs(60)],
        message_ttl: Some(Duration::from_secs(3600)),
        ack_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let declared = conn.declare_queue("jobs", options.clone()).await.unwrap();
    assert_eq!(declared_options(&declared), options);
    assert_eq!(declared_options(&conn.queue_stats("jobs").await.unwrap()), options);
    conn.declare_queue("jobs", options.clone()).await.expect("the same settings again");

    let changes = [
        QueueOptions { dead_letter: Some("other.dead".into()), ..options.clone() },
        QueueOptions { dead_letter: None, ..options.clone() },
        QueueOptions { max_deliveries: Some(6), ..options.clone() },
        QueueOptions { max_deliveries: None, ..options.clone() },
        QueueOptions { retry_backoff: vec![ms(200), ms(1500)], ..options.clone() },
        QueueOptions { message_ttl: Some(Duration::from_secs(3601)), ..options.clone() },
        QueueOptions { ack_timeout: None, ..options.clone() },
    ];
    for changed in changes {
        match conn.declare_queue("jobs", changed.clone()).await {
            Err(err) => assert_eq!(err.code(), Some(ErrorCode::PreconditionFailed), "{changed:?}: {err}"),
            Ok(info) => panic!("redeclaring with {changed:?} succeeded: {info:?}"),
        }
    }
    assert_eq!(declared_options(&conn.queue_stats("jobs").await.unwrap()), options, "nothing changed");

    let own = QueueOptions { dead_letter: Some("loop".into()), ..Default::default() };
    let err = conn.declare_queue("loop", own).await.expect_err("a queue cannot dead-letter into itself");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    let err = conn.queue_exists("loop").await.expect_err("the refused queue was not created");
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
}

#[tokio::test]
async fn rejected_messages_carry_the_consumers_error_into_their_death_and_the_audit_trail() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let dead_letter = declare_with_dead_letter(&conn, "jobs", QueueOptions::default()).await;
    let options = PublishOptions {
        headers: HashMap::from([("trace".to_string(), "t-1".to_string())]),
        content_type: "application/json".into(),
        ..Default::default()
    };
    let first = conn.publish("jobs", "{\"v\":1}", options.clone()).await.unwrap();
    let second = conn.publish("jobs", "{\"v\":3}", options.clone()).await.unwrap();

    let before = unix_ms();
    let mut consumer = conn.consume("jobs", confirmed(2)).await.unwrap();
    let got = next_deliveries(&mut consumer, 2).await;
    got[0].reject_with("invalid payload: missing field `name`").await.unwrap();
    let nack = NackOptions { error: "cannot handle version 3".into(), delay: None };
    got[1].nack_with(false, nack).await.unwrap();

    let dead = take_ready(&conn, &dead_letter, 2).await;
    let after = unix_ms();
    let errors = ["invalid payload: missing field `name`", "cannot handle version 3"];
    for ((delivery, id), error) in dead.iter().zip([first, second]).zip(errors) {
        assert_eq!(delivery.message_id, id, "a dead message keeps its id");
        assert_eq!(delivery.headers, options.headers);
        assert_eq!(delivery.content_type, "application/json");
        assert_eq!((delivery.delivery_count, delivery.redelivered), (1, false), "a fresh delivery count");
        let death = only_death(delivery);
        assert_eq!((death.queue.as_str(), death.reason.as_str()), ("jobs", "rejected"), "{death:?}");
        assert_eq!((death.count, death.error.as_str()), (1, error), "{death:?}");
        assert_eq!(death.first_failure_ms, death.last_failure_ms, "{death:?}");
        assert!(before <= death.first_failure_ms && death.last_failure_ms <= death.died_at_ms, "{death:?}");
        assert!(death.died_at_ms <= after, "{death:?}");
    }
    assert_eq!(body_text(&dead[0]), "{\"v\":1}");

    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!(info.dead_lettered, HashMap::from([("rejected".to_string(), 2)]), "{info:?}");
    assert_eq!((info.ready, info.unacked, info.delayed, info.acked_total), (0, 0, 0, 0), "{info:?}");

    let events = conn.audit(Some("jobs"), 0, 0).await.unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    for ((event, delivery), error) in events.iter().zip(&dead).zip(errors) {
        let death = only_death(delivery);
        assert_eq!((event.message_id, event.queue.as_str()), (delivery.message_id, "jobs"), "{event:?}");
        assert_eq!((event.reason.as_str(), event.count, event.error.as_str()), ("rejected", 1, error));
        assert_eq!(event.dead_letter.as_deref(), Some("jobs.dead"));
        assert_eq!(event.time_ms, death.died_at_ms, "{event:?}");
        assert_eq!(event.consumer_id, consumer.id(), "{event:?}");
        assert_ne!(event.connection_id, 0, "{event:?}");
    }
    assert_eq!(conn.audit(None, 0, 0).await.unwrap(), events, "nothing died elsewhere");
    assert!(conn.audit(Some("jobs.dead"), 0, 0).await.unwrap().is_empty());
    assert!(conn.audit(Some("jobs"), after + 60_000, 0).await.unwrap().is_empty(), "since_ms filters");
    assert_eq!(conn.audit(Some("jobs"), 0, 1).await.unwrap(), events[1..], "limit keeps the newest");
}

#[tokio::test]
async fn dead_messages_without_a_dead_letter_queue_are_dropped_and_audited() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("plain", QueueOptions::default()).await.unwrap();
    // Its dead-letter queue does not exist yet: dead messages are dropped until it does.
    let orphan = QueueOptions { dead_letter: Some("orphan.dead".into()), ..Default::default() };
    conn.declare_queue("orphan", orphan).await.unwrap();
    for queue in ["plain", "orphan"] {
        conn.publish(queue, "doomed", PublishOptions::default()).await.unwrap();
        let mut consumer = conn.consume(queue, confirmed(1)).await.unwrap();
        next_delivery(&mut consumer).await.reject_with(format!("bad input in {queue}")).await.unwrap();
        let info = conn.queue_stats(queue).await.unwrap();
        assert_eq!(info.dead_lettered.get("rejected"), Some(&1), "{info:?}");
        assert_eq!((info.ready, info.unacked), (0, 0), "{info:?}");
        let events = conn.audit(Some(queue), 0, 0).await.unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!((events[0].reason.as_str(), events[0].dead_letter.as_deref()), ("rejected", None));
        assert_eq!(events[0].error, format!("bad input in {queue}"));
    }

    conn.declare_queue("orphan.dead", QueueOptions::default()).await.unwrap();
    conn.publish("orphan", "routed", PublishOptions::default()).await.unwrap();
    let mut consumer = conn.consume("orphan", confirmed(1)).await.unwrap();
    next_delivery(&mut consumer).await.reject().await.unwrap();
    let dead = take_ready(&conn, "orphan.dead", 1).await;
    assert_eq!(body_text(&dead[0]), "routed", "the dropped one did not turn up later");
    assert_eq!(only_death(&dead[0]).error, "", "a reject without a reason has no error text");
}

#[tokio::test]
async fn message_failing_max_deliveries_times_dies_with_delivery_limit() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let options = QueueOptions { max_deliveries: Some(3), ..Default::default() };
    let dead_letter = declare_with_dead_letter(&conn, "jobs", options).await;
    let id = conn.publish("jobs", "flaky", PublishOptions::default()).await.unwrap();
    let mut consumer = conn.consume("jobs", confirmed(1)).await.unwrap();
    for attempt in 1..=3 {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!((delivery.message_id, delivery.delivery_count), (id, attempt));
        let error = format!("attempt {attempt} failed");
        delivery.nack_with(true, NackOptions { error, delay: None }).await.unwrap();
    }

    let dead = take_ready(&conn, &dead_letter, 1).await;
    let death = only_death(&dead[0]);
    assert_eq!((dead[0].message_id, dead[0].delivery_count), (id, 1));
    assert_eq!((death.reason.as_str(), death.count), ("delivery_limit", 3), "{death:?}");
    assert_eq!(death.error, "attempt 3 failed", "the last failure's error text");
    assert!(death.first_failure_ms <= death.last_failure_ms, "{death:?}");
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!(info.dead_lettered, HashMap::from([("delivery_limit".to_string(), 1)]), "{info:?}");
    assert_eq!((info.delivered_total, info.redelivered_total, info.ready), (3, 2, 0), "{info:?}");
    assert!(consumer.next().now_or_never().is_none(), "no 4th delivery");
}

/// Pulls one message of `queue` over a raw connection and rejects it with requeue (which the
/// client API does not offer); returns its delivery count.
async fn reject_with_requeue(broker: &Broker, queue: &str, error: &str) -> u32 {
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let get = pb::Get { queue: queue.into(), count: 1, visibility_ms: 30_000, wait_ms: 5_000 };
    let deliver = match raw.call(Body::Get(get)).await {
        Body::GetOk(ok) if ok.deliveries.len() == 1 => ok.deliveries.into_iter().next().expect("one"),
        other => panic!("expected one pulled message, got {other:?}"),
    };
    let reject = pb::Reject {
        consumer_id: deliver.consumer_id,
        delivery_tag: deliver.delivery_tag,
        requeue: true,
        confirm: true,
        error: error.into(),
    };
    match raw.call(Body::Reject(reject)).await {
        Body::SettleOk(ok) => assert_eq!(ok.settled, 1),
        other => panic!("expected SettleOk, got {other:?}"),
    }
    deliver.message.expect("a message").delivery_count
}

/// Checks that the one message of `queue` (whose dead-letter queue is `<queue>.dead`) went
/// there after 4 failed deliveries, with `error` as the last failure's text; returns it.
async fn assert_died_of_the_limit(conn: &Connection, queue: &str, error: Option<&str>) -> Delivery {
    let dead = take_ready(conn, &format!("{queue}.dead"), 1).await;
    let death = only_death(&dead[0]);
    assert_eq!((death.queue.as_str(), death.reason.as_str()), (queue, "delivery_limit"), "{death:?}");
    assert_eq!(death.count, 4, "{death:?}");
    if let Some(error) = error {
        assert_eq!(death.error, error, "{death:?}");
    }
    let info = conn.queue_stats(queue).await.unwrap();
    assert_eq!(info.dead_lettered.get("delivery_limit"), Some(&1), "{info:?}");
    assert_eq!((info.ready, info.unacked, info.delayed), (0, 0, 0), "{info:?}");
    assert_eq!((info.delivered_total, info.redelivered_total, info.acked_total), (4, 3, 0), "{info:?}");
    dead.into_iter().next().expect("one")
}

/// Each of the four kinds of unsuccessful delivery, once, uses up one of the 4 deliveries
/// `max_deliveries` allows, whatever the order.
#[tokio::test]
async fn every_kind_of_unsuccessful_delivery_counts_toward_max_deliveries() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let options = QueueOptions { max_deliveries: Some(4), ..Default::default() };
    declare_with_dead_letter(&conn, "a", options.clone()).await;
    declare_with_dead_letter(&conn, "b", options).await;
    let timeout = ms(300);
    let with_ack_timeout = ConsumeOptions { ack_timeout: Some(timeout), ..confirmed(1) };

    // a: nack with requeue, disconnect, reject with requeue, ack timeout.
    conn.publish("a", "fragile", PublishOptions::default()).await.unwrap();
    let nacking = connect(&broker).await;
    let mut consumer = nacking.consume("a", confirmed(1)).await.unwrap();
    let first = next_delivery(&mut consumer).await;
    assert_eq!(first.delivery_count, 1);
    first.nack_with(true, NackOptions { error: "nacked".into(), delay: None }).await.unwrap();
    // Its window is free again, so the message comes straight back to the same consumer,
    // whose connection then goes away holding it.
    let second = next_delivery(&mut consumer).await;
    assert_eq!(second.delivery_count, 2);
    drop((first, second, consumer, nacking));
    assert_eq!(reject_with_requeue(&broker, "a", "rejected").await, 3);
    let mut slow = conn.consume("a", with_ack_timeout.clone()).await.unwrap();
    let last = next_delivery(&mut slow).await;
    assert_eq!(last.delivery_count, 4);
    let dead = assert_died_of_the_limit(&conn, "a", None).await;
    match last.ack().await {
        Err(Error::DeliveryExpired { delivery_tag }) => assert_eq!(delivery_tag, last.delivery_tag),
        other => panic!("expected DeliveryExpired for the late ack, got {other:?}"),
    }
    let events = conn.audit(Some("a"), 0, 0).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0].message_id, events[0].count), (dead.message_id, 4), "{events:?}");
    assert_eq!(events[0].consumer_id, slow.id(), "the consumer that let the ack deadline pass");

    // b: ack timeout, disconnect, reject with requeue, nack with requeue.
    conn.publish("b", "fragile", PublishOptions::default()).await.unwrap();
    let timing_out = connect(&broker).await;
    // Measured from before subscribing: the ack deadline starts when the broker delivers.
    let subscribed = std::time::Instant::now();
    let mut consumer = timing_out.consume("b", with_ack_timeout).await.unwrap();
    let first = next_delivery(&mut consumer).await;
    assert_eq!(first.delivery_count, 1);
    // Taken back after the timeout, the message comes back to the same consumer, whose
    // connection then goes away holding it.
    let second = next_delivery(&mut consumer).await;
    assert_eq!(second.delivery_count, 2);
    // Less a millisecond: the broker counts due times in whole Unix milliseconds.
    assert!(subscribed.elapsed() + ms(1) >= timeout, "redelivered only after the ack timeout");
    drop((first, second, consumer, timing_out));
    assert_eq!(reject_with_requeue(&broker, "b", "rejected").await, 3);
    let mut consumer = conn.consume("b", confirmed(1)).await.unwrap();
    let last = next_delivery(&mut consumer).await;
    assert_eq!(last.delivery_count, 4);
    last.nack_with(true, NackOptions { error: "nacked at last".into(), delay: None }).await.unwrap();
    assert_died_of_the_limit(&conn, "b", Some("nacked at last")).await;
}

#[tokio::test]
async fn the_sooner_of_the_queue_ttl_and_the_message_ttl_applies() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let options = QueueOptions { message_ttl: Some(ms(1000)), ..Default::default() };
    let dead_letter = declare_with_dead_letter(&conn, "jobs", options).await;
    let short = PublishOptions { ttl: Some(ms(100)), ..Default::default() };
    let long = PublishOptions { ttl: Some(Duration::from_secs(60)), ..Default::default() };
    conn.publish("jobs", "plain", PublishOptions::default()).await.unwrap();
    conn.publish("jobs", "long", long).await.unwrap();
    conn.publish("jobs", "short", short.clone()).await.unwrap();
    // A message TTL also works on a queue without one.
    declare_with_dead_letter(&conn, "free", QueueOptions::default()).await;
    conn.publish("free", "alone", short).await.unwrap();

    let dead = take_ready(&conn, &dead_letter, 3).await;
    assert_eq!(body_text(&dead[0]), "short", "the message's shorter TTL applies");
    let mut bodies: Vec<String> = dead.iter().map(body_text).collect();
    bodies.sort();
    assert_eq!(bodies, ["long", "plain", "short"]);
    for delivery in &dead {
        let death = only_death(delivery);
        let ttl = if body_text(delivery) == "short" { 100 } else { 1000 };
        let lived = death.died_at_ms - delivery.published_at_ms;
        assert!(
            lived >= ttl && lived < ttl + SLACK_MS,
            "{} lived {lived} ms: {death:?}",
            body_text(delivery)
        );
        if ttl == 100 {
            assert!(lived < 1000, "the queue's longer TTL did not apply: {death:?}");
        }
        assert_eq!((death.queue.as_str(), death.reason.as_str(), death.count), ("jobs", "expired", 0));
        assert_eq!((death.error.as_str(), death.first_failure_ms, death.last_failure_ms), ("", 0, 0));
    }
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!(info.dead_lettered, HashMap::from([("expired".to_string(), 3)]), "{info:?}");
    assert_eq!((info.ready, info.delivered_total), (0, 0), "{info:?}");

    let dead = take_ready(&conn, "free.dead", 1).await;
    assert_eq!(only_death(&dead[0]).reason, "expired");
    let events = conn.audit(Some("jobs"), 0, 0).await.unwrap();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.iter().all(|e| e.reason == "expired" && e.consumer_id == 0), "{events:?}");
}

/// An expired message dies where it is, not when it reaches the head of the queue: behind a
/// message nobody takes, behind one a consumer holds, and while delayed.
#[tokio::test]
async fn a_message_expires_in_the_middle_of_the_queue_without_a_consumer_touching_it() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let dead_letter = declare_with_dead_letter(&conn, "jobs", QueueOptions::default()).await;
    let ttl = PublishOptions { ttl: Some(ms(200)), ..Default::default() };
    let publish = |body: &'static str, options: PublishOptions| conn.publish("jobs", body, options);

    publish("head", PublishOptions::default()).await.unwrap();
    publish("middle", ttl.clone()).await.unwrap();
    publish("tail", PublishOptions::default()).await.unwrap();
    let dead = take_ready(&conn, &dead_letter, 1).await;
    assert_eq!(body_text(&dead[0]), "middle");
    let death = only_death(&dead[0]);
    assert_eq!((death.reason.as_str(), death.count), ("expired", 0), "never delivered: {death:?}");
    let lived = death.died_at_ms - dead[0].published_at_ms;
    assert!((200..200 + SLACK_MS).contains(&lived), "lived {lived} ms");
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.ready, info.delivered_total), (2, 0), "{info:?}");

    // Now the head is out with a consumer that does not settle it yet.
    let mut consumer = conn.consume("jobs", confirmed(1)).await.unwrap();
    let head = next_delivery(&mut consumer).await;
    assert_eq!(body_text(&head), "head");
    publish("middle 2", ttl.clone()).await.unwrap();
    let delayed = PublishOptions { delay: Some(Duration::from_secs(60)), ..ttl };
    publish("delayed", delayed).await.unwrap();
    publish("tail 2", PublishOptions::default()).await.unwrap();
    let dead = take_ready(&conn, &dead_letter, 2).await;
    let mut bodies: Vec<String> = dead.iter().map(body_text).collect();
    bodies.sort();
    assert_eq!(bodies, ["delayed", "middle 2"]);
    assert!(dead.iter().all(|d| only_death(d).reason == "expired"), "{dead:?}");
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.ready, info.unacked, info.delayed), (2, 1, 0), "{info:?}");
    assert_eq!(info.dead_lettered.get("expired"), Some(&3), "{info:?}");

    head.ack().await.unwrap();
    let next = next_delivery(&mut consumer).await;
    assert_eq!(body_text(&next), "tail");
    next.ack().await.unwrap();
    let last = next_delivery(&mut consumer).await;
    assert_eq!(body_text(&last), "tail 2");
    last.ack().await.unwrap();
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.ready, info.unacked, info.delivered_total, info.acked_total), (0, 0, 3, 3), "{info:?}");
}
