//! Backpressure end to end: bounded queues at their exact boundaries (reject-publish and
//! drop-head, by length and by bytes, before and after a restart, and through `hopper publish`),
//! and broker-wide flow control, where a publisher over the memory or disk watermark is held back
//! while consumers keep draining, and nothing it sent is lost.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use hopper_client::{
    Connection, ConsumeOptions, Error, ErrorCode, EventKind, Events, Overflow, PublishConfirm,
    PublishOptions, QueueOptions, Result,
};
use hopper_tests::{
    cli, connect, declare_with_dead_letter, next_delivery, publish_all, run_cli, stats_eventually,
    take_ready, within, Broker, DEADLINE,
};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long a test watches a held-back publish to see that it does not complete. The broker
/// re-reads its watermarks every 100 ms, so this spans several checks.
const HOLD: Duration = Duration::from_millis(400);

/// Options of a queue bounded by `max_length` and/or `max_bytes` (0 = no such bound).
fn bounded(max_length: u64, max_bytes: u64, overflow: Overflow) -> QueueOptions {
    QueueOptions {
        max_length: (max_length > 0).then_some(max_length),
        max_bytes: (max_bytes > 0).then_some(max_bytes),
        overflow,
        ..Default::default()
    }
}

/// Publishes every body to `queue`, all in flight at once, and returns each confirm's outcome
/// in publish order.
async fn publish_each<B: Into<Bytes>>(
    conn: &Connection,
    queue: &str,
    bodies: impl IntoIterator<Item = B>,
) -> Vec<Result<u64>> {
    let confirms: Vec<_> =
        bodies.into_iter().map(|body| conn.publish(queue, body, PublishOptions::default())).collect();
    within("publish confirms", futures::future::join_all(confirms)).await
}

/// Publishes one body and returns the confirm's outcome.
async fn publish_one(conn: &Connection, queue: &str, body: impl Into<Bytes>) -> Result<u64> {
    within("a publish confirm", conn.publish(queue, body, PublishOptions::default())).await
}

/// Checks that `result` is the refusal of a full queue: `RESOURCE_LIMIT` with the message
/// `queue '<queue>' is full (<limits>)`.
#[track_caller]
fn assert_full(result: &Result<u64>, queue: &str, limits: &str) {
    match result {
        Err(Error::Broker { code, message }) => {
            assert_eq!(*code, ErrorCode::ResourceLimit, "{message}");
            assert_eq!(message, &format!("queue '{queue}' is full ({limits})"));
        }
        other => panic!("expected RESOURCE_LIMIT for the full queue {queue}, got {other:?}"),
    }
}

/// The bodies of the first (up to 100) ready messages of `queue`, head first.
async fn ready_bodies(conn: &Connection, queue: &str) -> Vec<String> {
    let peeked = conn.peek(queue, 100).await.expect("peek");
    peeked.iter().map(|m| String::from_utf8_lossy(&m.body).into_owned()).collect()
}

/// Takes one delivery of `queue` and leaves it unacked; returns the consumer (settle the
/// delivery, then cancel it).
async fn take_one(conn: &Connection, queue: &str) -> (hopper_client::Consumer, hopper_client::Delivery) {
    let options =
        ConsumeOptions { prefetch: 1, limit: Some(1), confirm_settlements: true, ..Default::default() };
    let mut consumer = conn.consume(queue, options).await.expect("consume");
    let delivery = next_delivery(&mut consumer).await;
    (consumer, delivery)
}

