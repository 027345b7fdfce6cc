//! The dashboard (`GET /`) rendered by a real browser: headless Chromium loads the page, lets
//! its script poll the API for a few seconds of virtual time, and dumps the DOM it built.
//!
//! Needs Debian's `chromium` at [`CHROMIUM`]. Without it the tests are skipped with a note,
//! except under CI (`CI` set), where a missing browser is a failure: CI installs it.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hopper_tests::{eventually, read_request, write_response, Broker, Http, DEADLINE};
use serde_json::json;
use tokio::io::BufReader;
use tokio::net::TcpListener;

/// Where Debian's `chromium` package puts the browser.
const CHROMIUM: &str = "/usr/bin/chromium";
/// How long one browser run may take, start-up included.
const BROWSER_DEADLINE: Duration = Duration::from_secs(60);
/// Virtual time the page runs for before its DOM is dumped: about five polls (one a second).
const VIRTUAL_TIME_MS: u32 = 5000;

/// True when the browser is there. False (after saying so) when it is missing outside CI;
/// a failure when it is missing under CI.
fn browser_available() -> bool {
    if Path::new(CHROMIUM).is_file() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(!ci, "{CHROMIUM} is missing under CI; install it: apt-get install -y chromium (.ci/run does)");
    eprintln!("skipping the dashboard test: {CHROMIUM} is missing (apt-get install -y chromium)");
    false
}

/// Loads `url` in headless Chromium, runs it for [`VIRTUAL_TIME_MS`] of virtual time (timers
/// fire without waiting in real time; fetches complete first) and returns the DOM it dumped.
async fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().expect("a temporary browser profile");
    let mut command = tokio::process::Command::new(CHROMIUM);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().unwrap_or_else(|err| panic!("spawn {CHROMIUM}: {err}"));
    let output = tokio::time::timeout(BROWSER_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{CHROMIUM} did not dump {url} within {BROWSER_DEADLINE:?}"))
        .expect("wait for chromium");
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && dom.contains("</html>"),
        "{CHROMIUM} failed to dump {url} ({}); stderr:\n{stderr}\nstdout:\n{dom}",
        output.status
    );
    dom
}

/// What the dashboard shows for one queue.
#[derive(Debug)]
struct QueueView {
    /// The text of the row's `td.ready` cell.
    ready: String,
    /// The row's class (`alarm` while the alarm is raised).
    row_class: String,
    /// The whole row, as HTML.
    row: String,
    /// The chart's `data-points`: the ready depth at each poll.
    points: Vec<u64>,
}

/// The opening tag `<name ...>` in `dom` that has `attribute="value"`, and where it starts.
fn find_tag<'a>(dom: &'a str, name: &str, attribute: &str, value: &str) -> Option<(usize, &'a str)> {
    let open = format!("<{name} ");
    let wanted = format!(" {attribute}=\"{value}\"");
    let mut from = 0;
    while let Some(at) = dom[from..].find(&open) {
        let start = from + at;
        let end = start + dom[start..].find('>')?;
        let tag = &dom[start..=end];
        if tag.contains(&wanted) {
            return Some((start, tag));
        }
        from = end;
    }
    None
}

/// The value of `attribute` in the opening tag `tag`.
fn attribute(tag: &str, attribute: &str) -> Option<String> {
    let key = format!(" {attribute}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(tag[start..start + len].to_owned())
}

/// The dashboard's row and chart of `queue` in `dom`; fails the test, showing the DOM, if
/// either is missing.
fn queue_view(dom: &str, queue: &str) -> QueueView {
    let (start, tr) = find_tag(dom, "tr", "data-queue", queue)
        .unwrap_or_else(|| panic!("no row tr[data-queue={queue}] in the DOM:\n{dom}"));
    let end = start + dom[start..].find("</tr>").expect("the row ends");
    let row = &dom[start..end];
    let cell = "<td class=\"ready\">";
    let ready_at = row.find(cell).unwrap_or_else(|| panic!("no td.ready in the row:\n{row}")) + cell.len();
    let ready = row[ready_at..].split("</td>").next().unwrap_or_default().trim();
    let (_, canvas) = find_tag(dom, "canvas", "data-queue", queue)
        .unwrap_or_else(|| panic!("no canvas[data-queue={queue}] in the DOM:\n{dom}"));
    let points = attribute(canvas, "data-points").unwrap_or_else(|| panic!("no data-points on {canvas}"));
    let points = points
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or_else(|_| panic!("data-points of {queue}: {canvas}")))
        .collect();
    QueueView {
        ready: ready.to_owned(),
        row_class: attribute(tr, "class").unwrap_or_default(),
        row: row.to_owned(),
        points,
    }
}

