//! The JSON API of the HTTP listener: queues, publish, pull with receipts, settle, peek, purge,
//! moves, status and health, and the errors of each.

use std::time::{Duration, Instant};

use hopper_tests::{eventually, json_id, messages, receipt, Broker, Http, DEADLINE};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Declares `dlq` and `queue` dead-lettering into it, publishes `bodies` to `queue`, and
/// rejects each (nack without requeue, with `error`), so that `dlq` holds them all.
async fn dead_letter(http: Http, queue: &str, dlq: &str, bodies: &[(&str, Value)], error: &str) {
    http.declare(dlq, json!({})).await;
    http.declare(queue, json!({"dead_letter": dlq})).await;
    for (body, headers) in bodies {
        let request = json!({"body": body, "headers": headers});
        http.post_json(&format!("/api/queues/{queue}/messages"), &request).await.assert_status(201);
    }
    let pulled = http.pull(queue, bodies.len() as u32, "").await;
    assert_eq!(pulled.len(), bodies.len(), "{pulled:?}");
    for message in &pulled {
        let path = format!("/api/queues/{queue}/messages/{}/nack", receipt(message));
        http.post_json(&path, &json!({"requeue": false, "error": error})).await.assert_status(204);
    }
    let held = http.queue(dlq).await;
    assert_eq!(held["ready"], bodies.len(), "{held}");
}

/// The counts of a queue: (ready, unacked, delayed).
async fn counts(http: Http, queue: &str) -> (u64, u64, u64) {
    let info = http.queue(queue).await;
    let count = |key: &str| info[key].as_u64().unwrap_or_else(|| panic!("no {key} in {info}"));
    (count("ready"), count("unacked"), count("delayed"))
}

/// Waits until the counts of `queue` are `expected`.
async fn wait_counts(http: Http, queue: &'static str, expected: (u64, u64, u64)) {
    let what = format!("{queue} to hold (ready, unacked, delayed) = {expected:?}");
    eventually(&what, DEADLINE, move || async move { counts(http, queue).await == expected }).await;
}

#[tokio::test]
async fn health_and_status() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    assert_eq!(http.get_json("/health/live").await, json!({"status": "ok"}));
    assert_eq!(http.get_json("/health/ready").await, json!({"status": "ready", "publishers_blocked": false}));
    let status = http.get_json("/api/status").await;
    assert_eq!(status["blocked"], false, "{status}");
    assert_eq!(status["blocked_reason"], "", "{status}");
    assert_eq!(status["blocked_publishers"], 0, "{status}");
    assert_eq!(status["connections"], 0, "HTTP requests are not connections: {status}");
    assert!(status["version"].as_str().is_some_and(|v| !v.is_empty()), "{status}");
    for key in ["uptime_s", "memory_used", "memory_high_watermark", "disk_free", "disk_free_low_watermark"] {
        assert!(status[key].is_u64(), "no {key} in {status}");
    }
    assert!(status["memory_high_watermark"].as_u64() > Some(0), "{status}");
    let unknown = http.get("/api/nothing-here").await;
    assert_eq!(unknown.status, 404, "{unknown}");
}

