//! AMQP 0-9-1 frames on the wire, parsed and written with the `amq-protocol` crate: this
//! module only finds where a frame ends (so that a frame over the negotiated size is refused
//! before it is buffered) and hands whole frames to the crate.

use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame, WriteContext};
use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

use crate::outbox::Outbox;

/// The protocol header a client opens with.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Bytes of a frame's type, channel and size, before its payload.
const FRAME_HEADER: usize = 7;

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
    /// Boxed: a frame is some 300 bytes, moved on through the reader's layers otherwise.
    type Item = Box<AMQPFrame>;
    type Error = FrameError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Box<AMQPFrame>>, FrameError> {
        let Some(&kind) = buf.first() else { return Ok(None) };
        let len = if kind == b'A' {
            PROTOCOL_HEADER.len()
        } else {
            if buf.len() < FRAME_HEADER {
                return Ok(None);
            }
            let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
            let len = FRAME_HEADER + size + 1;
            if len > self.max {
                return Err(FrameError::TooLarge { size: len, max: self.max });
            }
            len
        };
        if buf.len() < len {
            buf.reserve(len - buf.len());
            return Ok(None);
        }
        let frame = match parse_frame(&buf[..len]) {
            Ok((_, frame)) => frame,
            Err(err) => return Err(FrameError::Malformed(format!("{err:?}"))),
        };
        buf.advance(len);
        Ok(Some(Box::new(frame)))
    }
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
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Box::new(frame)));
        assert!(buf.is_empty());
    }

    #[test]
    fn the_protocol_header_is_a_frame_of_its_own() {
        let mut buf = BytesMut::from(&PROTOCOL_HEADER[..]);
        let frame = FrameCodec::new(4096).decode(&mut buf).unwrap();
        assert!(matches!(frame.as_deref(), Some(AMQPFrame::ProtocolHeader(_))), "{frame:?}");
    }

    #[test]
    fn oversize_and_garbage_frames_are_errors_not_panics() {
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0, 1, 0, 0][..]);
        assert!(matches!(FrameCodec::new(4096).decode(&mut buf), Err(FrameError::TooLarge { .. })));
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 2, 9, 9, 0xCE][..]);
        assert!(matches!(FrameCodec::new(4096).decode(&mut buf), Err(FrameError::Malformed(_))));
    }
}
