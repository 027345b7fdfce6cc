//! Codec tests: every message round-trips, and bad input comes back as values.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;

use super::*;
use crate::pb::*;

fn sample_message() -> Message {
    Message {
        message_id: 42,
        body: Bytes::from_static(b"{\"email\":\"a@example.com\"}"),
        headers: [("k".to_string(), "v".to_string())].into(),
        content_type: "application/json".into(),
        published_at_ms: 1_700_000_000_000,
        delivery_count: 3,
        redelivered: true,
        replay_count: 2,
        deaths_omitted: 4,
        deaths: vec![Death {
            queue: "jobs".into(),
            reason: "delivery_limit".into(),
            count: 5,
            error: "smtp down".into(),
            first_failure_ms: 1,
            last_failure_ms: 2,
            died_at_ms: 3,
            exchange: "events".into(),
            routing_key: "job.failed".into(),
        }],
        exchange: "events".into(),
        routing_key: "job.created".into(),
    }
}

fn queue_info() -> QueueInfo {
    QueueInfo {
        name: "jobs".into(),
        settings: Some(QueueSettings {
            durable: true,
            dead_letter: "jobs.dlq".into(),
            max_deliveries: 5,
            retry_backoff_ms: vec![1000, 10_000, 60_000],
            message_ttl_ms: 3_600_000,
            ack_timeout_ms: 30_000,
            max_length: 10_000,
            max_bytes: 1 << 20,
            overflow: "drop-head".into(),
            dead_letter_exchange: "dead".into(),
            dead_letter_routing_key: "jobs".into(),
            replicated: true,
            replicas: 3,
        }),
        ready: 5,
        unacked: 2,
        consumers: 1,
        published_total: 9,
        delivered_total: 4,
        acked_total: 2,
        redelivered_total: 1,
        delayed: 3,
        dead_lettered_total: [("expired".to_string(), 2)].into(),
        waiting_bytes: 1280,
        oldest_ready_ms: 1_700_000_000_000,
        alarm_depth: 100,
        alarm: true,
        read_error: "Input/output error (os error 5)".into(),
        is_dead_letter_queue: true,
        served_by: 2,
    }
}

fn move_info() -> MoveInfo {
    MoveInfo {
        id: 4,
        source: "jobs.dlq".into(),
        destination: "jobs".into(),
        rate: 50,
        limit: 100,
        filter_key: "reason".into(),
        filter_value: "expired".into(),
        state: "running".into(),
        moved: 40,
        skipped: 1,
        remaining: 59,
        error: String::new(),
        started_ms: 1,
        finished_ms: 0,
        through_exchange: false,
    }
}

