//! The binary protocol inside TLS: the TLS listener beside the plain one (or alone), logins
//! over TLS (SCRAM, PLAIN, and EXTERNAL by client certificate), clients that do not trust the
//! broker or are not trusted by it, the broker's startup errors for bad files, and the CLI's
//! `hoppers://`. Every certificate is made by a throwaway CA ([`Pki`]).

use futures::StreamExt;
use hopper_client::{
    ConnectOptions, Connection, ConsumeOptions, Credentials, Error, Mechanism, Permissions, QueueOptions,
    TlsOptions,
};
use hopper_proto::{pb, Body};
use hopper_tests::{
    cli_at, command, connect, path_arg as path, publish_all, run, within, Broker, CliOutput, Pki, RawConn,
};
use rcgen::ExtendedKeyUsagePurpose;

/// A broker with a TLS listener (certificate from `pki`) besides `extra`'s flags.
fn tls_broker(pki: &Pki, extra: &[&str]) -> Broker {
    let (cert, key) = pki.server();
    let mut args = vec!["--tls-listen", "127.0.0.1:0", "--tls-cert", path(&cert), "--tls-key", path(&key)];
    args.extend_from_slice(extra);
    Broker::start_with(&args)
}

async fn connect_tls(broker: &Broker, options: ConnectOptions) -> Result<Connection, Error> {
    within("a TLS connection", Connection::connect_with(broker.tls_addr(), options)).await
}

fn over(tls: TlsOptions) -> ConnectOptions {
    ConnectOptions { tls: Some(tls), ..ConnectOptions::default() }
}

#[tokio::test]
async fn messages_go_through_the_tls_listener_both_ways() {
    let pki = Pki::new("main");
    let broker = tls_broker(&pki, &[]);
    let conn = connect_tls(&broker, over(pki.tls())).await.expect("connect over TLS");
    conn.declare_queue("secure", QueueOptions::default()).await.unwrap();
    // Enough bytes in flight that TLS records queue up behind a full socket in both directions.
    let bodies: Vec<String> = (0..2000).map(|i| format!("{i:04}-{}", "x".repeat(1000))).collect();
    let ids = publish_all(&conn, "secure", bodies.clone()).await;
    assert_eq!(ids.len(), bodies.len());
    // The plain listener serves the same broker.
    let plain = connect(&broker).await;
    assert_eq!(plain.queue_stats("secure").await.unwrap().ready, 2000);

    let mut consumer =
        conn.consume("secure", ConsumeOptions { prefetch: 100, ..Default::default() }).await.unwrap();
    for expected in &bodies {
        let delivery = within("a delivery", consumer.next()).await.expect("open").expect("delivery");
        assert_eq!(&delivery.body[..], expected.as_bytes());
        delivery.ack().await.unwrap();
    }
    let (me, mechanism) = conn.whoami().await.unwrap();
    assert_eq!((me.name.as_str(), mechanism.as_str()), ("guest", "default"));
    conn.close().await.expect("a clean close over TLS");
    assert!(broker.stderr().contains("tls listening on"), "{}", broker.stderr());
}

