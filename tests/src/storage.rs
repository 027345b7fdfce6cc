//! Durable queues' files as docs/storage.md describes them, read independently of the broker,
//! so tests can find record boundaries and then cut, corrupt and count segment files.
//!
//! A durable queue has a directory `queues/<id>/` holding its `queue.json`; its records are in
//! the shared log `queues/logs/<n>/` that `queue.json` names, among other queues' records.

use std::path::{Path, PathBuf};

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"HOPSEG\x00\x01";
/// Bytes in front of a record's kind: `len: u32` and `crc: u32`.
pub const RECORD_HEADER: usize = 8;

/// The directory of durable queue `name` in `data_dir` and its parsed `queue.json`.
fn find_queue(data_dir: &Path, name: &str) -> (PathBuf, serde_json::Value) {
    let root = data_dir.join("queues");
    let entries = std::fs::read_dir(&root).unwrap_or_else(|err| panic!("read {}: {err}", root.display()));
    for entry in entries {
        let dir = entry.expect("a directory entry").path();
        let Ok(text) = std::fs::read_to_string(dir.join("queue.json")) else { continue };
        let meta: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("{}/queue.json is not JSON ({err}): {text}", dir.display()));
        if meta["name"] == name {
            return (dir, meta);
        }
    }
    panic!("no durable queue named {name:?} under {}", root.display());
}

/// The directory of durable queue `name` in `data_dir` (found through its `queue.json`).
pub fn queue_dir(data_dir: &Path, name: &str) -> PathBuf {
    find_queue(data_dir, name).0
}

/// The id of durable queue `name` in `data_dir`: its directory's name, and what the queue
/// records in its log say.
pub fn queue_id(data_dir: &Path, name: &str) -> u64 {
    let dir = queue_dir(data_dir, name);
    let id = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok());
    id.unwrap_or_else(|| panic!("{} is not named by a queue id", dir.display()))
}

/// The shared log directory that durable queue `name` in `data_dir` writes to: the `log` of its
/// `queue.json`.
pub fn log_dir(data_dir: &Path, name: &str) -> PathBuf {
    let (dir, meta) = find_queue(data_dir, name);
    let log =
        meta["log"].as_u64().unwrap_or_else(|| panic!("{}/queue.json names no log: {meta}", dir.display()));
    data_dir.join("queues").join("logs").join(log.to_string())
}

/// The segment files of a log directory that hold records, oldest first.
pub fn segment_files(log_dir: &Path) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(log_dir).unwrap_or_else(|err| panic!("read {}: {err}", log_dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        // The next segment, made ahead of need, holds only its magic until the log rolls into it.
        .filter(|path| {
            std::fs::metadata(path)
                .is_ok_and(|m| m.len() > hopper_broker::storage::segment::MAGIC.len() as u64)
        })
        .collect();
    // Names are zero-padded ids, so name order is id order.
    files.sort();
    files
}

/// Whether the last shutdown of the broker on `data_dir` was clean (its marker is present).
pub fn clean_marker_present(data_dir: &Path) -> bool {
    data_dir.join("queues").join("CLEAN").exists()
}

/// One record of a segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Byte offset of the record's header in the file.
    pub offset: usize,
    /// Bytes the record spans, header included.
    pub size: usize,
    /// What it says.
    pub kind: RecordKind,
}

impl Record {
    /// Offset of the first byte after the record.
    pub fn end(&self) -> usize {
        self.offset + self.size
    }
}

/// The decoded fields of a record that tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKind {
    /// The records after this one, up to the next queue record or the end of the segment,
    /// belong to queue `id`. Every write to a shared log starts with one.
    Queue {
        /// The queue's id.
        id: u64,
    },
    /// A message entered the queue (or was copied forward by compaction).
    Publish {
        /// Position in the queue.
        seq: u64,
        /// Deliveries recorded in this copy.
        delivery_count: u32,
        /// Broker-assigned message id.
        message_id: u64,
        /// The body.
        body: Vec<u8>,
    },
    /// A message left the queue for good.
    Settle {
        /// Position in the queue.
        seq: u64,
    },
    /// A message was delivered.
    Delivered {
        /// Position in the queue.
        seq: u64,
        /// Deliveries so far.
        delivery_count: u32,
    },
    /// A delivery failed.
    Failed {
        /// Position in the queue.
        seq: u64,
        /// Deliveries so far.
        delivery_count: u32,
    },
}

