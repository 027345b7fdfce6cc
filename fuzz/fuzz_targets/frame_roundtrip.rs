//! Frames built from arbitrary field values survive `encode_frame` and `FrameDecoder` unchanged.
//!
//! The input is a small local description of a frame (derived with `arbitrary`, since the
//! generated protobuf types do not derive it) mapped onto the message types with the most
//! structure: strings, bytes, maps, repeated and nested messages, optional fields, and error
//! codes outside the known range. Encoding under a max frame size either fits and decodes back
//! to the same frame, or is refused without writing anything.

#![no_main]

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use hopper_proto::{encode_frame, pb, Body, Frame, FrameDecoder, Inbound, ProtoError};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    request_id: u64,
    body: BodyInput,
    /// A max frame size to encode under, besides the unlimited one.
    max_frame_size: u16,
}

#[derive(Debug, Arbitrary)]
enum BodyInput {
    Hello {
        protocol_version: u32,
        client_name: String,
        heartbeat_ms: u32,
        max_frame_size: u32,
    },
    Error {
        code: i32,
        message: String,
    },
    Declare {
        name: String,
        settings: Option<SettingsInput>,
        passive: bool,
    },
    DeclareOk {
        queue: Option<InfoInput>,
        created: bool,
    },
    ListOk {
        queues: Vec<InfoInput>,
    },
    Publish {
        queue: String,
        body: Vec<u8>,
        headers: Vec<(String, String)>,
        content_type: String,
        delay_ms: u64,
    },
    Deliver {
        consumer_id: u64,
        delivery_tag: u64,
        message: Option<MessageInput>,
    },
    GetOk {
        deliveries: Vec<(u64, u64, MessageInput)>,
    },
    Nack {
        consumer_id: u64,
        delivery_tag: u64,
        flags: u8,
        error: String,
        delay_ms: Option<u64>,
    },
    AuditEvents {
        events: Vec<(u64, String, u64, String, u32, String)>,
    },
    Heartbeat,
}

#[derive(Debug, Arbitrary)]
struct SettingsInput {
    durable: bool,
    dead_letter: String,
    max_deliveries: u32,
    retry_backoff_ms: Vec<u64>,
    limits: [u64; 4],
    overflow: String,
}

#[derive(Debug, Arbitrary)]
struct InfoInput {
    name: String,
    settings: Option<SettingsInput>,
    counts: [u64; 8],
    consumers: u32,
    dead_lettered: Vec<(String, u64)>,
    alarm: bool,
    read_error: String,
}

#[derive(Debug, Arbitrary)]
struct MessageInput {
    message_id: u64,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
    content_type: String,
    published_at_ms: u64,
    delivery_count: u32,
    redelivered: bool,
    deaths: Vec<(String, String, u32, String, [u64; 3])>,
    replay_count: u32,
}

fuzz_target!(|input: Input| {
    let frame = Frame::new(input.request_id, input.body.into_body());

    let mut wire = BytesMut::new();
    encode_frame(&frame, u32::MAX, &mut wire).expect("no limit to exceed");
    let mut decoder = FrameDecoder::new(u32::MAX);
    assert_eq!(decoder.decode(&mut wire), Some(Inbound::Frame(frame.clone())));
    assert!(wire.is_empty(), "the frame was decoded from exactly its own bytes");

    let max = u32::from(input.max_frame_size);
    let mut limited = BytesMut::new();
    match encode_frame(&frame, max, &mut limited) {
        Ok(()) => {
            let mut decoder = FrameDecoder::new(max);
            assert_eq!(decoder.decode(&mut limited), Some(Inbound::Frame(frame)));
        }
        Err(ProtoError::FrameTooLarge { len, .. }) => {
            assert!(len > max as usize);
            assert!(limited.is_empty(), "a refused frame writes nothing");
        }
        Err(other) => panic!("encoding failed with {other}"),
    }
});

