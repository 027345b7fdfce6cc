//! Property tests of the codec: frames of several message types round-trip, and the decoder,
//! fed any bytes split into any reads, never panics and decodes the same units as from one read.
//!
//! The seed is fixed so `cargo test` is repeatable; `make fuzz` explores further.

use bytes::{Bytes, BytesMut};
use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use super::*;

/// Few enough cases that every property runs in well under a second in a debug build.
fn config(cases: u32) -> Config {
    Config { cases, rng_seed: RngSeed::Fixed(0x4850_5052_4f54), ..Config::default() }
}

/// Short strings, often with non-ASCII characters.
fn text() -> impl Strategy<Value = String> {
    "[a-z0-9.é☃]{0,12}"
}

fn headers() -> impl Strategy<Value = std::collections::HashMap<String, String>> {
    hash_map(text(), text(), 0..4)
}

fn settings() -> impl Strategy<Value = pb::QueueSettings> {
    (any::<bool>(), text(), any::<u32>(), vec(any::<u64>(), 0..4), any::<[u64; 4]>(), text()).prop_map(
        |(durable, dead_letter, max_deliveries, retry_backoff_ms, limits, overflow)| pb::QueueSettings {
            durable,
            dead_letter,
            max_deliveries,
            retry_backoff_ms,
            message_ttl_ms: limits[0],
            ack_timeout_ms: limits[1],
            max_length: limits[2],
            max_bytes: limits[3],
            overflow,
            ..Default::default()
        },
    )
}

/// A queue description with every kind of field set to something.
fn queue_info() -> impl Strategy<Value = pb::QueueInfo> {
    (
        text(),
        proptest::option::of(settings()),
        any::<[u64; 8]>(),
        hash_map(text(), any::<u64>(), 0..3),
        any::<bool>(),
        text(),
    )
        .prop_map(|(name, settings, counts, dead_lettered_total, alarm, read_error)| pb::QueueInfo {
            name,
            settings,
            ready: counts[0],
            unacked: counts[1],
            consumers: counts[2] as u32,
            published_total: counts[3],
            delivered_total: counts[4],
            acked_total: counts[5],
            redelivered_total: counts[6],
            delayed: counts[7],
            dead_lettered_total,
            alarm,
            read_error,
            ..Default::default()
        })
}

fn death() -> impl Strategy<Value = pb::Death> {
    (text(), text(), any::<u32>(), text(), any::<[u64; 3]>()).prop_map(
        |(queue, reason, count, error, times)| pb::Death {
            queue,
            reason,
            count,
            exchange: queue_of(&error),
            error,
            first_failure_ms: times[0],
            last_failure_ms: times[1],
            died_at_ms: times[2],
            routing_key: String::new(),
        },
    )
}

/// A name derived from another field, so routing fields vary without widening the tuples.
fn queue_of(text: &str) -> String {
    text.chars().rev().collect()
}

/// A message with a body, headers and deaths.
fn message() -> impl Strategy<Value = pb::Message> {
    (
        any::<u64>(),
        vec(any::<u8>(), 0..64),
        headers(),
        text(),
        any::<[u32; 3]>(),
        any::<bool>(),
        vec(death(), 0..3),
    )
        .prop_map(|(message_id, body, headers, content_type, counts, redelivered, deaths)| pb::Message {
            message_id,
            body: Bytes::from(body),
            headers,
            exchange: queue_of(&content_type),
            routing_key: content_type.clone(),
            content_type,
            published_at_ms: u64::from(counts[0]) << 10,
            delivery_count: counts[1],
            redelivered,
            deaths,
            replay_count: counts[2],
            deaths_omitted: counts[2] % 3,
        })
}

/// An audit event with every field set.
fn audit_event() -> impl Strategy<Value = pb::AuditEvent> {
    (any::<[u64; 4]>(), text(), text(), any::<u32>(), text(), text()).prop_map(
        |(numbers, queue, reason, count, error, dead_letter)| pb::AuditEvent {
            time_ms: numbers[0],
            routing_key: queue.clone(),
            queue,
            message_id: numbers[1],
            reason,
            count,
            consumer_id: numbers[2],
            connection_id: numbers[3],
            exchange: queue_of(&error),
            error,
            dead_letter,
        },
    )
}

/// Bodies of several message types: session, queue, publish, consume and audit.
fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (any::<u32>(), text(), any::<u32>(), any::<u32>()).prop_map(|(v, name, hb, max)| Body::Hello(
            pb::Hello {
                protocol_version: v,
                client_name: name,
                heartbeat_ms: hb,
                max_frame_size: max,
                ..Default::default()
            }
        )),
        (any::<i32>(), text(), text()).prop_map(|(code, message, redirect)| Body::Error(pb::Error {
            code,
            message,
            redirect
        })),
        (proptest::option::of(queue_info()), any::<bool>())
            .prop_map(|(queue, created)| Body::QueueDeclareOk(pb::QueueDeclareOk { queue, created })),
        (text(), vec(any::<u8>(), 0..128), headers(), any::<u64>()).prop_map(
            |(queue, body, headers, delay_ms)| {
                Body::Publish(pb::Publish {
                    queue,
                    body: Bytes::from(body),
                    headers,
                    delay_ms,
                    ..Default::default()
                })
            }
        ),
        (any::<u64>(), any::<u64>(), proptest::option::of(message())).prop_map(
            |(consumer_id, delivery_tag, message)| {
                Body::Deliver(pb::Deliver { consumer_id, delivery_tag, message })
            }
        ),
        (any::<u64>(), any::<u8>(), text(), proptest::option::of(any::<u64>())).prop_map(
            |(delivery_tag, flags, error, delay_ms)| Body::Nack(pb::Nack {
                consumer_id: 1,
                delivery_tag,
                multiple: flags & 1 != 0,
                requeue: flags & 2 != 0,
                confirm: flags & 4 != 0,
                error,
                delay_ms,
            })
        ),
        vec(audit_event(), 0..3).prop_map(|events| Body::AuditEvents(pb::AuditEvents { events })),
        Just(Body::Heartbeat(pb::Heartbeat {})),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (any::<u64>(), body()).prop_map(|(request_id, body)| Frame::new(request_id, body))
}

