//! An AMQP 0-9-1 connection that sends exactly the frames a test asks for (built and parsed
//! with the `amq-protocol` crate), over TCP or TLS: for what a full client such as lapin
//! cannot be made to do, a silent peer, a chosen login mechanism, a client certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame, WriteContext};
use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::FieldTable;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::pki::Pki;

/// How long a read waits for the broker before the test fails.
const READ_DEADLINE: Duration = Duration::from_secs(10);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A raw AMQP connection.
pub struct AmqpRaw {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
}

impl AmqpRaw {
    /// Opens a TCP connection; nothing is sent.
    pub async fn connect(addr: SocketAddr) -> AmqpRaw {
        let stream = TcpStream::connect(addr).await.expect("connect to the AMQP listener");
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        AmqpRaw { stream: Box::new(stream), buf: Vec::new() }
    }

    /// Opens a TLS connection trusting `pki`'s CA only, with the client certificate of `user`
    /// if one is given; nothing is sent.
    pub async fn connect_tls(addr: SocketAddr, pki: &Pki, user: Option<&str>) -> std::io::Result<AmqpRaw> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pki.ca_pem()) {
            roots.add(cert.expect("the CA file is PEM")).expect("a CA certificate");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("rustls' default protocol versions")
            .with_root_certificates(roots);
        let config = match user {
            Some(user) => {
                let client = pki.client(user);
                let chain =
                    CertificateDer::pem_slice_iter(&client.cert_pem).map(|c| c.expect("PEM")).collect();
                let key = PrivateKeyDer::from_pem_slice(&client.key_pem).expect("a PEM key");
                builder.with_client_auth_cert(chain, key).expect("a client certificate")
            }
            None => builder.with_no_client_auth(),
        };
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("a DNS name");
        let stream = TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
        Ok(AmqpRaw { stream: Box::new(stream), buf: Vec::new() })
    }

    /// Sends `bytes` as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: AMQPFrame) -> std::io::Result<()> {
        let bytes = gen_frame(&frame)(WriteContext::from(Vec::new())).expect("encode a frame").write;
        self.send_bytes(&bytes).await
    }

    /// Sends a method on `channel`.
    pub async fn method(&mut self, channel: u16, method: AMQPClass) -> std::io::Result<()> {
        self.send(AMQPFrame::Method(channel, method)).await
    }

    /// The next frame, or `None` once the broker closed the connection. Fails the test if
    /// nothing comes within the read deadline.
    pub async fn next(&mut self) -> Option<AMQPFrame> {
        self.next_within(READ_DEADLINE).await.expect("a frame or the close within the deadline")
    }

    /// The next frame within `deadline`: `Err` if none came by then, `Ok(None)` at the close.
    pub async fn next_within(&mut self, deadline: Duration) -> Result<Option<AMQPFrame>, ()> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Ok((rest, frame)) = parse_frame(self.buf.as_slice()) {
                let used = self.buf.len() - rest.len();
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(until, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(()),
                Ok(Ok(0) | Err(_)) => return Ok(None),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next frame that is not a heartbeat.
    pub async fn next_method(&mut self) -> Option<AMQPFrame> {
        loop {
            match self.next().await {
                Some(AMQPFrame::Heartbeat) => continue,
                other => return other,
            }
        }
    }

    /// Runs the handshake up to `connection.open-ok`, logging in with `mechanism` and
    /// `response` and asking for `heartbeat` seconds; returns the broker's `connection.start`
    /// and the frame that ended the handshake (`open-ok`, or the `close` that refused it).
    pub async fn handshake(
        &mut self,
        mechanism: &str,
        response: &[u8],
        heartbeat: u16,
    ) -> (connection::Start, Option<AMQPFrame>) {
        self.send_bytes(b"AMQP\x00\x00\x09\x01").await.expect("send the protocol header");
        let Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(start)))) =
            self.next().await
        else {
            panic!("the broker did not start the handshake");
        };
        let start_ok = connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: mechanism.into(),
            response: response.to_vec().into(),
            locale: "en_US".into(),
        };
        self.method(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok))).await.unwrap();
        let tune = match self.next().await {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune)))) => tune,
            other => return (start, other),
        };
        let tune_ok =
            connection::TuneOk { channel_max: tune.channel_max, frame_max: tune.frame_max, heartbeat };
        self.method(0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok))).await.unwrap();
        let open = connection::Open { virtual_host: "/".into() };
        self.method(0, AMQPClass::Connection(connection::AMQPMethod::Open(open))).await.unwrap();
        let ended = self.next_method().await;
        (start, ended)
    }
}

/// True if `frame` is `connection.open-ok`.
pub fn is_open_ok(frame: &Option<AMQPFrame>) -> bool {
    matches!(frame, Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)))))
}

/// The reply code and text of a `connection.close`, if `frame` is one.
pub fn connection_close(frame: &Option<AMQPFrame>) -> Option<(u16, String)> {
    match frame {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(close)))) => {
            Some((close.reply_code, close.reply_text.as_str().to_owned()))
        }
        _ => None,
    }
}
