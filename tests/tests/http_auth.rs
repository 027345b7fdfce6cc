//! Who an HTTP request acts as: the built-in guest from loopback while no admin exists, then
//! Basic auth or an API token on every request, checked against the same permissions as the
//! binary protocol; pull receipts only work for the user who pulled.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hopper_client::{ConnectOptions, Connection, Credentials, Permissions, QueueOptions};
use hopper_tests::{connect, Broker, Http, HttpResponse};
use serde_json::{json, Value};

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", BASE64.encode(format!("{user}:{password}")))
}

/// Sends a request as `authorization` (none when `None`), with JSON when there is a body.
async fn send(
    http: &Http,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&Value>,
) -> HttpResponse {
    let host = http.host();
    let mut headers = vec![("Host", host.as_str())];
    if let Some(value) = authorization {
        headers.push(("Authorization", value));
    }
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
    match &bytes {
        Some(_) => headers.push(("Content-Type", "application/json")),
        None if method != "GET" => headers.push(("X-Hopper-Request", "1")),
        None => {}
    }
    http.request_with(method, path, &headers, bytes.as_deref()).await
}

fn json_of(response: &HttpResponse) -> Value {
    serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.body))
}

/// A broker with admin `root` (every permission) and `app`, which may read and write `jobs`.
async fn with_users() -> (Broker, Http) {
    let broker = Broker::start();
    let guest = connect(&broker).await;
    guest.add_user("app", "app-pw", &[]).await.unwrap();
    guest.add_user("root", "root-pw", &["admin".to_string()]).await.unwrap();
    let options =
        ConnectOptions { credentials: Some(Credentials::new("root", "root-pw")), ..Default::default() };
    let root = Connection::connect_with(broker.addr(), options).await.unwrap();
    root.set_permissions("root", Permissions::all()).await.unwrap();
    let app = Permissions { configure: String::new(), write: "jobs".into(), read: "jobs".into() };
    root.set_permissions("app", app).await.unwrap();
    root.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    root.declare_queue("secret", QueueOptions::default()).await.unwrap();
    let http = Http::of(&broker);
    (broker, http)
}

#[tokio::test]
async fn without_an_admin_loopback_requests_are_the_guest() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    let me = send(&http, "GET", "/api/whoami", None, None).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(json_of(&me)["name"], "guest");
}

#[tokio::test]
async fn every_request_needs_credentials_once_an_admin_exists() {
    let (_broker, http) = with_users().await;
    for path in ["/api/queues", "/metrics", "/", "/api/whoami"] {
        let response = send(&http, "GET", path, None, None).await;
        assert_eq!(response.status, 401, "{path}: {}", response.body);
        let challenge =
            response.headers.iter().find(|(k, _)| k == "www-authenticate").map(|(_, v)| v.as_str());
        assert_eq!(challenge, Some("Basic realm=\"hopper\", charset=\"UTF-8\""), "{path}: the browser asks");
    }
    // Health checks stay open for probes.
    assert_eq!(send(&http, "GET", "/health/live", None, None).await.status, 200);

    let wrong = send(&http, "GET", "/api/queues", Some(&basic("app", "nope")), None).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(json_of(&wrong)["error"]["code"], "UNAUTHENTICATED");
    let right = send(&http, "GET", "/api/whoami", Some(&basic("app", "app-pw")), None).await;
    assert_eq!(json_of(&right)["name"], "app");
}

#[tokio::test]
async fn http_requests_get_the_users_permissions_and_refusals_change_nothing() {
    let (_broker, http) = with_users().await;
    let app = basic("app", "app-pw");
    let published =
        send(&http, "POST", "/api/queues/jobs/messages", Some(&app), Some(&json!({"body": "x"}))).await;
    assert_eq!(published.status, 201, "{}", published.body);

    let refused =
        send(&http, "POST", "/api/queues/secret/messages", Some(&app), Some(&json!({"body": "x"}))).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(json_of(&refused)["error"]["code"], "ACCESS_REFUSED");
    assert_eq!(
        json_of(&refused)["error"]["message"],
        "user 'app' may not publish to queue 'secret': no write permission on it"
    );
    let purge = send(&http, "DELETE", "/api/queues/jobs/messages", Some(&app), None).await;
    assert_eq!(purge.status, 403, "purge needs configure: {}", purge.body);

    let root = basic("root", "root-pw");
    let jobs = json_of(&send(&http, "GET", "/api/queues/jobs", Some(&root), None).await);
    let secret = json_of(&send(&http, "GET", "/api/queues/secret", Some(&root), None).await);
    assert_eq!((jobs["ready"].as_u64(), secret["ready"].as_u64()), (Some(1), Some(0)));
}