/// How many times the page refreshed (`body[data-refreshes]`).
fn refreshes(dom: &str) -> usize {
    let start = dom.find("<body").unwrap_or_else(|| panic!("no body tag in the DOM:\n{dom}"));
    let body = &dom[start..start + dom[start..].find('>').expect("the body tag ends")];
    attribute(body, "data-refreshes")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the page never refreshed: {body}"))
}

#[tokio::test]
async fn dashboard_shows_every_queue_and_its_depth() {
    if !browser_available() {
        return;
    }
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("orders", json!({})).await;
    for i in 0..7 {
        http.publish("orders", &format!("order {i}")).await;
    }
    http.declare("payments.dlq", json!({})).await;
    http.declare("payments", json!({"dead_letter": "payments.dlq", "alarm_depth": 2})).await;
    for i in 0..3 {
        http.publish("payments", &format!("payment {i}")).await;
    }
    eventually("the alarm of payments", DEADLINE, || async { http.queue("payments").await["alarm"] == true })
        .await;
    let page = format!("http://{}/", broker.http_addr());

    let dom = dump_dom(&page).await;
    let polls = refreshes(&dom);
    assert!(polls >= 3, "virtual time ran the page's one-second poll several times: {polls}");
    let orders = queue_view(&dom, "orders");
    assert_eq!(orders.ready, "7", "{orders:?}");
    assert_eq!(orders.points.len(), polls, "one chart point per poll: {orders:?}");
    assert!(orders.points.iter().all(|&p| p == 7), "{orders:?}");
    assert_eq!(orders.row_class, "", "no alarm on orders: {orders:?}");
    let payments = queue_view(&dom, "payments");
    assert_eq!((payments.ready.as_str(), payments.row_class.as_str()), ("3", "alarm"), "{payments:?}");
    assert!(payments.row.contains("ALARM"), "{payments:?}");
    let dlq = queue_view(&dom, "payments.dlq");
    assert!(dlq.row.contains("DLQ"), "the dead-letter queue is tagged: {dlq:?}");
    assert!(dom.contains("3 queue(s)"), "the status line counts the queues:\n{dom}");

    for i in 7..12 {
        http.publish("orders", &format!("order {i}")).await;
    }
    let dom = dump_dom(&page).await;
    let orders = queue_view(&dom, "orders");
    assert_eq!(orders.ready, "12", "{orders:?}");
    assert_eq!(orders.points.last(), Some(&12), "{orders:?}");
}

#[tokio::test]
async fn dashboard_follows_the_queue_while_open() {
    if !browser_available() {
        return;
    }
    let broker = Broker::start();
    let http = Http::of(&broker);
    http.declare("orders", json!({})).await;
    for i in 0..7 {
        http.publish("orders", &format!("order {i}")).await;
    }
    // The page loads through a proxy that publishes 5 more orders before answering the page's
    // third poll of /api/queues: what the page shows afterwards can only come from polling.
    let proxy = PublishingProxy::start(http, 3, "orders", 5).await;
    let dom = dump_dom(&format!("http://{}/", proxy.addr)).await;
    assert!(proxy.polls.load(Ordering::SeqCst) >= 4, "the page kept polling");
    let orders = queue_view(&dom, "orders");
    assert_eq!(orders.ready, "12", "the table follows the queue: {orders:?}");
    let points = &orders.points;
    assert_eq!(&points[..2], [7, 7], "{orders:?}");
    assert_eq!(points[2..].iter().filter(|&&p| p != 12).count(), 0, "{orders:?}");
    assert_eq!(points.len(), refreshes(&dom), "{orders:?}");
}

