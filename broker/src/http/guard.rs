//! The guard in front of every HTTP route: it keeps web pages the operator happens to visit
//! from driving the API.
//!
//! A page on another site can make the browser send "simple" requests (an HTML form, `fetch`
//! with `no-cors`) to `127.0.0.1:15680` without asking anyone, and with DNS rebinding it can
//! even read the answers under a name of its own. Three checks, in this order, stop both:
//!
//! 1. `Host` must be an IP literal, `localhost` or a name given with `--http-allow-host`: a
//!    rebound attacker's name is none of these.
//! 2. `Origin`, when present, must be the listener's own (`http://` + `Host`, or `https://` +
//!    `Host` with `--http-tls`) or one given with `--http-allow-origin`; `null` is foreign.
//! 3. A request that changes state (any method but GET, HEAD and OPTIONS) must carry
//!    `Content-Type: application/json`, or, without a body, `X-Hopper-Request` (any non-empty
//!    value; the docs say `1`). Browsers send neither cross-site without a CORS preflight, and
//!    Hopper never approves one: it sends no CORS headers at all.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::allow::{Allowed, Host, Origin, Scheme};
use super::ApiError;

/// The header that marks a request without a body as sent by a program, not a web page.
const REQUEST_HEADER: &str = "x-hopper-request";
/// Longest piece of a header value repeated in an error message.
const SHOWN_CHARS: usize = 100;

/// Answers the request with an error unless [`check`] lets it through; the state is the allow
/// lists and the scheme the listener speaks.
pub(super) async fn guard(
    State((allowed, scheme)): State<(Arc<Allowed>, Scheme)>,
    request: Request,
    next: Next,
) -> Response {
    let authority = request.uri().authority().map(|a| a.as_str());
    match check(&allowed, scheme, request.method(), request.uri().path(), request.headers(), authority) {
        Ok(()) => next.run(request).await,
        Err(refused) => {
            let path = request.uri().path();
            let method = request.method();
            tracing::debug!(%method, path, reason = %refused.message, "http request refused");
            refused.into_response()
        }
    }
}

/// The three checks of the module documentation, for a listener speaking `scheme`.
/// `uri_authority` is the `host:port` of an absolute request target, used when there is no
/// `Host` header.
pub(super) fn check(
    allowed: &Allowed,
    scheme: Scheme,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    uri_authority: Option<&str>,
) -> Result<(), ApiError> {
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let host = check_host(allowed, headers, uri_authority, safe && is_monitoring(path))?;
    check_origin(allowed, headers, host.map(|host| host.origin(scheme)))?;
    if !safe {
        check_intent(headers)?;
    }
    Ok(())
}

/// Health checks and Prometheus scrapes: read-only, and answered even without a `Host` (an
/// HTTP/1.0 probe), since only browsers are the threat and browsers always send one.
fn is_monitoring(path: &str) -> bool {
    path == "/metrics" || path == "/health/live" || path == "/health/ready"
}

/// The request's host when it is allowed; `None` when it gives none and `hostless` allows that.
fn check_host(
    allowed: &Allowed,
    headers: &HeaderMap,
    uri_authority: Option<&str>,
    hostless: bool,
) -> Result<Option<Host>, ApiError> {
    let mut values = headers.get_all(header::HOST).iter();
    let text = match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().unwrap_or_default(),
        (Some(_), Some(_)) => return Err(refused("the request has more than one Host header")),
        (None, _) => match uri_authority {
            Some(host) => host,
            None if hostless => return Ok(None),
            None => {
                return Err(ApiError::bad_request(
                    "the request has no Host header; send one (HTTP/1.1 requires it): \
                     only /health/live, /health/ready and /metrics answer without it",
                ))
            }
        },
    };
    match Host::parse(text) {
        Some(host) if allowed.host(&host) => Ok(Some(host)),
        Some(host) => Err(refused(format!(
            "Host '{}' is not a name this broker answers to: it answers to IP addresses, localhost \
             and the names given with --http-allow-host (this refusal defeats DNS rebinding); if \
             clients reach it by this name, start hopperd with --http-allow-host {}",
            shown(text),
            host.name
        ))),
        None => Err(refused(format!("Host '{}' is not a valid host[:port]", shown(text)))),
    }
}

