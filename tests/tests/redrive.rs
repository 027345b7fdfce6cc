//! Redrive end to end: peeking into a dead-letter queue, and moves between queues — their rate,
//! limit and filters, the default destination (where each message died), what a moved message
//! carries, cancelling, a destination that fills up, a broker crash in the middle of a move,
//! and the `hopper queue move` / `hopper queue moves` commands.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hopper_client::{
    Connection, ConsumeOptions, ErrorCode, EventKind, MoveInfo, MoveOptions, MoveState, NackOptions,
    Overflow, PublishOptions, QueueOptions,
};
use hopper_tests::{
    body_text, connect, declare_with_dead_letter, next_delivery, publish_all, run_cli, stats_eventually,
    take_ready, within, Broker, DEADLINE,
};

/// The move `id` as the broker reports it now.
async fn move_info(conn: &Connection, id: u64) -> MoveInfo {
    let moves = conn.list_moves().await.expect("list moves");
    moves.iter().find(|m| m.id == id).cloned().unwrap_or_else(|| panic!("no move {id} in {moves:?}"))
}

/// Polls the moves until `id` is no longer running; returns it.
async fn ended(conn: &Connection, id: u64) -> MoveInfo {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let info = move_info(conn, id).await;
        if !info.state.is_running() {
            return info;
        }
        assert!(Instant::now() < deadline, "move {id} still running after {DEADLINE:?}: {info:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts `options` and waits until the move ends; checks that it finished and returns it.
async fn move_to_end(conn: &Connection, options: MoveOptions) -> MoveInfo {
    let started = conn.start_move(options).await.expect("start the move");
    let info = ended(conn, started.id).await;
    assert_eq!(info.state, MoveState::Finished, "{info:?}");
    info
}

/// A move from `source` to `destination` with no other setting.
fn to(source: &str, destination: &str) -> MoveOptions {
    MoveOptions { source: source.into(), destination: Some(destination.into()), ..Default::default() }
}

/// Declares each queue with default options.
async fn declare(conn: &Connection, names: &[&str]) {
    for name in names {
        conn.declare_queue(name, QueueOptions::default()).await.expect("declare");
    }
}

/// The bodies of the first (up to 100) ready messages of `queue`, head first.
async fn ready_bodies(conn: &Connection, queue: &str) -> Vec<String> {
    let peeked = conn.peek(queue, 100).await.expect("peek");
    peeked.iter().map(|m| String::from_utf8_lossy(&m.body).into_owned()).collect()
}

/// Publishes `bodies` to `queue`, then receives them and rejects each with `error`, so they
/// die with reason `rejected` into the queue's dead-letter queue. Returns their ids.
async fn reject_into_dead_letter(conn: &Connection, queue: &str, bodies: &[&str], error: &str) -> Vec<u64> {
    let ids = publish_all(conn, queue, bodies.iter().map(|b| b.to_string())).await;
    let options = ConsumeOptions { prefetch: 0, limit: Some(bodies.len() as u64), ..Default::default() };
    let mut consumer = conn.consume(queue, options).await.expect("consume");
    for _ in bodies {
        next_delivery(&mut consumer).await.reject_with(error).await.expect("reject");
    }
    stats_eventually(conn, queue, |i| i.ready == 0 && i.unacked == 0).await;
    consumer.cancel().await.expect("cancel");
    ids
}

#[tokio::test]
async fn peek_shows_dead_messages_with_their_deaths_and_changes_nothing() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let dead = declare_with_dead_letter(&conn, "orders", QueueOptions::default()).await;
    let ids = reject_into_dead_letter(&conn, "orders", &["o1", "o2", "o3"], "card declined").await;
    let before = stats_eventually(&conn, &dead, |i| i.ready == 3).await;

    let peeked = conn.peek(&dead, 2).await.unwrap();
    assert_eq!(peeked.iter().map(|m| m.message_id).collect::<Vec<_>>(), ids[..2]);
    for message in &peeked {
        assert_eq!((message.delivery_count, message.redelivered, message.replay_count), (0, false, 0));
        assert_eq!(message.deaths.len(), 1, "{message:?}");
        let death = &message.deaths[0];
        assert_eq!(
            (death.queue.as_str(), death.reason.as_str(), death.count, death.error.as_str()),
            ("orders", "rejected", 1, "card declined")
        );
        assert!(death.died_at_ms >= message.published_at_ms, "{death:?}");
    }
    let all = conn.peek(&dead, 0).await.unwrap();
    assert_eq!(all.iter().map(|m| m.message_id).collect::<Vec<_>>(), ids, "count 0 asks for up to 10");
    assert_eq!(conn.peek(&dead, 2).await.unwrap(), peeked, "a second peek sees the same");

    let cli = run_cli(&broker, &["queue", "peek", &dead, "--json"]).await;
    cli.assert_success();
    let lines = cli.json_lines();
    assert_eq!(lines.len(), 3, "{cli}");
    for (line, id) in lines.iter().zip(&ids) {
        assert_eq!(
            (&line["message_id"], &line["queue"]),
            (&id.to_string().into(), &dead.as_str().into()),
            "{line}"
        );
        assert_eq!(
            (&line["death"]["reason"], &line["death"]["error"]),
            (&"rejected".into(), &"card declined".into())
        );
        assert_eq!((&line["delivery_count"], &line["replay_count"]), (&0.into(), &0.into()), "{line}");
    }

    let after = conn.queue_stats(&dead).await.unwrap();
    assert_eq!(
        (after.ready, after.unacked, after.delivered_total, after.redelivered_total),
        (before.ready, before.unacked, before.delivered_total, before.redelivered_total),
        "peeking changed the queue: {after:?}"
    );
    assert_eq!(after.delivered_total, 0);
    let delivered = take_ready(&conn, &dead, 3).await;
    for ((delivery, id), peeked) in delivered.iter().zip(&ids).zip(&all) {
        assert_eq!(delivery.message_id, *id);
        assert_eq!((delivery.delivery_count, delivery.redelivered), (1, false), "peeks are not deliveries");
        assert_eq!(delivery.deaths, peeked.deaths, "a peek shows the deaths a delivery carries");
    }

    let missing = conn.peek("ghost", 1).await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NotFound), "{missing}");
}

