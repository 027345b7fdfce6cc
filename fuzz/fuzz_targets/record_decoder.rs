//! Arbitrary bytes through the storage record decoder and the recovery scan of a queue
//! directory, as a damaged or hostile data directory would hold them.
//!
//! Random bytes almost never carry a valid checksum, so the input also gives record bodies
//! (kind and fields) that are wrapped in a correct header and checksum: the field parser and
//! recovery's replay behind the checksum see arbitrary fields too. Nothing may panic; a record
//! that decodes re-encodes to one that decodes equal; recovery finds each live message once,
//! in seq order, and a second scan of what the first left behind finds the same messages and
//! only the damage that cannot be repaired.

#![no_main]

use std::collections::HashSet;

use arbitrary::Arbitrary;
use bytes::Bytes;
use hopper_broker::storage::record::{self, HEADER};
use hopper_broker::storage::segment;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    /// Record bodies to wrap in a valid header and checksum.
    records: Vec<Vec<u8>>,
    /// Bytes after the records: a torn write, garbage, or nothing.
    tail: Vec<u8>,
    /// Whether the segment starts with the magic (a bad magic is its own recovery case).
    magic: bool,
    /// Whether an empty, newer segment follows, which makes this one an older segment: damage
    /// is skipped and reported instead of truncated.
    older: bool,
    /// The segment's id.
    id: u64,
}

fuzz_target!(|input: Input| {
    let mut bytes = Vec::new();
    for fields in &input.records {
        wrap(&mut bytes, fields);
    }
    bytes.extend_from_slice(&input.tail);

    decode_all(&bytes);
    // The raw input once more without the wrapping, straight into every entry point.
    let _ = record::frame_len(&input.tail);
    let _ = record::parse(Bytes::copy_from_slice(&input.tail));
    for fields in &input.records {
        let _ = record::parse(Bytes::copy_from_slice(fields));
        let _ = record::salvage_id(fields, input.id);
    }

    scan_twice(&input, &bytes);
});

/// Appends `fields` as a record with a correct length and checksum.
fn wrap(dst: &mut Vec<u8>, fields: &[u8]) {
    dst.extend_from_slice(&(fields.len() as u32).to_le_bytes());
    dst.extend_from_slice(&crc32c::crc32c(fields).to_le_bytes());
    dst.extend_from_slice(fields);
}

/// Decodes records from the front of `bytes` until one fails, checking each round trip.
fn decode_all(mut bytes: &[u8]) {
    while let Ok((record, size)) = record::decode(bytes) {
        assert!(size > HEADER && size <= bytes.len(), "size {size} of {} bytes", bytes.len());
        let mut again = Vec::new();
        record.encode(&mut again);
        let (decoded, again_size) = record::decode(&again).expect("an encoded record decodes");
        assert_eq!(decoded, record);
        assert_eq!(again_size, again.len());
        bytes = &bytes[size..];
    }
}

/// Recovers a queue directory holding `bytes` as a segment, then recovers it again.
fn scan_twice(input: &Input, bytes: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut file = Vec::new();
    if input.magic {
        file.extend_from_slice(segment::MAGIC);
    }
    file.extend_from_slice(bytes);
    std::fs::write(segment::path(dir.path(), input.id), &file).expect("write the segment");
    if input.older {
        if let Some(newer) = input.id.checked_add(1) {
            std::fs::write(segment::path(dir.path(), newer), segment::MAGIC).expect("write the segment");
        }
    }

    // A log shared by queues: queue records in the bytes say whose records follow.
    let every = |_| true;
    let first = segment::scan(dir.path(), None, &every).expect("the scan reads its own files");
    for queue in first.queues.values() {
        let mut seen = HashSet::new();
        for pair in queue.messages.windows(2) {
            assert!(pair[0].seq < pair[1].seq, "messages in seq order, each once");
        }
        for found in &queue.messages {
            assert!(seen.insert(found.seq));
            assert!(found.seq < queue.next_seq, "next_seq is past every message");
            let length = first.segments.iter().find(|(id, _)| *id == found.location.segment());
            let (_, length) = length.expect("a message lies in a listed segment");
            assert!(found.location.offset() + u64::from(found.location.bytes()) <= *length);
        }
    }
    for &queue in first.queues.keys() {
        assert!(queue <= first.max_queue, "max_queue covers every queue found");
    }

    let second = segment::scan(dir.path(), None, &every).expect("the scan reads its own files");
    assert_eq!(second.queues, first.queues, "a second recovery finds the same messages");
    assert_eq!(second.segments, first.segments);
    let unrepaired: Vec<_> = first.problems.iter().filter(|p| p.is_error).cloned().collect();
    assert_eq!(second.problems, unrepaired, "the first recovery repaired every torn tail");
}
