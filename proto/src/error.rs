//! Errors of the codec itself (not the protocol's error frames).

/// What can go wrong while encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A frame is larger than the max frame size in force.
    #[error("frame of {len} bytes exceeds the max frame size of {max} bytes")]
    FrameTooLarge {
        /// Encoded length of the frame.
        len: usize,
        /// The limit in force.
        max: u32,
    },
    /// The transport underneath failed (only produced by the tokio codec adapter).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
