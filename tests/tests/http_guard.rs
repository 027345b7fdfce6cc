//! What keeps a web page the operator visits from driving the HTTP API: requests a browser
//! sends cross-site without a preflight (forms, `no-cors` fetches) are refused and change
//! nothing, foreign `Origin`s and `Host`s (DNS rebinding) are refused, and no CORS approval is
//! ever given.

use hopper_tests::{command, run, Broker, Http, HttpResponse, REQUEST_HEADER};
use serde_json::json;

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");
const TEXT: (&str, &str) = ("Content-Type", "text/plain");
const JSON: (&str, &str) = ("Content-Type", "application/json");
const EVIL: (&str, &str) = ("Origin", "http://evil.example");

/// The broker's queue `q` holding one message, "kept".
async fn one_message(broker: &Broker) -> Http {
    let http = Http::of(broker);
    http.declare("q", json!({})).await;
    http.publish("q", "kept").await;
    http
}

/// Fails unless `q` still holds exactly "kept", and `q2` was never declared.
async fn unchanged(http: Http) {
    let info = http.queue("q").await;
    assert_eq!((info["ready"].clone(), info["published"].clone()), (json!(1), json!(1)), "{info}");
    let peeked = http.get_json("/api/queues/q/peek").await;
    assert_eq!(peeked["messages"][0]["body"], "kept", "{peeked}");
    http.get("/api/queues/q2").await.assert_error(404, "NOT_FOUND");
    assert_eq!(http.get_json("/api/moves").await, json!([]));
}

/// Fails unless no response header is a CORS approval.
fn assert_no_cors(response: &HttpResponse) {
    let cors = response.headers.iter().find(|(name, _)| name.starts_with("access-control-"));
    assert!(cors.is_none(), "a CORS header:\n{response}");
}

#[tokio::test]
async fn cross_site_form_posts_are_refused_and_change_nothing() {
    let broker = Broker::start();
    let http = one_message(&broker).await;
    let host = http.host();
    let host = ("Host", host.as_str());
    // What an HTML form on another site sends: every state-changing route, a form body.
    for (path, body) in
        [("/api/queues/q/messages", "body=forged"), ("/api/queues/q/move", "to=q2"), ("/api/queues/q2", "")]
    {
        let method = if path == "/api/queues/q2" { "PUT" } else { "POST" };
        let with_origin = http.request_with(method, path, &[host, FORM, EVIL], Some(body.as_bytes())).await;
        let message = with_origin.assert_error(403, "NOT_ALLOWED");
        assert!(message.contains("--http-allow-origin"), "{message}");
        assert_no_cors(&with_origin);
        // A browser that sends no Origin (an old one, or a form behind a redirect).
        let without = http.request_with(method, path, &[host, FORM], Some(body.as_bytes())).await;
        let message = without.assert_error(415, "INVALID_ARGUMENT");
        assert!(message.contains("'Content-Type: application/json'"), "{message}");
    }
    // A form cannot send DELETE; a fetch without a body and no header stands for one that could.
    let purge = http.request_with("DELETE", "/api/queues/q/messages", &[host, EVIL], None).await;
    purge.assert_error(403, "NOT_ALLOWED");
    unchanged(http).await;
}

#[tokio::test]
async fn text_plain_post_without_origin_is_refused() {
    let broker = Broker::start();
    let http = one_message(&broker).await;
    let host = http.host();
    // A `enctype="text/plain"` form can shape its body as JSON; its type gives it away.
    let body = br#"{"body": "forged", "x": "="}"#;
    let response =
        http.request_with("POST", "/api/queues/q/messages", &[("Host", &host), TEXT], Some(body)).await;
    let message = response.assert_error(415, "INVALID_ARGUMENT");
    assert!(
        message.contains("'Content-Type: application/json'") && message.contains("text/plain"),
        "{message}"
    );
    // A body-less POST with no type at all, as `fetch(url, {method: "POST", mode: "no-cors"})`.
    let response = http.request_with("POST", "/api/queues/q/move", &[("Host", &host)], None).await;
    let message = response.assert_error(403, "NOT_ALLOWED");
    assert!(message.contains("'X-Hopper-Request: 1'"), "{message}");
    unchanged(http).await;
}

