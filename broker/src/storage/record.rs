//! The on-disk record format of a queue log.
//!
//! ```text
//! +-----------+-----------+----------+----------------------+
//! | len: u32  | crc: u32  | kind: u8 | fields (len - 1 B)   |
//! +-----------+-----------+----------+----------------------+
//! ```
//!
//! Little-endian. `len` counts `kind` and the fields; `crc` is CRC-32C over the same bytes. A
//! record is valid only if all `len` bytes are present and the checksum matches, which is how
//! recovery tells a torn write at the tail from good data.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes};

use crate::message::{Death, DeathReason, Failure, Payload};

/// Bytes in front of a record's kind: `len` and `crc`.
pub const HEADER: usize = 8;
/// Bytes of a publish record that do not depend on the message: the header, the kind, the fixed
/// fields and the three length prefixes (content type, header count, death count).
pub const FIXED_PUBLISH_BYTES: u32 = (HEADER + publish_at::ID + 8 + 8 + 4 + 4 + 4 + 4) as u32;

/// Set in a publish record's death count when a count of omitted deaths follows it.
const DEATHS_OMITTED_FLAG: u32 = 1 << 31;
/// Set in a publish record's death count when each death carries an exchange and routing key.
const DEATHS_ROUTED_FLAG: u32 = 1 << 30;
/// Set in a publish record's header count when the exchange and routing key follow it.
const ROUTED_FLAG: u32 = 1 << 31;

/// Largest record accepted when reading; anything larger is corruption.
pub const MAX_RECORD: usize = 64 * 1024 * 1024;

pub(crate) const KIND_PUBLISH: u8 = 1;
pub(crate) const KIND_SETTLE: u8 = 2;
pub(crate) const KIND_DELIVERED: u8 = 3;
pub(crate) const KIND_FAILED: u8 = 4;
pub(crate) const KIND_QUEUE: u8 = 5;

/// Offsets of the fixed fields of a publish record (from the kind byte), which recovery reads
/// without parsing the rest.
pub(crate) mod publish_at {
    pub const SEQ: usize = 1;
    pub const DELIVERY_COUNT: usize = 9;
    pub const EXPIRES_AT: usize = 13;
    pub const DUE: usize = 21;
    pub const BODY_LEN: usize = 29;
    pub const ID: usize = 33;
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The message's position in its queue.
    pub seq: u64,
    /// Deliveries so far.
    pub delivery_count: u32,
    /// Unix ms of its expiry, 0 = never.
    pub expires_at_ms: u64,
    /// Unix ms at which a delayed message becomes ready, 0 = ready.
    pub due_ms: u64,
    /// Everything else.
    pub payload: Payload,
}

/// One entry of a queue log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A message entered the queue (or was copied forward by compaction).
    Publish(StoredMessage),
    /// A message left the queue for good: acked, dropped, purged, dead-lettered.
    Settle {
        /// The message's seq.
        seq: u64,
    },
    /// A message was delivered; its delivery count is now `delivery_count`.
    Delivered {
        /// The message's seq.
        seq: u64,
        /// Deliveries so far.
        delivery_count: u32,
    },
    /// A delivery of a message failed; it waits until `due_ms` (0 = ready at once).
    Failed {
        /// The message's seq.
        seq: u64,
        /// Deliveries so far.
        delivery_count: u32,
        /// When it becomes ready again, 0 = at once.
        due_ms: u64,
        /// Its failures so far.
        failure: Failure,
    },
}

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the header or the declared length: a torn write, or more to read.
    #[error("incomplete record")]
    Incomplete,
    /// The declared length is impossible.
    #[error("record length {0} is out of range")]
    BadLength(usize),
    /// The bytes do not match their checksum.
    #[error("checksum mismatch")]
    Checksum,
    /// The checksum matched but the fields do not parse.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