/// One frame of every body variant. A new variant that is not listed here fails
/// `every_variant_is_covered`.
fn every_body() -> Vec<Body> {
    vec![
        Body::Hello(Hello {
            protocol_version: 1,
            client_name: "t".into(),
            heartbeat_ms: 5000,
            max_frame_size: 1 << 20,
            mechanism: "SCRAM-SHA-256".into(),
            auth: Bytes::from_static(b"n,,n=user,r=abc"),
        }),
        Body::HelloOk(HelloOk {
            protocol_version: 1,
            server_version: "0.1.0".into(),
            heartbeat_ms: 5000,
            max_frame_size: 1 << 20,
            auth: Bytes::from_static(b"v=xyz"),
            user: "user".into(),
        }),
        Body::HelloRejected(HelloRejected {
            message: "no".into(),
            min_version: 1,
            max_version: 1,
            code: ErrorCode::Unauthenticated as i32,
        }),
        Body::AuthChallenge(pb::AuthChallenge {
            challenge: Bytes::from_static(b"r=abcdef,s=c2FsdA==,i=4096"),
        }),
        Body::AuthResponse(pb::AuthResponse { response: Bytes::from_static(b"c=biws,r=abcdef,p=cHJvb2Y=") }),
        Body::UserPut(pb::UserPut {
            name: "u".into(),
            password: "p".into(),
            tags: vec!["admin".into()],
            update: true,
            keep_password: false,
        }),
        Body::UserDelete(pb::UserDelete { name: "u".into() }),
        Body::UserList(pb::UserList {}),
        Body::UserListOk(pb::UserListOk {
            users: vec![pb::UserInfo {
                name: "u".into(),
                tags: vec![],
                permissions: Some(pb::Permissions {
                    configure: ".*".into(),
                    write: "q".into(),
                    read: String::new(),
                }),
            }],
            default_user: true,
        }),
        Body::PermissionsSet(pb::PermissionsSet { user: "u".into(), permissions: None }),
        Body::WhoAmI(pb::WhoAmI {}),
        Body::WhoAmIOk(pb::WhoAmIOk { user: None, mechanism: "default".into() }),
        Body::AccessOk(pb::AccessOk {}),
        Body::TokenCreate(pb::TokenCreate { name: "ci".into(), expires_ms: 1_700_000_000_000 }),
        Body::TokenCreateOk(pb::TokenCreateOk { token: "hopper_abc".into() }),
        Body::TokenList(pb::TokenList {}),
        Body::TokenListOk(pb::TokenListOk {
            tokens: vec![pb::TokenInfo { name: "ci".into(), created_ms: 1, expires_ms: 0 }],
        }),
        Body::TokenDelete(pb::TokenDelete { name: "ci".into() }),
        Body::Heartbeat(Heartbeat {}),
        Body::Close(Close { code: ErrorCode::Internal as i32, reason: "shutting down".into() }),
        Body::Error(Error {
            code: ErrorCode::NotAllowed as i32,
            message: "served by node 2".into(),
            redirect: "10.0.0.2:5680".into(),
        }),
        Body::QueueDeclare(QueueDeclare {
            name: "jobs".into(),
            settings: Some(QueueSettings { durable: true, ..Default::default() }),
            passive: true,
        }),
        Body::QueueDeclareOk(QueueDeclareOk { queue: Some(queue_info()), created: true }),
        Body::QueueDelete(QueueDelete { name: "jobs".into(), if_unused: true, if_empty: true }),
        Body::QueueDeleteOk(QueueDeleteOk { message_count: 7 }),
        Body::QueuePurge(QueuePurge { name: "jobs".into() }),
        Body::QueuePurgeOk(QueuePurgeOk { message_count: 7 }),
        Body::QueueStats(QueueStats { name: "jobs".into() }),
        Body::QueueList(QueueList {}),
        Body::QueueListOk(QueueListOk { queues: vec![queue_info(), queue_info()] }),
        Body::QueueInfo(queue_info()),
        Body::Publish(Publish {
            queue: "jobs".into(),
            body: Bytes::from_static(b"hello"),
            headers: [("a".to_string(), "b".to_string())].into(),
            content_type: "text/plain".into(),
            exchange: "events".into(),
            routing_key: "order.eu.paid".into(),
            delay_ms: 1500,
            ttl_ms: 60_000,
            mandatory: true,
            publish_id: 0x1234_5678_9abc_def0,
        }),
        Body::PublishOk(PublishOk { message_id: 99, routed: 3 }),
        Body::ExchangeDeclare(ExchangeDeclare {
            name: "events".into(),
            kind: "topic".into(),
            durable: true,
            alternate: "unrouted".into(),
            passive: false,
        }),
        Body::Bind(Bind {
            binding: Some(Binding {
                source: "events".into(),
                destination: "emails".into(),
                destination_kind: "queue".into(),
                routing_key: "user.*".into(),
                arguments: [("x-match".to_string(), "any".to_string())].into(),
            }),
        }),
        Body::BindingListOk(BindingListOk { bindings: vec![Binding::default()] }),
        Body::ExchangeListOk(ExchangeListOk {
            exchanges: vec![ExchangeInfo { bindings: 4, ..Default::default() }],
        }),
        Body::ExchangeDeclareOk(ExchangeDeclareOk {
            exchange: Some(ExchangeInfo {
                name: "events".into(),
                kind: "topic".into(),
                ..Default::default()
            }),
            created: true,
        }),
        Body::ExchangeDelete(ExchangeDelete { name: "events".into(), if_unused: true }),
        Body::ExchangeDeleteOk(ExchangeDeleteOk {}),
        Body::ExchangeList(ExchangeList {}),
        Body::BindOk(BindOk { created: true }),
        Body::Unbind(Unbind { binding: Some(Binding { source: "a".into(), ..Default::default() }) }),
        Body::UnbindOk(UnbindOk { removed: false }),
        Body::BindingList(BindingList { exchange: "events".into(), queue: String::new() }),
        Body::Consume(Consume {
            queue: "jobs".into(),
            prefetch_count: 100,
            tag: "worker-1".into(),
            ack_timeout_ms: 30_000,
            limit: 25,
        }),
        Body::ConsumeOk(ConsumeOk { consumer_id: 3 }),
        Body::Cancel(Cancel { consumer_id: 3 }),
        Body::CancelOk(CancelOk { requeued: 4 }),
        Body::Deliver(Deliver { consumer_id: 3, delivery_tag: 17, message: Some(sample_message()) }),
        Body::Ack(Ack { consumer_id: 3, delivery_tag: 17, multiple: true, confirm: true }),
        Body::Nack(Nack {
            consumer_id: 3,
            delivery_tag: 17,
            multiple: true,
            requeue: true,
            confirm: true,
            error: "timeout talking to smtp".into(),
            delay_ms: Some(5000),
        }),
        Body::Reject(Reject {
            consumer_id: 3,
            delivery_tag: 17,
            requeue: false,
            confirm: true,
            error: "bad".into(),
        }),
        Body::SettleOk(SettleOk { settled: 5 }),
        Body::Extend(Extend { consumer_id: 3, delivery_tag: 4, extend_ms: 30_000 }),
        Body::DeliveryExpired(DeliveryExpired { consumer_id: 3, delivery_tag: 4 }),
        Body::Get(Get { queue: "jobs".into(), count: 10, visibility_ms: 30_000, wait_ms: 20_000 }),
        Body::GetOk(GetOk {
            deliveries: vec![Deliver { consumer_id: 3, delivery_tag: 17, message: Some(sample_message()) }],
        }),
        Body::FlowControl(FlowControl { blocked: true, reason: "memory high watermark".into() }),
        Body::BrokerStatus(BrokerStatus {}),
        Body::BrokerStatusOk(BrokerStatusOk {
            version: "0.1.0".into(),
            uptime_ms: 1,
            connections: 2,
            blocked: true,
            blocked_reason: "disk".into(),
            blocked_publishers: 3,
            memory_used: 4,
            memory_high_watermark: 5,
            disk_free: 6,
            disk_free_low_watermark: 7,
            storage_threads: 8,
            fsyncs: 9,
            open_segment_files: 10,
            storage_error: "fsync failed".into(),
        }),
        Body::MoveStart(MoveStart {
            source: "jobs.dlq".into(),
            destination: String::new(),
            rate: 50,
            limit: 10,
            filter_key: "reason".into(),
            filter_value: "expired".into(),
            through_exchange: true,
        }),
        Body::MoveInfo(move_info()),
        Body::MoveList(MoveList {}),
        Body::MoveListOk(MoveListOk { moves: vec![move_info()] }),
        Body::MoveCancel(MoveCancel { id: 4 }),
        Body::Peek(Peek { queue: "jobs".into(), count: 5 }),
        Body::Subscribe(Subscribe {}),
        Body::SubscribeOk(SubscribeOk {}),
        Body::Event(Event {
            time_ms: 1,
            kind: "alarm_raised".into(),
            queue: "jobs.dlq".into(),
            value: 101,
            detail: "ready depth 101 is above 100".into(),
        }),
        Body::QueueSetAlarm(QueueSetAlarm { name: "jobs.dlq".into(), depth: 100 }),
        Body::PeekOk(PeekOk { messages: vec![sample_message()] }),
        Body::AuditQuery(AuditQuery { queue: "jobs".into(), since_ms: 5, limit: 10 }),
        Body::AuditEvents(AuditEvents {
            events: vec![AuditEvent {
                time_ms: 1,
                queue: "jobs".into(),
                message_id: 2,
                reason: "rejected".into(),
                count: 3,
                consumer_id: 4,
                connection_id: 5,
                error: "bad json".into(),
                dead_letter: "jobs.dlq".into(),
                exchange: "work".into(),
                routing_key: "job".into(),
            }],
        }),
        Body::ConsumerCancelled(ConsumerCancelled { consumer_id: 3, reason: "queue deleted".into() }),
    ]
}

