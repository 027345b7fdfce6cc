//! A disk that fills up: `hopperd` runs under `prlimit --fsize`, so writes past a file size
//! fail with EFBIG just as they would with ENOSPC. Publishes that cannot be stored are refused
//! with RESOURCE_LIMIT, nothing confirmed is damaged, and the broker keeps serving.

use std::path::Path;

use hopper_client::{Connection, ConsumeOptions, ErrorCode, PublishOptions, QueueOptions};
use hopper_tests::{
    assert_serves, connect, log_dir, next_deliveries, next_delivery, queue_id, read_segment, receive_backlog,
    segment_files, stats_eventually, Broker, RecordKind, SEGMENT_MAGIC,
};

/// The largest file the broker may write.
const LIMIT: u64 = 64 * 1024;
/// Room left in the segment before the big publish that cannot fit.
const ROOM: u64 = 300;

/// A body that starts with `key` and is `len` bytes long.
fn body(key: &str, len: usize) -> String {
    let mut body = format!("{key}|");
    assert!(body.len() <= len, "{key} does not fit in {len} bytes");
    body.extend(std::iter::repeat_n('.', len - body.len()));
    body
}

fn key_of(body: &[u8]) -> String {
    let text = std::str::from_utf8(body).expect("a UTF-8 body");
    text.split_once('|').expect("a keyed body").0.to_string()
}

/// What the test published, and what the broker said.
#[derive(Default)]
struct Outcomes {
    /// `(key, message id)` of every confirmed publish, in publish order.
    accepted: Vec<(String, u64)>,
    /// Keys of the refused publishes.
    refused: Vec<String>,
}

impl Outcomes {
    /// Publishes every `(key, len)` to `full` at once and records each outcome; only
    /// RESOURCE_LIMIT may be refused. Returns how many were refused.
    async fn publish(&mut self, conn: &Connection, messages: &[(String, usize)]) -> usize {
        self.publish_to(conn, "full", messages).await
    }

    /// Like [`Outcomes::publish`], to `queue`.
    async fn publish_to(&mut self, conn: &Connection, queue: &str, messages: &[(String, usize)]) -> usize {
        let confirms: Vec<_> = messages
            .iter()
            .map(|(key, len)| conn.publish(queue, body(key, *len), PublishOptions::default()))
            .collect();
        let mut refused = 0;
        for ((key, _), result) in messages.iter().zip(futures::future::join_all(confirms).await) {
            match result {
                Ok(id) => self.accepted.push((key.clone(), id)),
                Err(err) => {
                    assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "publish {key}: {err}");
                    self.refused.push(key.clone());
                    refused += 1;
                }
            }
        }
        refused
    }

    /// Publishes one message and says whether it was accepted.
    async fn publish_one(&mut self, conn: &Connection, key: &str, len: usize) -> bool {
        self.publish(conn, &[(key.to_string(), len)]).await == 0
    }
}

/// The only segment of the queue's log holds exactly the accepted publishes (each write led by
/// the queue's record), every record complete. Returns the segment's length.
fn assert_segment_holds(data_dir: &Path, outcomes: &Outcomes) -> u64 {
    let segments = segment_files(&log_dir(data_dir, "full"));
    assert_eq!(segments.len(), 1, "{segments:?}");
    let queue = queue_id(data_dir, "full");
    let stored: Vec<u64> = read_segment(&segments[0])
        .into_iter()
        .filter_map(|r| match r.kind {
            RecordKind::Publish { message_id, .. } => Some(message_id),
            RecordKind::Queue { id } if id == queue => None,
            other => panic!("only the queue's publishes were written, found {other:?}"),
        })
        .collect();
    let accepted: Vec<u64> = outcomes.accepted.iter().map(|(_, id)| *id).collect();
    assert_eq!(stored, accepted, "the segment holds the accepted publishes and nothing else");
    std::fs::metadata(&segments[0]).unwrap().len()
}

/// Publishes `key` with a body of `len` bytes, then a filler sized so that the segment ends
/// `room` bytes below the limit; both must be accepted. The first write tells the size of a
/// write's fixed part: the queue record and the publish record's fields.
async fn publish_and_fill(
    conn: &Connection,
    data_dir: &Path,
    outcomes: &mut Outcomes,
    key: &str,
    len: usize,
    room: u64,
) {
    assert!(outcomes.publish_one(conn, key, len).await);
    let length = assert_segment_holds(data_dir, outcomes);
    let overhead = length - SEGMENT_MAGIC.len() as u64 - len as u64;
    let filler = LIMIT - room - length - overhead;
    assert!(outcomes.publish_one(conn, "filler", filler as usize).await);
    assert_eq!(assert_segment_holds(data_dir, outcomes), LIMIT - room);
}

