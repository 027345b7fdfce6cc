//! The JSON API: queues, publish, pull (SQS-style receipts), settle, peek, moves, status.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use hopper_proto::{pb, Body};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::ApiError;
use crate::message::{Payload, QueuedMessage};
use crate::mover::{MoveSpec, MoveStatus};
use crate::queue::{now_ms, Confirm, Overflow, PullBox, Queue, QueueSettings, Subscriber};
use crate::server::Shared;

type ApiResult<T> = Result<T, ApiError>;

/// A JSON request body whose problems are answered in the API's error shape. An empty body
/// stands for the type's default (every field unset).
pub(super) struct ApiJson<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Default> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let json_type = request
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let bytes = <Bytes as axum::extract::FromRequest<S>>::from_request(request, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(ApiJson(T::default()));
        }
        if !json_type {
            let message = "the request body must be JSON (Content-Type: application/json)";
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "INVALID_ARGUMENT", message));
        }
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            // Malformed JSON is a bad request; well-formed JSON of the wrong shape is
            // unprocessable.
            let status = match e.classify() {
                serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::BAD_REQUEST,
            };
            ApiError::new(status, "INVALID_ARGUMENT", format!("invalid JSON body: {e}"))
        })
    }
}

/// A broker-side pull consumer for HTTP clients, whose receipts stay valid across requests.
pub(crate) struct HttpPuller {
    consumer_id: u64,
    inbox: Arc<PullBox>,
    /// Held by the request using this consumer.
    turn: Arc<tokio::sync::Mutex<()>>,
}

pub(super) async fn ready(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(json!({"status": "ready", "publishers_blocked": shared.flow.blocked().is_some()}))
}

pub(super) async fn status(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let (memory_used, memory_limit, disk_free, disk_limit, held) = shared.flow.readings();
    let blocked = shared.flow.blocked();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": shared.started.elapsed().as_secs(),
        "connections": shared.connections.load(Ordering::Relaxed),
        "blocked": blocked.is_some(),
        "blocked_reason": blocked.unwrap_or_default(),
        "blocked_publishers": held,
        "memory_used": memory_used,
        "memory_high_watermark": memory_limit,
        "disk_free": disk_free,
        "disk_free_low_watermark": disk_limit,
    }))
}

/// The JSON form of a queue: the same fields as `hopper queue list --json`, plus alarm state.
pub(crate) fn queue_json(queue: &Queue, dead_letter_targets: &[String]) -> Value {
    let snapshot = queue.snapshot();
    let settings = queue.settings();
    let dead: HashMap<&str, u64> = snapshot.counters.dead.iter().map(|(r, n)| (r.as_str(), *n)).collect();
    let optional = |v: u64| if v == 0 { Value::Null } else { json!(v) };
    json!({
        "name": queue.name(),
        "durable": settings.durable,
        "ready": snapshot.ready,
        "unacked": snapshot.unacked,
        "delayed": snapshot.delayed,
        "consumers": snapshot.consumers,
        "published": snapshot.counters.published,
        "delivered": snapshot.counters.delivered,
        "acked": snapshot.counters.acked,
        "redelivered": snapshot.counters.redelivered,
        "dead_lettered": dead,
        "waiting_bytes": snapshot.waiting_bytes,
        "dead_letter": if settings.dead_letter.is_empty() { Value::Null } else { json!(settings.dead_letter) },
        "max_deliveries": optional(settings.max_deliveries.into()),
        "retry_backoff_ms": settings.retry_backoff_ms,
        "message_ttl_ms": optional(settings.message_ttl_ms),
        "ack_timeout_ms": optional(settings.ack_timeout_ms),
        "max_length": optional(settings.max_length),
        "max_bytes": optional(settings.max_bytes),
        "overflow": settings.overflow.as_str(),
        "alarm_depth": optional(queue.alarm_depth()),
        "alarm": queue.alarm_raised(),
        "read_error": if snapshot.read_error.is_empty() { Value::Null } else { json!(snapshot.read_error) },
        "is_dead_letter_queue": dead_letter_targets.iter().any(|t| t == queue.name()),
    })
}

