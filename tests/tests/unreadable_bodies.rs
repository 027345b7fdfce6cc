//! Durable messages whose bodies cannot be read at delivery time. A read that fails for a
//! reason that passes (here: the broker ran out of file descriptors) pauses the queue, which
//! says why, and loses nothing; once reads work again every message is delivered exactly as
//! published. A record that is damaged on disk kills only its own message, with reason
//! `corrupt` and the damage described, and never silently.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use hopper_client::{Connection, ConsumeOptions, Delivery, QueueOptions};
use hopper_tests::{
    connect, eventually, log_dir, next_deliveries, publish_all, queue_id, read_segment, receive_backlog,
    records_of, segment_files, stats_eventually, within, Broker, RecordKind, DEADLINE,
};

fn durable() -> QueueOptions {
    QueueOptions { durable: true, ..Default::default() }
}

/// Distinct bodies of about 500 bytes.
fn body(i: usize) -> String {
    format!("message {i:05} {}", "x".repeat(480 + i % 17))
}

/// The soft and hard open-file limits of process `pid`.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read /proc/PID/limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("an open files line");
    let fields: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    (fields[0].to_owned(), fields[1].to_owned())
}

/// Sets the soft open-file limit of process `pid`, leaving the hard limit alone.
fn set_soft_open_file_limit(pid: u32, soft: &str) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --nofile={soft}: failed");
}

/// The lowest descriptor number process `pid` has free: with the soft limit there, the
/// process cannot open another file.
fn lowest_free_descriptor(pid: u32) -> usize {
    let open: std::collections::HashSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|fd| !open.contains(fd)).expect("some descriptor is free")
}

/// Publishes `bodies` `round` at a time, so they are written in many batches (a segment is
/// rolled between batches) and returns their ids.
async fn publish_in_rounds(
    conn: &hopper_client::Connection,
    queue: &str,
    bodies: &[String],
    round: usize,
) -> Vec<u64> {
    let mut ids = Vec::with_capacity(bodies.len());
    for chunk in bodies.chunks(round) {
        ids.extend(publish_all(conn, queue, chunk.to_vec()).await);
    }
    ids
}

/// How many log lines of `broker` contain `text`.
fn lines_with(broker: &Broker, text: &str) -> usize {
    broker.stderr().lines().filter(|line| line.contains(text)).count()
}

#[tokio::test]
async fn running_out_of_file_descriptors_pauses_delivery_and_loses_nothing() {
    const COUNT: usize = 3000;
    let data_dir = tempfile::tempdir().unwrap();
    // Small segments and a small memory budget: after a restart every body is read from one
    // of many segment files, each opened on first use.
    let args = ["--segment-bytes", "65536", "--queue-memory-bytes", "65536"];
    let mut broker = Broker::start_in(data_dir.path(), &args);
    let conn = connect(&broker).await;
    conn.declare_queue("big", durable()).await.unwrap();
    let bodies: Vec<String> = (0..COUNT).map(body).collect();
    let ids = publish_in_rounds(&conn, "big", &bodies, 100).await;
    drop(conn);
    broker.terminate();
    broker.restart();
    assert!(segment_files(&log_dir(data_dir.path(), "big")).len() > 10);

    let pid = broker.pid();
    let conn = connect(&broker).await;
    let (soft, _) = open_file_limits(pid);
    set_soft_open_file_limit(pid, &lowest_free_descriptor(pid).to_string());
    let options = ConsumeOptions { prefetch: 100, ..Default::default() };
    let mut consumer = conn.consume("big", options).await.unwrap();

    let stalled = stats_eventually(&conn, "big", |info| info.read_error.is_some()).await;
    let error = stalled.read_error.clone().unwrap();
    assert!(error.contains("Too many open files"), "{error}");
    assert_eq!((stalled.ready, stalled.unacked), (COUNT as u64, 0), "nothing delivered, nothing dropped");
    assert!(stalled.dead_lettered.is_empty(), "{stalled:?}");
    eventually("one log line saying reads fail", DEADLINE, || async {
        lines_with(&broker, "stored messages cannot be read") == 1
    })
    .await;

    set_soft_open_file_limit(pid, &soft);
    let deliveries: Vec<Delivery> = next_deliveries_acked(&mut consumer, COUNT).await;
    let received: Vec<(u64, String)> =
        deliveries.iter().map(|d| (d.message_id, String::from_utf8_lossy(&d.body).into_owned())).collect();
    let published: Vec<(u64, String)> = ids.into_iter().zip(bodies).collect();
    assert_eq!(received, published, "every message, in order, exactly as published");

    let drained = stats_eventually(&conn, "big", |info| info.unacked == 0).await;
    assert_eq!(drained.ready, 0);
    assert_eq!(drained.read_error, None);
    assert!(drained.dead_lettered.is_empty(), "{drained:?}");
    eventually("one log line saying reads work again", DEADLINE, || async {
        lines_with(&broker, "readable again") == 1
    })
    .await;
    assert_eq!(lines_with(&broker, "stored messages cannot be read"), 1, "one line per change");
}

