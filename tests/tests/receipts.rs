//! Receipts of HTTP pulls: opaque and unforgeable, valid once and only for the pull that issued
//! them. A guessed, tampered, replayed or misdirected receipt settles nothing, and no receipt
//! can settle a delivery of a binary-protocol consumer. An HTTP ack of a durable message
//! answers once the ack is on disk.

use futures::StreamExt;
use hopper_client::{ConsumeOptions, QueueOptions};
use hopper_tests::{connect, receipt, stats_eventually, within, Broker, Http};
use serde_json::json;

/// The (ready, unacked, acked) counts of `queue`, over HTTP.
async fn counts(http: &Http, queue: &str) -> (u64, u64, u64) {
    let info = http.queue(queue).await;
    let n = |key: &str| info[key].as_u64().unwrap_or_else(|| panic!("no {key} in {info}"));
    (n("ready"), n("unacked"), n("acked"))
}

#[tokio::test]
async fn forged_and_replayed_receipts_settle_nothing() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;
    http.declare("other", json!({})).await;
    http.publish("q", "pulled").await;
    let pulled = http.pull("q", 1, "&visibility=60").await;
    let genuine = receipt(&pulled[0]);
    let (head, mac) = genuine.rsplit_once('-').expect("CONSUMER-TAG-MAC");
    assert_eq!(mac.len(), 32, "a 128-bit MAC: {genuine}");

    // Guessed and tampered receipts: the consumer and tag alone, a MAC of zeros, the right MAC
    // on a neighbouring tag, and the genuine receipt on another queue's path.
    let (consumer, tag) = head.split_once('-').unwrap();
    let next_tag: u64 = tag.parse::<u64>().unwrap() + 1;
    for forged in [
        head.to_string(),
        format!("{head}-{}", "0".repeat(32)),
        format!("{consumer}-{next_tag}-{mac}"),
        format!("{head}-{}", mac.to_uppercase().replace(|c: char| c.is_ascii_digit(), "f")),
    ] {
        let response = http.delete(&format!("/api/queues/q/messages/{forged}")).await;
        response.assert_error(404, "NOT_FOUND");
        let nack = http.post_json(&format!("/api/queues/q/messages/{forged}/nack"), &json!({})).await;
        nack.assert_error(404, "NOT_FOUND");
    }
    http.delete(&format!("/api/queues/other/messages/{genuine}")).await.assert_error(404, "NOT_FOUND");
    assert_eq!(counts(&http, "q").await, (0, 1, 0), "nothing was settled");

    // The genuine receipt acks once; replayed, it is refused.
    assert_eq!(http.delete(&format!("/api/queues/q/messages/{genuine}")).await.status, 204);
    assert_eq!(counts(&http, "q").await, (0, 0, 1));
    http.delete(&format!("/api/queues/q/messages/{genuine}")).await.assert_error(404, "NOT_FOUND");
    let replayed = http.post_json(&format!("/api/queues/q/messages/{genuine}/nack"), &json!({})).await;
    replayed.assert_error(404, "NOT_FOUND");
    assert_eq!(counts(&http, "q").await, (0, 0, 1));
}

#[tokio::test]
async fn no_receipt_settles_a_binary_protocol_delivery() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    http.publish("q", "held by a consumer").await;
    let mut consumer = conn.consume("q", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let delivery = within("a delivery", consumer.next()).await.unwrap().unwrap();

    // Its consumer id and tag, as an HTTP client could guess them, in every receipt shape.
    let (consumer_id, tag) = (delivery.consumer_id, delivery.delivery_tag);
    for guess in [format!("{consumer_id}-{tag}"), format!("{consumer_id}-{tag}-{}", "a".repeat(32))] {
        http.delete(&format!("/api/queues/q/messages/{guess}")).await.assert_error(404, "NOT_FOUND");
    }
    assert_eq!(counts(&http, "q").await, (0, 1, 0), "the consumer still holds it");
    delivery.ack().await.unwrap();
    stats_eventually(&conn, "q", |info| info.acked_total == 1 && info.unacked == 0).await;
}

#[tokio::test]
async fn an_http_ack_of_a_durable_message_survives_a_crash_right_after_it() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_in(data_dir.path(), &[]);
    let http = Http::of(&broker);
    http.declare("jobs", json!({"durable": true})).await;
    for i in 0..20 {
        http.publish("jobs", &format!("job {i}")).await;
    }
    let pulled = http.pull("jobs", 20, "&visibility=60").await;
    assert_eq!(pulled.len(), 20);
    for message in &pulled[..10] {
        assert_eq!(http.delete(&format!("/api/queues/jobs/messages/{}", receipt(message))).await.status, 204);
    }
    broker.kill();
    broker.restart();
    let http = Http::of(&broker);
    let left = http.pull("jobs", 100, "").await;
    let bodies: Vec<&str> = left.iter().map(|m| m["body"].as_str().unwrap()).collect();
    let expected: Vec<String> = (10..20).map(|i| format!("job {i}")).collect();
    assert_eq!(bodies, expected, "acked messages do not come back; the others do");
}