#[tokio::test]
async fn declare_get_list_and_delete_queues() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    let created = http.put_json("/api/queues/orders", &json!({})).await;
    let info = created.assert_status(201).json();
    assert_eq!(info["name"], "orders");
    assert_eq!((info["durable"].clone(), info["ready"].clone()), (json!(false), json!(0)), "{info}");
    assert_eq!(
        (info["overflow"].clone(), info["dead_letter"].clone()),
        (json!("reject-publish"), Value::Null)
    );
    assert_eq!(info["alarm"], false, "{info}");

    // Same settings: 200 and the existing queue with its messages.
    http.publish("orders", "kept").await;
    let again = http.put_json("/api/queues/orders", &json!({})).await;
    assert_eq!(again.assert_status(200).json()["ready"], 1);
    // A body is optional: no body declares with defaults.
    http.request("PUT", "/api/queues/orders", None).await.assert_status(200);

    // Other settings: 409, and the queue is unchanged.
    let conflict = http.put_json("/api/queues/orders", &json!({"durable": true})).await;
    let message = conflict.assert_error(409, "PRECONDITION_FAILED");
    assert!(message.contains("orders"), "{message}");
    let conflict = http.put_json("/api/queues/orders", &json!({"max_length": 5})).await;
    conflict.assert_error(409, "PRECONDITION_FAILED");
    assert_eq!(http.queue("orders").await["durable"], false);

    // Every setting round-trips.
    http.declare("orders.dlq", json!({})).await;
    let settings = json!({
        "durable": true, "dead_letter": "orders.dlq", "max_deliveries": 3, "retry_backoff_ms": [100, 200],
        "message_ttl_ms": 60000, "ack_timeout_ms": 30000, "max_length": 100, "max_bytes": 100000,
        "overflow": "drop-head", "alarm_depth": 50,
    });
    let payments = http.put_json("/api/queues/payments", &settings).await;
    let info = payments.assert_status(201).json();
    for (key, value) in settings.as_object().unwrap() {
        assert_eq!(&info[key], value, "{key} in {info}");
    }
    assert_eq!(http.put_json("/api/queues/payments", &settings).await.status, 200);
    assert_eq!(http.queue("orders.dlq").await["is_dead_letter_queue"], true);

    // A name that is not a plain path segment.
    let odd = http.put_json("/api/queues/a%2Fb%20c", &json!({})).await;
    assert_eq!(odd.assert_status(201).json()["name"], "a/b c");
    assert_eq!(http.queue("a/b c").await["name"], "a/b c");

    let listed = http.get_json("/api/queues").await;
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|q| q["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a/b c", "orders", "orders.dlq", "payments"], "sorted by name");

    let deleted = http.delete("/api/queues/orders").await;
    assert_eq!(deleted.assert_status(200).json(), json!({"deleted": "orders", "messages": 1}));
    http.get("/api/queues/orders").await.assert_error(404, "NOT_FOUND");
    http.delete("/api/queues/orders").await.assert_error(404, "NOT_FOUND");
    // Declaring it again starts empty.
    assert_eq!(http.declare("orders", json!({})).await["ready"], 0);
}

#[tokio::test]
async fn unknown_queue_is_404_on_every_route() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("known", json!({})).await;
    let body = json!({"body": "x"});
    let responses = [
        http.get("/api/queues/ghost").await,
        http.delete("/api/queues/ghost").await,
        http.put_json("/api/queues/ghost/alarm", &json!({"depth": 3})).await,
        http.post_json("/api/queues/ghost/messages", &body).await,
        http.get("/api/queues/ghost/messages?count=1").await,
        http.delete("/api/queues/ghost/messages").await,
        http.delete("/api/queues/ghost/messages/1-1").await,
        http.post_json("/api/queues/ghost/messages/1-1/nack", &json!({})).await,
        http.get("/api/queues/ghost/peek").await,
        http.post_json("/api/queues/ghost/move", &json!({"to": "known"})).await,
        http.post_json("/api/queues/known/move", &json!({"to": "ghost"})).await,
    ];
    for response in &responses {
        let message = response.assert_error(404, "NOT_FOUND");
        assert!(message.contains("ghost"), "the error names the queue: {message}");
        assert_eq!(response.header("cache-control"), Some("no-store"), "{response}");
    }
    // An unknown receipt on a known queue.
    http.delete("/api/queues/known/messages/7-7").await.assert_error(404, "NOT_FOUND");
    http.post_json("/api/queues/known/messages/7-7/nack", &json!({})).await.assert_error(404, "NOT_FOUND");
}