#[tokio::test]
async fn rate_spaces_the_moved_messages() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    declare(&conn, &["src", "dst"]).await;
    let bodies: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
    publish_all(&conn, "src", bodies.clone()).await;

    let rate = 50;
    let began = Instant::now();
    let started = conn.start_move(MoveOptions { rate: Some(rate), ..to("src", "dst") }).await.unwrap();
    assert_eq!(
        (started.rate, started.state.clone(), started.remaining),
        (Some(rate), MoveState::Running, 100)
    );
    // Never ahead of the rate: the first message goes at once, then one every 1/rate s.
    let info = loop {
        let info = move_info(&conn, started.id).await;
        let allowed = 2 + (began.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        assert!(info.moved <= allowed, "{} moved after {:?}", info.moved, began.elapsed());
        if !info.state.is_running() {
            break info;
        }
        assert!(began.elapsed() < DEADLINE, "{info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = began.elapsed();
    assert_eq!((info.state.clone(), info.moved, info.remaining), (MoveState::Finished, 100, 0), "{info:?}");
    assert!(
        took >= Duration::from_millis(1600) && took < Duration::from_secs(4),
        "100 at {rate}/s took {took:?}"
    );
    let reported = info.elapsed(0);
    assert!(reported >= Duration::from_millis(1600) && reported <= took, "the broker says {reported:?}");
    assert_eq!(ready_bodies(&conn, "dst").await, bodies, "moved in order");
}

#[tokio::test]
async fn limit_moves_exactly_that_many_from_the_head() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    declare(&conn, &["src", "dst"]).await;
    publish_all(&conn, "src", (0..10).map(|i| format!("m{i}"))).await;
    let mut events = conn.subscribe_events().await.unwrap();

    let info = move_to_end(&conn, MoveOptions { limit: Some(3), ..to("src", "dst") }).await;
    assert_eq!((info.moved, info.remaining, info.limit), (3, 7, Some(3)), "{info:?}");
    for kind in [EventKind::MoveStarted, EventKind::MoveEnded] {
        let event = within("a move event", events.next()).await.expect("subscribed").expect("an event");
        assert_eq!(
            (&event.kind, event.value, event.queue.as_deref()),
            (&kind, info.id, Some("src")),
            "{event:?}"
        );
    }
    assert_eq!(ready_bodies(&conn, "dst").await, ["m0", "m1", "m2"]);
    assert_eq!(conn.queue_stats("src").await.unwrap().ready, 7);

    // A limit above what is left moves the rest and finishes.
    let info = move_to_end(&conn, MoveOptions { limit: Some(100), ..to("src", "dst") }).await;
    assert_eq!((info.moved, info.remaining), (7, 0), "{info:?}");
    assert_eq!(conn.queue_stats("dst").await.unwrap().ready, 10);
}

#[tokio::test]
async fn a_header_filter_moves_only_the_matching_messages() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    declare(&conn, &["src", "dst"]).await;
    for (body, tenant) in
        [("a0", Some("a")), ("b0", Some("b")), ("n0", None), ("a1", Some("a")), ("b1", Some("b"))]
    {
        let headers =
            tenant.map(|t| HashMap::from([("tenant".to_string(), t.to_string())])).unwrap_or_default();
        conn.publish("src", body, PublishOptions { headers, ..Default::default() }).await.unwrap();
    }

    let filter = Some(("tenant".to_string(), "a".to_string()));
    let info = move_to_end(&conn, MoveOptions { filter: filter.clone(), ..to("src", "dst") }).await;
    assert_eq!((info.moved, info.skipped, &info.filter), (2, 0, &filter), "{info:?}");
    assert_eq!(ready_bodies(&conn, "dst").await, ["a0", "a1"]);
    assert_eq!(ready_bodies(&conn, "src").await, ["b0", "n0", "b1"], "the rest stay, in order");
    let moved = conn.peek("dst", 10).await.unwrap();
    assert!(moved.iter().all(|m| m.headers.get("tenant").map(String::as_str) == Some("a")), "{moved:?}");
}

