//! The JSON API: queues, publish, pull (SQS-style receipts), settle, peek, moves, status. Each
//! handler translates JSON into one engine call and its answer back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use bytes::Bytes;
use hopper_proto::json::{MessageJson, QueueJson};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::ApiError;
use crate::engine::{Caller, DeliveryRef, Engine, MessageView, NackOptions, NewMessage, Pull, QueueInfo};
use crate::error::BrokerError;
use crate::message::MessageProperties;
use crate::mover::{MoveSpec, MoveStatus};
use crate::queue::{Confirm, Outcome};
use crate::settings::{Overflow, QueueSettings};
use crate::wire;

type ApiResult<T> = Result<T, ApiError>;

/// A JSON request body whose problems are answered in the API's error shape. An empty body
/// stands for the type's default (every field unset).
pub(super) struct ApiJson<T>(pub(super) T);

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

/// Visibility of pulled messages when the request names none, in seconds (as SQS's default).
const DEFAULT_VISIBILITY_S: f64 = 30.0;
/// Longest long poll, in seconds.
const MAX_WAIT_S: f64 = 20.0;
/// Most messages one pull returns.
const MAX_PULL: u32 = crate::engine::MAX_GET_COUNT;
/// Most message bytes one pull returns.
const HTTP_PULL_BYTES: usize = 64 * 1024 * 1024;

pub(super) async fn ready(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    Json(json!({"status": "ready", "publishers_blocked": engine.publishers_blocked().is_some()}))
}

pub(super) async fn status(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    let status = engine.status();
    Json(json!({
        "version": status.version,
        "uptime_s": status.uptime_ms / 1000,
        "connections": status.connections,
        "blocked": status.blocked.is_some(),
        "blocked_reason": status.blocked.unwrap_or_default(),
        "blocked_publishers": status.blocked_publishers,
        "memory_used": status.memory_used,
        "memory_high_watermark": status.memory_high_watermark,
        "disk_free": status.disk_free,
        "disk_free_low_watermark": status.disk_free_low_watermark,
        "storage_threads": status.storage_threads,
        "fsyncs": status.fsyncs,
        "open_segment_files": status.open_segment_files,
        "storage_error": status.storage_error.unwrap_or_default(),
    }))
}

/// The JSON form of a queue: the same type `hopper queue list --json` prints.
fn queue_json(info: QueueInfo) -> QueueJson {
    QueueJson::from(&wire::queue_info(info))
}

/// The JSON form of a message: the same type `hopper consume --json` prints.
fn message_json(message: &MessageView, queue: &str) -> MessageJson {
    MessageJson::new(&wire::message(message), queue)
}

pub(super) async fn list_queues(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
) -> impl IntoResponse {
    Json(engine.list_queues(&caller).into_iter().map(queue_json).collect::<Vec<_>>())
}

pub(super) async fn get_queue(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
) -> ApiResult<Json<QueueJson>> {
    Ok(Json(queue_json(engine.queue_info(&caller, &name)?)))
}

/// Body of `PUT /api/queues/{name}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct DeclareBody {
    durable: bool,
    replicated: bool,
    replicas: Option<u32>,
    dead_letter: Option<String>,
    dead_letter_exchange: Option<String>,
    dead_letter_routing_key: Option<String>,
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
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<DeclareBody>,
) -> ApiResult<impl IntoResponse> {
    let overflow = Overflow::parse(body.overflow.as_deref().unwrap_or(""))
        .ok_or_else(|| ApiError::bad_request("overflow must be reject-publish or drop-head"))?;
    let settings = QueueSettings {
        durable: body.durable,
        dead_letter: body.dead_letter.unwrap_or_default(),
        dead_letter_exchange: body.dead_letter_exchange.unwrap_or_default(),
        dead_letter_routing_key: body.dead_letter_routing_key.unwrap_or_default(),
        max_deliveries: body.max_deliveries.unwrap_or(0),
        retry_backoff_ms: body.retry_backoff_ms,
        message_ttl_ms: body.message_ttl_ms.unwrap_or(0),
        ack_timeout_ms: body.ack_timeout_ms.unwrap_or(0),
        max_length: body.max_length.unwrap_or(0),
        max_bytes: body.max_bytes.unwrap_or(0),
        overflow,
        replicated: body.replicated,
        replicas: body.replicas.unwrap_or(0),
    };
    let (info, created) = engine.declare(&caller, &name, settings, body.alarm_depth).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(queue_json(info))))
}