#[tokio::test]
async fn foreign_origins_are_refused_even_with_json() {
    let broker = Broker::start();
    let http = one_message(&broker).await;
    let host = http.host();
    let body = json!({"body": "forged"}).to_string();
    for origin in ["http://evil.example", "null", &format!("https://{host}"), "http://127.0.0.1:1"] {
        let headers = [("Host", host.as_str()), JSON, ("Origin", origin)];
        let response =
            http.request_with("POST", "/api/queues/q/messages", &headers, Some(body.as_bytes())).await;
        response.assert_error(403, "NOT_ALLOWED");
        // Reads of the API are refused too: a rebinding page could otherwise read them.
        let read = http
            .request_with("GET", "/api/queues", &[("Host", host.as_str()), ("Origin", origin)], None)
            .await;
        read.assert_error(403, "NOT_ALLOWED");
        assert_no_cors(&read);
    }
    unchanged(http).await;
}

#[tokio::test]
async fn same_origin_json_requests_work() {
    let broker = Broker::start();
    let http = one_message(&broker).await;
    let host = http.host();
    let own = format!("http://{host}");
    let headers =
        [("Host", host.as_str()), ("Content-Type", "application/json; charset=utf-8"), ("Origin", &own)];
    let body = json!({"body": "from the dashboard"}).to_string();
    let response = http.request_with("POST", "/api/queues/q/messages", &headers, Some(body.as_bytes())).await;
    response.assert_status(201);
    assert_no_cors(&response);
    let listed = http.request_with("GET", "/api/queues", &[("Host", &host), ("Origin", &own)], None).await;
    listed.assert_status(200);
    assert_eq!(http.queue("q").await["ready"], 2);
}

#[tokio::test]
async fn unknown_host_names_are_refused_and_allowed_ones_work() {
    let broker =
        Broker::start_with(&["--http-allow-host", "Hopper.Internal", "--http-allow-host", "other.internal"]);
    let http = one_message(&broker).await;
    let port = broker.http_addr().port();
    // An attacker's name resolving to the broker (DNS rebinding) is refused on every path.
    let evil = format!("evil.example:{port}");
    for path in ["/api/queues", "/metrics", "/", "/health/ready", "/nowhere"] {
        let response = http.request_with("GET", path, &[("Host", &evil)], None).await;
        let message = response.assert_error(403, "NOT_ALLOWED");
        assert!(message.contains("--http-allow-host evil.example"), "{message}");
    }
    let body = json!({"body": "forged"}).to_string();
    let forged = [("Host", evil.as_str()), JSON, ("Origin", "http://evil.example")];
    let response = http.request_with("POST", "/api/queues/q/messages", &forged, Some(body.as_bytes())).await;
    response.assert_error(403, "NOT_ALLOWED");
    unchanged(http).await;

    // Listed names work in any case and on any port, and are their own origin.
    for name in [format!("hopper.internal:{port}"), "HOPPER.INTERNAL".into(), "other.internal:8080".into()] {
        let response = http.request_with("GET", "/api/queues", &[("Host", &name)], None).await;
        assert_eq!(response.assert_status(200).json()[0]["name"], "q");
    }
    let own = format!("http://hopper.internal:{port}");
    let named = [("Host", &format!("hopper.internal:{port}")[..]), JSON, ("Origin", &own)];
    let body = json!({"body": "by name"}).to_string();
    http.request_with("POST", "/api/queues/q/messages", &named, Some(body.as_bytes()))
        .await
        .assert_status(201);
    assert_eq!(http.queue("q").await["ready"], 2);
}