#[tokio::test]
async fn scram_and_plain_logins_over_tls_and_plain_only_over_tls() {
    let pki = Pki::new("main");
    let broker = tls_broker(&pki, &[]);
    let guest = connect(&broker).await;
    guest.add_user("app", "app-pw", &[]).await.unwrap();
    let login = |mechanism| ConnectOptions {
        credentials: Some(Credentials::new("app", "app-pw")),
        mechanism,
        tls: Some(pki.tls()),
        ..ConnectOptions::default()
    };

    let scram = connect_tls(&broker, login(Mechanism::Auto)).await.expect("SCRAM over TLS");
    assert_eq!(scram.whoami().await.unwrap().1, "SCRAM-SHA-256");
    let plain = connect_tls(&broker, login(Mechanism::Plain)).await.expect("PLAIN over TLS");
    assert_eq!(plain.user(), "app");
    assert_eq!(plain.whoami().await.unwrap().1, "PLAIN");
    let wrong =
        ConnectOptions { credentials: Some(Credentials::new("app", "nope")), ..login(Mechanism::Plain) };
    match connect_tls(&broker, wrong).await {
        Err(Error::Authentication(message)) => assert!(message.contains("'app'"), "{message}"),
        other => panic!("a wrong PLAIN password is refused, got {other:?}"),
    }

    // The client does not send a readable password over plain TCP...
    let cleartext = ConnectOptions { tls: None, ..login(Mechanism::Plain) };
    match Connection::connect_with(broker.addr(), cleartext).await {
        Err(Error::Authentication(message)) => assert!(message.contains("only over TLS"), "{message}"),
        other => panic!("the client refuses PLAIN without TLS, got {other:?}"),
    }
    // ...and the broker refuses it from a client that does.
    let mut raw = RawConn::connect(broker.addr()).await;
    let hello = pb::Hello {
        protocol_version: hopper_proto::PROTOCOL_VERSION,
        mechanism: "PLAIN".into(),
        auth: b"\0app\0app-pw".to_vec().into(),
        ..Default::default()
    };
    match raw.send_hello(hello).await.body {
        Some(Body::HelloRejected(rejected)) => {
            assert_eq!(hopper_proto::error_code(rejected.code), hopper_proto::ErrorCode::Unauthenticated);
            assert!(rejected.message.contains("only over TLS"), "{}", rejected.message);
        }
        other => panic!("PLAIN over plain TCP is refused, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_broker_fails_clearly() {
    let pki = Pki::new("main");
    let broker = tls_broker(&pki, &[]);
    let stranger = Pki::new("stranger");
    let untrusted = [over(stranger.tls()), over(TlsOptions::new("localhost"))];
    for options in untrusted {
        let error = connect_tls(&broker, options).await.expect_err("an unknown CA is refused").to_string();
        assert!(error.contains("not signed by a CA this client trusts"), "{error}");
        assert!(error.contains("UnknownIssuer"), "{error}");
    }
    let elsewhere = TlsOptions { server_name: "mq.example.com".into(), ..pki.tls() };
    let error = connect_tls(&broker, over(elsewhere)).await.expect_err("a wrong name is refused").to_string();
    assert!(error.contains("not valid for 'mq.example.com'"), "{error}");
    // The broker logged the failed handshakes and serves on.
    connect_tls(&broker, over(pki.tls())).await.expect("a trusting client connects");
}

#[tokio::test]
async fn mutual_tls_logs_in_the_certificate_user_and_refuses_clients_without_one() {
    let pki = Pki::new("main");
    let broker = tls_broker(&pki, &["--tls-client-ca", path(&pki.ca_path())]);
    let guest = connect(&broker).await;
    guest.add_user("alice", "alice-pw", &[]).await.unwrap();
    let mine =
        Permissions { configure: "alice\\..*".into(), write: "alice\\..*".into(), read: "alice\\..*".into() };
    guest.set_permissions("alice", mine).await.unwrap();
    let with_cert = |client| TlsOptions { client_certificate: Some(client), ..pki.tls() };

    let alice =
        connect_tls(&broker, over(with_cert(pki.client("alice")))).await.expect("alice by certificate");
    assert_eq!(alice.user(), "alice");
    let (me, mechanism) = alice.whoami().await.unwrap();
    assert_eq!((me.name.as_str(), mechanism.as_str()), ("alice", "EXTERNAL"));
    alice.declare_queue("alice.inbox", QueueOptions::default()).await.expect("alice's own queue");
    publish_all(&alice, "alice.inbox", ["hello"]).await;
    let refused = alice.declare_queue("bob.inbox", QueueOptions::default()).await.unwrap_err();
    assert!(
        matches!(refused, Error::Broker { code: hopper_client::ErrorCode::AccessRefused, .. }),
        "{refused}"
    );

    // A certificate with a password login: the certificate opens the door, SCRAM names the user.
    let both = ConnectOptions {
        credentials: Some(Credentials::new("alice", "alice-pw")),
        ..over(with_cert(pki.client("alice")))
    };
    assert_eq!(connect_tls(&broker, both).await.unwrap().whoami().await.unwrap().1, "SCRAM-SHA-256");

    let error = connect_tls(&broker, over(pki.tls())).await.expect_err("no certificate").to_string();
    assert!(error.contains("requires a client certificate"), "{error}");
    let stranger = Pki::new("stranger");
    let forged = with_cert(stranger.client("alice"));
    let error =
        connect_tls(&broker, over(forged)).await.expect_err("a certificate of another CA").to_string();
    assert!(error.contains("refused this client's certificate"), "{error}");
    match connect_tls(&broker, over(with_cert(pki.client("mallory")))).await {
        Err(Error::Authentication(message)) => {
            assert!(message.contains("'mallory', who does not exist"), "{message}")
        }
        other => panic!("a certificate of an unknown user is refused, got {other:?}"),
    }
}

#[tokio::test]
async fn external_needs_a_verified_client_certificate() {
    let pki = Pki::new("main");
    let broker = tls_broker(&pki, &[]);
    let options = ConnectOptions { mechanism: Mechanism::External, ..over(pki.tls()) };
    match connect_tls(&broker, options).await {
        Err(Error::Authentication(message)) => assert!(message.contains("client certificate"), "{message}"),
        other => panic!("EXTERNAL without mutual TLS is refused, got {other:?}"),
    }
}

#[tokio::test]
async fn listen_off_leaves_only_the_tls_listener() {
    let pki = Pki::new("main");
    let broker = tls_broker(&pki, &["--listen", "off"]);
    let conn = connect_tls(&broker, over(pki.tls())).await.expect("connect over TLS");
    conn.declare_queue("only-tls", QueueOptions::default()).await.unwrap();
    let stderr = broker.stderr();
    assert!(!stderr.contains("hopperd: listening on"), "no plain listener:\n{stderr}");
    assert!(stderr.contains("tls listening on") && stderr.contains("data_dir="), "{stderr}");
}

#[tokio::test]
async fn the_cli_connects_with_hoppers_urls() {
    let pki = Pki::new("main");
    let broker = tls_broker(&pki, &["--tls-client-ca", path(&pki.ca_path())]);
    let guest = connect(&broker).await;
    guest.add_user("ops", "ops-pw", &[]).await.unwrap();
    guest.set_permissions("ops", Permissions::all()).await.unwrap();
    let (cert, key) = pki.sign("client-ops", "ops", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let ca = path(&pki.ca_path()).to_owned();
    let hopper = |server: &str, args: &[&str]| {
        let mut command = cli_at(server);
        command.args(["--tls-cert", path(&cert), "--tls-key", path(&key)]).args(args);
        run(command)
    };
    let with_password = format!("hoppers://ops:ops-pw@{}", broker.tls_addr());
    hopper(&with_password, &["--tls-ca", &ca, "queue", "declare", "cli-tls"]).await.assert_success();
    hopper(&with_password, &["--tls-ca", &ca, "publish", "cli-tls", "over", "tls"]).await.assert_success();
    let whoami = hopper(&with_password, &["--tls-ca", &ca, "whoami", "--json"]).await;
    assert_eq!(whoami.assert_success().json()["mechanism"], "SCRAM-SHA-256", "{whoami}");

    let by_certificate = format!("hoppers://{}", broker.tls_addr());
    let whoami = hopper(&by_certificate, &["--tls-ca", &ca, "whoami", "--json"]).await;
    let json = whoami.assert_success().json();
    assert_eq!(
        (json["name"].as_str(), json["mechanism"].as_str()),
        (Some("ops"), Some("EXTERNAL")),
        "{whoami}"
    );
    let consumed = hopper(&by_certificate, &["--tls-ca", &ca, "consume", "cli-tls", "--count", "2"]).await;
    assert_eq!(consumed.assert_success().stdout.lines().collect::<Vec<_>>(), ["over", "tls"], "{consumed}");

    let untrusted: CliOutput = hopper(&by_certificate, &["queue", "list"]).await;
    let line = untrusted.assert_one_line_error();
    assert!(line.contains("not signed by a CA this client trusts") && line.contains("--tls-ca"), "{line}");
    let mut plain = cli_at(&broker.addr().to_string());
    plain.args(["--tls-ca", &ca, "queue", "list"]);
    let mixed = run(plain).await;
    assert!(mixed.assert_one_line_error().contains("hoppers://"), "{mixed}");
}

/// Runs `hopperd` with `args` and expects it to refuse to start with one line.
async fn refused_start(args: &[&str]) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut hopperd = command("hopperd");
    hopperd.args(["--data-dir", path(data.path()), "--listen", "127.0.0.1:0", "--http", "off"]).args(args);
    let output = run(hopperd).await;
    assert_eq!(output.status.code(), Some(1), "{output}");
    let lines: Vec<&str> = output.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line:\n{output}");
    lines[0].to_owned()
}

#[tokio::test]
async fn bad_tls_files_stop_the_broker_with_one_line_naming_the_file() {
    let pki = Pki::new("main");
    let (cert, key) = pki.server();
    let (_, other_key) = pki.sign("other", "other", &["other"], ExtendedKeyUsagePurpose::ServerAuth);
    let missing = pki.dir().join("missing.pem");
    let listen = ["--tls-listen", "127.0.0.1:0"];
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--tls-cert", path(&missing), "--tls-key", path(&key)], "missing.pem: cannot read it"),
        (vec!["--tls-cert", path(&key), "--tls-key", path(&key)], "server.key: no certificate in it"),
        (vec!["--tls-cert", path(&cert), "--tls-key", path(&other_key)], "does not match the certificate"),
        (vec!["--tls-cert", path(&cert)], "--tls-key"),
    ];
    for (flags, expected) in cases {
        let line = refused_start(&[&listen[..], &flags].concat()).await;
        assert!(line.starts_with("hopperd: error: ") && line.contains(expected), "{flags:?}: {line}");
    }
    let line = refused_start(&["--tls-cert", path(&cert), "--tls-key", path(&key)]).await;
    assert!(line.contains("tls_listen is off"), "{line}");
}
