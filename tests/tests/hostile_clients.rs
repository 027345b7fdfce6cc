//! What a hostile or careless client can send, one test per way it once hurt the broker: each
//! gets a clear error (or is contained), and nothing else changes — the messages stay, other
//! clients are served, the connection stays usable.

use std::time::Duration;

use futures::StreamExt;
use hopper_client::{
    ConsumeOptions, GetOptions, MoveOptions, MoveState, NackOptions, Overflow, PublishOptions, QueueOptions,
};
use hopper_proto::{pb, Body, ErrorCode};
use hopper_tests::{
    assert_serves, connect, declare_with_dead_letter, eventually, publish_all, stats_eventually, within,
    Broker, Http, RawConn, DEADLINE,
};
use serde_json::json;

/// Sends `body` on `raw` and returns the code and text of the error it is answered with.
async fn refused(raw: &mut RawConn, body: Body) -> (ErrorCode, String) {
    let request_id = raw.request(body).await;
    raw.error_response(request_id).await
}

/// Checks an INVALID_ARGUMENT that names `field` and the longest duration.
#[track_caller]
fn assert_duration_refused((code, message): (ErrorCode, String), field: &str) {
    assert_eq!(code, ErrorCode::InvalidArgument, "{message}");
    assert!(message.contains(field) && message.contains("4294967295"), "{message}");
}

/// The next `Deliver` on `raw`, skipping other events.
async fn next_deliver(raw: &mut RawConn) -> pb::Deliver {
    loop {
        match raw.recv_skipping_heartbeats().await.expect("the connection is open").body {
            Some(Body::Deliver(deliver)) => return deliver,
            Some(_) => continue,
            None => panic!("a frame without a body"),
        }
    }
}

#[tokio::test]
async fn durations_beyond_the_limit_are_refused_and_nothing_changes() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "q", ["kept"]).await;
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let max = u64::MAX;

    let settings = pb::QueueSettings { ack_timeout_ms: max, ..Default::default() };
    let declare = pb::QueueDeclare { name: "forever".into(), settings: Some(settings), ..Default::default() };
    assert_duration_refused(refused(&mut raw, Body::QueueDeclare(declare)).await, "ack_timeout_ms");
    let publish = |ttl_ms, delay_ms| {
        Body::Publish(pb::Publish {
            queue: "q".into(),
            body: "x".into(),
            ttl_ms,
            delay_ms,
            ..Default::default()
        })
    };
    assert_duration_refused(refused(&mut raw, publish(max, 0)).await, "ttl_ms");
    assert_duration_refused(refused(&mut raw, publish(0, max)).await, "delay_ms");
    let consume = pb::Consume { queue: "q".into(), ack_timeout_ms: max, ..Default::default() };
    assert_duration_refused(refused(&mut raw, Body::Consume(consume)).await, "ack_timeout_ms");
    let get = pb::Get { queue: "q".into(), count: 1, visibility_ms: max, ..Default::default() };
    assert_duration_refused(refused(&mut raw, Body::Get(get)).await, "visibility_ms");

    // A delivery cannot be extended or nacked into the past either; it stays held, and acks.
    let consume = pb::Consume { queue: "q".into(), prefetch_count: 1, ..Default::default() };
    let consumer_id = match raw.call(Body::Consume(consume)).await {
        Body::ConsumeOk(ok) => ok.consumer_id,
        other => panic!("expected ConsumeOk, got {other:?}"),
    };
    let tag = next_deliver(&mut raw).await.delivery_tag;
    let extend = pb::Extend { consumer_id, delivery_tag: tag, extend_ms: max };
    assert_duration_refused(refused(&mut raw, Body::Extend(extend)).await, "extend_ms");
    let nack =
        pb::Nack { consumer_id, delivery_tag: tag, requeue: true, delay_ms: Some(max), ..Default::default() };
    assert_duration_refused(refused(&mut raw, Body::Nack(nack)).await, "delay_ms");
    let ack = pb::Ack { consumer_id, delivery_tag: tag, confirm: true, ..Default::default() };
    assert!(matches!(raw.call(Body::Ack(ack)).await, Body::SettleOk(ok) if ok.settled == 1));
    let info = conn.queue_stats("q").await.unwrap();
    assert_eq!((info.published_total, info.delivered_total, info.acked_total), (1, 1, 1), "{info:?}");
    assert!(info.dead_lettered.is_empty() && info.redelivered_total == 0, "{info:?}");

    // The same over HTTP: a TTL of 1e300 seconds, infinite or NaN query numbers.
    let http = Http::of(&broker);
    let huge = http.post_json("/api/queues/q/messages", &json!({"body": "x", "ttl": 1e300})).await;
    assert!(huge.assert_error(400, "INVALID_ARGUMENT").contains("ttl_ms"), "{huge}");
    for query in ["visibility=inf", "visibility=1e309", "visibility=-1", "wait=NaN", "wait=inf", "wait=-2"] {
        let response = http.get(&format!("/api/queues/q/messages?{query}")).await;
        response.assert_error(400, "INVALID_ARGUMENT");
    }
    assert_eq!(conn.queue_stats("q").await.unwrap().published_total, 1, "nothing was published");
    assert_serves(&broker).await;
}

