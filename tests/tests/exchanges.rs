//! Routing through exchanges, end to end: the RabbitMQ tutorial patterns (work queue,
//! publish/subscribe, routing, topics, headers, exchange to exchange), mandatory returns,
//! alternate exchanges, dead-lettering through an exchange, fanout confirms, and a topology
//! that survives restarts and `kill -9`.

use std::collections::HashMap;

use futures::StreamExt;
use hopper_client::{
    Connection, ConsumeOptions, ErrorCode, ExchangeKind, ExchangeOptions, NackOptions, PublishOptions,
    QueueOptions,
};
use hopper_tests::{connect, run_cli, stats_eventually, within, Broker};

/// Declares queues with default options.
async fn queues(conn: &Connection, names: &[&str]) {
    for name in names {
        conn.declare_queue(name, QueueOptions::default()).await.unwrap();
    }
}

/// Publishes through `exchange` with `key`; returns the message id.
async fn publish(conn: &Connection, exchange: &str, key: &str, body: &str) -> u64 {
    within("a publish confirm", conn.publish_to(exchange, key, body.to_string(), PublishOptions::default()))
        .await
        .expect("confirmed")
}

/// The bodies waiting in `queue`, in order (taken and acked, durably).
async fn drain(conn: &Connection, queue: &str) -> Vec<String> {
    let ready = conn.queue_stats(queue).await.unwrap().ready as usize;
    if ready == 0 {
        return Vec::new();
    }
    let options = ConsumeOptions { confirm_settlements: true, ..Default::default() };
    let mut consumer = conn.consume(queue, options).await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..ready {
        let delivery = within("a delivery", consumer.next()).await.unwrap().unwrap();
        bodies.push(String::from_utf8_lossy(&delivery.body).into_owned());
        delivery.ack().await.unwrap();
    }
    consumer.cancel().await.unwrap();
    bodies
}

fn no_args() -> HashMap<String, String> {
    HashMap::new()
}

#[tokio::test]
async fn the_default_exchange_is_a_work_queue() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    queues(&conn, &["task_queue"]).await;
    publish(&conn, "", "task_queue", "Hello World...").await;
    assert_eq!(drain(&conn, "task_queue").await, ["Hello World..."]);
    // Unroutable through the default exchange: dropped, or returned when mandatory.
    let options = PublishOptions { mandatory: true, ..Default::default() };
    let returned = conn.publish_to("", "nobody", "lost", options).await.unwrap_err();
    assert_eq!(returned.code(), Some(ErrorCode::NoRoute), "{returned}");
}

#[tokio::test]
async fn fanout_publishes_to_every_subscriber() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_exchange("logs", ExchangeKind::Fanout, ExchangeOptions::default()).await.unwrap();
    queues(&conn, &["screen", "disk"]).await;
    conn.bind_queue("screen", "logs", "", no_args()).await.unwrap();
    conn.bind_queue("disk", "logs", "ignored", no_args()).await.unwrap();
    publish(&conn, "logs", "", "info: Hello World!").await;
    assert_eq!(drain(&conn, "screen").await, ["info: Hello World!"]);
    assert_eq!(drain(&conn, "disk").await, ["info: Hello World!"]);
}

#[tokio::test]
async fn direct_routes_by_severity() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_exchange("direct_logs", ExchangeKind::Direct, ExchangeOptions::default()).await.unwrap();
    queues(&conn, &["errors", "everything"]).await;
    conn.bind_queue("errors", "direct_logs", "error", no_args()).await.unwrap();
    for severity in ["info", "warning", "error"] {
        conn.bind_queue("everything", "direct_logs", severity, no_args()).await.unwrap();
    }
    for (severity, text) in [("info", "a"), ("error", "b"), ("warning", "c"), ("debug", "d")] {
        publish(&conn, "direct_logs", severity, text).await;
    }
    assert_eq!(drain(&conn, "errors").await, ["b"]);
    assert_eq!(drain(&conn, "everything").await, ["a", "b", "c"]);
}