pub(super) async fn delete_queue(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let messages = engine.delete_queue(&caller, &name, false, false).await?;
    Ok(Json(json!({"deleted": name, "messages": messages})))
}

pub(super) async fn purge(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"purged": engine.purge(&caller, &name)?})))
}

/// Body of `PUT /api/queues/{name}/alarm`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AlarmBody {
    depth: u64,
}

pub(super) async fn set_alarm(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<AlarmBody>,
) -> ApiResult<Json<Value>> {
    engine.set_alarm(&caller, &name, body.depth).await?;
    Ok(Json(json!({"queue": name, "alarm_depth": body.depth})))
}

/// A duration in a request: a number of seconds, or a string like "500ms", "2s", "1m".
pub(super) fn duration_ms(value: &Option<Value>, what: &str) -> ApiResult<u64> {
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
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<PublishBody>,
) -> ApiResult<impl IntoResponse> {
    let message = new_message(&engine, request.body, request.headers, &request.delay, &request.ttl)?;
    let (confirm, confirmed) = confirm_channel();
    engine.publish(&caller, &name, message, confirm)?;
    let (message_id, _) = published(confirmed).await?;
    Ok((StatusCode::CREATED, Json(json!({"message_id": message_id.to_string()}))))
}

/// The message a publish request describes: a string body as is, any other JSON value as its
/// text with content type `application/json`. Refused while publishers are blocked.
pub(super) fn new_message(
    engine: &Engine,
    body: Value,
    headers: HashMap<String, String>,
    delay: &Option<Value>,
    ttl: &Option<Value>,
) -> ApiResult<NewMessage> {
    if let Some(reason) = engine.publishers_blocked() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "RESOURCE_LIMIT",
            format!("publishers are blocked: {reason}"),
        ));
    }
    let delay_ms = duration_ms(delay, "delay")?;
    let ttl_ms = duration_ms(ttl, "ttl")?;
    let (body, content_type) = match body {
        Value::String(text) => (Bytes::from(text), String::new()),
        other => (Bytes::from(other.to_string()), "application/json".to_owned()),
    };
    let properties = MessageProperties::new(headers, content_type);
    Ok(NewMessage { body, properties, delay_ms, ttl_ms, publish_id: 0 })
}

/// Waits for a publish confirm: the message id and how many queues took it.
pub(super) async fn published(
    confirmed: oneshot::Receiver<Result<Outcome, BrokerError>>,
) -> ApiResult<(u64, u32)> {
    match confirmed.await {
        Ok(Ok(Outcome::Published { message_id, routed })) => Ok((message_id, routed)),
        Ok(Err(err)) => Err(err.into()),
        Ok(Ok(_)) | Err(_) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "no confirm")),
    }
}

/// A confirm whose outcome arrives on the returned channel.
pub(super) fn confirm_channel() -> (Confirm, oneshot::Receiver<Result<Outcome, BrokerError>>) {
    let (tx, rx) = oneshot::channel();
    let confirm = Confirm::Callback(Box::new(move |result| {
        let _ = tx.send(result);
    }));
    (confirm, rx)
}

/// Query of `GET /api/queues/{name}/messages`.
#[derive(Debug, Deserialize)]
pub(super) struct PullQuery {
    count: Option<u32>,
    visibility: Option<f64>,
    wait: Option<f64>,
}