#[tokio::test]
async fn reject_publish_takes_exactly_max_length_and_refuses_the_next() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    for (queue, durable) in [("jobs", false), ("durable-jobs", true)] {
        let options = QueueOptions { durable, ..bounded(5, 0, Overflow::RejectPublish) };
        conn.declare_queue(queue, options).await.unwrap();
        let limit = "max_length 5";

        // Six in flight at once: the broker takes them in order, so the sixth is the one refused.
        let results = publish_each(&conn, queue, (0..6).map(|i| format!("m{i}"))).await;
        assert!(results[..5].iter().all(Result::is_ok), "{queue}: {results:?}");
        assert_full(&results[5], queue, limit);
        let info = conn.queue_stats(queue).await.unwrap();
        assert_eq!((info.ready, info.published_total, info.waiting_bytes), (5, 5, 10), "{info:?}");
        assert_eq!(
            ready_bodies(&conn, queue).await,
            ["m0", "m1", "m2", "m3", "m4"],
            "nothing of m5 is stored"
        );
        assert_full(&publish_one(&conn, queue, "again").await, queue, limit);

        // An unacked delivery no longer counts against the bound: one more fits, and no more.
        let (consumer, delivery) = take_one(&conn, queue).await;
        assert_eq!(&delivery.body[..], b"m0");
        publish_one(&conn, queue, "m5").await.expect("a delivered message frees its place");
        assert_full(&publish_one(&conn, queue, "m6").await, queue, limit);
        delivery.ack().await.unwrap();
        assert_full(&publish_one(&conn, queue, "m6").await, queue, limit);
        assert_eq!(consumer.cancel().await.unwrap(), 0);

        let info = conn.queue_stats(queue).await.unwrap();
        assert_eq!((info.ready, info.unacked, info.published_total), (5, 0, 6), "{info:?}");
        assert_eq!(ready_bodies(&conn, queue).await, ["m1", "m2", "m3", "m4", "m5"]);
        assert!(info.dead_lettered.is_empty(), "a refused publish is not a death: {info:?}");
    }
}

#[tokio::test]
async fn delayed_messages_count_against_max_length() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("later", bounded(2, 0, Overflow::RejectPublish)).await.unwrap();
    let delayed = PublishOptions { delay: Some(Duration::from_secs(60)), ..Default::default() };
    within("a delayed publish", conn.publish("later", "delayed", delayed)).await.unwrap();
    publish_one(&conn, "later", "ready").await.unwrap();
    assert_full(&publish_one(&conn, "later", "third").await, "later", "max_length 2");
    let info = conn.queue_stats("later").await.unwrap();
    assert_eq!((info.delayed, info.ready, info.published_total), (1, 1, 2), "{info:?}");
}

#[tokio::test]
async fn drop_head_dead_letters_the_oldest_with_reason_maxlen() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let dead = declare_with_dead_letter(&conn, "feed", bounded(3, 0, Overflow::DropHead)).await;

    let ids = publish_all(&conn, "feed", ["m0", "m1", "m2"]).await;
    assert_eq!(conn.queue_stats(&dead).await.unwrap().ready, 0, "a queue at its bound is not over it");
    let fourth = publish_one(&conn, "feed", "m3").await.expect("drop-head accepts the publish");
    assert!(fourth > ids[2]);
    let info = conn.queue_stats("feed").await.unwrap();
    assert_eq!((info.ready, info.published_total), (3, 4), "{info:?}");
    assert_eq!(info.dead_lettered.get("maxlen"), Some(&1), "{info:?}");
    assert_eq!(ready_bodies(&conn, "feed").await, ["m1", "m2", "m3"]);

    let dropped = take_ready(&conn, &dead, 1).await;
    assert_eq!((dropped[0].message_id, &dropped[0].body[..]), (ids[0], &b"m0"[..]));
    let death = dropped[0].last_death().expect("the dropped message carries its death");
    assert_eq!(
        (death.reason.as_str(), death.queue.as_str(), death.count),
        ("maxlen", "feed", 0),
        "{death:?}"
    );
    assert_eq!(dropped[0].deaths.len(), 1);

    // Two more push out the next two, oldest first.
    publish_all(&conn, "feed", ["m4", "m5"]).await;
    let dropped = take_ready(&conn, &dead, 2).await;
    let bodies: Vec<&[u8]> = dropped.iter().map(|d| &d.body[..]).collect();
    assert_eq!(bodies, [&b"m1"[..], &b"m2"[..]]);
    assert!(dropped.iter().all(|d| d.last_death().is_some_and(|death| death.reason == "maxlen")));
    assert_eq!(ready_bodies(&conn, "feed").await, ["m3", "m4", "m5"]);
    assert_eq!(conn.queue_stats("feed").await.unwrap().dead_lettered.get("maxlen"), Some(&3));
}