/// Appends a publish record for `payload` to `dst`, encoding straight from the shared payload.
pub fn encode_publish(
    dst: &mut Vec<u8>,
    seq: u64,
    delivery_count: u32,
    expires_at_ms: u64,
    due_ms: u64,
    payload: &Payload,
) {
    let start = begin(dst, KIND_PUBLISH);
    dst.put_u64_le(seq);
    dst.put_u32_le(delivery_count);
    dst.put_u64_le(expires_at_ms);
    dst.put_u64_le(due_ms);
    dst.put_u32_le(payload.body.len() as u32);
    dst.put_u64_le(payload.id);
    dst.put_u64_le(payload.published_at_ms);
    dst.put_u32_le(payload.replay_count);
    put_str(dst, payload.content_type());
    // Flag bits in the counts mark optional fields, so records written before those fields
    // existed (flags clear) still read: the header count's top bit says the exchange and routing
    // key follow it; the death count's top bit that a count of omitted deaths follows, its next
    // bit that every death carries its exchange and routing key.
    let routed = !payload.exchange.is_empty() || !payload.routing_key.is_empty();
    dst.put_u32_le(payload.headers().len() as u32 | if routed { ROUTED_FLAG } else { 0 });
    if routed {
        put_str(dst, &payload.exchange);
        put_str(dst, &payload.routing_key);
    }
    for (key, value) in payload.headers() {
        put_str(dst, key);
        put_str(dst, value);
    }
    let deaths_routed = payload.deaths().iter().any(|d| !d.exchange.is_empty() || !d.routing_key.is_empty());
    let mut count = payload.deaths().len() as u32;
    if payload.deaths_omitted() > 0 {
        count |= DEATHS_OMITTED_FLAG;
    }
    if deaths_routed {
        count |= DEATHS_ROUTED_FLAG;
    }
    dst.put_u32_le(count);
    if payload.deaths_omitted() > 0 {
        dst.put_u32_le(payload.deaths_omitted());
    }
    for death in payload.deaths() {
        put_str(dst, &death.queue);
        put_str(dst, death.reason.as_str());
        dst.put_u32_le(death.count);
        put_str(dst, &death.error);
        dst.put_u64_le(death.first_failure_ms);
        dst.put_u64_le(death.last_failure_ms);
        dst.put_u64_le(death.died_at_ms);
        if deaths_routed {
            put_str(dst, &death.exchange);
            put_str(dst, &death.routing_key);
        }
    }
    dst.extend_from_slice(&payload.body);
    finish(dst, start);
}

/// Appends a settle record.
pub fn encode_settle(dst: &mut Vec<u8>, seq: u64) {
    let start = begin(dst, KIND_SETTLE);
    dst.put_u64_le(seq);
    finish(dst, start);
}

/// Appends a queue record: the records that follow, up to the next queue record or the end of
/// the segment, belong to queue `id`.
pub fn encode_queue(dst: &mut Vec<u8>, id: u64) {
    let start = begin(dst, KIND_QUEUE);
    dst.put_u64_le(id);
    finish(dst, start);
}

/// The queue id in the fields of a queue record.
pub fn queue_id(fields: &[u8]) -> Option<u64> {
    let id = fields.get(1..9)?;
    (fields.first() == Some(&KIND_QUEUE)).then(|| u64::from_le_bytes(id.try_into().expect("8 bytes")))
}

/// Appends a delivered record.
pub fn encode_delivered(dst: &mut Vec<u8>, seq: u64, delivery_count: u32) {
    let start = begin(dst, KIND_DELIVERED);
    dst.put_u64_le(seq);
    dst.put_u32_le(delivery_count);
    finish(dst, start);
}

/// Appends a failed-delivery record.
pub fn encode_failed(dst: &mut Vec<u8>, seq: u64, delivery_count: u32, due_ms: u64, failure: &Failure) {
    let start = begin(dst, KIND_FAILED);
    dst.put_u64_le(seq);
    dst.put_u32_le(delivery_count);
    dst.put_u64_le(due_ms);
    dst.put_u64_le(failure.first_ms);
    dst.put_u64_le(failure.last_ms);
    put_str(dst, &failure.error);
    finish(dst, start);
}

impl Record {
    /// Appends this record's encoding to `dst`.
    pub fn encode(&self, dst: &mut Vec<u8>) {
        match self {
            Record::Publish(m) => {
                encode_publish(dst, m.seq, m.delivery_count, m.expires_at_ms, m.due_ms, &m.payload)
            }
            Record::Settle { seq } => encode_settle(dst, *seq),
            Record::Delivered { seq, delivery_count } => encode_delivered(dst, *seq, *delivery_count),
            Record::Failed { seq, delivery_count, due_ms, failure } => {
                encode_failed(dst, *seq, *delivery_count, *due_ms, failure)
            }
        }
    }
}

/// The message id in the fields of a damaged publish record (its checksum failed, or it is
/// cut short), if its fixed fields are there and name message `seq`; unverified, for reports.
pub fn salvage_id(fields: &[u8], seq: u64) -> Option<u64> {
    let u64_at =
        |at: usize| fields.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let publish = fields.first() == Some(&KIND_PUBLISH) && u64_at(publish_at::SEQ) == Some(seq);
    publish.then(|| u64_at(publish_at::ID)).flatten()
}

/// Reads the record at the front of `src`; returns it and its total size on disk.
pub fn decode(src: &[u8]) -> Result<(Record, usize), RecordError> {
    let len = frame_len(src)?;
    let bytes = Bytes::copy_from_slice(&src[HEADER..HEADER + len]);
    Ok((parse(bytes)?, HEADER + len))
}

