//! AMQP 0-9-1 frames on the wire, parsed and written with the `amq-protocol` crate: this
//! module only finds where a frame ends (so that a frame over the negotiated size is refused
//! before it is buffered) and which frame it is, and hands its bytes to the crate.
//!
//! Most of a busy connection's frames are publishes (three frames each: `basic.publish`, the
//! content header, the body) and acks. Those are handed to the crate's parser of that very
//! method or header, skipping its general frame parser, which builds every frame as a large
//! enum moved through several layers and costs three to four times as much; a body is taken
//! as a slice of the read buffer, without a copy. Every other frame goes through the general
//! parser.
//!
//! ```text
//! frame:   type (1) | channel (2) | size (4) | payload (size) | 0xCE
//! method:  payload = class id (2) | method id (2) | arguments
//! header:  payload = class id (2) | weight (2) | body size (8) | property flags | properties
//! body:    payload = body bytes
//! ```

use std::io::Write;

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::constants::{FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD};
use amq_protocol::protocol::{basic, AMQPClass};
use amq_protocol::types::generation::{gen_id, gen_long_uint, gen_short_short_uint, GenError, GenResult};
use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::outbox::Outbox;

/// The protocol header a client opens with.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Bytes of a frame's type, channel and size, before its payload.
const FRAME_HEADER_LEN: usize = 7;

/// Class `basic` (also that of every content header), and the methods of it parsed on their
/// own.
pub const BASIC: u16 = 60;
const BASIC_PUBLISH: u16 = 40;
const BASIC_ACK: u16 = 80;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not an AMQP 0-9-1 frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame is larger than the negotiated frame size.
    #[error("a frame of {size} bytes is over the frame size of {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// A frame read: the frequent ones in shapes of their own, any other whole.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// `basic.publish` on a channel.
    Publish(u16, basic::Publish),
    /// A content header.
    Header(u16, Box<AMQPContentHeader>),
    /// A content body frame.
    Body(u16, Bytes),
    /// `basic.ack` on a channel.
    Ack(u16, basic::Ack),
    /// Any other frame. Boxed: a frame is some 300 bytes, moved on through the reader's
    /// layers otherwise.
    Frame(Box<AMQPFrame>),
}

impl Inbound {
    /// The frame as the crate's general parser gives it.
    pub fn into_frame(self) -> AMQPFrame {
        let basic = |channel, method| AMQPFrame::Method(channel, AMQPClass::Basic(method));
        match self {
            Inbound::Publish(channel, publish) => basic(channel, basic::AMQPMethod::Publish(publish)),
            Inbound::Header(channel, header) => AMQPFrame::Header(channel, *header),
            Inbound::Body(channel, bytes) => AMQPFrame::Body(channel, bytes.to_vec()),
            Inbound::Ack(channel, ack) => basic(channel, basic::AMQPMethod::Ack(ack)),
            Inbound::Frame(frame) => *frame,
        }
    }
}

/// Splits the byte stream into frames of at most `max` bytes.
#[derive(Debug)]
pub struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    /// A codec taking frames of at most `max` bytes, header and end marker included.
    pub fn new(max: usize) -> Self {
        FrameCodec { max }
    }

    /// Changes the largest frame taken (after the tune).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }
}

impl Decoder for FrameCodec {
    type Item = Inbound;
    type Error = FrameError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, FrameError> {
        let Some(&kind) = buf.first() else { return Ok(None) };
        if kind == b'A' {
            if buf.len() < PROTOCOL_HEADER.len() {
                return Ok(None);
            }
            let frame = general(&buf[..PROTOCOL_HEADER.len()])?;
            buf.advance(PROTOCOL_HEADER.len());
            return Ok(Some(frame));
        }
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        let len = FRAME_HEADER_LEN + size + 1;
        if len > self.max {
            return Err(FrameError::TooLarge { size: len, max: self.max });
        }
        if buf.len() < len {
            buf.reserve(len - buf.len());
            return Ok(None);
        }
        let channel = u16::from_be_bytes([buf[1], buf[2]]);
        let payload = &buf[FRAME_HEADER_LEN..len - 1];
        let well_ended = buf[len - 1] == FRAME_END;
        let frame = match kind {
            FRAME_BODY if well_ended => {
                let frame = buf.split_to(len).freeze();
                return Ok(Some(Inbound::Body(channel, frame.slice(FRAME_HEADER_LEN..len - 1))));
            }
            FRAME_HEADER if well_ended => {
                Inbound::Header(channel, Box::new(whole(parse_content_header(payload))?))
            }
            FRAME_METHOD if well_ended && payload.len() >= 4 => {
                let class = u16::from_be_bytes([payload[0], payload[1]]);
                let method = u16::from_be_bytes([payload[2], payload[3]]);
                let arguments = &payload[4..];
                match (class, method) {
                    (BASIC, BASIC_PUBLISH) => {
                        Inbound::Publish(channel, whole(basic::parse_publish(arguments))?)
                    }
                    (BASIC, BASIC_ACK) => Inbound::Ack(channel, whole(basic::parse_ack(arguments))?),
                    _ => general(&buf[..len])?,
                }
            }
            _ => general(&buf[..len])?,
        };
        buf.advance(len);
        Ok(Some(frame))
    }
}

