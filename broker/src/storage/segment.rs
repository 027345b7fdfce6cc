//! Segment files: naming, creation, and the recovery scan of a log directory.
//!
//! A log is a run of segment files `<id:020>.seg`, each starting with an 8-byte magic and
//! followed by records (see [`super::record`]). Only the newest segment is appended to. Many
//! queues share one log: each write starts with a queue record naming the queue whose records
//! follow.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::record::{self, publish_at, Record, RecordError};
use crate::message::Failure;
pub use crate::message::Location;

/// First bytes of every segment file: "HOPSEG" and a format version.
pub const MAGIC: &[u8; 8] = b"HOPSEG\x00\x01";

/// Largest segment id a [`Location`] can name.
pub const MAX_ID: u64 = u32::MAX as u64;

/// Path of segment `id` in `dir`.
pub fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// Ids of the segment files in `dir`, ascending.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name.strip_suffix(".seg").and_then(|n| n.parse::<u64>().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Creates segment `id` with its magic and returns it open for appending. The directory entry
/// is made durable; the magic is synced with the segment's first batch. Only ever called for a
/// segment after the newest one, so a file already there is what an earlier attempt left when
/// it failed halfway (say, out of descriptors for the directory sync): it is started afresh.
pub fn create(dir: &Path, id: u64) -> io::Result<File> {
    use std::io::Write;
    let path = path(dir, id);
    match std::fs::remove_file(&path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let mut file = OpenOptions::new().create_new(true).read(true).append(true).open(path)?;
    file.write_all(MAGIC)?;
    sync_dir(dir)?;
    Ok(file)
}

/// Opens an existing segment for appending (and reading).
pub fn open_append(dir: &Path, id: u64) -> io::Result<File> {
    OpenOptions::new().read(true).append(true).open(path(dir, id))
}

/// Makes a directory's entries (new or removed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A live message found by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Queue position.
    pub seq: u64,
    /// Deliveries recorded so far.
    pub delivery_count: u32,
    /// Unix ms of its expiry, 0 = never.
    pub expires_at_ms: u64,
    /// Unix ms at which it becomes ready (delayed or backing off), 0 = ready.
    pub due_ms: u64,
    /// Body size in bytes.
    pub size: u32,
    /// Where its publish record is.
    pub location: Location,
    /// Its failed deliveries, if any.
    pub failure: Option<Box<Failure>>,
}

/// A problem recovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Damage beyond a torn tail: data was skipped.
    pub is_error: bool,
    /// What and where.
    pub message: String,
}

impl Problem {
    fn warning(message: String) -> Self {
        Problem { is_error: false, message }
    }

    fn error(message: String) -> Self {
        Problem { is_error: true, message }
    }
}

/// What recovery learned about one queue from a log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QueueScan {
    /// Live messages, ordered by seq.
    pub messages: Vec<Found>,
    /// The seq the next publish should get.
    pub next_seq: u64,
}

/// What recovery learned from a log directory.
#[derive(Debug, Default)]
pub struct Scan {
    /// What each accepted queue holds, by queue id.
    pub queues: HashMap<u64, QueueScan>,
    /// Segment ids present after recovery, ascending, with their byte lengths.
    pub segments: Vec<(u64, u64)>,
    /// The highest queue id named by any record, accepted or not: ids of deleted queues whose
    /// records are still on disk are never given out again.
    pub max_queue: u64,
    /// Problems found and what was done about them, for the log: torn tails (expected after a
    /// crash) are warnings, damage elsewhere is an error.
    pub problems: Vec<Problem>,
}

/// Replay state of one queue.
#[derive(Default)]
struct Replay {
    live: HashMap<u64, Found>,
    next_seq: u64,
}