#[tokio::test]
async fn topics_route_like_the_tutorial() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_exchange("topic_logs", ExchangeKind::Topic, ExchangeOptions::default()).await.unwrap();
    queues(&conn, &["q1", "q2"]).await;
    conn.bind_queue("q1", "topic_logs", "*.orange.*", no_args()).await.unwrap();
    conn.bind_queue("q2", "topic_logs", "*.*.rabbit", no_args()).await.unwrap();
    conn.bind_queue("q2", "topic_logs", "lazy.#", no_args()).await.unwrap();
    let keys = [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "quick.orange.fox",
        "lazy.brown.fox",
        "lazy.pink.rabbit",
        "quick.brown.fox",
        "orange",
        "quick.orange.new.rabbit",
        "lazy.orange.new.rabbit",
    ];
    for key in keys {
        publish(&conn, "topic_logs", key, key).await;
    }
    assert_eq!(drain(&conn, "q1").await, ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox"]);
    assert_eq!(
        drain(&conn, "q2").await,
        [
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "lazy.brown.fox",
            "lazy.pink.rabbit",
            "lazy.orange.new.rabbit"
        ],
        "lazy.pink.rabbit matches both of q2's bindings and arrives once"
    );
}

#[tokio::test]
async fn headers_match_all_or_any() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_exchange("matcher", ExchangeKind::Headers, ExchangeOptions::default()).await.unwrap();
    queues(&conn, &["all", "any"]).await;
    let args = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    conn.bind_queue("all", "matcher", "", args(&[("format", "pdf"), ("type", "report")])).await.unwrap();
    let any = args(&[("format", "pdf"), ("type", "log"), ("x-match", "any")]);
    conn.bind_queue("any", "matcher", "", any).await.unwrap();
    for (body, headers) in [
        ("pdf report", vec![("format", "pdf"), ("type", "report")]),
        ("pdf", vec![("format", "pdf")]),
        ("log", vec![("type", "log")]),
        ("zip", vec![("format", "zip")]),
    ] {
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let options = PublishOptions { headers, ..Default::default() };
        conn.publish_to("matcher", "", body.to_string(), options).await.unwrap();
    }
    assert_eq!(drain(&conn, "all").await, ["pdf report"]);
    assert_eq!(drain(&conn, "any").await, ["pdf report", "pdf", "log"]);
}

#[tokio::test]
async fn exchanges_bound_to_exchanges_route_transitively_and_once() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_exchange("events", ExchangeKind::Topic, ExchangeOptions::default()).await.unwrap();
    conn.declare_exchange("orders", ExchangeKind::Fanout, ExchangeOptions::default()).await.unwrap();
    queues(&conn, &["billing", "audit"]).await;
    conn.bind_exchange("orders", "events", "order.#", no_args()).await.unwrap();
    // A cycle back: harmless.
    conn.bind_exchange("events", "orders", "", no_args()).await.unwrap();
    conn.bind_queue("billing", "orders", "", no_args()).await.unwrap();
    conn.bind_queue("audit", "events", "#", no_args()).await.unwrap();
    conn.bind_queue("audit", "orders", "", no_args()).await.unwrap();
    publish(&conn, "events", "order.eu.paid", "paid").await;
    publish(&conn, "events", "user.signup", "signup").await;
    assert_eq!(drain(&conn, "billing").await, ["paid"]);
    assert_eq!(drain(&conn, "audit").await, ["paid", "signup"], "each queue takes a message once");
}