fn variant_name(body: &Body) -> String {
    let debug = format!("{body:?}");
    let name = debug.split('(').next().unwrap_or_default().to_string();
    assert_eq!(body.name(), name, "Body::name matches the variant");
    name
}

#[test]
fn every_message_round_trips() {
    let mut buf = BytesMut::new();
    let frames: Vec<Frame> =
        every_body().into_iter().enumerate().map(|(i, b)| Frame::new(i as u64 + 1, b)).collect();
    for frame in &frames {
        encode_frame(frame, DEFAULT_MAX_FRAME_SIZE, &mut buf).unwrap();
    }
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
    for expected in &frames {
        assert_eq!(decoder.decode(&mut buf), Some(Inbound::Frame(expected.clone())));
    }
    assert_eq!(decoder.decode(&mut buf), None);
    assert!(buf.is_empty());
}

#[test]
fn every_variant_is_covered() {
    // The schema's oneof field numbers; keep in step with hopper.proto.
    let names: std::collections::HashSet<String> = every_body().iter().map(variant_name).collect();
    assert_eq!(names.len(), every_body().len(), "a variant is listed twice");
    assert_eq!(names.len(), 75, "a Body variant was added: add it to every_body()");
}

#[test]
fn request_id_is_the_first_field_on_the_wire() {
    let frame = Frame::new(300, Body::Heartbeat(Heartbeat {}));
    let bytes = frame.encode_to_vec();
    assert_eq!(bytes[0], 0x08);
    assert_eq!(peek_request_id(&bytes), 300);
}

