//! The `hopper` command against a real broker: queue management, publish, consume and how
//! it reports errors.

use std::collections::{BTreeSet, HashMap};

use hopper_client::{ConsumeOptions, PublishOptions, QueueOptions};
use hopper_tests::{
    body_text, cli, cli_at, connect, json_id, next_deliveries, next_delivery, publish_all, run, run_cli,
    run_with_stdin, stats_eventually, Broker,
};

const QUEUE_KEYS: [&str; 9] =
    ["name", "durable", "ready", "unacked", "consumers", "published", "delivered", "acked", "redelivered"];
const DELIVERY_KEYS: [&str; 6] = ["body", "headers", "redelivered", "delivery_count", "queue", "message_id"];

fn keys(value: &serde_json::Value) -> BTreeSet<&str> {
    value.as_object().expect("a JSON object").keys().map(String::as_str).collect()
}

#[tokio::test]
async fn queue_commands_declare_list_stats_purge_and_delete() {
    let broker = Broker::start();
    run_cli(&broker, &["queue", "declare", "orders", "--durable"]).await.assert_success();
    run_cli(&broker, &["queue", "declare", "orders", "--durable"]).await.assert_success();
    run_cli(&broker, &["queue", "declare", "audit"]).await.assert_success();
    let conflict = run_cli(&broker, &["queue", "declare", "orders"]).await;
    let line = conflict.assert_one_line_error();
    assert!(line.contains("PRECONDITION_FAILED"), "{line}");

    let conn = connect(&broker).await;
    publish_all(&conn, "orders", ["1", "2", "3"]).await;
    let mut consumer =
        conn.consume("orders", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let held = next_delivery(&mut consumer).await;
    stats_eventually(&conn, "orders", |info| info.unacked == 1).await;

    let list = run_cli(&broker, &["queue", "list", "--json"]).await;
    list.assert_success();
    let queues = list.json();
    let queues = queues.as_array().expect("a JSON array");
    assert_eq!(queues.len(), 2, "{list}");
    for queue in queues {
        let present = keys(queue);
        assert!(QUEUE_KEYS.iter().all(|k| present.contains(k)), "at least the documented keys: {list}");
    }
    let orders = queues.iter().find(|q| q["name"] == "orders").expect("orders is listed");
    assert_eq!(orders["durable"], true);
    assert_eq!((orders["ready"].as_u64(), orders["unacked"].as_u64()), (Some(2), Some(1)), "{list}");
    assert_eq!((orders["consumers"].as_u64(), orders["published"].as_u64()), (Some(1), Some(3)), "{list}");
    assert_eq!(orders["delivered"].as_u64(), Some(1), "{list}");
    let audit = queues.iter().find(|q| q["name"] == "audit").expect("audit is listed");
    assert_eq!(audit["durable"], false);

    let stats = run_cli(&broker, &["queue", "stats", "orders", "--json"]).await;
    stats.assert_success();
    assert_eq!(&stats.json(), orders, "stats and list agree");
    run_cli(&broker, &["queue", "list"]).await.assert_success();
    run_cli(&broker, &["queue", "stats", "orders"]).await.assert_success();

    let purge = run_cli(&broker, &["queue", "purge", "orders"]).await;
    purge.assert_success();
    assert!(purge.stdout.contains('2'), "purge says how many: {purge}");
    let info = conn.queue_stats("orders").await.unwrap();
    assert_eq!((info.ready, info.unacked), (0, 1), "purge leaves unacked deliveries: {info:?}");
    held.ack().await.unwrap();

    run_cli(&broker, &["queue", "delete", "audit"]).await.assert_success();
    run_cli(&broker, &["queue", "delete", "orders"]).await.assert_success();
    let list = run_cli(&broker, &["queue", "list", "--json"]).await;
    assert_eq!(list.assert_success().json(), serde_json::json!([]));
}

#[tokio::test]
async fn publish_sends_each_argument_as_a_message_with_headers() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("in", QueueOptions::default()).await.unwrap();
    let publish = run_cli(
        &broker,
        &["publish", "in", "first", "second message", "--header", "k=v", "--header", "trace=1=2"],
    )
    .await;
    publish.assert_success();
    assert!(publish.stdout.is_empty(), "stdout stays empty: {publish}");

    let mut consumer = conn.consume("in", ConsumeOptions::default()).await.unwrap();
    let got = next_deliveries(&mut consumer, 2).await;
    let bodies: Vec<String> = got.iter().map(body_text).collect();
    assert_eq!(bodies, ["first", "second message"]);
    let headers: HashMap<String, String> =
        [("k", "v"), ("trace", "1=2")].map(|(k, v)| (k.into(), v.into())).into();
    assert!(got.iter().all(|d| d.headers == headers), "{got:?}");
    assert_eq!(conn.queue_stats("in").await.unwrap().published_total, 2);
}

#[tokio::test]
async fn publish_without_bodies_sends_one_message_per_stdin_line() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("lines", QueueOptions::default()).await.unwrap();
    let mut publish = cli(&broker);
    publish.args(["publish", "lines"]);
    run_with_stdin(publish, Some("one\ntwo\r\n\nfour")).await.assert_success();

    let mut consumer = conn.consume("lines", ConsumeOptions::default()).await.unwrap();
    let bodies: Vec<String> = next_deliveries(&mut consumer, 4).await.iter().map(body_text).collect();
    assert_eq!(bodies, ["one", "two", "", "four"]);
    assert_eq!(conn.queue_stats("lines").await.unwrap().published_total, 4);
}