#[tokio::test]
async fn mandatory_returns_alternates_catch_and_the_rest_is_counted() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_exchange("unrouted", ExchangeKind::Fanout, ExchangeOptions::default()).await.unwrap();
    let with_alternate = ExchangeOptions { alternate: Some("unrouted".into()), ..Default::default() };
    conn.declare_exchange("orders", ExchangeKind::Direct, with_alternate).await.unwrap();
    conn.declare_exchange("plain", ExchangeKind::Direct, ExchangeOptions::default()).await.unwrap();
    queues(&conn, &["paid", "lost"]).await;
    conn.bind_queue("paid", "orders", "paid", no_args()).await.unwrap();
    conn.bind_queue("lost", "unrouted", "", no_args()).await.unwrap();

    publish(&conn, "orders", "paid", "p").await;
    publish(&conn, "orders", "refunded", "r").await;
    assert_eq!(drain(&conn, "paid").await, ["p"]);
    assert_eq!(drain(&conn, "lost").await, ["r"], "the alternate exchange took it");

    publish(&conn, "plain", "nowhere", "dropped").await;
    let options = PublishOptions { mandatory: true, ..Default::default() };
    let returned = conn.publish_to("plain", "nowhere", "returned", options).await.unwrap_err();
    assert_eq!(returned.code(), Some(ErrorCode::NoRoute), "{returned}");
    assert!(returned.to_string().contains("nowhere"), "{returned}");
    let plain = conn.list_exchanges().await.unwrap().into_iter().find(|x| x.name == "plain").unwrap();
    assert_eq!((plain.published_total, plain.unroutable_total, plain.returned_total), (2, 2, 1));
    let missing = conn.publish_to("ghost", "k", "x", PublishOptions::default()).await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn a_fanout_confirm_is_negative_and_names_the_queue_that_refused() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_exchange("wide", ExchangeKind::Fanout, ExchangeOptions::default()).await.unwrap();
    conn.declare_queue("kept", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    conn.declare_queue("full", QueueOptions { max_length: Some(1), ..Default::default() }).await.unwrap();
    conn.bind_queue("kept", "wide", "", no_args()).await.unwrap();
    conn.bind_queue("full", "wide", "", no_args()).await.unwrap();
    publish(&conn, "wide", "", "first").await;
    let refused = conn.publish_to("wide", "", "second", PublishOptions::default()).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::ResourceLimit), "{refused}");
    assert!(refused.to_string().contains("'full'"), "names the full queue: {refused}");
    assert_eq!(conn.queue_stats("kept").await.unwrap().ready, 2, "the other queue took it");
}

#[tokio::test]
async fn dead_letters_go_through_an_exchange_with_their_routing_recorded() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_exchange("dlx", ExchangeKind::Direct, ExchangeOptions::default()).await.unwrap();
    conn.declare_exchange("work", ExchangeKind::Direct, ExchangeOptions::default()).await.unwrap();
    queues(&conn, &["failed"]).await;
    let options = QueueOptions {
        dead_letter_exchange: Some("dlx".into()),
        dead_letter_routing_key: Some("jobs.failed".into()),
        ..Default::default()
    };
    conn.declare_queue("jobs", options).await.unwrap();
    conn.bind_queue("jobs", "work", "job", no_args()).await.unwrap();
    conn.bind_queue("failed", "dlx", "jobs.failed", no_args()).await.unwrap();
    let id = publish(&conn, "work", "job", "boom").await;
    let mut consumer = conn.consume("jobs", ConsumeOptions::default()).await.unwrap();
    let delivery = within("the job", consumer.next()).await.unwrap().unwrap();
    assert_eq!((delivery.exchange.as_str(), delivery.routing_key.as_str()), ("work", "job"));
    delivery.nack_with(false, NackOptions { error: "bad job".into(), ..Default::default() }).await.unwrap();

    stats_eventually(&conn, "failed", |info| info.ready == 1).await;
    let mut dead = conn.consume("failed", ConsumeOptions::default()).await.unwrap();
    let delivery = within("the dead job", dead.next()).await.unwrap().unwrap();
    assert_eq!(delivery.message_id, id);
    assert_eq!((delivery.exchange.as_str(), delivery.routing_key.as_str()), ("dlx", "jobs.failed"));
    let death = delivery.deaths.last().unwrap();
    assert_eq!((death.queue.as_str(), death.reason.as_str()), ("jobs", "rejected"));
    assert_eq!(
        (death.exchange.as_str(), death.routing_key.as_str()),
        ("work", "job"),
        "the original routing"
    );
}