#[tokio::test]
async fn tokens_act_as_their_user_until_deleted_or_expired() {
    let (_broker, http) = with_users().await;
    let app = basic("app", "app-pw");
    let created = send(&http, "POST", "/api/tokens", Some(&app), Some(&json!({"name": "ci"}))).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let token = json_of(&created)["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("hopper_"), "{token}");
    let bearer = format!("Bearer {token}");

    let me = send(&http, "GET", "/api/whoami", Some(&bearer), None).await;
    assert_eq!(json_of(&me)["name"], "app");
    let refused =
        send(&http, "POST", "/api/queues/secret/messages", Some(&bearer), Some(&json!({"body": "x"}))).await;
    assert_eq!(refused.status, 403, "a token has its user's permissions, no more");

    let listed = json_of(&send(&http, "GET", "/api/tokens", Some(&app), None).await);
    assert_eq!(listed[0]["name"], "ci");
    assert!(!listed.to_string().contains(&token), "the token is shown once");

    assert_eq!(send(&http, "DELETE", "/api/tokens/ci", Some(&app), None).await.status, 204);
    assert_eq!(send(&http, "GET", "/api/whoami", Some(&bearer), None).await.status, 401, "deleted");

    let short =
        send(&http, "POST", "/api/tokens", Some(&app), Some(&json!({"name": "short", "expires_in": "1s"})))
            .await;
    let short = json_of(&short);
    let expires_ms = short["expires_ms"].as_u64().expect("an expiry");
    let short = short["token"].as_str().unwrap().to_string();
    assert_eq!(send(&http, "GET", "/api/whoami", Some(&format!("Bearer {short}")), None).await.status, 200);
    hopper_tests::eventually("the token to expire", hopper_tests::DEADLINE, || async {
        hopper_tests::unix_ms() > expires_ms
    })
    .await;
    assert_eq!(send(&http, "GET", "/api/whoami", Some(&format!("Bearer {short}")), None).await.status, 401);
    assert_eq!(send(&http, "GET", "/api/whoami", Some("Bearer hopper_made_up"), None).await.status, 401);
}

#[tokio::test]
async fn a_pull_receipt_works_only_for_the_user_who_pulled() {
    let (_broker, http) = with_users().await;
    let root = basic("root", "root-pw");
    let app = basic("app", "app-pw");
    send(&http, "POST", "/api/queues/jobs/messages", Some(&app), Some(&json!({"body": "x"}))).await;
    let pulled = send(&http, "GET", "/api/queues/jobs/messages?count=1", Some(&app), None).await;
    let receipt = json_of(&pulled)["messages"][0]["receipt"].as_str().expect("a receipt").to_string();

    let path = format!("/api/queues/jobs/messages/{receipt}");
    let stolen = send(&http, "DELETE", &path, Some(&root), None).await;
    assert_eq!(stolen.status, 404, "another user's ack: {}", stolen.body);
    assert_eq!(send(&http, "DELETE", &path, Some(&app), None).await.status, 204);
}

#[tokio::test]
async fn every_http_operation_is_refused_without_its_permission_and_changes_nothing() {
    let (_broker, http) = with_users().await;
    let root = basic("root", "root-pw");
    send(&http, "PUT", "/api/exchanges/events", Some(&root), Some(&json!({"type": "fanout"}))).await;
    send(&http, "POST", "/api/queues/secret/messages", Some(&root), Some(&json!({"body": "classified"})))
        .await;

    let operations: Vec<(&str, &str, Option<Value>)> = vec![
        ("PUT", "/api/queues/new", Some(json!({}))),
        ("DELETE", "/api/queues/secret", None),
        ("DELETE", "/api/queues/secret/messages", None),
        ("PUT", "/api/queues/secret/alarm", Some(json!({"depth": 5}))),
        ("POST", "/api/queues/secret/messages", Some(json!({"body": "x"}))),
        ("GET", "/api/queues/secret/messages", None),
        ("GET", "/api/queues/secret/peek", None),
        ("POST", "/api/queues/secret/move", Some(json!({"to": "jobs"}))),
        ("PUT", "/api/exchanges/mine", Some(json!({"type": "fanout"}))),
        ("DELETE", "/api/exchanges/events", None),
        ("POST", "/api/exchanges/events/messages", Some(json!({"routing_key": "", "body": "x"}))),
        ("POST", "/api/bindings", Some(json!({"source": "events", "destination": "secret"}))),
    ];
    let app = basic("app", "app-pw");
    let wrong = basic("app", "wrong");
    for (method, path, body) in &operations {
        let refused = send(&http, method, path, Some(&app), body.as_ref()).await;
        assert_eq!(refused.status, 403, "{method} {path}: {}", refused.body);
        assert_eq!(json_of(&refused)["error"]["code"], "ACCESS_REFUSED", "{method} {path}");
        assert_eq!(
            send(&http, method, path, Some(&wrong), body.as_ref()).await.status,
            401,
            "{method} {path}"
        );
        assert_eq!(send(&http, method, path, None, body.as_ref()).await.status, 401, "{method} {path}");
    }

    let secret = json_of(&send(&http, "GET", "/api/queues/secret", Some(&root), None).await);
    assert_eq!(secret["ready"].as_u64(), Some(1));
    assert!(secret["alarm_depth"].as_u64().unwrap_or(0) == 0, "no alarm was set: {secret}");
    assert_eq!(send(&http, "GET", "/api/queues/new", Some(&root), None).await.status, 404);
    let exchanges = send(&http, "GET", "/api/exchanges", Some(&root), None).await.body;
    assert!(exchanges.contains("\"events\"") && !exchanges.contains("\"mine\""), "{exchanges}");
    let bindings = send(&http, "GET", "/api/bindings?exchange=events", Some(&root), None).await.body;
    assert_eq!(bindings.trim(), "[]");
}