#[tokio::test]
async fn drop_head_without_a_dead_letter_queue_drops_the_oldest() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("ticker", bounded(2, 0, Overflow::DropHead)).await.unwrap();

    let results = publish_each(&conn, "ticker", (0..5).map(|i| format!("t{i}"))).await;
    let ids: Vec<u64> = results.into_iter().map(|r| r.expect("drop-head accepts every publish")).collect();
    let info = conn.queue_stats("ticker").await.unwrap();
    assert_eq!((info.ready, info.published_total), (2, 5), "{info:?}");
    assert_eq!(info.dead_lettered.get("maxlen"), Some(&3), "{info:?}");
    assert_eq!(ready_bodies(&conn, "ticker").await, ["t3", "t4"]);

    // Each drop is in the audit trail, with no dead-letter queue.
    let deadline = Instant::now() + DEADLINE;
    let audit = loop {
        let audit = conn.audit(Some("ticker"), 0, 0).await.unwrap();
        if audit.len() >= 3 || Instant::now() > deadline {
            break audit;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let dropped: Vec<(u64, &str, Option<&str>)> =
        audit.iter().map(|e| (e.message_id, e.reason.as_str(), e.dead_letter.as_deref())).collect();
    assert_eq!(dropped, [(ids[0], "maxlen", None), (ids[1], "maxlen", None), (ids[2], "maxlen", None)]);
}

#[tokio::test]
async fn a_durable_drop_head_queue_stays_within_its_bounds_under_pipelined_publishes() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let by_length = QueueOptions { durable: true, ..bounded(2, 0, Overflow::DropHead) };
    let by_bytes = QueueOptions { durable: true, ..bounded(0, 100, Overflow::DropHead) };
    conn.declare_queue("by-length", by_length).await.unwrap();
    conn.declare_queue("by-bytes", by_bytes).await.unwrap();
    // The race with the log writer does not show every time; twenty batches show it reliably.
    for batch in 0..20 {
        publish_all(&conn, "by-length", (0..50).map(|i| format!("b{batch}m{i}"))).await;
        publish_all(&conn, "by-bytes", (0..50).map(|_| "x".repeat(40))).await;
        let info = conn.queue_stats("by-length").await.unwrap();
        assert!(info.ready <= 2, "batch {batch}: {} waiting with max_length 2", info.ready);
        let info = conn.queue_stats("by-bytes").await.unwrap();
        assert!(
            info.waiting_bytes <= 100,
            "batch {batch}: {} bytes waiting with max_bytes 100",
            info.waiting_bytes
        );
    }
}

/// Declares `q.dead` bounded to one message (reject-publish) and `q`, a drop-head queue of one
/// message dead-lettering into it; publishes `a`, `b` and `c` one after the other. `a` dies
/// into `q.dead`, which is then full, so it refuses `b` when `b` dies. Returns the ids.
async fn overflow_into_a_full_dead_letter_queue(conn: &Connection, durable: bool) -> Vec<u64> {
    let dead = QueueOptions { durable, ..bounded(1, 0, Overflow::RejectPublish) };
    conn.declare_queue("q.dead", dead).await.unwrap();
    let queue =
        QueueOptions { durable, dead_letter: Some("q.dead".into()), ..bounded(1, 0, Overflow::DropHead) };
    conn.declare_queue("q", queue).await.unwrap();
    let mut ids = Vec::new();
    for body in ["a", "b", "c"] {
        ids.push(publish_one(conn, "q", body).await.unwrap());
        // Wait until the death (if any) has reached its end before the next publish.
        stats_eventually(conn, "q", |i| i.ready == 1).await;
    }
    stats_eventually(conn, "q.dead", |i| i.ready == 1).await;
    ids
}

#[tokio::test]
async fn a_dead_message_refused_by_a_full_dead_letter_queue_is_audited_as_dropped() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let ids = overflow_into_a_full_dead_letter_queue(&conn, false).await;
    assert_eq!(ready_bodies(&conn, "q").await, ["c"]);
    assert_eq!(ready_bodies(&conn, "q.dead").await, ["a"], "b did not fit");
    let audit = conn.audit(Some("q"), 0, 0).await.unwrap();
    let trail: Vec<(u64, Option<&str>)> =
        audit.iter().map(|e| (e.message_id, e.dead_letter.as_deref())).collect();
    assert_eq!(trail, [(ids[0], Some("q.dead")), (ids[1], None)], "b was dropped: {audit:?}");
}