#[tokio::test]
async fn durable_topology_survives_restarts_and_kill_9_and_transient_does_not() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_in(data_dir.path(), &[]);
    let conn = connect(&broker).await;
    let durable = ExchangeOptions { durable: true, ..Default::default() };
    conn.declare_exchange("events", ExchangeKind::Topic, durable.clone()).await.unwrap();
    conn.declare_exchange("scratch", ExchangeKind::Fanout, ExchangeOptions::default()).await.unwrap();
    conn.declare_queue("kept", QueueOptions { durable: true, ..Default::default() }).await.unwrap();
    conn.declare_queue("temp", QueueOptions::default()).await.unwrap();
    conn.bind_queue("kept", "events", "order.*", no_args()).await.unwrap();
    conn.bind_queue("temp", "events", "#", no_args()).await.unwrap();
    conn.bind_queue("kept", "scratch", "", no_args()).await.unwrap();
    drop(conn);

    for crash in [false, true] {
        if crash {
            broker.kill();
        } else {
            broker.terminate();
        }
        broker.restart();
        let conn = connect(&broker).await;
        let names: Vec<String> = conn.list_exchanges().await.unwrap().into_iter().map(|x| x.name).collect();
        assert_eq!(names, ["events"], "only the durable exchange comes back (crash: {crash})");
        let bindings = conn.list_bindings(None, None).await.unwrap();
        assert_eq!(bindings.len(), 1, "{bindings:?}");
        assert_eq!((bindings[0].destination.as_str(), bindings[0].routing_key.as_str()), ("kept", "order.*"));
        publish(&conn, "events", "order.paid", "after restart").await;
        assert_eq!(drain(&conn, "kept").await, ["after restart"]);
    }
}

#[tokio::test]
async fn the_cli_declares_binds_publishes_and_lists() {
    let broker = Broker::start();
    let ok = |args: &'static [&'static str]| {
        let broker = &broker;
        async move { run_cli(broker, args).await.assert_success().stdout.clone() }
    };
    ok(&["exchange", "declare", "events", "--type", "topic", "--durable"]).await;
    ok(&["queue", "declare", "emails"]).await;
    ok(&["bind", "emails", "events", "--key", "user.*"]).await;
    ok(&["publish", "--exchange", "events", "--routing-key", "user.signup", "welcome"]).await;
    let list = ok(&["exchange", "list"]).await;
    assert!(list.lines().nth(1).is_some_and(|l| l.starts_with("events") && l.contains("topic")), "{list}");
    let bindings = ok(&["bindings", "--exchange", "events", "--json"]).await;
    let binding: serde_json::Value = serde_json::from_str(bindings.lines().next().unwrap()).unwrap();
    assert_eq!((binding["destination"].as_str(), binding["key"].as_str()), (Some("emails"), Some("user.*")));
    let consumed = ok(&["consume", "emails", "--count", "1", "--json"]).await;
    let message: serde_json::Value = serde_json::from_str(consumed.trim()).unwrap();
    assert_eq!(
        (message["exchange"].as_str(), message["routing_key"].as_str()),
        (Some("events"), Some("user.signup"))
    );
    let returned =
        run_cli(&broker, &["publish", "--exchange", "events", "--routing-key", "x", "--mandatory", "m"])
            .await;
    assert!(!returned.success() && returned.stderr.contains("NO_ROUTE"), "{returned}");
    ok(&["unbind", "emails", "events", "--key", "user.*"]).await;
    ok(&["exchange", "delete", "events", "--if-unused"]).await;
}

#[tokio::test]
async fn a_move_can_send_messages_back_through_their_exchange() {
    let broker = Broker::start();
    let conn = connect(&broker).await;
    conn.declare_exchange("work", ExchangeKind::Direct, ExchangeOptions::default()).await.unwrap();
    queues(&conn, &["jobs.dead", "jobs.audit"]).await;
    let options = QueueOptions { dead_letter: Some("jobs.dead".into()), ..Default::default() };
    conn.declare_queue("jobs", options).await.unwrap();
    conn.bind_queue("jobs", "work", "job", no_args()).await.unwrap();
    publish(&conn, "work", "job", "retry me").await;
    let mut consumer = conn.consume("jobs", ConsumeOptions::default()).await.unwrap();
    let delivery = within("the job", consumer.next()).await.unwrap().unwrap();
    delivery.nack(false).await.unwrap();
    consumer.cancel().await.unwrap();
    stats_eventually(&conn, "jobs.dead", |info| info.ready == 1).await;

    // Bound since: a move through the exchange reaches it too.
    conn.bind_queue("jobs.audit", "work", "job", no_args()).await.unwrap();
    let moved = run_cli(&broker, &["queue", "move", "jobs.dead", "--through-exchange"]).await;
    assert!(moved.assert_success().stdout.contains("moved 1"), "{moved}");
    assert_eq!(drain(&conn, "jobs").await, ["retry me"]);
    assert_eq!(drain(&conn, "jobs.audit").await, ["retry me"]);
    assert_eq!(conn.queue_stats("jobs.dead").await.unwrap().ready, 0);
}