fn dead_letter_targets(shared: &Shared) -> Vec<String> {
    shared.queues.list().iter().map(|q| q.settings().dead_letter.clone()).filter(|d| !d.is_empty()).collect()
}

pub(super) async fn list_queues(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let targets = dead_letter_targets(&shared);
    Json(Value::Array(shared.queues.list().iter().map(|q| queue_json(q, &targets)).collect()))
}

pub(super) async fn get_queue(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let queue = shared.queues.get(&name)?;
    Ok(Json(queue_json(&queue, &dead_letter_targets(&shared))))
}

/// Body of `PUT /api/queues/{name}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct DeclareBody {
    durable: bool,
    dead_letter: Option<String>,
    max_deliveries: Option<u32>,
    retry_backoff_ms: Vec<u64>,
    message_ttl_ms: Option<u64>,
    ack_timeout_ms: Option<u64>,
    max_length: Option<u64>,
    max_bytes: Option<u64>,
    overflow: Option<String>,
    alarm_depth: Option<u64>,
}

pub(super) async fn declare_queue(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<DeclareBody>,
) -> ApiResult<impl IntoResponse> {
    let overflow = Overflow::parse(body.overflow.as_deref().unwrap_or(""))
        .ok_or_else(|| ApiError::bad_request("overflow must be reject-publish or drop-head"))?;
    let settings = QueueSettings {
        durable: body.durable,
        dead_letter: body.dead_letter.unwrap_or_default(),
        max_deliveries: body.max_deliveries.unwrap_or(0),
        retry_backoff_ms: body.retry_backoff_ms,
        message_ttl_ms: body.message_ttl_ms.unwrap_or(0),
        ack_timeout_ms: body.ack_timeout_ms.unwrap_or(0),
        max_length: body.max_length.unwrap_or(0),
        max_bytes: body.max_bytes.unwrap_or(0),
        overflow,
    };
    let declared = shared.queues.declare(&name, settings)?;
    if let Some(depth) = body.alarm_depth {
        shared.queues.set_alarm(&name, depth)?;
    }
    let status = if declared.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(queue_json(&declared.queue, &dead_letter_targets(&shared)))))
}

pub(super) async fn delete_queue(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let deleted = shared.queues.delete(&name, false, false)?;
    crate::queue::notify_cancelled(deleted.consumers, &format!("queue '{name}' was deleted"));
    shared.http_pullers.lock().remove(&name);
    Ok(Json(json!({"deleted": name, "messages": deleted.messages})))
}

pub(super) async fn purge(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let queue = shared.queues.get(&name)?;
    let purged = queue.with_state(|s, j, _| s.purge(j))?;
    Ok(Json(json!({"purged": purged})))
}

/// Body of `PUT /api/queues/{name}/alarm`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AlarmBody {
    depth: u64,
}

pub(super) async fn set_alarm(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<AlarmBody>,
) -> ApiResult<Json<Value>> {
    shared.queues.set_alarm(&name, body.depth)?;
    Ok(Json(json!({"queue": name, "alarm_depth": body.depth})))
}

/// A duration in a request: a number of seconds, or a string like "500ms", "2s", "1m".
fn duration_ms(value: &Option<Value>, what: &str) -> ApiResult<u64> {
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => {
            n.as_f64().filter(|s| *s >= 0.0).map(|s| (s * 1000.0).round() as u64).ok_or_else(|| {
                ApiError::bad_request(format!("{what} must be a non-negative number of seconds"))
            })
        }
        Some(Value::String(text)) => parse_duration_ms(text)
            .ok_or_else(|| ApiError::bad_request(format!("{what}: cannot read '{text}' as a duration"))),
        Some(_) => Err(ApiError::bad_request(format!("{what} must be seconds or a duration string"))),
    }
}

/// Parses "250ms", "1.5s", "2m", "1h" or a plain number of seconds into milliseconds.
pub(crate) fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (text, 1000.0)
    };
    let value: f64 = number.trim().parse().ok()?;
    (value >= 0.0 && value.is_finite()).then(|| (value * scale).round() as u64)
}