#[tokio::test]
async fn bad_requests_are_refused() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;
    let json_body = |text: &'static str| Some(("application/json", text.as_bytes()));

    // Malformed JSON, unknown fields, wrong types, a missing field, no content type.
    let malformed = http.request("PUT", "/api/queues/q", json_body("{bad")).await;
    assert_eq!(malformed.status, 400, "{malformed}");
    let malformed = http.request("POST", "/api/queues/q/messages", json_body("{\"body\": ")).await;
    assert_eq!(malformed.status, 400, "{malformed}");
    for (method, path, body) in [
        ("PUT", "/api/queues/q", "{\"bogus\": 1}"),
        ("PUT", "/api/queues/q", "{\"max_length\": \"ten\"}"),
        ("PUT", "/api/queues/q/alarm", "{}"),
        ("PUT", "/api/queues/q/alarm", "{\"depth\": -1}"),
        ("POST", "/api/queues/q/messages", "{}"),
        ("POST", "/api/queues/q/messages", "{\"body\": \"x\", \"priority\": 1}"),
        ("POST", "/api/queues/q/messages", "{\"body\": \"x\", \"headers\": {\"n\": 1}}"),
    ] {
        let response = http.request(method, path, json_body(body)).await;
        assert_eq!(response.status, 422, "{method} {path} {body}:\n{response}");
    }
    let untyped = http.request("POST", "/api/queues/q/messages", Some(("", b"{\"body\": \"x\"}"))).await;
    assert_eq!(untyped.status, 415, "{untyped}");

    // Values the API itself checks: INVALID_ARGUMENT errors.
    for (method, path, body) in [
        ("PUT", "/api/queues/q2", json!({"overflow": "sideways"})),
        ("PUT", "/api/queues/q2", json!({"dead_letter": "q2"})),
        ("POST", "/api/queues/q/messages", json!({"body": "x", "delay": "soon"})),
        ("POST", "/api/queues/q/messages", json!({"body": "x", "delay": -1})),
        ("POST", "/api/queues/q/messages", json!({"body": "x", "ttl": [1]})),
        ("POST", "/api/queues/q/move", json!({"to": "q2", "filter": "no-equals-sign"})),
    ] {
        let response =
            http.request(method, path, Some(("application/json", body.to_string().as_bytes()))).await;
        response.assert_error(400, "INVALID_ARGUMENT");
    }
    http.delete("/api/queues/q/messages/not-a-receipt").await.assert_error(400, "INVALID_ARGUMENT");
    http.post_json("/api/queues/q/messages/x/nack", &json!({})).await.assert_error(400, "INVALID_ARGUMENT");
    http.get("/api/queues/q2").await.assert_error(404, "NOT_FOUND");
    assert_eq!(counts(http, "q").await, (0, 0, 0), "nothing was published");
}

#[tokio::test]
async fn unparsable_request_bodies_get_the_json_error_shape() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;
    let malformed = http.request("POST", "/api/queues/q/messages", Some(("application/json", b"{bad"))).await;
    malformed.assert_error(400, "INVALID_ARGUMENT");
    let unknown = http.request("PUT", "/api/queues/q", Some(("application/json", b"{\"bogus\": 1}"))).await;
    assert!(matches!(unknown.status, 400 | 422), "{unknown}");
    assert_eq!(unknown.json()["error"]["code"], "INVALID_ARGUMENT", "{unknown}");
    let untyped = http.request("POST", "/api/queues/q/messages", Some(("", b"{\"body\": \"x\"}"))).await;
    assert!(matches!(untyped.status, 400 | 415), "{untyped}");
    assert_eq!(untyped.json()["error"]["code"], "INVALID_ARGUMENT", "{untyped}");
}

#[tokio::test]
async fn publish_bodies_headers_delay_and_ttl() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;

    let text = json!({"body": "plain text", "headers": {"kind": "greeting", "lang": "en"}});
    let created = http.post_json("/api/queues/q/messages", &text).await;
    let first_id = json_id(&created.assert_status(201).json()["message_id"]).expect("a message id");
    let object = json!({"body": {"order": 17, "items": ["a", "b"]}});
    let second_id = json_id(
        &http.post_json("/api/queues/q/messages", &object).await.assert_status(201).json()["message_id"],
    )
    .unwrap();
    assert!(second_id > first_id, "ids grow: {first_id} then {second_id}");

    let pulled = http.pull("q", 10, "").await;
    assert_eq!(pulled.len(), 2, "{pulled:?}");
    assert_eq!(pulled[0]["message_id"], first_id.to_string());
    assert_eq!(pulled[0]["body"], "plain text");
    assert_eq!(pulled[0]["headers"], json!({"kind": "greeting", "lang": "en"}));
    assert_eq!(pulled[0]["content_type"], "");
    assert_eq!(pulled[0]["queue"], "q");
    // A JSON body is kept as its JSON text, marked as JSON.
    let body: Value = serde_json::from_str(pulled[1]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"order": 17, "items": ["a", "b"]}));
    assert_eq!(pulled[1]["content_type"], "application/json");
    for message in &pulled {
        http.ack("q", &receipt(message)).await;
    }

    // Delays as a duration string and as seconds.
    let delayed = json!({"body": "later", "delay": "300ms"});
    http.post_json("/api/queues/q/messages", &delayed).await.assert_status(201);
    http.post_json("/api/queues/q/messages", &json!({"body": "later too", "delay": 0.3}))
        .await
        .assert_status(201);
    assert_eq!(counts(http, "q").await, (0, 0, 2), "both wait for their delay");
    wait_counts(http, "q", (2, 0, 0)).await;
    http.delete("/api/queues/q/messages").await.assert_status(200);

    // A TTL: the message expires unconsumed.
    http.post_json("/api/queues/q/messages", &json!({"body": "short-lived", "ttl": "200ms"}))
        .await
        .assert_status(201);
    let what = "the message to expire";
    eventually(what, DEADLINE, || async { http.queue("q").await["dead_lettered"]["expired"] == 1 }).await;
    assert_eq!(counts(http, "q").await, (0, 0, 0));
}

