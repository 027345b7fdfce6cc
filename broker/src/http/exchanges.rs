//! The JSON API of exchanges and bindings: list, declare and delete exchanges, bind and unbind,
//! list bindings, and publish through an exchange.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::api::{confirm_channel, new_message, published, ApiJson};
use super::ApiError;
use crate::engine::{Caller, Engine, Route};
use crate::queue::ExchangeView;
use crate::routing::{Binding, Destination, ExchangeKind, ExchangeSpec};

type ApiResult<T> = Result<T, ApiError>;

/// An exchange as the API shows it.
#[derive(Debug, Serialize)]
pub(super) struct ExchangeJson {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    durable: bool,
    alternate: Option<String>,
    bindings: usize,
    published: u64,
    unroutable: u64,
    returned: u64,
}

impl From<ExchangeView> for ExchangeJson {
    fn from(view: ExchangeView) -> Self {
        ExchangeJson {
            name: view.spec.name,
            kind: view.spec.kind.as_str(),
            durable: view.spec.durable,
            alternate: view.spec.alternate,
            bindings: view.bindings,
            published: view.published,
            unroutable: view.unroutable,
            returned: view.returned,
        }
    }
}

/// A binding as the API shows and takes it.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct BindingJson {
    source: String,
    destination: String,
    destination_type: Option<String>,
    key: String,
    arguments: BTreeMap<String, String>,
}

impl BindingJson {
    fn to_binding(&self) -> ApiResult<Binding> {
        let destination = match self.destination_type.as_deref() {
            None | Some("queue") => Destination::Queue(self.destination.clone()),
            Some("exchange") => Destination::Exchange(self.destination.clone()),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "destination_type must be queue or exchange, not '{other}'"
                )))
            }
        };
        Ok(Binding { destination, key: self.key.clone(), arguments: self.arguments.clone() })
    }

    fn of(source: String, binding: Binding) -> Self {
        let (destination, kind) = match binding.destination {
            Destination::Queue(name) => (name, "queue"),
            Destination::Exchange(name) => (name, "exchange"),
        };
        BindingJson {
            source,
            destination,
            destination_type: Some(kind.into()),
            key: binding.key,
            arguments: binding.arguments,
        }
    }
}

pub(super) async fn list(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
) -> impl IntoResponse {
    Json(engine.list_exchanges(&caller).into_iter().map(ExchangeJson::from).collect::<Vec<_>>())
}

/// Body of `PUT /api/exchanges/{name}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct DeclareBody {
    #[serde(rename = "type")]
    kind: String,
    durable: bool,
    alternate: Option<String>,
}

pub(super) async fn declare(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<DeclareBody>,
) -> ApiResult<impl IntoResponse> {
    let kind = ExchangeKind::parse(&body.kind)
        .ok_or_else(|| ApiError::bad_request("type must be direct, fanout, topic or headers"))?;
    let spec = ExchangeSpec { name, kind, durable: body.durable, alternate: body.alternate };
    let (view, created) = engine.declare_exchange(&caller, spec, false).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(ExchangeJson::from(view))))
}

/// Query of `DELETE /api/exchanges/{name}`.
#[derive(Debug, Deserialize)]
pub(super) struct DeleteQuery {
    if_unused: Option<bool>,
}

pub(super) async fn delete(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> ApiResult<Json<Value>> {
    engine.delete_exchange(&caller, &name, query.if_unused.unwrap_or(false)).await?;
    Ok(Json(json!({"deleted": name})))
}

/// Query of `GET /api/bindings`.
#[derive(Debug, Deserialize)]
pub(super) struct BindingsQuery {
    exchange: Option<String>,
    queue: Option<String>,
}

pub(super) async fn bindings(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Query(query): Query<BindingsQuery>,
) -> impl IntoResponse {
    let found = engine.list_bindings(&caller, query.exchange.as_deref(), query.queue.as_deref());
    Json(found.into_iter().map(|(source, b)| BindingJson::of(source, b)).collect::<Vec<_>>())
}

pub(super) async fn bind(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    ApiJson(body): ApiJson<BindingJson>,
) -> ApiResult<impl IntoResponse> {
    let created = engine.bind(&caller, &body.source, body.to_binding()?).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(json!({"created": created}))))
}

pub(super) async fn unbind(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    ApiJson(body): ApiJson<BindingJson>,
) -> ApiResult<Json<Value>> {
    let removed = engine.unbind(&caller, &body.source, body.to_binding()?).await?;
    Ok(Json(json!({"removed": removed})))
}

/// Body of `POST /api/exchanges/{name}/messages`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublishBody {
    body: Value,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    headers: HashMap<String, String>,
    #[serde(default)]
    mandatory: bool,
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
    let route = Route { exchange: &name, routing_key: &request.routing_key, mandatory: request.mandatory };
    let (confirm, confirmed) = confirm_channel();
    engine.publish_routed(&caller, route, message, confirm)?;
    let (message_id, routed) = published(confirmed).await?;
    Ok((StatusCode::CREATED, Json(json!({"message_id": message_id.to_string(), "routed": routed}))))
}