/// Refuses an `Origin` other than the listener's `own` (its scheme and the request's `Host`)
/// and the listed ones. No `Origin` at all is fine: programs do not send one.
fn check_origin(allowed: &Allowed, headers: &HeaderMap, own: Option<Origin>) -> Result<(), ApiError> {
    let mut values = headers.get_all(header::ORIGIN).iter();
    let text = match (values.next(), values.next()) {
        (None, _) => return Ok(()),
        (Some(value), None) => value.to_str().unwrap_or_default(),
        (Some(_), Some(_)) => return Err(refused("the request has more than one Origin header")),
    };
    match Origin::parse(text) {
        Some(origin) if allowed.origin(&origin, own.as_ref()) => Ok(()),
        Some(origin) => {
            let own = own.map_or_else(String::new, |own| format!(" ({own})"));
            Err(refused(format!(
                "Origin '{}' is not allowed: the API takes requests from web pages only from this \
                 listener's own origin{own} and the origins given with --http-allow-origin; if \
                 pages of that site should use it, start hopperd with --http-allow-origin {origin}",
                shown(text)
            )))
        }
        None => Err(refused(format!(
            "Origin '{}' is not allowed: a page with no origin of its own (sandboxed, a file, a \
             redirect) may not use the API",
            shown(text)
        ))),
    }
}

/// Refuses a state-changing request that a cross-site page could have sent without a preflight:
/// one without a JSON content type, unless it has no body and carries [`REQUEST_HEADER`].
fn check_intent(headers: &HeaderMap) -> Result<(), ApiError> {
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    match (types.next(), types.next()) {
        (Some(value), None) if is_json(value) => return Ok(()),
        (Some(value), None) => {
            return Err(unsupported(&format!(
                "it had 'Content-Type: {}'",
                shown(value.to_str().unwrap_or("?"))
            )))
        }
        (Some(_), Some(_)) => return Err(unsupported("it had more than one Content-Type")),
        (None, _) => {}
    }
    if has_body(headers) {
        return Err(unsupported("it had no Content-Type"));
    }
    let marked = headers.get(REQUEST_HEADER).is_some_and(|value| !value.as_bytes().trim_ascii().is_empty());
    if marked {
        return Ok(());
    }
    Err(refused(
        "a request that changes state must show it comes from a program, not a web page: \
         add the header 'X-Hopper-Request: 1' (curl -H 'X-Hopper-Request: 1'), or send a \
         JSON body with 'Content-Type: application/json'",
    ))
}

/// `application/json`, in any case, with or without parameters such as `; charset=utf-8`.
fn is_json(value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else { return false };
    text.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json")
}

/// True when the request announces a body: a non-zero `Content-Length`, or any
/// `Transfer-Encoding`.
fn has_body(headers: &HeaderMap) -> bool {
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
    headers.contains_key(header::TRANSFER_ENCODING) || length.is_some_and(|v| v.trim() != "0")
}

/// 403: a request the listener will not serve, and why.
fn refused(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "NOT_ALLOWED", message)
}

/// 415: a state-changing request whose body is not declared as JSON.
fn unsupported(what_it_had: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "INVALID_ARGUMENT",
        format!(
            "a request that changes state must send its body as JSON with the header \
             'Content-Type: application/json' ({what_it_had}); a request without a body may send \
             'X-Hopper-Request: 1' instead"
        ),
    )
}

