//! Who an HTTP request comes from. Every request but the health checks names its user: with
//! Basic auth (`Authorization: Basic base64(user:password)`) or a token
//! (`Authorization: Bearer TOKEN`, made with `hopper user token create`). While no user is
//! tagged admin, a request from loopback without credentials acts as the built-in guest, as on
//! the binary protocol. Otherwise the answer is 401 with `WWW-Authenticate: Basic`, which makes
//! a browser ask for a user and password, so the dashboard needs nothing of its own.
//!
//! The request then carries a [`Caller`] for its user, and the engine checks that user's
//! permissions like any connection's.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use super::ApiError;
use crate::engine::{Caller, Engine};
use crate::error::BrokerError;

/// Finds the request's user and lets it through with its [`Caller`], or answers 401.
pub(super) async fn login(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if path == "/health/live" || path == "/health/ready" {
        return next.run(request).await;
    }
    let authorization = request.headers().get(header::AUTHORIZATION).map(|v| v.to_str().map(str::to_owned));
    let user = match authorization {
        None => engine.users().anonymous(peer.ip()).map(|account| account.name.clone()),
        Some(Err(_)) => Err(BrokerError::Unauthenticated("the Authorization header is not ASCII".into())),
        Some(Ok(value)) => credentials(&engine, &value, peer).await,
    };
    match user {
        Ok(user) => {
            request.extensions_mut().insert(Caller::detached(&user));
            next.run(request).await
        }
        Err(err) => challenge(err),
    }
}

/// The user named by an `Authorization` header's value.
async fn credentials(engine: &Engine, value: &str, peer: SocketAddr) -> Result<String, BrokerError> {
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded =
            BASE64.decode(rest).ok().and_then(|bytes| String::from_utf8(bytes).ok()).ok_or_else(|| {
                BrokerError::Unauthenticated(
                    "Basic credentials must be base64 of user:password in UTF-8".into(),
                )
            })?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| BrokerError::Unauthenticated("Basic credentials must be user:password".into()))?;
        let account = engine.users().check_password(user, password, peer.ip()).await?;
        return Ok(account.name.clone());
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return engine.users().check_token(rest, peer.ip()).await.map(|account| account.name.clone());
    }
    Err(BrokerError::Unauthenticated(format!("unknown Authorization scheme '{scheme}'; use Basic or Bearer")))
}

/// 401 with the reason, asking for Basic credentials.
fn challenge(err: BrokerError) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", err.to_string()).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"hopper\", charset=\"UTF-8\""),
    );
    response
}
