//! Users, logins and permissions over the binary protocol: the built-in guest and when it
//! stops working, SCRAM logins, users that survive a crash, and a permission check on every
//! operation that refuses without changing anything.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hopper_client::{
    ConnectOptions, Connection, ConsumeOptions, Credentials, Error, ErrorCode, ExchangeKind, ExchangeOptions,
    GetOptions, Permissions, PublishOptions, QueueOptions,
};
use hopper_tests::{connect, connect_with, publish_all, run_cli, stats_eventually, Broker};

fn as_user(user: &str, password: &str) -> ConnectOptions {
    ConnectOptions { credentials: Some(Credentials::new(user, password)), ..ConnectOptions::default() }
}

async fn login(addr: SocketAddr, user: &str, password: &str) -> Result<Connection, Error> {
    Connection::connect_with(addr, as_user(user, password)).await
}

/// A broker with an admin `root` (every permission) and a user `app` with no permissions yet.
async fn with_users() -> (Broker, Connection) {
    let broker = Broker::start();
    let guest = connect(&broker).await;
    guest.add_user("app", "app-pw", &[]).await.unwrap();
    guest.add_user("root", "root-pw", &["admin".to_string()]).await.unwrap();
    let root = login(broker.addr(), "root", "root-pw").await.expect("root logs in");
    root.set_permissions("root", Permissions::all()).await.unwrap();
    (broker, root)
}

fn refused(result: Result<impl std::fmt::Debug, Error>, what: &str) -> String {
    match result {
        Err(Error::Broker { code: ErrorCode::AccessRefused, message }) => message,
        other => panic!("{what}: expected ACCESS_REFUSED, got {other:?}"),
    }
}

