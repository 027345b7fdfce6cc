//! The scripted broker the client's tests talk to: it plays the broker's side of the protocol
//! frame by frame.
#![allow(dead_code)]

use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use hopper_client::{ConnectOptions, Connection, ConsumeOptions};
use hopper_proto::{encode_frame, pb, Body, Frame, FrameCodec, Inbound, PROTOCOL_VERSION};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpListener;
use tokio_util::codec::FramedRead;

pub const PATIENCE: Duration = Duration::from_secs(5);

/// The broker's end of one connection.
pub struct Peer {
    pub frames: FramedRead<OwnedReadHalf, FrameCodec>,
    pub write: OwnedWriteHalf,
}

impl Peer {
    pub async fn recv(&mut self) -> Frame {
        match tokio::time::timeout(PATIENCE, self.frames.next()).await {
            Ok(Some(Ok(Inbound::Frame(frame)))) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame that is not a heartbeat.
    pub async fn recv_request(&mut self) -> (u64, Body) {
        loop {
            let frame = self.recv().await;
            match frame.body {
                Some(Body::Heartbeat(_)) => continue,
                Some(body) => return (frame.request_id, body),
                None => panic!("frame without body"),
            }
        }
    }

    /// Waits for the client to hang up, skipping anything it still sends.
    pub async fn expect_eof(&mut self) {
        loop {
            match tokio::time::timeout(PATIENCE, self.frames.next()).await {
                Ok(None) => return,
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected end of stream, got {other:?}"),
            }
        }
    }

    pub async fn send(&mut self, request_id: u64, body: Body) {
        let mut buf = BytesMut::new();
        encode_frame(&Frame::new(request_id, body), u32::MAX, &mut buf).unwrap();
        self.write.write_all(&buf).await.unwrap();
    }
}

pub fn hello_ok(heartbeat_ms: u32, max_frame_size: u32) -> Body {
    Body::HelloOk(pb::HelloOk {
        protocol_version: PROTOCOL_VERSION,
        server_version: "fake-0.1".into(),
        heartbeat_ms,
        max_frame_size,
        ..Default::default()
    })
}

/// Connects a client to a fresh fake broker that answers the handshake with `answer`.
pub async fn connect_with(
    options: ConnectOptions,
    answer: Body,
) -> (hopper_client::Result<Connection>, Peer) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = async {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, write) = stream.into_split();
        let mut peer = Peer { frames: FramedRead::new(read, FrameCodec::new(u32::MAX)), write };
        let hello = peer.recv().await;
        assert!(matches!(hello.body, Some(Body::Hello(_))), "{hello:?}");
        peer.send(hello.request_id, answer).await;
        peer
    };
    tokio::join!(Connection::connect_with(addr, options), broker)
}

pub async fn connect() -> (Connection, Peer) {
    let options = ConnectOptions { heartbeat: Duration::ZERO, ..Default::default() };
    let (conn, peer) = connect_with(options, hello_ok(0, 1 << 20)).await;
    (conn.unwrap(), peer)
}

pub fn deliver(consumer_id: u64, delivery_tag: u64, body: &'static str) -> Body {
    Body::Deliver(pb::Deliver {
        consumer_id,
        delivery_tag,
        message: Some(pb::Message {
            message_id: 100 + delivery_tag,
            body: body.into(),
            delivery_count: 1,
            ..Default::default()
        }),
    })
}

/// Starts a consumer with id `consumer_id` on queue `q`.
pub async fn consume(conn: &Connection, peer: &mut Peer, consumer_id: u64) -> hopper_client::Consumer {
    let options = ConsumeOptions { prefetch: 10, tag: "t".into(), ..Default::default() };
    let (consumer, ()) = tokio::join!(conn.consume("q", options), async {
        let (id, body) = peer.recv_request().await;
        assert!(matches!(body, Body::Consume(ref c) if c.queue == "q" && c.prefetch_count == 10), "{body:?}");
        peer.send(id, Body::ConsumeOk(pb::ConsumeOk { consumer_id })).await;
    });
    consumer.unwrap()
}