#[tokio::test]
async fn dashboard_shows_exchanges_and_where_they_route() {
    if !browser_available() {
        return;
    }
    let broker = Broker::start();
    let http = Http::of(&broker);
    for queue in ["eu.orders", "all.orders", "lost"] {
        http.declare(queue, json!({})).await;
    }
    http.put_json("/api/exchanges/lost-and-found", &json!({"type": "fanout"})).await.assert_status(201);
    let events = json!({"type": "topic", "durable": true, "alternate": "lost-and-found"});
    http.put_json("/api/exchanges/events", &events).await.assert_status(201);
    for (source, destination, key) in [
        ("events", "eu.orders", "orders.eu.*"),
        ("events", "all.orders", "orders.#"),
        ("lost-and-found", "lost", ""),
    ] {
        let binding = json!({"source": source, "destination": destination, "key": key});
        http.post_json("/api/bindings", &binding).await.assert_status(201);
    }
    for key in ["orders.eu.created", "orders.us.created", "payments.eu.settled"] {
        let message = json!({"body": key, "routing_key": key});
        http.post_json("/api/exchanges/events/messages", &message).await.assert_status(201);
    }

    let dom = dump_dom(&format!("http://{}/", broker.http_addr())).await;
    let row = exchange_row(&dom, "events");
    for shown in ["topic", "eu.orders", "orders.eu.*", "all.orders", "orders.#", "alternate: lost-and-found"]
    {
        assert!(row.contains(shown), "the events row shows {shown}:\n{row}");
    }
    assert!(row.contains("<td class=\"count\">2</td>"), "two bindings:\n{row}");
    let fallback = exchange_row(&dom, "lost-and-found");
    assert!(fallback.contains("fanout (transient)") && fallback.contains("lost"), "{fallback}");
    let ready = |queue| queue_view(&dom, queue).ready;
    assert_eq!([ready("eu.orders"), ready("all.orders"), ready("lost")], ["1", "2", "1"]);
}

/// The dashboard's row of `exchange` in `dom`, as HTML; fails the test if it is missing.
fn exchange_row(dom: &str, exchange: &str) -> String {
    let (start, _) = find_tag(dom, "tr", "data-exchange", exchange)
        .unwrap_or_else(|| panic!("no row tr[data-exchange={exchange}] in the DOM:\n{dom}"));
    let end = start + dom[start..].find("</tr>").expect("the row ends");
    dom[start..end].to_owned()
}

/// An HTTP proxy in front of a broker's HTTP listener (keep-alive, one request at a time per
/// connection) that publishes to a queue before answering a given poll of `/api/queues`.
struct PublishingProxy {
    addr: std::net::SocketAddr,
    /// Polls of `/api/queues` seen so far.
    polls: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl PublishingProxy {
    /// Proxies to `upstream`; before answering poll number `at` (from 1), publishes `count`
    /// messages to `queue`.
    async fn start(upstream: Http, at: usize, queue: &'static str, count: usize) -> PublishingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let polls = Arc::new(AtomicUsize::new(0));
        let seen = polls.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let polls = seen.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    while let Ok(Some(request)) = read_request(&mut stream).await {
                        if request.method == "GET" && request.path == "/api/queues" {
                            let poll = polls.fetch_add(1, Ordering::SeqCst) + 1;
                            if poll == at {
                                for i in 0..count {
                                    upstream
                                        .publish(queue, &format!("published during poll {poll}: {i}"))
                                        .await;
                                }
                            }
                        }
                        let body = request.header("content-type").map(|t| (t, request.body.as_slice()));
                        let response = upstream.request(&request.method, &request.path, body).await;
                        let content_type = response.header("content-type").unwrap_or("text/plain").to_owned();
                        let written = write_response(
                            &mut stream,
                            response.status,
                            &content_type,
                            response.body.as_bytes(),
                            false,
                        )
                        .await;
                        if written.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        PublishingProxy { addr, polls, server }
    }
}

impl Drop for PublishingProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}
