//! Failures around the broker: consumers that die or go silent, broker shutdown and crash,
//! and startup errors.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use hopper_client::{ConnectOptions, ConsumeOptions, Delivery, Error, QueueOptions};
use hopper_proto::{pb, Body, Frame};
use hopper_tests::{
    body_text, cli, command, connect, connect_with, json_id, next_deliveries, next_delivery, publish_all,
    run, stats_eventually, within, Broker, RawConn,
};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Consumes every message of `queue` (which must end up holding exactly `ids`) with a fresh
/// consumer, acking each, and returns the deliveries by message id. Fails on a duplicate.
async fn drain_exactly(conn: &hopper_client::Connection, queue: &str, ids: &[u64]) -> HashMap<u64, Delivery> {
    let mut consumer =
        conn.consume(queue, ConsumeOptions { prefetch: 50, ..Default::default() }).await.unwrap();
    let mut seen = HashMap::new();
    while seen.len() < ids.len() {
        let delivery = next_delivery(&mut consumer).await;
        delivery.ack().await.unwrap();
        let id = delivery.message_id;
        assert!(seen.insert(id, delivery).is_none(), "message {id} was delivered twice");
    }
    let expected: HashSet<u64> = ids.iter().copied().collect();
    let got: HashSet<u64> = seen.keys().copied().collect();
    assert_eq!(got, expected, "every published message came back");
    let info = stats_eventually(conn, queue, |info| info.acked_total == ids.len() as u64).await;
    assert_eq!((info.ready, info.unacked), (0, 0), "{info:?}");
    assert!(consumer.next().now_or_never().is_none(), "nothing beyond the published messages");
    seen
}

#[tokio::test]
async fn consumer_process_killed_mid_stream_loses_nothing() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    let ids = publish_all(&conn, "jobs", (0..100).map(|i| format!("job {i}"))).await;

    let mut consume = cli(&broker);
    consume.args(["consume", "jobs", "--prefetch", "10", "--action", "hold", "--json"]);
    let mut child = tokio::process::Command::from(consume)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn hopper consume");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let mut held = HashSet::new();
    for _ in 0..10 {
        let line =
            within("a line from hopper consume", lines.next_line()).await.unwrap().expect("a JSON line");
        let object: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        held.insert(json_id(&object["message_id"]).expect("message_id"));
    }
    assert_eq!(held.len(), 10);
    stats_eventually(&conn, "jobs", |info| info.unacked == 10).await;
    child.start_kill().expect("SIGKILL the consumer");
    within("the consumer to die", child.wait()).await.expect("reap the consumer");

    let seen = drain_exactly(&conn, "jobs", &ids).await;
    for (id, delivery) in &seen {
        assert_eq!(delivery.redelivered, held.contains(id), "redelivered flag of {delivery:?}");
        assert_eq!(delivery.delivery_count, if held.contains(id) { 2 } else { 1 });
    }
    let info = conn.queue_stats("jobs").await.unwrap();
    assert_eq!((info.delivered_total, info.redelivered_total), (110, 10), "{info:?}");
}

#[tokio::test]
async fn client_dropping_its_connection_mid_stream_loses_nothing() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    let ids = publish_all(&conn, "jobs", (0..100).map(|i| format!("job {i}"))).await;

    let doomed = connect(&broker).await;
    let mut consumer =
        doomed.consume("jobs", ConsumeOptions { prefetch: 10, ..Default::default() }).await.unwrap();
    let held = next_deliveries(&mut consumer, 10).await;
    let held_ids: HashSet<u64> = held.iter().map(|d| d.message_id).collect();
    drop(held);
    drop(consumer);
    drop(doomed);

    let seen = drain_exactly(&conn, "jobs", &ids).await;
    let redelivered: HashSet<u64> = seen.values().filter(|d| d.redelivered).map(|d| d.message_id).collect();
    assert_eq!(redelivered, held_ids);
}