#[test]
fn frames_split_across_reads_are_reassembled() {
    let frame = Frame::new(
        7,
        Body::Publish(Publish {
            queue: "q".into(),
            body: Bytes::from(vec![1u8; 1000]),
            ..Default::default()
        }),
    );
    let mut wire = BytesMut::new();
    encode_frame(&frame, DEFAULT_MAX_FRAME_SIZE, &mut wire).unwrap();
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in wire.chunks(3) {
        buf.extend_from_slice(chunk);
        while let Some(item) = decoder.decode(&mut buf) {
            out.push(item);
        }
    }
    assert_eq!(out, vec![Inbound::Frame(frame)]);
}

#[test]
fn oversize_frame_is_skipped_with_its_request_id() {
    let big = Frame::new(
        55,
        Body::Publish(Publish {
            queue: "q".into(),
            body: Bytes::from(vec![0u8; 5000]),
            ..Default::default()
        }),
    );
    let small = Frame::new(56, Body::Heartbeat(Heartbeat {}));
    let mut wire = BytesMut::new();
    encode_frame(&big, DEFAULT_MAX_FRAME_SIZE, &mut wire).unwrap();
    encode_frame(&small, DEFAULT_MAX_FRAME_SIZE, &mut wire).unwrap();

    let mut decoder = FrameDecoder::new(1024);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in wire.chunks(700) {
        buf.extend_from_slice(chunk);
        while let Some(item) = decoder.decode(&mut buf) {
            out.push(item);
        }
    }
    assert_eq!(
        out,
        vec![Inbound::Oversize { request_id: 55, len: big.encoded_len() }, Inbound::Frame(small)]
    );
}

#[test]
fn encoding_refuses_frames_over_the_limit() {
    let big =
        Frame::new(1, Body::Publish(Publish { body: Bytes::from(vec![0u8; 2048]), ..Default::default() }));
    let mut buf = BytesMut::new();
    let err = encode_frame(&big, 1024, &mut buf).unwrap_err();
    assert!(matches!(err, ProtoError::FrameTooLarge { max: 1024, .. }));
    assert!(buf.is_empty());
}

#[test]
fn garbage_bytes_are_malformed_not_a_panic() {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
    let mut buf = BytesMut::new();
    buf.put_u32(6);
    buf.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    buf.put_u32(0);
    // Garbage does not start with field 1, so there is no request id to report.
    assert!(matches!(decoder.decode(&mut buf), Some(Inbound::Malformed { request_id: 0, .. })));
    // Framing survived: the empty frame behind the garbage decodes.
    assert_eq!(decoder.decode(&mut buf), Some(Inbound::Frame(Frame::default())));
}

/// A frame declaring `payload.len()` bytes and holding `payload`.
fn raw_frame(payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(payload.len() as u32);
    buf.extend_from_slice(payload);
    buf
}

