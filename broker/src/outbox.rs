//! A connection's outgoing bytes: frames are encoded straight into a shared buffer by whoever
//! produces them (the session for responses, queues for deliveries), and one writer task sends
//! whatever has accumulated with a single write.
//!
//! Encoding at the producer and writing in batches means a burst of deliveries costs one
//! syscall, and no channel node is allocated per frame. The buffer is bounded by
//! [`Outbox::HIGH_WATER`]: queues stop dispatching to a connection above it, and the session
//! stops reading requests until the writer has drained it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use hopper_proto::{encode_frame, Frame};
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// Outgoing buffer of one connection.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    /// Wakes the writer when the buffer goes from empty to non-empty, or on close.
    wake_writer: Notify,
    /// Wakes producers waiting for room after the writer drained the buffer.
    drained: Notify,
    /// Set when a queue skipped this connection for lack of room; the session then asks its
    /// queues to dispatch again once the writer has drained.
    stalled: AtomicBool,
    connection_id: u64,
}

#[derive(Debug)]
struct Inner {
    buf: BytesMut,
    max_frame_size: u32,
    closed: bool,
}

impl Outbox {
    /// Bytes buffered above which deliveries pause and requests are not read.
    pub const HIGH_WATER: usize = 1024 * 1024;

    /// An empty outbox of connection `connection_id`, enforcing `max_frame_size` on what it
    /// encodes.
    pub fn new(max_frame_size: u32, connection_id: u64) -> Self {
        Outbox {
            inner: Mutex::new(Inner {
                buf: BytesMut::with_capacity(64 * 1024),
                max_frame_size,
                closed: false,
            }),
            wake_writer: Notify::new(),
            drained: Notify::new(),
            stalled: AtomicBool::new(false),
            connection_id,
        }
    }

    /// The largest frame this connection takes.
    pub fn max_frame_size(&self) -> u32 {
        self.inner.lock().max_frame_size
    }

    /// Changes the max frame size (after the handshake).
    pub fn set_max_frame_size(&self, max_frame_size: u32) {
        self.inner.lock().max_frame_size = max_frame_size;
    }

    /// Queues a frame. A frame over the max frame size is replaced by an error frame for the
    /// same request, so the peer learns why instead of waiting.
    pub fn push(&self, frame: &Frame) {
        let mut inner = self.inner.lock();
        if inner.closed {
            return;
        }
        let was_empty = inner.buf.is_empty();
        let max = inner.max_frame_size;
        if let Err(err) = encode_frame(frame, max, &mut inner.buf) {
            let error =
                Frame::error(frame.request_id, hopper_proto::ErrorCode::FrameTooLarge, err.to_string());
            encode_frame(&error, max, &mut inner.buf).expect("an error frame fits any frame size");
        }
        if was_empty {
            self.wake_writer.notify_one();
        }
    }

    /// Queues bytes another protocol's codec encoded (the AMQP listener's frames), whole.
    pub fn push_bytes(&self, bytes: &[u8]) {
        let mut inner = self.inner.lock();
        if inner.closed {
            return;
        }
        let was_empty = inner.buf.is_empty();
        inner.buf.extend_from_slice(bytes);
        if was_empty {
            self.wake_writer.notify_one();
        }
    }