#[tokio::test]
async fn closing_a_connection_with_unacked_deliveries_requeues_them() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    let ids = publish_all(&conn, "jobs", (0..20).map(|i| i.to_string())).await;

    let closing = connect(&broker).await;
    let mut consumer =
        closing.consume("jobs", ConsumeOptions { prefetch: 5, ..Default::default() }).await.unwrap();
    let held = next_deliveries(&mut consumer, 5).await;
    // The consumer and its deliveries are still alive: only the connection goes away.
    within("close", closing.close()).await.unwrap();
    assert!(closing.is_closed());
    assert!(within("the stream to end", consumer.next()).await.is_none(), "after close the stream just ends");

    let seen = drain_exactly(&conn, "jobs", &ids).await;
    for delivery in &held {
        assert!(seen[&delivery.message_id].redelivered);
    }
}

#[tokio::test]
async fn silent_peer_is_dropped_after_missed_heartbeats_and_its_delivery_moves_on() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("hb", QueueOptions::default()).await.unwrap();
    // A client that heartbeats at the same rate must outlive the silent one.
    let options = ConnectOptions { heartbeat: Duration::from_millis(100), ..Default::default() };
    let alive = connect_with(&broker, options).await;
    assert_eq!(alive.heartbeat(), Duration::from_millis(100));
    let id = conn.publish("hb", "beat", Default::default()).await.unwrap();

    let mut raw = RawConn::connect(broker.addr()).await;
    let ok = raw.hello(100, 0).await;
    assert_eq!(ok.heartbeat_ms, 100);
    let consume =
        pb::Consume { queue: "hb".into(), prefetch_count: 1, tag: "silent".into(), ..Default::default() };
    let request_id = raw.request(Body::Consume(consume)).await;
    assert!(matches!(raw.response(request_id).await, Body::ConsumeOk(_)));
    match raw.recv_skipping_heartbeats().await.and_then(|f| f.body) {
        Some(Body::Deliver(deliver)) => assert_eq!(deliver.message.map(|m| m.message_id), Some(id)),
        other => panic!("expected the delivery, got {other:?}"),
    }
    let silent_since = Instant::now();
    stats_eventually(&conn, "hb", |info| info.unacked == 1).await;

    // From now on the raw connection only reads.
    let frames = raw.expect_eof_within(Duration::from_secs(5)).await;
    let closes: Vec<&Frame> = frames.iter().filter(|f| matches!(f.body, Some(Body::Close(_)))).collect();
    assert_eq!(closes.len(), 1, "the broker says why it closes: {frames:?}");
    // Two intervals of silence are allowed, counted from the broker's last read, which came a
    // little before `silent_since`: at least one full interval must have passed here.
    assert!(silent_since.elapsed() >= Duration::from_millis(100), "closed only after missed heartbeats");

    let mut consumer =
        conn.consume("hb", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!((delivery.message_id, delivery.redelivered, delivery.delivery_count), (id, true, 2));
    assert_eq!(body_text(&delivery), "beat");

    assert!(!alive.is_closed());
    alive.queue_stats("hb").await.expect("the heartbeating client is still connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_and_exits_zero() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    let mut consumer = conn.consume("q", ConsumeOptions::default()).await.unwrap();

    broker.signal_terminate();
    match within("the client to see the close", consumer.next()).await {
        Some(Err(Error::Closed(reason))) => assert!(!reason.is_empty()),
        other => panic!("expected Error::Closed from the consumer, got {other:?}"),
    }
    assert!(conn.is_closed());
    match conn.queue_stats("q").await {
        Err(Error::Closed(_)) => {}
        other => panic!("expected Error::Closed for a request after shutdown, got {other:?}"),
    }
    let status = broker.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "hopperd exits 0 after SIGTERM; stderr:\n{}", broker.stderr());
    assert!(broker.stderr().contains("shutting down"), "{}", broker.stderr());
}

#[tokio::test]
async fn broker_crash_fails_clients_with_closed() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    let mut consumer = conn.consume("q", ConsumeOptions::default()).await.unwrap();
    broker.kill();
    match within("the client to see the crash", consumer.next()).await {
        Some(Err(Error::Closed(_))) => {}
        other => panic!("expected Error::Closed from the consumer, got {other:?}"),
    }
    assert!(matches!(conn.publish("q", "x", Default::default()).await, Err(Error::Closed(_))));
    assert!(conn.is_closed());
}