#[tokio::test]
async fn a_death_reason_filter_tells_expired_from_rejected() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let dead = declare_with_dead_letter(&conn, "jobs", QueueOptions::default()).await;
    declare(&conn, &["retry"]).await;
    // Three expire with no consumer about, then three are rejected: the dead-letter queue holds
    // the expired ones first.
    let short = PublishOptions { ttl: Some(Duration::from_millis(1)), ..Default::default() };
    for i in 0..3 {
        conn.publish("jobs", format!("expired {i}"), short.clone()).await.unwrap();
    }
    stats_eventually(&conn, &dead, |i| i.ready == 3).await;
    reject_into_dead_letter(&conn, "jobs", &["rejected 0", "rejected 1", "rejected 2"], "bad input").await;
    stats_eventually(&conn, &dead, |i| i.ready == 6).await;

    // Rejected ones, from behind the expired ones, back where they died (no destination).
    let rejected = Some(("reason".to_string(), "rejected".to_string()));
    let info =
        move_to_end(&conn, MoveOptions { source: dead.clone(), filter: rejected, ..Default::default() })
            .await;
    assert_eq!((info.moved, info.skipped, &info.destination), (3, 0, &None), "{info:?}");
    assert_eq!(ready_bodies(&conn, "jobs").await, ["rejected 0", "rejected 1", "rejected 2"]);

    let expired = Some(("reason".to_string(), "expired".to_string()));
    let info = move_to_end(&conn, MoveOptions { filter: expired, ..to(&dead, "retry") }).await;
    assert_eq!(info.moved, 3, "{info:?}");
    let retried = conn.peek("retry", 10).await.unwrap();
    assert_eq!(
        retried.iter().map(|m| body_text_of(&m.body)).collect::<Vec<_>>(),
        ["expired 0", "expired 1", "expired 2"]
    );
    assert!(retried
        .iter()
        .all(|m| m.last_death().is_some_and(|d| d.reason == "expired" && d.queue == "jobs")));
    assert_eq!(conn.queue_stats(&dead).await.unwrap().ready, 0);
}

