//! Hopper's wire protocol as a pure codec: schema types, frame layout, encode and decode.
//! Nothing here touches a socket or a runtime.
//!
//! # Frame layout
//!
//! ```text
//! 0               4                                   4 + len
//! +---------------+-----------------------------------+
//! | len: u32 (BE) | Frame (protobuf, `len` bytes)      |
//! +---------------+-----------------------------------+
//!                 | 0x08 request_id (varint) | oneof body ... |
//! ```
//!
//! `len` counts the protobuf bytes only. A `Frame` carries a `request_id` (field 1, encoded
//! first) and exactly one command or event in its `body` oneof. A receiver that meets a frame
//! longer than the negotiated maximum skips its bytes and reports
//! [`Inbound::Oversize`] with the request id read from the frame's first bytes, so the
//! connection can go on. A frame of the right length whose bytes do not decode is reported as
//! [`Inbound::Malformed`] with the request id read the same way, so the sender learns which of
//! its requests failed. See `docs/protocol.md` for the session rules.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;

/// Types generated from `proto/hopper.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/hopper.v1.rs"));
}

pub use pb::frame::Body;
pub use pb::{ErrorCode, Frame};

mod deliver;
mod error;
mod exchange;
#[cfg(feature = "json")]
pub mod json;
pub mod scram;
#[cfg(feature = "tokio-codec")]
mod tokio_codec;

pub use deliver::deliver_event_offset;
pub use error::ProtoError;
pub use exchange::ExchangeKind;
#[cfg(feature = "tokio-codec")]
pub use tokio_codec::{FrameCodec, RawFrameCodec};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest protocol version a broker built from this crate accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// Size of the length prefix in front of every frame.
pub const LENGTH_PREFIX: usize = 4;
/// Default and upper bound of the negotiated max frame size (16 MiB).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16 * 1024 * 1024;
/// Max frame size in force before the handshake completes: enough for any `Hello`.
pub const HANDSHAKE_MAX_FRAME_SIZE: u32 = 64 * 1024;

/// Most bytes of a frame needed to read its request id: one tag byte and a 10-byte varint.
const REQUEST_ID_PREFIX: usize = 11;

impl Frame {
    /// A frame carrying `body` for request `request_id`.
    pub fn new(request_id: u64, body: Body) -> Self {
        Frame { request_id, body: Some(body) }
    }

    /// An event frame (request id 0).
    pub fn event(body: Body) -> Self {
        Frame::new(0, body)
    }

    /// An error response to `request_id`.
    pub fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Frame::new(
            request_id,
            Body::Error(pb::Error { code: code as i32, message: message.into(), redirect: String::new() }),
        )
    }

    /// An error response to `request_id` that names the node (its client address) to ask
    /// instead.
    pub fn redirect(
        request_id: u64,
        code: ErrorCode,
        message: impl Into<String>,
        redirect: impl Into<String>,
    ) -> Self {
        let error = pb::Error { code: code as i32, message: message.into(), redirect: redirect.into() };
        Frame::new(request_id, Body::Error(error))
    }
}

