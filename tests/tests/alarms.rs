//! Queue depth alarms: raised above the threshold, cleared below it, shown in the API and the
//! metrics, logged, and POSTed to a webhook that may fail without hurting the broker.

use std::time::{Duration, Instant};

use hopper_tests::{eventually, messages, receipt, Broker, Http, Received, WebhookReceiver, DEADLINE};
use serde_json::json;
use tokio::net::TcpListener;

/// How long a publish or a pull may take while webhook deliveries fail in the background.
/// Generous for a loaded machine, far below the webhook's 5 s attempt timeout and its backoff.
const PROMPT: Duration = Duration::from_secs(2);

/// Waits until `GET /api/queues/{queue}` shows the alarm `raised` (or cleared).
async fn wait_alarm(http: Http, queue: &'static str, raised: bool) {
    let what = format!("the alarm of {queue} to be {}", if raised { "raised" } else { "cleared" });
    eventually(&what, DEADLINE, move || async move { http.queue(queue).await["alarm"] == raised }).await;
}

/// The broker's log lines saying `message` about `queue`.
fn log_lines(broker: &Broker, message: &str, queue: &str) -> Vec<String> {
    let field = format!("queue={queue} ");
    broker.stderr().lines().filter(|l| l.contains(message) && l.contains(&field)).map(str::to_owned).collect()
}

/// Pulls `count` messages of `queue` and acks them.
async fn consume(http: Http, queue: &str, count: u32) {
    let pulled = http.pull(queue, count, "").await;
    assert_eq!(pulled.len(), count as usize, "{pulled:?}");
    for message in &pulled {
        http.ack(queue, &receipt(message)).await;
    }
}

/// Checks that `received` is a webhook POST of an alarm event of `kind` for `queue` at depth
/// `value`.
fn assert_alarm_post(received: &Received, kind: &str, queue: &str, value: u64) {
    let request = &received.request;
    assert_eq!((request.method.as_str(), request.path.as_str()), ("POST", "/hook"), "{request:?}");
    assert!(
        request.header("content-type").unwrap_or_default().starts_with("application/json"),
        "{request:?}"
    );
    let event = received.event();
    assert_eq!(event["kind"], kind, "{event}");
    assert_eq!(event["queue"], queue, "{event}");
    assert_eq!(event["value"], value, "{event}");
    assert!(event["time_ms"].as_u64().is_some_and(|t| t > 1_600_000_000_000), "time_ms: {event}");
    assert!(!event["detail"].as_str().unwrap_or_default().is_empty(), "detail: {event}");
}