#[tokio::test]
async fn full_queue_refuses_publish_with_503() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("small", json!({"max_length": 1, "overflow": "reject-publish"})).await;
    http.publish("small", "first").await;
    let refused = http.post_json("/api/queues/small/messages", &json!({"body": "second"})).await;
    let message = refused.assert_error(503, "RESOURCE_LIMIT");
    assert!(message.contains("small"), "{message}");
    let peeked = messages(&http.get_json("/api/queues/small/peek").await);
    assert_eq!(peeked.len(), 1);
    assert_eq!(peeked[0]["body"], "first");

    // drop-head makes room instead, dropping the oldest.
    http.declare("rolling", json!({"max_length": 1, "overflow": "drop-head"})).await;
    http.publish("rolling", "old").await;
    http.publish("rolling", "new").await;
    let info = http.queue("rolling").await;
    assert_eq!(
        (info["ready"].clone(), info["dead_lettered"]["maxlen"].clone()),
        (json!(1), json!(1)),
        "{info}"
    );
    assert_eq!(messages(&http.get_json("/api/queues/rolling/peek").await)[0]["body"], "new");
}

#[tokio::test]
async fn blocked_publishers_get_503_until_memory_is_freed() {
    let broker = Broker::start_with(&["--memory-high-watermark", "1000"]);
    let http = Http::of(&broker);
    http.declare("big", json!({})).await;
    let body = "x".repeat(600);
    http.publish("big", &body).await;
    http.publish("big", &body).await;
    eventually("publishers to be blocked", DEADLINE, || async {
        http.get_json("/api/status").await["blocked"] == true
    })
    .await;
    let status = http.get_json("/api/status").await;
    let reason = status["blocked_reason"].as_str().unwrap();
    assert!(reason.contains("memory"), "{status}");
    // The two bodies, and a small index entry per message.
    let used = status["memory_used"].as_u64().unwrap();
    assert!((1200..=1200 + 2 * 128).contains(&used), "{status}");
    assert_eq!(status["memory_high_watermark"], 1000, "{status}");
    assert_eq!(http.get_json("/health/ready").await["publishers_blocked"], true);
    assert!(http.metrics().await.lines().any(|l| l == "hopper_publishers_blocked 1"));

    let refused = http.post_json("/api/queues/big/messages", &json!({"body": "tiny"})).await;
    let message = refused.assert_error(503, "RESOURCE_LIMIT");
    assert!(message.contains("blocked"), "{message}");
    assert_eq!(http.queue("big").await["published"], 2, "the refused message was not taken");

    // Consumers keep draining while publishers are blocked; once memory is freed, publishing
    // works again.
    let pulled = http.pull("big", 2, "").await;
    assert_eq!(pulled.len(), 2);
    for message in &pulled {
        http.ack("big", &receipt(message)).await;
    }
    eventually("publishers to be unblocked", DEADLINE, || async {
        http.get_json("/api/status").await["blocked"] == false
    })
    .await;
    http.publish("big", "tiny").await;
}