/// Body of `POST /api/queues/{name}/messages`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublishBody {
    body: Value,
    #[serde(default)]
    headers: HashMap<String, String>,
    #[serde(default)]
    delay: Option<Value>,
    #[serde(default)]
    ttl: Option<Value>,
}

pub(super) async fn publish(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<PublishBody>,
) -> ApiResult<impl IntoResponse> {
    if let Some(reason) = shared.flow.blocked() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "RESOURCE_LIMIT",
            format!("publishers are blocked: {reason}"),
        ));
    }
    let delay = duration_ms(&request.delay, "delay")?;
    let ttl = duration_ms(&request.ttl, "ttl")?;
    let queue = shared.queues.get(&name)?;
    let (body, content_type) = match request.body {
        Value::String(text) => (Bytes::from(text), String::new()),
        other => (Bytes::from(other.to_string()), "application/json".to_owned()),
    };
    let payload = Arc::new(Payload {
        id: shared.next_message_id.fetch_add(1, Ordering::Relaxed),
        body,
        headers: request.headers,
        content_type,
        published_at_ms: now_ms(),
        deaths: Vec::new(),
        replay_count: 0,
    });
    let (tx, rx) = oneshot::channel();
    let confirm = Confirm::Callback(Box::new(move |result| {
        let _ = tx.send(result);
    }));
    queue.publish(payload, delay, ttl, confirm)?;
    match rx.await {
        Ok(Ok(Body::PublishOk(ok))) => Ok((StatusCode::CREATED, Json(json!({"message_id": ok.message_id})))),
        Ok(Ok(_)) | Err(_) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "no confirm")),
        Ok(Err(err)) => Err(err.into()),
    }
}

/// Query of `GET /api/queues/{name}/messages`.
#[derive(Debug, Deserialize)]
pub(super) struct PullQuery {
    count: Option<u32>,
    visibility: Option<f64>,
    wait: Option<f64>,
}

pub(super) async fn pull(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(query): Query<PullQuery>,
) -> ApiResult<Json<Value>> {
    let count = query.count.unwrap_or(1).clamp(1, 1000);
    let visibility = query.visibility.map_or(30_000, |s| (s.max(0.0) * 1000.0) as u64).max(1);
    let wait = Duration::from_secs_f64(query.wait.unwrap_or(0.0).clamp(0.0, 20.0));
    let queue = shared.queues.get(&name)?;
    let (puller, _turn) = http_puller(&shared, &queue)?;
    let consumer_id = puller.consumer_id;
    queue
        .with_state(|s, _, _| s.grant(consumer_id, count, visibility))?
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    // If the client goes away mid-poll, this handler is dropped: the guard then stops the
    // grant and puts back whatever was collected for nobody.
    let mut guard = PullGuard { queue: queue.clone(), puller: puller.clone(), armed: true };
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    while puller.inbox.is_empty() && !wait.is_zero() {
        tokio::select! {
            _ = puller.inbox.arrived() => {}
            _ = &mut deadline => break,
        }
    }
    guard.armed = false;
    let deliveries = queue.with_state(|s, _, _| {
        s.revoke(consumer_id);
        puller.inbox.take()
    })?;
    let messages: Vec<Value> = deliveries
        .into_iter()
        .map(|d| {
            let receipt = format!("{}-{}", d.consumer_id, d.delivery_tag);
            message_json(d.message.unwrap_or_default(), Some(receipt), &name)
        })
        .collect();
    Ok(Json(json!({"messages": messages})))
}

/// Undoes a pull whose request was abandoned.
struct PullGuard {
    queue: Arc<Queue>,
    puller: Arc<HttpPuller>,
    armed: bool,
}

impl Drop for PullGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let consumer_id = self.puller.consumer_id;
        let inbox = &self.puller.inbox;
        let _ = self.queue.with_state(|s, j, now| {
            s.revoke(consumer_id);
            for delivery in inbox.take() {
                let _ = s.nack(
                    consumer_id,
                    delivery.delivery_tag,
                    false,
                    true,
                    "pull abandoned",
                    Some(0),
                    now,
                    j,
                );
            }
        });
    }
}

