//! Failure handling through the `hopper` command (queue arguments, deaths in `consume --json`,
//! `get`, `audit`, `queue stats`) and the client's `email_worker` and `signup_producer`
//! examples against a real broker.

use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;

use hopper_tests::{
    connect, example_command, run, run_cli, send_signal, stats_eventually, take_ready, unix_ms, within,
    Broker, CliOutput,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The keys of a message printed by `consume --json` and `get --json`.
const DELIVERY_KEYS: [&str; 14] = [
    "body",
    "content_type",
    "death",
    "deaths",
    "delivery_count",
    "delivery_tag",
    "exchange",
    "headers",
    "message_id",
    "published_at_ms",
    "queue",
    "redelivered",
    "replay_count",
    "routing_key",
];
/// The keys of a death in `consume --json`.
const DEATH_KEYS: [&str; 9] =
    ["count", "died_at", "error", "exchange", "first_time", "last_time", "queue", "reason", "routing_key"];
/// The keys of an event printed by `audit --json`.
const AUDIT_KEYS: [&str; 11] = [
    "connection_id",
    "consumer_id",
    "count",
    "dead_letter",
    "error",
    "exchange",
    "message_id",
    "queue",
    "reason",
    "routing_key",
    "time_ms",
];

const POISON_ERROR: &str = "invalid job: missing field `name` at line 1 column 27";

fn keys(value: &Value) -> BTreeSet<&str> {
    value.as_object().unwrap_or_else(|| panic!("a JSON object: {value}")).keys().map(String::as_str).collect()
}

#[track_caller]
fn assert_keys(value: &Value, expected: &[&str]) {
    assert_eq!(keys(value), expected.iter().copied().collect(), "{value}");
}

/// Runs `hopper` with `args` and returns its output, which must be a success.
async fn hopper(broker: &Broker, args: &[&str]) -> CliOutput {
    let output = run_cli(broker, args).await;
    output.assert_success();
    output
}

/// Checks a `death` object printed by `consume --json` and returns its `died_at`.
#[track_caller]
fn assert_death(death: &Value, reason: &str, count: u64, error: &str, not_before: u64) -> u64 {
    assert_keys(death, &DEATH_KEYS);
    assert_eq!((death["reason"].as_str(), death["queue"].as_str()), (Some(reason), Some("jobs")), "{death}");
    assert_eq!((death["count"].as_u64(), death["error"].as_str()), (Some(count), Some(error)), "{death}");
    let time = |key: &str| death[key].as_u64().unwrap_or_else(|| panic!("{key} is a number: {death}"));
    assert!(not_before <= time("first_time"), "{death}");
    assert!(time("first_time") <= time("last_time") && time("last_time") <= time("died_at"), "{death}");
    time("died_at")
}

#[tokio::test]
async fn consume_json_shows_each_death_and_audit_json_lists_it() {
    let broker = Broker::start();
    hopper(&broker, &["queue", "declare", "jobs.dead"]).await;
    hopper(&broker, &["queue", "declare", "jobs", "--dead-letter", "jobs.dead", "--max-deliveries", "2"])
        .await;
    let before = unix_ms();
    // Alone in the queue, so that the consumer gets nothing beyond the message it prints.
    hopper(&broker, &["publish", "jobs", "poison"]).await;
    let rejected =
        hopper(&broker, &["consume", "jobs", "--count", "1", "--action", "reject", "--error", POISON_ERROR])
            .await;
    assert_eq!(rejected.stdout, "poison\n");

    hopper(&broker, &["publish", "jobs", "flaky"]).await;
    for attempt in 1..=2u64 {
        let error = format!("smtp timeout {attempt}");
        let got = hopper(&broker, &["get", "jobs", "--action", "requeue", "--error", &error, "--json"]).await;
        let lines = got.json_lines();
        assert_eq!(lines.len(), 1, "{got}");
        assert_keys(&lines[0], &DELIVERY_KEYS);
        assert_eq!(
            (lines[0]["body"].as_str(), lines[0]["delivery_count"].as_u64()),
            (Some("flaky"), Some(attempt))
        );
        assert_eq!((&lines[0]["death"], &lines[0]["deaths"]), (&Value::Null, &json!([])), "never died");
    }

    let dead = hopper(&broker, &["consume", "jobs.dead", "--count", "2", "--json"]).await;
    let dead = dead.json_lines();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for message in &dead {
        assert_keys(message, &DELIVERY_KEYS);
        assert_eq!(
            (message["queue"].as_str(), message["delivery_count"].as_u64()),
            (Some("jobs.dead"), Some(1))
        );
        assert_eq!(message["deaths"], json!([message["death"]]), "one death, the latest");
    }
    assert_eq!(dead[0]["body"], "poison");
    let poison_died = assert_death(&dead[0]["death"], "rejected", 1, POISON_ERROR, before);
    assert_eq!(dead[0]["death"]["first_time"], dead[0]["death"]["last_time"]);
    assert_eq!(dead[1]["body"], "flaky");
    let flaky_died = assert_death(&dead[1]["death"], "delivery_limit", 2, "smtp timeout 2", before);

    let audit = hopper(&broker, &["audit", "--json"]).await;
    let events = audit.json_lines();
    assert_eq!(events.len(), 2, "{audit}");
    let expected = [
        (&dead[0], "rejected", 1, POISON_ERROR, poison_died),
        (&dead[1], "delivery_limit", 2, "smtp timeout 2", flaky_died),
    ];
    for (event, (message, reason, count, error, died)) in events.iter().zip(expected) {
        assert_keys(event, &AUDIT_KEYS);
        assert_eq!(
            (event["queue"].as_str(), event["dead_letter"].as_str()),
            (Some("jobs"), Some("jobs.dead"))
        );
        assert_eq!(event["message_id"], message["message_id"], "{event}");
        assert_eq!(
            (event["reason"].as_str(), event["count"].as_u64()),
            (Some(reason), Some(count)),
            "{event}"
        );
        assert_eq!(
            (event["error"].as_str(), event["time_ms"].as_u64()),
            (Some(error), Some(died)),
            "{event}"
        );
        assert!(
            event["consumer_id"].as_u64() > Some(0) && event["connection_id"].as_u64() > Some(0),
            "{event}"
        );
    }
    let recent = hopper(&broker, &["audit", "--queue", "jobs", "--since", "1h", "--json"]).await;
    assert_eq!(recent.json_lines(), events);
    let elsewhere = hopper(&broker, &["audit", "--queue", "jobs.dead", "--json"]).await;
    assert_eq!(elsewhere.stdout, "", "{elsewhere}");
    let table = hopper(&broker, &["audit"]).await;
    for text in ["rejected", "delivery_limit", "smtp timeout 2", "jobs.dead"] {
        assert!(table.stdout.contains(text), "the table shows {text:?}:\n{table}");
    }
}

#[tokio::test]
async fn queue_stats_json_shows_the_arguments_and_the_delayed_and_dead_lettered_counts() {
    let broker = Broker::start();
    hopper(&broker, &["queue", "declare", "jobs.dead"]).await;
    let declare = [
        "queue",
        "declare",
        "jobs",
        "--dead-letter",
        "jobs.dead",
        "--max-deliveries",
        "3",
        "--retry-backoff",
        "200ms,1s",
        "--message-ttl",
        "1h",
        "--ack-timeout",
        "30s",
    ];
    hopper(&broker, &declare).await;
    let stats = hopper(&broker, &["queue", "stats", "jobs", "--json"]).await.json();
    assert_eq!(
        (stats["dead_letter"].as_str(), stats["max_deliveries"].as_u64()),
        (Some("jobs.dead"), Some(3))
    );
    assert_eq!(stats["retry_backoff_ms"], json!([200, 1000]), "{stats}");
    assert_eq!(
        (stats["message_ttl_ms"].as_u64(), stats["ack_timeout_ms"].as_u64()),
        (Some(3_600_000), Some(30_000))
    );
    assert_eq!((stats["delayed"].as_u64(), &stats["dead_lettered"]), (Some(0), &json!({})), "{stats}");

    hopper(&broker, &["publish", "jobs", "unparseable"]).await;
    let got = hopper(&broker, &["get", "jobs", "--action", "reject", "--error", "not JSON", "--json"]).await;
    assert_eq!(got.json_lines()[0]["body"], "unparseable");
    hopper(&broker, &["publish", "jobs", "--delay", "60s", "later"]).await;
    hopper(&broker, &["publish", "jobs", "--ttl", "100ms", "short-lived"]).await;
    let conn = connect(&broker).await;
    stats_eventually(&conn, "jobs", |info| info.dead_lettered.get("expired") == Some(&1)).await;

    let stats = hopper(&broker, &["queue", "stats", "jobs", "--json"]).await.json();
    assert_eq!((stats["delayed"].as_u64(), stats["ready"].as_u64()), (Some(1), Some(0)), "{stats}");
    assert_eq!(stats["dead_lettered"], json!({"expired": 1, "rejected": 1}), "{stats}");
    assert_eq!(stats["published"].as_u64(), Some(3), "{stats}");
    let list = hopper(&broker, &["queue", "list", "--json"]).await.json();
    let listed =
        list.as_array().expect("an array").iter().find(|q| q["name"] == "jobs").expect("jobs is listed");
    assert_eq!(listed, &stats, "list and stats agree");
    let table = hopper(&broker, &["queue", "stats", "jobs"]).await;
    assert!(table.stdout.lines().any(|l| l.starts_with("delayed:") && l.ends_with(" 1")), "{table}");

    let dead = take_ready(&conn, "jobs.dead", 2).await;
    let reasons: Vec<(&str, &str)> = dead
        .iter()
        .map(|d| d.last_death().map_or(("", ""), |x| (x.reason.as_str(), x.error.as_str())))
        .collect();
    assert_eq!(reasons, [("rejected", "not JSON"), ("expired", "")]);
}

#[tokio::test]
async fn get_pulls_once_and_a_held_message_returns_as_a_failed_delivery() {
    let broker = Broker::start();
    hopper(&broker, &["queue", "declare", "jobs"]).await;
    let empty = hopper(&broker, &["get", "jobs", "--wait", "200ms"]).await;
    assert_eq!(empty.stdout, "", "{empty}");
    assert!(empty.stderr.contains("no messages"), "{empty}");

    hopper(&broker, &["publish", "jobs", "one", "two"]).await;
    let got = hopper(&broker, &["get", "jobs", "--count", "5", "--json"]).await;
    let lines = got.json_lines();
    let bodies: Vec<&str> = lines.iter().filter_map(|l| l["body"].as_str()).collect();
    assert_eq!(bodies, ["one", "two"], "{got}");
    for line in &lines {
        assert_keys(line, &DELIVERY_KEYS);
        assert_eq!((line["delivery_count"].as_u64(), line["queue"].as_str()), (Some(1), Some("jobs")));
    }
    let conn = connect(&broker).await;
    stats_eventually(&conn, "jobs", |info| info.acked_total == 2 && info.unacked == 0).await;

    hopper(&broker, &["publish", "jobs", "held"]).await;
    let held = hopper(&broker, &["get", "jobs", "--action", "hold", "--visibility", "30s"]).await;
    assert_eq!(held.stdout, "held\n");
    assert!(held.stderr.contains("held 1 message"), "{held}");
    // The command disconnected holding it: back in the queue as a failed delivery.
    let again = hopper(&broker, &["get", "jobs", "--json"]).await.json_lines();
    assert_eq!((again[0]["body"].as_str(), again[0]["delivery_count"].as_u64()), (Some("held"), Some(2)));
    assert_eq!(again[0]["redelivered"], true);
}

/// `consume --count N` must not cost delivery attempts of messages beyond the N it prints.
#[tokio::test]
async fn consume_with_a_count_costs_nothing_to_the_messages_it_does_not_print() {
    let broker = Broker::start();
    hopper(&broker, &["queue", "declare", "jobs.dead"]).await;
    hopper(&broker, &["queue", "declare", "jobs", "--dead-letter", "jobs.dead", "--max-deliveries", "2"])
        .await;
    hopper(&broker, &["publish", "jobs", "first", "second"]).await;
    assert_eq!(hopper(&broker, &["consume", "jobs", "--count", "1"]).await.stdout, "first\n");
    let stats = hopper(&broker, &["queue", "stats", "jobs", "--json"]).await.json();
    assert_eq!((stats["delivered"].as_u64(), stats["redelivered"].as_u64()), (Some(1), Some(0)), "{stats}");
    let next = hopper(&broker, &["consume", "jobs", "--count", "1", "--json"]).await.json_lines();
    assert_eq!((next[0]["body"].as_str(), next[0]["delivery_count"].as_u64()), (Some("second"), Some(1)));

    hopper(&broker, &["publish", "jobs", "retry me"]).await;
    let requeue = ["consume", "jobs", "--count", "1", "--action", "requeue", "--error", "later"];
    hopper(&broker, &requeue).await;
    let again = hopper(&broker, &["consume", "jobs", "--count", "1", "--json"]).await.json_lines();
    assert_eq!(again[0]["delivery_count"].as_u64(), Some(2), "one run, one attempt: {:?}", again[0]);
}

/// The text between `start` and `end` in the first line of `lines` that has both.
fn between<'a>(lines: &'a [String], start: &str, end: &str) -> Option<&'a str> {
    lines.iter().find_map(|line| {
        let (_, rest) = line.split_once(start)?;
        let (inner, _) = rest.rsplit_once(end)?;
        Some(inner)
    })
}