/// Replays every segment of the log in `dir`: a queue record names the queue the records after
/// it belong to; publishes add messages, settles remove them, delivered records raise delivery
/// counts. Records of queues that `accepts` refuses (deleted queues, queues kept elsewhere) are
/// passed over. A log written before logs were shared names no queue: `legacy` is the queue
/// its records belong to.
///
/// A bad record in the newest segment is a torn write: the file is truncated there. A bad record
/// in an older segment is reported with its file and offset and the rest of that segment is
/// skipped; the other segments still load.
pub fn scan(dir: &Path, legacy: Option<u64>, accepts: &dyn Fn(u64) -> bool) -> io::Result<Scan> {
    let mut result = Scan::default();
    let mut ids = list(dir)?;
    // A message's location holds its segment id in 32 bits. Ids count up from 1, so a larger
    // one was not written by the broker: such a file is left alone rather than read under a
    // truncated id that names another segment.
    for &id in ids.iter().filter(|&&id| id > MAX_ID) {
        result.problems.push(Problem::error(format!(
            "{}: segment id is above {MAX_ID}; skipped",
            path(dir, id).display()
        )));
    }
    ids.retain(|&id| id <= MAX_ID);
    // Replays by queue, found through `slots`; the queue records of a log come once per write,
    // so the lookup is made there, not per record.
    let mut replays: Vec<(u64, Replay)> = Vec::new();
    let mut slots: HashMap<u64, Option<usize>> = HashMap::new();
    let mut slot_of = |queue: u64, replays: &mut Vec<(u64, Replay)>| {
        *slots.entry(queue).or_insert_with(|| {
            accepts(queue).then(|| {
                replays.push((queue, Replay::default()));
                replays.len() - 1
            })
        })
    };
    for (index, &id) in ids.iter().enumerate() {
        let newest = index + 1 == ids.len();
        let file_path = path(dir, id);
        let mut bytes = Vec::new();
        File::open(&file_path)?.read_to_end(&mut bytes)?;
        let mut at = if bytes.starts_with(MAGIC) { MAGIC.len() } else { 0 };
        if at == 0 {
            if newest && bytes.len() < MAGIC.len() && MAGIC.starts_with(&bytes) {
                // Torn while being created: nothing in it yet.
                result
                    .problems
                    .push(Problem::warning(format!("{}: incomplete header; rewritten", file_path.display())));
                std::fs::write(&file_path, MAGIC)?;
                result.segments.push((id, MAGIC.len() as u64));
                continue;
            }
            result.problems.push(Problem::error(format!(
                "{}: not a segment file (bad magic); skipped",
                file_path.display()
            )));
            continue;
        }
        // Every write starts with the queue it is for, so a segment starts with no queue.
        let mut queue = legacy;
        let mut slot = legacy.and_then(|q| slot_of(q, &mut replays));
        let mut unowned = false;
        while at < bytes.len() {
            match record::frame_len(&bytes[at..]) {
                Ok(len) => {
                    let location = Location::new(id, at as u64, (record::HEADER + len) as u32);
                    let fields = &bytes[at + record::HEADER..at + record::HEADER + len];
                    if fields.first() == Some(&record::KIND_QUEUE) {
                        queue = record::queue_id(fields);
                        slot = queue.and_then(|q| slot_of(q, &mut replays));
                        if let Some(id) = queue {
                            result.max_queue = result.max_queue.max(id);
                        }
                    } else if let Some(at_slot) = slot {
                        let replay = &mut replays[at_slot].1;
                        if let Err(why) = apply(fields, location, &mut replay.live, &mut replay.next_seq) {
                            result.problems.push(Problem::error(format!(
                                "{}: record at offset {at} {why}; skipped",
                                file_path.display()
                            )));
                        }
                    } else if queue.is_none() && !unowned {
                        unowned = true;
                        result.problems.push(Problem::error(format!(
                            "{}: records at offset {at} name no queue; skipped",
                            file_path.display()
                        )));
                    }
                    at += record::HEADER + len;
                }
                Err(err) if newest => {
                    let kind = if err == RecordError::Incomplete { "torn write" } else { "corrupt record" };
                    result.problems.push(Problem::warning(format!(
                        "{}: {kind} at offset {at} ({err}); truncated {} byte(s) from the tail",
                        file_path.display(),
                        bytes.len() - at
                    )));
                    let file = OpenOptions::new().write(true).open(&file_path)?;
                    file.set_len(at as u64)?;
                    file.sync_all()?;
                    bytes.truncate(at);
                    break;
                }
                Err(err) => {
                    result.problems.push(Problem::error(format!(
                        "{}: corrupt record at offset {at} ({err}); the rest of this segment ({} bytes) was skipped",
                        file_path.display(),
                        bytes.len() - at
                    )));
                    break;
                }
            }
        }
        result.segments.push((id, bytes.len() as u64));
    }
    if let Some(legacy) = legacy {
        result.max_queue = result.max_queue.max(legacy);
    }
    for (queue, replay) in replays {
        let mut messages: Vec<Found> = replay.live.into_values().collect();
        messages.sort_unstable_by_key(|m| m.seq);
        result.queues.insert(queue, QueueScan { messages, next_seq: replay.next_seq });
    }
    Ok(result)
}