/// A free HTTP pull consumer of the queue, with its turn held: each concurrent pull gets its
/// own, so a long poll never holds up another request. Consumers of a recreated queue are
/// replaced.
fn http_puller(
    shared: &Shared,
    queue: &Arc<Queue>,
) -> ApiResult<(Arc<HttpPuller>, tokio::sync::OwnedMutexGuard<()>)> {
    let mut pullers = shared.http_pullers.lock();
    let pool = pullers.entry(queue.name().to_owned()).or_default();
    let alive: Vec<u64> = queue.with_state(|s, _, _| s.consumer_ids().collect())?;
    pool.retain(|p| alive.contains(&p.consumer_id));
    for puller in pool.iter() {
        if let Ok(turn) = puller.turn.clone().try_lock_owned() {
            return Ok((puller.clone(), turn));
        }
    }
    let consumer_id = shared.next_consumer_id.fetch_add(1, Ordering::Relaxed);
    let inbox = Arc::new(PullBox::new(None));
    let subscriber = Subscriber::Pull(inbox.clone());
    queue.with_state(|s, _, _| s.add_pull_consumer(consumer_id, subscriber))?;
    let puller = Arc::new(HttpPuller { consumer_id, inbox, turn: Arc::new(tokio::sync::Mutex::new(())) });
    let turn = puller.turn.clone().try_lock_owned().expect("a new puller is free");
    pool.push(puller.clone());
    Ok((puller, turn))
}

/// A message as JSON: the same keys as `hopper consume --json`, plus the receipt if pulled.
pub(crate) fn message_json(message: pb::Message, receipt: Option<String>, queue: &str) -> Value {
    let death_json = |d: &pb::Death| {
        json!({
            "reason": d.reason, "queue": d.queue, "count": d.count, "error": d.error,
            "first_time": d.first_failure_ms, "last_time": d.last_failure_ms, "died_at": d.died_at_ms,
        })
    };
    let deaths: Vec<Value> = message.deaths.iter().map(death_json).collect();
    let mut value = json!({
        "message_id": message.message_id,
        "queue": queue,
        "body": String::from_utf8_lossy(&message.body),
        "headers": message.headers,
        "content_type": message.content_type,
        "published_at_ms": message.published_at_ms,
        "delivery_count": message.delivery_count,
        "redelivered": message.redelivered,
        "replay_count": message.replay_count,
        "death": message.deaths.last().map(death_json),
        "deaths": deaths,
    });
    if let Some(receipt) = receipt {
        value["receipt"] = json!(receipt);
    }
    value
}

fn parse_receipt(receipt: &str) -> ApiResult<(u64, u64)> {
    receipt
        .split_once('-')
        .and_then(|(c, t)| Some((c.parse().ok()?, t.parse().ok()?)))
        .ok_or_else(|| ApiError::bad_request(format!("'{receipt}' is not a receipt")))
}