#[tokio::test]
async fn publish_to_an_unknown_queue_fails_saying_how_many_were_not_confirmed() {
    let broker = Broker::start();
    let output = run_cli(&broker, &["publish", "nowhere", "a", "b", "c"]).await;
    let line = output.assert_one_line_error();
    assert!(line.contains('3') && line.contains("not confirmed"), "{line}");
    assert!(line.contains("nowhere"), "{line}");
}

#[tokio::test]
async fn consume_count_json_prints_one_object_per_message_and_acks() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("out", QueueOptions::default()).await.unwrap();
    let headers: HashMap<String, String> = [("k".to_string(), "v".to_string())].into();
    let mut ids = Vec::new();
    for body in ["alpha", "beta", "gamma", "delta"] {
        let options = PublishOptions { headers: headers.clone(), ..Default::default() };
        ids.push(conn.publish("out", body, options).await.unwrap());
    }

    let output = run_cli(&broker, &["consume", "out", "--count", "3", "--json", "--prefetch", "3"]).await;
    output.assert_success();
    let lines = output.json_lines();
    assert_eq!(lines.len(), 3, "{output}");
    for (i, (line, body)) in lines.iter().zip(["alpha", "beta", "gamma"]).enumerate() {
        let present = keys(line);
        assert!(DELIVERY_KEYS.iter().all(|k| present.contains(k)), "keys of {line}");
        assert_eq!(line["body"], body);
        assert_eq!(line["headers"], serde_json::json!({"k": "v"}));
        assert_eq!(line["redelivered"], false);
        assert_eq!(line["delivery_count"], 1);
        assert_eq!(line["queue"], "out");
        assert_eq!(json_id(&line["message_id"]), Some(ids[i]));
    }
    // The default action acks: only the fourth message is left.
    let info = stats_eventually(&conn, "out", |info| info.acked_total == 3 && info.unacked == 0).await;
    assert_eq!(info.ready, 1, "{info:?}");
}

#[tokio::test]
async fn consume_prints_bodies_as_text_without_json() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("text", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "text", ["hello", "world"]).await;
    let output = run_cli(&broker, &["consume", "text", "--count", "2"]).await;
    assert_eq!(output.assert_success().stdout, "hello\nworld\n");
}

#[tokio::test]
async fn consume_count_waits_for_messages_published_later() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("later", QueueOptions::default()).await.unwrap();
    let mut consume = cli(&broker);
    consume.args(["consume", "later", "--count", "2", "--json"]);
    let waiting = tokio::spawn(run(consume));
    // Publish only once the CLI's consumer is subscribed.
    stats_eventually(&conn, "later", |info| info.consumers == 1).await;
    publish_all(&conn, "later", ["x", "y"]).await;
    let output = waiting.await.unwrap();
    let bodies: Vec<serde_json::Value> =
        output.assert_success().json_lines().iter().map(|l| l["body"].clone()).collect();
    assert_eq!(bodies, ["x", "y"]);
}

#[tokio::test]
async fn consume_action_requeue_puts_messages_back() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("rq", QueueOptions::default()).await.unwrap();
    let ids = publish_all(&conn, "rq", ["again"]).await;
    let output = run_cli(&broker, &["consume", "rq", "--count", "1", "--action", "requeue", "--json"]).await;
    let lines = output.assert_success().json_lines();
    assert_eq!(lines.len(), 1, "{output}");
    assert_eq!(json_id(&lines[0]["message_id"]), Some(ids[0]));

    let info = stats_eventually(&conn, "rq", |info| info.consumers == 0 && info.unacked == 0).await;
    assert_eq!((info.ready, info.acked_total), (1, 0), "{info:?}");
    let mut consumer = conn.consume("rq", ConsumeOptions::default()).await.unwrap();
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.message_id, ids[0]);
    assert!(delivery.redelivered);
}

#[tokio::test]
async fn consume_action_reject_drops_messages() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_queue("rj", QueueOptions::default()).await.unwrap();
    publish_all(&conn, "rj", ["bad", "worse"]).await;
    let output =
        run_cli(&broker, &["consume", "rj", "--count", "2", "--action", "reject", "--prefetch", "2"]).await;
    assert_eq!(output.assert_success().stdout, "bad\nworse\n");
    let info = stats_eventually(&conn, "rj", |info| info.consumers == 0 && info.unacked == 0).await;
    assert_eq!((info.ready, info.acked_total, info.redelivered_total), (0, 0, 0), "{info:?}");
}

#[tokio::test]
async fn unreachable_broker_is_a_one_line_error() {
    let free = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    for args in [&["queue", "list"][..], &["publish", "q", "x"], &["consume", "q", "--count", "1"]] {
        let mut command = cli_at(&free);
        command.args(args);
        let output = run(command).await;
        let line = output.assert_one_line_error();
        assert!(line.contains(&free), "{args:?}: the error names the address: {line}");
    }
}

#[tokio::test]
async fn unknown_queue_is_a_one_line_error() {
    let broker = Broker::start();
    for args in [
        &["queue", "stats", "ghost"][..],
        &["queue", "purge", "ghost"],
        &["queue", "delete", "ghost"],
        &["consume", "ghost", "--count", "1"],
    ] {
        let output = run_cli(&broker, args).await;
        let line = output.assert_one_line_error();
        assert!(line.contains("ghost"), "{args:?}: {line}");
    }
}
