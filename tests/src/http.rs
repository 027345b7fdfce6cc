//! A small HTTP/1.1 client for the broker's HTTP listener (metrics, JSON API, dashboard), over
//! TCP or, for `--http-tls`, TLS, and the two halves of HTTP/1.1 a test server needs (read a
//! request, write a response).
//!
//! Plain HTTP/1.1, one request per connection: the tests need nothing more, and it keeps an
//! HTTP client library out of the workspace.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::broker::Broker;
use crate::wait::within;

/// Largest request head a test server accepts, so a confused peer cannot make it buffer forever.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The header the broker requires on a state-changing request without a body (a `DELETE`, a
/// bodiless `POST`): web pages of other sites cannot send it (docs/http-api.md).
pub const REQUEST_HEADER: (&str, &str) = ("X-Hopper-Request", "1");

/// A client of one broker's HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct Http {
    addr: SocketAddr,
}

/// A response as the client received it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lowercase) and values, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, decoded from chunked transfer encoding if it was, as text.
    pub body: String,
}

impl Http {
    /// A client of the HTTP listener of `broker`.
    pub fn of(broker: &Broker) -> Http {
        Http::new(broker.http_addr())
    }

    /// A client of the HTTP server at `addr`.
    pub fn new(addr: SocketAddr) -> Http {
        Http { addr }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `method path` as a program using the API does, and returns the response; fails the
    /// test if that takes longer than the deadline. It sends `Host` (the listener's address),
    /// the body with its content type when there is one (`""` for none), and on a
    /// state-changing request without a body [`REQUEST_HEADER`], as the broker requires.
    pub async fn request(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> HttpResponse {
        let host = self.addr.to_string();
        let mut headers = vec![("Host", host.as_str())];
        match body {
            Some((content_type, _)) if !content_type.is_empty() => {
                headers.push(("Content-Type", content_type))
            }
            Some(_) => {}
            None if !matches!(method, "GET" | "HEAD" | "OPTIONS") => headers.push(REQUEST_HEADER),
            None => {}
        }
        self.request_with(method, path, &headers, body.map(|(_, bytes)| bytes)).await
    }

    /// Sends `method path` with exactly `headers` (no `Host` unless given: see [`Http::host`])
    /// and `Content-Length` when there is a body, and returns the response; fails the test if
    /// that takes longer than the deadline. For the tests of what the broker refuses.
    pub async fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        let what = format!("{method} {path}");
        within(&what, self.exchange(method, path, headers, body))
            .await
            .unwrap_or_else(|err| panic!("{what} on {}: {err}", self.addr))
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<HttpResponse> {
        let stream = TcpStream::connect(self.addr).await?;
        exchange(stream, method, path, headers, body).await
    }

    /// The `Host` header a request to this listener carries: its address.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, None).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> HttpResponse {
        self.request("DELETE", path, None).await
    }

    /// `PUT path` with `body` as JSON.
    pub async fn put_json(&self, path: &str, body: &Value) -> HttpResponse {
        self.request("PUT", path, Some(("application/json", body.to_string().as_bytes()))).await
    }

    /// `POST path` with `body` as JSON.
    pub async fn post_json(&self, path: &str, body: &Value) -> HttpResponse {
        self.request("POST", path, Some(("application/json", body.to_string().as_bytes()))).await
    }

    /// `GET path`, which must answer 200 with JSON; returns the document.
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).await.assert_status(200).json()
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.assert_status(200).body.clone()
    }

    /// Declares `queue` with `settings` (a JSON object of the PUT body), which must succeed
    /// with 201 or 200; returns the queue's JSON.
    pub async fn declare(&self, queue: &str, settings: Value) -> Value {
        let response = self.put_json(&format!("/api/queues/{}", segment(queue)), &settings).await;
        assert!(matches!(response.status, 200 | 201), "declare {queue}:\n{response}");
        response.json()
    }

    /// Publishes a text `body` to `queue`, which must answer 201; returns the message id.
    pub async fn publish(&self, queue: &str, body: &str) -> u64 {
        let request = serde_json::json!({ "body": body });
        let response = self.post_json(&format!("/api/queues/{}/messages", segment(queue)), &request).await;
        json_id(&response.assert_status(201).json()["message_id"])
            .unwrap_or_else(|| panic!("no message_id in {response}"))
    }

    /// Pulls up to `count` messages of `queue` (`query` is appended as further query
    /// parameters, e.g. `&visibility=1`); returns the messages.
    pub async fn pull(&self, queue: &str, count: u32, query: &str) -> Vec<Value> {
        let response =
            self.get(&format!("/api/queues/{}/messages?count={count}{query}", segment(queue))).await;
        messages(&response.assert_status(200).json())
    }

    /// Acknowledges the message pulled with `receipt`, which must answer 204.
    pub async fn ack(&self, queue: &str, receipt: &str) {
        self.delete(&format!("/api/queues/{}/messages/{receipt}", segment(queue))).await.assert_status(204);
    }

    /// The JSON of `queue` (`GET /api/queues/{queue}`), which must exist.
    pub async fn queue(&self, queue: &str) -> Value {
        self.get_json(&format!("/api/queues/{}", segment(queue))).await
    }
}