#[tokio::test]
async fn connecting_to_nothing_is_an_io_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    match hopper_client::Connection::connect(port).await {
        Err(Error::Io(_)) => {}
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

/// Runs `hopperd` with `args` (and a fresh data directory and a free port unless `args` name
/// them) and expects it to fail at startup with exit code 1 and stderr starting with a
/// `hopperd: error:` line. Returns the whole of stderr.
async fn startup_failure(args: &[&str]) -> String {
    let data_dir = tempfile::tempdir().unwrap();
    let mut hopperd = command("hopperd");
    if !args.contains(&"--data-dir") {
        hopperd.arg("--data-dir").arg(data_dir.path());
    }
    if !args.contains(&"--listen") {
        hopperd.args(["--listen", "127.0.0.1:0"]);
    }
    hopperd.args(args);
    let output = run(hopperd).await;
    assert_eq!(output.status.code(), Some(1), "{output}");
    assert!(output.stderr.starts_with("hopperd: error: "), "{output}");
    output.stderr
}

/// Like [`startup_failure`], and the error must be exactly one line; returns it.
async fn startup_error(args: &[&str]) -> String {
    let stderr = startup_failure(args).await;
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr:\n{stderr}");
    lines[0].to_string()
}

/// Config files that `hopperd` must refuse, by file name.
const BAD_CONFIGS: [(&str, &str); 4] = [
    ("syntax.toml", "listen = [\n"),
    ("unknown.toml", "lisen = \"127.0.0.1:0\"\n"),
    ("type.toml", "heartbeat_ms = \"often\"\n"),
    ("range.toml", "max_frame_size = 10\n"),
];

#[tokio::test]
async fn port_already_in_use_is_one_line_and_exit_code_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let line = startup_error(&["--listen", &addr]).await;
    assert!(line.contains(&addr), "the error names the address: {line}");
}

#[tokio::test]
async fn bad_config_file_is_an_error_and_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in BAD_CONFIGS {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let stderr = startup_failure(&["--config", path.to_str().unwrap()]).await;
        assert!(stderr.contains("config"), "{name}: {stderr}");
    }
    let missing = dir.path().join("missing.toml");
    let line = startup_error(&["--config", missing.to_str().unwrap()]).await;
    assert!(line.contains("missing.toml"), "{line}");
    let line = startup_error(&["--config", dir.path().join("range.toml").to_str().unwrap()]).await;
    assert!(line.contains("max_frame_size"), "{line}");
}

#[tokio::test]
async fn bad_config_file_error_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in BAD_CONFIGS {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let line = startup_error(&["--config", path.to_str().unwrap()]).await;
        // A value out of range is checked after flags and environment are merged in, so it
        // names the setting rather than the file.
        let names = if name == "range.toml" { "max_frame_size" } else { name };
        assert!(line.contains(names), "the error names the file or setting: {line}");
    }
}

#[tokio::test]
async fn data_dir_in_use_is_one_line_and_exit_code_1() {
    let broker = Broker::start();
    let dir = broker.data_dir().to_str().unwrap().to_string();
    let line = startup_error(&["--data-dir", &dir]).await;
    assert!(line.contains(&dir), "{line}");

    let file = tempfile::NamedTempFile::new().unwrap();
    startup_error(&["--data-dir", file.path().to_str().unwrap()]).await;
    drop(broker);
}

#[tokio::test]
async fn broker_close_frame_reaches_raw_peers_on_shutdown() {
    let mut broker = Broker::start();
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    broker.signal_terminate();
    let frames = raw.expect_eof().await;
    assert!(
        frames.iter().any(|f| matches!(f.body, Some(Body::Close(_)))),
        "a Close frame precedes the hang-up: {frames:?}"
    );
    assert_eq!(broker.wait_exit(Duration::from_secs(10)).code(), Some(0));
}
