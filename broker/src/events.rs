//! Operational events — queue depth alarms raised and cleared, publishers blocked and unblocked,
//! moves started and ended — fanned out to protocol subscribers (`hopper events`) and, for
//! alarms, POSTed to a webhook with retries, never blocking the broker.

use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

/// Events buffered per subscriber; a subscriber that falls further behind skips ahead.
const BUFFER: usize = 1024;
/// Webhook delivery attempts, with these waits between them.
const WEBHOOK_BACKOFF: [Duration; 5] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokerEvent {
    /// Unix ms.
    pub time_ms: u64,
    /// alarm_raised, alarm_cleared, publishers_blocked, publishers_unblocked, move_started,
    /// move_ended, reads_failing, reads_resumed.
    pub kind: String,
    /// The queue concerned, if any.
    pub queue: String,
    /// A number that goes with it: the depth for alarms, the move id for moves.
    pub value: u64,
    /// Human-readable detail.
    pub detail: String,
}

/// The event fan-out of one broker.
pub struct Events {
    sender: broadcast::Sender<BrokerEvent>,
    webhook: Option<String>,
}

impl Events {
    /// Events that also POST alarms to `webhook` (an `http://` URL), if given.
    pub fn new(webhook: Option<String>) -> Self {
        Events { sender: broadcast::channel(BUFFER).0, webhook }
    }

    /// A new subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<BrokerEvent> {
        self.sender.subscribe()
    }

    /// Publishes an event to every subscriber, and alarms to the webhook.
    pub fn emit(&self, event: BrokerEvent) {
        if let (Some(url), true) =
            (&self.webhook, event.kind.starts_with("alarm") || event.kind.starts_with("reads_"))
        {
            let (url, event) = (url.clone(), event.clone());
            tokio::spawn(async move { deliver_webhook(&url, &event).await });
        }
        let _ = self.sender.send(event);
    }
}

async fn deliver_webhook(url: &str, event: &BrokerEvent) {
    let body = serde_json::to_vec(event).unwrap_or_default();
    let mut last_error = String::new();
    for (attempt, wait) in WEBHOOK_BACKOFF.iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(5), post_json(url, &body)).await {
            Ok(Ok(())) => {
                tracing::debug!(url, kind = %event.kind, queue = %event.queue, "webhook delivered");
                return;
            }
            Ok(Err(err)) => last_error = err,
            Err(_) => last_error = "timed out".into(),
        }
        tracing::debug!(url, attempt, error = %last_error, "webhook attempt failed");
        tokio::time::sleep(*wait).await;
    }
    tracing::warn!(url, kind = %event.kind, queue = %event.queue, error = %last_error, "webhook gave up");
}

/// POSTs `body` as JSON to an `http://host[:port][/path]` URL with HTTP/1.1 and succeeds on a
/// 2xx status.
async fn post_json(url: &str, body: &[u8]) -> Result<(), String> {
    let (host, path) = split_url(url)?;
    let mut stream =
        tokio::net::TcpStream::connect(&host).await.map_err(|e| format!("connect {host}: {e}"))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
    stream.write_all(body).await.map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    while !response.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
    }
    let status_line = String::from_utf8_lossy(&response);
    let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => Err(format!("status {code}")),
        None => Err("no HTTP status in the response".into()),
    }
}

/// ("host:port", "/path") of an `http://` URL.
fn split_url(url: &str) -> Result<(String, String), String> {
    let rest =
        url.strip_prefix("http://").ok_or_else(|| format!("only http:// webhooks are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let host = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
    Ok((host, path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_and_path() {
        assert_eq!(
            split_url("http://127.0.0.1:9000/hook").unwrap(),
            ("127.0.0.1:9000".into(), "/hook".into())
        );
        assert_eq!(split_url("http://example.com").unwrap(), ("example.com:80".into(), "/".into()));
        assert!(split_url("https://example.com").is_err());
    }
}