/// A client of a broker's HTTP listener speaking HTTPS (`--http-tls`), trusting one CA.
#[derive(Clone)]
pub struct Https {
    addr: SocketAddr,
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl Https {
    /// A client of the HTTPS listener at `addr` that trusts the CA certificates in `ca_pem`
    /// only and checks the listener's certificate for `server_name`.
    pub fn new(addr: SocketAddr, ca_pem: &[u8], server_name: &str) -> Https {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert.expect("the CA file is PEM")).expect("a CA certificate");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("rustls' default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_owned()).expect("a DNS name or an IP address");
        Https { addr, connector: TlsConnector::from(Arc::new(config)), server_name }
    }

    /// The `Host` header a request to this listener carries: its address.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `method path` with exactly `headers`, as [`Http::request_with`] sends it, over TLS;
    /// fails the test if that fails or takes longer than the deadline.
    pub async fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        let what = format!("{method} {path} over HTTPS");
        within(&what, self.try_request_with(method, path, headers, body))
            .await
            .unwrap_or_else(|err| panic!("{what} on {}: {err}", self.addr))
    }

    /// Like [`Https::request_with`], but a failure (the TLS handshake, say) is the answer.
    pub async fn try_request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<HttpResponse> {
        let tcp = TcpStream::connect(self.addr).await?;
        let stream = self.connector.connect(self.server_name.clone(), tcp).await?;
        exchange(stream, method, path, headers, body).await
    }

    /// `GET path` with `Host`, as a program using the API sends it.
    pub async fn get(&self, path: &str) -> HttpResponse {
        self.request_with("GET", path, &[("Host", &self.host())], None).await
    }

    /// `PUT path` with `body` as JSON and `Host`.
    pub async fn put_json(&self, path: &str, body: &Value) -> HttpResponse {
        let host = self.host();
        let headers = [("Host", host.as_str()), ("Content-Type", "application/json")];
        self.request_with("PUT", path, &headers, Some(body.to_string().as_bytes())).await
    }
}

/// Sends one request on `stream` (`Connection: close`, `headers`, and `Content-Length` when
/// there is a body) and reads the response until the server closes the connection.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<HttpResponse> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(bytes) = body {
        head.push_str(&format!("Content-Length: {}\r\n", bytes.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    if let Some(bytes) = body {
        stream.write_all(bytes).await?;
    }
    // A TLS stream holds written bytes until flushed; a TCP stream's flush does nothing.
    stream.flush().await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

/// A message id as JSON carries it: a decimal string (ids exceed 2^53).
pub fn json_id(value: &Value) -> Option<u64> {
    value.as_str()?.parse().ok()
}

/// `name` as one path segment: every byte but the unreserved ones (RFC 3986) percent-encoded,
/// so a queue named `a/b` or `x y` stays one segment.
pub fn segment(name: &str) -> String {
    let mut encoded = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The `messages` array of a pull or peek response.
pub fn messages(document: &Value) -> Vec<Value> {
    document["messages"].as_array().unwrap_or_else(|| panic!("no messages array in {document}")).clone()
}

/// The `receipt` of a pulled message.
pub fn receipt(message: &Value) -> String {
    message["receipt"].as_str().unwrap_or_else(|| panic!("no receipt in {message}")).to_owned()
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|err| panic!("the body is not JSON ({err}):\n{self}"))
    }

    /// Panics (showing the response) unless the status is `status`.
    pub fn assert_status(&self, status: u16) -> &Self {
        assert_eq!(self.status, status, "unexpected status:\n{self}");
        self
    }

    /// Panics unless this is an API error: status `status`, a JSON body
    /// `{"error": {"code": code, "message": "..."}}` with a non-empty message. Returns the
    /// message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        self.assert_status(status);
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(content_type.starts_with("application/json"), "an error should be JSON:\n{self}");
        let document = self.json();
        assert_eq!(document["error"]["code"], code, "error code:\n{self}");
        let message = document["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "an error should say what went wrong:\n{self}");
        message.to_owned()
    }
}

impl fmt::Display for HttpResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "HTTP {}", self.status)?;
        for (name, value) in &self.headers {
            writeln!(f, "{name}: {value}")?;
        }
        write!(f, "\n{}", self.body)
    }
}