#[tokio::test]
async fn a_dead_message_refused_by_a_full_dead_letter_queue_stays_gone_after_a_restart() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    overflow_into_a_full_dead_letter_queue(&conn, true).await;
    assert_eq!(ready_bodies(&conn, "q").await, ["c"]);
    let status = broker.terminate();
    assert_eq!(status.code(), Some(0), "hopperd exits 0 after SIGTERM; stderr:\n{}", broker.stderr());
    broker.restart();
    let conn = connect(&broker).await;
    assert_eq!(ready_bodies(&conn, "q").await, ["c"], "what the broker held before the restart");
    assert_eq!(ready_bodies(&conn, "q.dead").await, ["a"]);
}

#[tokio::test]
async fn max_bytes_bounds_the_waiting_body_bytes_under_both_policies() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let forty = || "x".repeat(40);

    // reject-publish: 100 bytes fit exactly; one byte more is refused.
    conn.declare_queue("bytes", bounded(0, 100, Overflow::RejectPublish)).await.unwrap();
    publish_all(&conn, "bytes", [forty(), forty()]).await;
    assert_full(&publish_one(&conn, "bytes", "y".repeat(21)).await, "bytes", "max_bytes 100");
    publish_one(&conn, "bytes", "z".repeat(20)).await.expect("80 + 20 bytes is exactly the bound");
    assert_full(&publish_one(&conn, "bytes", "!").await, "bytes", "max_bytes 100");
    let info = conn.queue_stats("bytes").await.unwrap();
    assert_eq!((info.ready, info.waiting_bytes, info.published_total), (3, 100, 3), "{info:?}");

    // drop-head: as many of the oldest die as it takes to fit the new message.
    let dead = declare_with_dead_letter(&conn, "rolling", bounded(0, 100, Overflow::DropHead)).await;
    publish_all(&conn, "rolling", ["a".repeat(40), "b".repeat(40)]).await;
    publish_one(&conn, "rolling", "c".repeat(40)).await.unwrap();
    let info = conn.queue_stats("rolling").await.unwrap();
    assert_eq!((info.ready, info.waiting_bytes), (2, 80), "a died to make room: {info:?}");
    publish_one(&conn, "rolling", "d".repeat(100)).await.unwrap();
    let info = conn.queue_stats("rolling").await.unwrap();
    assert_eq!((info.ready, info.waiting_bytes), (1, 100), "b and c died to make room: {info:?}");
    assert_eq!(info.dead_lettered.get("maxlen"), Some(&3), "{info:?}");
    let dropped = take_ready(&conn, &dead, 3).await;
    let firsts: Vec<u8> = dropped.iter().map(|d| d.body[0]).collect();
    assert_eq!(firsts, b"abc");
    assert!(dropped.iter().all(|d| d.last_death().is_some_and(|death| death.reason == "maxlen")));

    // With both bounds, whichever is hit first refuses, and the message names both.
    conn.declare_queue("both", bounded(3, 100, Overflow::RejectPublish)).await.unwrap();
    publish_one(&conn, "both", "w".repeat(95)).await.unwrap();
    assert_full(&publish_one(&conn, "both", "w".repeat(6)).await, "both", "max_length 3, max_bytes 100");
    publish_all(&conn, "both", ["s", "s"]).await;
    assert_full(&publish_one(&conn, "both", "s").await, "both", "max_length 3, max_bytes 100");
}

#[tokio::test]
async fn bounds_hold_after_a_restart() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    let durable = |options: QueueOptions| QueueOptions { durable: true, ..options };
    conn.declare_queue("by-length", durable(bounded(3, 0, Overflow::RejectPublish))).await.unwrap();
    conn.declare_queue("by-bytes", durable(bounded(0, 100, Overflow::RejectPublish))).await.unwrap();
    let dead = declare_with_dead_letter(&conn, "rolling", durable(bounded(2, 0, Overflow::DropHead))).await;
    publish_all(&conn, "by-length", ["l0", "l1", "l2"]).await;
    publish_all(&conn, "by-bytes", ["a".repeat(40), "b".repeat(40)]).await;
    let rolling = publish_all(&conn, "rolling", ["r0", "r1"]).await;

    let status = broker.terminate();
    assert_eq!(status.code(), Some(0), "hopperd exits 0 after SIGTERM; stderr:\n{}", broker.stderr());
    broker.restart();
    let conn = connect(&broker).await;

    assert_full(&publish_one(&conn, "by-length", "l3").await, "by-length", "max_length 3");
    let (consumer, delivery) = take_one(&conn, "by-length").await;
    delivery.ack().await.unwrap();
    assert_eq!(consumer.cancel().await.unwrap(), 0);
    // One place is free: of two publishes in flight, the first takes it.
    let results = publish_each(&conn, "by-length", ["l3", "l4"]).await;
    assert!(results[0].is_ok(), "{results:?}");
    assert_full(&results[1], "by-length", "max_length 3");
    assert_eq!(ready_bodies(&conn, "by-length").await, ["l1", "l2", "l3"]);

    let info = conn.queue_stats("by-bytes").await.unwrap();
    assert_eq!((info.ready, info.waiting_bytes), (2, 80), "{info:?}");
    assert_full(&publish_one(&conn, "by-bytes", "c".repeat(21)).await, "by-bytes", "max_bytes 100");
    publish_one(&conn, "by-bytes", "c".repeat(20)).await.expect("exactly the bound");
    assert_full(&publish_one(&conn, "by-bytes", "!").await, "by-bytes", "max_bytes 100");

    publish_one(&conn, "rolling", "r2").await.unwrap();
    assert_eq!(ready_bodies(&conn, "rolling").await, ["r1", "r2"]);
    let dropped = take_ready(&conn, &dead, 1).await;
    assert_eq!(dropped[0].message_id, rolling[0]);
    assert_eq!(dropped[0].last_death().map(|d| d.reason.as_str()), Some("maxlen"));
}

