//! Exchanges and bindings over the HTTP API, and their metrics.

use hopper_tests::{Broker, Http};
use serde_json::json;

#[tokio::test]
async fn exchanges_are_declared_bound_published_to_and_measured_over_http() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    for queue in ["a", "b"] {
        http.declare(queue, json!({})).await;
    }
    let created = http.put_json("/api/exchanges/events", &json!({"type": "fanout"})).await;
    assert_eq!(created.assert_status(201).json()["type"], "fanout");
    assert_eq!(http.put_json("/api/exchanges/events", &json!({"type": "fanout"})).await.status, 200);
    http.put_json("/api/exchanges/events", &json!({"type": "topic"}))
        .await
        .assert_error(409, "PRECONDITION_FAILED");
    http.put_json("/api/exchanges/x", &json!({"type": "sideways"}))
        .await
        .assert_error(400, "INVALID_ARGUMENT");
    for queue in ["a", "b"] {
        let binding = json!({"source": "events", "destination": queue});
        assert_eq!(http.post_json("/api/bindings", &binding).await.status, 201);
    }
    let bound = json!({"source": "events", "destination": "ghost"});
    http.post_json("/api/bindings", &bound).await.assert_error(404, "NOT_FOUND");

    let published = http.post_json("/api/exchanges/events/messages", &json!({"body": "hi"})).await;
    let published = published.assert_status(201).json();
    assert_eq!(published["routed"], 2);
    assert!(published["message_id"].is_string());
    let pulled = http.pull("a", 1, "").await;
    assert_eq!((pulled[0]["exchange"].as_str(), pulled[0]["body"].as_str()), (Some("events"), Some("hi")));

    let bindings = http.get_json("/api/bindings?exchange=events").await;
    assert_eq!(bindings.as_array().unwrap().len(), 2, "{bindings}");
    let metrics = http.metrics().await;
    for line in [
        r#"hopper_exchange_published_total{exchange="events"} 1"#,
        r#"hopper_exchange_unroutable_total{exchange="events"} 0"#,
        r#"hopper_exchange_bindings{exchange="events"} 2"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in:\n{metrics}");
    }
    let unbind = json!({"source": "events", "destination": "b"});
    assert_eq!(
        http.request("DELETE", "/api/bindings", Some(("application/json", unbind.to_string().as_bytes())))
            .await
            .json()["removed"],
        true
    );
    http.delete("/api/exchanges/events?if_unused=true").await.assert_error(409, "PRECONDITION_FAILED");
    assert_eq!(http.delete("/api/exchanges/events").await.status, 200);
    assert_eq!(http.get_json("/api/exchanges").await, json!([]));
}
