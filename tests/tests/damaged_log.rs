//! Recovery from damaged log files: a torn or corrupt tail in the newest segment is cut off
//! with a warning and everything before it is served; a corrupt record in an older segment is
//! reported and skipped without stopping the broker or touching other segments and logs. A
//! queue whose metadata is unreadable, or whose deletion a crash interrupted, does not stop the
//! others from loading.

use std::path::{Path, PathBuf};

use hopper_client::QueueOptions;
use hopper_tests::{
    assert_serves, connect, log_dir, publish_all, queue_dir, queue_id, read_segment, receive_backlog,
    records_of, segment_files, Broker, Record, RecordKind, SEGMENT_MAGIC,
};

fn durable() -> QueueOptions {
    QueueOptions { durable: true, ..Default::default() }
}

/// Bodies of varying length, so records do not all share one size.
fn body(i: usize) -> String {
    format!("message {i} {}", "#".repeat(i * 13 % 90))
}

/// The id and body of every publish record, in file order.
fn published<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<(u64, Vec<u8>)> {
    records
        .into_iter()
        .filter_map(|r| match &r.kind {
            RecordKind::Publish { message_id, body, .. } => Some((*message_id, body.clone())),
            _ => None,
        })
        .collect()
}

/// The `(id, body)` of every message `queue` serves, in order.
async fn read_all(broker: &Broker, queue: &str) -> Vec<(u64, Vec<u8>)> {
    let conn = connect(broker).await;
    let (_consumer, deliveries) = receive_backlog(&conn, queue).await;
    deliveries.iter().map(|d| (d.message_id, d.body.to_vec())).collect()
}

/// Starts the stopped `broker` again and reads `queue` like [`read_all`].
async fn restart_and_read(broker: &mut Broker, queue: &str) -> Vec<(u64, Vec<u8>)> {
    broker.restart();
    read_all(broker, queue).await
}

/// The broker's log lines that mention `file`. Every log's segments are numbered from 1, so
/// the file is named by its path under the data directory, which says which log it is in.
fn lines_about(broker: &Broker, file: &Path) -> Vec<String> {
    let name = file.strip_prefix(broker.data_dir()).expect("a file in the data directory");
    let name = name.to_string_lossy().into_owned();
    broker.stderr().lines().filter(|line| line.contains(&name)).map(str::to_string).collect()
}

/// One way the newest segment can be left by a crash in the middle of a write.
struct Tail {
    what: &'static str,
    /// The damaged file.
    bytes: Vec<u8>,
    repair: Repair,
}

/// What recovery must do to a damaged newest segment.
enum Repair {
    /// Nothing: the file ends on a record boundary.
    Nothing,
    /// Cut the file at `offset`, removing `bytes` bytes, with a warning.
    Cut { offset: usize, bytes: usize },
    /// Rewrite a torn segment header, with a warning.
    Header,
}

impl Tail {
    /// The length of the file once repaired.
    fn repaired_len(&self) -> usize {
        match self.repair {
            Repair::Nothing => self.bytes.len(),
            Repair::Cut { offset, .. } => offset,
            Repair::Header => SEGMENT_MAGIC.len(),
        }
    }

    /// The messages that must be served: those whose publish record is wholly in the repaired
    /// file.
    fn kept(&self, records: &[Record]) -> Vec<(u64, Vec<u8>)> {
        published(records.iter().filter(|r| r.end() <= self.repaired_len()))
    }
}