/// A header value as an error message repeats it: at most [`SHOWN_CHARS`] characters.
fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: &str = "127.0.0.1:15680";

    fn allowed() -> Allowed {
        Allowed::new(&["hopper.internal".to_owned()], &["https://ops.example.com".to_owned()]).unwrap()
    }

    fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    /// What `check` answers: `Ok` when it lets the request through, else the refusal.
    fn checked(method: &str, path: &str, headers: &[(&str, &str)]) -> Result<(), ApiError> {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        check(&allowed(), Scheme::Http, &method, path, &header_map(headers), None)
    }

    /// The status `check` answers (200 when it lets the request through).
    fn status(method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
        checked(method, path, headers).map_or_else(|refused| refused.status.as_u16(), |()| 200)
    }

    #[test]
    fn reads_need_only_an_allowed_host() {
        for host in [ADDR, "[::1]:15680", "localhost", "hopper.internal:8080", "HOPPER.INTERNAL"] {
            assert_eq!(status("GET", "/api/queues", &[("host", host)]), 200, "{host}");
        }
        for host in ["evil.example", "evil.example:15680", "127.0.0.1.evil.example", "", "a b"] {
            assert_eq!(status("GET", "/api/queues", &[("host", host)]), 403, "{host:?}");
            assert_eq!(status("GET", "/metrics", &[("host", host)]), 403, "{host:?}");
        }
        assert_eq!(status("GET", "/", &[("host", ADDR), ("host", "evil.example")]), 403);
    }

    #[test]
    fn only_monitoring_reads_go_without_a_host() {
        for path in ["/metrics", "/health/live", "/health/ready"] {
            assert_eq!(status("GET", path, &[]), 200, "{path}");
            assert_eq!(status("HEAD", path, &[]), 200, "{path}");
        }
        assert_eq!(status("GET", "/api/queues", &[]), 400);
        assert_eq!(status("GET", "/", &[]), 400);
        assert_eq!(status("POST", "/metrics", &[("x-hopper-request", "1")]), 400);
        let map = header_map(&[(REQUEST_HEADER, "1")]);
        // An absolute request target stands in for a missing Host.
        let absolute =
            check(&allowed(), Scheme::Http, &Method::DELETE, "/api/queues/q", &map, Some("evil.example:80"));
        assert_eq!(absolute.map_err(|e| e.status), Err(StatusCode::FORBIDDEN));
        assert!(check(&allowed(), Scheme::Http, &Method::DELETE, "/api/queues/q", &map, Some(ADDR)).is_ok());
    }

    #[test]
    fn foreign_origins_are_refused_on_every_method() {
        let host = ("host", ADDR);
        let json = ("content-type", "application/json");
        for own in ["http://127.0.0.1:15680", "https://ops.example.com"] {
            assert_eq!(
                status("POST", "/api/queues/q/messages", &[host, json, ("origin", own)]),
                200,
                "{own}"
            );
        }
        for foreign in
            ["http://evil.example", "null", "http://127.0.0.1:8080", "https://127.0.0.1:15680", "x"]
        {
            let origin = ("origin", foreign);
            assert_eq!(status("POST", "/api/queues/q/messages", &[host, json, origin]), 403, "{foreign}");
            assert_eq!(status("GET", "/api/queues", &[host, origin]), 403, "{foreign}");
            assert_eq!(status("OPTIONS", "/api/queues", &[host, origin]), 403, "{foreign}");
        }
        let two = [host, json, ("origin", "http://127.0.0.1:15680"), ("origin", "http://127.0.0.1:15680")];
        assert_eq!(status("POST", "/api/queues/q/messages", &two), 403);
        // The own origin follows the Host the request came by.
        let named = [("host", "hopper.internal"), json, ("origin", "http://hopper.internal")];
        assert_eq!(status("PUT", "/api/queues/q", &named), 200);
    }

    #[test]
    fn over_https_the_own_origin_is_https() {
        let https = |origin: &str| {
            let headers =
                header_map(&[("host", ADDR), ("content-type", "application/json"), ("origin", origin)]);
            let checked =
                check(&allowed(), Scheme::Https, &Method::POST, "/api/queues/q/messages", &headers, None);
            checked.map_or_else(|refused| refused.status.as_u16(), |()| 200)
        };
        assert_eq!(https("https://127.0.0.1:15680"), 200);
        assert_eq!(https("https://ops.example.com"), 200, "the listed origins still are");
        for foreign in ["http://127.0.0.1:15680", "https://127.0.0.1", "https://127.0.0.1:8443"] {
            assert_eq!(https(foreign), 403, "{foreign}");
        }
        let headers = header_map(&[("host", "hopper.internal"), ("origin", "http://hopper.internal")]);
        let refused = check(&allowed(), Scheme::Https, &Method::GET, "/", &headers, None).unwrap_err();
        assert!(refused.message.contains("(https://hopper.internal)"), "{}", refused.message);
    }

    #[test]
    fn state_changes_need_json_or_the_request_header() {
        let host = ("host", ADDR);
        for json in ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"]
        {
            let with_body = [host, ("content-type", json), ("content-length", "2")];
            assert_eq!(status("POST", "/api/queues/q/messages", &with_body), 200, "{json}");
        }
        for other in [
            "application/x-www-form-urlencoded",
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/jsonx",
            "application/vnd.api+json",
        ] {
            let with_body = [host, ("content-type", other), ("content-length", "2")];
            assert_eq!(status("POST", "/api/queues/q/messages", &with_body), 415, "{other}");
            let marked = [host, ("content-type", other), ("x-hopper-request", "1")];
            assert_eq!(status("DELETE", "/api/queues/q", &marked), 415, "{other}");
        }
        assert_eq!(status("POST", "/api/queues/q/messages", &[host, ("content-length", "2")]), 415);
        let chunked = [host, ("transfer-encoding", "chunked"), ("x-hopper-request", "1")];
        assert_eq!(status("POST", "/api/queues/q/messages", &chunked), 415);
        for bodiless in [&[host][..], &[host, ("content-length", "0")], &[host, ("x-hopper-request", " ")]] {
            assert_eq!(status("DELETE", "/api/queues/q", bodiless), 403, "{bodiless:?}");
        }
        for marked in [
            &[host, ("x-hopper-request", "1")][..],
            &[host, ("X-Hopper-Request", "yes"), ("content-length", "0")],
        ] {
            assert_eq!(status("DELETE", "/api/queues/q", marked), 200, "{marked:?}");
            assert_eq!(status("PATCH", "/api/queues/q", marked), 200, "{marked:?}");
        }
        for safe in ["GET", "HEAD", "OPTIONS"] {
            assert_eq!(status(safe, "/api/queues", &[host, ("content-type", "text/plain")]), 200, "{safe}");
        }
    }

    #[test]
    fn refusals_tell_what_to_add() {
        let message = |method: &str, headers: &[(&str, &str)]| {
            checked(method, "/api/queues/q", headers).unwrap_err().message
        };
        let host = ("host", ADDR);
        let text = message("POST", &[host, ("content-type", "application/x-www-form-urlencoded")]);
        assert!(text.contains("Content-Type: application/json") && text.contains("x-www-form"), "{text}");
        let text = message("DELETE", &[host]);
        assert!(text.contains("X-Hopper-Request: 1"), "{text}");
        let text = message("GET", &[("host", "Evil.Example:15680")]);
        assert!(text.contains("--http-allow-host evil.example"), "{text}");
        let text = message("GET", &[host, ("origin", "http://evil.example:8080")]);
        assert!(text.contains("--http-allow-origin http://evil.example:8080"), "{text}");
        assert!(text.contains("(http://127.0.0.1:15680)"), "{text}");
        let long = "a".repeat(1000);
        let text = message("GET", &[("host", &long)]);
        assert!(text.len() < 700, "{text}");
    }
}