impl BodyInput {
    fn into_body(self) -> Body {
        match self {
            BodyInput::Hello { protocol_version, client_name, heartbeat_ms, max_frame_size } => {
                Body::Hello(pb::Hello { protocol_version, client_name, heartbeat_ms, max_frame_size })
            }
            BodyInput::Error { code, message } => Body::Error(pb::Error { code, message }),
            BodyInput::Declare { name, settings, passive } => {
                Body::QueueDeclare(pb::QueueDeclare { name, settings: settings.map(Into::into), passive })
            }
            BodyInput::DeclareOk { queue, created } => {
                Body::QueueDeclareOk(pb::QueueDeclareOk { queue: queue.map(Into::into), created })
            }
            BodyInput::ListOk { queues } => {
                Body::QueueListOk(pb::QueueListOk { queues: queues.into_iter().map(Into::into).collect() })
            }
            BodyInput::Publish { queue, body, headers, content_type, delay_ms } => {
                Body::Publish(pb::Publish {
                    queue,
                    body: Bytes::from(body),
                    headers: headers.into_iter().collect(),
                    content_type,
                    delay_ms,
                    ..Default::default()
                })
            }
            BodyInput::Deliver { consumer_id, delivery_tag, message } => {
                Body::Deliver(pb::Deliver { consumer_id, delivery_tag, message: message.map(Into::into) })
            }
            BodyInput::GetOk { deliveries } => Body::GetOk(pb::GetOk {
                deliveries: deliveries
                    .into_iter()
                    .map(|(consumer_id, delivery_tag, message)| pb::Deliver {
                        consumer_id,
                        delivery_tag,
                        message: Some(message.into()),
                    })
                    .collect(),
            }),
            BodyInput::Nack { consumer_id, delivery_tag, flags, error, delay_ms } => Body::Nack(pb::Nack {
                consumer_id,
                delivery_tag,
                multiple: flags & 1 != 0,
                requeue: flags & 2 != 0,
                confirm: flags & 4 != 0,
                error,
                delay_ms,
            }),
            BodyInput::AuditEvents { events } => Body::AuditEvents(pb::AuditEvents {
                events: events
                    .into_iter()
                    .map(|(time_ms, queue, message_id, reason, count, error)| pb::AuditEvent {
                        time_ms,
                        queue,
                        message_id,
                        reason,
                        count,
                        error,
                        ..Default::default()
                    })
                    .collect(),
            }),
            BodyInput::Heartbeat => Body::Heartbeat(pb::Heartbeat {}),
        }
    }
}

impl From<SettingsInput> for pb::QueueSettings {
    fn from(s: SettingsInput) -> Self {
        let [message_ttl_ms, ack_timeout_ms, max_length, max_bytes] = s.limits;
        pb::QueueSettings {
            durable: s.durable,
            dead_letter: s.dead_letter,
            max_deliveries: s.max_deliveries,
            retry_backoff_ms: s.retry_backoff_ms,
            message_ttl_ms,
            ack_timeout_ms,
            max_length,
            max_bytes,
            overflow: s.overflow,
        }
    }
}

impl From<InfoInput> for pb::QueueInfo {
    fn from(i: InfoInput) -> Self {
        let [ready, unacked, published_total, delivered_total, acked_total, redelivered_total, delayed, waiting_bytes] =
            i.counts;
        pb::QueueInfo {
            name: i.name,
            settings: i.settings.map(Into::into),
            ready,
            unacked,
            consumers: i.consumers,
            published_total,
            delivered_total,
            acked_total,
            redelivered_total,
            delayed,
            dead_lettered_total: i.dead_lettered.into_iter().collect(),
            waiting_bytes,
            alarm: i.alarm,
            read_error: i.read_error,
            ..Default::default()
        }
    }
}

impl From<MessageInput> for pb::Message {
    fn from(m: MessageInput) -> Self {
        pb::Message {
            message_id: m.message_id,
            body: Bytes::from(m.body),
            headers: m.headers.into_iter().collect(),
            content_type: m.content_type,
            published_at_ms: m.published_at_ms,
            delivery_count: m.delivery_count,
            redelivered: m.redelivered,
            deaths: m
                .deaths
                .into_iter()
                .map(|(queue, reason, count, error, [first, last, died])| pb::Death {
                    queue,
                    reason,
                    count,
                    error,
                    first_failure_ms: first,
                    last_failure_ms: last,
                    died_at_ms: died,
                })
                .collect(),
            replay_count: m.replay_count,
        }
    }
}