/// Ways to damage `pristine`, a segment whose `records` end with a write of a single publish
/// (a queue record, then the publish).
fn damaged_tails(pristine: &[u8], records: &[Record]) -> Vec<Tail> {
    let n = records.len();
    let last = &records[n - 1];
    let last_write = &records[n - 2];
    assert!(
        matches!(last_write.kind, RecordKind::Queue { .. }),
        "the last write is one publish: {records:?}"
    );
    let with = |prefix: &[u8], suffix: &[u8]| [prefix, suffix].concat();
    let mut flipped = pristine.to_vec();
    flipped[last.end() - 2] ^= 0x40;
    let publishes: Vec<&Record> =
        records.iter().filter(|r| matches!(r.kind, RecordKind::Publish { .. })).collect();
    let middle = publishes[publishes.len() / 2];
    vec![
        Tail {
            what: "cut inside the last record's header",
            bytes: pristine[..last.offset + 5].to_vec(),
            repair: Repair::Cut { offset: last.offset, bytes: 5 },
        },
        Tail {
            what: "cut inside the last record's body",
            bytes: pristine[..last.end() - 3].to_vec(),
            repair: Repair::Cut { offset: last.offset, bytes: last.size - 3 },
        },
        Tail {
            what: "cut right after the queue record that starts the last write",
            bytes: pristine[..last_write.end()].to_vec(),
            repair: Repair::Nothing,
        },
        Tail {
            what: "cut inside the queue record that starts the last write",
            bytes: pristine[..last_write.offset + 12].to_vec(),
            repair: Repair::Cut { offset: last_write.offset, bytes: 12 },
        },
        Tail {
            what: "cut exactly at a record boundary",
            bytes: pristine[..records[n - 3].end()].to_vec(),
            repair: Repair::Nothing,
        },
        Tail {
            what: "garbage after the last record",
            bytes: with(pristine, b"\x07garbage!"),
            repair: Repair::Cut { offset: pristine.len(), bytes: 9 },
        },
        Tail {
            what: "a record cut in its body, then zeros (space the file system allocated)",
            bytes: with(&pristine[..middle.offset + 20], &[0; 4096]),
            repair: Repair::Cut { offset: middle.offset, bytes: 20 + 4096 },
        },
        Tail {
            what: "a flipped bit in the last record",
            bytes: flipped,
            repair: Repair::Cut { offset: last.offset, bytes: last.size },
        },
        Tail {
            what: "a length field claiming more than there is",
            bytes: with(pristine, &[0x10, 0, 0, 0, 1, 2, 3, 4, 1]),
            repair: Repair::Cut { offset: pristine.len(), bytes: 9 },
        },
        Tail { what: "cut inside the magic", bytes: pristine[..5].to_vec(), repair: Repair::Header },
    ]
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_and_everything_before_it_served() {
    let mut broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("log", durable()).await.unwrap();
    let bodies: Vec<String> = (0..20).map(body).collect();
    // The last one alone, so the log ends with a write of one publish.
    publish_all(&conn, "log", bodies[..19].to_vec()).await;
    publish_all(&conn, "log", bodies[19..].to_vec()).await;
    assert_eq!(broker.terminate().code(), Some(0));

    let id = queue_id(broker.data_dir(), "log");
    let segments = segment_files(&log_dir(broker.data_dir(), "log"));
    assert_eq!(segments.len(), 1, "{segments:?}");
    let segment = segments[0].clone();
    let pristine = std::fs::read(&segment).unwrap();
    let records = read_segment(&segment);
    let messages = published(&records);
    let only_publishes = records.iter().all(|r| match r.kind {
        RecordKind::Queue { id: named } => named == id,
        RecordKind::Publish { .. } => true,
        _ => false,
    });
    assert!(only_publishes, "only the publishes and the queue records of their writes: {records:?}");
    assert_eq!(records_of(&records, id).len(), 20, "{records:?}");
    let stored: Vec<&[u8]> = messages.iter().map(|(_, body)| &body[..]).collect();
    assert_eq!(stored, bodies.iter().map(|b| b.as_bytes()).collect::<Vec<_>>());

    for tail in damaged_tails(&pristine, &records) {
        let what = tail.what;
        let kept = tail.kept(&records);
        std::fs::write(&segment, &tail.bytes).unwrap();
        broker.restart();
        let repaired = std::fs::metadata(&segment).unwrap().len() as usize;
        assert_eq!(repaired, tail.repaired_len(), "{what}: the file's length after recovery");
        let served = read_all(&broker, "log").await;
        assert_eq!(served, kept, "{what}: the intact messages, in order");
        let about = lines_about(&broker, &segment);
        let warned = |needles: &[String]| {
            about
                .iter()
                .any(|line| line.contains("WARN") && needles.iter().all(|n| line.contains(n.as_str())))
        };
        match tail.repair {
            Repair::Nothing => assert!(about.is_empty(), "{what}: nothing to report:\n{}", broker.stderr()),
            Repair::Cut { offset, bytes } => assert!(
                warned(&[format!("offset {offset} "), format!("truncated {bytes} byte")]),
                "{what}: no warning about cutting {bytes} bytes at {offset}:\n{}",
                broker.stderr()
            ),
            Repair::Header => assert!(warned(&[]), "{what}: no warning:\n{}", broker.stderr()),
        }

        // New records go right after the last intact one: they are found after another restart.
        let conn = connect(&broker).await;
        let id = conn.publish("log", "after the repair", Default::default()).await.unwrap();
        assert_eq!(broker.terminate().code(), Some(0));
        let served = restart_and_read(&mut broker, "log").await;
        let mut expected = kept;
        expected.push((id, b"after the repair".to_vec()));
        assert_eq!(served, expected, "{what}: a message published after the repair");
        assert!(lines_about(&broker, &segment).is_empty(), "{what}: the repair held:\n{}", broker.stderr());
        assert_eq!(broker.terminate().code(), Some(0));
        std::fs::write(&segment, &pristine).unwrap();
    }
}

/// A stopped broker on two logs: durable queues `a` and `c` share one and span several of its
/// segments, with one bit flipped in a record of `a` in the middle of the second (older)
/// segment; durable queue `b` is alone in the other log.
struct CorruptOlderSegment {
    broker: Broker,
    /// The damaged file, and its length.
    damaged: PathBuf,
    length: u64,
    /// The offset of the damaged record.
    offset: usize,
    /// What `a` and `c` must serve: everything but what the damaged segment holds from the
    /// damaged record on, whichever queue it belongs to.
    expected_a: Vec<(u64, Vec<u8>)>,
    expected_c: Vec<(u64, Vec<u8>)>,
    b_ids: Vec<u64>,
}

async fn corrupt_an_older_segment() -> CorruptOlderSegment {
    // Two logs, queue ids 1, 2, 3 in declare order: `a` and `c` on log 1, `b` on log 0.
    let mut broker = Broker::start_with(&["--segment-bytes", "4096", "--storage-threads", "2"]);
    let conn = connect(&broker).await;
    for queue in ["a", "b", "c"] {
        conn.declare_queue(queue, durable()).await.unwrap();
    }
    // One at a time, so the records of `a` and `c` alternate and both fill every segment (a
    // segment is closed between writes, so one big batch would fill just one).
    for i in 0..80 {
        conn.publish("a", body(i), Default::default()).await.unwrap();
        conn.publish("c", body(i + 1000), Default::default()).await.unwrap();
    }
    let b_ids = publish_all(&conn, "b", (0..30).map(body)).await;
    assert_eq!(broker.terminate().code(), Some(0));

    let data_dir = broker.data_dir();
    let log = log_dir(data_dir, "a");
    assert_eq!(log, log_dir(data_dir, "c"), "a and c share a log");
    assert_ne!(log, log_dir(data_dir, "b"), "b has a log of its own");
    let (a, c) = (queue_id(data_dir, "a"), queue_id(data_dir, "c"));
    let segments: Vec<PathBuf> = segment_files(&log);
    assert!(segments.len() >= 3, "several segments: {segments:?}");
    let per_segment: Vec<Vec<Record>> = segments.iter().map(|s| read_segment(s)).collect();
    let damaged = segments[1].clone();
    let of_a = records_of(&per_segment[1], a);
    let victim = of_a[of_a.len() / 2].clone();
    assert!(matches!(victim.kind, RecordKind::Publish { .. }), "{victim:?}");
    let mut bytes = std::fs::read(&damaged).unwrap();
    bytes[victim.end() - 2] ^= 0x01;
    std::fs::write(&damaged, &bytes).unwrap();

    // Everything of `queue` but its records in the damaged segment from the damaged one on.
    let expected = |queue: u64| {
        let mut expected = Vec::new();
        for (i, records) in per_segment.iter().enumerate() {
            let owned = records_of(records, queue);
            let intact = owned.iter().filter(|r| i != 1 || r.offset < victim.offset);
            expected.extend(published(intact));
        }
        expected
    };
    let (expected_a, expected_c) = (expected(a), expected(c));
    // The damage costs the records after it in that segment, whichever queue they belong to.
    let lost_c = records_of(&per_segment[1], c).iter().filter(|r| r.offset > victim.offset).count();
    let kept_c = records_of(&per_segment[1], c).iter().filter(|r| r.offset < victim.offset).count();
    assert!(lost_c > 0 && kept_c > 0, "c has records on both sides of the damage: {:?}", per_segment[1]);
    assert_eq!(expected_c.len(), 80 - lost_c);
    CorruptOlderSegment {
        broker,
        damaged,
        length: bytes.len() as u64,
        offset: victim.offset,
        expected_a,
        expected_c,
        b_ids,
    }
}

/// A corrupt record in the middle of an older segment: the broker starts, says which file and
/// offset, serves every message before the damage and in the other segments and logs, and
/// leaves the damaged file as it is. The records after the damage in that segment are skipped,
/// whichever queue sharing the log they belong to.
#[tokio::test]
async fn a_corrupt_older_segment_is_reported_and_the_rest_is_served() {
    let CorruptOlderSegment { mut broker, damaged, length, offset, expected_a, expected_c, b_ids } =
        corrupt_an_older_segment().await;
    let served = restart_and_read(&mut broker, "a").await;
    assert_eq!(served, expected_a, "everything but the rest of the damaged segment, in order");
    let served = read_all(&broker, "c").await;
    assert_eq!(served, expected_c, "the queue sharing the log loses its records after the damage");
    let reported =
        lines_about(&broker, &damaged).iter().any(|line| line.contains(&format!("offset {offset} ")));
    assert!(reported, "a log line names the file and offset:\n{}", broker.stderr());
    assert_eq!(std::fs::metadata(&damaged).unwrap().len(), length, "an older segment is never cut");

    let conn = connect(&broker).await;
    let (_consumer, b) = receive_backlog(&conn, "b").await;
    assert_eq!(b.iter().map(|d| d.message_id).collect::<Vec<_>>(), b_ids, "the other log is intact");
    assert_serves(&broker).await;
    // The damaged queue takes new messages.
    let id = conn.publish("a", "new", Default::default()).await.unwrap();
    assert_eq!(broker.terminate().code(), Some(0));
    let mut expected = expected_a;
    expected.push((id, b"new".to_vec()));
    assert_eq!(restart_and_read(&mut broker, "a").await, expected);
}

/// docs/storage.md: "A bad record in an older segment is logged as an error with its file and
/// offset" — unlike a torn tail, which is expected after a crash, this is lost data.
#[tokio::test]
async fn a_corrupt_older_segment_is_logged_as_an_error() {
    let CorruptOlderSegment { mut broker, damaged, offset, .. } = corrupt_an_older_segment().await;
    broker.restart();
    let reported = lines_about(&broker, &damaged)
        .iter()
        .any(|line| line.contains("ERROR") && line.contains(&format!("offset {offset} ")));
    assert!(reported, "an ERROR line names the file and offset:\n{}", broker.stderr());
}

/// A queue whose `queue.json` cannot be read is reported and skipped; the other queues load and
/// the broker starts. Here both share one log, so the skipped queue's records are passed over
/// between the others'.
#[tokio::test]
async fn an_unreadable_queue_is_skipped_and_the_others_load() {
    let mut broker = Broker::start_with(&["--storage-threads", "1"]);
    let conn = connect(&broker).await;
    conn.declare_queue("broken", durable()).await.unwrap();
    conn.declare_queue("fine", durable()).await.unwrap();
    let mut ids = publish_all(&conn, "fine", ["kept 1"]).await;
    publish_all(&conn, "broken", ["lost"]).await;
    ids.extend(publish_all(&conn, "fine", ["kept 2"]).await);
    assert_eq!(broker.terminate().code(), Some(0));
    assert_eq!(log_dir(broker.data_dir(), "broken"), log_dir(broker.data_dir(), "fine"));
    let broken = queue_dir(broker.data_dir(), "broken");
    std::fs::write(broken.join("queue.json"), b"{ not json").unwrap();

    let served = restart_and_read(&mut broker, "fine").await;
    assert_eq!(served.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
    let dir_name = broken.file_name().unwrap().to_string_lossy().into_owned();
    let reported = broker.stderr().lines().any(|line| line.contains("ERROR") && line.contains(&dir_name));
    assert!(reported, "an error names the skipped queue's directory:\n{}", broker.stderr());
    let conn = connect(&broker).await;
    let names: Vec<String> = conn.list_queues().await.unwrap().into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["fine"]);
}

/// Deleting a queue renames its directory to `<id>.deleted` before removing it; a crash in
/// between leaves that directory, and the next start finishes the job. Its records stay in the
/// log it shared, so its id is not given out again: a queue declared afterwards starts empty.
#[tokio::test]
async fn a_deletion_interrupted_by_a_crash_is_finished_at_start() {
    let mut broker = Broker::start_with(&["--storage-threads", "1"]);
    let conn = connect(&broker).await;
    // Declared last, so no queue directory left after its removal has a higher id.
    conn.declare_queue("kept", durable()).await.unwrap();
    conn.declare_queue("doomed", durable()).await.unwrap();
    publish_all(&conn, "doomed", ["x"]).await;
    let ids = publish_all(&conn, "kept", ["y"]).await;
    broker.kill();
    let doomed_id = queue_id(broker.data_dir(), "doomed");
    let doomed = queue_dir(broker.data_dir(), "doomed");
    let renamed = doomed.with_extension("deleted");
    std::fs::rename(&doomed, &renamed).unwrap();

    let served = restart_and_read(&mut broker, "kept").await;
    assert_eq!(served.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
    assert!(!renamed.exists(), "the half-deleted queue's files are removed at start");
    let conn = connect(&broker).await;
    let names: Vec<String> = conn.list_queues().await.unwrap().into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["kept"]);

    let info = conn.declare_queue("new", durable()).await.unwrap();
    assert_eq!(info.ready, 0, "a new queue does not take over the deleted one's records: {info:?}");
    assert!(queue_id(broker.data_dir(), "new") > doomed_id, "ids are never reused");
    assert_eq!(broker.terminate().code(), Some(0));
    broker.restart();
    let conn = connect(&broker).await;
    assert_eq!(conn.queue_stats("new").await.unwrap().ready, 0, "not after a restart either");
}