#[tokio::test]
async fn alarm_is_raised_above_the_depth_and_cleared_below_it() {
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("q", json!({})).await;
    // A second queue whose alarm transitions mark a completed alarm check: queues are checked
    // in name order in one pass, so once the sentinel's alarm changed, "q" was checked after
    // its last change.
    http.declare("sentinel", json!({"alarm_depth": 1})).await;
    let set = http.put_json("/api/queues/q/alarm", &json!({"depth": 3})).await;
    assert_eq!(set.assert_status(200).json(), json!({"queue": "q", "alarm_depth": 3}));
    assert_eq!(http.queue("q").await["alarm_depth"], 3);

    for i in 0..3 {
        http.publish("q", &format!("m{i}")).await;
    }
    http.publish("sentinel", "s1").await;
    http.publish("sentinel", "s2").await;
    wait_alarm(http, "sentinel", true).await;
    assert_eq!(http.queue("q").await["alarm"], false, "a depth equal to the threshold raises nothing");

    http.publish("q", "m3").await;
    wait_alarm(http, "q", true).await;
    assert!(http.metrics().await.lines().any(|l| l == r#"hopper_queue_alarm{queue="q"} 1"#));
    let raised = log_lines(&broker, "queue depth alarm raised", "q");
    assert_eq!(raised.len(), 1, "one 'raised' line:\n{}", broker.stderr());
    assert!(raised[0].contains("ready=4") && raised[0].contains("threshold=3"), "{}", raised[0]);
    let listed = http.get_json("/api/queues").await;
    let row = listed.as_array().unwrap().iter().find(|q| q["name"] == "q").cloned().unwrap();
    assert_eq!((row["alarm"].clone(), row["alarm_depth"].clone()), (json!(true), json!(3)), "{row}");

    // Back at the threshold the alarm stays raised: it clears only below it.
    consume(http, "q", 1).await;
    consume(http, "sentinel", 2).await;
    wait_alarm(http, "sentinel", false).await;
    assert_eq!(http.queue("q").await["alarm"], true, "depth 3 of 3 keeps the alarm raised");

    consume(http, "q", 1).await;
    wait_alarm(http, "q", false).await;
    assert!(http.metrics().await.lines().any(|l| l == r#"hopper_queue_alarm{queue="q"} 0"#));
    let cleared = log_lines(&broker, "queue depth alarm cleared", "q");
    assert_eq!(cleared.len(), 1, "one 'cleared' line:\n{}", broker.stderr());
    assert!(cleared[0].contains("ready=2"), "{}", cleared[0]);
    assert_eq!(log_lines(&broker, "queue depth alarm raised", "q").len(), 1, "raised once only");

    // A threshold of 0 turns the alarm off.
    http.put_json("/api/queues/q/alarm", &json!({"depth": 0})).await.assert_status(200);
    assert_eq!(http.queue("q").await["alarm_depth"], json!(null));
}

#[tokio::test]
async fn webhook_receives_alarm_raised_then_cleared() {
    let mut receiver = WebhookReceiver::start().await;
    let broker = Broker::start_with(&["--alarm-webhook", &receiver.url("/hook")]);
    let http = Http::of(&broker);
    http.declare("orders", json!({"alarm_depth": 1})).await;
    http.publish("orders", "a").await;
    http.publish("orders", "b").await;
    let raised = receiver.next().await;
    assert_alarm_post(&raised, "alarm_raised", "orders", 2);

    consume(http, "orders", 2).await;
    let cleared = receiver.next().await;
    assert_alarm_post(&cleared, "alarm_cleared", "orders", 0);
    assert!(cleared.event()["time_ms"].as_u64() >= raised.event()["time_ms"].as_u64());
    assert!(receiver.try_next().is_none(), "one POST per transition");
}

#[tokio::test]
async fn webhook_failures_are_retried_until_delivered() {
    // The first two attempts fail with 500; the third succeeds (after 0.5 s and 1 s of backoff).
    let mut receiver = WebhookReceiver::answering(|n| if n < 2 { 500 } else { 200 }).await;
    let broker = Broker::start_with(&["--alarm-webhook", &receiver.url("/hook")]);
    let http = Http::of(&broker);
    http.declare("orders", json!({"alarm_depth": 1})).await;
    http.publish("orders", "a").await;
    http.publish("orders", "b").await;

    let attempts = [receiver.next().await, receiver.next().await, receiver.next().await];
    let statuses: Vec<u16> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    for attempt in &attempts {
        assert_alarm_post(attempt, "alarm_raised", "orders", 2);
        assert_eq!(attempt.event(), attempts[0].event(), "every attempt carries the same event");
    }

    // Delivered: no further attempt of the raise, the next POST is the clear.
    consume(http, "orders", 2).await;
    let cleared = receiver.next().await;
    assert_alarm_post(&cleared, "alarm_cleared", "orders", 0);
    assert_eq!(cleared.status, 200);
}

/// Raises and clears the alarm of `orders` (threshold 1) `rounds` times through the API, each
/// publish and pull taking less than [`PROMPT`], while the webhook fails in the background.
async fn alarms_stay_prompt(broker: &Broker, rounds: usize) {
    let http = Http::of(broker);
    http.declare("orders", json!({"alarm_depth": 1})).await;
    for round in 0..rounds {
        let started = Instant::now();
        http.publish("orders", &format!("{round}a")).await;
        http.publish("orders", &format!("{round}b")).await;
        assert!(started.elapsed() < PROMPT, "publishing took {:?}", started.elapsed());
        wait_alarm(http, "orders", true).await;
        let started = Instant::now();
        consume(http, "orders", 2).await;
        assert!(started.elapsed() < PROMPT, "consuming took {:?}", started.elapsed());
        wait_alarm(http, "orders", false).await;
    }
    let started = Instant::now();
    http.get("/health/live").await.assert_status(200);
    let peeked = messages(&http.get_json("/api/queues/orders/peek").await);
    assert!(peeked.is_empty(), "{peeked:?}");
    assert!(started.elapsed() < PROMPT, "the API answered in {:?}", started.elapsed());
    assert_eq!(log_lines(broker, "queue depth alarm raised", "orders").len(), rounds);
}

#[tokio::test]
async fn unreachable_webhook_does_not_hurt_the_broker() {
    // A port nobody listens on: bind one, then close it.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let mut broker = Broker::start_with(&["--alarm-webhook", &format!("http://{closed}/hook")]);
    alarms_stay_prompt(&broker, 3).await;
    assert!(broker.is_running());
}

#[tokio::test]
async fn silent_webhook_does_not_hurt_the_broker() {
    // A receiver that accepts connections and never answers: every attempt hangs until the
    // broker's own timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut broker = Broker::start_with(&["--alarm-webhook", &url]);
    alarms_stay_prompt(&broker, 3).await;
    assert!(broker.is_running());
    holder.abort();
}