#[tokio::test]
async fn email_worker_dead_letters_the_poison_job_with_its_parse_error_and_sends_the_rest() {
    let broker = Broker::start();
    let server = broker.addr().to_string();
    let mut worker = example_command("email_worker");
    worker.env("HOPPER_SERVER", &server);
    let mut worker = tokio::process::Command::from(worker)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn email_worker");
    let mut stdout = BufReader::new(worker.stdout.take().expect("stdout is piped")).lines();
    let mut stderr = BufReader::new(worker.stderr.take().expect("stderr is piped")).lines();
    let stderr_lines = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            lines.push(line);
        }
        lines
    });
    let mut printed = Vec::new();
    within("the worker to start consuming", async {
        while let Some(line) = stdout.next_line().await.expect("read the worker's stdout") {
            let ready = line.starts_with("waiting for emails");
            printed.push(line);
            if ready {
                return;
            }
        }
        panic!("the worker exited before consuming: {printed:?}");
    })
    .await;

    let mut producer = example_command("signup_producer");
    producer.env("HOPPER_SERVER", &server).args(["3", "--poison"]);
    let produced = run(producer).await;
    produced.assert_success();
    let ids: HashMap<u64, u64> = produced
        .stdout
        .lines()
        .map(|line| {
            let (user, id) = line
                .strip_prefix("user ")
                .and_then(|rest| rest.split_once(": welcome email queued as message "))
                .unwrap_or_else(|| panic!("unexpected producer line {line:?}:\n{produced}"));
            (user.parse().expect("a user number"), id.parse().expect("a message id"))
        })
        .collect();
    assert_eq!(ids.len(), 4, "three signups and the poison job:\n{produced}");

    // Every 3rd send fails and is retried after the queue's 1 s backoff; the poison job is
    // rejected at once.
    let conn = connect(&broker).await;
    let info = stats_eventually(&conn, "emails", |info| {
        info.acked_total == 3 && info.ready == 0 && info.unacked == 0 && info.delayed == 0
    })
    .await;
    assert_eq!(info.dead_lettered, HashMap::from([("rejected".to_string(), 1)]), "{info:?}");
    let dead = take_ready(&conn, "emails.dead", 1).await;
    assert_eq!(dead[0].message_id, ids[&4], "the poison job");
    let death = dead[0].last_death().expect("a death");
    assert_eq!((death.queue.as_str(), death.reason.as_str(), death.count), ("emails", "rejected", 1));
    assert!(death.error.contains("missing field `name`"), "the parse error: {death:?}");

    send_signal(worker.id().expect("the worker is running"), "INT");
    let status = within("the worker to stop", worker.wait()).await.expect("reap the worker");
    while let Some(line) = stdout.next_line().await.expect("read the worker's stdout") {
        printed.push(line);
    }
    let stderr = within("the worker's stderr", stderr_lines).await.expect("the stderr reader");
    assert!(status.success(), "{status}; stdout: {printed:#?}; stderr: {stderr:#?}");
    assert!(printed.iter().any(|l| l == "shutting down"), "{printed:#?}");
    for user in 1..=3 {
        let sent = format!("sent 'welcome' email to User {user} <user{user}@example.com> (user {user})");
        assert!(printed.contains(&sent), "{sent:?} in {printed:#?}");
    }
    let logged = format!("message {} is not a welcome-email job (", ids[&4]);
    let parse_error =
        between(&stderr, &logged, "); dead-lettering it").expect("the worker logs the poison job");
    assert_eq!(death.error, parse_error, "the death carries the worker's parse error");
    assert_eq!(conn.audit(Some("emails"), 0, 0).await.unwrap()[0].error, parse_error);
}