impl Body {
    /// The message type's name, for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Hello(_) => "Hello",
            Body::HelloOk(_) => "HelloOk",
            Body::HelloRejected(_) => "HelloRejected",
            Body::Heartbeat(_) => "Heartbeat",
            Body::Close(_) => "Close",
            Body::Error(_) => "Error",
            Body::QueueDeclare(_) => "QueueDeclare",
            Body::QueueDeclareOk(_) => "QueueDeclareOk",
            Body::QueueDelete(_) => "QueueDelete",
            Body::QueueDeleteOk(_) => "QueueDeleteOk",
            Body::QueuePurge(_) => "QueuePurge",
            Body::QueuePurgeOk(_) => "QueuePurgeOk",
            Body::QueueStats(_) => "QueueStats",
            Body::QueueList(_) => "QueueList",
            Body::QueueListOk(_) => "QueueListOk",
            Body::QueueInfo(_) => "QueueInfo",
            Body::Publish(_) => "Publish",
            Body::PublishOk(_) => "PublishOk",
            Body::Consume(_) => "Consume",
            Body::ConsumeOk(_) => "ConsumeOk",
            Body::Cancel(_) => "Cancel",
            Body::CancelOk(_) => "CancelOk",
            Body::Deliver(_) => "Deliver",
            Body::Ack(_) => "Ack",
            Body::Nack(_) => "Nack",
            Body::Reject(_) => "Reject",
            Body::ConsumerCancelled(_) => "ConsumerCancelled",
            Body::SettleOk(_) => "SettleOk",
            Body::Extend(_) => "Extend",
            Body::DeliveryExpired(_) => "DeliveryExpired",
            Body::Get(_) => "Get",
            Body::GetOk(_) => "GetOk",
            Body::AuditQuery(_) => "AuditQuery",
            Body::AuditEvents(_) => "AuditEvents",
            Body::FlowControl(_) => "FlowControl",
            Body::BrokerStatus(_) => "BrokerStatus",
            Body::BrokerStatusOk(_) => "BrokerStatusOk",
            Body::MoveStart(_) => "MoveStart",
            Body::MoveInfo(_) => "MoveInfo",
            Body::MoveList(_) => "MoveList",
            Body::MoveListOk(_) => "MoveListOk",
            Body::MoveCancel(_) => "MoveCancel",
            Body::Peek(_) => "Peek",
            Body::PeekOk(_) => "PeekOk",
            Body::Subscribe(_) => "Subscribe",
            Body::SubscribeOk(_) => "SubscribeOk",
            Body::Event(_) => "Event",
            Body::QueueSetAlarm(_) => "QueueSetAlarm",
            Body::ExchangeDeclare(_) => "ExchangeDeclare",
            Body::ExchangeDeclareOk(_) => "ExchangeDeclareOk",
            Body::ExchangeDelete(_) => "ExchangeDelete",
            Body::ExchangeDeleteOk(_) => "ExchangeDeleteOk",
            Body::ExchangeList(_) => "ExchangeList",
            Body::ExchangeListOk(_) => "ExchangeListOk",
            Body::Bind(_) => "Bind",
            Body::BindOk(_) => "BindOk",
            Body::Unbind(_) => "Unbind",
            Body::UnbindOk(_) => "UnbindOk",
            Body::BindingList(_) => "BindingList",
            Body::BindingListOk(_) => "BindingListOk",
            Body::AuthChallenge(_) => "AuthChallenge",
            Body::AuthResponse(_) => "AuthResponse",
            Body::UserPut(_) => "UserPut",
            Body::UserDelete(_) => "UserDelete",
            Body::UserList(_) => "UserList",
            Body::UserListOk(_) => "UserListOk",
            Body::PermissionsSet(_) => "PermissionsSet",
            Body::WhoAmI(_) => "WhoAmI",
            Body::WhoAmIOk(_) => "WhoAmIOk",
            Body::AccessOk(_) => "AccessOk",
            Body::TokenCreate(_) => "TokenCreate",
            Body::TokenCreateOk(_) => "TokenCreateOk",
            Body::TokenList(_) => "TokenList",
            Body::TokenListOk(_) => "TokenListOk",
            Body::TokenDelete(_) => "TokenDelete",
            Body::ClusterStatus(_) => "ClusterStatus",
            Body::ClusterStatusOk(_) => "ClusterStatusOk",
            Body::ClusterAddNode(_) => "ClusterAddNode",
            Body::ClusterRemoveNode(_) => "ClusterRemoveNode",
        }
    }
}

/// Appends `frame`, length prefix included, to `dst`.
///
/// Fails with [`ProtoError::FrameTooLarge`] when the encoded frame exceeds `max_frame_size`;
/// nothing is written then.
pub fn encode_frame(frame: &Frame, max_frame_size: u32, dst: &mut BytesMut) -> Result<(), ProtoError> {
    let len = frame.encoded_len();
    if len > max_frame_size as usize {
        return Err(ProtoError::FrameTooLarge { len, max: max_frame_size });
    }
    dst.reserve(LENGTH_PREFIX + len);
    dst.put_u32(len as u32);
    frame.encode(dst).expect("reserved enough capacity for the frame");
    Ok(())
}

/// One unit read off the wire.
// Frames dominate; boxing them to shrink the rare variants would cost an allocation per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A well-formed frame.
    Frame(Frame),
    /// A frame longer than the max frame size. Its bytes are being skipped; the request id is
    /// the one it declared (0 if it could not be read).
    Oversize {
        /// Request id read from the frame's first bytes.
        request_id: u64,
        /// The length the frame declared.
        len: usize,
    },
    /// A frame whose length was fine but whose bytes are not a valid `Frame`. Framing is intact,
    /// so the next frame can still be read.
    Malformed {
        /// Request id read from the frame's first bytes (0 if it could not be read), so the
        /// error can answer the request instead of leaving it to time out.
        request_id: u64,
        /// Why the bytes did not decode.
        error: prost::DecodeError,
    },
}