#[tokio::test]
async fn pull_with_visibility_then_ack_by_receipt() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;
    let id = http.publish("q", "work").await;

    // Not acked within its visibility, the message comes back.
    let first = http.pull("q", 1, "&visibility=0.2").await;
    assert_eq!(first.len(), 1);
    assert_eq!((json_id(&first[0]["message_id"]), first[0]["body"].as_str()), (Some(id), Some("work")));
    assert_eq!(
        (first[0]["delivery_count"].clone(), first[0]["redelivered"].clone()),
        (json!(1), json!(false))
    );
    assert_eq!(counts(http, "q").await, (0, 1, 0), "invisible while pulled");
    let second = http.pull("q", 1, "&wait=5").await;
    assert_eq!(second.len(), 1, "the message became visible again");
    assert_eq!(second[0]["message_id"], id.to_string());
    assert_eq!(
        (second[0]["delivery_count"].clone(), second[0]["redelivered"].clone()),
        (json!(2), json!(true))
    );
    assert_ne!(receipt(&first[0]), receipt(&second[0]), "a new delivery, a new receipt");

    // The expired receipt is refused; the current one acks once.
    let stale = http.delete(&format!("/api/queues/q/messages/{}", receipt(&first[0]))).await;
    assert!(matches!(stale.status, 404 | 409), "{stale}");
    http.ack("q", &receipt(&second[0])).await;
    let twice = http.delete(&format!("/api/queues/q/messages/{}", receipt(&second[0]))).await;
    twice.assert_error(404, "NOT_FOUND");
    let info = http.queue("q").await;
    assert_eq!(
        (info["ready"].clone(), info["unacked"].clone(), info["acked"].clone()),
        (json!(0), json!(0), json!(1))
    );

    // count bounds a pull; an empty queue answers an empty list at once.
    for i in 0..5 {
        http.publish("q", &format!("m{i}")).await;
    }
    let three = http.pull("q", 3, "").await;
    let bodies: Vec<&str> = three.iter().map(|m| m["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["m0", "m1", "m2"], "in publish order");
    assert_eq!(counts(http, "q").await, (2, 3, 0));
    http.delete("/api/queues/q/messages").await.assert_status(200);
    assert!(http.pull("q", 10, "").await.is_empty());
}

#[tokio::test]
async fn nack_requeues_delays_or_dead_letters_with_the_error() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q.dlq", json!({})).await;
    http.declare("q", json!({"dead_letter": "q.dlq"})).await;
    let headers = json!({"tenant": "t1"});
    let request = json!({"body": "payload", "headers": headers});
    let id = http.post_json("/api/queues/q/messages", &request).await.assert_status(201).json()["message_id"]
        .clone();

    // Requeue is the default.
    let pulled = http.pull("q", 1, "").await;
    let nack = format!("/api/queues/q/messages/{}/nack", receipt(&pulled[0]));
    http.request("POST", &nack, None).await.assert_status(204);
    assert_eq!(counts(http, "q").await, (1, 0, 0));

    // A requeue with a delay waits first.
    let pulled = http.pull("q", 1, "").await;
    assert_eq!(pulled[0]["delivery_count"], 2);
    let nack = format!("/api/queues/q/messages/{}/nack", receipt(&pulled[0]));
    http.post_json(&nack, &json!({"requeue": true, "delay": "200ms"})).await.assert_status(204);
    assert_eq!(counts(http, "q").await, (0, 0, 1));
    wait_counts(http, "q", (1, 0, 0)).await;

    // Without requeue it goes to the dead-letter queue with the error.
    let pulled = http.pull("q", 1, "").await;
    let nack = format!("/api/queues/q/messages/{}/nack", receipt(&pulled[0]));
    http.post_json(&nack, &json!({"requeue": false, "error": "cannot parse the payload"}))
        .await
        .assert_status(204);
    http.post_json(&nack, &json!({})).await.assert_error(404, "NOT_FOUND");
    assert_eq!(counts(http, "q").await, (0, 0, 0));
    assert_eq!(http.queue("q").await["dead_lettered"], json!({"rejected": 1}));

    let dead = http.pull("q.dlq", 1, "").await;
    assert_eq!(dead.len(), 1);
    let message = &dead[0];
    assert_eq!(
        (&message["message_id"], &message["body"], &message["headers"]),
        (&id, &json!("payload"), &headers)
    );
    assert_eq!(message["queue"], "q.dlq");
    let death = &message["death"];
    assert_eq!(death["reason"], "rejected", "{message}");
    assert_eq!(death["queue"], "q", "{message}");
    assert_eq!(death["error"], "cannot parse the payload", "{message}");
    // Three failures in q: two requeues, then the rejection.
    assert_eq!(death["count"], 3, "{message}");
    let time = |key: &str| death[key].as_u64().unwrap_or_else(|| panic!("no {key} in {message}"));
    assert!(time("first_time") < time("last_time") && time("last_time") <= time("died_at"), "{message}");
    assert_eq!(message["deaths"], json!([death.clone()]));
}