/// Seconds from a query parameter: a finite, non-negative number; above `max` it is `max`.
fn seconds(value: Option<f64>, default: f64, max: f64, what: &str) -> ApiResult<Duration> {
    let value = value.unwrap_or(default);
    if !value.is_finite() || value < 0.0 {
        return Err(ApiError::bad_request(format!(
            "{what} must be a finite, non-negative number of seconds"
        )));
    }
    Ok(Duration::from_secs_f64(value.min(max)))
}

pub(super) async fn pull(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    Query(query): Query<PullQuery>,
) -> ApiResult<Json<Value>> {
    let count = query.count.unwrap_or(1).clamp(1, MAX_PULL);
    // Far beyond the longest duration: the engine refuses it, naming the limit.
    let visibility = seconds(query.visibility, DEFAULT_VISIBILITY_S, 1e12, "visibility")?;
    let visibility_ms = u64::try_from(visibility.as_millis()).unwrap_or(u64::MAX).max(1);
    let wait = seconds(query.wait, 0.0, MAX_WAIT_S, "wait")?;
    let pull = Pull { count, visibility_ms, wait, budget: HTTP_PULL_BYTES };
    let deliveries = engine.get(&caller, &name, pull, None).await?;
    let messages: Vec<MessageJson> = deliveries
        .iter()
        .map(|delivery| MessageJson {
            receipt: Some(engine.receipt(delivery)),
            ..message_json(&delivery.message, &name)
        })
        .collect();
    Ok(Json(json!({"messages": messages})))
}

/// Acks a pulled message by its receipt; answers once the ack is as durable as a publish.
pub(super) async fn ack(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path((name, receipt)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let delivery = DeliveryRef::Receipt { queue: &name, receipt: &receipt };
    let (confirm, settled) = confirm_channel();
    engine.ack(&caller, delivery, false, Some(confirm))?;
    match settled.await {
        Ok(Ok(_)) => Ok(StatusCode::NO_CONTENT),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "no confirm")),
    }
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
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path((name, receipt)): Path<(String, String)>,
    ApiJson(body): ApiJson<NackBody>,
) -> ApiResult<StatusCode> {
    let delay_ms = match body.delay {
        None | Some(Value::Null) => None,
        delay => Some(duration_ms(&delay, "delay")?),
    };
    let options =
        NackOptions { multiple: false, requeue: body.requeue.unwrap_or(true), error: body.error, delay_ms };
    let delivery = DeliveryRef::Receipt { queue: &name, receipt: &receipt };
    engine.nack(&caller, delivery, options, None)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /api/queues/{name}/peek`.
#[derive(Debug, Deserialize)]
pub(super) struct PeekQuery {
    count: Option<usize>,
}

pub(super) async fn peek(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    Query(query): Query<PeekQuery>,
) -> ApiResult<Json<Value>> {
    let found = engine.peek(&caller, &name, query.count.unwrap_or(10))?;
    let messages: Vec<MessageJson> = found.iter().map(|m| message_json(m, &name)).collect();
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
    through_exchange: bool,
}

pub(super) async fn start_move(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
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
        through_exchange: body.through_exchange,
    };
    let status = engine.start_move(&caller, spec)?;
    Ok((StatusCode::CREATED, Json(move_json(&status))))
}

pub(super) async fn list_moves(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
) -> impl IntoResponse {
    Json(Value::Array(engine.list_moves(&caller).iter().map(move_json).collect()))
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
    fn query_seconds_refuse_what_is_not_a_duration() {
        assert_eq!(seconds(None, 30.0, 60.0, "x").unwrap(), Duration::from_secs(30));
        assert_eq!(seconds(Some(90.0), 0.0, 60.0, "x").unwrap(), Duration::from_secs(60));
        for bad in [f64::NAN, f64::INFINITY, -1.0, f64::NEG_INFINITY] {
            assert!(seconds(Some(bad), 0.0, 60.0, "wait").is_err(), "{bad}");
        }
    }
}