#[tokio::test]
async fn the_guest_works_until_an_admin_exists_then_credentials_are_needed() {
    let broker = Broker::start();
    let guest = connect(&broker).await;
    assert_eq!(guest.user(), "guest");
    let (me, mechanism) = guest.whoami().await.unwrap();
    assert_eq!((me.name.as_str(), mechanism.as_str()), ("guest", "default"));

    // A plain user leaves the guest in place; an admin ends it.
    guest.add_user("worker", "pw", &[]).await.unwrap();
    connect(&broker).await;
    guest.add_user("boss", "boss-pw", &["admin".to_string()]).await.unwrap();
    match Connection::connect(broker.addr()).await {
        Err(Error::Authentication(message)) => assert!(message.contains("--user"), "{message}"),
        other => panic!("expected an authentication error, got {other:?}"),
    }
    let boss = login(broker.addr(), "boss", "boss-pw").await.expect("the admin logs in");
    let (me, mechanism) = boss.whoami().await.unwrap();
    assert_eq!((me.name.as_str(), mechanism.as_str()), ("boss", "SCRAM-SHA-256"));
    assert_eq!(me.tags, ["admin"]);
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_user_fail_alike() {
    let (broker, _root) = with_users().await;
    let wrong = login(broker.addr(), "app", "nope").await.unwrap_err();
    let unknown = login(broker.addr(), "nobody", "nope").await.unwrap_err();
    let (Error::Authentication(wrong), Error::Authentication(unknown)) = (wrong, unknown) else {
        panic!("both are authentication errors");
    };
    assert_eq!(wrong.replace("'app'", "'X'"), unknown.replace("'nobody'", "'X'"), "nothing tells them apart");
    login(broker.addr(), "app", "app-pw").await.expect("the right password works");
}

#[tokio::test]
async fn users_and_permissions_survive_kill_9() {
    let (mut broker, root) = with_users().await;
    let patterns = Permissions { configure: String::new(), write: "jobs".into(), read: "jobs".into() };
    root.set_permissions("app", patterns.clone()).await.unwrap();
    drop(root);
    broker.kill();
    broker.restart();
    let app = login(broker.addr(), "app", "app-pw").await.expect("app still logs in");
    assert_eq!(app.whoami().await.unwrap().0.permissions, patterns);
    assert!(matches!(Connection::connect(broker.addr()).await, Err(Error::Authentication(_))), "no guest");
}

#[tokio::test]
async fn every_operation_is_checked_and_a_refusal_changes_nothing() {
    let (broker, root) = with_users().await;
    root.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    root.declare_queue("secret", QueueOptions::default()).await.unwrap();
    root.declare_exchange("events", ExchangeKind::Fanout, ExchangeOptions::default()).await.unwrap();
    publish_all(&root, "secret", ["classified"]).await;
    // app may publish to and read jobs, and bind it from events; nothing else.
    let patterns = Permissions { configure: String::new(), write: "jobs".into(), read: "jobs|events".into() };
    root.set_permissions("app", patterns).await.unwrap();
    let app = login(broker.addr(), "app", "app-pw").await.unwrap();

    // Allowed.
    app.publish("jobs", "work", PublishOptions::default()).await.expect("write on jobs");
    let got = app.get("jobs", GetOptions::default()).await.expect("read on jobs");
    assert_eq!(got.len(), 1);
    app.bind_queue("jobs", "events", "", Default::default()).await.expect("read events, write jobs");

    // Refused, each naming the user, the permission and the resource.
    let message = refused(app.declare_queue("mine", QueueOptions::default()).await, "declare");
    assert_eq!(message, "user 'app' may not declare queue 'mine': no configure permission on it");
    refused(app.delete_queue("jobs", Default::default()).await, "delete");
    refused(app.purge_queue("secret").await, "purge");
    refused(app.publish("secret", "x", PublishOptions::default()).await, "publish");
    refused(app.get("secret", GetOptions::default()).await, "get");
    refused(app.consume("secret", ConsumeOptions::default()).await, "consume");
    refused(app.peek("secret", 1).await, "peek");
    refused(app.declare_exchange("mine", ExchangeKind::Topic, ExchangeOptions::default()).await, "exchange");
    refused(app.publish_to("events", "", "x", PublishOptions::default()).await, "publish to exchange");
    refused(app.bind_queue("secret", "events", "", Default::default()).await, "bind to secret");
    refused(app.list_users().await, "list users");
    refused(app.add_user("mallory", "pw", &["admin".to_string()]).await, "add user");
    refused(app.set_permissions("app", Permissions::all()).await, "grant itself");

    // Nothing changed.
    let secret = stats_eventually(&root, "secret", |_| true).await;
    assert_eq!((secret.ready, secret.published_total), (1, 1));
    assert!(root.queue_stats("mine").await.is_err());
    assert_eq!(root.list_users().await.unwrap().users.len(), 2);
    assert!(root.list_exchanges().await.unwrap().iter().all(|x| x.name != "mine"));
}

#[tokio::test]
async fn changed_permissions_apply_to_connections_already_open() {
    let (broker, root) = with_users().await;
    root.declare_queue("jobs", QueueOptions::default()).await.unwrap();
    let app = login(broker.addr(), "app", "app-pw").await.unwrap();
    refused(app.publish("jobs", "x", PublishOptions::default()).await, "before the grant");
    let grant = Permissions { write: "jobs".into(), ..Permissions::default() };
    root.set_permissions("app", grant).await.unwrap();
    app.publish("jobs", "x", PublishOptions::default()).await.expect("granted");
    root.set_permissions("app", Permissions::default()).await.unwrap();
    refused(app.publish("jobs", "x", PublishOptions::default()).await, "after the revoke");
    root.delete_user("app").await.unwrap();
    refused(app.publish("jobs", "x", PublishOptions::default()).await, "after the delete");
}

#[tokio::test]
async fn failed_logins_from_an_address_are_answered_more_and_more_slowly() {
    let (broker, _root) = with_users().await;
    let started = Instant::now();
    for _ in 0..20 {
        login(broker.addr(), "app", "app-pw").await.expect("right password");
    }
    let right = started.elapsed();
    let started = Instant::now();
    for _ in 0..20 {
        assert!(matches!(login(broker.addr(), "app", "wrong").await, Err(Error::Authentication(_))));
    }
    let wrong = started.elapsed();
    // 10 ms more for each failure in a row: at least 2.1 s for twenty.
    assert!(wrong >= Duration::from_millis(2100), "twenty failures took {wrong:?}");
    assert!(wrong > right * 2, "failures {wrong:?} vs successes {right:?}");
    assert!(broker.stderr().matches("login refused").count() >= 20, "each failure is logged");
    let refused: Vec<serde_json::Value> = access_log(&broker)
        .into_iter()
        .filter(|e| e["event"] == "login_refused" && e["user"] == "app")
        .collect();
    assert_eq!(refused.len(), 20, "each failure is in the access log");
    assert_eq!(refused[0]["peer"], "127.0.0.1");
    assert!(refused[19]["detail"].as_str().unwrap().contains("20 in a row"), "{}", refused[19]);
}

/// The access audit log's events, oldest first.
fn access_log(broker: &Broker) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(broker.data_dir().join("audit/access.log")).unwrap_or_default();
    text.lines().map(|line| serde_json::from_str(line).expect("a JSON line")).collect()
}

#[tokio::test]
async fn changes_to_users_permissions_and_tokens_say_who_made_them() {
    let (broker, root) = with_users().await;
    root.set_permissions("app", Permissions { read: "jobs".into(), ..Permissions::default() }).await.unwrap();
    root.update_user("app", Some("new-pw"), &[]).await.unwrap();
    root.create_token("ci", 0).await.unwrap();
    root.delete_user("app").await.unwrap();
    let events: Vec<(String, String, String)> = access_log(&broker)
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (field("event"), field("by"), field("user"))
        })
        .collect();
    let expected = [
        ("user_added", "guest", "app"),
        ("user_added", "guest", "root"),
        ("permissions_set", "root", "root"),
        ("permissions_set", "root", "app"),
        ("user_changed", "root", "app"),
        ("token_created", "root", "root"),
        ("user_deleted", "root", "app"),
    ];
    let expected: Vec<(String, String, String)> =
        expected.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
    assert_eq!(events, expected);
    let text = std::fs::read_to_string(broker.data_dir().join("audit/access.log")).unwrap();
    assert!(!text.contains("new-pw") && !text.contains("hopper_"), "no password or token is written");
}