#[tokio::test]
async fn long_poll_returns_when_a_message_is_published() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;

    // An empty queue answers an empty list after the wait.
    let started = Instant::now();
    assert!(http.pull("q", 1, "&wait=0.3").await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300), "answered after {:?}", started.elapsed());

    let mut poll = tokio::spawn(async move { http.pull("q", 1, "&wait=8").await });
    // Still waiting a moment later: nothing to return yet.
    let early = tokio::time::timeout(Duration::from_millis(300), &mut poll).await;
    assert!(early.is_err(), "the long poll answered before any message: {early:?}");
    let started = Instant::now();
    let id = http.publish("q", "wake up").await;
    let woken = poll.await.expect("the poll task");
    assert!(started.elapsed() < Duration::from_secs(5), "woke after {:?}", started.elapsed());
    assert_eq!(woken.len(), 1);
    assert_eq!((json_id(&woken[0]["message_id"]), woken[0]["body"].as_str()), (Some(id), Some("wake up")));
    http.ack("q", &receipt(&woken[0])).await;
}

#[tokio::test]
async fn abandoned_long_poll_does_not_swallow_later_messages() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;
    let mut stream = TcpStream::connect(http.addr()).await.unwrap();
    let request = format!(
        "GET /api/queues/q/messages?count=10&visibility=600&wait=15 HTTP/1.1\r\nHost: {}\r\n\r\n",
        http.host()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::io::AsyncReadExt::read(&mut stream, &mut byte),
    );
    assert!(early.await.is_err(), "the long poll is waiting");
    drop(stream);

    for i in 0..3 {
        http.publish("q", &format!("m{i}")).await;
    }
    // Nobody is waiting any more: the messages stay ready for the next consumer.
    wait_counts(http, "q", (3, 0, 0)).await;
}

#[tokio::test]
async fn pull_without_wait_is_not_held_up_by_another_long_poll() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;
    let mut poll = tokio::spawn(async move { http.pull("q", 1, "&wait=5").await });
    let early = tokio::time::timeout(Duration::from_millis(300), &mut poll).await;
    assert!(early.is_err(), "the long poll is waiting");
    let started = Instant::now();
    assert!(http.pull("q", 1, "").await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(1), "a pull without wait took {:?}", started.elapsed());
    poll.abort();
}

#[tokio::test]
async fn peek_shows_messages_without_taking_them() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;
    for i in 0..3 {
        http.publish("q", &format!("m{i}")).await;
    }
    let peeked = messages(&http.get_json("/api/queues/q/peek?count=2").await);
    let bodies: Vec<&str> = peeked.iter().map(|m| m["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["m0", "m1"]);
    assert!(peeked.iter().all(|m| m.get("receipt").is_none()), "a peek gives no receipt: {peeked:?}");
    assert_eq!(messages(&http.get_json("/api/queues/q/peek").await).len(), 3, "count defaults to 10");
    let info = http.queue("q").await;
    assert_eq!((info["ready"].clone(), info["delivered"].clone()), (json!(3), json!(0)), "{info}");
    assert!(messages(&http.get_json("/api/queues/q/peek?count=0").await).is_empty());
}

#[tokio::test]
async fn purge_drops_ready_messages() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;
    for i in 0..4 {
        http.publish("q", &format!("m{i}")).await;
    }
    let held = http.pull("q", 1, "").await;
    let purged = http.delete("/api/queues/q/messages").await;
    assert_eq!(purged.assert_status(200).json(), json!({"purged": 3}));
    assert_eq!(counts(http, "q").await, (0, 1, 0), "the pulled message is not purged");
    http.ack("q", &receipt(&held[0])).await;
    assert_eq!(http.delete("/api/queues/q/messages").await.json(), json!({"purged": 0}));
}

