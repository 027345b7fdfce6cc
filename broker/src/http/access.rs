//! `/api/whoami` and `/api/tokens`: who a request acts as, and the API tokens of that user.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::ApiJson;
use super::ApiError;
use crate::engine::{Caller, Engine};

/// The request's user, its tags and permissions.
pub(super) async fn whoami(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
) -> Result<Json<Value>, ApiError> {
    let user = engine.whoami(&caller)?;
    let p = user.permissions;
    Ok(Json(json!({
        "name": user.name,
        "tags": user.tags,
        "configure": p.configure,
        "write": p.write,
        "read": p.read,
    })))
}

/// `POST /api/tokens`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct NewToken {
    name: String,
    /// Lifetime from now, seconds or a duration string ("720h"); absent = until deleted.
    expires_in: Option<Value>,
}

/// Creates a token for the request's user; the answer holds it, this once.
pub(super) async fn create_token(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    ApiJson(body): ApiJson<NewToken>,
) -> Result<impl IntoResponse, ApiError> {
    let lifetime = super::api::duration_ms(&body.expires_in, "expires_in")?;
    if lifetime > crate::auth::MAX_TOKEN_LIFETIME_MS {
        return Err(ApiError::bad_request("expires_in is longer than ten years"));
    }
    if body.expires_in.is_some() && lifetime == 0 {
        return Err(ApiError::bad_request("expires_in must be more than zero (leave it out for no expiry)"));
    }
    let expires_ms = match lifetime {
        0 => 0,
        after => crate::queue::now_ms().saturating_add(after),
    };
    let token = engine.create_token(&caller, body.name.clone(), expires_ms).await?;
    Ok((StatusCode::CREATED, Json(json!({"name": body.name, "token": token, "expires_ms": expires_ms}))))
}

/// The request's user's tokens (names and times, never the tokens).
pub(super) async fn list_tokens(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
) -> Result<Json<Value>, ApiError> {
    let tokens = engine.list_tokens(&caller)?;
    let tokens: Vec<Value> = tokens
        .into_iter()
        .map(|t| json!({"name": t.name, "created_ms": t.created_ms, "expires_ms": t.expires_ms}))
        .collect();
    Ok(Json(Value::Array(tokens)))
}

/// Deletes one of the request's user's tokens.
pub(super) async fn delete_token(
    Extension(caller): Extension<Caller>,
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    engine.delete_token(&caller, name).await?;
    Ok(StatusCode::NO_CONTENT)
}