/// Takes `n` deliveries and acks each.
async fn next_deliveries_acked(consumer: &mut hopper_client::Consumer, n: usize) -> Vec<Delivery> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch = next_deliveries(consumer, 1).await;
        for delivery in batch {
            delivery.ack().await.unwrap();
            all.push(delivery);
        }
    }
    all
}

/// Flips one byte at `offset` of `file`.
fn flip_byte(file: &Path, offset: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    bytes[offset] ^= 0x55;
    std::fs::write(file, bytes).unwrap();
}

#[tokio::test]
async fn a_damaged_record_dead_letters_its_message_as_corrupt_and_nothing_else() {
    const COUNT: usize = 120;
    let data_dir = tempfile::tempdir().unwrap();
    // One log: the dead-letter queue stores the dead messages in the log that holds the damage.
    let args = ["--segment-bytes", "8192", "--queue-memory-bytes", "4096", "--storage-threads", "1"];
    let mut broker = Broker::start_in(data_dir.path(), &args);
    let conn = connect(&broker).await;
    conn.declare_queue("dead", durable()).await.unwrap();
    conn.declare_queue("jobs", QueueOptions { dead_letter: Some("dead".into()), ..durable() }).await.unwrap();
    let bodies: Vec<String> = (0..COUNT).map(|i| format!("job {i:03} {}", "y".repeat(200))).collect();
    let ids = publish_in_rounds(&conn, "jobs", &bodies, 10).await;
    drop(conn);
    broker.terminate();
    broker.restart();

    // Under the running broker: a flipped byte in the body of a record in the oldest segment,
    // and the second segment cut in the middle of its last record.
    let segments = segment_files(&log_dir(data_dir.path(), "jobs"));
    assert!(segments.len() >= 4, "{segments:?}");
    let jobs = queue_id(data_dir.path(), "jobs");
    let publishes = |file: &Path| {
        records_of(&read_segment(file), jobs)
            .into_iter()
            .filter_map(|r| match r.kind {
                RecordKind::Publish { message_id, .. } => Some((r.offset, r.size, message_id)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let (offset, size, flipped) = publishes(&segments[0])[3];
    flip_byte(&segments[0], offset + size - 10);
    let (offset, size, cut) = *publishes(&segments[1]).last().unwrap();
    let length = std::fs::metadata(&segments[1]).unwrap().len();
    assert_eq!(length, (offset + size) as u64, "the segment ends with the record cut");
    let file = std::fs::OpenOptions::new().write(true).open(&segments[1]).unwrap();
    file.set_len((offset + size - 20) as u64).unwrap();
    drop(file);

    let conn = connect(&broker).await;
    let mut consumer =
        conn.consume("jobs", ConsumeOptions { prefetch: 0, ..Default::default() }).await.unwrap();
    let deliveries = next_deliveries_acked(&mut consumer, COUNT - 2).await;
    let received: Vec<u64> = deliveries.iter().map(|d| d.message_id).collect();
    let expected: Vec<u64> = ids.iter().copied().filter(|id| *id != flipped && *id != cut).collect();
    assert_eq!(received, expected, "every intact message is delivered, in order");
    for delivery in &deliveries {
        let at = ids.iter().position(|id| *id == delivery.message_id).unwrap();
        assert_eq!(String::from_utf8_lossy(&delivery.body), bodies[at]);
    }

    let jobs = stats_eventually(&conn, "jobs", |info| info.unacked == 0 && info.ready == 0).await;
    assert_eq!(jobs.dead_lettered, HashMap::from([("corrupt".to_string(), 2)]));
    assert_eq!(jobs.read_error, None);
    stats_eventually(&conn, "dead", |info| info.ready == 2).await;
    let mut dead_consumer = conn.consume("dead", ConsumeOptions::default()).await.unwrap();
    let dead = next_deliveries(&mut dead_consumer, 2).await;
    let mut dead_ids: Vec<u64> = dead.iter().map(|d| d.message_id).collect();
    dead_ids.sort_unstable();
    let mut damaged = vec![flipped, cut];
    damaged.sort_unstable();
    assert_eq!(dead_ids, damaged, "the ids of the damaged records are kept");
    for delivery in &dead {
        let death = delivery.deaths.last().expect("a death record");
        assert_eq!((death.queue.as_str(), death.reason.as_str()), ("jobs", "corrupt"));
        assert!(death.error.contains("segment") && death.error.contains("offset"), "{}", death.error);
        assert!(delivery.body.is_empty(), "the damaged body is not passed on");
    }
    let audit = conn.audit(Some("jobs"), 0, 100).await.unwrap();
    let mut audited: Vec<(u64, &str)> = audit.iter().map(|e| (e.message_id, e.reason.as_str())).collect();
    audited.sort_unstable();
    assert_eq!(audited, vec![(damaged[0], "corrupt"), (damaged[1], "corrupt")]);
    assert!(audit.iter().all(|e| e.error.contains("segment")), "{audit:?}");
}

/// Segment files of process `pid` that are open.
fn open_segment_files(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|target| target.ends_with(".seg"))
        .collect()
}

/// Bodies spread over more segments than `--max-open-segments` are all read, and no more
/// segment files than that stay open for reading (besides the active one, open for writing).
#[tokio::test]
async fn reading_many_segments_keeps_at_most_max_open_segments_files_open() {
    const COUNT: usize = 300;
    const MAX_OPEN: usize = 3;
    let data_dir = tempfile::tempdir().unwrap();
    let max_open = MAX_OPEN.to_string();
    let args = [
        "--segment-bytes",
        "16384",
        "--queue-memory-bytes",
        "4096",
        "--storage-threads",
        "1",
        "--max-open-segments",
        &max_open,
    ];
    let mut broker = Broker::start_in(data_dir.path(), &args);
    let conn = connect(&broker).await;
    conn.declare_queue("big", durable()).await.unwrap();
    let bodies: Vec<String> = (0..COUNT).map(body).collect();
    let ids = publish_in_rounds(&conn, "big", &bodies, 20).await;
    drop(conn);
    broker.terminate();
    broker.restart();
    let segments = segment_files(&log_dir(data_dir.path(), "big")).len();
    assert!(segments > 2 * MAX_OPEN, "{segments} segments");

    // Nothing acked, so no segment is deleted: every one was read and stays on disk.
    let conn = connect(&broker).await;
    let (_consumer, deliveries) = receive_backlog(&conn, "big").await;
    let received: Vec<(u64, String)> =
        deliveries.iter().map(|d| (d.message_id, String::from_utf8_lossy(&d.body).into_owned())).collect();
    assert_eq!(received, ids.into_iter().zip(bodies).collect::<Vec<_>>());
    // A read still under way holds its file for the moment after it was evicted from the
    // cache; what stays open is the cap, the active segment and the next one, made ahead.
    let pid = broker.pid();
    eventually(
        "at most the cap of segment files (and the active and next ones) open",
        DEADLINE,
        || async move { open_segment_files(pid).len() <= MAX_OPEN + 2 },
    )
    .await;
}

#[tokio::test]
async fn a_dead_message_whose_body_cannot_be_read_waits_and_is_then_dead_lettered() {
    let data_dir = tempfile::tempdir().unwrap();
    let args = ["--segment-bytes", "4096", "--queue-memory-bytes", "4096"];
    let mut broker = Broker::start_in(data_dir.path(), &args);
    let conn = connect(&broker).await;
    conn.declare_queue("dead", durable()).await.unwrap();
    let bounded = QueueOptions {
        dead_letter: Some("dead".into()),
        max_length: Some(5),
        overflow: hopper_client::Overflow::DropHead,
        ..durable()
    };
    conn.declare_queue("jobs", bounded).await.unwrap();
    let first: Vec<String> = (0..5).map(body).collect();
    let first_ids = publish_in_rounds(&conn, "jobs", &first, 1).await;
    drop(conn);
    broker.terminate();
    broker.restart();

    // Out of descriptors, five more messages push the first five out: they die (maxlen), but
    // their bodies cannot be read to dead-letter them.
    let pid = broker.pid();
    let conn = connect(&broker).await;
    let (soft, _) = open_file_limits(pid);
    set_soft_open_file_limit(pid, &lowest_free_descriptor(pid).to_string());
    let second: Vec<String> = (5..10).map(body).collect();
    publish_in_rounds(&conn, "jobs", &second, 1).await;
    let waiting = stats_eventually(&conn, "jobs", |info| info.read_error.is_some()).await;
    let error = waiting.read_error.clone().unwrap();
    assert!(error.contains("5 dead message(s)") && error.contains("Too many open files"), "{error}");
    assert_eq!(conn.queue_stats("dead").await.unwrap().ready, 0);

    set_soft_open_file_limit(pid, &soft);
    let dead = stats_eventually(&conn, "dead", |info| info.ready == 5).await;
    assert_eq!(dead.ready, 5);
    let mut consumer = conn.consume("dead", ConsumeOptions::default()).await.unwrap();
    let deliveries = next_deliveries(&mut consumer, 5).await;
    let received: Vec<(u64, String)> =
        deliveries.iter().map(|d| (d.message_id, String::from_utf8_lossy(&d.body).into_owned())).collect();
    assert_eq!(received, first_ids.into_iter().zip(first).collect::<Vec<_>>());
    assert!(deliveries.iter().all(|d| d.deaths.last().is_some_and(|death| death.reason == "maxlen")));
    let jobs = stats_eventually(&conn, "jobs", |info| info.read_error.is_none()).await;
    assert_eq!(jobs.ready, 5);

    // The dead-lettered messages left the queue's log: a restart does not bring them back.
    drop(consumer);
    drop(conn);
    broker.terminate();
    broker.restart();
    let conn = connect(&broker).await;
    assert_eq!(conn.queue_stats("jobs").await.unwrap().ready, 5);
}

#[tokio::test]
async fn out_of_descriptors_new_connections_wait_and_are_served_once_there_are_some() {
    let broker = Broker::start();
    let pid = broker.pid();
    let (soft, _) = open_file_limits(pid);
    assert!(broker.stderr().contains("open file limit"), "the limits are logged at start");
    set_soft_open_file_limit(pid, &lowest_free_descriptor(pid).to_string());

    // The kernel completes the TCP handshake; the broker cannot accept it yet.
    let waiting = tokio::spawn(Connection::connect(broker.addr()));
    eventually("the failed accept is logged", DEADLINE, || async {
        lines_with(&broker, "accept failed") == 1
    })
    .await;
    set_soft_open_file_limit(pid, &soft);
    let conn =
        within("the waiting connection", waiting).await.unwrap().expect("served once descriptors are free");
    conn.declare_queue("after", QueueOptions::default()).await.unwrap();
    assert_eq!(lines_with(&broker, "accept failed"), 1, "one line per run of failures, not one per retry");
    assert_eq!(lines_with(&broker, "accepting connections again"), 1);
}