#[tokio::test]
async fn move_from_dead_letter_queue_back() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    let bodies = [
        ("a1", json!({"kind": "a"})),
        ("b1", json!({"kind": "b"})),
        ("a2", json!({"kind": "a"})),
        ("c1", json!({})),
    ];
    dead_letter(http, "q", "q.dlq", &bodies, "downstream was down").await;
    assert_eq!(http.get_json("/api/moves").await, json!([]));

    // Only the messages matching the filter.
    let request = json!({"to": "q", "filter": "kind=a"});
    let started = http.post_json("/api/queues/q.dlq/move", &request).await;
    let started = started.assert_status(201).json();
    assert_eq!((&started["source"], &started["destination"]), (&json!("q.dlq"), &json!("q")), "{started}");
    assert_eq!(
        (&started["rate"], &started["limit"], &started["filter"]),
        (&json!(0), &json!(0), &json!("kind=a"))
    );
    let first = started["id"].as_u64().expect("a move id");
    let finished = wait_move(http, first).await;
    assert_eq!((finished["moved"].clone(), finished["skipped"].clone()), (json!(2), json!(0)), "{finished}");
    assert!(finished["finished_ms"].as_u64() >= finished["started_ms"].as_u64(), "{finished}");
    assert_eq!(counts(http, "q").await.0, 2);
    assert_eq!(counts(http, "q.dlq").await.0, 2);
    let moved: Vec<Value> = messages(&http.get_json("/api/queues/q/peek").await);
    let moved: Vec<&str> = moved.iter().map(|m| m["body"].as_str().unwrap()).collect();
    assert_eq!(moved, ["a1", "a2"]);

    // Without a destination, each message goes back where it died; with a limit, only so many.
    let request = json!({"limit": 1});
    let second =
        http.post_json("/api/queues/q.dlq/move", &request).await.assert_status(201).json()["id"].clone();
    let second = second.as_u64().unwrap();
    assert_ne!(second, first);
    assert_eq!(wait_move(http, second).await["moved"], 1);
    assert_eq!((counts(http, "q").await.0, counts(http, "q.dlq").await.0), (3, 1));
    let rest = http.post_json("/api/queues/q.dlq/move", &json!({"to": "q"})).await.json()["id"].clone();
    assert_eq!(wait_move(http, rest.as_u64().unwrap()).await["moved"], 1);
    assert_eq!((counts(http, "q").await.0, counts(http, "q.dlq").await.0), (4, 0));

    let listed = http.get_json("/api/moves").await;
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    // Back in q, a message remembers its death.
    let back = http.pull("q", 4, "").await;
    assert!(back.iter().all(|m| m["death"]["error"] == "downstream was down"), "{back:?}");
}

/// Polls `GET /api/moves` until move `id` is finished; returns it.
async fn wait_move(http: Http, id: u64) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let moves = http.get_json("/api/moves").await;
        let found = moves.as_array().unwrap().iter().find(|m| m["id"] == id).cloned();
        let state = found.as_ref().map(|m| m["state"].clone());
        match state.as_ref().and_then(Value::as_str) {
            Some("finished") => return found.unwrap(),
            Some("running") | None => {}
            Some(other) => panic!("move {id} ended {other}: {moves}"),
        }
        assert!(Instant::now() < deadline, "move {id} did not finish: {moves}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn the_documented_curl_examples_carry_the_headers_the_broker_requires() {
    // A state change needs `Content-Type: application/json` (a body of another type is a 415) or,
    // without a body, `X-Hopper-Request`: an example without its header fails for a reader who
    // copies it.
    const JSON: &str = "-H 'Content-Type: application/json'";
    const MARKED: &str = "-H 'X-Hopper-Request: 1'";
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = (0, 0);
    for doc in ["docs/http-api.md", "README.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for line in text.lines().filter(|l| l.starts_with("curl") && l.contains(" -X ")) {
            if line.contains(" -d ") || line.ends_with('\\') {
                assert!(line.contains(JSON), "{doc}: a body without its JSON content type: {line}");
                checked.0 += 1;
            } else {
                assert!(line.contains(JSON) || line.contains(MARKED), "{doc}: no {MARKED}: {line}");
                checked.1 += 1;
            }
        }
    }
    assert!(checked.0 >= 5 && checked.1 >= 3, "the examples are where they were: {checked:?}");
}