#[tokio::test]
async fn a_get_takes_only_what_its_answer_can_carry() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "q", (0..10).map(|i| format!("{i}{}", "x".repeat(20_000)))).await;

    // A count far beyond the limit is refused, and nothing is taken.
    let mut raw = RawConn::connect(broker.addr()).await;
    raw.hello(0, 64 * 1024).await;
    let huge = pb::Get { queue: "q".into(), count: 4_000_000_000, ..Default::default() };
    let (code, message) = refused(&mut raw, Body::Get(huge)).await;
    assert_eq!(code, ErrorCode::InvalidArgument, "{message}");
    assert!(message.contains("1000"), "{message}");
    assert_eq!(conn.queue_stats("q").await.unwrap().unacked, 0);

    // With a 64 KiB frame, ten 20 KB messages do not fit one answer: it carries what fits and
    // the rest stays ready.
    let get = pb::Get { queue: "q".into(), count: 10, visibility_ms: 60_000, ..Default::default() };
    let got = match raw.call(Body::Get(get)).await {
        Body::GetOk(ok) => ok.deliveries.len() as u64,
        other => panic!("expected GetOk, got {other:?}"),
    };
    assert!((1..10).contains(&got), "{got} deliveries in one 64 KiB frame");
    let info = conn.queue_stats("q").await.unwrap();
    assert_eq!((info.unacked, info.ready), (got, 10 - got), "{info:?}");
}

#[tokio::test]
async fn a_delivery_larger_than_its_consumer_can_take_is_dead_lettered() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let queue = declare_with_dead_letter(&conn, "big", QueueOptions::default()).await;
    publish_all(&conn, "big", ["y".repeat(100_000), "small".to_string()]).await;

    let mut raw = RawConn::connect(broker.addr()).await;
    raw.hello(0, 64 * 1024).await;
    let consume = pb::Consume { queue: "big".into(), prefetch_count: 1, ..Default::default() };
    assert!(matches!(raw.call(Body::Consume(consume)).await, Body::ConsumeOk(_)));
    // The consumer is not wedged: it gets the small message.
    let deliver = next_deliver(&mut raw).await;
    assert_eq!(&deliver.message.unwrap().body[..], b"small");
    let dead = stats_eventually(&conn, &queue, |info| info.ready == 1).await;
    assert_eq!(dead.ready, 1);
    let info = conn.queue_stats("big").await.unwrap();
    assert_eq!(info.dead_lettered.get("too_large"), Some(&1), "{info:?}");
    let mut dlq = conn.consume(&queue, ConsumeOptions::default()).await.unwrap();
    let delivery = within("the dead-lettered message", dlq.next()).await.unwrap().unwrap();
    let death = delivery.deaths.last().unwrap();
    assert_eq!(death.reason, "too_large");
    assert!(death.error.contains("65536"), "{}", death.error);
    assert_eq!(delivery.body.len(), 100_000, "dead-lettered whole");
}

