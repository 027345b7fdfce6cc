//! Property tests of the record format: any record round-trips through `encode` and `decode`,
//! and no bytes, with or without a valid checksum in front, make the decoder panic.
//!
//! The seed is fixed so `cargo test` is repeatable; `make fuzz` explores further.

use std::collections::HashMap;

use bytes::Bytes;
use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use super::*;
use crate::message::{Death, DeathReason, Failure, Payload};

/// Few enough cases that every property runs in well under a second in a debug build.
fn config(cases: u32) -> Config {
    Config { cases, rng_seed: RngSeed::Fixed(0x5245_434f_5244), ..Config::default() }
}

/// Short strings, often with non-ASCII characters.
fn text() -> impl Strategy<Value = String> {
    "[a-z0-9.é☃]{0,12}"
}

fn death() -> impl Strategy<Value = Death> {
    (
        text(),
        proptest::sample::select(DeathReason::ALL.to_vec()),
        any::<u32>(),
        text(),
        any::<[u64; 3]>(),
        (text(), text()),
    )
        .prop_map(|(queue, reason, count, error, times, (exchange, routing_key))| Death {
            queue,
            reason,
            count,
            error,
            first_failure_ms: times[0],
            last_failure_ms: times[1],
            died_at_ms: times[2],
            exchange,
            routing_key,
        })
}

fn payload() -> impl Strategy<Value = Payload> {
    (
        any::<u64>(),
        vec(any::<u8>(), 0..64),
        hash_map(text(), text(), 0..4),
        text(),
        any::<u64>(),
        vec(death(), 0..3),
        (any::<u32>(), 0..3u32, text(), text()),
    )
        .prop_map(
            |(
                id,
                body,
                headers,
                content_type,
                published_at_ms,
                deaths,
                (replay_count, omitted, exchange, key),
            )| {
                Payload {
                    id,
                    body: Bytes::from(body),
                    published_at_ms,
                    replay_count,
                    exchange: exchange.into(),
                    routing_key: key,
                    ..Payload::default()
                }
                .with_properties(headers.into_iter().collect::<HashMap<_, _>>(), content_type)
                .with_deaths(deaths, omitted)
            },
        )
}

/// Any record the broker can write. A failure's consumer and connection are not stored, so
/// they are left at 0 here.
fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (any::<u64>(), any::<u32>(), any::<u64>(), any::<u64>(), payload()).prop_map(
            |(seq, delivery_count, expires_at_ms, due_ms, payload)| Record::Publish(StoredMessage {
                seq,
                delivery_count,
                expires_at_ms,
                due_ms,
                payload,
            })
        ),
        any::<u64>().prop_map(|seq| Record::Settle { seq }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(seq, delivery_count)| Record::Delivered { seq, delivery_count }),
        (any::<u64>(), any::<u32>(), any::<[u64; 3]>(), text()).prop_map(
            |(seq, delivery_count, times, error)| Record::Failed {
                seq,
                delivery_count,
                due_ms: times[0],
                failure: Failure { first_ms: times[1], last_ms: times[2], error, ..Failure::default() },
            }
        ),
    ]
}

/// Appends `fields` behind a header with their true length and checksum.
fn checksummed(dst: &mut Vec<u8>, fields: &[u8]) {
    dst.extend_from_slice(&(fields.len() as u32).to_le_bytes());
    dst.extend_from_slice(&crc32c::crc32c(fields).to_le_bytes());
    dst.extend_from_slice(fields);
}

/// Decodes records off the front of `bytes` until one fails; every record decoded must
/// re-encode to one that decodes equal.
fn decode_all(mut bytes: &[u8]) -> Result<(), TestCaseError> {
    while let Ok((record, size)) = decode(bytes) {
        prop_assert!(size > HEADER && size <= bytes.len());
        let mut again = Vec::new();
        record.encode(&mut again);
        prop_assert_eq!(decode(&again), Ok((record, again.len())));
        bytes = &bytes[size..];
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn records_round_trip_back_to_back(records in vec(record(), 1..6)) {
        let mut buf = Vec::new();
        for record in &records {
            record.encode(&mut buf);
        }
        let mut at = 0;
        for expected in &records {
            let (record, size) = decode(&buf[at..]).expect("an encoded record decodes");
            prop_assert_eq!(&record, expected);
            at += size;
        }
        prop_assert_eq!(at, buf.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        decode_all(&bytes)?;
        let _ = parse(Bytes::from(bytes.clone()));
        let _ = salvage_id(&bytes, 0);
    }

    #[test]
    fn arbitrary_fields_behind_a_valid_checksum_never_panic(
        kind in 0u8..6,
        fields in vec(any::<u8>(), 0..96),
        tail in vec(any::<u8>(), 0..16),
    ) {
        // A kind the parser knows (mostly) with random fields: the checksum passes, so the
        // field parser itself meets the damage.
        let mut body = vec![kind];
        body.extend_from_slice(&fields);
        let mut bytes = Vec::new();
        checksummed(&mut bytes, &body);
        bytes.extend_from_slice(&tail);
        decode_all(&bytes)?;
    }

    #[test]
    fn a_record_with_a_changed_byte_is_refused_or_still_round_trips(
        record in record(),
        at in any::<proptest::sample::Index>(),
        byte in any::<u8>(),
    ) {
        // Past the header the checksum catches the change; in the header it may turn into a
        // length or checksum error, or an incomplete record, but never a panic.
        let mut bytes = Vec::new();
        record.encode(&mut bytes);
        let at = at.index(bytes.len());
        bytes[at] = byte;
        decode_all(&bytes)?;
    }
}