#[tokio::test]
async fn hopper_publish_into_a_full_queue_fails_saying_how_many_were_refused() {
    let broker = Broker::start();
    let declared = run_cli(&broker, &["queue", "declare", "small", "--max-length", "2"]).await;
    declared.assert_success();
    let published = run_cli(&broker, &["publish", "small", "a", "b", "c", "d"]).await;
    let error = published.assert_one_line_error();
    assert!(error.contains("2 of 4 messages were not confirmed"), "{published}");
    assert!(error.contains("RESOURCE_LIMIT") && error.contains("queue 'small' is full"), "{published}");
    assert!(published.stdout.is_empty(), "{published}");
    let conn = connect(&broker).await;
    assert_eq!(ready_bodies(&conn, "small").await, ["a", "b"]);

    // drop-head takes every message, so the command succeeds.
    let declared =
        run_cli(&broker, &["queue", "declare", "roll", "--max-length", "2", "--overflow", "drop-head"]).await;
    declared.assert_success();
    let published = run_cli(&broker, &["publish", "roll", "a", "b", "c", "d"]).await;
    published.assert_success();
    assert!(published.stderr.contains("published 4 messages to 'roll'"), "{published}");
    assert_eq!(ready_bodies(&conn, "roll").await, ["c", "d"]);
}

/// Body size of the messages the flow-control test publishes.
const BODY: usize = 4096;
/// The memory high watermark of the flow-control test: about 50 of its messages.
const WATERMARK: u64 = 200_000;
/// Most publishes the flow-control test has in flight.
const WINDOW: usize = 64;

/// A `BODY`-byte body that starts with its index.
fn numbered_body(i: usize) -> Bytes {
    let mut body = format!("{i:08}").into_bytes();
    body.resize(BODY, b'.');
    body.into()
}

/// The next broker event of `kind`, skipping others; fails the test after the deadline.
async fn next_event(events: &mut Events, kind: EventKind) -> hopper_client::Event {
    loop {
        let event = within("a broker event", events.next()).await.expect("the event stream is open");
        let event = event.expect("an event");
        if event.kind == kind {
            return event;
        }
    }
}

