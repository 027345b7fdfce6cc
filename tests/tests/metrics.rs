//! `GET /metrics`: the Prometheus text the broker serves after known operations.

use std::collections::BTreeSet;

use hopper_tests::{connect, eventually, publish_all, receipt, Broker, Http, DEADLINE};
use serde_json::json;

/// The sample lines of `text` (neither comments nor blank).
fn samples(text: &str) -> Vec<&str> {
    text.lines().filter(|line| !line.is_empty() && !line.starts_with('#')).collect()
}

/// The value of the sample `name{labels}` (e.g. `hopper_queue_acked_total{queue="q"}`).
fn sample(text: &str, series: &str) -> Option<u64> {
    samples(text).into_iter().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Panics, showing the whole text, unless `line` is one of its lines.
fn assert_line(text: &str, line: &str) {
    assert!(text.lines().any(|l| l == line), "no line `{line}` in /metrics:\n{text}");
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q.dlq", json!({})).await;
    http.declare("q", json!({"dead_letter": "q.dlq"})).await;
    http.declare("later", json!({})).await;
    // Published over the binary protocol, consumed over HTTP: the metrics cover both, and the
    // open connection shows in hopper_connections.
    let conn = connect(&broker).await;
    publish_all(&conn, "q", (0..5).map(|i| format!("message {i}"))).await;
    let pulled = http.pull("q", 3, "").await;
    assert_eq!(pulled.len(), 3, "{pulled:?}");
    http.ack("q", &receipt(&pulled[0])).await;
    http.ack("q", &receipt(&pulled[1])).await;
    let nack = json!({"requeue": false, "error": "cannot parse"});
    http.post_json(&format!("/api/queues/q/messages/{}/nack", receipt(&pulled[2])), &nack)
        .await
        .assert_status(204);
    let delayed = json!({"body": "not yet", "delay": 600});
    http.post_json("/api/queues/later/messages", &delayed).await.assert_status(201);

    let text = http.metrics().await;
    for line in [
        r#"hopper_queue_messages_ready{queue="q"} 2"#,
        r#"hopper_queue_messages_unacked{queue="q"} 0"#,
        r#"hopper_queue_messages_delayed{queue="q"} 0"#,
        r#"hopper_queue_published_total{queue="q"} 5"#,
        r#"hopper_queue_delivered_total{queue="q"} 3"#,
        r#"hopper_queue_acked_total{queue="q"} 2"#,
        r#"hopper_queue_redelivered_total{queue="q"} 0"#,
        r#"hopper_queue_dead_lettered_total{queue="q",reason="rejected"} 1"#,
        r#"hopper_queue_dead_lettered_total{queue="q",reason="delivery_limit"} 0"#,
        r#"hopper_queue_dead_lettered_total{queue="q",reason="expired"} 0"#,
        r#"hopper_queue_alarm{queue="q"} 0"#,
        r#"hopper_queue_alarm_depth{queue="q"} 0"#,
        r#"hopper_queue_messages_ready{queue="q.dlq"} 1"#,
        // A dead-lettered message counts as published in its dead-letter queue.
        r#"hopper_queue_published_total{queue="q.dlq"} 1"#,
        r#"hopper_queue_messages_ready{queue="later"} 0"#,
        r#"hopper_queue_messages_delayed{queue="later"} 1"#,
        "hopper_connections 1",
        "hopper_blocked_publishers 0",
        "hopper_publishers_blocked 0",
        "hopper_queues 3",
    ] {
        assert_line(&text, line);
    }
    // The HTTP puller is the one consumer of q; nobody ever consumed from the others.
    assert_line(&text, r#"hopper_queue_consumers{queue="q.dlq"} 0"#);
    assert!(sample(&text, r#"hopper_queue_consumers{queue="q"}"#).is_some(), "{text}");
    for series in ["hopper_memory_bytes", "hopper_disk_free_bytes", "hopper_uptime_seconds"] {
        assert!(sample(&text, series).is_some(), "no sample {series} in:\n{text}");
    }
    // Memory is sampled every 100 ms: the bodies of "message 3", "message 4" (q), "message 2"
    // (q.dlq, with its death: the queue name, the error text and 48 bytes of fields) and
    // "not yet" (later), and an index entry for each of the four.
    let bodies = 9 + 9 + 9 + 7;
    let death = "q".len() + "cannot parse".len() + 48;
    let expected = (bodies + death) as u64 + 4 * hopper_broker::message::INDEX_ENTRY_BYTES;
    eventually("hopper_memory_bytes to count the messages held", DEADLINE, move || async move {
        sample(&http.metrics().await, "hopper_memory_bytes") == Some(expected)
    })
    .await;
    assert!(sample(&text, "hopper_disk_free_bytes").unwrap() > 0, "{text}");

    // Closing the connection shows too.
    conn.close().await.expect("close");
    eventually("hopper_connections to drop to 0", DEADLINE, move || async move {
        sample(&http.metrics().await, "hopper_connections") == Some(0)
    })
    .await;
}

#[tokio::test]
async fn every_family_has_help_and_type_and_only_valid_lines() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("a", json!({"alarm_depth": 10})).await;
    http.declare("b\"odd\\name", json!({})).await;
    http.publish("a", "x").await;
    let response = http.get("/metrics").await;
    response.assert_status(200);
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "content type {content_type:?}");
    let text = &response.body;

    let mut helped = BTreeSet::new();
    let mut typed = BTreeSet::new();
    let mut sampled = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("bad HELP line {line:?}"));
            assert!(!help.trim().is_empty(), "empty help: {line:?}");
            assert!(helped.insert(name.to_owned()), "HELP of {name} twice");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            assert!(matches!(kind, "gauge" | "counter"), "type of {name}: {kind}");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "counters and only counters end in _total"
            );
            assert!(helped.contains(name), "TYPE of {name} before its HELP");
            assert!(typed.insert(name.to_owned()), "TYPE of {name} twice");
        } else {
            assert!(!line.is_empty() && !line.starts_with('#'), "unexpected line {line:?}");
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample {line:?}"));
            assert!(value.parse::<f64>().is_ok(), "value of {line:?}");
            let name = series.split('{').next().unwrap_or_default();
            assert!(typed.contains(name), "sample of {name} before its TYPE: {line:?}");
            sampled.insert(name.to_owned());
        }
    }
    assert_eq!(helped, typed, "every family has both HELP and TYPE");
    assert_eq!(sampled, typed, "every family has samples (two queues exist)");
    for family in [
        "hopper_queue_messages_ready",
        "hopper_queue_messages_unacked",
        "hopper_queue_messages_delayed",
        "hopper_queue_consumers",
        "hopper_queue_published_total",
        "hopper_queue_acked_total",
        "hopper_queue_dead_lettered_total",
        "hopper_queue_alarm",
        "hopper_connections",
        "hopper_memory_bytes",
        "hopper_disk_free_bytes",
        "hopper_blocked_publishers",
        "hopper_uptime_seconds",
    ] {
        assert!(typed.contains(family), "no family {family} in:\n{text}");
    }
    assert_line(text, r#"hopper_queue_alarm_depth{queue="a"} 10"#);
    // A queue name with a quote and a backslash is escaped in its label.
    assert_line(text, r#"hopper_queue_messages_ready{queue="b\"odd\\name"} 0"#);
}