#[tokio::test]
async fn bodiless_state_changes_need_the_request_header() {
    let broker = Broker::start();
    let http = one_message(&broker).await;
    let host = http.host();
    let refused = http.request_with("DELETE", "/api/queues/q/messages", &[("Host", &host)], None).await;
    let message = refused.assert_error(403, "NOT_ALLOWED");
    assert!(message.contains("'X-Hopper-Request: 1'"), "{message}");
    let refused = http.request_with("DELETE", "/api/queues/q", &[("Host", &host)], None).await;
    refused.assert_error(403, "NOT_ALLOWED");
    unchanged(http).await;

    let marked = [("Host", host.as_str()), REQUEST_HEADER];
    let purged = http.request_with("DELETE", "/api/queues/q/messages", &marked, None).await;
    assert_eq!(purged.assert_status(200).json(), json!({"purged": 1}));
    // Any non-empty value does.
    let deleted = http
        .request_with("DELETE", "/api/queues/q", &[("Host", &host), ("X-Hopper-Request", "yes")], None)
        .await;
    assert_eq!(deleted.assert_status(200).json(), json!({"deleted": "q", "messages": 0}));
}

#[tokio::test]
async fn listed_origins_are_admitted() {
    let broker = Broker::start_with(&["--http-allow-origin", "https://ops.example.com"]);
    let http = one_message(&broker).await;
    let host = http.host();
    let body = json!({"body": "from ops"}).to_string();
    let listed = [("Host", host.as_str()), JSON, ("Origin", "https://ops.example.com")];
    http.request_with("POST", "/api/queues/q/messages", &listed, Some(body.as_bytes()))
        .await
        .assert_status(201);
    let other = [("Host", host.as_str()), JSON, ("Origin", "https://other.example.com")];
    let response = http.request_with("POST", "/api/queues/q/messages", &other, Some(body.as_bytes())).await;
    response.assert_error(403, "NOT_ALLOWED");
    assert_eq!(http.queue("q").await["ready"], 2);
}

#[tokio::test]
async fn preflights_get_no_cors_approval() {
    let broker = Broker::start_with(&["--http-allow-origin", "https://ops.example.com"]);
    let http = one_message(&broker).await;
    let host = http.host();
    let own = format!("http://{host}");
    for origin in ["http://evil.example", "https://ops.example.com", own.as_str()] {
        let preflight = [
            ("Host", host.as_str()),
            ("Origin", origin),
            ("Access-Control-Request-Method", "DELETE"),
            ("Access-Control-Request-Headers", "x-hopper-request"),
        ];
        let response = http.request_with("OPTIONS", "/api/queues/q/messages", &preflight, None).await;
        assert!(response.status >= 400, "a preflight is not approved:\n{response}");
        assert_no_cors(&response);
    }
    for response in [http.get("/api/queues").await, http.get("/").await, http.get("/metrics").await] {
        assert_no_cors(&response);
    }
    unchanged(http).await;
}

#[tokio::test]
async fn only_monitoring_answers_without_a_host() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    for path in ["/metrics", "/health/live", "/health/ready"] {
        http.request_with("GET", path, &[], None).await.assert_status(200);
    }
    let message =
        http.request_with("GET", "/api/queues", &[], None).await.assert_error(400, "INVALID_ARGUMENT");
    assert!(message.contains("Host"), "{message}");
    let purge = http.request_with("DELETE", "/api/queues/q/messages", &[REQUEST_HEADER], None).await;
    purge.assert_error(400, "INVALID_ARGUMENT");
}

#[tokio::test]
async fn bad_allow_lists_are_a_one_line_startup_error() {
    for (flag, value) in [
        ("--http-allow-origin", "null"),
        ("--http-allow-origin", "ops.example.com"),
        ("--http-allow-host", "hopper.internal:15680"),
    ] {
        let data_dir = tempfile::tempdir().unwrap();
        let mut hopperd = command("hopperd");
        hopperd.arg("--data-dir").arg(data_dir.path()).args([
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ]);
        hopperd.args([flag, value]);
        let output = run(hopperd).await;
        assert_eq!(output.status.code(), Some(1), "{flag} {value}: {output}");
        let lines: Vec<&str> = output.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{output}");
        assert!(lines[0].starts_with("hopperd: error: ") && lines[0].contains(value), "{output}");
    }
}