#[tokio::test]
async fn a_blocked_publisher_waits_while_a_consumer_drains_and_nothing_is_lost() {
    let broker = Broker::start_with(&["--memory-high-watermark", &WATERMARK.to_string()]);
    let publisher = connect(&broker).await;
    let other = connect(&broker).await;
    let mut events = other.subscribe_events().await.unwrap();
    publisher.declare_queue("flow", QueueOptions::default()).await.unwrap();

    // Publish with up to WINDOW confirms outstanding until the broker blocks the connection.
    let mut flow = publisher.flow_changes();
    let mut in_flight: VecDeque<PublishConfirm> = VecDeque::new();
    let mut confirmed: Vec<u64> = Vec::new();
    let mut sent = 0;
    let deadline = Instant::now() + DEADLINE;
    while !publisher.is_blocked() {
        assert!(Instant::now() < deadline, "not blocked after {sent} messages of {BODY} bytes");
        if in_flight.len() < WINDOW {
            in_flight.push_back(publisher.publish("flow", numbered_body(sent), PublishOptions::default()));
            sent += 1;
            continue;
        }
        let oldest = tokio::select! {
            result = in_flight.front_mut().expect("the window is full") => Some(result),
            _ = flow.changed() => None,
        };
        if let Some(result) = oldest {
            in_flight.pop_front();
            confirmed.push(result.expect("a publish before the block is confirmed"));
        }
    }
    let reason = publisher.blocked_reason().expect("blocked");
    assert!(reason.contains("memory high watermark"), "{reason}");

    // Confirms the broker sent before it blocked the connection have arrived; the others wait,
    // and so do publishes sent from now on.
    let mut held = Vec::new();
    for mut confirm in in_flight {
        match (&mut confirm).now_or_never() {
            Some(result) => confirmed.push(result.expect("a publish before the block is confirmed")),
            None => held.push(confirm),
        }
    }
    for i in sent..sent + 8 {
        held.push(publisher.publish("flow", numbered_body(i), PublishOptions::default()));
    }
    let blocked = next_event(&mut events, EventKind::PublishersBlocked).await;
    assert!(blocked.detail.contains("memory high watermark"), "{blocked:?}");

    let status = other.status().await.unwrap();
    assert!(status.blocked.as_deref().is_some_and(|r| r.contains("memory")), "{status:?}");
    assert_eq!(status.blocked_publishers, 1, "only the publishing connection is held: {status:?}");
    assert_eq!(status.memory_high_watermark, WATERMARK);
    assert!(status.memory_used > WATERMARK, "{status:?}");
    let cli = run_cli(&broker, &["status", "--json"]).await;
    cli.assert_success();
    let json = cli.json();
    assert_eq!((&json["blocked"], &json["blocked_publishers"]), (&true.into(), &1.into()), "{json}");
    assert!(json["blocked_reason"].as_str().is_some_and(|r| r.contains("memory high watermark")), "{json}");
    let listed = run_cli(&broker, &["queue", "list"]).await;
    listed.assert_success();
    let banner = listed.stdout.lines().next().unwrap_or_default();
    assert!(banner.starts_with("publishers are blocked: memory high watermark"), "{listed}");

    let pending = futures::future::select_all(held.iter_mut());
    assert!(tokio::time::timeout(HOLD, pending).await.is_err(), "a held-back publish completed");
    assert!(publisher.is_blocked());
    let info = other.queue_stats("flow").await.unwrap();
    let accepted = confirmed.len() as u64;
    assert_eq!((info.published_total, info.ready), (accepted, accepted), "the broker read no more: {info:?}");

    // A consumer on another connection receives while the publisher is blocked: deliveries
    // alone free no memory, so the block holds until acks come in.
    let options = ConsumeOptions { prefetch: 32, ..Default::default() };
    let mut consumer = other.consume("flow", options).await.unwrap();
    let first = next_delivery(&mut consumer).await;
    assert!(publisher.is_blocked(), "the first delivery came while the publisher was blocked");
    first.ack().await.unwrap();
    let (ids, mut received) = tokio::sync::mpsc::unbounded_channel();
    ids.send(first.message_id).unwrap();
    let draining = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            delivery.ack().await.expect("ack");
            if ids.send(delivery.message_id).is_err() {
                return;
            }
        }
    });

    // Once the consumer has freed memory, the broker reads the held publishes again.
    let late = within("the held-back confirms", futures::future::join_all(held)).await;
    for result in late {
        confirmed.push(result.expect("a held-back publish is confirmed once the block ends"));
    }
    assert_eq!(confirmed.len(), sent + 8, "every publish was confirmed");
    next_event(&mut events, EventKind::PublishersUnblocked).await;

    // Every confirmed message is consumed exactly once.
    let mut times_received: HashMap<u64, u32> = HashMap::new();
    while times_received.values().sum::<u32>() < confirmed.len() as u32 {
        let id = within("a consumed message", received.recv()).await.expect("the consumer runs");
        *times_received.entry(id).or_default() += 1;
    }
    let info = stats_eventually(&other, "flow", |i| i.acked_total == confirmed.len() as u64).await;
    assert_eq!((info.ready, info.unacked, info.published_total), (0, 0, confirmed.len() as u64), "{info:?}");
    assert!(received.try_recv().is_err(), "nothing beyond the confirmed messages");
    assert!(times_received.values().all(|&n| n == 1), "a message was consumed twice: {times_received:?}");
    let mut expected = confirmed.clone();
    expected.sort_unstable();
    let mut got: Vec<u64> = times_received.into_keys().collect();
    got.sort_unstable();
    assert_eq!(got, expected, "every confirmed message was consumed");
    draining.abort();

    let deadline = Instant::now() + DEADLINE;
    while publisher.is_blocked() {
        assert!(Instant::now() < deadline, "the publisher stays blocked with nothing held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(other.status().await.unwrap().blocked, None);
}

#[tokio::test]
async fn low_disk_blocks_publishing_connections_only() {
    // No disk has this much free space, so the broker is short of disk from its first check.
    // Heartbeats every 100 ms: a held connection is silent for several intervals below.
    let watermark = (1u64 << 60).to_string();
    let broker = Broker::start_with(&["--disk-free-low-watermark", &watermark, "--heartbeat-ms", "100"]);
    let watcher = connect(&broker).await;
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        let status = watcher.status().await.unwrap();
        if status.blocked.is_some() {
            break status;
        }
        assert!(Instant::now() < deadline, "never blocked: {status:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(status.blocked.as_deref().is_some_and(|r| r.contains("disk free low watermark")), "{status:?}");
    assert_eq!(status.blocked_publishers, 0, "a connection that never published is not held: {status:?}");

    // Declaring is not publishing; the first publish is read, and then the connection is held.
    let publisher = connect(&broker).await;
    publisher.declare_queue("q", QueueOptions::default()).await.unwrap();
    let first = publish_one(&publisher, "q", "first").await.expect("the first publish is read");
    let mut flow = publisher.flow_changes();
    within("the publisher to be blocked", flow.wait_for(Option::is_some)).await.unwrap();
    assert!(publisher.blocked_reason().is_some_and(|r| r.contains("disk")));
    let mut second = publisher.publish("q", "second", PublishOptions::default());
    assert!(tokio::time::timeout(HOLD, &mut second).await.is_err(), "a publish got through the block");
    assert_eq!(watcher.status().await.unwrap().blocked_publishers, 1);
    assert!(!publisher.is_closed(), "heartbeats are not enforced on a blocked connection");
    assert!(publisher.is_blocked());

    // Consumers are not held back.
    let mut consumer = watcher.consume("q", ConsumeOptions::default()).await.unwrap();
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!((delivery.message_id, &delivery.body[..]), (first, &b"first"[..]));
    delivery.ack().await.unwrap();
    let info = stats_eventually(&watcher, "q", |i| i.acked_total == 1).await;
    assert_eq!((info.published_total, info.ready), (1, 0), "the held publish was not read: {info:?}");
}

#[tokio::test]
async fn hopper_publish_waits_out_a_block_and_then_succeeds() {
    let broker = Broker::start_with(&["--memory-high-watermark", "1000"]);
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    // Publishing on a connection of its own: once blocked, the broker reads nothing from it,
    // not even a status request.
    let publisher = connect(&broker).await;
    publish_one(&publisher, "q", "x".repeat(2000)).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while conn.status().await.unwrap().blocked.is_none() {
        assert!(Instant::now() < deadline, "never blocked");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut publish = cli(&broker);
    publish.args(["publish", "q", "a", "b", "c"]);
    let mut child = tokio::process::Command::from(publish)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn hopper publish");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let line = within("hopper publish to report the block", stderr.next_line()).await.unwrap();
    let line = line.expect("a line on stderr");
    assert!(
        line.starts_with("hopper: publishers are blocked by the broker: memory high watermark"),
        "{line}"
    );
    assert!(within("hopper publish to wait", child.wait()).now_or_never().is_none(), "it waits");

    // A consumer frees the memory; the command then gets every confirm.
    let (consumer, big) = take_one(&conn, "q").await;
    big.ack().await.unwrap();
    consumer.cancel().await.unwrap();
    let status = within("hopper publish to finish", child.wait()).await.expect("wait for hopper publish");
    let mut rest = Vec::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        rest.push(line);
    }
    assert!(status.success(), "hopper publish failed: {status}; stderr: {rest:?}");
    assert_eq!(rest, ["published 3 messages to 'q'"]);
    assert_eq!(ready_bodies(&conn, "q").await, ["a", "b", "c"]);
}
