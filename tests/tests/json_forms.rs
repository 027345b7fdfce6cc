//! The HTTP API and the CLI's `--json` print a queue and a message with the same keys and the
//! same values (one type each behind both), and message ids as strings.

use std::collections::BTreeSet;

use hopper_tests::{run_cli, Broker, Http};
use serde_json::{json, Value};

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap_or_else(|| panic!("not an object: {value}")).keys().cloned().collect()
}

#[tokio::test]
async fn http_and_cli_print_the_same_queue_and_message() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("jobs.dead", json!({})).await;
    http.declare("jobs", json!({"dead_letter": "jobs.dead", "max_length": 10, "alarm_depth": 5})).await;
    let request = json!({"body": "hello", "headers": {"k": "v"}});
    let published = http.post_json("/api/queues/jobs/messages", &request).await.assert_status(201).json();
    let id = published["message_id"].as_str().expect("the id is a string").to_owned();

    let from_http = http.queue("jobs").await;
    let from_cli = run_cli(&broker, &["queue", "stats", "jobs", "--json"]).await.assert_success().json();
    assert_eq!(keys(&from_http), keys(&from_cli));
    assert_eq!(from_http, from_cli, "the same values too");
    let dead = run_cli(&broker, &["queue", "list", "--json"]).await.assert_success().json();
    assert_eq!(dead[1]["name"], "jobs.dead");
    assert_eq!(dead[1]["is_dead_letter_queue"], true);

    let peeked_http = http.get_json("/api/queues/jobs/peek").await["messages"][0].clone();
    let peeked_cli =
        run_cli(&broker, &["queue", "peek", "jobs", "--json"]).await.assert_success().json_lines();
    assert_eq!(keys(&peeked_http), keys(&peeked_cli[0]));
    assert_eq!(peeked_http, peeked_cli[0]);
    assert_eq!(peeked_http["message_id"], Value::String(id.clone()));

    // A delivery adds one key: the CLI's consumer its delivery tag, an HTTP pull its receipt.
    let pulled = http.pull("jobs", 1, "&visibility=0.05").await[0].clone();
    let mut pulled_keys = keys(&pulled);
    assert!(pulled_keys.remove("receipt"));
    let consumed = run_cli(&broker, &["consume", "jobs", "--count", "1", "--json"]).await;
    let consumed = consumed.assert_success().json_lines()[0].clone();
    let mut consumed_keys = keys(&consumed);
    assert!(consumed_keys.remove("delivery_tag"));
    assert_eq!(pulled_keys, consumed_keys);
    assert_eq!(pulled_keys, keys(&peeked_http));
    assert_eq!(consumed["message_id"], Value::String(id));
}