pub(super) async fn ack(
    State(shared): State<Arc<Shared>>,
    Path((name, receipt)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let (consumer_id, tag) = parse_receipt(&receipt)?;
    let queue = shared.queues.get(&name)?;
    queue.with_state(|s, j, _| s.ack(consumer_id, tag, false, j))?.map_err(settle_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST .../{receipt}/nack`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct NackBody {
    requeue: Option<bool>,
    delay: Option<Value>,
    error: String,
}

pub(super) async fn nack(
    State(shared): State<Arc<Shared>>,
    Path((name, receipt)): Path<(String, String)>,
    ApiJson(body): ApiJson<NackBody>,
) -> ApiResult<StatusCode> {
    let (consumer_id, tag) = parse_receipt(&receipt)?;
    let delay = match body.delay {
        None | Some(Value::Null) => None,
        delay => Some(duration_ms(&delay, "delay")?),
    };
    let requeue = body.requeue.unwrap_or(true);
    let queue = shared.queues.get(&name)?;
    queue
        .with_state(|s, j, now| s.nack(consumer_id, tag, false, requeue, &body.error, delay, now, j))?
        .map_err(settle_error)?;
    Ok(StatusCode::NO_CONTENT)
}

fn settle_error(err: crate::queue::SettleError) -> ApiError {
    match err {
        crate::queue::SettleError::Expired(_) => {
            ApiError::new(StatusCode::CONFLICT, "PRECONDITION_FAILED", err.to_string())
        }
        _ => ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("unknown or already settled receipt: {err}"),
        ),
    }
}

/// Query of `GET /api/queues/{name}/peek`.
#[derive(Debug, Deserialize)]
pub(super) struct PeekQuery {
    count: Option<usize>,
}

pub(super) async fn peek(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(query): Query<PeekQuery>,
) -> ApiResult<Json<Value>> {
    let queue = shared.queues.get(&name)?;
    let found = queue.with_state(|s, j, _| s.peek(query.count.unwrap_or(10).min(10_000), j))?;
    let messages: Vec<Value> = found
        .iter()
        .map(|(message, payload): &(QueuedMessage, Arc<Payload>)| {
            message_json(crate::queue::message_to_wire(message, payload), None, &name)
        })
        .collect();
    Ok(Json(json!({"messages": messages})))
}

/// Body of `POST /api/queues/{name}/move`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct MoveBody {
    to: Option<String>,
    rate: u32,
    limit: u64,
    filter: Option<String>,
}

pub(super) async fn start_move(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<MoveBody>,
) -> ApiResult<impl IntoResponse> {
    let filter = match body.filter {
        None => None,
        Some(filter) => {
            let (key, value) =
                filter.split_once('=').ok_or_else(|| ApiError::bad_request("filter must be KEY=VALUE"))?;
            Some((key.to_owned(), value.to_owned()))
        }
    };
    let spec = MoveSpec {
        source: name,
        destination: body.to.unwrap_or_default(),
        rate: body.rate,
        limit: body.limit,
        filter,
    };
    let status = shared.moves.start(&shared.queues, &shared.events, spec)?;
    Ok((StatusCode::CREATED, Json(move_json(&status))))
}

pub(super) async fn list_moves(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(Value::Array(shared.moves.list(&shared.queues).iter().map(move_json).collect()))
}

fn move_json(status: &MoveStatus) -> Value {
    let filter = status.spec.filter.as_ref().map(|(k, v)| format!("{k}={v}"));
    json!({
        "id": status.id, "source": status.spec.source, "destination": status.spec.destination,
        "rate": status.spec.rate, "limit": status.spec.limit, "filter": filter,
        "state": status.state.as_str(), "moved": status.moved, "skipped": status.skipped,
        "remaining": status.remaining, "error": status.error,
        "started_ms": status.started_ms, "finished_ms": status.finished_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_seconds_and_suffixes() {
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("1.5s"), Some(1500));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("1h"), Some(3_600_000));
        assert_eq!(parse_duration_ms("3"), Some(3000));
        assert_eq!(parse_duration_ms("soon"), None);
        assert_eq!(parse_duration_ms("-1s"), None);
    }

    #[test]
    fn receipts_round_trip() {
        assert_eq!(parse_receipt("12-7").unwrap(), (12, 7));
        assert!(parse_receipt("12").is_err());
    }

    #[test]
    fn deaths_show_as_the_latest_and_the_history() {
        let death = |reason: &str| crate::message::Death {
            queue: "q".into(),
            reason: crate::message::DeathReason::parse(reason).unwrap(),
            count: 1,
            error: "e".into(),
            first_failure_ms: 1,
            last_failure_ms: 2,
            died_at_ms: 3,
        };
        let message = pb::Message {
            deaths: [death("rejected"), death("expired")].iter().map(crate::session::death_to_wire).collect(),
            ..Default::default()
        };
        let value = message_json(message, None, "q.dlq");
        assert_eq!(value["death"]["reason"], "expired");
        assert_eq!(value["deaths"].as_array().unwrap().len(), 2);
    }
}
