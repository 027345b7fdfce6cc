//! Adapter from [`FrameDecoder`] and [`encode_frame`] to tokio-util's codec traits, so a
//! `FramedRead` can drive the decoder. The traits operate on buffers only.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::{encode_frame, Frame, FrameDecoder, Inbound, ProtoError, RawInbound};

/// tokio-util codec for Hopper frames.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    decoder: FrameDecoder,
}

impl FrameCodec {
    /// A codec enforcing `max_frame_size` on both directions.
    pub fn new(max_frame_size: u32) -> Self {
        FrameCodec { decoder: FrameDecoder::new(max_frame_size) }
    }

    /// Changes the enforced max frame size.
    pub fn set_max_frame_size(&mut self, max_frame_size: u32) {
        self.decoder.set_max_frame_size(max_frame_size);
    }
}

impl Decoder for FrameCodec {
    type Item = Inbound;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, ProtoError> {
        Ok(self.decoder.decode(src))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, ProtoError> {
        let item = self.decoder.decode(src);
        at_eof(&self.decoder, src, item)
    }
}

/// What a decoder yields once the peer hung up: `item`, or an error if the stream ended in
/// the middle of a frame.
fn at_eof<T>(decoder: &FrameDecoder, src: &BytesMut, item: Option<T>) -> Result<Option<T>, ProtoError> {
    match item {
        Some(item) => Ok(Some(item)),
        None if decoder.is_mid_frame(src) => Err(ProtoError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a frame",
        ))),
        None => Ok(None),
    }
}

/// Like [`FrameCodec`], but yields frames undecoded ([`FrameDecoder::decode_raw`]), for a
/// receiver that decodes some kinds of frame its own way, or decodes where it handles a frame:
/// a decoded [`Frame`] is a few hundred bytes, copied again at every layer of a stream it is
/// passed up through, while the bytes of a frame are a small handle.
#[derive(Debug, Clone)]
pub struct RawFrameCodec {
    decoder: FrameDecoder,
}

impl RawFrameCodec {
    /// A codec enforcing `max_frame_size` on both directions.
    pub fn new(max_frame_size: u32) -> Self {
        RawFrameCodec { decoder: FrameDecoder::new(max_frame_size) }
    }

    /// Changes the enforced max frame size.
    pub fn set_max_frame_size(&mut self, max_frame_size: u32) {
        self.decoder.set_max_frame_size(max_frame_size);
    }
}

impl From<FrameCodec> for RawFrameCodec {
    /// The same decoder, max frame size and any frame being skipped included.
    fn from(codec: FrameCodec) -> Self {
        RawFrameCodec { decoder: codec.decoder }
    }
}

impl Decoder for RawFrameCodec {
    type Item = RawInbound;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RawInbound>, ProtoError> {
        Ok(self.decoder.decode_raw(src))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<RawInbound>, ProtoError> {
        let item = self.decoder.decode_raw(src);
        at_eof(&self.decoder, src, item)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        encode_frame(frame, self.decoder.max_frame_size(), dst)
    }
}