/// Applies one checksummed record. Publish records are read by their fixed fields only:
/// recovery never parses bodies or headers. A record that cannot be applied says why.
fn apply(
    fields: &[u8],
    location: Location,
    live: &mut HashMap<u64, Found>,
    next_seq: &mut u64,
) -> Result<(), &'static str> {
    let u64_at =
        |at: usize| fields.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let u32_at =
        |at: usize| fields.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    match (fields.first(), u64_at(publish_at::SEQ)) {
        (Some(&record::KIND_PUBLISH), Some(seq)) => {
            // Seqs count up from 0 and never reach the last one, so there is always a seq after
            // every stored message for the next publish; a record claiming it is forged.
            let after = seq.checked_add(1).ok_or("claims the last possible seq")?;
            let delivery_count = u32_at(publish_at::DELIVERY_COUNT).unwrap_or(0);
            *next_seq = (*next_seq).max(after);
            // A compaction copy supersedes the original; the higher delivery count wins.
            let found = live.entry(seq).or_insert(Found {
                seq,
                delivery_count,
                expires_at_ms: u64_at(publish_at::EXPIRES_AT).unwrap_or(0),
                due_ms: u64_at(publish_at::DUE).unwrap_or(0),
                size: u32_at(publish_at::BODY_LEN).unwrap_or(0),
                location,
                failure: None,
            });
            found.location = location;
            found.delivery_count = found.delivery_count.max(delivery_count);
        }
        (Some(&record::KIND_SETTLE), Some(seq)) => {
            live.remove(&seq);
        }
        (Some(&record::KIND_DELIVERED), Some(seq)) => {
            if let (Some(found), Some(count)) = (live.get_mut(&seq), u32_at(9)) {
                found.delivery_count = found.delivery_count.max(count);
            }
        }
        (Some(&record::KIND_FAILED), Some(seq)) => {
            let Some(found) = live.get_mut(&seq) else { return Ok(()) };
            if let Ok(Record::Failed { delivery_count, due_ms, failure, .. }) =
                record::parse(bytes::Bytes::copy_from_slice(fields))
            {
                found.delivery_count = found.delivery_count.max(delivery_count);
                found.due_ms = due_ms;
                found.failure = Some(Box::new(failure));
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Payload;

    /// A segment file: the magic, then for queue 1 a publish record for each of `seqs`.
    fn segment_with(seqs: &[u64]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        record::encode_queue(&mut bytes, 1);
        for &seq in seqs {
            record::encode_publish(&mut bytes, seq, 0, 0, 0, &Payload::default());
        }
        bytes
    }

    fn seqs(scan: &Scan, queue: u64) -> Vec<u64> {
        scan.queues.get(&queue).map(|q| q.messages.iter().map(|m| m.seq).collect()).unwrap_or_default()
    }

    fn every(_: u64) -> bool {
        true
    }

    #[test]
    fn a_segment_id_beyond_32_bits_is_reported_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path(), 1), segment_with(&[0, 1])).unwrap();
        let stray = path(dir.path(), MAX_ID + 2);
        std::fs::write(&stray, segment_with(&[5])).unwrap();

        let scan = scan(dir.path(), None, &every).unwrap();
        assert_eq!(seqs(&scan, 1), vec![0, 1], "segment {} would be read as segment 1", MAX_ID + 2);
        assert_eq!(scan.segments, vec![(1, segment_with(&[0, 1]).len() as u64)]);
        assert_eq!(scan.queues[&1].next_seq, 2);
        assert!(matches!(scan.problems.as_slice(), [p] if p.is_error && p.message.contains("above")));
        assert_eq!(std::fs::read(&stray).unwrap(), segment_with(&[5]), "the stray file is not touched");
    }

    #[test]
    fn a_record_claiming_the_last_seq_is_reported_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path(), 1), segment_with(&[3, u64::MAX, 4])).unwrap();

        let scan = scan(dir.path(), None, &every).unwrap();
        assert_eq!(seqs(&scan, 1), vec![3, 4], "the records around it still load");
        assert_eq!(scan.queues[&1].next_seq, 5);
        assert!(
            matches!(scan.problems.as_slice(), [p] if p.is_error && p.message.contains("last possible seq"))
        );
    }

    #[test]
    fn a_shared_log_sorts_records_by_queue_and_passes_over_refused_queues() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = MAGIC.to_vec();
        for (queue, seq) in [(1, 0), (2, 0), (1, 1), (7, 0), (2, 1)] {
            record::encode_queue(&mut bytes, queue);
            record::encode_publish(&mut bytes, seq, 0, 0, 0, &Payload::default());
        }
        record::encode_queue(&mut bytes, 2);
        record::encode_settle(&mut bytes, 0);
        std::fs::write(path(dir.path(), 1), &bytes).unwrap();

        let scan = scan(dir.path(), None, &|queue| queue != 7).unwrap();
        assert_eq!(seqs(&scan, 1), vec![0, 1]);
        assert_eq!(seqs(&scan, 2), vec![1], "queue 2's settle applies to queue 2 only");
        assert!(!scan.queues.contains_key(&7), "queue 7 was refused");
        assert_eq!(scan.max_queue, 7, "a refused queue's id is still taken");
        assert!(scan.problems.is_empty());
    }

    #[test]
    fn records_before_any_queue_record_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = MAGIC.to_vec();
        record::encode_settle(&mut bytes, 3);
        record::encode_queue(&mut bytes, 4);
        record::encode_publish(&mut bytes, 9, 0, 0, 0, &Payload::default());
        std::fs::write(path(dir.path(), 1), &bytes).unwrap();

        let scan = scan(dir.path(), None, &every).unwrap();
        assert_eq!(seqs(&scan, 4), vec![9]);
        assert!(matches!(scan.problems.as_slice(), [p] if p.is_error && p.message.contains("name no queue")));
    }
}