/// Parses a whole response read until the server closed the connection.
fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| invalid("no end of the head"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| invalid("the head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(&format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body).ok_or_else(|| invalid("bad chunked body"))?;
    }
    Ok(HttpResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

/// Decodes a chunked transfer-encoded body.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// A request as a test server received it.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// The method, e.g. `POST`.
    pub method: String,
    /// The request target, e.g. `/hook?x=1`.
    pub path: String,
    /// Header names (lowercase) and values, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes; chunked request bodies are not supported).
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!("the request body is not JSON ({err}): {}", String::from_utf8_lossy(&self.body))
        })
    }
}

/// Reads one request from `reader`. `Ok(None)` when the peer closed the connection before
/// sending another request (the end of a keep-alive connection).
pub async fn read_request<R: AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Option<HttpRequest>> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = reader.read_until(b'\n', &mut head).await?;
        if n == 0 {
            return if head.is_empty() { Ok(None) } else { Err(invalid("the peer closed mid-head".into())) };
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(invalid("request head too large".into()));
        }
        if head[before..] == *b"\r\n" || head[before..] == *b"\n" {
            break;
        }
    }
    let head = String::from_utf8(head).map_err(|_| invalid("the head is not UTF-8".into()))?;
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(invalid(format!("bad request line {request_line:?}")));
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length = match headers.iter().find(|(name, _)| name == "content-length") {
        Some((_, value)) => value.parse().map_err(|_| invalid(format!("bad Content-Length {value:?}")))?,
        None => 0,
    };
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await?;
    Ok(Some(HttpRequest { method: method.to_owned(), path: path.to_owned(), headers, body }))
}

/// Writes a response with a `Content-Length` body; `close` adds `Connection: close`.
pub async fn write_response<W: AsyncWrite + Unpin>(
    writer: &mut W,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let connection = if close { "Connection: close\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{connection}\r\n",
        body.len()
    );
    writer.write_all(head.as_bytes()).await?;
    writer.write_all(body).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain =
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        let response = parse_response(plain).unwrap();
        assert_eq!(response.status, 404);
        assert_eq!(response.header("Content-Type"), Some("application/json"));
        assert_eq!(response.body, "{}");

        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap().body, "abcde");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn queue_names_become_one_path_segment() {
        assert_eq!(segment("orders.dlq-2_x~"), "orders.dlq-2_x~");
        assert_eq!(segment("a/b c\"\u{e9}"), "a%2Fb%20c%22%C3%A9");
    }

    #[tokio::test]
    async fn reads_requests_one_after_another() {
        let raw: &[u8] =
            b"POST /hook HTTP/1.1\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}\
                           GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut reader = tokio::io::BufReader::new(raw);
        let first = read_request(&mut reader).await.unwrap().unwrap();
        assert_eq!((first.method.as_str(), first.path.as_str()), ("POST", "/hook"));
        assert_eq!(first.json(), serde_json::json!({}));
        assert_eq!(first.header("content-type"), Some("application/json"));
        let second = read_request(&mut reader).await.unwrap().unwrap();
        assert_eq!((second.method.as_str(), second.path.as_str(), second.body.len()), ("GET", "/", 0));
        assert!(read_request(&mut reader).await.unwrap().is_none());
    }
}
