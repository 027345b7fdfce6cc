//! A protocol-level connection that sends exactly the bytes a test asks for, to check how the
//! broker treats broken, hostile or silent peers.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use hopper_proto::{pb, Body, Frame, FrameDecoder, Inbound};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a read waits for the broker before the test fails.
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// A raw TCP connection speaking Hopper frames (or anything else).
pub struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
    decoder: FrameDecoder,
    next_request_id: u64,
}

impl RawConn {
    /// Opens a TCP connection; no handshake is sent.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = tokio::time::timeout(READ_DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connect within the deadline")
            .expect("connect to the broker");
        RawConn::from_stream(stream)
    }

    /// Wraps an established stream, e.g. one accepted by a test playing the broker.
    pub fn from_stream(stream: TcpStream) -> RawConn {
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        RawConn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            // This side never refuses a frame: tests want to see whatever the peer sends.
            decoder: FrameDecoder::new(u32::MAX),
            next_request_id: 1,
        }
    }

    /// Opens a connection and completes the handshake with default values.
    pub async fn connect_hello(addr: SocketAddr) -> RawConn {
        let mut conn = RawConn::connect(addr).await;
        conn.hello(0, 0).await;
        conn
    }

    /// Sends `bytes` as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to the broker");
    }

    /// Sends one frame, however large (no max frame size is enforced on this side).
    pub async fn send(&mut self, frame: &Frame) {
        let mut buf = BytesMut::new();
        hopper_proto::encode_frame(frame, u32::MAX, &mut buf).expect("encode a frame");
        self.send_bytes(&buf).await;
    }

    /// Sends `body` with a fresh request id and returns that id.
    pub async fn request(&mut self, body: Body) -> u64 {
        let request_id = self.next_request_id();
        self.send(&Frame::new(request_id, body)).await;
        request_id
    }

    /// A request id not used before on this connection.
    pub fn next_request_id(&mut self) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    /// Sends a `Hello` and returns the broker's answer, whatever it is.
    pub async fn send_hello(&mut self, hello: pb::Hello) -> Frame {
        let request_id = self.request(Body::Hello(hello)).await;
        let frame = self.recv_skipping_heartbeats().await.expect("the broker answers the Hello");
        assert_eq!(frame.request_id, request_id, "the handshake answer echoes the request id: {frame:?}");
        frame
    }

    /// Completes the handshake asking for `heartbeat_ms` and `max_frame_size` (0 = broker's).
    pub async fn hello(&mut self, heartbeat_ms: u32, max_frame_size: u32) -> pb::HelloOk {
        let hello = pb::Hello {
            protocol_version: hopper_proto::PROTOCOL_VERSION,
            client_name: "raw test connection".into(),
            heartbeat_ms,
            max_frame_size,
            ..Default::default()
        };
        match self.send_hello(hello).await.body {
            Some(Body::HelloOk(ok)) => ok,
            other => panic!("expected HelloOk, got {other:?}"),
        }
    }

    /// Sends `body` as a request and returns the body of the broker's answer to it. Heartbeats
    /// are skipped; any other frame in between fails the test.
    pub async fn call(&mut self, body: Body) -> Body {
        let request_id = self.request(body).await;
        self.response(request_id).await
    }

    /// The body of the next frame, which must answer `request_id` (heartbeats are skipped).
    pub async fn response(&mut self, request_id: u64) -> Body {
        let frame = self.recv_skipping_heartbeats().await.expect("the broker answers before closing");
        assert_eq!(frame.request_id, request_id, "unexpected frame: {frame:?}");
        frame.body.expect("the answer has a body")
    }

    /// The `(code, message)` of the error frame answering `request_id`.
    pub async fn error_response(&mut self, request_id: u64) -> (pb::ErrorCode, String) {
        match self.response(request_id).await {
            Body::Error(error) => (hopper_proto::error_code(error.code), error.message),
            other => panic!("expected an Error for request {request_id}, got {other:?}"),
        }
    }

    /// The next frame, or `None` once the broker closed the connection. Fails the test if
    /// nothing arrives within a few seconds.
    pub async fn recv(&mut self) -> Option<Frame> {
        tokio::time::timeout(READ_DEADLINE, self.read_frame())
            .await
            .unwrap_or_else(|_| panic!("no frame and no EOF within {READ_DEADLINE:?}"))
    }

    /// The next frame that is not a heartbeat, or `None` at EOF.
    pub async fn recv_skipping_heartbeats(&mut self) -> Option<Frame> {
        loop {
            match self.recv().await {
                Some(Frame { body: Some(Body::Heartbeat(_)), .. }) => continue,
                other => return other,
            }
        }
    }

    /// Reads until the broker closes the connection, within `timeout`; returns the frames that
    /// arrived before (heartbeats included).
    pub async fn expect_eof_within(&mut self, timeout: Duration) -> Vec<Frame> {
        let mut frames = Vec::new();
        let read_all = async {
            while let Some(frame) = self.read_frame().await {
                frames.push(frame);
            }
        };
        if tokio::time::timeout(timeout, read_all).await.is_err() {
            panic!("the broker did not close the connection within {timeout:?}");
        }
        frames
    }

    /// Reads until the broker closes the connection; returns the frames that arrived before.
    pub async fn expect_eof(&mut self) -> Vec<Frame> {
        self.expect_eof_within(READ_DEADLINE).await
    }

    /// Closes the write side (TCP FIN) while still reading.
    pub async fn shutdown_write(&mut self) {
        self.stream.shutdown().await.expect("shut down the write side");
    }

    /// Next frame without a deadline; `None` at EOF or when the broker reset the connection.
    async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(inbound) = self.decoder.decode(&mut self.buf) {
                match inbound {
                    Inbound::Frame(frame) => return Some(frame),
                    other => panic!("the broker sent an undecodable frame: {other:?}"),
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => {
                    assert!(
                        !self.decoder.is_mid_frame(&self.buf),
                        "the broker closed the connection in the middle of a frame"
                    );
                    return None;
                }
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(err) => panic!("read from the broker: {err}"),
            }
        }
    }
}