/// A frame that starts with `request_id` (field 1) and goes on with `rest`.
fn frame_with_request_id(request_id: u64, rest: &[u8]) -> BytesMut {
    let mut payload = vec![0x08];
    prost::encoding::encode_varint(request_id, &mut payload);
    payload.extend_from_slice(rest);
    raw_frame(&payload)
}

// Field 2 (`hello`), length-delimited, declaring 100 bytes of which only 3 follow.
const CUT_SHORT_HELLO: &[u8] = &[0x12, 100, 1, 2, 3];

#[test]
fn malformed_frame_keeps_its_request_id() {
    for request_id in [1, 300, 1 << 40, u64::MAX] {
        let mut buf = frame_with_request_id(request_id, CUT_SHORT_HELLO);
        encode_frame(&Frame::new(9, Body::Heartbeat(Heartbeat {})), DEFAULT_MAX_FRAME_SIZE, &mut buf)
            .unwrap();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
        match decoder.decode(&mut buf) {
            Some(Inbound::Malformed { request_id: got, .. }) => assert_eq!(got, request_id),
            other => panic!("expected a malformed frame, got {other:?}"),
        }
        assert_eq!(
            decoder.decode(&mut buf),
            Some(Inbound::Frame(Frame::new(9, Body::Heartbeat(Heartbeat {}))))
        );
    }
}

#[test]
fn malformed_frame_with_an_unreadable_request_id_reports_zero() {
    let cases: [&[u8]; 3] = [
        // The tag of field 1 and nothing else: the varint is missing.
        &[0x08],
        // A varint that never ends within the frame.
        &[0x08, 0xff, 0xff, 0xff],
        // Eleven continuation bytes: longer than any u64 varint.
        &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    ];
    for payload in cases {
        let mut buf = raw_frame(payload);
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
        assert!(
            matches!(decoder.decode(&mut buf), Some(Inbound::Malformed { request_id: 0, .. })),
            "payload {payload:02x?}"
        );
        assert!(buf.is_empty(), "the whole frame is consumed: {payload:02x?}");
    }
}

#[test]
fn malformed_frame_split_across_reads_keeps_its_request_id() {
    let wire = frame_with_request_id(77, CUT_SHORT_HELLO);
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for byte in wire.iter() {
        buf.put_u8(*byte);
        out.extend(decoder.decode(&mut buf));
    }
    assert!(matches!(out.as_slice(), [Inbound::Malformed { request_id: 77, .. }]), "{out:?}");
}

#[test]
fn unknown_body_decodes_as_an_empty_body() {
    // Field 999, length-delimited, 0 bytes: a command from a newer protocol.
    let mut payload = Vec::new();
    prost::encoding::encode_key(999, prost::encoding::WireType::LengthDelimited, &mut payload);
    payload.push(0);
    let mut buf = BytesMut::new();
    buf.put_u32(payload.len() as u32);
    buf.extend_from_slice(&payload);
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
    assert_eq!(decoder.decode(&mut buf), Some(Inbound::Frame(Frame { request_id: 0, body: None })));
}

#[test]
fn truncated_frame_waits_for_more_bytes() {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
    let mut buf = BytesMut::new();
    buf.put_u32(100);
    buf.extend_from_slice(&[0x08, 0x01]);
    assert_eq!(decoder.decode(&mut buf), None);
    assert!(decoder.is_mid_frame(&buf));
}

#[test]
fn error_codes_are_stable() {
    let codes = [
        (ErrorCode::NotFound, 1),
        (ErrorCode::PreconditionFailed, 2),
        (ErrorCode::InvalidArgument, 3),
        (ErrorCode::FrameTooLarge, 4),
        (ErrorCode::ProtocolViolation, 5),
        (ErrorCode::NotAllowed, 6),
        (ErrorCode::ResourceLimit, 7),
        (ErrorCode::Internal, 8),
        (ErrorCode::UnsupportedVersion, 9),
        (ErrorCode::NoRoute, 10),
    ];
    for (code, number) in codes {
        assert_eq!(code as i32, number);
        assert_eq!(error_code(number), code);
    }
    assert_eq!(error_code(12345), ErrorCode::Unspecified);
}