    /// Queues a frame of `len` bytes that `encode` writes (without the length prefix), if it
    /// fits the max frame size; otherwise leaves the outbox as it was and returns the size and
    /// the limit.
    pub fn push_encoded_if_fits(
        &self,
        len: usize,
        encode: impl FnOnce(&mut BytesMut),
    ) -> Result<(), (usize, usize)> {
        let mut inner = self.inner.lock();
        if inner.closed {
            return Ok(());
        }
        let max = inner.max_frame_size as usize;
        if len > max {
            return Err((len, max));
        }
        let was_empty = inner.buf.is_empty();
        inner.buf.reserve(hopper_proto::LENGTH_PREFIX + len);
        inner.buf.put_u32(len as u32);
        let start = inner.buf.len();
        encode(&mut inner.buf);
        debug_assert_eq!(inner.buf.len() - start, len, "the frame's length was computed wrong");
        if was_empty {
            self.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Marks the outbox closed: nothing more is queued, and the writer stops once it has sent
    /// what is already buffered.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.wake_writer.notify_one();
        self.drained.notify_waiters();
    }

    /// True once the outbox is closed (by the session, or by the writer after a failed write).
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// True when the buffer is below the high-water mark.
    pub fn has_room(&self) -> bool {
        self.inner.lock().buf.len() < Self::HIGH_WATER
    }

    /// Waits until the buffer is below the high-water mark (or the outbox is closed).
    pub async fn wait_for_room(&self) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let inner = self.inner.lock();
                if inner.closed || inner.buf.len() < Self::HIGH_WATER {
                    return;
                }
            }
            drained.await;
        }
    }

    /// The connection this outbox belongs to.
    pub fn connection_id(&self) -> u64 {
        self.connection_id
    }

    /// True when a queue may push deliveries; otherwise marks the outbox stalled, so the
    /// session redispatches once the writer has drained it.
    pub fn accepts_deliveries(&self) -> bool {
        if self.has_room() {
            return true;
        }
        self.stalled.store(true, Ordering::Release);
        false
    }

    /// Takes the stalled flag: true if a queue skipped this connection since the last call.
    pub fn take_stalled(&self) -> bool {
        self.stalled.swap(false, Ordering::AcqRel)
    }

    /// Sends buffered bytes until the outbox is closed and empty, or the socket fails, or a
    /// write makes no progress for `write_timeout` (the peer stopped reading); the outbox is
    /// closed then. `wake` is called after each write while some queue was holding deliveries
    /// back, and when the writer gives up.
    pub async fn run_writer<W: AsyncWrite + Unpin>(
        &self,
        mut socket: W,
        write_timeout: Duration,
        wake: impl Fn(),
    ) -> std::io::Result<()> {
        let mut spare = BytesMut::with_capacity(64 * 1024);
        loop {
            let chunk = {
                let mut inner = self.inner.lock();
                if inner.buf.is_empty() {
                    if inner.closed {
                        break;
                    }
                    None
                } else {
                    Some(std::mem::replace(&mut inner.buf, std::mem::take(&mut spare)))
                }
            };
            let Some(mut chunk) = chunk else {
                self.wake_writer.notified().await;
                continue;
            };
            if let Err(err) = write_with_deadline(&mut socket, &chunk, write_timeout).await {
                self.close();
                wake();
                return Err(err);
            }
            chunk.clear();
            spare = chunk;
            self.drained.notify_waiters();
            if self.stalled.load(Ordering::Acquire) {
                wake();
            }
        }
        socket.flush().await?;
        socket.shutdown().await
    }
}

/// Writes all of `bytes`, failing with `TimedOut` if any single write makes no progress for
/// `deadline`: a slow reader that keeps reading is never cut off, one that stopped is.
async fn write_with_deadline<W: AsyncWrite + Unpin>(
    socket: &mut W,
    mut bytes: &[u8],
    deadline: Duration,
) -> std::io::Result<()> {
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer read nothing for {} ms", deadline.as_millis()),
        )
    };
    while !bytes.is_empty() {
        match tokio::time::timeout(deadline, socket.write(bytes)).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(written)) => bytes = &bytes[written..],
            Ok(Err(err)) => return Err(err),
            Err(_) => return Err(timed_out()),
        }
    }
    // A TLS stream takes bytes into its own buffer and may keep the last records there while
    // the socket is full; flushed, the whole batch is on the socket before the writer sleeps.
    // For plain TCP this returns at once.
    tokio::time::timeout(deadline, socket.flush()).await.map_err(|_| timed_out())?
}