/// A body as text.
fn body_text_of(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[tokio::test]
async fn without_a_destination_each_message_goes_back_where_it_died() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    declare(&conn, &["shared.dead"]).await;
    let with_shared_dlq = QueueOptions { dead_letter: Some("shared.dead".into()), ..Default::default() };
    for queue in ["a", "b", "gone"] {
        conn.declare_queue(queue, with_shared_dlq.clone()).await.unwrap();
    }
    reject_into_dead_letter(&conn, "a", &["a1"], "").await;
    reject_into_dead_letter(&conn, "b", &["b1"], "").await;
    reject_into_dead_letter(&conn, "gone", &["g1"], "").await;
    reject_into_dead_letter(&conn, "a", &["a2"], "").await;
    conn.publish("shared.dead", "never died", PublishOptions::default()).await.unwrap();
    conn.delete_queue("gone", Default::default()).await.unwrap();
    stats_eventually(&conn, "shared.dead", |i| i.ready == 5).await;

    let info = move_to_end(&conn, MoveOptions { source: "shared.dead".into(), ..Default::default() }).await;
    assert_eq!((info.moved, info.skipped, info.remaining), (3, 2, 2), "{info:?}");
    assert_eq!(ready_bodies(&conn, "a").await, ["a1", "a2"]);
    assert_eq!(ready_bodies(&conn, "b").await, ["b1"]);
    assert_eq!(ready_bodies(&conn, "shared.dead").await, ["g1", "never died"], "the skipped stay, in order");
}

