//! The HTTP listener: Prometheus metrics, a JSON API for producers and consumers that do not
//! speak the binary protocol, health checks and the live dashboard. It shares the broker's state
//! (same queues, same flow control), it is not a second process. Every request first passes
//! the [`guard`], which keeps web pages the operator visits from driving the API. With
//! `http_tls` the same router is served over TLS ([`https`]).

mod access;
pub(crate) mod allow;
mod api;
mod exchanges;
mod guard;
mod https;
mod login;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::engine::Engine;
use crate::error::BrokerError;
use allow::{Allowed, Scheme};

/// The dashboard page, with its script and styles inline: nothing is fetched from elsewhere.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Serves HTTP on `listener` until `shutdown` turns true; HTTPS when given the `tls` acceptor.
/// Either way, open connections finish their requests at shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    engine: Arc<Engine>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let served = match tls {
        None => {
            let app = router(engine, Scheme::Http).into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, app).with_graceful_shutdown(stop).await
        }
        Some(acceptor) => {
            let timeout = engine.config().handshake_timeout();
            let app = router(engine, Scheme::Https).into_make_service_with_connect_info::<SocketAddr>();
            // axum gives `ConnectInfo<SocketAddr>` for its own listeners and for a tapped one
            // whose address is a `SocketAddr`: the tap, which does nothing, is what makes the
            // peer's address reach the handlers over HTTPS as over HTTP.
            let listener = https::TlsListener::spawn(listener, acceptor, timeout).tap_io(|_| {});
            axum::serve(listener, app).with_graceful_shutdown(stop).await
        }
    };
    if let Err(err) = served {
        tracing::error!(error = %err, "http listener failed");
    }
}

/// Every route, behind the login and the [`guard`]; `scheme` is what the listener speaks,
/// which makes its own origin.
fn router(engine: Arc<Engine>, scheme: Scheme) -> Router {
    let config = engine.config();
    // Config::validate already refused bad entries; should one slip through, allowing only
    // what is always allowed fails closed.
    let allowed = Allowed::new(&config.http_allow_hosts, &config.http_allow_origins).unwrap_or_else(|err| {
        tracing::error!(error = %err, "ignoring the http allow lists");
        Allowed::default()
    });
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/metrics", get(metrics::render))
        .route("/health/live", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/health/ready", get(api::ready))
        .route("/api/status", get(api::status))
        .route("/api/queues", get(api::list_queues))
        .route("/api/queues/{name}", get(api::get_queue).put(api::declare_queue).delete(api::delete_queue))
        .route("/api/queues/{name}/alarm", put(api::set_alarm))
        .route("/api/queues/{name}/messages", post(api::publish).get(api::pull).delete(api::purge))
        .route("/api/queues/{name}/messages/{receipt}", delete(api::ack))
        .route("/api/queues/{name}/messages/{receipt}/nack", post(api::nack))
        .route("/api/queues/{name}/peek", get(api::peek))
        .route("/api/queues/{name}/move", post(api::start_move))
        .route("/api/moves", get(api::list_moves))
        .route("/api/exchanges", get(exchanges::list))
        .route("/api/exchanges/{name}", put(exchanges::declare).delete(exchanges::delete))
        .route("/api/exchanges/{name}/messages", post(exchanges::publish))
        .route("/api/bindings", get(exchanges::bindings).post(exchanges::bind).delete(exchanges::unbind))
        .route("/api/whoami", get(access::whoami))
        .route("/api/tokens", get(access::list_tokens).post(access::create_token))
        .route("/api/tokens/{name}", delete(access::delete_token))
        .layer(middleware::from_fn_with_state(engine.clone(), login::login))
        .with_state(engine)
        .layer(middleware::from_fn_with_state((Arc::new(allowed), scheme), guard::guard))
}

/// An API error: the broker's error code and message as JSON, with a fitting status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
    }
}

impl From<BrokerError> for ApiError {
    fn from(err: BrokerError) -> Self {
        let status = match err {
            BrokerError::NotFound(_) => StatusCode::NOT_FOUND,
            BrokerError::PreconditionFailed(_) => StatusCode::CONFLICT,
            BrokerError::InvalidArgument(_) | BrokerError::ProtocolViolation(_) => StatusCode::BAD_REQUEST,
            BrokerError::NotAllowed(_) | BrokerError::ServedElsewhere { .. } => StatusCode::FORBIDDEN,
            BrokerError::ResourceLimit(_) => StatusCode::SERVICE_UNAVAILABLE,
            BrokerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            BrokerError::NoRoute(_) => StatusCode::UNPROCESSABLE_ENTITY,
            BrokerError::AccessRefused(_) => StatusCode::FORBIDDEN,
            BrokerError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        };
        ApiError { status, code: err.code().as_str_name(), message: err.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        (self.status, [(header::CACHE_CONTROL, "no-store")], body).into_response()
    }
}