#[tokio::test]
async fn a_full_disk_refuses_publishes_and_damages_nothing_confirmed() {
    let data_dir = tempfile::tempdir().unwrap();
    let fsize = format!("--fsize={LIMIT}");
    let mut broker = Broker::start_wrapped(&["prlimit", &fsize], data_dir.path(), &[]);
    let conn = connect(&broker).await;
    conn.declare_queue("full", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    let mut outcomes = Outcomes::default();

    publish_and_fill(&conn, data_dir.path(), &mut outcomes, "first", 100, ROOM).await;

    // A publish that does not fit is refused; the part of it that was written is cut off.
    assert!(!outcomes.publish_one(&conn, "too big", 1000).await, "a publish past the limit is refused");
    assert_eq!(assert_segment_holds(data_dir.path(), &outcomes), LIMIT - ROOM);
    let burst: Vec<(String, usize)> = (0..20).map(|i| (format!("big {i}"), 1000)).collect();
    assert_eq!(outcomes.publish(&conn, &burst).await, 20, "none of a burst of big publishes fits");
    assert_eq!(assert_segment_holds(data_dir.path(), &outcomes), LIMIT - ROOM);

    // The broker keeps serving: transient queues work, and so does the durable queue for what
    // still fits.
    assert_serves(&broker).await;
    assert!(outcomes.publish_one(&conn, "small 1", 60).await, "a small publish after the failures");
    assert!(outcomes.publish_one(&conn, "small 2", 60).await);
    let last: Vec<(String, usize)> = (0..10).map(|i| (format!("last {i}"), 10)).collect();
    assert!(outcomes.publish(&conn, &last).await > 0, "the last burst does not fit entirely");
    assert_segment_holds(data_dir.path(), &outcomes);
    let info = conn.queue_stats("full").await.unwrap();
    assert_eq!(info.ready, outcomes.accepted.len() as u64, "{info:?}");
    assert_eq!(broker.terminate().code(), Some(0), "stderr:\n{}", broker.stderr());

    // With room again, the queue holds exactly what was confirmed, and takes big messages.
    let broker = Broker::start_in(data_dir.path(), &[]);
    assert!(!broker.stderr().contains("truncated"), "no torn record was left:\n{}", broker.stderr());
    let conn = connect(&broker).await;
    let (_consumer, deliveries) = receive_backlog(&conn, "full").await;
    let recovered: Vec<(String, u64)> = deliveries.iter().map(|d| (key_of(&d.body), d.message_id)).collect();
    assert_eq!(recovered, outcomes.accepted, "every confirmed publish, none of the refused ones");
    conn.publish("full", body("roomy", 10_000), PublishOptions::default()).await.unwrap();
}

/// Refused batches while a consumer keeps the log busy: every redelivery of a requeued message
/// adds a delivered record, so failed writes carry records that must go round again, while new
/// publishes keep arriving during each failed write, to this queue and to another one sharing
/// its log (and so its writes). Whatever is confirmed must stay readable, in memory and on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_racing_deliveries_and_publishes_keep_confirmed_messages_intact() {
    let data_dir = tempfile::tempdir().unwrap();
    let fsize = format!("--fsize={LIMIT}");
    // No bodies in memory: every delivery reads its message from where the broker says it is.
    // One log: both queues' records go out in the same writes.
    let args = ["--queue-memory-bytes", "0", "--storage-threads", "1"];
    let mut broker = Broker::start_wrapped(&["prlimit", &fsize], data_dir.path(), &args);
    let conn = connect(&broker).await;
    conn.declare_queue("full", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    conn.declare_queue("side", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    let mut outcomes = Outcomes::default();
    // Room for the delivered records and most of the small publishes below.
    publish_and_fill(&conn, data_dir.path(), &mut outcomes, "ping", 10, 48_000).await;

    let pinger = connect(&broker).await;
    let mut pings =
        pinger.consume("full", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let ping_id = outcomes.accepted[0].1;
    let ping_pong = async {
        for _ in 0..300 {
            let delivery = next_delivery(&mut pings).await;
            assert_eq!(delivery.message_id, ping_id, "a requeued message goes back to the head");
            delivery.nack(true).await.unwrap();
        }
    };
    let publisher = connect(&broker).await;
    let mut racing = Outcomes::default();
    let publishing = async {
        for round in 0..20 {
            // A big publish in every few: their batches fail, the small ones' batches may not.
            let burst: Vec<(String, usize)> =
                (0..28).map(|i| (format!("r{round}-{i}"), if i % 4 == 0 { 30_000 } else { 20 })).collect();
            racing.publish(&publisher, &burst).await;
        }
    };
    let side_publisher = connect(&broker).await;
    let mut side = Outcomes::default();
    let before = side.publish_to(&side_publisher, "side", &[("s-before".into(), 20)]).await;
    assert_eq!(before, 0, "the other queue stores a message before the race");
    let publishing_aside = async {
        for round in 0..20 {
            let burst: Vec<(String, usize)> = (0..3).map(|i| (format!("s{round}-{i}"), 20)).collect();
            side.publish_to(&side_publisher, "side", &burst).await;
        }
    };
    tokio::join!(ping_pong, publishing, publishing_aside);
    assert!(!racing.refused.is_empty(), "the big publishes were refused");
    assert_eq!(pings.cancel().await.unwrap(), 1);
    outcomes.accepted.extend(racing.accepted);

    // Every confirmed message is delivered, in order, with its body.
    let mut consumer =
        conn.consume("full", ConsumeOptions { prefetch: 0, ..Default::default() }).await.unwrap();
    let info = stats_eventually(&conn, "full", |info| info.ready == 0).await;
    assert_eq!(
        info.unacked,
        outcomes.accepted.len() as u64,
        "messages were lost: {info:?}\n{}",
        broker.stderr()
    );
    let deliveries = next_deliveries(&mut consumer, outcomes.accepted.len()).await;
    let served: Vec<(String, u64)> = deliveries.iter().map(|d| (key_of(&d.body), d.message_id)).collect();
    assert_eq!(served, outcomes.accepted);
    drop(consumer);
    let (side_consumer, deliveries) = receive_backlog(&conn, "side").await;
    let served: Vec<(String, u64)> = deliveries.iter().map(|d| (key_of(&d.body), d.message_id)).collect();
    assert_eq!(served, side.accepted, "the other queue's confirmed messages");
    drop(side_consumer);
    assert_eq!(broker.terminate().code(), Some(0), "stderr:\n{}", broker.stderr());

    // And on disk: nothing torn or corrupt, every confirmed message there.
    let broker = Broker::start_in(data_dir.path(), &args);
    assert!(!broker.stderr().contains("WARN"), "the log is intact:\n{}", broker.stderr());
    let conn = connect(&broker).await;
    for (queue, accepted) in [("full", &outcomes.accepted), ("side", &side.accepted)] {
        let (_consumer, deliveries) = receive_backlog(&conn, queue).await;
        let recovered: Vec<(String, u64)> =
            deliveries.iter().map(|d| (key_of(&d.body), d.message_id)).collect();
        assert_eq!(&recovered, accepted, "{queue}");
    }
}

/// A clean shutdown promises exact redelivered flags at the next start. When the last records
/// cannot be written (here the delivery of the only message), the shutdown is not clean: the
/// message must still come back flagged as possibly delivered.
#[tokio::test]
async fn a_shutdown_that_cannot_write_its_last_records_is_not_clean() {
    let data_dir = tempfile::tempdir().unwrap();
    let fsize = format!("--fsize={LIMIT}");
    let mut broker = Broker::start_wrapped(&["prlimit", &fsize], data_dir.path(), &[]);
    let conn = connect(&broker).await;
    conn.declare_queue("full", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    let mut outcomes = Outcomes::default();
    // 10 bytes of room: not even a delivered record fits.
    publish_and_fill(&conn, data_dir.path(), &mut outcomes, "delivered", 10, 10).await;

    let mut consumer =
        conn.consume("full", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.message_id, outcomes.accepted[0].1);
    stats_eventually(&conn, "full", |info| info.unacked == 1).await;
    assert_eq!(broker.terminate().code(), Some(0), "stderr:\n{}", broker.stderr());

    let broker = Broker::start_in(data_dir.path(), &[]);
    let conn = connect(&broker).await;
    let (_consumer, after) = receive_backlog(&conn, "full").await;
    assert_eq!(after[0].message_id, outcomes.accepted[0].1);
    assert!(after[0].redelivered, "it was delivered before the shutdown: {:?}", after[0]);
}