/// One unit read off the wire by [`FrameDecoder::decode_raw`], its frame not decoded yet.
#[derive(Debug, Clone, PartialEq)]
pub enum RawInbound {
    /// The bytes of a frame within the max frame size (length prefix excluded); see
    /// [`decode_frame`].
    Frame(Bytes),
    /// A frame longer than the max frame size, as in [`Inbound::Oversize`].
    Oversize {
        /// Request id read from the frame's first bytes.
        request_id: u64,
        /// The length the frame declared.
        len: usize,
    },
}

impl RawInbound {
    /// The unit, its frame decoded.
    pub fn decode(self) -> Inbound {
        match self {
            RawInbound::Frame(frame) => decode_frame(frame),
            RawInbound::Oversize { request_id, len } => Inbound::Oversize { request_id, len },
        }
    }
}

/// Splits a byte stream into frames. Keeps the state needed to skip oversize frames.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_size: u32,
    /// Bytes of an oversize frame still to be discarded.
    skipping: usize,
}

impl FrameDecoder {
    /// A decoder that accepts frames up to `max_frame_size` bytes (length prefix excluded).
    pub fn new(max_frame_size: u32) -> Self {
        FrameDecoder { max_frame_size, skipping: 0 }
    }

    /// The max frame size currently enforced.
    pub fn max_frame_size(&self) -> u32 {
        self.max_frame_size
    }

    /// Changes the enforced max frame size (after the handshake negotiated one).
    pub fn set_max_frame_size(&mut self, max_frame_size: u32) {
        self.max_frame_size = max_frame_size;
    }

    /// Takes the next unit off the front of `src`, or `None` when more bytes are needed.
    pub fn decode(&mut self, src: &mut BytesMut) -> Option<Inbound> {
        self.decode_raw(src).map(RawInbound::decode)
    }

    /// Like [`decode`](Self::decode), but leaves the frame's bytes undecoded.
    pub fn decode_raw(&mut self, src: &mut BytesMut) -> Option<RawInbound> {
        if self.skipping > 0 {
            let n = self.skipping.min(src.len());
            src.advance(n);
            self.skipping -= n;
            if self.skipping > 0 {
                return None;
            }
        }
        if src.len() < LENGTH_PREFIX {
            src.reserve(LENGTH_PREFIX);
            return None;
        }
        let len = u32::from_be_bytes(src[..LENGTH_PREFIX].try_into().expect("4 bytes")) as usize;
        if len > self.max_frame_size as usize {
            let wanted = len.min(REQUEST_ID_PREFIX);
            if src.len() < LENGTH_PREFIX + wanted {
                return None;
            }
            let request_id = peek_request_id(&src[LENGTH_PREFIX..LENGTH_PREFIX + wanted]);
            src.advance(LENGTH_PREFIX);
            let n = len.min(src.len());
            src.advance(n);
            self.skipping = len - n;
            return Some(RawInbound::Oversize { request_id, len });
        }
        if src.len() < LENGTH_PREFIX + len {
            src.reserve(LENGTH_PREFIX + len - src.len());
            return None;
        }
        src.advance(LENGTH_PREFIX);
        Some(RawInbound::Frame(src.split_to(len).freeze()))
    }

    /// True while the decoder is in the middle of a frame (used to report a truncated frame
    /// when the peer hangs up).
    pub fn is_mid_frame(&self, src: &BytesMut) -> bool {
        self.skipping > 0 || !src.is_empty()
    }
}

/// Decodes the bytes of one frame (length prefix excluded), as
/// [`FrameDecoder::decode_raw`] yields them.
pub fn decode_frame(frame: Bytes) -> Inbound {
    // Decoding consumes the bytes, so the few that may hold the request id are copied aside
    // first: cheaper than keeping a second handle on the frame for the rare error.
    let mut head = [0u8; REQUEST_ID_PREFIX];
    let head_len = frame.len().min(REQUEST_ID_PREFIX);
    head[..head_len].copy_from_slice(&frame[..head_len]);
    match Frame::decode(frame) {
        Ok(frame) => Inbound::Frame(frame),
        Err(error) => Inbound::Malformed { request_id: peek_request_id(&head[..head_len]), error },
    }
}

/// Reads field 1 (`request_id`) from the first bytes of an encoded `Frame`, or 0.
fn peek_request_id(mut prefix: &[u8]) -> u64 {
    if prefix.first() != Some(&0x08) {
        return 0;
    }
    prefix.advance(1);
    prost::encoding::decode_varint(&mut prefix).unwrap_or(0)
}

/// The error code of a frame body, for logs and error mapping.
pub fn error_code(code: i32) -> ErrorCode {
    ErrorCode::try_from(code).unwrap_or(ErrorCode::Unspecified)
}

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;
