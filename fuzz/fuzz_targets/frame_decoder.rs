//! Arbitrary bytes through `FrameDecoder`, as a hostile peer would send them.
//!
//! The decoder must never panic, whatever the bytes and however the reads split them, and the
//! split must not matter: the units decoded from the whole input at once equal those decoded
//! from the same bytes fed in chunks, and both leave the same bytes behind. A small max frame
//! size makes the oversize path (skipping a frame across reads) as common as the normal one.
//! Every frame that decodes re-encodes to bytes that decode to the same frame.

#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use hopper_proto::{encode_frame, FrameDecoder, Inbound, DEFAULT_MAX_FRAME_SIZE};
use libfuzzer_sys::fuzz_target;

/// Max frame sizes to try: tiny ones hit the oversize path with almost any length prefix.
const MAX_FRAME_SIZES: [u32; 5] = [0, 1, 16, 300, DEFAULT_MAX_FRAME_SIZE];

#[derive(Debug, Arbitrary)]
struct Input {
    /// Index into [`MAX_FRAME_SIZES`].
    max_frame_size: u8,
    /// Sizes of the reads the bytes arrive in, used in turn; the last read takes the rest.
    chunks: Vec<u8>,
    /// What the peer sent.
    wire: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let max = MAX_FRAME_SIZES[usize::from(input.max_frame_size) % MAX_FRAME_SIZES.len()];

    let mut whole = Reader::new(max);
    whole.feed(&input.wire);

    let mut chunked = Reader::new(max);
    let mut rest = &input.wire[..];
    for &size in &input.chunks {
        let (chunk, tail) = rest.split_at(usize::from(size).min(rest.len()));
        chunked.feed(chunk);
        rest = tail;
    }
    chunked.feed(rest);

    assert_eq!(whole.out, chunked.out, "the split of the reads changed what was decoded");
    assert_eq!(whole.buf, chunked.buf, "the split of the reads changed what is left over");
    assert_eq!(whole.decoder.is_mid_frame(&whole.buf), chunked.decoder.is_mid_frame(&chunked.buf));

    for unit in &whole.out {
        if let Inbound::Frame(frame) = unit {
            let mut again = BytesMut::new();
            encode_frame(frame, u32::MAX, &mut again).expect("no limit to exceed");
            let mut decoder = FrameDecoder::new(u32::MAX);
            assert_eq!(decoder.decode(&mut again), Some(Inbound::Frame(frame.clone())));
            assert!(again.is_empty());
        }
    }
});

/// One side of a connection: its read buffer, its decoder and what came out so far.
struct Reader {
    decoder: FrameDecoder,
    buf: BytesMut,
    out: Vec<Inbound>,
}

impl Reader {
    fn new(max_frame_size: u32) -> Self {
        Reader { decoder: FrameDecoder::new(max_frame_size), buf: BytesMut::new(), out: Vec::new() }
    }

    /// Appends one read's bytes and takes every unit they complete, as a session does.
    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        while let Some(unit) = self.decoder.decode(&mut self.buf) {
            self.out.push(unit);
        }
    }
}
