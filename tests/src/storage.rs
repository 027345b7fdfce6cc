//! A durable queue's files as docs/storage.md describes them, read independently of the broker,
//! so tests can find record boundaries and then cut, corrupt and count segment files.

use std::path::{Path, PathBuf};

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"HOPSEG\x00\x01";
/// Bytes in front of a record's kind: `len: u32` and `crc: u32`.
pub const RECORD_HEADER: usize = 8;

/// The directory of durable queue `name` in `data_dir` (found through its `queue.json`).
pub fn queue_dir(data_dir: &Path, name: &str) -> PathBuf {
    let root = data_dir.join("queues");
    let entries = std::fs::read_dir(&root).unwrap_or_else(|err| panic!("read {}: {err}", root.display()));
    for entry in entries {
        let dir = entry.expect("a directory entry").path();
        let Ok(text) = std::fs::read_to_string(dir.join("queue.json")) else { continue };
        let meta: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("{}/queue.json is not JSON ({err}): {text}", dir.display()));
        if meta["name"] == name {
            return dir;
        }
    }
    panic!("no durable queue named {name:?} under {}", root.display());
}

/// The segment files of a queue directory, oldest first.
pub fn segment_files(queue_dir: &Path) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(queue_dir).unwrap_or_else(|err| panic!("read {}: {err}", queue_dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
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

/// Parses a record's fields with the broker's own decoder, so these helpers follow the format.
fn parse_fields(fields: &[u8]) -> RecordKind {
    use hopper_broker::storage::record::{parse, Record as Stored};
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
        let payload = hopper_broker::message::Payload {
            id,
            body: bytes::Bytes::copy_from_slice(body),
            ..Default::default()
        };
        let mut record = Vec::new();
        hopper_broker::storage::record::encode_publish(&mut record, seq, 0, 0, 0, &payload);
        record
    }

    #[test]
    fn parses_records_and_their_boundaries() {
        let mut file = SEGMENT_MAGIC.to_vec();
        let first = publish_record(0, 41, b"hello");
        file.extend_from_slice(&first);
        let mut settle = vec![2u8];
        settle.extend_from_slice(&0u64.to_le_bytes());
        file.extend_from_slice(&(settle.len() as u32).to_le_bytes());
        file.extend_from_slice(&crc32c::crc32c(&settle).to_le_bytes());
        file.extend_from_slice(&settle);

        let records = parse_segment(&file);
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].offset, records[0].size), (8, first.len()));
        let publish =
            RecordKind::Publish { seq: 0, delivery_count: 0, message_id: 41, body: b"hello".to_vec() };
        assert_eq!(records[0].kind, publish);
        assert_eq!(records[1].offset, records[0].end());
        assert_eq!(records[1].kind, RecordKind::Settle { seq: 0 });
        assert_eq!(records[1].end(), file.len());
    }
}