/// A piece of a byte stream: a well-formed frame, a length prefix over garbage, or raw garbage.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        frame().prop_map(|frame| {
            let mut buf = BytesMut::new();
            encode_frame(&frame, u32::MAX, &mut buf).expect("no limit to exceed");
            buf.to_vec()
        }),
        vec(any::<u8>(), 0..40).prop_map(|garbage| {
            let mut buf = (garbage.len() as u32).to_be_bytes().to_vec();
            buf.extend_from_slice(&garbage);
            buf
        }),
        vec(any::<u8>(), 0..16),
    ]
}

/// Decodes `wire` arriving in reads of the given sizes (the rest in one last read); returns
/// the units decoded and the bytes left over.
fn decode_in_reads(max_frame_size: u32, wire: &[u8], reads: &[usize]) -> (Vec<Inbound>, BytesMut) {
    let mut decoder = FrameDecoder::new(max_frame_size);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = wire;
    for &size in reads.iter().chain(std::iter::once(&usize::MAX)) {
        let (read, tail) = rest.split_at(size.min(rest.len()));
        buf.extend_from_slice(read);
        rest = tail;
        while let Some(unit) = decoder.decode(&mut buf) {
            out.push(unit);
        }
    }
    (out, buf)
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn frames_round_trip(frame in frame(), reads in vec(1usize..32, 0..16)) {
        let mut wire = BytesMut::new();
        encode_frame(&frame, u32::MAX, &mut wire).expect("no limit to exceed");
        prop_assert_eq!(wire.len(), LENGTH_PREFIX + frame.encoded_len());
        let (units, left) = decode_in_reads(DEFAULT_MAX_FRAME_SIZE, &wire, &reads);
        prop_assert_eq!(units, vec![Inbound::Frame(frame)]);
        prop_assert!(left.is_empty());
    }

    #[test]
    fn any_bytes_in_any_reads_decode_as_in_one_read(
        pieces in vec(piece(), 0..8),
        reads in vec(0usize..48, 0..24),
        max in prop_oneof![Just(0u32), Just(1), Just(16), Just(300), Just(DEFAULT_MAX_FRAME_SIZE)],
    ) {
        let wire = pieces.concat();
        let (whole, whole_left) = decode_in_reads(max, &wire, &[]);
        let (split, split_left) = decode_in_reads(max, &wire, &reads);
        prop_assert_eq!(whole, split);
        prop_assert_eq!(whole_left, split_left);
    }
}

#[cfg(feature = "json")]
mod json_forms {
    //! The JSON forms survive being written and read back, message ids (strings) included.

    use super::*;
    use crate::json::{AuditJson, MessageJson, QueueJson};

    /// Writes `value` as JSON and reads it back.
    fn reread<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
        let text = serde_json::to_string(value).expect("serializes");
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("{text} does not parse back: {err}"))
    }

    proptest! {
        #![proptest_config(config(128))]

        #[test]
        fn queues_round_trip(info in queue_info()) {
            let queue = QueueJson::from(&info);
            prop_assert_eq!(reread(&queue), queue);
        }

        #[test]
        fn messages_round_trip(
            message in message(),
            queue in text(),
            delivery_tag in proptest::option::of(any::<u64>()),
            receipt in proptest::option::of(text()),
        ) {
            let json = MessageJson { delivery_tag, receipt, ..MessageJson::new(&message, &queue) };
            prop_assert_eq!(reread(&json), json);
        }

        #[test]
        fn audit_events_round_trip(event in audit_event()) {
            let audit = AuditJson::from(&event);
            prop_assert_eq!(reread(&audit), audit);
        }

        #[test]
        fn damaged_json_parses_or_fails_without_panicking(
            message in message(),
            edits in vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<proptest::sample::Index>(),
        ) {
            // Valid JSON with a few bytes changed and cut short somewhere: close enough to
            // the real shape to get past the first byte.
            let mut bytes = serde_json::to_vec(&MessageJson::new(&message, "q")).expect("serializes");
            for (at, byte) in edits {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            bytes.truncate(bytes.len() - cut.index(bytes.len() / 4 + 1));
            if let Ok(parsed) = serde_json::from_slice::<MessageJson>(&bytes) {
                prop_assert_eq!(reread(&parsed), parsed);
            }
            let _ = serde_json::from_slice::<QueueJson>(&bytes);
            let _ = serde_json::from_slice::<AuditJson>(&bytes);
        }
    }
}