/// Every record of a segment file's bytes, checking the magic, each length and each CRC-32C.
/// Panics on anything that is not a well-formed segment: tests read files the broker wrote
/// before they damage them.
pub fn parse_segment(bytes: &[u8]) -> Vec<Record> {
    assert!(bytes.starts_with(SEGMENT_MAGIC), "a segment starts with its magic: {:?}", &bytes[..8]);
    let mut records = Vec::new();
    let mut at = SEGMENT_MAGIC.len();
    while at < bytes.len() {
        let header = bytes.get(at..at + RECORD_HEADER).expect("a complete record header");
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let fields = bytes.get(at + RECORD_HEADER..at + RECORD_HEADER + len).expect("a complete record");
        assert_eq!(crc32c::crc32c(fields), crc, "checksum of the record at offset {at}");
        records.push(Record { offset: at, size: RECORD_HEADER + len, kind: parse_fields(fields) });
        at += RECORD_HEADER + len;
    }
    records
}

/// Reads and parses a segment file.
pub fn read_segment(path: &Path) -> Vec<Record> {
    let bytes = std::fs::read(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    parse_segment(&bytes)
}

/// The records of queue `id` among `records` (one segment's, in file order): those after a
/// queue record naming it, up to the next queue record. Queue records are left out.
pub fn records_of(records: &[Record], id: u64) -> Vec<Record> {
    let mut owner = None;
    let mut owned = Vec::new();
    for record in records {
        match record.kind {
            RecordKind::Queue { id } => owner = Some(id),
            _ if owner == Some(id) => owned.push(record.clone()),
            _ => {}
        }
    }
    owned
}

/// Parses a record's fields with the broker's own decoder, so these helpers follow the format.
fn parse_fields(fields: &[u8]) -> RecordKind {
    use hopper_broker::storage::record::{parse, queue_id as queue_record, Record as Stored};
    if let Some(id) = queue_record(fields) {
        return RecordKind::Queue { id };
    }
    match parse(bytes::Bytes::copy_from_slice(fields)).expect("a well-formed record") {
        Stored::Publish(m) => RecordKind::Publish {
            seq: m.seq,
            delivery_count: m.delivery_count,
            message_id: m.payload.id,
            body: m.payload.body.to_vec(),
        },
        Stored::Settle { seq } => RecordKind::Settle { seq },
        Stored::Delivered { seq, delivery_count } => RecordKind::Delivered { seq, delivery_count },
        Stored::Failed { seq, delivery_count, .. } => RecordKind::Failed { seq, delivery_count },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A publish record as the broker encodes it.
    fn publish_record(seq: u64, id: u64, body: &[u8]) -> Vec<u8> {
        let mut payload = hopper_broker::message::Payload::default();
        payload.id = id;
        payload.body = bytes::Bytes::copy_from_slice(body);
        let mut record = Vec::new();
        hopper_broker::storage::record::encode_publish(&mut record, seq, 0, 0, 0, &payload);
        record
    }

    /// A queue record as the broker encodes it.
    fn queue_record(id: u64) -> Vec<u8> {
        let mut record = Vec::new();
        hopper_broker::storage::record::encode_queue(&mut record, id);
        record
    }

    #[test]
    fn parses_records_and_their_boundaries() {
        let mut file = SEGMENT_MAGIC.to_vec();
        file.extend_from_slice(&queue_record(7));
        let first = publish_record(0, 41, b"hello");
        file.extend_from_slice(&first);
        let mut settle = vec![2u8];
        settle.extend_from_slice(&0u64.to_le_bytes());
        file.extend_from_slice(&(settle.len() as u32).to_le_bytes());
        file.extend_from_slice(&crc32c::crc32c(&settle).to_le_bytes());
        file.extend_from_slice(&settle);

        let records = parse_segment(&file);
        assert_eq!(records.len(), 3);
        assert_eq!((records[0].offset, records[0].size), (8, RECORD_HEADER + 9));
        assert_eq!(records[0].kind, RecordKind::Queue { id: 7 });
        assert_eq!((records[1].offset, records[1].size), (records[0].end(), first.len()));
        let publish =
            RecordKind::Publish { seq: 0, delivery_count: 0, message_id: 41, body: b"hello".to_vec() };
        assert_eq!(records[1].kind, publish);
        assert_eq!(records[2].offset, records[1].end());
        assert_eq!(records[2].kind, RecordKind::Settle { seq: 0 });
        assert_eq!(records[2].end(), file.len());
    }

    #[test]
    fn records_belong_to_the_queue_named_before_them() {
        let mut file = SEGMENT_MAGIC.to_vec();
        for (queue, seq) in [(1, 0), (2, 0), (1, 1), (1, 2)] {
            file.extend_from_slice(&queue_record(queue));
            file.extend_from_slice(&publish_record(seq, queue * 10 + seq, b"x"));
        }
        let records = parse_segment(&file);
        let ids = |queue| {
            let owned = records_of(&records, queue);
            owned
                .iter()
                .map(|r| match r.kind {
                    RecordKind::Publish { message_id, .. } => message_id,
                    ref other => panic!("only publishes: {other:?}"),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(1), [10, 11, 12]);
        assert_eq!(ids(2), [20]);
        assert_eq!(ids(3), Vec::<u64>::new());
    }
}