/// What one of the crate's parsers read, if it read all of the bytes it was given.
fn whole<T, E: std::fmt::Debug>(parsed: Result<(&[u8], T), E>) -> Result<T, FrameError> {
    match parsed {
        Ok(([], value)) => Ok(value),
        Ok((rest, _)) => {
            Err(FrameError::Malformed(format!("{} bytes past the end of the fields", rest.len())))
        }
        Err(err) => Err(FrameError::Malformed(format!("{err:?}"))),
    }
}

/// `frame`, exactly one, read by the crate's general parser.
fn general(frame: &[u8]) -> Result<Inbound, FrameError> {
    whole(parse_frame(frame)).map(|frame| Inbound::Frame(Box::new(frame)))
}

/// The bytes of `frame`.
pub fn encode(frame: &AMQPFrame) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64);
    encode_into(&mut bytes, frame);
    bytes
}

thread_local! {
    /// Where frames are encoded before they go into an outbox: one buffer per thread, reused,
    /// so a frame costs no allocation.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Encodes frames with `write` into this thread's scratch buffer and queues them in `outbox`.
pub fn push_with(outbox: &Outbox, write: impl FnOnce(&mut Vec<u8>)) {
    SCRATCH.with_borrow_mut(|bytes| {
        bytes.clear();
        write(bytes);
        outbox.push_bytes(bytes);
    });
}

/// Queues `frame` in `outbox`.
pub fn push_frame(outbox: &Outbox, frame: &AMQPFrame) {
    push_with(outbox, |bytes| encode_into(bytes, frame));
}

/// Appends a content body frame of `part` on `channel` to `bytes`, as the crate writes one
/// (with its writers of each field), from the bytes where they are: the crate's frame type
/// would own a copy of them.
pub fn encode_body_into(bytes: &mut Vec<u8>, channel: u16, part: &[u8]) {
    match body_frame(WriteContext::from(std::mem::take(bytes)), channel, part) {
        Ok(context) => *bytes = context.write,
        Err(err) => unreachable!("writing a body frame to memory failed: {err:?}"),
    }
}

fn body_frame(context: WriteContext<Vec<u8>>, channel: u16, part: &[u8]) -> GenResult<Vec<u8>> {
    let size = u32::try_from(part.len()).map_err(|_| GenError::CustomError(0))?;
    let mut context = gen_long_uint(size)(gen_id(channel)(gen_short_short_uint(FRAME_BODY)(context)?)?)?;
    context.write_all(part)?;
    gen_short_short_uint(FRAME_END)(context)
}

/// Appends the bytes of `frame` to `bytes`.
pub fn encode_into(bytes: &mut Vec<u8>, frame: &AMQPFrame) {
    match gen_frame(frame)(WriteContext::from(std::mem::take(bytes))) {
        Ok(context) => *bytes = context.write,
        // Only a frame the crate cannot express fails, and the broker builds each one itself.
        Err(err) => unreachable!("an AMQP frame the broker built failed to encode: {err:?}"),
    }
}

#[cfg(test)]
mod tests {
    use amq_protocol::protocol::{basic, AMQPClass};

    use super::*;

    #[test]
    fn frames_round_trip_and_split_reads_wait_for_the_rest() {
        let frame = AMQPFrame::Method(
            3,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 42, multiple: true })),
        );
        let bytes = encode(&frame);
        let mut codec = FrameCodec::new(4096);
        let mut buf = BytesMut::from(&bytes[..5]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&bytes[5..]);
        assert_eq!(codec.decode(&mut buf).unwrap().map(Inbound::into_frame), Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_body_frame_written_in_place_is_the_one_the_crate_writes_and_reads_back() {
        let body = b"hello, hopper".to_vec();
        let mut bytes = b"before".to_vec();
        encode_body_into(&mut bytes, 7, &body);
        let mut expected = b"before".to_vec();
        encode_into(&mut expected, &AMQPFrame::Body(7, body.clone()));
        assert_eq!(bytes, expected);
        let mut buf = BytesMut::from(&bytes[6..]);
        assert_eq!(
            FrameCodec::new(4096).decode(&mut buf).unwrap(),
            Some(Inbound::Body(7, Bytes::from(body)))
        );
    }

    #[test]
    fn publishes_and_acks_read_alone_are_the_frames_the_general_parser_reads() {
        let publish = basic::Publish {
            exchange: "orders".into(),
            routing_key: "eu.paid".into(),
            mandatory: true,
            immediate: false,
        };
        let properties = amq_protocol::protocol::basic::AMQPProperties::default().with_delivery_mode(2);
        let frames = [
            AMQPFrame::Method(3, AMQPClass::Basic(basic::AMQPMethod::Publish(publish))),
            AMQPFrame::Header(3, AMQPContentHeader { class_id: 60, body_size: 5, properties }),
            AMQPFrame::Method(
                3,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 9, multiple: true })),
            ),
        ];
        let mut buf = BytesMut::new();
        for frame in &frames {
            buf.extend_from_slice(&encode(frame));
        }
        let mut codec = FrameCodec::new(4096);
        let read: Vec<Inbound> = std::iter::from_fn(|| codec.decode(&mut buf).unwrap()).collect();
        assert!(
            matches!(read[..], [Inbound::Publish(..), Inbound::Header(..), Inbound::Ack(..)]),
            "{read:?}"
        );
        let read: Vec<AMQPFrame> = read.into_iter().map(Inbound::into_frame).collect();
        assert_eq!(read, frames);
    }

    #[test]
    fn a_method_with_bytes_past_its_fields_or_a_frame_with_a_bad_end_is_malformed() {
        let ack = encode(&AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 1, multiple: false })),
        ));
        // One more byte inside the frame: its size says so, the ack's fields end before it.
        let mut longer = ack[..ack.len() - 1].to_vec();
        longer.push(0);
        longer.push(FRAME_END);
        let size = u32::from_be_bytes([longer[3], longer[4], longer[5], longer[6]]) + 1;
        longer[3..7].copy_from_slice(&size.to_be_bytes());
        let mut buf = BytesMut::from(&longer[..]);
        assert!(matches!(FrameCodec::new(4096).decode(&mut buf), Err(FrameError::Malformed(_))));
        let mut bad_end = ack.clone();
        *bad_end.last_mut().unwrap() = 0;
        let mut buf = BytesMut::from(&bad_end[..]);
        assert!(matches!(FrameCodec::new(4096).decode(&mut buf), Err(FrameError::Malformed(_))));
        let body = encode(&AMQPFrame::Body(1, vec![1, 2, 3]));
        let mut bad_end = body.clone();
        *bad_end.last_mut().unwrap() = 0;
        let mut buf = BytesMut::from(&bad_end[..]);
        assert!(matches!(FrameCodec::new(4096).decode(&mut buf), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn the_protocol_header_is_a_frame_of_its_own() {
        let mut buf = BytesMut::from(&PROTOCOL_HEADER[..]);
        let frame = FrameCodec::new(4096).decode(&mut buf).unwrap().map(Inbound::into_frame);
        assert!(matches!(frame, Some(AMQPFrame::ProtocolHeader(_))), "{frame:?}");
    }

    #[test]
    fn oversize_and_garbage_frames_are_errors_not_panics() {
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0, 1, 0, 0][..]);
        assert!(matches!(FrameCodec::new(4096).decode(&mut buf), Err(FrameError::TooLarge { .. })));
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 2, 9, 9, 0xCE][..]);
        assert!(matches!(FrameCodec::new(4096).decode(&mut buf), Err(FrameError::Malformed(_))));
    }
}