/// Checks the header and checksum of the record at the front of `src` and returns the length
/// of its kind and fields (the record spans `HEADER + len` bytes).
pub fn frame_len(src: &[u8]) -> Result<usize, RecordError> {
    if src.len() < HEADER {
        return Err(RecordError::Incomplete);
    }
    let len = u32::from_le_bytes(src[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_RECORD {
        return Err(RecordError::BadLength(len));
    }
    if src.len() < HEADER + len {
        return Err(RecordError::Incomplete);
    }
    let crc = u32::from_le_bytes(src[4..8].try_into().expect("4 bytes"));
    if crc32c::crc32c(&src[HEADER..HEADER + len]) != crc {
        return Err(RecordError::Checksum);
    }
    Ok(len)
}

/// Parses a record's kind and fields (already checksummed). Bodies are sliced, not copied.
pub fn parse(mut b: Bytes) -> Result<Record, RecordError> {
    let kind = get_u8(&mut b)?;
    let record = match kind {
        KIND_PUBLISH => {
            let seq = get_u64(&mut b)?;
            let delivery_count = get_u32(&mut b)?;
            let expires_at_ms = get_u64(&mut b)?;
            let due_ms = get_u64(&mut b)?;
            let body_len = get_u32(&mut b)? as usize;
            let id = get_u64(&mut b)?;
            let published_at_ms = get_u64(&mut b)?;
            let replay_count = get_u32(&mut b)?;
            let content_type = get_str(&mut b)?;
            let flagged = get_u32(&mut b)?;
            let (exchange, routing_key) = if flagged & ROUTED_FLAG != 0 {
                (get_str(&mut b)?, get_str(&mut b)?)
            } else {
                (String::new(), String::new())
            };
            let count = (flagged & !ROUTED_FLAG) as usize;
            let mut headers = HashMap::with_capacity(count.min(1024));
            for _ in 0..count {
                let key = get_str(&mut b)?;
                let value = get_str(&mut b)?;
                headers.insert(key, value);
            }
            let flagged = get_u32(&mut b)?;
            let deaths_omitted = if flagged & DEATHS_OMITTED_FLAG != 0 { get_u32(&mut b)? } else { 0 };
            let deaths_routed = flagged & DEATHS_ROUTED_FLAG != 0;
            let count = (flagged & !(DEATHS_OMITTED_FLAG | DEATHS_ROUTED_FLAG)) as usize;
            let mut deaths = Vec::with_capacity(count.min(1024));
            for _ in 0..count {
                let queue = get_str(&mut b)?;
                let reason =
                    DeathReason::parse(&get_str(&mut b)?).ok_or(RecordError::Malformed("death reason"))?;
                let mut death = Death {
                    queue,
                    reason,
                    count: get_u32(&mut b)?,
                    error: get_str(&mut b)?,
                    first_failure_ms: get_u64(&mut b)?,
                    last_failure_ms: get_u64(&mut b)?,
                    died_at_ms: get_u64(&mut b)?,
                    exchange: String::new(),
                    routing_key: String::new(),
                };
                if deaths_routed {
                    death.exchange = get_str(&mut b)?;
                    death.routing_key = get_str(&mut b)?;
                }
                deaths.push(death);
            }
            if b.remaining() != body_len {
                return Err(RecordError::Malformed("body length"));
            }
            let payload = Payload {
                id,
                body: b,
                published_at_ms,
                replay_count,
                exchange: exchange.into(),
                routing_key,
                ..Payload::default()
            }
            .with_properties(headers, content_type)
            .with_deaths(deaths, deaths_omitted);
            Record::Publish(StoredMessage { seq, delivery_count, expires_at_ms, due_ms, payload })
        }
        KIND_SETTLE => Record::Settle { seq: get_u64(&mut b)? },
        KIND_DELIVERED => Record::Delivered { seq: get_u64(&mut b)?, delivery_count: get_u32(&mut b)? },
        KIND_FAILED => Record::Failed {
            seq: get_u64(&mut b)?,
            delivery_count: get_u32(&mut b)?,
            due_ms: get_u64(&mut b)?,
            failure: Failure {
                first_ms: get_u64(&mut b)?,
                last_ms: get_u64(&mut b)?,
                error: get_str(&mut b)?,
                ..Failure::default()
            },
        },
        _ => return Err(RecordError::Malformed("unknown kind")),
    };
    Ok(record)
}

fn begin(dst: &mut Vec<u8>, kind: u8) -> usize {
    let start = dst.len();
    dst.extend_from_slice(&[0; HEADER]);
    dst.push(kind);
    start
}

fn finish(dst: &mut [u8], start: usize) {
    let len = dst.len() - start - HEADER;
    let crc = crc32c::crc32c(&dst[start + HEADER..]);
    dst[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    dst[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str(dst: &mut Vec<u8>, s: &str) {
    dst.put_u32_le(s.len() as u32);
    dst.extend_from_slice(s.as_bytes());
}

fn need(b: &Bytes, n: usize) -> Result<(), RecordError> {
    if b.remaining() < n {
        return Err(RecordError::Malformed("truncated field"));
    }
    Ok(())
}

fn get_u8(b: &mut Bytes) -> Result<u8, RecordError> {
    need(b, 1)?;
    Ok(b.get_u8())
}

fn get_u32(b: &mut Bytes) -> Result<u32, RecordError> {
    need(b, 4)?;
    Ok(b.get_u32_le())
}

fn get_u64(b: &mut Bytes) -> Result<u64, RecordError> {
    need(b, 8)?;
    Ok(b.get_u64_le())
}

fn get_str(b: &mut Bytes) -> Result<String, RecordError> {
    let len = get_u32(b)? as usize;
    need(b, len)?;
    let bytes = b.split_to(len);
    String::from_utf8(bytes.to_vec()).map_err(|_| RecordError::Malformed("string is not UTF-8"))
}

#[cfg(test)]
mod prop_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> StoredMessage {
        StoredMessage {
            seq: 7,
            delivery_count: 2,
            expires_at_ms: 1_700_000_060_000,
            due_ms: 1_700_000_001_000,
            payload: Payload {
                id: 99,
                published_at_ms: 1_700_000_000_000,
                body: Bytes::from_static(b"{\"hello\":1}"),
                replay_count: 2,
                exchange: "events".into(),
                routing_key: "order.eu.paid".into(),
                ..Payload::default()
            }
            .with_properties(
                [("a".to_string(), "b".to_string()), ("trace".to_string(), "x".repeat(300))].into(),
                "application/json".into(),
            )
            .with_deaths(
                vec![Death {
                    queue: "jobs".into(),
                    reason: DeathReason::DeliveryLimit,
                    count: 3,
                    error: "boom".into(),
                    first_failure_ms: 1,
                    last_failure_ms: 2,
                    died_at_ms: 3,
                    exchange: "orders".into(),
                    routing_key: "eu.paid".into(),
                }],
                5,
            ),
        }
    }

    #[test]
    fn every_record_round_trips() {
        let plain = StoredMessage {
            payload: Payload { body: Bytes::new(), properties: None, ..message().payload },
            ..message()
        };
        let records = vec![
            Record::Publish(message()),
            Record::Publish(plain),
            Record::Settle { seq: u64::MAX },
            Record::Delivered { seq: 3, delivery_count: 9 },
            Record::Failed {
                seq: 4,
                delivery_count: 2,
                due_ms: 5,
                failure: Failure {
                    first_ms: 6,
                    last_ms: 7,
                    error: "stack trace".into(),
                    ..Failure::default()
                },
            },
        ];
        let mut buf = Vec::new();
        for record in &records {
            record.encode(&mut buf);
        }
        let mut at = 0;
        for expected in &records {
            let (record, size) = decode(&buf[at..]).unwrap();
            assert_eq!(&record, expected);
            at += size;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn fixed_offsets_match_the_encoding() {
        let mut buf = Vec::new();
        Record::Publish(message()).encode(&mut buf);
        let fields = &buf[HEADER..];
        let u64_at = |at: usize| u64::from_le_bytes(fields[at..at + 8].try_into().unwrap());
        assert_eq!(fields[0], KIND_PUBLISH);
        assert_eq!(u64_at(publish_at::SEQ), 7);
        assert_eq!(u32::from_le_bytes(fields[publish_at::DELIVERY_COUNT..][..4].try_into().unwrap()), 2);
        assert_eq!(u64_at(publish_at::EXPIRES_AT), 1_700_000_060_000);
        assert_eq!(u64_at(publish_at::DUE), 1_700_000_001_000);
        let body_len = u32::from_le_bytes(fields[publish_at::BODY_LEN..][..4].try_into().unwrap());
        assert_eq!(body_len as usize, message().payload.body.len());
    }

    #[test]
    fn every_cut_of_a_record_is_incomplete() {
        let mut buf = Vec::new();
        Record::Publish(message()).encode(&mut buf);
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]).unwrap_err(), RecordError::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let mut buf = Vec::new();
        Record::Publish(message()).encode(&mut buf);
        for at in HEADER..buf.len() {
            let mut copy = buf.clone();
            copy[at] ^= 0x10;
            assert_eq!(decode(&copy).unwrap_err(), RecordError::Checksum, "flip at {at}");
        }
    }

    #[test]
    fn zeros_and_garbage_lengths_are_rejected() {
        assert_eq!(decode(&[0; 32]).unwrap_err(), RecordError::BadLength(0));
        let mut huge = vec![0xff; 32];
        huge[4..].fill(0);
        assert!(matches!(decode(&huge).unwrap_err(), RecordError::BadLength(_)));
    }
}