#[tokio::test]
async fn a_get_after_its_queue_was_deleted_and_declared_again_works() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let get = || Body::Get(pb::Get { queue: "q".into(), count: 1, ..Default::default() });
    assert_eq!(refused(&mut raw, get()).await.0, ErrorCode::NotFound);
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    assert!(matches!(raw.call(get()).await, Body::GetOk(ok) if ok.deliveries.is_empty()));
    conn.delete_queue("q", Default::default()).await.unwrap();
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    let id = publish_all(&conn, "q", ["again"]).await[0];
    match raw.call(get()).await {
        Body::GetOk(ok) => assert_eq!(ok.deliveries[0].message.as_ref().unwrap().message_id, id),
        other => panic!("expected the message, got {other:?}"),
    }
}

#[tokio::test]
async fn a_move_into_a_queue_that_pushes_messages_back_ends() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("d", QueueOptions::default()).await.unwrap();
    let bounded = QueueOptions {
        max_length: Some(1),
        overflow: Overflow::DropHead,
        dead_letter: Some("d".into()),
        ..Default::default()
    };
    conn.declare_queue("q", bounded).await.unwrap();
    publish_all(&conn, "d", ["a", "b"]).await;
    let options = MoveOptions { source: "d".into(), destination: Some("q".into()), ..Default::default() };
    let started = conn.start_move(options).await.unwrap();
    let id = started.id;
    eventually("the move to end", DEADLINE, || async {
        let moves = conn.list_moves().await.unwrap();
        moves.iter().any(|m| m.id == id && m.state != MoveState::Running)
    })
    .await;
    let ended = conn.list_moves().await.unwrap().into_iter().find(|m| m.id == id).unwrap();
    assert_eq!((&ended.state, ended.moved), (&MoveState::Finished, 2), "{ended:?}");
    let (q, d) = (conn.queue_stats("q").await.unwrap(), conn.queue_stats("d").await.unwrap());
    assert_eq!((q.ready, d.ready), (1, 1), "b in q, a pushed back into d: {q:?} {d:?}");
}

#[tokio::test]
async fn concurrent_alarm_writes_all_succeed_and_the_last_one_sticks() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_in(data_dir.path(), &[]);
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    let mut writers = Vec::new();
    for writer in 0..8u64 {
        let conn = connect(&broker).await;
        writers.push(tokio::spawn(async move {
            for n in 0..50u64 {
                conn.set_alarm("q", Some(1 + writer * 100 + n)).await.expect("every write succeeds");
            }
        }));
    }
    for writer in writers {
        within("alarm writers", writer).await.unwrap();
    }
    let last = conn.queue_stats("q").await.unwrap().alarm_depth;
    broker.terminate();
    broker.restart();
    let conn = connect(&broker).await;
    assert_eq!(conn.queue_stats("q").await.unwrap().alarm_depth, last, "the file holds the last value set");
}

#[tokio::test]
async fn peeking_at_stored_bodies_does_not_count_them_as_held_in_memory() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_in(data_dir.path(), &["--queue-memory-bytes", "4096"]);
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    publish_all(&conn, "q", (0..200).map(|i| format!("{i:04}{}", "p".repeat(1000)))).await;
    broker.terminate();
    broker.restart();
    let conn = connect(&broker).await;
    conn.declare_queue("probe", QueueOptions::default()).await.unwrap();
    let memory = || async { conn.status().await.unwrap().memory_used };
    // The reading is the monitor's last sample: wait for one taken since the restart (the
    // queue's index entries make it non-zero), or the first sample would look like the peeks.
    eventually("the monitor's first reading", DEADLINE, || async { memory().await > 0 }).await;
    let start = memory().await;
    for _ in 0..20 {
        assert_eq!(conn.peek("q", 100).await.unwrap().len(), 100);
    }
    // A known amount published afterwards shows once the monitor has sampled past the peeks.
    publish_all(&conn, "probe", ["z".repeat(10_000)]).await;
    eventually("the memory reading to take in the probe", DEADLINE, || async { memory().await > start })
        .await;
    let after = memory().await;
    assert!(after < start + 10_000 + 1024, "peeks were counted: {start} then {after}");
}