#[tokio::test]
async fn a_move_without_a_destination_skips_messages_that_last_died_in_the_source() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let dead = declare_with_dead_letter(&conn, "jobs", QueueOptions::default()).await;
    let ids = reject_into_dead_letter(&conn, "jobs", &["j1"], "bad").await;
    move_to_end(&conn, MoveOptions { source: dead.clone(), ..Default::default() }).await;
    // Back in jobs, the message's latest death names jobs: moving jobs "back where its messages
    // died" has nowhere to send it.
    let started = conn.start_move(MoveOptions { source: "jobs".into(), ..Default::default() }).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    let info = loop {
        let info = move_info(&conn, started.id).await;
        assert!(info.moved == 0, "the message was moved onto its own queue: {info:?}");
        if !info.state.is_running() {
            break info;
        }
        assert!(Instant::now() < deadline, "{info:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!((info.state, info.moved, info.skipped, info.remaining), (MoveState::Finished, 0, 1, 1));
    let held = conn.peek("jobs", 10).await.unwrap();
    assert_eq!((held.len(), held[0].message_id, held[0].replay_count), (1, ids[0], 1), "{held:?}");
}

#[tokio::test]
async fn a_moved_message_gets_a_fresh_delivery_count_and_keeps_its_deaths() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let jobs = QueueOptions { max_deliveries: Some(2), ..Default::default() };
    let dead = declare_with_dead_letter(&conn, "jobs", jobs).await;
    let id = conn.publish("jobs", "payload", PublishOptions::default()).await.unwrap();
    let mut consumer =
        conn.consume("jobs", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    for attempt in 1..=2 {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(delivery.delivery_count, attempt);
        let error = format!("attempt {attempt} failed");
        delivery.nack_with(true, NackOptions { error, delay: None }).await.unwrap();
    }
    stats_eventually(&conn, &dead, |i| i.ready == 1).await;
    // Delivered once from the dead-letter queue too, and given back.
    let mut looking =
        conn.consume(&dead, ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    assert_eq!(next_delivery(&mut looking).await.delivery_count, 1);
    assert_eq!(looking.cancel().await.unwrap(), 1);
    let before = conn.peek(&dead, 1).await.unwrap().remove(0);
    assert_eq!((before.message_id, before.delivery_count, before.replay_count), (id, 1, 0), "{before:?}");
    let death = before.last_death().expect("a death");
    assert_eq!(
        (death.queue.as_str(), death.reason.as_str(), death.count, death.error.as_str()),
        ("jobs", "delivery_limit", 2, "attempt 2 failed")
    );

    let info = move_to_end(&conn, MoveOptions { source: dead.clone(), ..Default::default() }).await;
    assert_eq!(info.moved, 1);
    let back = next_delivery(&mut consumer).await;
    assert_eq!((back.message_id, body_text(&back).as_str()), (id, "payload"));
    assert_eq!((back.delivery_count, back.redelivered, back.replay_count), (1, false, 1), "fresh count");
    assert_eq!(back.deaths, before.deaths, "the death history is kept");

    // It fails again: a second death is appended, and a second move counts a second replay.
    back.reject_with("still broken").await.unwrap();
    stats_eventually(&conn, &dead, |i| i.ready == 1).await;
    let again = conn.peek(&dead, 1).await.unwrap().remove(0);
    let reasons: Vec<&str> = again.deaths.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!((reasons, again.replay_count), (vec!["delivery_limit", "rejected"], 1), "{again:?}");
    assert_eq!(again.deaths[0], before.deaths[0]);
    move_to_end(&conn, MoveOptions { source: dead.clone(), ..Default::default() }).await;
    let replayed = next_delivery(&mut consumer).await;
    assert_eq!((replayed.delivery_count, replayed.redelivered, replayed.replay_count), (1, false, 2));
    assert_eq!(replayed.deaths, again.deaths);
    replayed.ack().await.unwrap();
}

#[tokio::test]
async fn cancel_stops_a_slow_move_and_nothing_is_lost() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    declare(&conn, &["src", "dst"]).await;
    publish_all(&conn, "src", (0..100).map(|i| format!("m{i}"))).await;
    let started = conn.start_move(MoveOptions { rate: Some(5), ..to("src", "dst") }).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while move_info(&conn, started.id).await.moved < 2 {
        assert!(Instant::now() < deadline, "the move does not progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    conn.cancel_move(started.id).await.unwrap();
    let info = ended(&conn, started.id).await;
    assert_eq!(info.state, MoveState::Cancelled, "{info:?}");
    assert!(info.moved >= 2 && info.moved < 100, "{info:?}");
    assert_eq!(info.moved + info.remaining, 100, "{info:?}");
    assert!(info.finished_ms.is_some(), "{info:?}");
    let (src, dst) = (conn.queue_stats("src").await.unwrap(), conn.queue_stats("dst").await.unwrap());
    assert_eq!((dst.ready, src.ready), (info.moved, info.remaining), "src: {src:?}, dst: {dst:?}");
    assert_eq!(move_info(&conn, started.id).await, info, "an ended move stays as it ended");

    let unknown = conn.cancel_move(started.id + 100).await.unwrap_err();
    assert_eq!(unknown.code(), Some(ErrorCode::NotFound), "{unknown}");
}

#[tokio::test]
async fn a_move_needs_two_existing_different_queues() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    declare(&conn, &["src"]).await;
    for (options, code) in [
        (to("src", "src"), ErrorCode::InvalidArgument),
        (to("src", "ghost"), ErrorCode::NotFound),
        (to("ghost", "src"), ErrorCode::NotFound),
    ] {
        let refused = conn.start_move(options.clone()).await.unwrap_err();
        assert_eq!(refused.code(), Some(code), "{options:?}: {refused}");
    }
    assert!(conn.list_moves().await.unwrap().is_empty(), "no move was started");
}

#[tokio::test]
async fn deleting_the_source_fails_a_running_move() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    declare(&conn, &["src", "dst"]).await;
    publish_all(&conn, "src", (0..100).map(|i| format!("m{i}"))).await;
    let started = conn.start_move(MoveOptions { rate: Some(5), ..to("src", "dst") }).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while move_info(&conn, started.id).await.moved < 1 {
        assert!(Instant::now() < deadline, "the move does not progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    conn.delete_queue("src", Default::default()).await.unwrap();
    let info = ended(&conn, started.id).await;
    assert_eq!(info.state, MoveState::Failed, "{info:?}");
    assert!(!info.error.is_empty(), "a failed move says why: {info:?}");
    assert!(info.moved >= 1 && info.moved < 100, "{info:?}");
    assert_eq!(conn.queue_stats("dst").await.unwrap().ready, info.moved);
}

#[tokio::test]
async fn a_full_destination_fails_the_move_and_keeps_the_rest_in_the_source() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    declare(&conn, &["src"]).await;
    let small = QueueOptions { max_length: Some(3), overflow: Overflow::RejectPublish, ..Default::default() };
    conn.declare_queue("small", small).await.unwrap();
    publish_all(&conn, "src", (0..5).map(|i| format!("m{i}"))).await;

    let started = conn.start_move(to("src", "small")).await.unwrap();
    let info = ended(&conn, started.id).await;
    assert_eq!((info.state.clone(), info.moved), (MoveState::Failed, 3), "{info:?}");
    assert!(info.error.contains("queue 'small' is full"), "{info:?}");
    assert_eq!(ready_bodies(&conn, "small").await, ["m0", "m1", "m2"]);
    assert_eq!(ready_bodies(&conn, "src").await, ["m3", "m4"], "the refused message went back in place");

    // The CLI reports the failed move and exits non-zero.
    let failed = run_cli(&broker, &["queue", "move", "src", "--to", "small"]).await;
    let error = failed.assert_one_line_error();
    assert!(error.contains("failed") && error.contains("queue 'small' is full"), "{failed}");
    let summary = failed.stdout.trim();
    assert!(summary.starts_with("moved 0 messages from src to small (skipped 0) in "), "{failed}");
    assert!(summary.contains(": failed: ") && summary.contains("queue 'small' is full"), "{failed}");
    assert_eq!(ready_bodies(&conn, "src").await, ["m3", "m4"]);
}

#[tokio::test]
async fn peek_shows_only_ready_messages() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    declare(&conn, &["q"]).await;
    let later = PublishOptions { delay: Some(Duration::from_secs(60)), ..Default::default() };
    conn.publish("q", "delayed", later).await.unwrap();
    publish_all(&conn, "q", ["first", "second", "third"]).await;
    let options = ConsumeOptions { prefetch: 1, limit: Some(1), ..Default::default() };
    let mut consumer = conn.consume("q", options).await.unwrap();
    let out = next_delivery(&mut consumer).await;
    assert_eq!(body_text(&out), "first");
    assert_eq!(ready_bodies(&conn, "q").await, ["second", "third"], "neither delayed nor unacked");
    assert_eq!(ready_bodies(&conn, "q").await.len(), conn.queue_stats("q").await.unwrap().ready as usize);
    out.ack().await.unwrap();
}

#[tokio::test]
async fn a_crash_in_the_middle_of_a_move_loses_nothing() {
    const MESSAGES: usize = 2000;
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    let durable = QueueOptions { durable: true, ..Default::default() };
    let dead = declare_with_dead_letter(&conn, "work", durable).await;
    let ids = publish_all(&conn, &dead, (0..MESSAGES).map(|i| format!("m{i}"))).await;

    let started = conn.start_move(MoveOptions { rate: Some(1000), ..to(&dead, "work") }).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    let moved = loop {
        let info = move_info(&conn, started.id).await;
        assert!(info.state.is_running(), "the move ended before the crash: {info:?}");
        if info.moved >= 300 {
            break info.moved;
        }
        assert!(Instant::now() < deadline, "the move does not progress: {info:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    broker.kill();
    broker.restart();
    let conn = connect(&broker).await;

    let in_source = conn.peek(&dead, 10_000).await.unwrap();
    let in_destination = conn.peek("work", 10_000).await.unwrap();
    assert!(
        in_destination.len() as u64 >= moved,
        "{moved} were confirmed moved before the crash, {} are in the destination",
        in_destination.len()
    );
    assert!(in_destination.iter().all(|m| m.replay_count == 1), "moved messages count their replay");
    assert!(in_source.iter().all(|m| m.replay_count == 0));
    let published: HashSet<u64> = ids.iter().copied().collect();
    let found: HashSet<u64> = in_source.iter().chain(&in_destination).map(|m| m.message_id).collect();
    let lost: Vec<u64> = published.difference(&found).copied().collect();
    assert!(lost.is_empty(), "{} messages were lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(10)]);
    assert!(found.is_subset(&published), "messages appeared from nowhere");

    // The move can be run again to the end.
    move_to_end(&conn, to(&dead, "work")).await;
    let all = conn.peek("work", 10_000).await.unwrap();
    let found: HashSet<u64> = all.iter().map(|m| m.message_id).collect();
    assert_eq!(found, published);
    assert_eq!(conn.queue_stats(&dead).await.unwrap().ready, 0);
}

#[tokio::test]
async fn hopper_queue_move_prints_a_summary_and_queue_moves_lists_it() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    declare(&conn, &["src", "dst"]).await;
    publish_all(&conn, "src", (0..8).map(|i| format!("m{i}"))).await;

    let moved = run_cli(&broker, &["queue", "move", "src", "--to", "dst", "--limit", "5"]).await;
    moved.assert_success();
    let lines: Vec<&str> = moved.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{moved}");
    assert!(lines[0].starts_with("moved 5 messages from src to dst (skipped 0) in "), "{moved}");
    assert!(lines[0].ends_with("s: finished"), "{moved}");
    assert_eq!(ready_bodies(&conn, "dst").await, ["m0", "m1", "m2", "m3", "m4"]);

    let listed = run_cli(&broker, &["queue", "moves", "--json"]).await;
    listed.assert_success();
    let moves = listed.json();
    let moves = moves.as_array().expect("a JSON array");
    assert_eq!(moves.len(), 1, "{listed}");
    let first = &moves[0];
    assert_eq!((&first["source"], &first["destination"]), (&"src".into(), &"dst".into()), "{first}");
    assert_eq!(
        (&first["state"], &first["moved"], &first["limit"]),
        (&"finished".into(), &5.into(), &5.into())
    );
    assert_eq!(
        (&first["remaining"], &first["skipped"], &first["rate"]),
        (&3.into(), &0.into(), &serde_json::Value::Null)
    );
    assert!(first["finished_ms"].as_u64() >= first["started_ms"].as_u64(), "{first}");

    // A detached move returns at once; --cancel stops it and reports where it got.
    let detached =
        run_cli(&broker, &["queue", "move", "src", "--to", "dst", "--rate", "1", "--detach"]).await;
    detached.assert_success();
    let id = detached.stdout.trim().strip_prefix("started move ").expect("`started move ID`");
    let id: u64 = id.parse().expect("a move id");
    let cancelled = run_cli(&broker, &["queue", "move", "--cancel", &id.to_string()]).await;
    cancelled.assert_success();
    assert!(cancelled.stdout.trim().ends_with(": cancelled"), "{cancelled}");
    let info = move_info(&conn, id).await;
    assert_eq!(info.state, MoveState::Cancelled);
    assert_eq!(info.moved + conn.queue_stats("src").await.unwrap().ready, 3, "{info:?}");
    let listed = run_cli(&broker, &["queue", "moves", "--json"]).await.json();
    assert_eq!(listed[1]["state"], "cancelled", "{listed}");
}