/// An address of this machine other than loopback, if it has one.
fn non_loopback_address() -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn the_guest_is_refused_from_another_address() {
    let Some(ip) = non_loopback_address() else {
        eprintln!("this machine has no address but loopback; the rule is covered by the broker's unit tests");
        return;
    };
    let broker = Broker::start_with(&["--listen", "0.0.0.0:0"]);
    let addr = SocketAddr::new(ip, broker.addr().port());
    match Connection::connect(addr).await {
        Err(Error::Authentication(message)) => {
            assert!(message.contains("only connect from localhost"), "{message}");
            assert!(message.contains("hopper user add"), "{message}");
        }
        other => panic!("expected the guest to be refused from {ip}, got {other:?}"),
    }
    connect_with(&broker, ConnectOptions::default()).await;
}

#[tokio::test]
async fn the_cli_manages_users_and_reads_credentials_from_flags_env_and_url() {
    let broker = Broker::start();
    let addr = broker.addr().to_string();
    run_cli(&broker, &["user", "add", "ops", "p@ss:w/rd", "--tags", "admin"]).await.assert_success();
    run_cli(
        &broker,
        &[
            "--user",
            "ops",
            "--password",
            "p@ss:w/rd",
            "permissions",
            "set",
            "ops",
            "--configure",
            ".*",
            "--write",
            ".*",
            "--read",
            ".*",
        ],
    )
    .await
    .assert_success();
    let whoami = run_cli(&broker, &["--user", "ops", "--password", "p@ss:w/rd", "whoami", "--json"]).await;
    let me = whoami.assert_success().json();
    assert_eq!((me["name"].as_str(), me["mechanism"].as_str()), (Some("ops"), Some("SCRAM-SHA-256")));

    let url = format!("hopper://ops:p%40ss%3Aw%2Frd@{addr}");
    let mut command = hopper_tests::cli_at(&url);
    command.args(["queue", "declare", "from-url"]);
    hopper_tests::run(command).await.assert_success();

    let mut command = hopper_tests::cli(&broker);
    command.env("HOPPER_USER", "ops").env("HOPPER_PASSWORD", "p@ss:w/rd").args(["user", "list", "--json"]);
    let users = hopper_tests::run(command).await;
    let names: Vec<String> =
        users.assert_success().json_lines().iter().map(|u| u["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["ops"]);

    let wrong = run_cli(&broker, &["--user", "ops", "--password", "nope", "whoami"]).await;
    assert!(wrong.assert_one_line_error().contains("authentication failed"), "{}", wrong.stderr);
}

#[tokio::test]
async fn the_cli_makes_tokens_that_the_http_api_takes() {
    let broker = Broker::start();
    let guest = connect(&broker).await;
    guest.add_user("ops", "ops-pw", &["admin".to_string()]).await.unwrap();
    let as_ops = ["--user", "ops", "--password", "ops-pw"];
    let created =
        run_cli(&broker, &[&as_ops[..], &["token", "create", "--name", "ci", "--expires", "30d"]].concat())
            .await;
    let token = created.assert_success().stdout.trim().to_string();
    assert!(token.starts_with("hopper_"), "{token}");

    let http = hopper_tests::Http::of(&broker);
    let host = http.host();
    let bearer = format!("Bearer {token}");
    let me =
        http.request_with("GET", "/api/whoami", &[("Host", &host), ("Authorization", &bearer)], None).await;
    assert!(me.body.contains("\"ops\""), "{}", me.body);

    let listed = run_cli(&broker, &[&as_ops[..], &["token", "list", "--json"]].concat()).await;
    let tokens = listed.assert_success().json_lines();
    assert_eq!(tokens[0]["name"], "ci");
    assert!(tokens[0]["expires_ms"].as_u64().unwrap() > hopper_tests::unix_ms() + 29 * 86_400_000);
    assert!(!listed.stdout.contains(&token));

    run_cli(&broker, &[&as_ops[..], &["token", "delete", "ci"]].concat()).await.assert_success();
    let after =
        http.request_with("GET", "/api/whoami", &[("Host", &host), ("Authorization", &bearer)], None).await;
    assert_eq!(after.status, 401);
    let twice = run_cli(&broker, &[&as_ops[..], &["token", "delete", "ci"]].concat()).await;
    assert!(twice.assert_one_line_error().contains("no token named 'ci'"), "{}", twice.stderr);
}