#[tokio::test]
async fn a_message_cycling_between_dead_letter_queues_keeps_a_bounded_history() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("a", QueueOptions { dead_letter: Some("b".into()), ..Default::default() })
        .await
        .unwrap();
    conn.declare_queue("b", QueueOptions { dead_letter: Some("a".into()), ..Default::default() })
        .await
        .unwrap();
    let id = publish_all(&conn, "a", ["ping-pong"]).await[0];
    let mut queue = "a";
    for round in 0..40 {
        let got = within("the cycling message", async {
            loop {
                let got = conn.get(queue, GetOptions::default()).await.unwrap();
                if !got.is_empty() {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        assert_eq!(got[0].message_id, id);
        assert_eq!(got[0].deaths.len(), round.min(16), "round {round}");
        got[0]
            .nack_with(false, NackOptions { error: format!("round {round}"), ..Default::default() })
            .await
            .unwrap();
        queue = if queue == "a" { "b" } else { "a" };
    }
    let last = conn.get(queue, GetOptions { wait: Some(DEADLINE), ..Default::default() }).await.unwrap();
    assert_eq!(last[0].deaths.len(), 16);
    assert_eq!(last[0].deaths_omitted, 40 - 16);
    assert_eq!(last[0].deaths[0].error, "round 0", "the first death is kept");
    assert_eq!(last[0].deaths[15].error, "round 39", "and the latest");
}

#[tokio::test]
async fn header_bytes_count_against_max_bytes() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    let bounded = QueueOptions { max_bytes: Some(1000), ..Default::default() };
    conn.declare_queue("q", bounded).await.unwrap();
    let headers =
        || PublishOptions { headers: [("k".to_string(), "v".repeat(600))].into(), ..Default::default() };
    conn.publish("q", "", headers()).await.expect("the first fits");
    let second = conn.publish("q", "", headers()).await.unwrap_err();
    assert_eq!(second.code(), Some(ErrorCode::ResourceLimit), "{second}");
    let info = conn.queue_stats("q").await.unwrap();
    assert_eq!((info.ready, info.waiting_bytes), (1, 601), "{info:?}");
}

#[tokio::test]
async fn a_worker_that_consumes_and_publishes_on_one_connection_drains_a_blocked_broker() {
    let broker = Broker::start_with(&["--memory-high-watermark", "20000"]);
    let feeder = connect(&broker).await;
    let worker = connect(&broker).await;
    feeder.declare_queue("in", QueueOptions::default()).await.unwrap();
    feeder.declare_queue("out", QueueOptions::default()).await.unwrap();
    // The worker is a publisher before the block.
    worker.publish("out", "hello", PublishOptions::default()).await.unwrap();
    let mut deliveries =
        worker.consume("in", ConsumeOptions { prefetch: 10, ..Default::default() }).await.unwrap();
    publish_all(&feeder, "in", (0..5).map(|i| format!("{i}{}", "w".repeat(8000)))).await;
    eventually("publishers to be blocked", DEADLINE, || async {
        feeder.status().await.unwrap().blocked.is_some()
    })
    .await;

    // For each job: publish the result (held back while blocked), then ack the job, which
    // the broker still reads, so memory drains and the results go through.
    let mut confirms = Vec::new();
    for _ in 0..5 {
        let job = within("a job", deliveries.next()).await.unwrap().unwrap();
        confirms.push(worker.publish("out", job.body.clone(), PublishOptions::default()));
        job.ack().await.unwrap();
    }
    for confirm in confirms {
        within("the worker's publish confirm", confirm).await.expect("confirmed once unblocked");
    }
    let out = stats_eventually(&feeder, "out", |info| info.ready == 6).await;
    assert_eq!(out.published_total, 6);
    assert_eq!(feeder.queue_stats("in").await.unwrap().acked_total, 5);
}
